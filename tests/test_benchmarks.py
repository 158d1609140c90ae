"""The asv suite's own checks (CPU): the committed history's benchmarks keep their names, params
and versions; the selection regexes pick the intended combinations; the CPU tier of the metrics
and end-to-end job processes gives sane numbers; the HF baseline script computes what esmflash
computes when it has the same weights."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import base, config  # noqa: E402

# What benchmarks/common.py computed before the suite was split (commit 8d92873): the committed
# results continue only while these stay byte-identical.
VERSION = ("2;attention=gpu:fp32:sdpa,gpu:fp16:torch_flash,gpu:bf16:torch_flash,"
           "cpu:fp32:sdpa,cpu:fp16:sdpa,cpu:bf16:sdpa")
HOPPER_VERSION = VERSION + ";hopper=fa4+quack"
METRICS_VERSION = "2"
MODELS = ["esm2_t6_8M_UR50D", "esm2_t12_35M_UR50D", "esm2_t33_650M_UR50D", "esm2_t36_3B_UR50D"]
GPU_MODELS = MODELS[2:]
PRECISIONS = ["fp32", "fp16", "bf16"]
LENGTHS = ["short", "medium", "long", "xlong", "mixed"]
MLP = (["model", "precision", "length"], [MODELS, PRECISIONS, LENGTHS])
HOPPER = (["model", "precision", "length"], [GPU_MODELS, ["fp16", "bf16"], LENGTHS])
STOCK = (["model", "precision", "length"], [MODELS, ["fp32", "fp16"], LENGTHS])
OLD_BENCHMARKS = {
    "bench_attention.AttentionBackends.time_attention_kernel":
        (VERSION + ";calls=20", ["model", "precision", "backend"],
         [["esm2_t6_8M_UR50D", "esm2_t33_650M_UR50D"], PRECISIONS, ["fa4", "flash_attn", "torch_flash", "sdpa"]]),
    "bench_forward.ForwardHostMemory.peakmem_forward_packed": (VERSION, *MLP),
    "bench_forward.ForwardPacked.time_forward_packed": (VERSION, *MLP),
    "bench_forward.ForwardPackedHopper.time_forward_packed": (HOPPER_VERSION, *HOPPER),
    **{f"bench_metrics.ForwardMetrics.{m}": (VERSION + ";metrics=" + METRICS_VERSION, *MLP) for m in (
        "track_activation_bytes_per_token", "track_gpu_peak_memory", "track_max_rel_error_vs_fp32", "track_mfu",
        "track_speedup_over_fp32", "track_speedup_over_stock_fp32", "track_tokens_per_second")},
    **{f"bench_metrics.HopperMetrics.{m}": (HOPPER_VERSION + ";metrics=" + METRICS_VERSION, *HOPPER) for m in (
        "track_activation_bytes_per_token", "track_max_rel_error_vs_fp32", "track_mfu", "track_speedup_over_bundled",
        "track_speedup_over_stock_fp32", "track_tokens_per_second")},
    "bench_metrics.LargeBatchMemory.track_activation_bytes_per_token":
        (VERSION, ["model", "precision"], [MODELS, ["fp16", "bf16"]]),
    "bench_metrics.MatmulPeak.track_matmul_peak_tflops": (VERSION, [], []),
    "bench_metrics.StockBaseline.track_stock_tokens_per_second": (VERSION, *STOCK),
}
# sha256 of repr([length_class_records(c, t) for c in LENGTHS for t in (1024, 16384)]) at 8d92873.
RECORDS_SHA256 = "e78c3c840d7e406797ca9141fbebdaa5bb8a7733557adb0535a47ed98ddd4ece"
UNITS = {"tokens/s", "%", "x", "bytes", "s", "relative", "TFLOP/s", "MHz", "°C", "W", "0/1", "seconds"}

DISCOVER = r"""
import json, sys
from asv_runner.discovery import disc_benchmarks
out = {}
for b in disc_benchmarks("benchmarks"):
    out[b.name] = {"version": b.version, "param_names": b.param_names, "params": b.params, "type": b.type,
                   "unit": getattr(b, "unit", None), "pretty_name": b.pretty_name,
                   "skip": [[repr(v) for v in t] for t in b._skip_tuples]}
