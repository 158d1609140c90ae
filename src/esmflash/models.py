"""ESM-2 with a packed (unpadded) forward pass, and the loader.

`PackedESM2` subclasses fair-esm's `esm.model.esm2.ESM2`: the stock padded `forward` is untouched
and shares every weight with `forward_packed`, which runs on a flat [T] token vector through a
varlen attention kernel.
"""

from __future__ import annotations

import logging
import os
import re
from argparse import Namespace
from pathlib import Path
from typing import Callable

import torch

import esm
from esm.model.esm2 import ESM2

from .attention import resolve_backend, varlen_attention
from .epilogue import gemm_unavailable_reason, interleave_rotary_rows, resolve_gemm_backend, rotary_turns_table
from .fused import (
    compile_limit,
    compiled_layer_functions,
    eager_layer_functions,
    fuse_parameters,
    is_view_of,
    rotary_half_tables,
    rotary_inv_freq,
)
from .graphs import GraphCache
from .layernorm import norm_unavailable_reason, resolve_norm_backend
from .numerics import check_finite
from .packing import PackedBatch, split_batch

log = logging.getLogger(__name__)

# name -> (layers, embed_dim, heads), as released by fair-esm.
ESM2_ARCHITECTURES: dict[str, tuple[int, int, int]] = {
    "esm2_t6_8M_UR50D": (6, 320, 20),
    "esm2_t12_35M_UR50D": (12, 480, 20),
    "esm2_t30_150M_UR50D": (30, 640, 20),
    "esm2_t33_650M_UR50D": (33, 1280, 20),
    "esm2_t36_3B_UR50D": (36, 2560, 40),
    "esm2_t48_15B_UR50D": (48, 5120, 40),
}
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MASK_RATIO_TRAIN = 0.15 * 0.8  # token dropout: fraction of tokens replaced by <mask> in training
# The most tokens one pass runs by default (`PackedESM2.set_micro_batch_tokens`): larger batches run
# as pieces, so a 32k-token batch of the 650M model peaks at ~10-11 KiB of activations per token
# instead of ~20, for 2-3% of its speed (H200, fp16: 91.8 -> 94.2 ms; benchmarks/NOTES.md).
DEFAULT_MICRO_BATCH_TOKENS = 16384


