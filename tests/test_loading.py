"""Loading weights and checking library input (issue 21, items 6-8), on CPU: a missing checkpoint
is an error naming where it was looked for (random weights only when asked), Hugging Face names
and cache folders load exactly (against transformers' EsmModel), broken checkpoints give one line,
malformed records and options raise EsmflashError naming the record, and the defaults."""

from __future__ import annotations

import argparse
import os
import random

import pytest
import torch
from esm.model.esm2 import ESM2

from esmflash import (
    CheckpointError,
    EmptySequenceError,
    EsmflashError,
    WeightsNotFoundError,
    cast_model,
    embed,
    load_esm2_model,
    pack_sequences,
    relative_errors,
)
from esmflash.model import ESM2_ARCHITECTURES, PRECISIONS, find_checkpoint
from esmflash.model.hf_weights import hf_config_kwargs
from esmflash.model.loading import checkpoint_candidates, default_precision
from test_engine import _load, random_protein
from testsupport import hide_weights

NAME = "esm2_t6_8M_UR50D"
HF_NAME = f"facebook/{NAME}"
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.no_grad():
        yield


@pytest.fixture
def home(tmp_path, monkeypatch):
    """Every weights location in an empty temporary folder: $ESMFLASH_WEIGHTS, $TORCH_HOME (fair-esm's
    hub), $HF_HOME and $XDG_CACHE_HOME (the Hugging Face cache)."""
    folder = tmp_path / "home"
    folder.mkdir()
    hide_weights(monkeypatch, folder)
    return folder


@pytest.fixture(scope="module")
def model8():
    return _load(NAME)[0]


def write_checkpoint(path, *, cfg: dict | None = None, edit=None, seed: int = 0, layers: int = 2, dim: int = 64,
                     heads: int = 4):
    """A real fair-esm ESM-2 checkpoint file (2 layers, 64 wide, 4 heads, seeded weights): cfg
    overrides the Namespace's fields (a value None drops the field), edit(state) changes the
    weights before saving. Returns the stock ESM2 it holds."""
    torch.manual_seed(seed)
    stock = ESM2(num_layers=layers, embed_dim=dim, attention_heads=heads)
    fields = dict(encoder_layers=layers, encoder_embed_dim=dim, encoder_attention_heads=heads, token_dropout=True)
    fields.update(cfg or {})
    fields = {k: v for k, v in fields.items() if v is not None}
    state = {"encoder." + k: v.clone() for k, v in stock.state_dict().items()}
    if edit is not None:
        edit(state)
    torch.save({"cfg": {"model": argparse.Namespace(**fields)}, "model": state}, path)
    return stock


def one_line(error: BaseException) -> str:
    message = str(error)
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message


# ----------------------------------------------------------------------------- no checkpoint


def test_missing_checkpoint_names_every_place_looked(home):
    with pytest.raises(WeightsNotFoundError) as info:
        load_esm2_model(NAME)
    message = one_line(info.value)
    looked = checkpoint_candidates(NAME)
    assert [str(p) for p in looked] == [
        str(home / f"{NAME}.pt"), str(home / "hub" / "checkpoints" / f"{NAME}.pt"),
        str(home / "hub" / f"models--facebook--{NAME}"),
        str(home / "huggingface" / "hub" / f"models--facebook--{NAME}")]
    assert all(str(p) in message for p in looked), message
    assert f"hf download {HF_NAME}" in message and "random_weights=True" in message and "--random-weights" in message
    assert isinstance(info.value, EsmflashError)
    with pytest.raises(WeightsNotFoundError, match=rf"no checkpoint for {HF_NAME} \(looked in .*{NAME}\.pt"):
        load_esm2_model(HF_NAME)


