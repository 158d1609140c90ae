"""The residual add + LayerNorm step (esmflash.kernels.norm) on CPU: the reference math against
fair-esm's ops, the layer functions with norm "torch" unchanged, backend selection, and the
Triton kernel itself run by Triton's interpreter (where Triton is installed) against the
reference. The kernel on a GPU: tests/test_gpu.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_engine import _load

from esmflash import BackendUnavailableError
from esmflash.kernels import GEMM, NORM
from esmflash.kernels.norm import add_layer_norm_reference, launch_config
from esmflash.kernels.registry import has_module
from esmflash.model.layers import boundary, first, last
from esmflash.model.runner import layer_weights

SRC = Path(__file__).resolve().parents[1] / "src"
# inductor's own compile step calls a deprecated torch.jit API
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.no_grad():
        yield


def _operands(t: int, d: int, dtype: torch.dtype, seed: int = 0):
    """x (a residual stream well away from zero mean), a, m [T, D]; LayerNorm weight, bias [D]."""
    g = torch.Generator().manual_seed(seed)
    x = (4 * torch.randn(t, d, generator=g)).to(dtype)
    a, m = (torch.randn(t, d, generator=g).to(dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(d, generator=g)).to(dtype)
    return x, a, m, weight, torch.randn(d, generator=g).to(dtype)


def test_reference_rounds_the_residual_once_per_layer():
    x, a, m, weight, ln_bias = _operands(37, 320, torch.float16)
    exact = x.double() + a.double() + m.double()  # fp32 holds these fp16 sums exactly
    s, h = add_layer_norm_reference(x, a, m, weight, ln_bias, 1e-5)
    assert s.dtype == h.dtype == torch.float16
    assert torch.equal(s, exact.to(torch.float16))  # one rounding of the three-way sum
    assert torch.equal(h, F.layer_norm(exact.float(), (320,), weight.float(), ln_bias.float(), 1e-5).half())
    # the eager path's order: x + a rounded, then + m rounded; it differs
    assert not torch.equal(s, (x + a) + m)
    none, h1 = add_layer_norm_reference(x, a, None, weight, ln_bias, 1e-5)
    assert none is None
    assert torch.equal(h1, F.layer_norm(x.float() + a.float(), (320,), weight.float(), ln_bias.float(), 1e-5).half())


def test_layer_boundary_with_torch_norm_equals_output_then_inputs():
    """layers.boundary (norm "torch") = layers.last, then layers.first of the next layer: the
    restructured boundary computes what the two halves do."""
    model = _load("esm2_t6_8M_UR50D")[0]
    t, d = 29, model.embed_dim
    g = torch.Generator().manual_seed(1)
    x, o = torch.randn(t, d, generator=g), torch.randn(t, model.attention_heads, model.head_dim, generator=g)
    inputs, outputs = layer_weights(model, model.qkv_weights())
    gemm, norm = GEMM["cublas"], NORM["torch"]
    rotary = gemm.rotary_operands(torch.arange(t), model.head_dim, None)
    x1, q, k, v = boundary(x, o, outputs[0], inputs[1], model.head_dim, rotary, gemm=gemm, norm=norm, in_place=True)
    x2 = last(x, o, outputs[0], gemm=gemm, norm=norm)
    q2, k2, v2 = first(x2, inputs[1], model.head_dim, rotary, gemm=gemm, in_place=True)
    for a, b in ((x1, x2), (q, q2), (k, k2), (v, v2)):
        assert torch.equal(a, b)


def test_norm_backend_selection_on_cpu():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert NORM.resolve("auto", "cpu", dtype) == "torch"
    with pytest.raises(BackendUnavailableError, match="norm backend 'triton' unavailable: .*CUDA"):
        NORM.resolve("triton", "cpu", torch.float16)
    with pytest.raises(BackendUnavailableError, match="unknown norm backend 'apex'"):
        NORM.resolve("apex", "cpu", torch.float16)
    # on CUDA "auto" is the Triton kernels for half precisions (if Triton is installed), fp32 stays torch
    half_on_cuda = "triton" if has_module("triton") else "torch"
    assert NORM.resolve("auto", "cuda", torch.float16) == half_on_cuda
    assert NORM.resolve("auto", "cuda", torch.bfloat16) == half_on_cuda
    assert NORM.resolve("auto", "cuda", torch.float32) == "torch"
    model = _load("esm2_t6_8M_UR50D", engine={"norm": "auto"})[0]
    assert model.norm_backend == "torch"
    with pytest.raises(BackendUnavailableError):
        model.configure(norm="triton")
    assert model.norm_backend == "torch"


def test_launch_configs_fit_registers():
    for d in (320, 480, 640, 1280, 2560, 5120, 100, 7000):
        block, rows, warps = launch_config(d)
        assert block >= d and block & (block - 1) == 0 and block < 2 * d + 2
        assert rows * block <= 8192 or rows == 1
        assert 1 <= warps <= 16 and warps * 32 <= rows * block


INTERPRETED = textwrap.dedent("""
    import sys, torch
    from esmflash.kernels.norm import add_layer_norm_reference, add_layer_norm_triton
    from test_layernorm import _operands
    # (T, D, dtype): pinned widths and odd ones; T not a multiple of the rows per program
    for t, d, dtype in [(7, 1280, torch.float16), (5, 320, torch.float16), (3, 2560, torch.float32),
                        (9, 480, torch.float16), (13, 100, torch.float16), (4, 640, torch.float32)]:
        x, a, m, w, b = _operands(t, d, dtype, seed=t)
        for third in (m, None):
            s, h = add_layer_norm_triton(x, a, third, w, b, 1e-5)
            rs, rh = add_layer_norm_reference(x, a, third, w, b, 1e-5)
            assert (s is None) == (third is None)
            assert s is None or torch.equal(s, rs), (t, d, dtype)
            # half: one rounding apart at most; fp32: a few ulps (another summation order than torch's)
            ulps = 1 if dtype != torch.float32 else 16
            tol = ulps * torch.finfo(dtype).eps * rh.float().abs().clamp(min=1.0)
            assert ((h.float() - rh.float()).abs() <= tol).all(), (t, d, dtype, (h.float() - rh.float()).abs().max())
    s, h = add_layer_norm_triton(*_operands(0, 64, torch.float16), 1e-5)
    assert s.shape == h.shape == (0, 64)
    print("interpreted kernel ok")
