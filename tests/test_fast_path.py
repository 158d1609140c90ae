"""The fast forward path on CPU in fp32: fused QKV storage (no copies, nothing stale, state_dict
unchanged), the fused rotary against the original per-tensor formula, and the torch.compile'd
layers against stock fair-esm, with one compiled graph per half for every layer and batch size."""

from __future__ import annotations

import copy
import pickle
import random

import pytest
import torch
from esm.model.esm2 import ESM2
from test_engine import (
    _load,
    acceptance_records,
    assert_close,
    packed_forward,
    random_protein,
    stock_reference,
)

import torch.nn.functional as F

from esmflash import BackendUnavailableError, cast_model, pack_sequences, relative_errors
from esmflash.kernels import GEMM, NORM
from esmflash.kernels.rotary import (
    interleave_rotary_rows,
    rotary_half_tables,
    rotary_inv_freq,
    rotate_qk,
    rotate_qk_,
)
from esmflash.model.layers import COMPILE_OPTIONS, compiled_layer_functions, eager_layer_functions, first
from esmflash.model.runner import layer_weights

# inductor's own compile step calls a deprecated torch.jit API
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def model8():
    return _load("esm2_t6_8M_UR50D")[0]


def _rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The original forward_packed rotary: x [T, H, Dh], full tables [T, Dh], fp32 math."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


def _qkv_storages(model) -> list[tuple[int, int]]:
    """(weight storage pointer, bias storage pointer) of q, k, v per layer; asserts they share."""
    out = []
    for layer in model.layers:
        a = layer.self_attn
        ws = {p.weight.untyped_storage().data_ptr() for p in (a.q_proj, a.k_proj, a.v_proj)}
        bs = {p.bias.untyped_storage().data_ptr() for p in (a.q_proj, a.k_proj, a.v_proj)}
        assert len(ws) == 1 and len(bs) == 1
        out.append((ws.pop(), bs.pop()))
    return out


def _assert_fused(model) -> None:
    """q/k/v parameters are consecutive blocks of the fused tensors forward_packed uses."""
    assert not GEMM[model.gemm_backend].interleaved  # cuBLAS (the CPU's) reads the fused tensors
    fused = model.qkv_weights()
    for layer, (w, b) in zip(model.layers, fused):
        a = layer.self_attn
        d = a.q_proj.weight.shape[0]
        assert w.shape == (3 * d, d) and b.shape == (3 * d,)
        assert w.dtype == b.dtype == model.dtype
        assert torch.equal(w, torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        assert torch.equal(b, torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        assert a.q_proj.weight.data_ptr() == w.data_ptr() and a.v_proj.bias.data_ptr() == b[2 * d :].data_ptr()
    _qkv_storages(model)


def _records(seed: int, lengths) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(f"s{i}", random_protein(rng, n, 0.05)) for i, n in enumerate(lengths)]


# ----------------------------------------------------------------------------- rotary


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rotate_qk_matches_original_formula(dtype):
    g = torch.Generator().manual_seed(0)
    t, h, dh = 37, 4, 16
    positions = torch.cat([torch.arange(20), torch.arange(17)])
    cos_h, sin_h = rotary_half_tables(positions, dh)
    cos, sin = torch.cat((cos_h, cos_h), -1), torch.cat((sin_h, sin_h), -1)
    qkv = (torch.randn(t, 3, h, dh, generator=g) * 3).to(dtype)
    ref_q, ref_k = _rotate_reference(qkv[:, 0], cos, sin), _rotate_reference(qkv[:, 1], cos, sin)
    pure = rotate_qk(qkv[:, :2], cos_h, sin_h)
    in_place = qkv.clone()
    rotate_qk_(in_place[:, :2], cos_h, sin_h)
    assert torch.equal(in_place[:, 2], qkv[:, 2])  # v untouched
    for out in (pure, in_place[:, :2]):
        assert out.dtype == dtype
        for got, ref in ((out[:, 0], ref_q), (out[:, 1], ref_k)):
            if dtype == torch.float32:
                assert relative_errors(got, ref)[0] <= 1e-6
            else:  # same fp32 math, one rounding: at most one unit in the last place apart
                ulp = torch.finfo(dtype).eps * ref.float().abs().clamp_min(torch.finfo(dtype).tiny)
                assert ((got.float() - ref.float()).abs() <= ulp).all()


def test_rotary_tables_unchanged(model8):
    """The half tables the model runs with (its GEMM backend's rotary operands), taken twice, are
    the original full tables, equal to the original formula bit for bit."""
    positions = torch.arange(1024)
    dh = model8.embed_dim // model8.attention_heads
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh))
    assert torch.equal(rotary_inv_freq(dh), inv_freq)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    table = model8.qkv.rotary_table(model8.gemm_backend, dh, model8.embed_dim, model8.device)
    cos_h, sin_h = GEMM[model8.gemm_backend].rotary_operands(positions, dh, table)
    cos, sin = torch.cat((cos_h, cos_h), dim=-1), torch.cat((sin_h, sin_h), dim=-1)
    assert cos.dtype == sin.dtype == torch.float32
    assert torch.equal(cos, angles.cos()) and torch.equal(sin, angles.sin())


