"""Token-budget packing: invariants of PackedBatch, residue coverage, long-sequence policies,
packing efficiency, and the mapping of results back to input order (CPU only, real numbers)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from esm.data import Alphabet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esmflash import (
    DuplicateIdError,
    EmptySequenceError,
    InvalidSequenceError,
    SequenceTooLongError,
    TokenBudgetError,
    embed,
    pack_sequences,
    relative_errors,
)
from esmflash.batch import split_batch, split_points
from esmflash.pipeline.packing import (
    MAX_RESIDUES,
    ShapePolicy,
    best_fit_decreasing,
    build_batch,
    prepare_segments,
    tokenize,
)
from test_engine import _load, split_per_sequence

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
ALPHABET = Alphabet.from_architecture("ESM-1b")


# ----------------------------------------------------------------------------- helpers


def random_protein(rng: random.Random, n: int, mask_rate: float = 0.0) -> str:
    """n residues of the 20 standard amino acids; each is '<mask>' with probability mask_rate."""
    return "".join("<mask>" if rng.random() < mask_rate else rng.choice(AMINO_ACIDS) for _ in range(n))


def check_batch(batch, max_tokens: int) -> list[list[int]]:
    """Assert every structural invariant of one PackedBatch; return each segment's residue ids."""
    ids, cu = batch.input_ids, batch.cu_seqlens
    t, b = ids.numel(), batch.num_sequences
    assert ids.dtype == torch.int64 and ids.dim() == 1
    assert cu.dtype == torch.int32 and cu.shape == (b + 1,)
    assert b >= 1 and t == batch.num_tokens
    assert t <= max_tokens, f"batch of {t} tokens over max_tokens={max_tokens}"
    assert cu[0].item() == 0 and cu[-1].item() == t
    lengths = (cu[1:] - cu[:-1]).tolist()
    assert lengths == batch.lengths == [s.length + 2 for s in batch.segments]
    assert all(n >= 3 for n in lengths)
    assert batch.max_seqlen == max(lengths) and isinstance(batch.max_seqlen, int)
    assert batch.positions.dtype == torch.int64 and batch.seq_index.dtype == torch.int64
    expected_pos = torch.cat([torch.arange(n) for n in lengths])
    assert torch.equal(batch.positions, expected_pos), "positions must restart at 0 at each boundary"
    expected_idx = torch.repeat_interleave(torch.arange(b), torch.tensor(lengths))
    assert torch.equal(batch.seq_index, expected_idx)
    starts, ends = cu[:-1].long(), cu[1:].long() - 1
    assert (ids[starts] == ALPHABET.cls_idx).all(), "BOS must open every sequence"
    assert (ids[ends] == ALPHABET.eos_idx).all(), "EOS must close every sequence"
    residues: list[list[int]] = []
    specials = {ALPHABET.cls_idx, ALPHABET.eos_idx, ALPHABET.padding_idx, ALPHABET.unk_idx}
    for piece in split_per_sequence(ids, batch, residues_only=True):
        toks = piece.tolist()
        assert not specials & set(toks), "no BOS/EOS/pad/unk inside a sequence"
        residues.append(toks)
    assert batch.ids == [s.id for s in batch.segments]
    return residues


def reconstruct(batches, num_inputs: int, max_tokens: int) -> list[list[int]]:
    """Residue ids of every input, rebuilt from the batches' input_ids via their segments;
    asserts every piece is used once and the pieces of a sequence are consecutive."""
    pieces: list[list[tuple[int, list[int]]]] = [[] for _ in range(num_inputs)]
    for batch in batches:
        for seg, toks in zip(batch.segments, check_batch(batch, max_tokens)):
            assert len(toks) == seg.length
            pieces[seg.index].append((seg.start, toks))
    out = []
    for i, p in enumerate(pieces):
        assert p, f"input {i} missing from every batch"
        p.sort(key=lambda s: s[0])
        pos = 0
        for start, toks in p:
            assert start == pos, f"input {i}: piece at {start}, expected {pos} (gap or overlap)"
            pos += len(toks)
        out.append([t for _, toks in p for t in toks])
    return out