def test_every_weights_folder_is_named(home, monkeypatch, tmp_path):
    first, second = tmp_path / "w1", tmp_path / "w2"
    monkeypatch.setenv("ESMFLASH_WEIGHTS", f"{first}{os.pathsep}{second}")
    with pytest.raises(WeightsNotFoundError) as info:
        load_esm2_model("esm2_t12_35M_UR50D", device="cpu")
    message = one_line(info.value)
    assert str(first / "esm2_t12_35M_UR50D.pt") in message and str(second / "esm2_t12_35M_UR50D.pt") in message


def test_random_weights_only_when_asked(home):
    model, _ = load_esm2_model(NAME, random_weights=True, seed=3)
    assert model.weights_source == "random-init:seed=3" and model.model_name == NAME
    hf, _ = load_esm2_model(HF_NAME, random_weights=True, seed=3)
    assert hf.model_name == NAME and hf.weights_source == "random-init:seed=3"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), hf.state_dict().values()))
    for name in ("esm2_t99_1T_UR50D", "someone/some_model", str(home / "missing.pt")):  # no architecture to draw
        with pytest.raises(WeightsNotFoundError, match="neither a released ESM-2 name"):
            load_esm2_model(name, random_weights=True)


def test_a_checkpoint_on_disk_wins_over_random_weights(home):
    write_checkpoint(home / f"{NAME}.pt")
    model, _ = load_esm2_model(NAME, random_weights=True)
    assert model.weights_source == f"checkpoint:{home / f'{NAME}.pt'}"


# ----------------------------------------------------------------------------- Hugging Face names and folders