def test_eager_and_pure_attention_inputs_agree(model8):
    """layers.first with rotary in place (the eager path) and out of place (the compiled form)."""
    inputs, _ = layer_weights(model8, model8.qkv_weights())
    x = torch.randn(50, model8.embed_dim, generator=torch.Generator().manual_seed(1))
    args = (x, inputs[1], model8.head_dim, rotary_half_tables(torch.arange(50), model8.head_dim))
    cublas = GEMM["cublas"]
    for a, r in zip(first(*args, gemm=cublas, in_place=True), first(*args, gemm=cublas, in_place=False)):
        assert a.shape == (50, model8.attention_heads, model8.embed_dim // model8.attention_heads)
        assert a.stride(-1) == 1
        assert relative_errors(a, r)[0] <= 1e-6


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[..., Dh] in the pairs order [0, Dh/2, 1, Dh/2+1, ...] -> fair-esm's halves order."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


def test_interleaved_qkv_rows_give_esm_rotary_and_attention(model8):
    """The quack backend's layout (esmflash.kernels.gemm, GEMM["quack"].interleaved): q/k rows
    interleaved per head, rotary on adjacent pairs (the epilogue's math, here in fp32 torch) =
    ESM-2's rotate-half rotary on fair-esm's layout, element for element after de-interleaving;
    attention scores and outputs are the same without de-interleaving; v is not moved. The
    QKVStore's copies for quack are exactly these rows."""
    layer = model8.layers[2]
    ln = layer.self_attn_layer_norm
    w, b = model8.qkv_weights()[2]
    dh, d, heads = model8.head_dim, model8.embed_dim, model8.attention_heads
    assert GEMM["quack"].interleaved and not GEMM["cublas"].interleaved
    w_il, b_il = interleave_rotary_rows(w, dh, 2 * d), interleave_rotary_rows(b, dh, 2 * d)
    copy_w, copy_b = cast_model(model8, "fp32").qkv.weights(model8.layers, "quack", dh)[2]
    assert torch.equal(copy_w, w_il) and torch.equal(copy_b, b_il)
    assert w_il.is_contiguous() and torch.equal(w_il[2 * d :], w[2 * d :]) and torch.equal(b_il[2 * d :], b[2 * d :])
    assert torch.equal(_deinterleave(w_il[: 2 * d].T.reshape(d, 2 * heads, dh)).reshape(d, 2 * d).T, w[: 2 * d])
    positions = torch.cat([torch.arange(30), torch.arange(21)])
    x = torch.randn(len(positions), d, generator=torch.Generator().manual_seed(3))
    inputs, _ = layer_weights(model8, model8.qkv_weights())
    q, k, v = first(x, inputs[2], dh, rotary_half_tables(positions, dh), gemm=GEMM["cublas"])
    h = F.layer_norm(x, (d,), ln.weight, ln.bias, ln.eps)
    y = F.linear(h, w_il, b_il).view(len(positions), 3, heads, dh)
    angles = positions.float()[:, None] * rotary_inv_freq(dh)[None, :]  # [T, Dh/2]: pair j's angle
    c, s = angles.cos()[:, None, None, :], angles.sin()[:, None, None, :]
    x1, x2 = y[:, :2, :, 0::2], y[:, :2, :, 1::2]
    rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)  # pairs stay adjacent
    q_il, k_il = rotated[:, 0], rotated[:, 1]
    for got, ref in ((_deinterleave(q_il), q), (_deinterleave(k_il), k), (y[:, 2], v)):
        assert relative_errors(got, ref)[0] <= 1e-5
    cu = torch.tensor([0, 30, 51])
    for name, ours in (("esm", (q, k, v)), ("interleaved", (q_il, k_il, y[:, 2]))):
        out = torch.cat([F.scaled_dot_product_attention(*(t[i:j].transpose(0, 1) for t in ours)).transpose(0, 1)
                         for i, j in zip(cu[:-1], cu[1:])])
        if name == "esm":
            ref_out = out
    assert relative_errors(out, ref_out)[0] <= 1e-5


