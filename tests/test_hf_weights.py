"""Hugging Face ESM-2 weights <-> fair-esm ESM2 (esmflash.model.hf_weights), against transformers'
EsmForMaskedLM on small random models (CPU, fp32), the HF cache layout, and broken checkpoints."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import esm
from esm.model.esm2 import ESM2

from esmflash.errors import EsmflashError
from esmflash.model.hf_weights import (
    HFArchitecture,
    HFCheckpointError,
    fair_esm_shapes,
    fair_esm_to_hf_state_dict,
    find_hf_checkpoint,
    hf_cache_dirs,
    hf_config_kwargs,
    hf_state_dict_to_fair_esm,
    load_hf_checkpoint,
)

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

LAYERS, DIM, HEADS = 2, 64, 4
ALPHABET = esm.data.Alphabet.from_architecture("ESM-1b")
SEQUENCES = [("long", "MKTAYIAKQRQISFVKSHFSRQ"), ("masked", "MKT<mask>YIA<mask>Q"), ("short", "GAV")]
REPO = "facebook/esm2_t6_8M_UR50D"


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter (LayerNorms and biases included) away from its init, so a swapped or
    transposed weight shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def _fair_model(seed: int = 0, token_dropout: bool = True) -> ESM2:
    torch.manual_seed(seed)
    model = ESM2(num_layers=LAYERS, embed_dim=DIM, attention_heads=HEADS, alphabet=ALPHABET, token_dropout=token_dropout)
    return _randomize(model, seed)


def _hf_model(seed: int = 1, token_dropout: bool = True):
    torch.manual_seed(seed)
    config = transformers.EsmConfig(**hf_config_kwargs(LAYERS, DIM, HEADS, token_dropout))
    return _randomize(transformers.EsmForMaskedLM(config), seed)


def _tokens() -> torch.Tensor:
    _, _, tokens = ALPHABET.get_batch_converter()(SEQUENCES)
    assert (tokens == ALPHABET.padding_idx).any() and (tokens == ALPHABET.mask_idx).any()
    return tokens


def _assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    assert diff <= 1e-5 * scale, f"{what}: max abs diff {diff:.3g} vs max abs {scale:.3g}"


def _hf_run(hf, tokens: torch.Tensor):
    real = tokens != ALPHABET.padding_idx
    with torch.no_grad():
        out = hf(input_ids=tokens, attention_mask=real.long(), output_hidden_states=True)
        last = hf.esm(input_ids=tokens, attention_mask=real.long()).last_hidden_state
    return out.hidden_states, last, out.logits


def _compare(fair: ESM2, hf) -> None:
    """fair-esm (one padded batch) and transformers agree on every hidden state, last_hidden_state
    and the logits at real tokens; transformers runs the same padded batch and each sequence alone.
    transformers 4.x never passes attention_mask to the embeddings, so its token dropout divides a
    padded sequence's <mask> count by the padded length (fixed in 5.x, transformers PR #44163):
    there, padded sequences holding a <mask> are compared through the unpadded runs only."""
    tokens = _tokens()
    real = tokens != ALPHABET.padding_idx
    with torch.no_grad():
        ours = fair(tokens, repr_layers=list(range(LAYERS + 1)))
    ours = [ours["representations"][i] for i in range(LAYERS + 1)] + [ours["logits"]]
    batched = _hf_run(hf, tokens)
    # HF numbers hidden states like fair-esm: [0] = embeddings, [i] = after layer i, and the last
    # one is after emb_layer_norm_after (= last_hidden_state), as fair-esm's representations[L].
    assert len(batched[0]) == LAYERS + 1
    names = [f"hidden state {i}" for i in range(LAYERS + 1)] + ["logits"]
    pad_bug = _hf_token_dropout_counts_padding(hf)
    for b in range(tokens.shape[0]):
        n = int(real[b].sum())
        alone = _hf_run(hf, tokens[b:b + 1, :n])
        theirs_alone = [h[0] for h in alone[0]] + [alone[2][0]]
        theirs_batch = [h[b] for h in batched[0]] + [batched[2][b]]
        skip_batch = pad_bug and n < tokens.shape[1] and bool((tokens[b] == ALPHABET.mask_idx).any())
        for name, mine, one, many in zip(names, ours, theirs_alone, theirs_batch):
            _assert_close(one, mine[b, :n], f"{SEQUENCES[b][0]} alone: {name}")
            if not skip_batch:
                _assert_close(many[:n], mine[b, :n], f"{SEQUENCES[b][0]} batched: {name}")
        _assert_close(alone[1][0], ours[LAYERS][b, :n], f"{SEQUENCES[b][0]} alone: last_hidden_state")
        if not skip_batch:
            _assert_close(batched[1][b, :n], ours[LAYERS][b, :n], f"{SEQUENCES[b][0]} batched: last_hidden_state")


def _hf_token_dropout_counts_padding(hf) -> bool:
    """Whether this transformers scales a padded sequence's token dropout by its padded length."""
    if not hf.config.token_dropout:
        return False
    tokens = torch.tensor([[0, 5, 32, 2]])
    padded = torch.tensor([[0, 5, 32, 2, 1, 1]])
    with torch.no_grad():
        one = hf(input_ids=tokens, attention_mask=torch.ones_like(tokens), output_hidden_states=True).hidden_states[0]
        two = hf(input_ids=padded, attention_mask=(padded != 1).long(), output_hidden_states=True).hidden_states[0]
    return not torch.allclose(one, two[:, :4])