@st.composite
def records_strategy(draw, max_n: int = 40, max_len: int = 1500):
    """Random [(id, sequence)]: lengths biased short with occasional long ones (also over 1022),
    residues from the 20 amino acids plus occasional '<mask>'. Sequences are generated from a
    drawn seed so long ones stay cheap for hypothesis."""
    n = draw(st.integers(1, max_n))
    kind = st.sampled_from(["short"] * 6 + ["mid"] * 3 + ["long"])
    out = []
    for i in range(n):
        k = draw(kind)
        length = draw({"short": st.integers(1, 30), "mid": st.integers(1, 400), "long": st.integers(400, max_len)}[k])
        mask_rate = draw(st.sampled_from([0.0, 0.0, 0.05, 0.5]))
        seed = draw(st.integers(0, 2**32 - 1))
        out.append((f"seq{i}", random_protein(random.Random(seed), length, mask_rate)))
    return out


def expected_failure(records, max_tokens: int, policy: str):
    """(error type, id) that prepare_segments must raise first, or None."""
    for seq_id, seq in records:
        n = len(ALPHABET.encode(seq))
        if policy == "error" and n > MAX_RESIDUES:
            return SequenceTooLongError, seq_id
        kept = min(n, MAX_RESIDUES) if policy == "truncate" else n
        if policy != "chunk" and kept + 2 > max_tokens:
            return TokenBudgetError, seq_id
    return None


# ----------------------------------------------------------------------------- coverage & invariants


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    records=records_strategy(),
    max_tokens=st.one_of(st.integers(3, 64), st.integers(64, 4096), st.integers(4096, 40000)),
    policy=st.sampled_from(["error", "truncate", "chunk"]),
)
def test_packing_invariants_and_coverage(records, max_tokens, policy):
    failure = expected_failure(records, max_tokens, policy)
    if failure is not None:
        err_type, seq_id = failure
        with pytest.raises(err_type) as info:
            pack_sequences(records, ALPHABET, max_tokens, long_policy=policy)
        assert info.value.seq_id == seq_id
        return
    batches = pack_sequences(records, ALPHABET, max_tokens, long_policy=policy)
    rebuilt = reconstruct(batches, len(records), max_tokens)
    limit = min(MAX_RESIDUES, max_tokens - 2)
    for i, (seq_id, seq) in enumerate(records):
        want = ALPHABET.encode(seq)  # fair-esm's own tokenizer as the oracle
        tokens = tokenize(seq_id, seq, ALPHABET)
        assert isinstance(tokens, np.ndarray) and tokens.dtype == np.int64
        assert tokens.tolist() == want
        if policy == "truncate":
            want = want[:MAX_RESIDUES]
        assert rebuilt[i] == want, f"input {i} ({seq_id}) not reproduced exactly once"
        segs = [s for b in batches for s in b.segments if s.index == i]
        assert all(s.id == seq_id for s in segs)
        if policy == "chunk":
            assert all(s.length <= limit for s in segs)
            assert len(segs) == math.ceil(len(want) / limit)
        else:
            assert len(segs) == 1 and segs[0].start == 0
    segments = [s for b in batches for s in b.segments]
    assert sum(b.num_tokens for b in batches) == sum(s.length + 2 for s in segments)


def test_batches_never_exceed_budget_and_exact_fit():
    # a 1022-residue sequence needs exactly 1024 tokens: fits max_tokens=1024, not 1023
    rng = random.Random(1)
    recs = [("long", random_protein(rng, 1022)), ("one", "A"), ("two", "AC")]
    batches = pack_sequences(recs, ALPHABET, 1024)
    assert [b.num_tokens for b in batches] == [1024, 7]
    reconstruct(batches, 3, 1024)
    with pytest.raises(TokenBudgetError, match="'long'.*1024 tokens.*max_tokens is 1023"):
        pack_sequences(recs, ALPHABET, 1023)
    # three tokens is the smallest budget: one residue per batch
    batches = pack_sequences([("a", "A"), ("b", "C"), ("c", "D")], ALPHABET, 3)
    assert [b.num_tokens for b in batches] == [3, 3, 3]
    with pytest.raises(ValueError, match=">= 3"):
        pack_sequences([("a", "A")], ALPHABET, 2)