def test_interleave_rotary_rows_rejects_partial_heads():
    with pytest.raises(ValueError, match="whole heads"):
        interleave_rotary_rows(torch.zeros(96, 32), 32, 48)


# ----------------------------------------------------------------------------- fused QKV storage


def test_fused_qkv_shares_memory_and_keeps_state_dict(model8):
    _assert_fused(model8)
    stock = ESM2(num_layers=6, embed_dim=320, attention_heads=20)
    assert list(model8.state_dict()) == list(stock.state_dict())
    assert sum(p.numel() for p in model8.parameters()) == sum(p.numel() for p in stock.parameters())
    assert not any("qkv" in name for name, _ in model8.named_buffers())
    # no duplicate memory: the parameters' storages hold exactly the parameters' bytes
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model8.parameters()}
    assert sum(storages.values()) == sum(p.numel() * p.element_size() for p in model8.parameters())
    before = _qkv_storages(model8)
    model8.prepare_packed()  # idempotent: no copy when already fused
    model8.to(torch.float32)
    assert _qkv_storages(model8) == before


def test_in_place_weight_edit_reaches_packed_forward(model8):
    edited = cast_model(model8, "fp32")
    records = _records(3, [1, 40, 120])
    batches = pack_sequences(records, edited.alphabet, 1024)
    before = packed_forward(edited, batches, [6])
    edited.layers[2].self_attn.k_proj.weight.mul_(1.5)
    edited.layers[4].self_attn.v_proj.bias.add_(0.25)
    _assert_fused(edited)
    out = packed_forward(edited, batches, [6])
    assert_close(out, stock_reference(edited, records, [6]), [6, "logits"])
    assert relative_errors(out["s1"][6], before["s1"][6])[0] > 1e-3  # the edit changed the result


def test_checkpoint_round_trip_and_load_state_dict(model8, tmp_path):
    path = tmp_path / "state.pt"
    torch.save(model8.state_dict(), path)
    fresh, _ = _load("esm2_t6_8M_UR50D", seed=5)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert set(loaded) == set(model8.state_dict())
    fresh.load_state_dict(loaded)
    _assert_fused(fresh)
    for k, v in model8.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    records = _records(4, [2, 60, 200])
    batches = pack_sequences(records, model8.alphabet, 512)
    assert_close(packed_forward(fresh, batches, [6]), packed_forward(model8, batches, [6]), [6, "logits"], tol=0.0)
    # assign=True swaps in new parameter tensors: forward_packed notices and fuses them again
    other, _ = _load("esm2_t6_8M_UR50D", seed=6)
    other.load_state_dict({k: v.clone() for k, v in loaded.items()}, assign=True)
    assert_close(packed_forward(other, batches, [6]), stock_reference(other, records, [6]), [6, "logits"])
    _assert_fused(other)


