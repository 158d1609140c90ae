"""The packed forward pass's runner: the layer loop, micro-batches and CUDA graphs.

`Runner.run(model, batch, request)` runs one packed batch through a `PackedESM2` and returns what
the `PassRequest` asks for:

  "representations"  {layer: [T, D]}  per-token outputs (request.tokens)
  "logits"           [T, V]           LM head (request.logits)
  "mean"             {layer: [R, D]}  fp32 mean over each row's residues (request.pool)
  "bos"              {layer: [R, D]}  fp32 row of each row's [cls] token (request.pool and .bos)
  "finite"           [R] bool         every pooled value of the row is finite (request.pool)

with fair-esm's layer numbering (0 = embeddings after token dropout, L = after the final
LayerNorm) and R rows of the batch (its sequences, then any padding rows). A batch over the
engine's micro_batch_tokens runs as consecutive pieces of whole sequences whose outputs are
joined (sequences never interact, so the result is the same up to GEMM rounding). With the
engine's cuda_graphs on, a shape seen a second time is captured and later passes replay it
(esmflash.model.graphs). Pooled passes leave the NaN/Inf check to the caller ("finite"), so no
pass syncs with the host; the others check the final output (or the logits) on the host and
raise NumericalError naming the sequences.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..batch import PackedBatch, split_batch
from ..kernels import ATTENTION, GEMM, LayerNormWeights
from .graphs import GraphCache
from .layers import InputWeights, OutputWeights, compile_limit, layer_functions
from .pooling import check_finite, first_token_rows, mean_over_residues, residue_weights, rows_finite


class PassRequest(NamedTuple):
    """What one packed pass returns (module docstring). repr_layers: sorted layer numbers."""

    repr_layers: tuple[int, ...]
    logits: bool = False
    tokens: bool = True
    pool: bool = False
    bos: bool = False


def _ln(module) -> LayerNormWeights:
    return LayerNormWeights(module.weight, module.bias, module.eps)


def layer_weights(model, qkv: list) -> tuple[list[InputWeights], list[OutputWeights]]:
    """Per layer of `model` its InputWeights (with `qkv`'s (weight, bias)) and OutputWeights."""
    inputs, outputs = [], []
    for layer, (w, b) in zip(model.layers, qkv):
        inputs.append(InputWeights(_ln(layer.self_attn_layer_norm), w, b))
        out = layer.self_attn.out_proj
        outputs.append(OutputWeights(out.weight, out.bias, _ln(layer.final_layer_norm), layer.fc1.weight,
                                     layer.fc1.bias, layer.fc2.weight, layer.fc2.bias))
    return inputs, outputs


class Runner:
    """Runs packed passes of one model; holds its CUDA graphs (`graphs`, None when off)."""

    def __init__(self, cuda_graphs: bool = False, max_graphs: int = 8):
        self.graphs = GraphCache(max_graphs) if cuda_graphs else None

    def run(self, model, batch: PackedBatch, request: PassRequest, check_layers: bool = False,
            clone: bool = True) -> dict:
        """One batch (on the model's device) through every layer; module docstring. clone=False:
        a replayed pass may return the graph's own output tensors, which the next replay of any
        graph of this runner overwrites (for a caller that copies them out at once)."""
        limit = model.engine.micro_batch_tokens
        if limit is None or batch.num_tokens <= limit:
            return self._piece(model, batch, request, check_layers, clone)
        joined: dict = {}
        for start, piece in split_batch(batch, limit, "micro_batch_tokens"):
            # Copied out before the next piece runs, so a replay's own output tensors are enough.
            out = self._piece(model, piece, request, check_layers, clone=False)
            _add_piece(joined, out, start, piece.num_tokens, batch.num_tokens)
        return _joined(joined)

    def _piece(self, model, batch: PackedBatch, request: PassRequest, check_layers: bool, clone: bool) -> dict:
        """One pass, through a CUDA graph where possible (never with per-layer checks, whose host
        syncs a capture cannot hold)."""
        graphs = self.graphs
        if graphs is None or check_layers or torch.is_grad_enabled() or batch.device.type != "cuda":
            return self._layers(model, batch, request, check_layers, check_output=not request.pool)
        if request.pool:  # a stream of batches: capture a new shape at once once its kernels ran
            warm = (request, model.engine, model.dtype, batch.max_seqlen, model.qkv_version())
            key = (batch.num_tokens, batch.num_rows, *warm)
            return graphs.run(key, batch, lambda b: self._layers(model, b, request, False, False), clone, warm)
        final = model.num_layers
        wanted = request._replace(repr_layers=tuple(sorted({*request.repr_layers, final})), tokens=True)
        key = (batch.num_tokens, batch.num_rows, batch.max_seqlen, wanted, model.engine, model.dtype,
               model.qkv_version())
        result = graphs.run(key, batch, lambda b: self._layers(model, b, wanted, False, False), clone)
        result = {**result, "representations": dict(result["representations"])}  # never edit the graph's dict
        _check_output(result, result["representations"][final], batch)
        if final not in request.repr_layers:
            del result["representations"][final]
        return result

    def _layers(self, model, batch: PackedBatch, request: PassRequest, check_layers: bool,
                check_output: bool) -> dict:
        if model.engine.compile:
            with compile_limit():
                return self._layer_loop(model, batch, request, check_layers, check_output)
        return self._layer_loop(model, batch, request, check_layers, check_output)

    def _layer_loop(self, model, batch: PackedBatch, request: PassRequest, check_layers: bool,
                    check_output: bool) -> dict:
        engine, dh, wanted = model.engine, model.head_dim, set(request.repr_layers)
        fns = layer_functions(engine.compile, engine.compile_mode, engine.gemm, engine.norm)
        inputs, outputs = layer_weights(model, model.qkv_weights())
        attention = ATTENTION[engine.attention]
        table = model.qkv.rotary_table(engine.gemm, dh, model.embed_dim, model.device)
        rotary = GEMM[engine.gemm].rotary_operands(batch.positions, dh, table)
        x = model.embed_packed(batch)
        reps = {0: x} if 0 in wanted else {}
        q, k, v = fns.first(x, inputs[0], dh, rotary)
        last = len(model.layers) - 1
        for i, layer in enumerate(model.layers):
            o = attention.forward(q, k, v, batch.cu_seqlens, batch.max_seqlen, layer.self_attn.scaling)
            del q, k, v  # the QKV buffers die here, before the MLP allocates
            if i < last:
                x, q, k, v = fns.boundary(x, o, outputs[i], inputs[i + 1], dh, rotary)
            else:
                x = fns.last(x, o, outputs[i])
            del o
            if check_layers:
                check_finite(x, f"layer {i + 1}", batch)
            if i + 1 in wanted and i != last:
                reps[i + 1] = x
        x = model.emb_layer_norm_after(x)
        if model.num_layers in wanted:
            reps[model.num_layers] = x
        result = _outputs(model, batch, request, reps, x)
        if check_output:
            _check_output(result, x, batch)
        return result


def _outputs(model, batch: PackedBatch, request: PassRequest, reps: dict, final: torch.Tensor) -> dict:
    result: dict = {}
    if request.tokens:
        result["representations"] = reps
    if request.logits:
        result["logits"] = model.lm_head(final)
    if request.pool:
        weights = residue_weights(batch)
        result["mean"] = {l: mean_over_residues(reps[l], batch, weights) for l in request.repr_layers}
        if request.bos:
            result["bos"] = {l: first_token_rows(reps[l], batch) for l in request.repr_layers}
        result["finite"] = rows_finite(*result["mean"].values(), *result.get("bos", {}).values())
    return result


def _check_output(result: dict, final: torch.Tensor, batch: PackedBatch) -> None:
    """NaN/Inf check of a pass's output: the logits if asked for, else the final LayerNorm's."""
    if "logits" in result:
        check_finite(result["logits"], "lm_head (logits)", batch)
    else:
        check_finite(final, "final layer norm", batch)


def _add_piece(joined: dict, out: dict, start: int, count: int, num_tokens: int) -> None:
    """Add one piece's outputs: per-token tensors written into [T, ...] buffers at `start`,
    per-row tensors copied into lists (joined in order by `_joined`)."""
    for name, value in out.items():
        if name in ("representations", "logits"):
            items, holder = (value.items(), joined.setdefault(name, {})) if isinstance(value, dict) else \
                ([(name, value)], joined)
            for key, t in items:
                if key not in holder:
                    holder[key] = t.new_empty((num_tokens, *t.shape[1:]))
                holder[key][start:start + count].copy_(t)
        elif isinstance(value, dict):
            for layer, rows in value.items():
                joined.setdefault(name, {}).setdefault(layer, []).append(rows.clone())
        else:
            joined.setdefault(name, []).append(value.clone())


def _joined(joined: dict) -> dict:
    """`_add_piece`'s lists of per-row tensors concatenated."""
    for name, value in joined.items():
        if isinstance(value, list):
            joined[name] = torch.cat(value)
        elif isinstance(value, dict) and name != "representations":
            joined[name] = {layer: torch.cat(rows) for layer, rows in value.items()}
    return joined