def _hf_cache_model(hub, seed: int = 7):
    """transformers' EsmForMaskedLM with esm2_t6_8M_UR50D's architecture and seeded weights (every
    parameter moved off its init), saved where `hf download facebook/esm2_t6_8M_UR50D` leaves it."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    torch.manual_seed(seed)
    hf = transformers.EsmForMaskedLM(transformers.EsmConfig(**hf_config_kwargs(6, 320, 20))).eval()
    gen = torch.Generator().manual_seed(seed)
    for p in hf.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    repo = hub / f"models--facebook--{NAME}"
    snapshot = repo / "snapshots" / "0123abcd"
    hf.save_pretrained(str(snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return hf, snapshot


def test_facebook_name_loads_from_the_hf_cache_and_matches_transformers(home):
    hf, snapshot = _hf_cache_model(home / "hub")  # $HF_HOME/hub
    assert find_checkpoint(NAME) == snapshot == find_checkpoint(HF_NAME)
    model, alphabet = load_esm2_model(HF_NAME, device="cpu")
    assert model.weights_source == f"hf:{snapshot}" and model.model_name == NAME and model.precision == "fp32"
    assert (model.num_layers, model.embed_dim, model.attention_heads) == (6, 320, 20)
    by_short_name, _ = load_esm2_model(NAME)  # the fair-esm name finds the same folder
    by_folder, _ = load_esm2_model(snapshot)
    assert by_short_name.weights_source == by_folder.weights_source == model.weights_source
    for other in (by_short_name, by_folder):
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    rng = random.Random(5)
    records = [("long", random_protein(rng, 300)), ("masked", random_protein(rng, 60, mask_rate=0.1)),
               ("short", "MKT"), ("one", "W"), ("mid", random_protein(rng, 120))]
    ours = embed(model, records, max_tokens=512)
    assert ours.ids == [r[0] for r in records] and ours.info["weights_source"] == f"hf:{snapshot}"
    encoder = hf.esm  # transformers' EsmModel inside EsmForMaskedLM
    for i, (seq_id, seq) in enumerate(records):
        tokens = torch.tensor([[alphabet.cls_idx, *alphabet.encode(seq), alphabet.eos_idx]])
        last = encoder(input_ids=tokens, attention_mask=torch.ones_like(tokens)).last_hidden_state[0]
        theirs = last[1:-1].mean(0)  # mean over residues, BOS/EOS left out
        err = relative_errors(ours.mean[6][i], theirs)[0]
        assert err <= 1e-5, f"{seq_id}: relative error {err:.2e} against transformers"


def test_a_fair_esm_file_comes_before_the_hf_cache(home):
    _hf_cache_model(home / "hub")
    write_checkpoint(home / f"{NAME}.pt")  # $ESMFLASH_WEIGHTS/<name>.pt
    model, _ = load_esm2_model(HF_NAME)
    assert model.weights_source == f"checkpoint:{home / f'{NAME}.pt'}"


# ----------------------------------------------------------------------------- broken checkpoints: one line


def _half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _drop(key):
    return lambda state: state.pop(key)


def _extra(state):
    state["encoder.layers.0.adapter.weight"] = torch.zeros(3)


def _poison(value):
    return lambda state: state["encoder.layers.1.fc1.weight"].__setitem__((3, 5), value)


BROKEN = {
    "empty": (lambda p: p.write_bytes(b""), ["0 bytes"]),
    "first half": (lambda p: (write_checkpoint(p), _half(p)), ["not a readable fair-esm checkpoint", "truncated"]),
    "text": (lambda p: p.write_text("<html>404</html>"), ["not a readable fair-esm checkpoint"]),
    "not a checkpoint": (lambda p: torch.save({"weights": 1}, p), ["not a fair-esm checkpoint", "'cfg'", "'model'"]),
    "no layers in cfg": (lambda p: write_checkpoint(p, cfg={"encoder_layers": None}), ["cfg lacks encoder_layers"]),
    "no width in cfg": (lambda p: write_checkpoint(p, cfg={"encoder_embed_dim": None}),
                        ["cfg lacks encoder_embed_dim"]),
    "no heads in cfg": (lambda p: write_checkpoint(p, cfg={"encoder_attention_heads": None}),
                        ["cfg lacks encoder_attention_heads"]),
    "no cfg model": (lambda p: torch.save({"cfg": {}, "model": {}}, p),
                     ["cfg lacks encoder_layers, encoder_embed_dim"]),
    "wider cfg": (lambda p: write_checkpoint(p, cfg={"encoder_embed_dim": 128}),
                  ["do not fit", "wrong shape", "embed_tokens.weight (33, 64) (expected (33, 128))"]),
    "deeper cfg": (lambda p: write_checkpoint(p, cfg={"encoder_layers": 3}), ["do not fit", "missing", "layers.2."]),
    "shallower cfg": (lambda p: write_checkpoint(p, cfg={"encoder_layers": 1}),
                      ["do not fit", "unexpected", "layers.1."]),
    "missing weight": (lambda p: write_checkpoint(p, edit=_drop("encoder.layers.1.fc2.bias")),
                       ["do not fit", "missing ['layers.1.fc2.bias']"]),
    "extra weight": (lambda p: write_checkpoint(p, edit=_extra),
                     ["do not fit", "unexpected ['layers.0.adapter.weight']"]),
    "inf": (lambda p: write_checkpoint(p, edit=_poison(float("inf"))), ["layers.1.fc1.weight holds NaN or Inf"]),
    "nan": (lambda p: write_checkpoint(p, edit=_poison(float("nan"))), ["layers.1.fc1.weight holds NaN or Inf"]),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_checkpoint_gives_one_line(home, kind):
    path = home / "ckpt.pt"
    make, words = BROKEN[kind]
    make(path)
    with pytest.raises(CheckpointError) as info:
        load_esm2_model(path)
    message = one_line(info.value)
    assert message.startswith(f"{path}: ") and all(w in message for w in words), message
    assert len(message) < 600


@pytest.mark.parametrize("kind", ["empty", "first half", "inf"])
def test_broken_checkpoint_found_by_name_gives_one_line(home, kind):
    """An interrupted download left in $ESMFLASH_WEIGHTS/<released name>.pt is an error, also
    with random_weights=True (weights on disk are never silently replaced)."""
    path = home / f"{NAME}.pt"
    BROKEN[kind][0](path)
    for random_weights in (False, True):
        with pytest.raises(CheckpointError) as info:
            load_esm2_model(HF_NAME, random_weights=random_weights)
        assert one_line(info.value).startswith(f"{path}: ")


def test_valid_tiny_checkpoint_loads(home):
    path = home / "tiny.pt"
    stock = write_checkpoint(path, seed=4)
    model, _ = load_esm2_model(path)
    assert model.weights_source == f"checkpoint:{path}" and model.model_name == "tiny"
    assert (model.num_layers, model.embed_dim, model.attention_heads) == (2, 64, 4)
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in stock.state_dict().items())


def _without(*suffixes):
    return lambda state: [state.pop(k) for k in list(state) if k.endswith(suffixes)]


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_checkpoint_without_rotary_frequencies_or_contact_head_matches_stock(home, legacy):
    """The checkpoint path builds the model without initialising it (the weights are copied in): what a
    file may lack is computed (rotary frequencies) or initialised (contact regression); a pre-zip
    file (no mmap) loads the same way. Outputs equal stock fair-esm's with the file's weights."""
    path = home / "tiny.pt"
    stock = write_checkpoint(path, seed=5, edit=_without("rot_emb.inv_freq", "contact_head.regression.weight",
                                                          "contact_head.regression.bias"))
    if legacy:
        torch.save(torch.load(path, weights_only=False), path, _use_new_zipfile_serialization=False)
    model, alphabet = load_esm2_model(path)
    ours = model.state_dict()
    for k, v in stock.state_dict().items():
        if "contact_head" not in k:
            assert torch.equal(ours[k], v), k
    assert torch.isfinite(model.contact_head.regression.weight).all()
    records = [("a", "MKTAYIAKQRQISFVKSHFSRQ"), ("b", "W")]
    tokens = alphabet.get_batch_converter()(records)[2]
    assert torch.equal(model(tokens, repr_layers=[2])["representations"][2],
                       stock.eval()(tokens, repr_layers=[2])["representations"][2])


def test_checkpoint_weights_are_not_drawn_first(home, monkeypatch):
    """No random initialisation is spent on weights a checkpoint overwrites (650M on a CPU: 7.6 of
    12.3 s of loading), and torch.nn.init is whole again afterwards, also after a failure."""
    path = home / "tiny.pt"
    write_checkpoint(path, seed=6)
    original = {name: getattr(torch.nn.init, name) for name in ("kaiming_uniform_", "normal_", "xavier_uniform_")}
    calls = []
    for name, function in original.items():
        monkeypatch.setattr(torch.nn.init, name, lambda *a, _f=function, _n=name, **k: calls.append(_n) or _f(*a, **k))
    patched = {name: getattr(torch.nn.init, name) for name in original}
    load_esm2_model(path)
    assert calls == []
    assert {name: getattr(torch.nn.init, name) for name in original} == patched
    write_checkpoint(path, edit=_poison(float("nan")))
    with pytest.raises(CheckpointError):
        load_esm2_model(path)
    assert {name: getattr(torch.nn.init, name) for name in original} == patched
    load_esm2_model(NAME, random_weights=True)  # random weights are drawn as fair-esm draws them
    assert calls


def test_finite_weights_whose_sum_overflows_load(home):
    """The NaN/Inf check sums each weight first; a sum that overflows is not taken for an Inf."""
    path = home / "tiny.pt"
    write_checkpoint(path, edit=lambda state: state["encoder.layers.1.fc1.weight"].fill_(3e38))
    model, _ = load_esm2_model(path)
    assert bool((model.layers[1].fc1.weight == 3e38).all())


@pytest.mark.parametrize("cfg", [{"encoder_attention_heads": 3}, {"encoder_layers": "2"}, {"encoder_layers": -1},
                                 {"encoder_embed_dim": 0}])
def test_cfg_with_impossible_values_gives_one_line(home, cfg):
    path = home / "ckpt.pt"
    write_checkpoint(path, cfg=cfg)
    with pytest.raises(CheckpointError) as info:
        load_esm2_model(path)
    assert one_line(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize("model_entry", ["none", "list weight"])
def test_checkpoint_with_non_tensor_weights_gives_one_line(home, model_entry):
    path = home / "ckpt.pt"
    if model_entry == "none":
        cfg = argparse.Namespace(encoder_layers=2, encoder_embed_dim=64, encoder_attention_heads=4)
        torch.save({"cfg": {"model": cfg}, "model": None}, path)
    else:
        write_checkpoint(path, edit=lambda state: state.__setitem__("encoder.embed_tokens.weight", [[0.0] * 64] * 33))
    with pytest.raises(CheckpointError) as info:
        load_esm2_model(path)
    assert one_line(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize("damage", ["empty", "first half"])
def test_broken_contact_regression_file_gives_one_line(home, damage):
    path = home / f"{NAME}.pt"
    stock = write_checkpoint(path)
    regression = home / f"{NAME}-contact-regression.pt"
    torch.save({"model": {k: v for k, v in stock.state_dict().items() if "regression" in k}}, regression)
    if damage == "empty":
        regression.write_bytes(b"")
    else:
        _half(regression)
    with pytest.raises(CheckpointError) as info:
        load_esm2_model(NAME)
    assert str(regression) in one_line(info.value)


# ----------------------------------------------------------------------------- library input checks


BAD_RECORDS = [
    ("None sequence", ("b", None), r"record 1 \('b'\): sequence must be a str, got NoneType"),
    ("int sequence", ("b", 42), r"record 1 \('b'\): sequence must be a str, got int"),
    ("bytes sequence", ("b", b"MKT"), r"record 1 \('b'\): sequence must be a str, got bytes"),
    ("3-tuple", ("b", "MKT", "extra"), r"record 1: expected an \(id, sequence\) pair, got tuple .*'b', 'MKT', 'extra'"),
    ("1-tuple", ("b",), r"record 1: expected an \(id, sequence\) pair, got tuple"),
    ("string", "MKTAYIAK", r"record 1: expected an \(id, sequence\) pair, got str 'MKTAYIAK'"),
    ("None", None, r"record 1: expected an \(id, sequence\) pair, got NoneType"),
    ("None id", (None, "MKT"), r"record 1: id must be a non-empty printable string, got None"),
    ("empty id", ("", "MKT"), r"record 1: id must be a non-empty printable string, got ''"),
    ("int id", (7, "MKT"), r"record 1: id must be a non-empty printable string, got 7"),
    ("bytes id", (b"b", "MKT"), r"record 1: id must be a non-empty printable string, got b'b'"),
    ("unprintable id", ("a\tb", "MKT"), r"record 1: id must be a non-empty printable string, got 'a\\tb'"),
]


@pytest.mark.parametrize("what, record, pattern", BAD_RECORDS, ids=[b[0] for b in BAD_RECORDS])
def test_malformed_records_name_their_index_and_id(model8, what, record, pattern):
    records = [("good", "ACDE"), record, ("after", "MKT")]
    with pytest.raises(EsmflashError, match=f"^{pattern}"):
        embed(model8, records)
    with pytest.raises(EsmflashError, match=f"^{pattern}"):  # the one-shot packing path checks alike
        pack_sequences(records, model8.alphabet, 1024)


def test_sequence_errors_name_the_sequence(model8):
    with pytest.raises(EmptySequenceError, match="'e'"):
        embed(model8, [("ok", "MKT"), ("e", "")])
    with pytest.raises(EsmflashError, match=r"'j'.*'J' at position 3"):
        embed(model8, [("ok", "MKT"), ("j", "ACJ")])
    with pytest.raises(EsmflashError, match=r"duplicate id \(records 1 and 2"):
        embed(model8, [("ok", "MKT"), ("ok", "AC")])


@pytest.mark.parametrize("max_tokens", [0, 2, -5, 2.5, "4096", None, True])
def test_bad_max_tokens(model8, max_tokens):
    with pytest.raises(EsmflashError, match=rf"max_tokens must be an int >= 3 .*got {max_tokens!r}"):
        embed(model8, [("a", "MKT")], max_tokens=max_tokens)


@pytest.mark.parametrize("requested, layers", [
    (None, (6,)), ([], (6,)), ([-1], (6,)), (-1, (6,)), ([-7], (0,)), ([0, -1], (0, 6)), ([3, -4, 3], (3,)),
    (2, (2,)), ([6, 0, 1], (0, 1, 6)),
])
def test_repr_layers_count_from_the_end_as_in_the_cli(model8, requested, layers):
    out = embed(model8, [("a", "MKTAYIAK")], repr_layers=requested)
    assert tuple(out.mean) == layers


@pytest.mark.parametrize("requested, words", [
    ([7], "repr_layers 7: out of range for a 6-layer model (0..6, or -7..-1)"),
    ([-8], "repr_layers -8: out of range"),
    ([0, 99], "repr_layers 99: out of range"),
    ([True], "repr_layers: True is not a layer number"),
    (["1"], "repr_layers: '1' is not a layer number"),
    ([1.0], "repr_layers: 1.0 is not a layer number"),
])
def test_repr_layers_out_of_range(model8, requested, words):
    with pytest.raises(EsmflashError) as info:
        embed(model8, [("a", "MKT")], repr_layers=requested)
    assert words in one_line(info.value)


@pytest.mark.parametrize("policy", ["drop", "ERROR", None, ""])
def test_bad_long_policy(model8, policy):
    pattern = rf"long_policy must be one of \('error', 'truncate', 'chunk'\), got {policy!r}"
    with pytest.raises(EsmflashError, match=pattern):
        embed(model8, [("a", "MKT")], long_policy=policy)
    with pytest.raises(EsmflashError, match="long_policy"):
        pack_sequences([("a", "MKT")], model8.alphabet, 1024, long_policy=policy)


def test_options_are_checked_before_the_records(model8):
    records = [(None, None)]  # malformed too: the option errors come first
    with pytest.raises(EsmflashError, match="max_tokens"):
        embed(model8, records, max_tokens=1)
    with pytest.raises(EsmflashError, match="repr_layers"):
        embed(model8, records, repr_layers=[50])
    with pytest.raises(EsmflashError, match="long_policy"):
        embed(model8, records, long_policy="skip")


# ----------------------------------------------------------------------------- defaults


def test_cpu_defaults_to_fp32(home):
    assert PRECISIONS == {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    assert ESM2_ARCHITECTURES[NAME] == (6, 320, 20) and len(ESM2_ARCHITECTURES) == 6
    assert default_precision(torch.device("cpu")) == "fp32" and default_precision(torch.device("cuda")) == "fp16"
    model, _ = load_esm2_model(NAME, device="cpu", random_weights=True)
    assert model.precision == "fp32" and model.dtype == torch.float32 and model.device.type == "cpu"
    if not torch.cuda.is_available():  # no device named: the CPU here, so fp32 too
        model, _ = load_esm2_model(NAME, random_weights=True)
        assert model.precision == "fp32" and model.dtype == torch.float32 and model.device.type == "cpu"
    path = home / "tiny.pt"
    write_checkpoint(path)
    assert load_esm2_model(path, device="cpu")[0].precision == "fp32"
    half, _ = load_esm2_model(path, device="cpu", precision="bf16")
    assert half.precision == "bf16" and half.dtype == torch.bfloat16
    with pytest.raises(EsmflashError, match=r"precision must be one of \('fp32', 'fp16', 'bf16'\), got 'fp8'"):
        load_esm2_model(path, precision="fp8")


def test_cast_model_names_the_precisions(model8):
    with pytest.raises(EsmflashError, match="precision must be one of"):
        cast_model(model8, "fp8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_an_esmflash_error(home):
    with pytest.raises(EsmflashError, match="CUDA"):
        load_esm2_model(NAME, device="cuda", random_weights=True)
