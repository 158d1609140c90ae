"""esmflash: ESM-2 inference on packed (unpadded) batches through FlashAttention varlen kernels."""

from .attention import BACKENDS, available_backends, resolve_backend
from .embed import (
    BatchOutput,
    EmbeddingAccumulator,
    Embeddings,
    embed,
    embed_batch,
    embed_batches,
    split_per_sequence,
)
from .errors import (
    BackendUnavailableError,
    DuplicateIdError,
    EmptySequenceError,
    EsmflashError,
    FastaFormatError,
    FlashAttentionNotActiveError,
    InvalidSequenceError,
    NumericalError,
    RankFailedError,
    SequenceTooLongError,
    TokenBudgetError,
)
from .models import ESM2_ARCHITECTURES, PRECISIONS, PackedESM2, cast_model, load_esm2_model
from .numerics import ReferenceComparison, compare_to_reference, relative_errors, segment_mean
from .packing import MAX_RESIDUES, PackedBatch, Segment, pack_sequences
from .verify import verify_flashattention_active

__version__ = "0.1.0"
__all__ = [name for name in dir() if not name.startswith("_")]
