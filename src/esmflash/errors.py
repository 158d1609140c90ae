"""Typed exceptions. Every message names the sequence, the problem and, where it has one, the
1-based residue position, so a user can find the bad record in a million-line FASTA file."""

from __future__ import annotations


def one_line(error: BaseException, limit: int | None = None) -> str:
    """An error's message on one line (whitespace runs collapsed; its type's name when empty),
    cut to `limit` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


class EsmflashError(ValueError):
    """Base class of every error esmflash raises on bad input or bad configuration."""


class FastaFormatError(EsmflashError):
    """The FASTA text is malformed (text before the first header, empty header, ...)."""


class InvalidSequenceError(EsmflashError):
    """A sequence holds a character that is not in the ESM-2 alphabet."""

    def __init__(self, seq_id: str, char: str, position: int, allowed: str):
        self.seq_id, self.char, self.position = seq_id, char, position
        super().__init__(
            f"sequence {seq_id!r}: invalid character {char!r} at position {position} "
            f"(allowed: {allowed}, lowercase accepted, <mask> for a masked residue)"
        )


class EmptySequenceError(EsmflashError):
    """A sequence has no residues."""

    def __init__(self, seq_id: str):
        self.seq_id = seq_id
        super().__init__(f"sequence {seq_id!r}: empty sequence (no residues)")


class SequenceTooLongError(EsmflashError):
    """A sequence is longer than the model's trained context and the policy is 'error'."""

    def __init__(self, seq_id: str, length: int, limit: int):
        self.seq_id, self.length, self.limit = seq_id, length, limit
        super().__init__(
            f"sequence {seq_id!r}: {length} residues is over the limit of {limit} "
            f"(ESM-2 was trained on crops of {limit}); residues {limit + 1}..{length} do not fit. "
            f"Use long_policy='truncate' or 'chunk' (CLI: --long-policy)"
        )


class DuplicateIdError(EsmflashError):
    """Two records share one id, so their outputs could not be told apart."""

    def __init__(self, seq_id: str, first: int, second: int):
        self.seq_id = seq_id
        super().__init__(
            f"sequence {seq_id!r}: duplicate id (records {first} and {second}, 1-based)"
        )


class TokenBudgetError(EsmflashError):
    """A token limit (max_tokens, or the one named by `limit`) is too small to hold one sequence
    with its BOS/EOS tokens."""

    def __init__(self, seq_id: str, tokens: int, max_tokens: int, limit: str = "max_tokens"):
        self.seq_id = seq_id
        super().__init__(
            f"sequence {seq_id!r}: needs {tokens} tokens (residues + BOS/EOS) but "
            f"{limit} is {max_tokens}; raise {limit} to at least {tokens}"
        )


class BackendUnavailableError(EsmflashError):
    """The requested attention backend cannot run on this device / dtype / installation."""


class RankFailedError(RuntimeError):
    """A rank of a multi-process (torchrun) job failed; names the rank and the work unit."""


class FlashAttentionNotActiveError(RuntimeError):
    """A forward pass that should run FlashAttention kernels ran other kernels instead."""


class NumericalError(RuntimeError):
    """NaN or Inf in the model's activations; names the layer and the sequence ids."""

    def __init__(self, where: str, seq_ids: list[str]):
        self.where, self.seq_ids = where, seq_ids
        shown = ", ".join(repr(s) for s in seq_ids[:10])
        more = f" and {len(seq_ids) - 10} more" if len(seq_ids) > 10 else ""
        super().__init__(f"non-finite values (NaN/Inf) after {where} in sequence(s) {shown}{more}")


class WeightsNotFoundError(EsmflashError):
    """No checkpoint for a model name where esmflash looks, and random weights were not asked for."""


class CheckpointError(EsmflashError):
    """A checkpoint file or folder that cannot be loaded (unreadable, truncated, wrong content)."""