def test_single_batch_layout_by_hand():
    batch = build_batch(prepare_segments([("x", "AC"), ("y", "W<mask>K"), ("z", "L")], ALPHABET, 100), ALPHABET)
    a = ALPHABET.get_idx
    assert batch.input_ids.tolist() == [0, a("A"), a("C"), 2, 0, a("W"), 32, a("K"), 2, 0, a("L"), 2]
    assert batch.cu_seqlens.tolist() == [0, 4, 9, 12]
    assert batch.positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2]
    assert batch.seq_index.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2]
    assert batch.max_seqlen == 5 and batch.ids == ["x", "y", "z"] and batch.lengths == [4, 5, 3]
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids) and moved.segments == batch.segments


def test_tokenize_accepts_lowercase_and_mask_any_case():
    tokens = tokenize("s", "acdE<MASK>w<Mask>", ALPHABET)
    assert tokens.dtype == np.int64 and tokens.tolist() == ALPHABET.encode("ACDE<mask>W<mask>")


@pytest.mark.parametrize(
    "records, err, pattern",
    [
        ([("a", "AC"), ("a", "DE")], DuplicateIdError, r"'a'.*records 1 and 2"),
        ([("a", "AC"), ("bad", "ACJ")], InvalidSequenceError, r"'bad'.*'J' at position 3"),
        ([("bad", "AC<cls>D")], InvalidSequenceError, r"'<cls>' at position 3"),
        ([("bad", "A<mask>1")], InvalidSequenceError, r"'1' at position 3"),
        ([("e", "")], EmptySequenceError, r"'e'"),
        ([("big", "A" * 1023)], SequenceTooLongError, r"'big': 1023 residues.*limit of 1022"),
    ],
)
def test_input_errors_name_the_sequence(records, err, pattern):
    with pytest.raises(err, match=pattern):
        pack_sequences(records, ALPHABET, 4096)
    with pytest.raises(ValueError, match="long_policy"):
        pack_sequences([("a", "A")], ALPHABET, 4096, long_policy="drop")


# ----------------------------------------------------------------------------- long policies


def test_truncate_keeps_first_1022_residues():
    rng = random.Random(2)
    seq = random_protein(rng, 1500, mask_rate=0.05)
    batches = pack_sequences([("short", "MKT"), ("long", seq)], ALPHABET, 2048, long_policy="truncate")
    rebuilt = reconstruct(batches, 2, 2048)
    assert rebuilt[1] == ALPHABET.encode(seq)[:1022]
    assert rebuilt[0] == ALPHABET.encode("MKT")
    seg = next(s for b in batches for s in b.segments if s.id == "long")
    assert (seg.start, seg.length) == (0, 1022)


@pytest.mark.parametrize("length, max_tokens", [(1500, 4096), (2045, 1024), (700, 302), (101, 12), (1022, 1000)])
def test_chunk_covers_every_residue_once(length, max_tokens):
    seq = random_protein(random.Random(length), length)
    batches = pack_sequences([("a", "ACD"), ("long", seq)], ALPHABET, max_tokens, long_policy="chunk")
    rebuilt = reconstruct(batches, 2, max_tokens)
    assert rebuilt[1] == ALPHABET.encode(seq)
    limit = min(1022, max_tokens - 2)
    pieces = sorted((s.start, s.length) for b in batches for s in b.segments if s.id == "long")
    assert all(n <= limit for _, n in pieces)
    assert len(pieces) == math.ceil(length / limit)
    assert sum(n for _, n in pieces) == length


# ----------------------------------------------------------------------------- efficiency


