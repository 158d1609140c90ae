"""Variable-length (packed) self-attention backends, registered in `ATTENTION`.

Every backend takes q, k, v [T, H, Dh] (T packed tokens, H heads, Dh head dim), int32
cu_seqlens [B+1] and the longest sequence as a host int, and returns [T, H, Dh] in q's dtype.
None attends across sequence boundaries and none is causal (ESM-2 is bidirectional). Sequences
of zero tokens (repeated cu_seqlens entries) are allowed: the packed pipeline pads its batches
with them to reuse CUDA graphs.

  "fa4+torch_flash"  per batch: "torch_flash" when every sequence has at most
                     `TORCH_FLASH_MAX_SEQLEN` tokens (one tile of its kernel), else "fa4"
  "fa4"              FlashAttention-4 (flash_attn.cute, when installed; compute capability 9+)
  "flash_attn"       Dao-AILab FlashAttention-2 (flash_attn.flash_attn_varlen_func, when installed)
  "torch_flash"      torch.nn.attention.varlen.varlen_attn (PyTorch's bundled FlashAttention-2)
  "sdpa"             PyTorch's memory-efficient attention kernel (any dtype; the fp32 path on the
                     GPU): on CUDA its varlen form on the packed layout in one launch; on the CPU
                     dense SDPA per sequence

"auto" takes the first of that order that can run here.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .registry import Backend, Registry, cuda_half_reason, has_module

# "fa4+torch_flash" runs PyTorch's flash kernel on batches whose longest sequence has at most this
# many tokens. Head dim 64, sequences of L tokens filling 16k (650M) / 8k (3B) tokens, torch_flash
# time / FA4 time per call: L 52-128: 0.37-0.60 (H200), 0.37-0.66 (H100); L 152: 1.05-1.18 (both;
# two of FA2's 128-row tiles per sequence). docs/performance-log.md has the measurements.
TORCH_FLASH_MAX_SEQLEN = 128


class AttentionBackend(Backend):
    """A varlen attention kernel. `markers`: substrings of its CUDA kernel names that prove it ran
    (esmflash.bench.verify)."""

    markers: tuple[str, ...] = ()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int, scale: float) -> torch.Tensor:
        raise NotImplementedError

    def route(self, max_seqlen: int) -> "AttentionBackend":
        """The backend whose kernel runs a batch whose longest sequence has max_seqlen tokens."""
        return self


class TorchFlash(AttentionBackend):
    name = "torch_flash"
    # torch_flash's and FA4's kernel names tell the two apart (FA4's names also hold "flash_fwd").
    markers = ("pytorch_flash::flash_fwd",)

    def unavailable_reason(self, device, dtype):
        if not has_module("torch.nn.attention.varlen"):
            return "torch.nn.attention.varlen is missing (needs torch >= 2.10)"
        return cuda_half_reason(self.name, device, dtype)

    def forward(self, q, k, v, cu_seqlens, max_seqlen, scale):
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale)


class FlashAttn2(AttentionBackend):
    name = "flash_attn"
    markers = ("flash_fwd",)

    def unavailable_reason(self, device, dtype):
        # flash-attn-4 installs flash_attn/cute alone: the FA2 package is flash_attn_interface
        if not has_module("flash_attn.flash_attn_interface"):
            return "flash-attn (FlashAttention-2) is not installed (pip install 'esmflash[flash]')"
        return cuda_half_reason(self.name, device, dtype)

    def forward(self, q, k, v, cu_seqlens, max_seqlen, scale):
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale)


def parse_fa4_tile(spec: str) -> dict:
    """'128x96' or '128x128:nors:noov' -> FA4 forward keyword arguments: tile_mn (query rows, key
    rows per CTA), mma_pv_is_rs (nors: the PV GEMM reads P from shared memory, not registers),
    intra_wg_overlap (noov: off)."""
    size, *flags = spec.split(":")
    try:
        tile_m, tile_n = (int(n) for n in size.split("x"))
    except ValueError:
        raise ValueError(f"FA4 tile {spec!r}: expected TMxTN[:nors][:noov], e.g. 128x96") from None
    unknown = set(flags) - {"nors", "noov"}
    if unknown:
        raise ValueError(f"FA4 tile {spec!r}: unknown flag(s) {sorted(unknown)}; known: nors, noov")
    return {"tile_mn": (tile_m, tile_n), "mma_pv_is_rs": "nors" not in flags, "intra_wg_overlap": "noov" not in flags}


class FA4(AttentionBackend):
    """FlashAttention-4 with its own tile choice (192 x 128 rows of q x k for head dim <= 64 on
    Hopper), or with `tile` (parse_fa4_tile; the variant "fa4@128x96", for measurements)."""

    name = "fa4"
    markers = ("FlashAttention",)

    def __init__(self, tile: dict | None = None):
        self.tile = tile

    def variant(self, spec: str) -> "FA4":
        return FA4(parse_fa4_tile(spec))

    def unavailable_reason(self, device, dtype):
        if not has_module("flash_attn.cute"):
            return "flash-attn-4 (flash_attn.cute) is not installed (pip install 'esmflash[hopper]')"
        return cuda_half_reason("FlashAttention-4", device, dtype, min_major=9)

    def forward(self, q, k, v, cu_seqlens, max_seqlen, scale):
        # FA4 JIT-compiles each kernel variant per process (seconds) unless its on-disk cache is on
        # (read when flash_attn.cute is first imported): on, unless the user said otherwise.
        os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
        lengths = dict(cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                       max_seqlen_k=max_seqlen, softmax_scale=scale)
        if self.tile and not (torch.is_grad_enabled() and q.requires_grad):
            from flash_attn.cute.interface import _flash_attn_fwd  # the one entry that takes a tile

            return _flash_attn_fwd(q, k, v, **lengths, **self.tile)[0]
        from flash_attn.cute import flash_attn_varlen_func

        out = flash_attn_varlen_func(q, k, v, **lengths)
        return out[0] if isinstance(out, tuple) else out


class FA4WithTorchFlash(AttentionBackend):
    """PyTorch's flash kernel for batches of short sequences, FA4 for the rest: FA4 pays a Hopper
    CTA's set-up per tile and takes 1.5-2.7x longer on batches of sequences <= 128 tokens."""

    name = "fa4+torch_flash"

    def __init__(self, short: AttentionBackend, long: AttentionBackend):
        self.short, self.long = short, long

    def unavailable_reason(self, device, dtype):
        return self.long.unavailable_reason(device, dtype) or self.short.unavailable_reason(device, dtype)

    def route(self, max_seqlen):
        return self.short if max_seqlen <= TORCH_FLASH_MAX_SEQLEN else self.long

    def forward(self, q, k, v, cu_seqlens, max_seqlen, scale):
        return self.route(max_seqlen).forward(q, k, v, cu_seqlens, max_seqlen, scale)