def test_cast_copies_pickles_and_replaced_parameters_are_refused(model8):
    half = cast_model(model8, "bf16")
    _assert_fused(half)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half.qkv_weights()[0][0], model8.qkv_weights()[0][0].to(torch.bfloat16))
    assert {s for pair in _qkv_storages(half) for s in pair}.isdisjoint(
        {s for pair in _qkv_storages(model8) for s in pair}
    )
    _assert_fused(model8)  # the source model keeps its own fused weights
    double = cast_model(model8, "fp32").to(torch.float64)
    _assert_fused(double)
    assert double.dtype == torch.float64
    # deepcopy and pickle do not carry the fused views or quack's interleaved copies (which would
    # duplicate memory): the copy starts with an empty QKVStore and lays q/k/v out on first use
    with_copies = cast_model(model8, "fp32")
    pickled_without = len(pickle.dumps(with_copies))
    interleaved = with_copies.qkv.weights(with_copies.layers, "quack", with_copies.head_dim)  # +25% of q/k/v
    extra = sum(t.numel() * t.element_size() for pair in interleaved for t in pair)
    assert abs(len(pickle.dumps(with_copies)) - pickled_without) < extra / 100
    for clone in (copy.deepcopy(model8), pickle.loads(pickle.dumps(model8)), copy.deepcopy(with_copies)):
        assert clone.qkv is not model8.qkv and clone.qkv is not with_copies.qkv
        assert clone.qkv.version == 0  # nothing derived was carried over
        _assert_fused(clone)
        assert _qkv_storages(clone) != _qkv_storages(model8)
    # a replaced parameter (or a submodule cast on its own) is re-fused by the next forward
    replaced = cast_model(model8, "fp32")
    new_q = torch.nn.Parameter(replaced.layers[0].self_attn.q_proj.weight.detach() * 2, requires_grad=False)
    replaced.layers[0].self_attn.q_proj.weight = new_q
    replaced.layers[1].self_attn.k_proj.double().float()  # a submodule cast on its own
    _assert_fused(replaced)
    assert replaced.layers[0].self_attn.q_proj.weight is new_q  # re-pointed, not replaced
    assert torch.equal(replaced.qkv_weights()[0][0][:320], new_q * 1)


def test_gradients_reach_qkv_parameters(model8):
    """With autograd recording (training), forward_packed uses concatenated copies and the
    out-of-place rotary, so q/k/v parameters receive gradients."""
    trainable = cast_model(model8, "fp32").requires_grad_(True)
    batch = pack_sequences(_records(5, [10, 30]), trainable.alphabet, 128)[0]
    with torch.enable_grad():
        rep = trainable.forward_packed(batch, repr_layers=[6])["representations"][6]
        rep.square().mean().backward()
    for layer in trainable.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            assert proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()
            assert proj.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- compiled path


def test_forward_impl_selection(model8):
    assert model8.forward_impl == "eager" and model8.engine.compile_mode is None
    m, _ = _load("esm2_t6_8M_UR50D")  # compile=None: compiled on CUDA, eager on this CPU
    assert m.forward_impl == "eager" and m.engine.compile is False
    m.configure(compile=None)
    assert m.forward_impl == "eager"
    m.configure(compile=True)
    assert m.forward_impl == "compiled" and m.engine.compile is True
    m, _ = _load("esm2_t6_8M_UR50D", engine={"compile": True})
    assert m.forward_impl == "compiled"
    assert cast_model(m, "fp32").forward_impl == "compiled"  # the copy keeps the model's request
    assert cast_model(m, "fp32", {"compile": False}).forward_impl == "eager"
    m.configure(compile=False)
    assert m.forward_impl == "eager" and m.engine.compile_mode is None
    m.configure(compile=True, compile_mode="max-autotune")
    assert m.forward_impl == "compiled" and m.engine.compile_mode == "max-autotune"
    m.configure(compile=False)
    assert m.engine.compile_mode is None  # a mode only where compiled
    # the engine is changed through configure only: the views of it are read-only
    for name, value in (("forward_impl", "bogus"), ("attention_backend", "fa4"), ("gemm_backend", "quack"),
                        ("norm_backend", "triton"), ("cuda_graphs", True), ("micro_batch_tokens", 1)):
        with pytest.raises(AttributeError):
            setattr(m, name, value)
    assert m.forward_impl == "eager" and m.attention_backend == "sdpa" and m.micro_batch_tokens == 16384


@pytest.fixture(scope="module")
def compiled8(model8):
    return cast_model(model8, "fp32", {"attention": "sdpa", "compile": True})


def test_compiled_matches_stock_and_eager(compiled8, model8):
    """Acceptance batch (lengths 1..1022, masks) plus two more batch sizes: stock-equal to 1e-5,
    and after the first forward no batch size compiles a new graph."""
    from torch._dynamo.utils import counters

    assert compiled8.forward_impl == "compiled"
    records = acceptance_records()
    layers = [0, 3, 6]
    batches = pack_sequences(records, compiled8.alphabet, max_tokens=4096)
    out = packed_forward(compiled8, batches, layers)
    assert_close(out, stock_reference(model8, records, layers), layers + ["logits"], what="compiled")
    assert_close(out, packed_forward(model8, batches, layers), layers + ["logits"], what="compiled vs eager")
    graphs = counters["stats"]["unique_graphs"]
    for seed, lengths, budget in ((1, [3, 77, 250, 31], 400), (2, [500, 12, 140, 60, 9], 2048)):
        recs = _records(seed, lengths)
        bs = pack_sequences(recs, compiled8.alphabet, budget)
        assert_close(packed_forward(compiled8, bs, [6]), stock_reference(model8, recs, [6]), [6, "logits"])
    assert counters["stats"]["unique_graphs"] == graphs, "a new batch size recompiled"
    # weights are graph inputs: an in-place edit is used without recompiling
    edited = cast_model(compiled8, "fp32")
    edited.layers[1].fc1.weight.mul_(0.5)
    edited.layers[3].self_attn.q_proj.weight.mul_(2.0)
    recs = _records(7, [20, 90])
    assert_close(
        packed_forward(edited, pack_sequences(recs, edited.alphabet, 256), [6]),
        stock_reference(edited, recs, [6]),
        [6, "logits"],
    )
    assert counters["stats"]["unique_graphs"] == graphs


