"""Rotary position embedding of ESM-2 on packed tokens, in fp32 whatever the model dtype.

ESM-2 rotates the two halves of each head of q and k: element j with element j + Dh/2, by the
angle position * inv_freq[j], positions restarting at 0 in every sequence. fair-esm casts its
inv_freq with the model (.half()), so its half-precision models build the angles in half
precision; here the tables are always fp32 and q/k are rounded once after rotation.

quack's rotary GEMM epilogue (esmflash.kernels.gemm) rotates adjacent column pairs (2j, 2j+1)
instead. Reordering the rows of each head's q and k projections to [0, Dh/2, 1, Dh/2 + 1, ...]
(`interleave_rotary_rows`) turns one into the other, and attention does not see the order: q . k
sums over the same products and v keeps its order.
"""

from __future__ import annotations

import torch


def rotary_inv_freq(head_dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """ESM-2's rotary frequencies 10000^(-2i/Dh), i < Dh/2: [Dh/2] fp32, computed as fair-esm
    computes them (in fp32)."""
    exponent = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    return 1.0 / (10000**exponent)


def rotary_half_tables(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, Dh/2] fp32 of the angles position * inv_freq[i] for per-token positions [T].
    Both halves of a head rotate by the same angle, so half a table is the whole information."""
    angles = positions.to(torch.float32)[:, None] * rotary_inv_freq(head_dim, positions.device)[None, :]
    return angles.cos(), angles.sin()


def rotate_qk(qk: torch.Tensor, cos_h: torch.Tensor, sin_h: torch.Tensor) -> torch.Tensor:
    """Rotary on q and k together, out of place (the form torch.compile fuses into one kernel):
    qk [T, 2, H, Dh], cos_h/sin_h [T, Dh/2] fp32 -> [T, 2, H, Dh] in qk's dtype.
    Halves [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin], in fp32."""
    half = qk.shape[-1] // 2
    x1, x2 = qk[..., :half].float(), qk[..., half:].float()
    c, s = cos_h[:, None, None, :], sin_h[:, None, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(qk.dtype)


def rotate_qk_(qk: torch.Tensor, cos_h: torch.Tensor, sin_h: torch.Tensor) -> torch.Tensor:
    """`rotate_qk` in place, for the eager path: five elementwise kernels on a view of the QKV
    output instead of two fp32 copies of q and k; fp32 math, one rounding into qk. Out of place
    when autograd records (overwritten inputs cannot be differentiated)."""
    if qk.requires_grad and torch.is_grad_enabled():
        return rotate_qk(qk, cos_h, sin_h)
    half = qk.shape[-1] // 2
    x1, x2 = qk[..., :half], qk[..., half:]
    c, s = cos_h[:, None, None, :], sin_h[:, None, None, :]
    r1 = x1 * c  # fp32
    r2 = x2 * c  # fp32
    r2.addcmul_(x1, s)  # x2 cos + x1 sin, read x1 before it is overwritten
    torch.addcmul(r1, x2, s, value=-1, out=x1)  # x1 cos - x2 sin, rounded once into qk
    x2.copy_(r2)
    return qk


def interleave_rotary_rows(t: torch.Tensor, head_dim: int, rotary_rows: int) -> torch.Tensor:
    """A copy of a QKV weight [3D, D] or bias [3D] whose first `rotary_rows` rows (q and k: 2D)
    are reordered within each head of `head_dim` rows from halves [0 .. Dh/2-1, Dh/2 .. Dh-1] to
    pairs [0, Dh/2, 1, Dh/2+1, ...]; the other rows (v) keep their order. Contiguous."""
    if rotary_rows % head_dim or head_dim % 2:
        raise ValueError(f"rotary_rows ({rotary_rows}) must be whole heads of an even head_dim ({head_dim})")
    rest = t.shape[1:]
    pairs = t[:rotary_rows].reshape(rotary_rows // head_dim, 2, head_dim // 2, *rest).transpose(1, 2)
    return torch.cat((pairs.reshape(rotary_rows, *rest), t[rotary_rows:])).contiguous()


def rotary_turns_table(inv_freq: torch.Tensor, qk_width: int, v_width: int) -> torch.Tensor:
    """The per-column table of quack's rope epilogue for a QKV output of qk_width rotated columns
    (q and k, interleaved as `interleave_rotary_rows` orders them) then v_width unrotated ones:
    [qk_width + v_width] fp32, the float-float split (hi, lo) of inv_freq[j] / 2pi at columns
    (2j, 2j+1) of every head, zeros over v. inv_freq [Dh/2]: ESM-2's fp32 frequencies."""
    from quack.epilogue.rotary import make_interleaved_inv_freq

    return make_interleaved_inv_freq(inv_freq.double(), qk_width, v_width).float()
