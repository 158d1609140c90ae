"""The packed ESM-2 engine against stock fair-esm, on CPU in fp32, with real (seeded random or
checkpoint) weights: forward equivalence, packing independence, checkpoint loading, precision
wiring, backend selection through `PackedESM2.configure`, numerical checks and FLOP counts."""

from __future__ import annotations

import argparse
import os
import random
import re

import esm
import pytest
import torch
from esm.model.esm2 import ESM2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esmflash import (
    BackendUnavailableError,
    FlashAttentionNotActiveError,
    NumericalError,
    TokenBudgetError,
    available_backends,
    cast_model,
    compare_to_reference,
    embed,
    load_esm2_model,
    pack_sequences,
    relative_errors,
    resolve_backend,
    verify_flashattention_active,
)
from esmflash.batch import split_batch
from esmflash.bench.perf import forward_flops, mfu_denominator
from esmflash.config import DEFAULT_MICRO_BATCH_TOKENS
from esmflash.kernels import GEMM
from esmflash.kernels.attention import varlen_attention
from esmflash.model import find_checkpoint
from esmflash.pipeline.packing import build_batch, prepare_segments
from testsupport import hide_weights

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
TOL = 1e-5
MODELS = ["esm2_t6_8M_UR50D", "esm2_t12_35M_UR50D"]


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.no_grad():
        yield


# ----------------------------------------------------------------------------- fixtures & helpers


def _load(name: str, **kw):
    """A released name with seeded random weights (asked for explicitly), no real checkpoint."""
    with pytest.MonkeyPatch.context() as mp:
        hide_weights(mp)
        return load_esm2_model(name, **{"precision": "fp32", "device": "cpu", "random_weights": True, **kw})


def split_per_sequence(x: torch.Tensor, batch, residues_only: bool = True) -> list[torch.Tensor]:
    """Packed [T, ...] -> one tensor per sequence in batch order ([L_i, ...]; BOS/EOS dropped
    when residues_only)."""
    out = list(torch.split(x, batch.lengths))
    return [t[1:-1] for t in out] if residues_only else out


@pytest.fixture(scope="module")
def model8():
    return _load("esm2_t6_8M_UR50D")[0]


@pytest.fixture(scope="module")
def model35():
    return _load("esm2_t12_35M_UR50D")[0]


@pytest.fixture(scope="module")
def models(model8, model35):
    return {"esm2_t6_8M_UR50D": model8, "esm2_t12_35M_UR50D": model35}


def random_protein(rng: random.Random, n: int, mask_rate: float = 0.0) -> str:
    return "".join("<mask>" if rng.random() < mask_rate else rng.choice(AMINO_ACIDS) for _ in range(n))


def stock_forward(model, records, repr_layers) -> dict[str, dict]:
    """Stock fair-esm padded forward (ESM2.forward on BatchConverter tokens) of `records` as one
    padded batch: {id: {"logits": [n, 33], layer: [n, D]}} over each sequence's real tokens."""
    _, _, tokens = model.alphabet.get_batch_converter()(records)
    out = model(tokens, repr_layers=list(repr_layers))
    result = {}
    for row, (seq_id, _) in enumerate(records):
        n = int((tokens[row] != model.alphabet.padding_idx).sum())
        per = {"logits": out["logits"][row, :n]}
        per.update({l: out["representations"][l][row, :n] for l in repr_layers})
        result[seq_id] = per
    return result


def stock_reference(model, records, repr_layers, alone_over: int = 160) -> dict[str, dict]:
    """Stock outputs: sequences longer than `alone_over` residues run alone (no padding), the
    short ones together in one padded batch (the stock padded path)."""
    ref = {}
    short = [r for r in records if len(model.alphabet.encode(r[1])) <= alone_over]
    if short:
        ref.update(stock_forward(model, short, repr_layers))
    for r in records:
        if r not in short:
            ref.update(stock_forward(model, [r], repr_layers))
    return ref


def packed_forward(model, batches, repr_layers) -> dict[str, dict]:
    """forward_packed over batches, cut per sequence (BOS/EOS included): {id: {key: [n, ...]}}."""
    result = {}
    for batch in batches:
        out = model.forward_packed(batch, repr_layers=repr_layers, return_logits=True)
        tensors = {"logits": out["logits"], **out["representations"]}
        pieces = {k: split_per_sequence(v, batch, residues_only=False) for k, v in tensors.items()}
        for j, seg in enumerate(batch.segments):
            result[seg.id] = {k: pieces[k][j] for k in tensors}
    return result