class SDPA(AttentionBackend):
    name = "sdpa"

    def forward(self, q, k, v, cu_seqlens, max_seqlen, scale):
        if not q.is_cuda:  # dense SDPA per sequence (the jagged CPU path is ~20x slower)
            bounds = cu_seqlens.tolist()
            outs = [F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1),
                                                   v[a:b].transpose(0, 1), scale=scale).transpose(0, 1)
                    for a, b in zip(bounds[:-1], bounds[1:])]
            return torch.cat(outs)
        # The varlen kernel that SDPA runs for jagged nested tensors, called on [1, T, H, Dh]
        # directly: the nested-tensor bookkeeping costs milliseconds of host time per call.
        cu = cu_seqlens.to(torch.int32)
        out = torch.ops.aten._efficient_attention_forward(
            q.contiguous()[None], k.contiguous()[None], v.contiguous()[None], None, cu, cu,
            max_seqlen, max_seqlen, 0.0, 0, False, scale=scale)[0]
        return out[0]


ATTENTION: Registry[AttentionBackend] = Registry("attention")
_torch_flash = TorchFlash()
_fa4 = FA4()
ATTENTION.register(FA4WithTorchFlash(_torch_flash, _fa4))
ATTENTION.register(_fa4)
ATTENTION.register(FlashAttn2())
ATTENTION.register(_torch_flash)
ATTENTION.register(SDPA())


def varlen_attention(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: float) -> torch.Tensor:
    """Bidirectional attention within each packed sequence through backend `backend` (a name of
    ATTENTION): [T, H, Dh] -> [T, H, Dh]."""
    return ATTENTION[backend].forward(q, k, v, cu_seqlens, max_seqlen, scale)