class PackedESM2(ESM2):
    """fair-esm ESM2 plus `forward_packed`. Attributes set by `load_esm2_model`:
    model_name, weights_source ("checkpoint:<path>" or "random-init:seed=N"), precision,
    attention_backend, gemm_backend ("cublas" or "quack", see `set_gemm_backend`), norm_backend
    ("torch" or "triton", see `set_norm_backend`), forward_impl
    ("eager" or "compiled", see `set_compile`), micro_batch_tokens (the most tokens one pass
    runs, see `set_micro_batch_tokens`), cuda_graphs (replay repeated batch shapes as CUDA graphs,
    see `set_cuda_graphs`).

    Each layer's q_proj/k_proj/v_proj weights [D, D] and biases [D] live back to back in one
    [3D, D] / [3D] tensor (`prepare_packed`), so `forward_packed` runs one QKV GEMM without
    concatenating anything, while the stock `forward` and `state_dict` see the usual parameters.
    With gemm_backend "quack" the model also holds a copy of each layer's QKV weight and bias with
    q/k rows interleaved for the rotary epilogue (esmflash.epilogue; +25% of the weights),
    refreshed whenever a q/k/v parameter is replaced or edited in place (not through `.data`:
    call `prepare_packed` after such edits)."""

    model_name: str = "esm2"
    weights_source: str = "unknown"
    precision: str = "fp32"
    attention_backend: str = "sdpa"
    gemm_backend: str = "cublas"
    norm_backend: str = "torch"
    forward_impl: str = "eager"
    compile_mode: str | None = None
    micro_batch_tokens: int | None = None
    cuda_graphs: bool = False
    _graph_cache: GraphCache | None = None
    _qkv_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    _qkv_version: int = 0  # bumped whenever prepare_packed lays q/k/v out anew
    _rope_qkv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # quack: interleaved QKV copies
    _rope_qkv_key: tuple | None = None  # (_qkv_version, q/k/v parameter versions) they were copied at
    _rope_turns: torch.Tensor | None = None  # quack: the rotary epilogue's frequency table [3D]

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.attention_heads

    def set_attention_backend(self, name: str) -> str:
        """Select the varlen attention backend ("auto" or one of attention.BACKENDS)."""
        self.attention_backend = resolve_backend(name, self.device, self.dtype)
        return self.attention_backend

    def set_gemm_backend(self, name: str) -> str:
        """Select how fc1 + GELU and the QKV projection + rotary run: "auto", "cublas" or "quack"
        (GELU and rotary in the GEMMs' epilogues; see esmflash.epilogue). Returns the backend
        chosen. "quack" lays out its interleaved QKV copies here, before any pass."""
        self.gemm_backend = resolve_gemm_backend(name, self.device, self.dtype)
        self._rope_qkv = self._rope_qkv_key = self._rope_turns = None
        if self.gemm_backend == "quack":
            self._qkv_weights()
        return self.gemm_backend

    def set_norm_backend(self, name: str) -> str:
        """Select how the residual adds and the LayerNorms that read them run: "auto" ("triton"
        for fp16/bf16 on CUDA, else "torch"), "torch" (PyTorch ops, fused by inductor when
        compiled) or "triton" (esmflash's Triton kernels, CUDA; see esmflash.layernorm). Returns
        the backend chosen."""
        self.norm_backend = resolve_norm_backend(name, self.device, self.dtype)
        return self.norm_backend

    def set_compile(self, enabled: bool | None = True, mode: str | None = None) -> str:
        """Select the layer implementation of `forward_packed` and return it (`forward_impl`):
        "compiled" runs the layer math around attention through torch.compile'd functions (the
        first layer's LayerNorm + QKV + rotary, then one graph per layer boundary; attention
        stays eager; see esmflash.fused), "eager" plain
        PyTorch ops. enabled=None picks compiled on CUDA and eager elsewhere (the default of
        `load_esm2_model`). `mode` is torch.compile's (None: esmflash's inductor options
        for the norm backend, fused.COMPILE_OPTIONS). The first compiled forward per model shape and dtype compiles
        (seconds to a minute, cached on disk by inductor); later batch sizes do not recompile."""
        if enabled is None:
            enabled = self.device.type == "cuda"
        self.forward_impl = "compiled" if enabled else "eager"
        self.compile_mode = mode if enabled else None
        return self.forward_impl

    def set_micro_batch_tokens(self, tokens: int | None) -> int | None:
        """Cap the tokens of one pass: `forward_packed` runs a larger batch as pieces of whole
        sequences of at most `tokens` tokens each (None or 0: never split). Returns the cap."""
        if tokens is not None and tokens < 0:
            raise ValueError(f"micro_batch_tokens must be >= 0 or None, got {tokens}")
        self.micro_batch_tokens = tokens or None
        return self.micro_batch_tokens

    def set_cuda_graphs(self, enabled: bool | None = True, max_graphs: int = 8) -> bool:
        """Replay `forward_packed` as CUDA graphs (esmflash.graphs): a batch shape seen a second
        time is captured, later ones replay (host launch cost ~0 instead of ~1 ms per layer). At most
        `max_graphs` shapes are kept; each keeps its outputs' memory ([T, D] per requested layer) in
        the model's graph pool. enabled=None: on for CUDA models. Returns the setting.
        Graphs read the weights where they were at capture: in-place edits and load_state_dict
        are seen, .to()/.half() clear the graphs; after replacing a Parameter object by another
        (other than q/k/v, which are checked), call set_cuda_graphs again."""
        if enabled is None:
            enabled = self.device.type == "cuda"
        if enabled and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model (this one is on {self.device})")
        self.cuda_graphs = bool(enabled)
        self._graph_cache = GraphCache(max_graphs) if enabled else None
        return self.cuda_graphs

    # ------------------------------------------------------------------------- fused QKV weights

    @staticmethod
    def _qkv_params(layer) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        """([q, k, v] weights [D, D], [q, k, v] biases [D]) of one layer (dict lookups: this runs
        for every layer of every forward)."""
        modules = layer._modules["self_attn"]._modules
        projs = [modules[name]._parameters for name in ("q_proj", "k_proj", "v_proj")]
        return [p["weight"] for p in projs], [p["bias"] for p in projs]

    def prepare_packed(self) -> None:
        """Lay every layer's q/k/v weights and biases out back to back in one tensor (copying only
        where they are not already) and re-point the parameters at their blocks: no extra memory,
        state_dict unchanged, in-place weight edits and load_state_dict seen by both forwards.
        Runs after every .to()/.half()/.cuda() (see `_apply`) and again from `forward_packed`
        whenever a q/k/v parameter was replaced. The quack backend's interleaved QKV copies are
        made anew on the next pass: call this after editing q/k/v through `.data`."""
        cache = []
        for layer in self.layers:
            weights, biases = self._qkv_params(layer)
            cache.append((fuse_parameters(weights), fuse_parameters(biases)))
        self._qkv_cache = cache
        self._qkv_version += 1

    def _fused_qkv_version(self) -> int:
        """A number that changes whenever `_qkv_weights` lays q/k/v out anew (new addresses);
        brings the quack backend's interleaved copies up to date first."""
        self._qkv_weights()
        return self._qkv_version

    def _qkv_params_versions(self) -> tuple:
        return (self._qkv_version,) + tuple(
            p._version for layer in self.layers for ps in self._qkv_params(layer) for p in ps)

    def _qkv_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (QKV weight [3D, D], bias [3D]) as `gemm_backend`'s QKV GEMM reads them: the
        fused q/k/v (`_fused_qkv`) for cublas; for quack, copies with each head's q/k rows
        interleaved (epilogue.interleave_rotary_rows), laid out anew when q/k/v are, and copied
        again in place (same addresses, so captured CUDA graphs stay valid) when a q/k/v
        parameter was edited in place since."""
        fused = self._fused_qkv()
        if self.gemm_backend != "quack":
            return fused
        key = self._qkv_params_versions()
        if self._rope_qkv_key == key:
            return self._rope_qkv
        dh, rows = self.head_dim, 2 * self.embed_dim
        with torch.no_grad():
            if self._rope_qkv is None or self._rope_qkv_key[0] != key[0]:
                self._rope_qkv = [(interleave_rotary_rows(w, dh, rows), interleave_rotary_rows(b, dh, rows))
                                  for w, b in fused]
                self._rope_turns = rotary_turns_table(rotary_inv_freq(dh), rows, self.embed_dim).to(self.device)
            else:
                for (w, b), (w_il, b_il) in zip(fused, self._rope_qkv):
                    w_il.copy_(interleave_rotary_rows(w, dh, rows))
                    b_il.copy_(interleave_rotary_rows(b, dh, rows))
        self._rope_qkv_key = key
        return self._rope_qkv

    def _fused_qkv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (qkv weight [3D, D], qkv bias [3D]), checked to still back the parameters.
        With autograd recording into q/k/v (training), concatenated copies instead, so gradients
        reach the parameters."""
        if torch.is_grad_enabled() and any(
            p.requires_grad for layer in self.layers for ps in self._qkv_params(layer) for p in ps
        ):
            return [tuple(torch.cat(ps) for ps in self._qkv_params(layer)) for layer in self.layers]
        cache = self._qkv_cache
        if cache is None or len(cache) != len(self.layers) or not all(
            is_view_of(w, ws) and is_view_of(b, bs)
            for (w, b), (ws, bs) in zip(cache, map(self._qkv_params, self.layers))
        ):
            self.prepare_packed()
            cache = self._qkv_cache
        return cache

    def _apply(self, fn, recurse=True):
        # .to()/.half()/.cuda() give every parameter its own new tensor: lay q/k/v out fused again.
        result = super()._apply(fn, recurse)
        if "layers" in self._modules:
            self.prepare_packed()
            if self.gemm_backend == "quack":  # the copies again, or cuBLAS where quack cannot run now
                self.set_gemm_backend("quack" if gemm_unavailable_reason("quack", self.device, self.dtype) is None
                                      else "cublas")
            if self.norm_backend == "triton" and norm_unavailable_reason("triton", self.device, self.dtype):
                self.norm_backend = "torch"  # moved off CUDA
        if self._graph_cache is not None:
            self._graph_cache.clear()  # graphs hold the old weights' addresses
            if self.device.type != "cuda":
                self.cuda_graphs, self._graph_cache = False, None
        return result

    def __getstate__(self):
        # The fused views are rebuilt on demand: pickling or deep-copying them would duplicate
        # the q/k/v memory next to the copied parameters.
        state = dict(super().__getstate__())  # a copy: never edit the live __dict__
        for name in ("_qkv_cache", "_rope_qkv", "_rope_qkv_key", "_rope_turns"):  # copies: rebuilt on demand
            state.pop(name, None)
        if state.get("_graph_cache") is not None:  # graphs cannot be copied; the copy captures its own
            state["_graph_cache"] = GraphCache(state["_graph_cache"].max_graphs)
        return state

    # ------------------------------------------------------------------------- packed forward

    def rotary_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, head_dim] in fp32 for per-token positions [T] (inv_freq rebuilt in fp32, so
        a half-precision model does not inherit half-precision angles). Both halves of the last
        dim are equal; forward_packed uses the half tables (fused.rotary_half_tables)."""
        cos, sin = rotary_half_tables(positions, self.head_dim)
        return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)

    def _rotary_operands(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary operands of `gemm_backend` for per-token positions [T] (fused module
        docstring): quack (positions [T] fp32, turns table [3D]); cublas (cos_h, sin_h)."""
        if self.gemm_backend == "quack":
            return positions.to(torch.float32), self._rope_turns
        return rotary_half_tables(positions, self.head_dim)

    def _embed_packed(self, batch: PackedBatch) -> torch.Tensor:
        tokens = batch.input_ids
        x = self.embed_scale * self.embed_tokens(tokens)  # [T, D]
        if self.token_dropout:
            is_mask = tokens == self.mask_idx
            x = x.masked_fill(is_mask[:, None], 0.0)
            n_seq = batch.num_sequences
            n_mask = torch.zeros(n_seq, dtype=torch.float32, device=x.device)
            n_mask.index_add_(0, batch.seq_index, is_mask.to(torch.float32))
            n_tok = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).to(torch.float32)
            scale = (1 - MASK_RATIO_TRAIN) / (1 - n_mask / n_tok)  # [B], fp32
            x = x * scale[batch.seq_index][:, None].to(x.dtype)
        return x

    @staticmethod
    def _input_weights(layer, qkv: tuple[torch.Tensor, torch.Tensor]) -> tuple:
        """(LayerNorm weight, bias, eps, QKV weight [3D, D], bias [3D]) of a layer: the weights of
        fused.attention_inputs."""
        ln = layer.self_attn_layer_norm
        return ln.weight, ln.bias, ln.eps, qkv[0], qkv[1]

    @staticmethod
    def _output_weights(layer) -> tuple:
        """(out_proj weight, bias, LayerNorm weight, bias, eps, fc1 weight, bias, fc2 weight, bias)
        of a layer: the weights of fused.attention_output."""
        out, ln = layer.self_attn.out_proj, layer.final_layer_norm
        return out.weight, out.bias, ln.weight, ln.bias, ln.eps, layer.fc1.weight, layer.fc1.bias, layer.fc2.weight, layer.fc2.bias

    def _layer_functions(self) -> tuple[Callable, Callable, Callable]:
        """(attention_inputs, attention_output, attention_output_and_next_inputs) of `forward_impl`."""
        if self.forward_impl == "compiled":
            return compiled_layer_functions(self.compile_mode, self.gemm_backend, self.norm_backend)
        if self.forward_impl == "eager":
            return eager_layer_functions(self.gemm_backend, self.norm_backend)
        raise ValueError(f"forward_impl must be 'eager' or 'compiled', got {self.forward_impl!r}")

    def forward_packed(
        self,
        batch: PackedBatch,
        repr_layers: tuple[int, ...] | list[int] = (),
        return_logits: bool = False,
        check_layers: bool = False,
    ) -> dict:
        """Packed forward pass. batch on the model's device.

        Returns {"representations": {layer: [T, D]}, "logits": [T, 33] (if return_logits)} in
        packed layout, with fair-esm's layer numbering (0 = embeddings after token dropout,
        num_layers = after the final LayerNorm). Output is always checked for NaN/Inf
        (NumericalError); check_layers=True checks after every layer too. `forward_impl` picks
        eager or compiled layer math; both give the same results up to rounding.

        A batch over `micro_batch_tokens` runs as consecutive pieces of whole sequences
        (packing.split_batch) whose outputs are written into [T, ...] buffers: activation memory
        is then one piece's, whatever T (sequences never interact, so the result is the same up
        to GEMM rounding)."""
        repr_layers = set(repr_layers)
        bad = [r for r in repr_layers if not 0 <= r <= self.num_layers]
        if bad:
            raise ValueError(f"repr_layers {bad} out of range 0..{self.num_layers}")
        limit = self.micro_batch_tokens
        if limit is None or batch.num_tokens <= limit:
            return self._forward_piece(batch, repr_layers, return_logits, check_layers)
        reps: dict[int, torch.Tensor] = {}
        outputs: dict[str, dict | torch.Tensor] = {"representations": reps}
        t = batch.num_tokens
        for start, piece in split_batch(batch, limit):
            # A replayed piece's outputs are copied out right here, so the graph's own are enough.
            result = self._forward_piece(piece, repr_layers, return_logits, check_layers, clone=False)
            stop = start + piece.num_tokens
            for layer, rep in result["representations"].items():
                if layer not in reps:
                    reps[layer] = rep.new_empty((t, rep.shape[1]))
                reps[layer][start:stop].copy_(rep)
            if return_logits:
                if "logits" not in outputs:
                    outputs["logits"] = result["logits"].new_empty((t, result["logits"].shape[1]))
                outputs["logits"][start:stop].copy_(result["logits"])
            del result  # the piece's activations are free before the next piece runs
        return outputs

    def _forward_piece(self, batch: PackedBatch, repr_layers: set[int], return_logits: bool,
                       check_layers: bool, clone: bool = True) -> dict:
        """`forward_packed` of one batch in one pass (no splitting), through a CUDA graph where
        `cuda_graphs` is on (not with check_layers, whose per-layer checks sync with the host).
        clone=False: a replay returns the graph's own output tensors (GraphCache.run)."""
        cache = self._graph_cache
        if cache is None or check_layers or torch.is_grad_enabled() or batch.device.type != "cuda":
            return self._forward_layers(batch, repr_layers, return_logits, check_layers)
        key = (batch.num_tokens, batch.num_sequences, batch.max_seqlen, tuple(sorted(repr_layers)), return_logits,
               self.dtype, self.forward_impl, self.compile_mode, self.attention_backend, self.gemm_backend,
               self.norm_backend, self._fused_qkv_version())  # q/k/v re-fused: new weights, new graphs
        wanted = repr_layers | {self.num_layers}  # the final output, for the check after replay
        result = cache.run(key, batch, lambda b: self._forward_layers(b, wanted, return_logits, False, False), clone)
        result = {**result, "representations": dict(result["representations"])}  # never edit the graph's dict
        reps = result["representations"]
        self._check_output(result, reps[self.num_layers], batch)
        if self.num_layers not in repr_layers:
            del reps[self.num_layers]
        return result

    @staticmethod
    def _check_output(result: dict, final: torch.Tensor, batch: PackedBatch) -> None:
        """NaN/Inf check of a pass's output: the logits if asked for, else the final LayerNorm's."""
        if "logits" in result:
            check_finite(result["logits"], "lm_head (logits)", batch)
        else:
            check_finite(final, "final layer norm", batch)

    def _forward_layers(self, batch: PackedBatch, repr_layers: set[int], return_logits: bool,
                        check_layers: bool, check_output: bool = True) -> dict:
        """The layers of one pass. check_output=False leaves out the final NaN/Inf check (a host
        sync, which a CUDA graph capture cannot hold)."""
        if self.forward_impl == "compiled":
            with compile_limit():
                return self._run_layers(batch, repr_layers, return_logits, check_layers, check_output)
        return self._run_layers(batch, repr_layers, return_logits, check_layers, check_output)

    def _run_layers(self, batch: PackedBatch, repr_layers: set[int], return_logits: bool, check_layers: bool,
                    check_output: bool) -> dict:
        pre, post, boundary = self._layer_functions()
        qkv = self._qkv_weights()
        x = self._embed_packed(batch)
        reps: dict[int, torch.Tensor] = {}
        if 0 in repr_layers:
            reps[0] = x
        rotary = self._rotary_operands(batch.positions)
        layers = self.layers
        q, k, v = pre(x, *self._input_weights(layers[0], qkv[0]), self.head_dim, rotary)
        for i, layer in enumerate(layers):
            o = varlen_attention(self.attention_backend, q, k, v, batch.cu_seqlens, batch.max_seqlen,
                                 layer.self_attn.scaling)
            del q, k, v  # the QKV buffers die here, before the MLP allocates
            if i + 1 < len(layers):
                x, q, k, v = boundary(x, o, *self._output_weights(layer),
                                      *self._input_weights(layers[i + 1], qkv[i + 1]), self.head_dim, rotary)
            else:
                x = post(x, o, *self._output_weights(layer))
            del o
            if check_layers:
                check_finite(x, f"layer {i + 1}", batch)
            if i + 1 in repr_layers and i + 1 != self.num_layers:
                reps[i + 1] = x
        x = self.emb_layer_norm_after(x)
        if self.num_layers in repr_layers:
            reps[self.num_layers] = x
        result: dict = {"representations": reps}
        if return_logits:
            result["logits"] = self.lm_head(x)
        if check_output:
            self._check_output(result, x, batch)
        return result


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def find_checkpoint(name: str) -> Path | None:
    """A real checkpoint for a released name on disk: $ESMFLASH_WEIGHTS/<name>.pt first, then the
    torch hub cache (<hub>/checkpoints/<name>.pt, where fair-esm downloads). Never downloads."""
    dirs = [d for d in os.environ.get("ESMFLASH_WEIGHTS", "").split(os.pathsep) if d]
    dirs.append(os.path.join(torch.hub.get_dir(), "checkpoints"))
    for d in dirs:
        p = Path(d) / f"{name}.pt"
        if p.is_file():
            return p
    return None


