"""tools/tune_epilogue.py's candidate names: quack GemmConfig fields (the timing itself needs a
Hopper GPU with quack-kernels)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("tune_epilogue", REPO / "tools" / "tune_epilogue.py")
tune = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tune)


def test_named_candidates_and_quack_space():
    assert tune.parse_candidate("128x192pp_c21") == dict(tile_m=128, tile_n=192, pingpong=True, cluster_m=2,
                                                          cluster_n=1)
    space = tune.SM90_SPACE.split(",")
    assert len(space) == len(set(space)) == 22  # 11 tile shapes x clusters 2x1 and 1x2
    fields = [tune.parse_candidate(name) for name in space]
    assert {(f["tile_m"], f["tile_n"]) for f in fields if f["pingpong"]} == {
        (128, 128), (128, 160), (128, 192), (128, 208), (192, 128)}
    assert {(f["tile_m"], f["tile_n"]) for f in fields if not f["pingpong"]} == {
        (256, 128), (256, 160), (256, 192), (256, 208), (128, 224), (128, 256)}


def test_candidate_suffixes():
    assert tune.parse_candidate("256x160co_c12_dp_sw4") == dict(
        tile_m=256, tile_n=160, pingpong=False, cluster_m=1, cluster_n=2, is_dynamic_persistent=True,
        max_swizzle_size=4)
    assert tune.parse_candidate("128x208pp_c21_swap")["swap_ab"] is True


@pytest.mark.parametrize("name", ["128x192", "128x192xx_c21", "128x192pp_c2", "128x192pp_c21_fast", "sm90"])
def test_bad_candidate_names_fail_with_the_expected_form(name):
    with pytest.raises(ValueError, match="expected TMxTN"):
        tune.parse_candidate(name)


def test_bad_candidate_stops_the_tool_before_any_gpu_work(capsys):
    with pytest.raises(SystemExit) as exit_info:
        tune.main(["--candidates", "sm90,128x192pp_c21_fast"])
    assert exit_info.value.code == 2
    assert "quack candidate '128x192pp_c21_fast': expected TMxTN" in capsys.readouterr().err