print(json.dumps(out))
"""


def discover(tier: str) -> dict:
    """asv_runner's discovery of benchmarks/ in a fresh process with ESMFLASH_BENCH_TIER=tier."""
    env = dict(os.environ, ESMFLASH_BENCH_TIER=tier, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", DISCOVER], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def combinations(found: dict) -> dict[str, str]:
    """{asv -b name "file.Class.method('a', 'b')": benchmark name} as asv matches -b regexes."""
    out = {}
    for name, info in found.items():
        for combo in (itertools.product(*info["params"]) if info["params"] else [()]):
            out[f"{name}({', '.join(combo)})" if info["params"] else name] = name
    return out


def selected(names, regexes: list[str]) -> set[str]:
    return {n for n in names if any(re.search(r, n) for r in regexes)}


@pytest.fixture(scope="module")
def gpu_suite() -> dict:
    return discover("gpu")


@pytest.fixture(scope="module")
def cpu_suite() -> dict:
    return discover("cpu")


def test_old_benchmarks_keep_names_params_and_versions(gpu_suite, cpu_suite):
    for suite in (gpu_suite, cpu_suite):
        for name, (version, param_names, params) in OLD_BENCHMARKS.items():
            assert name in suite, f"{name} is gone: its history would end"
            info = suite[name]
            assert info["version"] == version, name
            assert info["param_names"] == param_names, name
            assert info["params"] == [[repr(v) for v in axis] for axis in params], name
    assert config.VERSION == VERSION and config.HOPPER_VERSION == HOPPER_VERSION
    assert config.METRICS_VERSION == METRICS_VERSION


def test_every_benchmark_says_what_it_measures(gpu_suite):
    from benchmarks import bench_attention, bench_embed, bench_forward, bench_metrics

    for name, info in gpu_suite.items():
        assert info["pretty_name"], f"{name}: no pretty_name"
        if info["type"] == "track":
            assert info["unit"] in UNITS, f"{name}: unit {info['unit']!r}"
    for module in (bench_attention, bench_embed, bench_forward, bench_metrics):
        classes = [v for v in vars(module).values() if isinstance(v, type) and v.__module__ == module.__name__]
        assert classes and all(c.__doc__ for c in classes), module.__name__
    names = {n.rsplit(".", 1)[0] for n in gpu_suite}
    assert {n.split(".")[0] for n in names} == {"bench_attention", "bench_embed", "bench_forward", "bench_metrics"}
    assert "MFU" in gpu_suite["bench_metrics.ForwardMetrics.track_mfu_datasheet"]["pretty_name"]
    assert "datasheet" in gpu_suite["bench_metrics.ForwardMetrics.track_mfu_datasheet"]["pretty_name"]
    assert "measured" in gpu_suite["bench_metrics.ForwardMetrics.track_mfu"]["pretty_name"]


def expected_gpu_groups() -> list[set[str]]:
    """The combinations each GPU group should run, built without the regexes."""
    q = repr
    classes = ["short", "xlong", "mixed"]
    grid = lambda precisions, lengths=classes: [f"('{m}', '{p}', '{l}')" for m in GPU_MODELS for p in precisions
                                                for l in lengths]
    metrics = {f"bench_metrics.ForwardMetrics.track_tokens_per_second{c}" for c in grid(PRECISIONS)}
    metrics |= {f"bench_metrics.ForwardMetrics.{m}{c}" for c in grid(["fp16", "bf16"]) for m in (
        "track_mfu", "track_mfu_datasheet", "track_activation_bytes_per_token", "track_speedup_over_fp32",
        "track_speedup_over_stock_fp32", "track_speedup_over_hf_fp16", "track_max_rel_error_vs_fp32")}
    metrics |= {f"bench_metrics.HopperMetrics.{m}{c}" for c in grid(["fp16", "bf16"]) for m in (
        "track_tokens_per_second", "track_mfu", "track_mfu_datasheet", "track_activation_bytes_per_token",
        "track_speedup_over_stock_fp32", "track_speedup_over_bundled", "track_speedup_over_hf_fp16",
        "track_max_rel_error_vs_fp32")}
    metrics |= {f"bench_metrics.StockBaseline.track_stock_tokens_per_second{c}" for c in grid(["fp32", "fp16"])}
    metrics |= {f"bench_metrics.HFBaseline.track_hf_tokens_per_second{c}" for c in grid(["fp32", "fp16"])}
    metrics |= {f"bench_metrics.HFBaseline.track_hf_max_rel_error_vs_fp32{c}" for c in grid(["fp16"])}
    metrics |= {f"bench_metrics.LargeBatchMemory.track_activation_bytes_per_token('{m}', '{p}')"
                for m in GPU_MODELS for p in ("fp16", "bf16")}
    metrics |= {"bench_metrics.MatmulPeak.track_matmul_peak_tflops"}
    metrics |= {f"bench_metrics.RunConditions.{m}({q(moment)})" for moment in ("before", "after") for m in (
        "track_sm_clock_mhz", "track_temperature_c", "track_power_limit_w", "track_throttled")}
    embed = {f"bench_embed.EmbedFasta.{m}('{model}', 'fp16')" for model in GPU_MODELS for m in (
        "track_tokens_per_second", "track_seconds_to_first_batch", "track_peak_host_rss", "track_fraction_of_forward",
        "track_speedup_over_hf_wall", "track_hf_wall_tokens_per_second", "track_wall_seconds",
        "track_seconds_to_model", "track_seconds_compiling")}
    forward = {f"bench_forward.ForwardPacked.time_forward_packed{c}" for c in grid(["fp16", "bf16"], ["short", "mixed"])}
    forward |= {f"bench_forward.ForwardPackedHopper.time_forward_packed{c}" for c in grid(["fp16"], ["mixed"])}
    return [metrics, embed, forward]


def test_gpu_groups_select_the_intended_combinations(gpu_suite):
    names = combinations(gpu_suite)
    groups = config.SELECTION_GROUPS["gpu"]
    assert [r for g in groups for r in g] == config.TIER_SELECTION["gpu"]
    for regex in config.TIER_SELECTION["gpu"]:
        assert selected(names, [regex]), f"{regex!r} selects nothing"
    got = [selected(names, group) for group in groups]
    for i, (have, want) in enumerate(zip(got, expected_gpu_groups())):
        assert have == want, f"group {i}: extra {sorted(have - want)[:3]}, missing {sorted(want - have)[:3]}"
    assert len(got[0]) == 241 and len(got[1]) == 18 and len(got[2]) == 10
    assert_none_skipped(gpu_suite, names, set().union(*got), "gpu")
    gate = selected(names, [config.GATE_SELECTION["gpu"]])
    assert gate and gate <= got[2] and all(".ForwardPacked." in n for n in gate)
    assert selected(names, [config.FORWARD_SELECTION["gpu"]]) == gate


def assert_none_skipped(suite: dict, names: dict, chosen: set, tier: str) -> None:
    """Each selected combination costs a process: none may be one its benchmark skips."""
    for combo in chosen:
        params = re.findall(r"'[^']*'", combo[len(names[combo]):])
        assert params not in suite[names[combo]]["skip"], f"{combo} is selected but skipped on the {tier} tier"


def test_cpu_selection_is_every_measured_cpu_combination(cpu_suite):
    names = combinations(cpu_suite)
    chosen = selected(names, config.TIER_SELECTION["cpu"])
    assert chosen and all(("'esm2_t6_8M_UR50D'" in n or "'esm2_t12_35M_UR50D'" in n) and "'fp32'" in n for n in chosen)
    assert_none_skipped(cpu_suite, names, chosen, "cpu")
    runnable = {n for n, b in names.items() if cpu_suite[b]["params"] and "'fp32'" in n
                and ("'esm2_t6_8M_UR50D'" in n or "'esm2_t12_35M_UR50D'" in n)}
    runnable = {n for n in runnable if re.findall(r"'[^']*'", n[len(names[n]):]) not in cpu_suite[names[n]]["skip"]}
    assert chosen == runnable, sorted(runnable ^ chosen)[:5]
    assert len([n for n in chosen if n.startswith("bench_embed.")]) == 18
    assert selected(names, [config.GATE_SELECTION["cpu"]]) <= chosen


def test_workloads_are_the_suite_tables():
    from esmflash.bench import workloads

    assert list(workloads.LENGTH_CLASSES) == config.LENGTH_CLASSES
    assert workloads.TOKENS_PER_SET == config.TOKENS_PER_SET
    records = [workloads.length_class_records(c, t) for c in LENGTHS for t in (1024, 16384)]
    assert hashlib.sha256(repr(records).encode()).hexdigest() == RECORDS_SHA256
    fasta = workloads.mixed_records(50_000)
    lengths = [len(s) for _, s in fasta]
    assert sum(n + 2 for n in lengths) <= 50_000 and min(lengths) >= 30 and max(lengths) <= 1022
    assert 200 < float(np.median(lengths)) < 400 and fasta == workloads.mixed_records(50_000)


def test_cached_rows_are_na_or_fail_loudly():
    row = base.CachedRow()
    cache = {("a",): {"seconds": 2.0}, ("b",): {"na": "not installed"}, ("c",): {"error": "boom"}, ("d",): {"seconds": 1.0}}
    row.setup(cache, "a")
    assert row.ratio(cache, ("d",)) == 0.5
    with pytest.raises(NotImplementedError, match="not installed"):
        row.setup(cache, "b")
    with pytest.raises(NotImplementedError, match="not measured"):
        row.setup(cache, "zzz")
    with pytest.raises(RuntimeError, match="boom"):
        row.setup(cache, "c")


def test_run_conditions_parsing():
    from esmflash.bench import conditions

    rec = conditions.parse_nvidia_smi("NVIDIA H100 80GB HBM3, 1980, 1980, 41, 700.00, 123.45, 0x0000000000000004")
    assert rec["name"] == "NVIDIA H100 80GB HBM3" and rec["sm_clock_mhz"] == 1980 and rec["power_limit_w"] == 700
    assert rec["throttled"] == 1 and rec["throttle_reason_names"] == ["sw_power_cap"]
    assert conditions.throttled(0x1) == 0 and conditions.throttled(0x2) == 0 and conditions.throttled(0x3) == 0
    assert conditions.throttled(0x40 | 0x1) == 1
    with pytest.raises(RuntimeError, match="unreadable"):
        conditions.parse_nvidia_smi("NVIDIA H100, [N/A], 1980, 41, 700.00, 123.45, 0x0")
    with pytest.raises(RuntimeError, match="expected 7 fields"):
        conditions.parse_nvidia_smi("NVIDIA H100, 1980")


cpu_only = pytest.mark.skipif(config.TIER != "cpu", reason="exercises the CPU tier (ESMFLASH_BENCH_TIER=cpu)")


def finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@cpu_only
def test_metrics_process_on_the_cpu_tier(monkeypatch):
    """The metrics setup_cache on esm2_t6_8M_UR50D (two classes): engine, stock and HF rows, and
    the tracks that read them."""
    from benchmarks import bench_metrics, measure

    monkeypatch.setitem(config.MODELS_BY_TIER, "cpu", ["esm2_t6_8M_UR50D"])
    monkeypatch.setitem(config.METRIC_CLASSES, "cpu", ["short", "mixed"])
    cache = measure.measure_metrics()
    assert not [k for k, v in cache.items() if "error" in v], cache
    params = ("esm2_t6_8M_UR50D", "fp32", "mixed")
    for cls, methods in ((bench_metrics.ForwardMetrics, ["track_tokens_per_second", "track_speedup_over_stock_fp32"]),
                         (bench_metrics.StockBaseline, ["track_stock_tokens_per_second"]),
                         (bench_metrics.HFBaseline, ["track_hf_tokens_per_second"])):
        bench = cls()
        bench.setup(cache, *params)
        for method in methods:
            assert finite_positive(getattr(bench, method)(cache, *params)), (cls.__name__, method)
    hf = bench_metrics.HFBaseline()
    for length in ("short", "mixed"):
        hf.setup(cache, "esm2_t6_8M_UR50D", "fp32", length)
        assert 0 <= hf.track_hf_max_rel_error_vs_fp32(cache, "esm2_t6_8M_UR50D", "fp32", length) <= 1e-5
    with pytest.raises(NotImplementedError):
        bench_metrics.RunConditions().setup(cache, "before")


@cpu_only
def test_embed_job_on_the_cpu_tier(monkeypatch):
    """bench_embed's setup_cache logic on esm2_t6_8M_UR50D: CLI and HF script subprocesses, the
    repeated-batch forward and the output checks; every EmbedFasta track finite and > 0."""
    from benchmarks import bench_embed, embed_job

    monkeypatch.setitem(config.EMBED_MEASURED, "cpu", [("esm2_t6_8M_UR50D", "fp32")])
    monkeypatch.setitem(config.EMBED_TOKENS, "cpu", 6000)
    monkeypatch.setitem(config.EMBED_MAX_TOKENS, "cpu", 2048)
    cache = embed_job.measure_embed()
    row = cache[("esm2_t6_8M_UR50D", "fp32")]
    assert "error" not in row, row
    assert row["tokens"] == row["fasta_tokens"] and row["checked_sequences"] >= 2
    assert row["min_cosine_vs_forward"] > 0.9999 and row["hf_output_shape"][1] == 320
    bench = bench_embed.EmbedFasta()
    bench.setup(cache, "esm2_t6_8M_UR50D", "fp32")
    tracks = [m for m in dir(bench) if m.startswith("track_")]
    assert len(tracks) == 9
    for method in tracks:
        value = getattr(bench, method)(cache, "esm2_t6_8M_UR50D", "fp32")
        if method == "track_seconds_compiling":  # the CPU tier runs eager
            assert value == 0.0
            continue
        assert finite_positive(value), (method, value)
    with pytest.raises(NotImplementedError):
        bench.setup(cache, "esm2_t12_35M_UR50D", "fp32")


def test_embed_job_records_a_failing_subprocess(tmp_path):
    from benchmarks import embed_job

    with pytest.raises(RuntimeError, match="exited 3.*went wrong"):
        embed_job.run_timed([sys.executable, "-c", "import sys; sys.stderr.write('went wrong'); sys.exit(3)"],
                            "probe", tmp_path)


def _randomized_8m_state(seed: int = 0) -> tuple:
    """esm2_t6_8M_UR50D with every weight moved away from its init (a swapped weight shows)."""
    from esmflash import load_esm2_model

    model, alphabet = load_esm2_model("esm2_t6_8M_UR50D", precision="fp32", device="cpu", random_weights=True,
                                      seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    model.prepare_packed()
    return model, alphabet


def test_hf_script_writes_esmflash_means_for_the_same_weights(tmp_path):
    from esmflash import embed
    from esmflash.bench import hf_embed
    from esmflash.bench.workloads import mixed_records, write_fasta

    from argparse import Namespace

    from esmflash.bench.checkpoints import write_hf_folder

    model, _ = _randomized_8m_state()
    cfg = Namespace(encoder_layers=6, encoder_embed_dim=320, encoder_attention_heads=20, token_dropout=True)
    write_hf_folder(cfg, model.state_dict(), tmp_path / "hf")
    records = mixed_records(3000, seed=7) + [("tiny", "MK"), ("odd", "MKXBUZO")]
    write_fasta(tmp_path / "in.fasta", records)
    cmd = [sys.executable, "-P", hf_embed.__file__, str(tmp_path / "in.fasta"), str(tmp_path / "out.npz"),
           "--model", "esm2_t6_8M_UR50D", "--precision", "fp32", "--device", "cpu", "--max-tokens", "1024",
           "--checkpoint", str(tmp_path / "hf")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / "out.npz") as data:
        ids, means = list(data["ids"]), data["mean"]
    assert ids == [rid for rid, _ in records] and means.dtype == np.float32
    ours = embed(model, records, max_tokens=1024)
    theirs = torch.from_numpy(means).double()
    assert ours.ids == ids
    mine = ours.mean[model.num_layers].double()
    assert mine.shape == theirs.shape
    assert (mine - theirs).abs().max() <= 1e-5 * mine.abs().max()


def test_hf_script_matches_the_hub_config_and_vocabulary():
    import esm
    from esmflash.bench import hf_embed
    from esmflash.model.hf_weights import hf_config_kwargs

    assert hf_embed.VOCAB == esm.data.Alphabet.from_architecture("ESM-1b").all_toks
    for name, (layers, dim, heads) in hf_embed.ARCH.items():
        ours = hf_embed.esm_config(name).to_dict()
        for key, value in hf_config_kwargs(layers, dim, heads).items():
            if key not in ("architectures", "use_cache", "initializer_range", "esmfold_config", "vocab_list"):
                assert ours[key] == value, (name, key)


def test_hf_baseline_has_the_weights_of_the_packed_model():
    """esmflash.bench.hf: EsmModel built from a PackedESM2's state dict, padded batches gathered
    into packed order, equals the packed pass (fp32, CPU)."""
    from esmflash import pack_sequences
    from esmflash.bench.accuracy import relative_errors
    from esmflash.bench.hf import hf_batches, hf_forward, hf_model, packed_layout
    from esmflash.bench.workloads import mixed_records

    model, alphabet = _randomized_8m_state(seed=3)
    records = mixed_records(2500, seed=5)
    packed = pack_sequences(records, alphabet, 1024)
    with torch.no_grad():
        ref = torch.cat([model.forward_packed(b, repr_layers=[6])["representations"][6] for b in packed])
    hf = hf_model(model.state_dict(), 6, 320, 20, "cpu", torch.float32)
    batches = hf_batches(records, alphabet, 1024)
    assert all(b.input_ids.numel() <= 1024 for b in batches)
    assert sum(b.num_tokens for b in batches) == ref.shape[0]
    out = packed_layout(hf_forward(hf, batches), batches, packed)
    # fp32 rounding of two attention paths (padded + mask vs one sequence at a time) over six
    # layers of heavily perturbed weights: ~1e-5 of the largest activation; a wrong weight: >1e-3.
    assert relative_errors(out, ref)[0] <= 5e-5
    wrong = hf_model({k: (v.flip(0) if k == "layers.0.fc1.weight" else v) for k, v in model.state_dict().items()},
                     6, 320, 20, "cpu", torch.float32)
    assert relative_errors(packed_layout(hf_forward(wrong, batches), batches, packed), ref)[0] > 1e-3


def test_benchmark_checkpoints_hold_the_seeded_weights_in_both_layouts(tmp_path):
    """esmflash.bench.checkpoints: the fair-esm file (stock fair-esm's loader reads it, contact
    regression beside it) and the HF folder (transformers reads it) hold the seeded random weights."""
    import esm
    from transformers import EsmModel

    from esmflash import embed, load_esm2_model
    from esmflash.bench.checkpoints import write_checkpoints

    pt, hf = write_checkpoints("esm2_t6_8M_UR50D", tmp_path, "cpu", seed=3)
    seeded, alphabet = load_esm2_model("esm2_t6_8M_UR50D", precision="fp32", device="cpu", random_weights=True, seed=3)
    regression = torch.load(tmp_path / "esm2_t6_8M_UR50D-contact-regression.pt", weights_only=False)
    stock, _ = esm.pretrained.load_model_and_alphabet_core(pt.stem, torch.load(pt, weights_only=False), regression)
    for other in (stock, load_esm2_model(pt, precision="fp32", device="cpu")[0],
                  load_esm2_model(hf, precision="fp32", device="cpu")[0]):
        theirs = other.state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in seeded.state_dict().items())
    seq = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"
    tokens = torch.tensor([[alphabet.cls_idx, *alphabet.encode(seq), alphabet.eos_idx]])
    with torch.no_grad():
        hidden = EsmModel.from_pretrained(str(hf), attn_implementation="sdpa", add_pooling_layer=False).eval()(
            input_ids=tokens, attention_mask=torch.ones_like(tokens)).last_hidden_state[0, 1:-1].mean(0)
    ours = embed(seeded, [("a", seq)]).mean[6][0]
    assert (hidden - ours).abs().max() <= 1e-5 * ours.abs().max()