# ----------------------------------------------------------------------------- the mapping


def test_shape_table_is_fair_esm_state_dict():
    model = ESM2(num_layers=LAYERS, embed_dim=DIM, attention_heads=HEADS, alphabet=ALPHABET)
    assert fair_esm_shapes(LAYERS, DIM, HEADS) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("token_dropout", [True, False])
def test_fair_esm_weights_run_in_transformers(token_dropout):
    fair = _fair_model(token_dropout=token_dropout)
    hf = transformers.EsmForMaskedLM(transformers.EsmConfig(**hf_config_kwargs(LAYERS, DIM, HEADS, token_dropout))).eval()
    hf.load_state_dict(fair_esm_to_hf_state_dict(fair.state_dict()), strict=True)
    _compare(fair, hf)


def test_both_rotary_layouts_load_into_installed_transformers():
    fair = _fair_model()
    for rotary in ("per_layer", "shared"):
        state = fair_esm_to_hf_state_dict(fair.state_dict(), rotary=rotary)
        hf = transformers.EsmForMaskedLM(transformers.EsmConfig(**hf_config_kwargs(LAYERS, DIM, HEADS))).eval()
        try:
            hf.load_state_dict(state, strict=True)
        except RuntimeError:
            assert rotary == "shared"  # transformers 4.x keeps one table per layer
            continue
        _compare(fair, hf)


def test_round_trip_is_exact():
    state = _fair_model().state_dict()
    for rotary in ("per_layer", "shared"):
        back = hf_state_dict_to_fair_esm(fair_esm_to_hf_state_dict(state, rotary=rotary))
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], state[k]) for k in state)


def test_transformers_weights_run_in_fair_esm():
    hf = _hf_model()
    fair = ESM2(num_layers=LAYERS, embed_dim=DIM, attention_heads=HEADS, alphabet=ALPHABET).eval()
    fair.load_state_dict(hf_state_dict_to_fair_esm(hf.state_dict()), strict=True)
    _compare(fair, hf)


def test_esm_model_without_prefix_lacks_only_the_lm_head():
    body = {k: v for k, v in _hf_model().esm.state_dict().items()}  # EsmModel: no "esm." prefix
    state = hf_state_dict_to_fair_esm(body)
    expected = set(fair_esm_shapes(LAYERS, DIM, HEADS))
    assert expected - set(state) == {k for k in expected if k.startswith("lm_head.") and k != "lm_head.weight"}