def test_interleaved_copies_follow_weight_edits_in_place(model8):
    """QKVStore's quack copies: an in-place edit of a q/k/v parameter refreshes them in place (the
    same addresses, so captured CUDA graphs stay valid); parameters laid out anew (a new fused
    tensor, e.g. after .to()) give new copies and a new version, which keys the graphs."""
    model = cast_model(model8, "fp32")
    dh, d = model.head_dim, model.embed_dim
    copies = model.qkv.weights(model.layers, "quack", dh)
    addresses = [(w.data_ptr(), b.data_ptr()) for w, b in copies]
    version = model.qkv_version()
    model.layers[1].self_attn.k_proj.weight.mul_(2.0)
    model.layers[3].self_attn.q_proj.bias.add_(1.0)
    again = model.qkv.weights(model.layers, "quack", dh)
    assert [(w.data_ptr(), b.data_ptr()) for w, b in again] == addresses and model.qkv_version() == version
    for (w, b), (w_il, b_il) in zip(model.qkv_weights(), again):
        assert torch.equal(w_il, interleave_rotary_rows(w, dh, 2 * d))
        assert torch.equal(b_il, interleave_rotary_rows(b, dh, 2 * d))
    model.to(torch.float64)  # new parameter tensors: laid out again
    assert model.qkv_version() > version
    moved = model.qkv.weights(model.layers, "quack", dh)
    assert moved[0][0].dtype == torch.float64
    assert torch.equal(moved[1][0], interleave_rotary_rows(model.qkv_weights()[1][0], dh, 2 * d))


@pytest.mark.xfail(strict=True, reason="BUG: plain pickle (and deepcopy) of a PackedESM2 copies each layer's "
                   "fused q/k/v storage once per parameter: q, k and v each carry the whole [3D, D] buffer")
def test_pickle_keeps_fused_qkv_storage_once(model8):
    """Stock ESM2 pickles to its parameter bytes; the packed model should too (torch.save does)."""
    param_bytes = sum(p.numel() * p.element_size() for p in model8.parameters())
    assert len(pickle.dumps(ESM2(num_layers=6, embed_dim=320, attention_heads=20))) < 1.01 * param_bytes
    assert len(pickle.dumps(model8)) < 1.01 * param_bytes  # 1.49x: q/k/v bytes pickled three times
    clone = copy.deepcopy(model8)
    attn = clone.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().nbytes() == attn.q_proj.weight.numel() * 3 * 4 and \
        attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()


def test_layer_functions_per_backend_pair():
    """Eager layer functions bind the backend objects; compiled ones are built once per
    (mode, gemm, norm) and shared by every model and layer; inductor options exist per norm backend."""
    eager = eager_layer_functions("cublas", "torch")
    assert eager.first.keywords == {"gemm": GEMM["cublas"], "in_place": True}
    assert eager.boundary.keywords == {"gemm": GEMM["cublas"], "norm": NORM["torch"], "in_place": True}
    assert eager.last.keywords == {"gemm": GEMM["cublas"], "norm": NORM["torch"]}
    assert compiled_layer_functions(None, "cublas", "torch") is compiled_layer_functions(None, "cublas", "torch")
    assert compiled_layer_functions(None, "cublas", "torch") is not compiled_layer_functions(None, "cublas", "triton")
    assert set(COMPILE_OPTIONS) == set(NORM.names())
    with pytest.raises(BackendUnavailableError, match="unknown GEMM backend 'cutlass'"):
        eager_layer_functions("cutlass", "torch")