""")


@pytest.mark.skipif(not has_module("triton"), reason="Triton is not installed")
def test_triton_kernel_in_the_interpreter():
    """The kernel's indexing, masks and math, run by Triton's interpreter on CPU tensors (bf16 is
    left to the GPU test: the interpreter truncates where the GPU rounds to nearest)."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "interpreted kernel ok" in done.stdout


def test_triton_norm_layer_path_on_cpu_and_past_the_recompile_limit():
    """The "triton" norm path of the layer functions (on CPU its custom ops run the reference
    math) gives the "torch" path's outputs in fp32, eager and compiled; and compiled variants
    (dtype x norm backend, all cache entries of the same code objects) run even when dynamo's
    recompile limit outside is 1 (layers.compile_limit)."""
    from esmflash import cast_model, pack_sequences
    from test_engine import acceptance_records

    model = _load("esm2_t6_8M_UR50D", engine={"compile": True})[0]
    batch = pack_sequences(acceptance_records(), model.alphabet, 2048)[0]
    outs = {}
    with torch._dynamo.config.patch(recompile_limit=1):
        for precision in ("fp32", "bf16"):
            m = model if precision == "fp32" else cast_model(model, precision)
            for impl in ("compiled", "eager"):
                m.configure(compile=impl == "compiled")
                for norm in ("torch", "triton"):
                    # "triton" needs CUDA through configure (resolve refuses it here); its ops run on
                    # the CPU, so the resolved engine is edited past resolve for this test
                    m.engine = m.engine.replace(norm=norm)
                    outs[precision, impl, norm] = m.forward_packed(batch, repr_layers=[6])["representations"][6]
    model.configure(compile=True)
    assert model.norm_backend == "torch"
    for impl in ("compiled", "eager"):
        torch.testing.assert_close(outs["fp32", impl, "triton"], outs["fp32", impl, "torch"], rtol=1e-5, atol=1e-5)
    # bf16: the two paths round the residual alike (once per layer) when compiled
    ref = outs["fp32", "compiled", "torch"]
    for norm in ("torch", "triton"):
        err = (outs["bf16", "compiled", norm].float() - ref).abs().max() / ref.abs().max()
        assert err < 0.05, (norm, err)
