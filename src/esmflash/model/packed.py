"""ESM-2 with a packed (unpadded) forward pass.

`PackedESM2` subclasses fair-esm's `esm.model.esm2.ESM2`: the stock padded `forward` is untouched
and shares every weight with `forward_packed`, which runs a flat [T] token vector through a
varlen attention kernel (esmflash.model.runner). What runs is the model's `engine`
(esmflash.config.EngineConfig, resolved for its device and dtype); `configure` changes it.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from esm.model.esm2 import ESM2

from ..batch import PackedBatch
from ..config import EngineConfig
from ..errors import BackendUnavailableError
from ..kernels import GEMM
from .qkv import QKVStore
from .runner import PassRequest, Runner

log = logging.getLogger(__name__)
MASK_RATIO_TRAIN = 0.15 * 0.8  # token dropout: fraction of tokens replaced by <mask> in training


class PackedESM2(ESM2):
    """fair-esm ESM2 plus `forward_packed`. Set by the loader (esmflash.model.loading):
    model_name, weights_source ("checkpoint:<path>", "hf:<folder>" or "random-init:seed=N"),
    precision. `engine` is the resolved EngineConfig in use, `engine_request` what was asked
    for (resolved again when the model moves to another device or dtype)."""

    model_name: str = "esm2"
    weights_source: str = "unknown"
    precision: str = "fp32"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.qkv = QKVStore()
        self.engine_request = EngineConfig.preset("auto")
        self.engine = EngineConfig.preset("auto").resolve("cpu", torch.float32)
        self.runner = Runner(False)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.attention_heads

    # Read-only views of the engine, under the names results and tests know.
    attention_backend = property(lambda self: self.engine.attention)
    gemm_backend = property(lambda self: self.engine.gemm)
    norm_backend = property(lambda self: self.engine.norm)
    forward_impl = property(lambda self: "compiled" if self.engine.compile else "eager")
    cuda_graphs = property(lambda self: self.engine.cuda_graphs)
    micro_batch_tokens = property(lambda self: self.engine.micro_batch_tokens)

    def configure(self, engine: EngineConfig | str | dict | None = None, **fields: Any) -> EngineConfig:
        """Run with `engine` (an EngineConfig, a preset name or a dict of fields over "auto";
        None: the current request) with `fields` replaced, resolved for this model's device and
        dtype. Returns the resolved config; BackendUnavailableError when a backend cannot run."""
        request = EngineConfig.of(engine if engine is not None else self.engine_request).replace(**fields)
        resolved = request.resolve(self.device, self.dtype)
        max_graphs = self.runner.graphs.max_graphs if self.runner.graphs is not None else 8
        self.engine_request, self.engine = request, resolved
        self.runner = Runner(resolved.cuda_graphs, max_graphs)
        if GEMM[resolved.gemm].interleaved:
            self.qkv_weights()  # lay the interleaved copies out before any pass
        return resolved

    def set_max_graphs(self, max_graphs: int) -> None:
        """Keep up to `max_graphs` captured batch shapes (CUDA graphs on)."""
        self.runner = Runner(self.engine.cuda_graphs, max_graphs)

    # ------------------------------------------------------------------ fused QKV weights

    def prepare_packed(self) -> None:
        """Lay every layer's q/k/v out fused (esmflash.model.qkv). Runs after every .to()/.half();
        call it after editing q/k/v through `.data`, which leaves no trace."""
        self.qkv.clear()
        self.qkv.prepare(self.layers)

    def qkv_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (QKV weight [3D, D], bias [3D]) as the engine's GEMM backend reads them."""
        return self.qkv.weights(self.layers, self.engine.gemm, self.head_dim)

    def qkv_version(self) -> int:
        """Changes whenever the QKV weights got new addresses (captured graphs must not replay)."""
        self.qkv_weights()
        return self.qkv.version

    def _apply(self, fn, recurse=True):
        # .to()/.half()/.cuda() give every parameter its own new tensor: lay q/k/v out fused again
        # and resolve the engine again for the new device and dtype.
        result = super()._apply(fn, recurse)
        if "layers" in self._modules and hasattr(self, "qkv"):
            self.prepare_packed()
            try:
                self.configure()
            except (BackendUnavailableError, ValueError) as e:  # e.g. a CUDA-only request moved to the CPU
                log.info("engine %s cannot run on %s %s (%s); running 'auto'", self.engine_request, self.device,
                         self.dtype, e)
                self.configure("auto")
        return result

    def __getstate__(self):
        # Derived copies are rebuilt on demand (pickling them would duplicate q/k/v memory) and
        # graphs cannot be copied: the copy captures its own.
        state = dict(super().__getstate__())  # a copy: never edit the live __dict__
        state["qkv"] = QKVStore()
        if state.get("runner") is not None:
            state["runner"] = Runner(self.engine.cuda_graphs, self.runner.graphs.max_graphs if self.runner.graphs else 8)
        return state

    # ------------------------------------------------------------------ packed forward

    def embed_packed(self, batch: PackedBatch) -> torch.Tensor:
        """Token embeddings [T, D] with fair-esm's token dropout applied per sequence."""
        tokens = batch.input_ids
        x = self.embed_scale * self.embed_tokens(tokens)  # [T, D]
        if self.token_dropout:
            is_mask = tokens == self.mask_idx
            x = x.masked_fill(is_mask[:, None], 0.0)
            n_mask = torch.zeros(batch.num_rows, dtype=torch.float32, device=x.device)
            n_mask.index_add_(0, batch.seq_index, is_mask.to(torch.float32))
            n_tok = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).to(torch.float32)
            scale = (1 - MASK_RATIO_TRAIN) / (1 - n_mask / n_tok)  # [R] fp32 (inf/nan on empty rows, never read)
            x = x * scale[batch.seq_index][:, None].to(x.dtype)
        return x

    def _layers_checked(self, repr_layers: Sequence[int]) -> tuple[int, ...]:
        layers = tuple(sorted(set(repr_layers)))
        bad = [r for r in layers if not 0 <= r <= self.num_layers]
        if bad:
            raise ValueError(f"repr_layers {bad} out of range 0..{self.num_layers}")
        return layers

    def forward_packed(self, batch: PackedBatch, repr_layers: Sequence[int] = (), return_logits: bool = False,
                       check_layers: bool = False) -> dict:
        """Packed forward pass of a batch on the model's device -> {"representations": {layer:
        [T, D]}, "logits": [T, 33] (if return_logits)} in packed layout, fair-esm's layer
        numbering (0 = embeddings after token dropout, num_layers = after the final LayerNorm).
        The output is checked for NaN/Inf (NumericalError naming the sequences); check_layers=True
        checks after every layer too."""
        request = PassRequest(self._layers_checked(repr_layers), logits=return_logits)
        return self.runner.run(self, batch, request, check_layers)

    def pooled_packed(self, batch: PackedBatch, repr_layers: Sequence[int], bos: bool = False,
                      tokens: bool = False, clone: bool = True) -> dict:
        """Per-row outputs of a packed pass, computed on the device with no host sync:
        {"mean": {layer: [R, D] fp32}, "bos": {layer: [R, D] fp32} (bos), "finite": [R] bool,
        "representations": {layer: [T, D]} (tokens)} for the R rows of `batch` (sequences, then
        padding rows). The caller checks "finite" (esmflash.model.runner)."""
        request = PassRequest(self._layers_checked(repr_layers), tokens=tokens, pool=True, bos=bos)
        return self.runner.run(self, batch, request, clone=clone)
