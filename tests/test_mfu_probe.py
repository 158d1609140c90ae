"""tools/mfu_probe.py's kernel-time breakdown: kernel names to families, and the sums (the
profiled forward itself needs a GPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mfu_probe", REPO / "tools" / "mfu_probe.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)

# Kernel names in the shapes torch.profiler reports them on Hopper with torch 2.11 (the flash one
# as benchmarks/NOTES.md records it from the H200).
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