def test_legacy_keys_and_ignored_keys():
    """4.x per-layer rotary keys, 5.x save_pretrained's LayerNorm.gamma/beta and wildcard rotary
    key, and the unused position_ids / absolute position_embeddings most Hub files hold."""
    hf_state = _hf_model().state_dict()
    reference = hf_state_dict_to_fair_esm(hf_state)
    legacy = {}
    for key, value in hf_state.items():
        if key.endswith("rotary_embeddings.inv_freq"):
            for i in range(LAYERS):
                legacy[f"esm.encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq"] = value
            continue
        if ".LayerNorm." in key:
            key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        legacy[key] = value
    legacy["esm.embeddings.position_ids"] = torch.arange(1026)[None]
    legacy["esm.embeddings.position_embeddings.weight"] = torch.zeros(1026, DIM)
    legacy.pop("lm_head.decoder.weight")  # tied: save_pretrained leaves it out
    converted = hf_state_dict_to_fair_esm(legacy)
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[k], reference[k]) for k in reference)
    wildcard = {k: v for k, v in hf_state.items() if not k.endswith("inv_freq")}
    wildcard["esm.encoder.layer.*.attention.self.rotary_embeddings.inv_freq"] = hf_state["esm.rotary_embeddings.inv_freq"] \
        if "esm.rotary_embeddings.inv_freq" in hf_state else hf_state["esm.encoder.layer.0.attention.self.rotary_embeddings.inv_freq"]
    assert hf_state_dict_to_fair_esm(wildcard).keys() == reference.keys()


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.update({"classifier.dense.weight": torch.zeros(DIM, DIM)}), ["classifier.dense.weight", "no counterpart"]),
    (lambda s: s.update({"esm.pooler.dense.weight": torch.zeros(DIM, DIM)}), ["esm.pooler.dense.weight", "pooler"]),
    (lambda s: s.update({"esm.encoder.layer.0.attention.self.extra.weight": torch.zeros(DIM)}),
     ["esm.encoder.layer.0.attention.self.extra.weight"]),
    (lambda s: s.update({"esm.encoder.layer.0.output.dense.weight": torch.zeros(DIM, DIM)}),
     ["esm.encoder.layer.0.output.dense.weight", "(64, 64)", "(64, 256)"]),
    (lambda s: s.update({"lm_head.decoder.weight": torch.zeros(33, DIM)}), ["lm_head.decoder.weight", "ties"]),
    (lambda s: s.update({"esm.encoder.layer.0.LayerNorm.gamma": torch.ones(DIM)}), ["LayerNorm.gamma", "two keys"]),
    (lambda s: s.update({"esm.encoder.layer.0.output.dense.bias": torch.zeros(DIM, dtype=torch.long)}), ["dtype"]),
])
def test_state_dict_errors_name_the_key(edit, words):
    state = dict(_hf_model().state_dict())
    edit(state)
    with pytest.raises(HFCheckpointError) as info:
        hf_state_dict_to_fair_esm(state)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_untied_fair_esm_head_is_refused():
    state = dict(_fair_model().state_dict())
    state["lm_head.weight"] = state["embed_tokens.weight"] + 1
    with pytest.raises(HFCheckpointError, match="lm_head.weight"):
        fair_esm_to_hf_state_dict(state)


# ----------------------------------------------------------------------------- folders and the HF cache


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the default ~/.cache/huggingface/hub: empty
    return tmp_path / "hf"


def _save_in_cache(hf, hub, revision="abc", ref=True, blobs=True):
    """save_pretrained into the HF cache layout: snapshots/<rev>/ files as links into blobs/."""
    repo = hub / ("models--" + REPO.replace("/", "--"))
    snap = repo / "snapshots" / revision
    hf.save_pretrained(str(snap))
    if blobs:
        (repo / "blobs").mkdir(exist_ok=True)
        for f in list(snap.iterdir()):
            blob = repo / "blobs" / f"{revision}-{f.name}"
            shutil.move(str(f), blob)
            f.symlink_to(os.path.relpath(blob, snap))
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
    return snap


def test_hf_cache_checkpoint_runs_in_fair_esm(hf_home):
    hf = _hf_model()
    snap = _save_in_cache(hf, hf_home / "hub")
    assert hf_cache_dirs()[0] == hf_home / "hub"
    found = find_hf_checkpoint(REPO)
    assert found == snap
    arch, state = load_hf_checkpoint(found)
    assert arch == HFArchitecture(LAYERS, DIM, HEADS, True, REPO)
    fair = ESM2(alphabet=ALPHABET, **arch.esm2_kwargs()).eval()
    fair.load_state_dict(state, strict=True)
    _compare(fair, hf)