@pytest.mark.parametrize("max_tokens", [4096, 16384])
@pytest.mark.parametrize("distribution", ["uniform", "lognormal"])
def test_packing_efficiency(max_tokens, distribution):
    rng = random.Random(7)
    if distribution == "uniform":
        lengths = [rng.randint(1, 1022) for _ in range(1000)]
    else:  # roughly UniRef50-like: median ~300 residues, long tail cut at 1022
        lengths = [max(1, min(1022, int(rng.lognormvariate(5.7, 0.7)))) for _ in range(1000)]
    records = [(f"s{i}", "A" * n) for i, n in enumerate(lengths)]
    batches = pack_sequences(records, ALPHABET, max_tokens)
    fills = sorted(b.num_tokens / max_tokens for b in batches)
    total = sum(n + 2 for n in lengths)
    assert sum(b.num_tokens for b in batches) == total
    assert len(batches) <= math.ceil(total / max_tokens) + 1
    rest = fills[1:]  # all batches but the emptiest one
    assert sum(rest) / len(rest) > 0.9, f"mean fill {sum(rest) / len(rest):.3f}"
    assert min(rest) > 0.8


def test_packing_is_deterministic_and_groups_longest_first():
    rng = random.Random(3)
    records = [(f"s{i}", random_protein(rng, rng.randint(1, 600))) for i in range(50)]
    a = pack_sequences(records, ALPHABET, 2048)
    b = pack_sequences(records, ALPHABET, 2048)
    assert [x.ids for x in a] == [x.ids for x in b]
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
    longest = max(records, key=lambda r: len(r[1]))[0]
    assert a[0].ids[0] == longest


# ----------------------------------------------------------------------------- back to input order


@pytest.fixture(scope="module")
def model8():
    return _load("esm2_t6_8M_UR50D")[0]  # seeded random weights, asked for; never a real checkpoint


def _stock_mean(model, seq: str, layer: int) -> torch.Tensor:
    """fair-esm's extract.py mean: stock forward on the sequence alone, mean over residues."""
    _, _, toks = ALPHABET.get_batch_converter()([("x", seq)])
    with torch.no_grad():
        rep = model(toks, repr_layers=[layer])["representations"][layer]
    return rep[0, 1 : toks.shape[1] - 1].mean(0)


def test_embed_returns_input_order_and_matches_embedding_alone(model8):
    rng = random.Random(11)
    lengths = [5, 300, 1, 120, 2, 64, 250, 17]
    records = [(f"id-{9 - i}", random_protein(rng, n, mask_rate=0.1 if i % 3 == 0 else 0.0)) for i, n in enumerate(lengths)]
    layer = model8.num_layers
    batches = pack_sequences(records, ALPHABET, 400)
    assert len(batches) > 1
    assert [s.index for b in batches for s in b.segments] != list(range(len(records)))  # packing did reorder
    out = embed(model8, records, max_tokens=400, repr_layers=[3, layer], per_token=True)
    assert out.ids == [r[0] for r in records]
    assert out.mean[layer].shape == (len(records), model8.embed_dim) and out.mean[layer].dtype == torch.float32
    assert out.info["weights_source"] == model8.weights_source
    for i, (seq_id, seq) in enumerate(records):
        n = len(ALPHABET.encode(seq))
        alone = embed(model8, [(seq_id, seq)], max_tokens=1024, repr_layers=[3, layer], per_token=True)
        for l in (3, layer):
            assert out.per_token[l][i].shape == (n, model8.embed_dim)
            assert relative_errors(out.mean[l][i], alone.mean[l][0])[0] <= 1e-5
            assert relative_errors(out.per_token[l][i], alone.per_token[l][0])[0] <= 1e-5
            assert relative_errors(out.mean[l][i], out.per_token[l][i].mean(0))[0] <= 1e-5
        assert relative_errors(out.mean[layer][i], _stock_mean(model8, seq, layer))[0] <= 1e-5