def assert_close(out: dict, ref: dict, keys, tol: float = TOL, what: str = "") -> float:
    worst = 0.0
    assert set(out) == set(ref)
    for seq_id in ref:
        for k in keys:
            a, b = out[seq_id][k], ref[seq_id][k]
            assert a.shape == b.shape, f"{what} {seq_id} {k}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
            err = relative_errors(a, b)[0]
            worst = max(worst, err)
            assert err <= tol, f"{what} sequence {seq_id!r} output {k!r}: max rel err {err:.2e} > {tol:.0e}"
    return worst


# ----------------------------------------------------------------------------- forward == stock fair-esm


def acceptance_records() -> list[tuple[str, str]]:
    rng = random.Random(2024)
    return [
        ("len1", random_protein(rng, 1)),
        ("len2", random_protein(rng, 2)),
        ("len1022", random_protein(rng, 1022)),
        ("mask-only", "<mask>"),
        ("masked37", random_protein(rng, 37, mask_rate=0.25)),
        ("masked150", random_protein(rng, 150, mask_rate=0.05)),
        ("half-masked", "<mask>A<mask>C" * 5),
        ("len90", random_protein(rng, 90)),
    ]


@pytest.fixture(scope="module", params=MODELS)
def acceptance(request, models):
    """Packed and stock outputs of one model on the acceptance batch (computed once)."""
    model = models[request.param]
    records = acceptance_records()
    layers = sorted({0, 3, model.num_layers // 2, model.num_layers})
    batches = pack_sequences(records, model.alphabet, max_tokens=4096)
    assert len(batches) == 1  # 1 and 1022 residues side by side in one packed batch
    return {
        "model": model,
        "layers": layers,
        "packed": packed_forward(model, batches, layers),
        "stock": stock_reference(model, records, layers),
    }


def test_last_layer_matches_stock(acceptance):
    L = acceptance["model"].num_layers
    assert_close(acceptance["packed"], acceptance["stock"], [L], what=acceptance["model"].model_name)


def test_logits_match_stock(acceptance):
    assert_close(acceptance["packed"], acceptance["stock"], ["logits"], what=acceptance["model"].model_name)
    for per in acceptance["packed"].values():
        assert per["logits"].shape[-1] == len(acceptance["model"].alphabet.all_toks)


def test_intermediate_layers_match_stock(acceptance):
    assert_close(acceptance["packed"], acceptance["stock"], acceptance["layers"], what=acceptance["model"].model_name)


def test_token_dropout_rescales_per_sequence(model8):
    """Layer 0 (embeddings after token dropout) by hand: mask rows zero, others scaled by
    0.88 / (1 - masked fraction of that sequence's tokens incl. BOS/EOS)."""
    records = [("none", "ACDE"), ("some", "A<mask>C<mask>"), ("all", "<mask><mask>")]
    batch = pack_sequences(records, model8.alphabet, 100)[0]
    rep = model8.forward_packed(batch, repr_layers=[0])["representations"][0]
    for seg, x in zip(batch.segments, split_per_sequence(rep, batch, residues_only=False)):
        toks = batch.input_ids[batch.seq_index == batch.segments.index(seg)]
        is_mask = toks == model8.alphabet.mask_idx
        scale = 0.88 / (1 - is_mask.sum().item() / toks.numel())
        expected = model8.embed_tokens(toks) * model8.embed_scale * scale
        expected[is_mask] = 0
        assert relative_errors(x, expected)[0] <= 1e-6, seg.id


def test_exact_budget_batches_match_stock(model8):
    """Many small batches (max_tokens=1024: the 1022-residue sequence fills one exactly)."""
    records = acceptance_records()
    batches = pack_sequences(records, model8.alphabet, max_tokens=1024)
    assert max(b.num_tokens for b in batches) == 1024 and len(batches) >= 2
    L = model8.num_layers
    assert_close(packed_forward(model8, batches, [L]), stock_reference(model8, records, [L]), [L, "logits"])


# ----------------------------------------------------------------------------- property-based


@st.composite
def packed_problem(draw):
    """1..8 sequences, lengths 1..1022 biased short, '<mask>' now and then, a random budget.
    At most ~2000 residues per example (a long sequence only while the total is under 1000),
    to bound the CPU time of the three forward passes each example runs."""
    n = draw(st.integers(1, 8))
    records = []
    total = 0
    for i in range(n):
        kind = draw(st.sampled_from(["short"] * 6 + ["mid"] * 3 + ["long"]))
        if kind == "long" and total >= 1000:
            kind = "mid"
        length = draw({"short": st.integers(1, 24), "mid": st.integers(1, 200), "long": st.integers(200, 1022)}[kind])
        mask_rate = draw(st.sampled_from([0.0, 0.0, 0.1, 0.4]))
        seed = draw(st.integers(0, 2**32 - 1))
        records.append((f"s{i}", random_protein(random.Random(seed), length, mask_rate)))
        total += length
    longest = max(len(esm.data.Alphabet.from_architecture("ESM-1b").encode(s)) for _, s in records)
    max_tokens = longest + 2 + draw(st.integers(0, 1500))
    permutation = draw(st.permutations(range(n)))
    return records, max_tokens, permutation


def _check_packed_problem(model, problem):
    records, max_tokens, permutation = problem
    L = model.num_layers
    # packing 1: best-fit decreasing under a random budget
    batches = pack_sequences(records, model.alphabet, max_tokens)
    out_a = packed_forward(model, batches, [L])
    # packing 2: everything in one batch, in a random order (different neighbours and offsets)
    segments = prepare_segments(records, model.alphabet, max_tokens=10**9)
    out_b = packed_forward(model, [build_batch([segments[i] for i in permutation], model.alphabet)], [L])
    ref = stock_reference(model, records, [L])
    assert_close(out_a, ref, [L, "logits"], what="packing 1 vs stock:")
    assert_close(out_b, ref, [L, "logits"], what="packing 2 vs stock:")
    assert_close(out_a, out_b, [L, "logits"], what="packing 1 vs packing 2:")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(problem=packed_problem())
def test_property_packed_matches_stock_8m(model8, problem):
    _check_packed_problem(model8, problem)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(problem=packed_problem())
def test_property_packed_matches_stock_35m(model35, problem):
    _check_packed_problem(model35, problem)


def test_sdpa_varlen_attention_against_explicit_softmax():
    """The CPU varlen kernel never attends across boundaries: compare with fp64 softmax attention."""
    g = torch.Generator().manual_seed(0)
    lengths = [3, 1, 17, 64, 5]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    t, h, d = sum(lengths), 4, 16
    q, k, v = (torch.randn(t, h, d, generator=g) for _ in range(3))
    out = varlen_attention("sdpa", q, k, v, cu, max(lengths), d**-0.5)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qq, kk, vv = (x[a:b].double().transpose(0, 1) for x in (q, k, v))
        ref = torch.softmax(qq @ kk.transpose(1, 2) * d**-0.5, dim=-1) @ vv
        assert relative_errors(out[a:b], ref.transpose(0, 1))[0] <= 1e-6


# ----------------------------------------------------------------------------- checkpoints & loading


def _tiny_checkpoint(path, seed: int = 0, prefix: str = "encoder.", regression: bool = True):
    """A real fair-esm-format ESM-2 checkpoint (2 layers, 64 dims, 4 heads, seeded weights).
    regression=False leaves the contact-regression weights out, as the released files do."""
    torch.manual_seed(seed)
    stock = ESM2(num_layers=2, embed_dim=64, attention_heads=4)
    cfg = argparse.Namespace(encoder_layers=2, encoder_embed_dim=64, encoder_attention_heads=4, token_dropout=True)
    state = {prefix + k: v for k, v in stock.state_dict().items() if regression or "regression" not in k}
    torch.save({"cfg": {"model": cfg}, "model": state}, path)
    return stock


@pytest.mark.parametrize("prefix", ["encoder.", "encoder.sentence_encoder."])
def test_tiny_real_checkpoint_loads_and_matches_stock(tmp_path, prefix):
    path = tmp_path / "esm2_t2_tiny.pt"
    _tiny_checkpoint(path, prefix=prefix)
    model, alphabet = load_esm2_model(path, precision="fp32", device="cpu")
    assert model.weights_source == f"checkpoint:{path}"
    assert model.model_name == "esm2_t2_tiny" and model.precision == "fp32" and model.attention_backend == "sdpa"
    stock, stock_alphabet = esm.pretrained.load_model_and_alphabet_core(
        "esm2_t2_tiny", torch.load(path, map_location="cpu", weights_only=False)
    )
    stock = stock.eval()
    assert alphabet.all_toks == stock_alphabet.all_toks
    ours, theirs = model.state_dict(), stock.state_dict()
    assert set(ours) == set(theirs)
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k
    rng = random.Random(9)
    records = [("a", random_protein(rng, 40)), ("b", "M<mask>KT"), ("c", "W"), ("d", random_protein(rng, 200, 0.1))]
    L = model.num_layers
    batches = pack_sequences(records, alphabet, max_tokens=512)
    assert_close(packed_forward(model, batches, [0, 1, L]), stock_reference(stock, records, [0, 1, L]), [0, 1, L, "logits"])


def test_checkpoint_picks_up_contact_regression_file(tmp_path):
    path = tmp_path / "esm2_t2_tiny.pt"
    stock = _tiny_checkpoint(path, seed=3, regression=False)
    without, _ = load_esm2_model(path, precision="fp32", device="cpu")  # missing regression is allowed
    assert torch.equal(without.layers[1].fc2.weight, stock.layers[1].fc2.weight)
    head = {k: v for k, v in stock.state_dict().items() if k.startswith("contact_head.regression.")}
    assert len(head) == 2
    torch.save({"model": head}, tmp_path / "esm2_t2_tiny-contact-regression.pt")
    model, _ = load_esm2_model(path, precision="fp32", device="cpu")
    for k, v in head.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_find_checkpoint_uses_esmflash_weights(tmp_path, monkeypatch):
    name = "esm2_t6_8M_UR50D"
    hub = tmp_path / "hub"
    (hub / "hub" / "checkpoints").mkdir(parents=True)
    hide_weights(monkeypatch, tmp_path / "empty")
    monkeypatch.setenv("TORCH_HOME", str(hub))
    monkeypatch.delenv("ESMFLASH_WEIGHTS", raising=False)
    assert find_checkpoint(name) is None
    hub_file = hub / "hub" / "checkpoints" / f"{name}.pt"
    hub_file.write_bytes(b"")
    assert find_checkpoint(name) == hub_file
    first, second = tmp_path / "w1", tmp_path / "w2"
    first.mkdir(), second.mkdir()
    mine = second / f"{name}.pt"
    _tiny_checkpoint(mine)
    monkeypatch.setenv("ESMFLASH_WEIGHTS", f"{first}{os.pathsep}{second}")
    assert find_checkpoint(name) == mine  # ESMFLASH_WEIGHTS wins over the hub cache
    assert find_checkpoint("esm2_t12_35M_UR50D") is None


def test_random_init_records_seed_and_is_reproducible(model8):
    assert model8.weights_source == "random-init:seed=0" and model8.model_name == "esm2_t6_8M_UR50D"
    again, _ = _load("esm2_t6_8M_UR50D", seed=0)
    other, _ = _load("esm2_t6_8M_UR50D", seed=1)
    assert other.weights_source == "random-init:seed=1"
    a, b, c = model8.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embed_tokens.weight"], c["embed_tokens.weight"])
    assert not torch.equal(a["layers.0.fc1.weight"], c["layers.0.fc1.weight"])
    assert (model8.num_layers, model8.embed_dim, model8.attention_heads) == (6, 320, 20)


def test_loader_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="precision"):
        load_esm2_model("esm2_t6_8M_UR50D", precision="fp8", device="cpu")
    with pytest.raises(ValueError, match="neither a released ESM-2 name"):
        load_esm2_model(tmp_path / "missing.pt", precision="fp32", device="cpu")
    junk = tmp_path / "junk.pt"
    torch.save({"weights": 1}, junk)
    with pytest.raises(ValueError, match="not a fair-esm checkpoint"):
        load_esm2_model(junk, precision="fp32", device="cpu")


# ----------------------------------------------------------------------------- precision wiring


def test_bf16_on_cpu(model8):
    bf16, _ = _load("esm2_t6_8M_UR50D", precision="bf16")
    assert bf16.precision == "bf16" and bf16.dtype == torch.bfloat16 and bf16.attention_backend == "sdpa"
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    # same seed, same weights: the fp32 weights rounded to bf16
    assert torch.equal(bf16.layers[0].fc1.weight, model8.layers[0].fc1.weight.to(torch.bfloat16))
    # the rotary operands the bf16 model's GEMM backend runs with are fp32, equal to the fp32 model's
    positions = torch.arange(1024)
    cos, sin = GEMM[bf16.gemm_backend].rotary_operands(positions, bf16.head_dim, None)
    assert cos.dtype == sin.dtype == torch.float32
    ref_cos, ref_sin = GEMM[model8.gemm_backend].rotary_operands(positions, model8.head_dim, None)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)

    fp32 = cast_model(bf16, "fp32")
    assert fp32.dtype == torch.float32 and fp32.precision == "fp32" and bf16.dtype == torch.bfloat16
    assert torch.equal(fp32.layers[0].fc1.weight, bf16.layers[0].fc1.weight.float())
    rng = random.Random(4)
    records = [(f"s{i}", random_protein(rng, n, 0.05)) for i, n in enumerate([1, 30, 250, 400])]
    batches = pack_sequences(records, bf16.alphabet, 512)
    L = bf16.num_layers
    for batch in batches:
        out = bf16.forward_packed(batch, repr_layers=[L], return_logits=True)
        assert out["representations"][L].dtype == torch.bfloat16
        ref = fp32.forward_packed(batch, repr_layers=[L])["representations"][L]
        assert relative_errors(out["representations"][L], ref)[1] < 2e-2
    cmp = compare_to_reference(bf16, fp32, batches)
    assert cmp.num_sequences == len(records)
    assert cmp.mean_rel_err < 2e-2 and cmp.min_cosine > 0.99


