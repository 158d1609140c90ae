"""tools/tune_epilogue.py and tools/tune_norm.py on the CPU: quack candidate names and their
GemmConfig fields, tune_norm's launch candidates, the output mapping of the qkv role, the command
lines (checked before any GPU work; the --help smoke of every tool is in test_mfu_probe.py).
The timing itself needs a Hopper GPU (with quack-kernels for the epilogues)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from esmflash.kernels import gemm
from esmflash.kernels.norm import LAUNCH_CONFIGS
from esmflash.kernels.rotary import interleave_rotary_rows

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tune = _load("tune_epilogue")
tune_norm = _load("tune_norm")


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


def test_engine_pins_are_default_candidates():
    defaults = [tune.parse_candidate(name) for name in tune.CANDIDATES]
    assert gemm.SM90_GELU_CONFIG in defaults and gemm.SM90_ROPE_CONFIG in defaults
    assert tune.expand_candidates("sm90,128x192pp_c21") == tune.SM90_SPACE.split(",") + ["128x192pp_c21"]


def test_configs_and_roles():
    args = tune.parse_args([])
    assert args.config_list == [("esm2_t33_650M_UR50D", "fp16", 16384), ("esm2_t36_3B_UR50D", "bf16", 8192)]
    assert args.role_list == ["gelu", "out", "fc2", "qkv"] and args.candidate_list == list(tune.CANDIDATES)
    assert set(tune.ROLE_SHAPES) == {"gelu", "out", "fc2", "qkv", "out_bias", "fc2_bias"}


@pytest.mark.parametrize("argv,message", [
    (["--configs", "esm2_t33_650M_UR50D:fp16"], "expected MODEL:PRECISION:TOKENS"),
    (["--configs", "esm2_t33_650M_UR50D:fp16:0"], "expected MODEL:PRECISION:TOKENS"),
    (["--configs", "esm2_t99_UR50D:fp16:8192"], "expected MODEL:PRECISION:TOKENS"),
    (["--roles", "gelu,fc3"], "--roles ['fc3']"),
])
def test_bad_tune_epilogue_arguments_stop_before_any_gpu_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tune.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_qkv_outputs_map_to_fair_esm_order():
    """quack's QKV output (q/k rows interleaved per head) and cuBLAS's (rotated qk, v) pair both
    come back as [T, 3D] in fair-esm's order, which the fp32 reference uses."""
    t, heads, head_dim = 5, 4, 8
    d = heads * head_dim
    esm_order = torch.randn(t, 3 * d)
    interleaved = interleave_rotary_rows(esm_order.T, head_dim, 2 * d).T
    assert not torch.equal(interleaved, esm_order)
    assert torch.equal(tune.qkv_in_esm_order(interleaved, head_dim), esm_order)
    qk, v = esm_order[:, :2 * d].reshape(t, 2, heads, head_dim), esm_order[:, 2 * d:].reshape(t, heads, head_dim)
    assert torch.equal(tune.qkv_in_esm_order((qk, v), head_dim), esm_order)


def test_tune_epilogue_needs_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tune.main([]) == 2
    assert "tune_epilogue: needs a CUDA GPU" in capsys.readouterr().err


# ------------------------------------------------------------------ tune_norm


def test_norm_launch_candidates_fit_registers_and_cover_the_pins():
    rows, warps = [1, 2, 4, 8], [2, 4, 8, 16]
    assert len(tune_norm.launch_candidates(2048, rows, warps)) == 16  # 650M: every pair fits
    assert all(r < 8 for r, _ in tune_norm.launch_candidates(4096, rows, warps))  # 8 x 4096 > 16384 elements
    assert tune_norm.launch_candidates(512, [1], warps) == [(1, 2), (1, 4)]  # >= 4 elements per thread
    for block, pinned in LAUNCH_CONFIGS.items():
        assert pinned in tune_norm.launch_candidates(block, rows, warps), block


@pytest.mark.parametrize("argv,message", [
    (["--configs", "esm2_t33_650M_UR50D:fp16"], "expected MODEL:PRECISION:TOKENS"),
    (["--rows", "1,x"], "--rows '1,x'"),
    (["--warps", "0"], "--warps '0'"),
])
def test_bad_tune_norm_arguments_stop_before_any_gpu_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tune_norm.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_tune_norm_needs_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tune_norm.main([]) == 2
    assert "tune_norm: needs a CUDA GPU" in capsys.readouterr().err