def test_embed_chunk_stitches_pieces_in_order(model8):
    rng = random.Random(5)
    seq = random_protein(rng, 700)
    layer = model8.num_layers
    out = embed(model8, [("tiny", "MK"), ("long", seq)], max_tokens=302, per_token=True, long_policy="chunk")
    assert out.ids == ["tiny", "long"]
    rows = out.per_token[layer][1]
    assert rows.shape == (700, model8.embed_dim)
    pieces = sorted((s.start, s.length) for b in pack_sequences([("long", seq)], ALPHABET, 302, "chunk") for s in b.segments)
    assert len(pieces) == 3
    for start, n in pieces:
        alone = embed(model8, [("p", seq[start : start + n])], max_tokens=1024, per_token=True)
        assert relative_errors(rows[start : start + n], alone.per_token[layer][0])[0] <= 1e-5
    # the mean runs over all 700 residues of all chunks
    assert relative_errors(out.mean[layer][1], rows.mean(0))[0] <= 1e-5


# ----------------------------------------------------------------------------- splitting a batch


@pytest.mark.parametrize("lengths, max_tokens", [
    ([10] * 10, 30),
    ([5, 100, 7, 64, 64, 3, 90, 12, 40], 128),
    ([1024, 1024, 3, 3, 1024], 1024),
    ([17, 400, 33, 250, 251, 3, 300], 700),
    ([3] * 50 + [900], 1000),
])
def test_split_points_fewest_balanced_pieces_within_the_cap(lengths, max_tokens):
    cuts = split_points(lengths, max_tokens)
    sizes = [sum(lengths[a:b]) for a, b in zip(cuts, cuts[1:])]
    assert cuts[0] == 0 and cuts[-1] == len(lengths) and all(a < b for a, b in zip(cuts, cuts[1:]))
    assert max(sizes) <= max_tokens and sum(sizes) == sum(lengths)
    fewest = -(-sum(lengths) // max_tokens)
    assert len(sizes) >= fewest
    if len(sizes) == fewest:  # balanced: no piece further from the mean share than one sequence
        assert max(sizes) - min(sizes) <= 2 * max(lengths)


def test_split_points_refuses_a_sequence_over_the_cap():
    with pytest.raises(ValueError, match="2000-token sequence"):
        split_points([10, 2000, 10], 1024)


def test_split_batch_pieces_are_whole_rebased_batches():
    rng = random.Random(5)
    records = [(f"p{i}", random_protein(rng, rng.randint(1, 120))) for i in range(40)]
    batch = pack_sequences(records, ALPHABET, 4096)[0]
    assert split_batch(batch, batch.num_tokens) == [(0, batch)]
    pieces = split_batch(batch, 700)
    assert -(-batch.num_tokens // 700) <= len(pieces) <= -(-batch.num_tokens // 700) + 1
    start = 0
    for offset, piece in pieces:
        assert offset == start and 0 < piece.num_tokens <= 700
        stop = start + piece.num_tokens
        assert torch.equal(piece.input_ids, batch.input_ids[start:stop])
        assert torch.equal(piece.positions, batch.positions[start:stop])
        assert piece.cu_seqlens[0] == 0 and piece.cu_seqlens[-1] == piece.num_tokens
        assert piece.cu_seqlens.dtype == torch.int32
        assert piece.seq_index.min() == 0 and piece.seq_index.max() == piece.num_sequences - 1
        assert piece.max_seqlen == max(piece.lengths)
        start = stop
    assert start == batch.num_tokens
    assert [s for _, p in pieces for s in p.segments] == batch.segments


def test_split_batch_names_a_sequence_over_the_cap():
    batch = pack_sequences([("short", "ACD"), ("long-one", "A" * 900)], ALPHABET, 2048)[0]
    with pytest.raises(TokenBudgetError, match="'long-one': needs 902 tokens.*max_tokens is 500"):
        split_batch(batch, 500)


# ----------------------------------------------------------------------------- bins and padded shapes


def test_best_fit_decreasing_puts_each_item_in_the_fullest_bin_it_fits():
    sizes = [5, 9, 3, 7, 4, 8]
    bins = best_fit_decreasing(sizes, 12)
    # 9, 8, 7 open bins with 3, 4, 5 tokens free; 5, 4 and 3 each go to the bin they fill exactly
    assert bins == [[1, 2], [5, 4], [3, 0]]
    assert best_fit_decreasing([6, 3, 5], 10) == [[0, 1], [2]]  # 3 into the fuller bin (4 free), not 5's
    assert sorted(i for b in bins for i in b) == list(range(len(sizes)))
    rng = random.Random(4)
    sizes = [rng.randint(3, 1024) for _ in range(500)]
    bins = best_fit_decreasing(sizes, 4096)
    assert sorted(i for b in bins for i in b) == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in b) <= 4096 for b in bins)
    assert len(bins) <= math.ceil(sum(sizes) / 4096) + 1