# ----------------------------------------------------------------------------- attention backends


def test_auto_backend_is_sdpa_on_cpu(model8):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert resolve_backend("auto", "cpu", dtype) == "sdpa"
        assert available_backends("cpu", dtype) == ["sdpa"]
    assert model8.attention_backend == "sdpa" == model8.engine.attention
    before = model8.engine
    assert model8.configure(attention="sdpa").attention == "sdpa"
    assert model8.engine == before  # naming the backend auto picked resolves to the same engine
    model8.configure("auto")


@pytest.mark.parametrize("name", ["torch_flash", "flash_attn", "fa4", "fa4+torch_flash"])
def test_flash_backends_unavailable_on_cpu(model8, name):
    with pytest.raises(BackendUnavailableError, match=re.escape(f"{name!r} unavailable")):
        resolve_backend(name, "cpu", torch.bfloat16)
    before = model8.engine, model8.engine_request
    with pytest.raises(BackendUnavailableError, match=re.escape(name)):
        model8.configure(attention=name)
    assert model8.attention_backend == "sdpa"  # a refused backend leaves the model unchanged
    assert (model8.engine, model8.engine_request) == before
    with pytest.raises(BackendUnavailableError, match=re.escape(name)):
        _load("esm2_t6_8M_UR50D", precision="bf16", engine={"attention": name})