def test_snapshot_choice_and_cache_precedence(tmp_path, hf_home, monkeypatch):
    hf = _hf_model()
    old = _save_in_cache(hf, hf_home / "hub", "old", ref=False, blobs=False)
    os.utime(old, (1, 1))
    new = _save_in_cache(hf, hf_home / "hub", "new", ref=False, blobs=False)
    assert find_hf_checkpoint(REPO) == new  # no refs/main: the newest snapshot with config.json
    (new.parent.parent / "refs").mkdir()
    (new.parent.parent / "refs" / "main").write_text("old\n")
    assert find_hf_checkpoint(REPO) == old  # refs/main wins
    (new.parent.parent / "refs" / "main").write_text("gone")
    assert find_hf_checkpoint(REPO) == new  # a ref to a missing snapshot: the newest again
    assert find_hf_checkpoint(str(new.parent.parent)) == new  # the models--org--repo folder itself
    assert find_hf_checkpoint(str(old)) == old  # an explicit folder
    assert find_hf_checkpoint("facebook/esm2_t12_35M_UR50D") is None
    assert find_hf_checkpoint("esm2_t6_8M_UR50D") is None  # not a repo id
    other = _save_in_cache(hf, tmp_path / "hub_cache", "elsewhere", ref=True, blobs=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    assert hf_cache_dirs()[:2] == [tmp_path / "hub_cache", hf_home / "hub"]
    assert find_hf_checkpoint(REPO) == other


def test_pytorch_bin_and_sharded_safetensors(tmp_path):
    hf = _hf_model()
    reference = hf_state_dict_to_fair_esm(hf.state_dict())
    config = json.dumps({"model_type": "esm", **hf_config_kwargs(LAYERS, DIM, HEADS)})
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text(config)
    torch.save(state, binary / "pytorch_model.bin")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(config)
    keys = sorted(state)
    weight_map = {}
    for n, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-0000{n + 1}-of-00002.safetensors"
        safetensors_torch.save_file({k: state[k].contiguous() for k in part if k != "lm_head.decoder.weight"},
                                    str(sharded / name))
        weight_map.update({k: name for k in part if k != "lm_head.decoder.weight"})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for folder in (binary, sharded):
        arch, loaded = load_hf_checkpoint(folder)
        assert arch.name == folder.name and loaded.keys() == reference.keys()
        assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def _broken(kind, folder):
    weights = folder / "model.safetensors"
    config = json.loads((folder / "config.json").read_text())
    if kind == "empty":
        weights.write_bytes(b"")
    elif kind == "half":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif kind == "lfs-pointer":
        weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    elif kind == "no-weights":
        weights.unlink()
    elif kind == "no-config":
        (folder / "config.json").unlink()
    elif kind == "bad-json":
        (folder / "config.json").write_text("{")
    elif kind == "bad-bin":
        weights.unlink()
        (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not a zip")
    elif kind == "no-lm-head":
        state = safetensors_torch.load_file(str(weights))
        safetensors_torch.save_file({k: v for k, v in state.items() if not k.startswith("lm_head.")}, str(weights))
    else:
        edits = {"no-layers": lambda c: c.pop("num_hidden_layers"), "absolute": lambda c: c.update(position_embedding_type="absolute"),
                 "no-position-type": lambda c: c.pop("position_embedding_type"), "bert": lambda c: c.update(model_type="bert"),
                 "wider": lambda c: c.update(hidden_size=2 * DIM, intermediate_size=8 * DIM),
                 "deeper": lambda c: c.update(num_hidden_layers=LAYERS + 1), "shallower": lambda c: c.update(num_hidden_layers=1),
                 "eps": lambda c: c.pop("layer_norm_eps"), "folding": lambda c: c.update(is_folding_model=True),
                 "heads": lambda c: c.update(num_attention_heads=3)}
        edits[kind](config)
        (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("kind, words", [
    ("empty", ["model.safetensors", "0 bytes"]),
    ("half", ["model.safetensors", "truncated or corrupt"]),
    ("lfs-pointer", ["model.safetensors", "truncated or corrupt"]),
    ("no-weights", ["no weights file"]),
    ("no-config", ["no config.json"]),
    ("bad-json", ["config.json", "unreadable JSON"]),
    ("bad-bin", ["pytorch_model.bin", "truncated or corrupt"]),
    ("no-lm-head", ["model.safetensors", "EsmModel"]),
    ("no-layers", ["config.json", "num_hidden_layers"]),
    ("absolute", ["config.json", "'absolute'", "ESM-1b"]),
    ("no-position-type", ["config.json", "'absolute'"]),
    ("bert", ["config.json", "model_type"]),
    ("wider", ["model.safetensors", "(33, 64)", "(33, 128)"]),
    ("deeper", ["model.safetensors", "weights hold 2 layers", "expected 3"]),
    ("shallower", ["model.safetensors", "weights hold 2 layers", "expected 1"]),
    ("eps", ["config.json", "layer_norm_eps"]),
    ("folding", ["config.json", "ESMFold"]),
    ("heads", ["config.json", "num_attention_heads"]),
])
def test_broken_checkpoints_give_one_line(tmp_path, kind, words):
    folder = tmp_path / "ckpt"
    _hf_model().save_pretrained(str(folder))
    _broken(kind, folder)
    with pytest.raises(EsmflashError) as info:
        load_hf_checkpoint(folder)
    message = str(info.value)
    assert "\n" not in message and str(folder) in message, message
    assert all(w in message for w in words), message
