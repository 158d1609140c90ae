"""esmflash: ESM-2 inference on packed (unpadded) batches through FlashAttention varlen kernels.

Layers: `kernels` (attention, GEMM and norm backends, one registry each), `model` (the ESM-2
architecture, weights and the packed pass), `pipeline` (FASTA in, embeddings on disk out,
streaming), `bench` (measurement code for the benchmark suite and tools), `cli`.
"""

from .batch import PackedBatch, Segment
from .bench.accuracy import ReferenceComparison, compare_to_reference, relative_errors
from .config import EngineConfig
from .errors import (BackendUnavailableError, CheckpointError, DuplicateIdError, EmptySequenceError, EsmflashError,
                     FastaFormatError, FlashAttentionNotActiveError, InvalidSequenceError, NumericalError,
                     RankFailedError, SequenceTooLongError, TokenBudgetError, WeightsNotFoundError)
from .kernels import BACKENDS, available_backends, resolve_backend
from .bench.verify import verify_flashattention_active
from .model import ESM2_ARCHITECTURES, PRECISIONS, ModelArgs, PackedESM2, cast_model, load_esm2_model
from .model.pooling import segment_mean
from .pipeline.embed import Embeddings, embed
from .pipeline.packing import MAX_RESIDUES, pack_sequences

__version__ = "0.2.0"
__all__ = [name for name in dir() if not name.startswith("_")]