def test_gemm_backend_on_cpu(model8):
    """auto is cuBLAS off Hopper; quack is refused with the reason, and the model keeps its
    backend; the cublas linear_gelu is exactly F.gelu(F.linear(...))."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert GEMM.resolve("auto", "cpu", dtype) == "cublas"
    assert model8.gemm_backend == "cublas"
    with pytest.raises(BackendUnavailableError, match="'quack' unavailable: quack needs a CUDA device"):
        model8.configure(gemm="quack")
    assert model8.gemm_backend == "cublas"
    with pytest.raises(BackendUnavailableError, match="unknown GEMM backend 'cutlass'"):
        GEMM.resolve("cutlass", "cpu", torch.float16)
    with pytest.raises(BackendUnavailableError, match="quack"):
        _load("esm2_t6_8M_UR50D", precision="bf16", engine={"gemm": "quack"})
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(5, 8, generator=g), torch.randn(32, 8, generator=g), torch.randn(32, generator=g)
    assert torch.equal(GEMM["cublas"].linear_gelu(x, w, b),
                       torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b)))


def test_unknown_backend_raises(model8):
    with pytest.raises(BackendUnavailableError, match="unknown attention backend 'xformers'"):
        resolve_backend("xformers", "cpu", torch.float32)
    with pytest.raises(BackendUnavailableError, match="xformers"):
        model8.configure(attention="xformers")
    assert model8.attention_backend == "sdpa"
    q = torch.zeros(3, 1, 4)
    with pytest.raises(BackendUnavailableError, match="unknown attention backend"):
        varlen_attention("xformers", q, q, q, torch.tensor([0, 3], dtype=torch.int32), 3, 0.5)


def test_verify_flashattention_active_refuses_cpu(model8):
    with pytest.raises(FlashAttentionNotActiveError, match="cpu"):
        verify_flashattention_active(model8)


# ----------------------------------------------------------------------------- numerics


NUMERIC_RECORDS = [("clean-1", "ACDEFGHIKLMNPQRSTVY"), ("poisoned", "MKTWAYIAKQR"), ("clean-2", "GSHMLEDPVA")]


def test_numerical_error_names_layer_and_sequence(model8):
    poisoned = cast_model(model8, "fp32")  # a deep copy: the shared fixture stays clean
    w = poisoned.alphabet.get_idx("W")  # only "poisoned" contains W
    poisoned.embed_tokens.weight[w] = float("inf")
    batch = pack_sequences(NUMERIC_RECORDS, poisoned.alphabet, 1024)[0]
    assert batch.num_sequences == 3
    with pytest.raises(NumericalError) as info:
        poisoned.forward_packed(batch, check_layers=True)
    assert info.value.where == "layer 1" and info.value.seq_ids == ["poisoned"]
    assert "after layer 1 in sequence(s) 'poisoned'" in str(info.value) and "clean" not in str(info.value)
    # without per-layer checks the always-on output check still names the sequence
    with pytest.raises(NumericalError, match="final layer norm.*'poisoned'$") as info:
        poisoned.forward_packed(batch)
    assert info.value.seq_ids == ["poisoned"]
    # the LM head's output projection is tied to embed_tokens: the Inf row makes the 'W' logit
    # of every token Inf, so the logits check rightly names every sequence of the batch
    with pytest.raises(NumericalError, match=r"lm_head \(logits\)") as info:
        poisoned.forward_packed(batch, return_logits=True)
    assert info.value.seq_ids == [s.id for s in batch.segments]
    # the same batch without the poisoned sequence is fine
    clean = pack_sequences([NUMERIC_RECORDS[0], NUMERIC_RECORDS[2]], poisoned.alphabet, 1024)[0]
    out = poisoned.forward_packed(clean, check_layers=True)["representations"]
    assert out == {}


def test_numerical_error_in_a_later_layer_names_it(model8):
    broken = cast_model(model8, "fp32")
    broken.layers[3].fc2.bias[0] = float("nan")  # hits every token from layer 4 on
    batch = pack_sequences(NUMERIC_RECORDS, broken.alphabet, 1024)[0]
    with pytest.raises(NumericalError) as info:
        broken.forward_packed(batch, check_layers=True)
    assert info.value.where == "layer 4"
    assert sorted(info.value.seq_ids) == sorted(r[0] for r in NUMERIC_RECORDS)


def test_compare_to_reference_of_model_against_itself(model8):
    rng = random.Random(8)
    records = [(f"s{i}", random_protein(rng, n)) for i, n in enumerate([1, 2, 50, 300])]
    batches = pack_sequences(records, model8.alphabet, 512)
    cmp = compare_to_reference(model8, model8, batches)
    assert cmp.max_rel_err == 0.0 and cmp.mean_rel_err == 0.0
    assert cmp.min_cosine == pytest.approx(1.0, abs=1e-6) and cmp.mean_cosine == pytest.approx(1.0, abs=1e-6)
    assert cmp.num_sequences == 4 and set(cmp.as_dict()) == {
        "max_rel_err", "mean_rel_err", "min_cosine", "mean_cosine", "num_sequences"}


def test_repr_layers_out_of_range(model8):
    batch = pack_sequences([("a", "ACD")], model8.alphabet, 64)[0]
    with pytest.raises(ValueError, match="out of range"):
        model8.forward_packed(batch, repr_layers=[7])


# ----------------------------------------------------------------------------- FLOPs


def test_forward_flops_650m_by_hand():
    L, d, t = 33, 1280, 128
    # per token: L * (24 d^2 + 4 T d) + 2 d^2 + 66 d
    per_token = 33 * (24 * 1280**2 + 4 * 128 * 1280) + 2 * 1280**2 + 66 * 1280
    assert per_token == 1_322_600_960
    flops = forward_flops([t], L, d, lm_head=True)
    assert flops == pytest.approx(t * per_token, rel=1e-12)
    assert flops / t == pytest.approx(1.32e9, rel=0.01)
    # no LM head; additive over sequences
    assert forward_flops([t], L, d) == pytest.approx(t * 33 * (24 * d * d + 4 * t * d))
    assert forward_flops([3, 128, 1024], L, d) == pytest.approx(sum(forward_flops([n], L, d) for n in (3, 128, 1024)))
    assert forward_flops([], L, d) == 0.0


def test_mfu_denominator_off_gpu_is_measured():
    peak, source = mfu_denominator("cpu")  # no fixed reference for CPUs: measured now (fp32, 2048^3)
    assert source == "measured"
    assert peak > 1e8


# ----------------------------------------------------------------------------- micro-batches, CUDA graphs


def test_micro_batched_forward_matches_one_pass(model8):
    rng = random.Random(21)
    records = [(f"m{i}", random_protein(rng, rng.randint(1, 90))) for i in range(30)]
    batch = pack_sequences(records, model8.alphabet, 4096)[0]
    layers = [0, 3, model8.num_layers]
    model = cast_model(model8, "fp32")
    assert model.configure(micro_batch_tokens=None).micro_batch_tokens is None
    whole = model.forward_packed(batch, repr_layers=layers, return_logits=True)
    assert model.configure(micro_batch_tokens=256).micro_batch_tokens == 256 == model.micro_batch_tokens
    pieces = model.forward_packed(batch, repr_layers=layers, return_logits=True)
    assert batch.num_tokens > 4 * 256  # at least five pieces
    assert sorted(pieces["representations"]) == layers
    for layer in layers:
        torch.testing.assert_close(pieces["representations"][layer], whole["representations"][layer],
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pieces["logits"], whole["logits"], rtol=1e-5, atol=1e-5)
    assert model.configure(micro_batch_tokens=0).micro_batch_tokens is None  # 0: never split
    with pytest.raises(ValueError, match=">= 0"):
        model.configure(micro_batch_tokens=-1)
    assert model.micro_batch_tokens is None  # a refused setting leaves the model unchanged


def test_micro_batched_numerical_error_names_the_sequence_in_its_piece(model8):
    poisoned = cast_model(model8, "fp32")
    poisoned.embed_tokens.weight[poisoned.alphabet.get_idx("W")] = float("inf")
    records = [(f"clean-{i}", "ACDEFGHIKLMNPQRSTVY" * 3) for i in range(12)] + [("late-poisoned", "MKTWAYIAKQR")]
    batch = pack_sequences(records, poisoned.alphabet, 4096)[0]
    poisoned.configure(micro_batch_tokens=128)
    assert "late-poisoned" not in split_batch(batch, 128)[0][1].ids  # it runs in a later piece
    with pytest.raises(NumericalError, match="final layer norm.*'late-poisoned'$") as info:
        poisoned.forward_packed(batch)
    assert info.value.seq_ids == ["late-poisoned"]


def test_sequence_over_the_micro_batch_cap_names_the_cap(model8):
    model = cast_model(model8, "fp32", {"micro_batch_tokens": 32})
    batch = pack_sequences([("x", "A" * 60)], model.alphabet, 100)[0]
    with pytest.raises(TokenBudgetError, match="'x': needs 62 tokens.*micro_batch_tokens is 32"):
        model.forward_packed(batch)
    with pytest.raises(TokenBudgetError, match="micro_batch_tokens is 32"):
        embed(model, [("x", "A" * 60)], max_tokens=100)


def test_cuda_graphs_and_micro_batch_defaults_on_cpu(model8):
    assert model8.cuda_graphs is False and model8.runner.graphs is None  # default None: CUDA only
    assert model8.micro_batch_tokens == DEFAULT_MICRO_BATCH_TOKENS == 16384
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        cast_model(model8, "fp32").configure(cuda_graphs=True)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        _load("esm2_t6_8M_UR50D", engine={"cuda_graphs": True})