def _strip_prefixes(state: dict) -> dict:
    pattern = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")
    return {pattern.sub("", k): v for k, v in state.items()}


def _build(layers: int, dim: int, heads: int, token_dropout: bool, device: torch.device) -> PackedESM2:
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    with torch.device(device):
        return PackedESM2(num_layers=layers, embed_dim=dim, attention_heads=heads, alphabet=alphabet, token_dropout=token_dropout)


def _load_checkpoint(path: Path, device: torch.device) -> PackedESM2:
    # fair-esm checkpoints pickle an argparse Namespace: weights_only=False is required (trusted file).
    data = torch.load(str(path), map_location="cpu", weights_only=False)
    if not isinstance(data, dict) or "cfg" not in data or "model" not in data:
        raise ValueError(f"{path}: not a fair-esm checkpoint (expected keys 'cfg' and 'model')")
    cfg = data["cfg"]["model"]
    if isinstance(cfg, dict):
        cfg = Namespace(**cfg)
    state = _strip_prefixes(data["model"])
    regression = Path(str(path.with_suffix("")) + "-contact-regression.pt")
    if regression.is_file():
        state.update(torch.load(str(regression), map_location="cpu", weights_only=False)["model"])
    model = _build(cfg.encoder_layers, cfg.encoder_embed_dim, cfg.encoder_attention_heads,
                   getattr(cfg, "token_dropout", True), device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"contact_head.regression.weight", "contact_head.regression.bias"}
    missing = [k for k in missing if k not in allowed_missing and not k.endswith("rot_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"{path}: state dict does not match ESM-2 (missing {missing}, unexpected {unexpected})")
    return model


def load_esm2_model(
    name_or_path: str | os.PathLike,
    *,
    precision: str = "fp16",
    device: str | torch.device | None = None,
    attention: str = "auto",
    seed: int = 0,
    compile: bool | None = None,
    gemm: str = "auto",
    norm: str = "auto",
    cuda_graphs: bool | None = None,
    micro_batch_tokens: int | None = DEFAULT_MICRO_BATCH_TOKENS,
) -> tuple[PackedESM2, esm.data.Alphabet]:
    """Load an ESM-2 model for packed inference: (model, alphabet), like fair-esm's loaders.

    name_or_path: a released name (esm2_t6_8M_UR50D ... esm2_t48_15B_UR50D) or a fair-esm
    checkpoint file. A name loads the real checkpoint when `find_checkpoint` finds one; otherwise
    the exact architecture is built with seeded random weights (a warning is logged). Nothing is
    downloaded. `model.weights_source` says which happened. Random weights depend on `seed` and on
    the device type they are drawn on (CPU and CUDA generators differ).
    precision: "fp32", "fp16" or "bf16". attention: "auto" or a backend (see esmflash.attention).
    compile: run the layers through torch.compile (`PackedESM2.set_compile`; `model.forward_impl`
    records the choice). None (default): compiled on CUDA, eager elsewhere; False forces eager.
    gemm: "auto", "cublas" or "quack": how fc1 + GELU and QKV + rotary run
    (`PackedESM2.set_gemm_backend`; auto picks quack's epilogue GEMMs on 9.x GPUs in fp16/bf16 where quack-kernels is installed).
    norm: "auto", "torch" or "triton": how the residual adds + LayerNorms run
    (`PackedESM2.set_norm_backend`; auto picks "triton", esmflash's kernels, for fp16/bf16 on CUDA
    and "torch" elsewhere).
    cuda_graphs: replay repeated batch shapes as CUDA graphs (`PackedESM2.set_cuda_graphs`);
    None (default): on for CUDA. micro_batch_tokens: the most tokens one pass runs; larger
    batches run as pieces of whole sequences (`PackedESM2.set_micro_batch_tokens`; default
    DEFAULT_MICRO_BATCH_TOKENS; None or 0: never).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    device = torch.device(device) if device is not None else _default_device()
    name = str(name_or_path)
    if name in ESM2_ARCHITECTURES:
        path = find_checkpoint(name)
    else:
        path = Path(name)
        if not path.is_file():
            raise ValueError(
                f"{name!r} is neither a released ESM-2 name ({', '.join(ESM2_ARCHITECTURES)}) nor a checkpoint file"
            )
    if path is not None:
        model = _load_checkpoint(path, device)
        model.weights_source = f"checkpoint:{path}"
    else:
        torch.manual_seed(seed)
        model = _build(*ESM2_ARCHITECTURES[name], True, device)
        model.weights_source = f"random-init:seed={seed}"
        log.warning("%s: no checkpoint found on disk; using seeded random weights (seed=%d)", name, seed)
    model.model_name = path.stem if name not in ESM2_ARCHITECTURES else name
    model = model.to(dtype=PRECISIONS[precision]).eval().requires_grad_(False)  # .to() fuses q/k/v
    model.precision = precision
    model.set_attention_backend(attention)
    model.set_gemm_backend(gemm)
    model.set_norm_backend(norm)
    model.set_compile(compile)
    model.set_cuda_graphs(cuda_graphs)
    model.set_micro_batch_tokens(micro_batch_tokens)
    return model, model.alphabet


def cast_model(
    model: PackedESM2, precision: str, attention: str = "auto", *, compile: bool | None = None,
    gemm: str = "auto", norm: str = "auto",
) -> PackedESM2:
    """A copy of `model` with the same weights in another precision (for fp32-reference checks).
    attention, gemm, norm: the copy's backends ("auto" resolves for the new dtype). compile: the copy's
    `set_compile` choice (None keeps the model's)."""
    import copy

    other = copy.deepcopy(model).to(dtype=PRECISIONS[precision])  # .to() re-fuses q/k/v
    other.precision = precision
    other.set_attention_backend(attention)
    other.set_gemm_backend(gemm)
    other.set_norm_backend(norm)
    if compile is not None:
        other.set_compile(compile, model.compile_mode if compile else None)
    return other
