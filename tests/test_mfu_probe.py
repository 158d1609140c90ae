"""tools/mfu_probe.py and tools/tune_attention.py on the CPU: the kernel-time breakdown (kernel
names to families, and the sums), the FA4 tile items and the "fa4@TILE" backends they run, the
command lines (checked before any GPU work), and a --help smoke of each tool and of
tools/run_commits.sh's usage. The measurements themselves need a GPU."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import esm
import pytest
import torch

from esmflash.bench.workloads import TOKENS_PER_SET, length_class_records
from esmflash.kernels import ATTENTION
from esmflash.kernels.attention import parse_fa4_tile

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


probe = _load("mfu_probe")
tune_attention = _load("tune_attention")

# Kernel names in the shapes torch.profiler reports them on Hopper with torch 2.11 (the flash one
# as it was recorded on an H200).
NAMES = {
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, "
    "cutlass::half_t, Flash_kernel_traits<64, 128, 128, 4, cutlass::half_t> >, false, false, false, "
    "false, true, true, false, false>(pytorch_flash::Flash_fwd_params)": "attention",
    "fmha_cutlassF_f32_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<float, "
    "cutlass::arch::Sm80, true, 64, 64, 64, true, true>::Params)": "attention",
    "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off_"
    "kernel__5x_cublas": "gemm",
    "nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT": "gemm",
    "triton_tem_fused_addmm_gelu_0": "gemm",
    "triton_red_fused_add_native_layer_norm_1": "triton",
    "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::Half, float, false>"
    "(int, float, c10::Half const*, c10::Half const*, c10::Half const*, float*, float*, c10::Half*)": "layernorm",
    "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
    "direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::"
    "{lambda(c10::Half)#1}> >(int, at::native::gpu_kernel_impl_nocast<...>)": "copy",
    "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(at::"
    "TensorIteratorBase&, at::native::GeluType)::{lambda()#2}::operator()() const::{lambda()#2}::"
    "operator()() const::{lambda(c10::Half)#1}, std::array<char*, 2ul> >(int, ...)": "elementwise",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, "
    "float, float, float>, unsigned int, float, 4, 4> >(at::native::ReduceOp<...>)": "elementwise",
    "void at::native::index_elementwise_kernel_scatter_add": "elementwise",
    "Memset (Device)": "other",
}


@pytest.mark.parametrize("name,family", NAMES.items())
def test_kernel_family(name, family):
    assert probe.kernel_family(name) == family


def test_kernel_breakdown_sums_per_family_and_idle():
    # µs: kernel i lasts 100 (i + 1) and starts 50 after the previous one ends (a 50 µs gap each)
    kernels, start = [], 1000.0
    for i, name in enumerate(NAMES):
        kernels.append((name, start, 100.0 * (i + 1)))
        start += 100.0 * (i + 1) + 50.0
    out = probe.kernel_breakdown(kernels, wall_ms=30.0)
    # attention = first two kernels (100 + 200 µs), gemm = next three (300 + 400 + 500 µs)
    assert out["attention"] == pytest.approx(0.3)
    assert out["gemm"] == pytest.approx(1.2)
    assert out["total"] == pytest.approx(sum(100.0 * (i + 1) for i in range(len(NAMES))) / 1e3)
    assert out["idle"] == pytest.approx(30.0 - out["total"])
    assert out["gaps"] == pytest.approx(0.05 * (len(NAMES) - 1))
    assert out["outside"] == pytest.approx(30.0 - out["total"] - out["gaps"])
    assert probe.kernel_breakdown(kernels, wall_ms=1.0)["idle"] == 0.0  # overlapping kernels: no negative idle


# ------------------------------------------------------------------ mfu_probe: FA4 tiles, command line


def test_fa4_tile_items_run_the_attention_backend_or_its_fa4_variant():
    assert probe.attention_for_tile("engine", "auto") == "auto"
    assert probe.attention_for_tile("fa4", "fa4+torch_flash") == "fa4+torch_flash"  # FA4's own tile
    assert probe.attention_for_tile("128x96", "auto") == "fa4@128x96"
    backend = ATTENTION[probe.attention_for_tile("128x128:nors:noov", "auto")]
    assert backend.name == "fa4" and backend.tile == parse_fa4_tile("128x128:nors:noov") == {
        "tile_mn": (128, 128), "mma_pv_is_rs": False, "intra_wg_overlap": False}


@pytest.mark.parametrize("tile", ["128", "128x96:fast", "axb"])
def test_bad_fa4_tile_fails_with_the_expected_form(tile):
    with pytest.raises(ValueError, match="FA4 tile"):
        probe.attention_for_tile(tile, "auto")


def test_probe_defaults_and_lists():
    args = probe.parse_args([])
    assert args.model_precisions == {"esm2_t33_650M_UR50D": ["fp16", "bf16"], "esm2_t36_3B_UR50D": ["bf16"]}
    assert args.budget_list == [16384, 32768] and args.micro_batch_list is None
    assert args.attention_by_tile == {"engine": "auto"} and args.length_class == "mixed" and args.repeats == 7
    args = probe.parse_args(["--micro-batches", "0,8192", "--fa4-tiles", "engine,128x96", "--attention", "fa4",
                             "--repeats", "2"])
    assert args.micro_batch_list == [0, 8192] and args.repeats == 5  # at least 5 samples
    assert args.attention_by_tile == {"engine": "fa4", "128x96": "fa4@128x96"}


@pytest.mark.parametrize("argv,message", [
    (["--fa4-tiles", "engine,128x96:fast"], "FA4 tile '128x96:fast'"),
    (["--configs", "esm2_t33_650M_UR50D"], "expected MODEL:PRECISION"),
    (["--configs", "esm2_t33_650M_UR50D:fp8"], "expected MODEL:PRECISION"),
    (["--budgets", "16k"], "--budgets '16k'"),
    (["--micro-batches", "-1"], "--micro-batches '-1'"),
    (["--length-class", "huge"], "invalid choice: 'huge'"),
])
def test_bad_probe_arguments_stop_before_any_gpu_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        probe.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_probe_needs_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert probe.main(["--no-reference"]) == 2
    assert "mfu_probe: needs a CUDA GPU" in capsys.readouterr().err


def test_class_batch_packs_the_suite_records_into_one_batch():
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    batch = probe.class_batch(alphabet, "mixed", 4096, seed=3)
    records = length_class_records("mixed", 4096, 3)
    assert batch.num_sequences == len(records) and batch.num_tokens <= 4096
    assert sorted(batch.lengths) == sorted(len(s) + 2 for _, s in records)


# ------------------------------------------------------------------ tune_attention: candidates, classes


def test_tile_candidates_name_fa4_backends():
    cands = tune_attention.tile_candidates("default,128x96,128x128:nors")
    assert cands == {"default": ("fa4", None), "128x96": ("fa4@128x96", parse_fa4_tile("128x96")),
                     "128x128:nors": ("fa4@128x128:nors", parse_fa4_tile("128x128:nors"))}
    for backend, tile in cands.values():
        assert ATTENTION[backend].tile == tile
    assert set(tune_attention.tile_candidates(tune_attention.DEFAULT_TILES)) == set(
        tune_attention.DEFAULT_TILES.split(","))


def test_waste_counts_partial_tiles():
    assert tune_attention.waste([128], (128, 128)) == 1.0
    assert tune_attention.waste([192], None) == pytest.approx(192 * 256 / 192**2)  # FA4's own 192 x 128
    assert tune_attention.waste([100, 200], (128, 64)) == pytest.approx(
        (128 * 128 + 256 * 256) / (100**2 + 200**2))


def test_class_lengths_are_the_suite_records_or_equal_lengths():
    assert tune_attention.class_lengths("L100", 1050) == [100] * 10
    budget = TOKENS_PER_SET["esm2_t33_650M_UR50D"]
    assert tune_attention.class_lengths("mixed", budget) == [len(s) + 2 for _, s in
                                                              length_class_records("mixed", budget)]
    assert set(tune_attention.class_lengths("short", budget)) == {52}


@pytest.mark.parametrize("argv,message", [
    (["--tiles", "default,128x96:sm80"], "unknown flag(s) ['sm80']"),
    (["--classes", "short,L0"], "--classes 'L0'"),
    (["--models", "esm2_t48_15B_UR50D"], "--models 'esm2_t48_15B_UR50D'"),
    (["--precisions", "fp8"], "--precisions 'fp8'"),
])
def test_bad_tune_attention_arguments_stop_before_any_gpu_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tune_attention.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_tune_attention_needs_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tune_attention.main([]) == 2
    assert "tune_attention: needs a CUDA GPU" in capsys.readouterr().err


# ------------------------------------------------------------------ smoke: the tools as programs


@pytest.mark.parametrize("tool,option", [("mfu_probe", "--fa4-tiles"), ("tune_attention", "--tiles"),
                                         ("tune_epilogue", "--candidates"), ("tune_norm", "--warps")])
def test_tool_help_runs_from_the_installed_package(tool, option):
    run = subprocess.run([sys.executable, f"tools/{tool}.py", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage:") and option in run.stdout


def test_run_commits_without_commits_prints_its_usage():
    run = subprocess.run(["bash", "tools/run_commits.sh"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "usage:" in run.stderr and "[-b REGEX] COMMIT" in run.stderr
    script = (REPO / "tools" / "run_commits.sh").read_text()
    assert "sys.path" not in script and "benchmarks/config.py" in script  # the suite's table, from its file
