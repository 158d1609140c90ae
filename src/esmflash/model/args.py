"""ESM-2 architectures as data: `ModelArgs` and the released models by name."""

from __future__ import annotations

from dataclasses import dataclass

# name -> (layers, embed_dim, heads), as released by fair-esm (and on the Hugging Face Hub as
# facebook/<name>).
ESM2_ARCHITECTURES: dict[str, tuple[int, int, int]] = {
    "esm2_t6_8M_UR50D": (6, 320, 20),
    "esm2_t12_35M_UR50D": (12, 480, 20),
    "esm2_t30_150M_UR50D": (30, 640, 20),
    "esm2_t33_650M_UR50D": (33, 1280, 20),
    "esm2_t36_3B_UR50D": (36, 2560, 40),
    "esm2_t48_15B_UR50D": (48, 5120, 40),
}
HF_ORGANISATION = "facebook"


def released_name(name: str) -> str | None:
    """The fair-esm name of a released model given as "esm2_t33_650M_UR50D" or
    "facebook/esm2_t33_650M_UR50D", else None."""
    short = name[len(HF_ORGANISATION) + 1:] if name.startswith(HF_ORGANISATION + "/") else name
    return short if short in ESM2_ARCHITECTURES else None


@dataclass(frozen=True)
class ModelArgs:
    """An ESM-2 architecture: layers, width D, heads H (head width D / H), token dropout."""

    num_layers: int
    embed_dim: int
    attention_heads: int
    token_dropout: bool = True

    def __post_init__(self):
        sizes = (self.num_layers, self.embed_dim, self.attention_heads)
        if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes):
            raise ValueError(f"layers, width and heads must be positive ints, got {sizes}")
        if self.embed_dim % self.attention_heads or (self.embed_dim // self.attention_heads) % 2:
            raise ValueError(f"width {self.embed_dim} is not heads ({self.attention_heads}) x an even head width")

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        short = released_name(name)
        if short is None:
            raise ValueError(f"{name!r} is not a released ESM-2 name ({', '.join(ESM2_ARCHITECTURES)})")
        return cls(*ESM2_ARCHITECTURES[short])

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.attention_heads