def test_shape_policy_gives_few_padded_shapes():
    """Every batch within pack_capacity pads to capacity / 2^k tokens with at least `reserve`
    tokens to spare, rows in steps of row_step, the longest row a power of two from 128."""
    policy = ShapePolicy(4096)
    token_counts, longest_rows = set(), set()
    for tokens in range(3, policy.pack_capacity + 1, 29):
        rows = max(1, tokens // 40)
        longest = min(tokens, 1024)
        shape = policy.shape(tokens, rows, longest)
        assert shape is not None, tokens
        padded, padded_rows, max_seqlen = shape
        assert padded >= tokens + policy.reserve and padded in (256, 512, 1024, 2048, 4096)
        assert padded_rows % policy.row_step == 0 and padded_rows > rows
        assert max_seqlen >= longest and max_seqlen >= 128 and max_seqlen & (max_seqlen - 1) == 0
        token_counts.add(padded)
        longest_rows.add(max_seqlen)
    assert token_counts == {256, 512, 1024, 2048, 4096} and longest_rows == {128, 256, 512, 1024}


def test_padded_batch_keeps_real_rows_and_pooled_outputs(model8):
    """build_batch with a ShapePolicy shape: the real rows first, exactly as unpadded, then dummy
    rows of padding tokens (each at least one token); a pooled pass over the padded batch gives
    the unpadded batch's per-sequence means and BOS rows."""
    rng = random.Random(12)
    records = [(f"r{i}", random_protein(rng, n, 0.1)) for i, n in enumerate([3, 40, 250, 17, 90])]
    items = prepare_segments(records, ALPHABET, 2048)
    lengths = [len(t) + 2 for _, t in items]
    shape = ShapePolicy(2048).shape(sum(lengths), len(items), max(lengths))
    padded, plain = build_batch(items, ALPHABET, shape), build_batch(items, ALPHABET)
    assert (padded.num_tokens, padded.num_rows, padded.max_seqlen) == shape
    assert padded.num_sequences == plain.num_sequences == len(records) < padded.num_rows
    n = plain.num_tokens
    assert torch.equal(padded.input_ids[:n], plain.input_ids)
    assert torch.equal(padded.cu_seqlens[: len(records) + 1], plain.cu_seqlens)
    assert (padded.input_ids[n:] == ALPHABET.padding_idx).all()
    assert (padded.cu_seqlens[len(records) + 1:] - padded.cu_seqlens[len(records):-1] >= 1).all()
    check_batch(plain, 2048)
    layer = model8.num_layers
    ours = model8.pooled_packed(padded, [0, layer], bos=True)
    ref = model8.pooled_packed(plain, [0, layer], bos=True)
    b = len(records)
    assert ours["finite"][:b].all() and ref["finite"].all()
    for l in (0, layer):
        assert ours["mean"][l].shape == (padded.num_rows, model8.embed_dim)
        assert relative_errors(ours["mean"][l][:b], ref["mean"][l])[0] <= 1e-5
        assert relative_errors(ours["bos"][l][:b], ref["bos"][l])[0] <= 1e-5
    stock = model8.forward_packed(plain, repr_layers=[layer])["representations"][layer]
    for i, rows in enumerate(split_per_sequence(stock, plain)):
        assert relative_errors(ours["mean"][layer][i], rows.mean(0))[0] <= 1e-5
