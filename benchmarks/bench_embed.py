"""The real job: `esmflash embed` on a generated mixed FASTA in a fresh process, beside a plain
Hugging Face transformers script doing the same job, measured once per run by the module-level
setup_cache (benchmarks/embed_job.py says how). The suite's headline numbers; the forward
benchmarks are the kernel view."""

from asv_runner.benchmarks.mark import skip_for_params

from . import config, embed_job
from .base import CachedRow
from .helpers import about

GRID = (config.ALL_MODELS, config.PRECISIONS)
MEASURED = config.skip_list(*GRID, keep=lambda m, p: config.runs_here(m, p) and (m, p) in config.EMBED_MEASURED[config.TIER])


def setup_cache():
    return embed_job.measure_embed()


setup_cache.timeout = 3600


class EmbedFasta(CachedRow):
    """`esmflash embed FASTA -o OUT.h5 --model M` (the engine's defaults, weights from a fair-esm
    file) in a fresh process on config.EMBED_TOKENS tokens of mixed lengths (log-normal, median
    300 aa, 30..1022), against `python3 esmflash/bench/hf_embed.py --checkpoint` (EsmModel SDPA from
    an HF folder of the same weights, same precision, length-sorted padded batches of the same
    --max-tokens) on the same FASTA; GPU: fp16 (config.EMBED_MEASURED)."""

    params = GRID
    param_names = ["model", "precision"]
    version = config.EMBED_VERSION

    @about("embed job: tokens/s of the embedding phase (after the first batch; the CLI's --stats-json)", "tokens/s")
    @skip_for_params(MEASURED)
    def track_tokens_per_second(self, cache, model, precision):
        return self.row["embedding_tokens_per_second"]

    @about("embed job: seconds from process start to the first batch done (imports, loading the checkpoint, compile)", "s")
    @skip_for_params(MEASURED)
    def track_seconds_to_first_batch(self, cache, model, precision):
        return self.row["seconds_to_first_batch"]

    @about("embed job: seconds from process start to the model loaded (interpreter, imports, checkpoint)", "s")
    @skip_for_params(MEASURED)
    def track_seconds_to_model(self, cache, model, precision):
        return self.row["seconds_to_model"]

    @about("embed job: seconds the CLI spent in torch.compile (on-disk caches as the machine had them)", "s")
    @skip_for_params(MEASURED)
    def track_seconds_compiling(self, cache, model, precision):
        return self.row["seconds_compiling"]

    @about("embed job: peak host RSS of the CLI process", "bytes")
    @skip_for_params(MEASURED)
    def track_peak_host_rss(self, cache, model, precision):
        return self.row["peak_rss_bytes"]

    @about("embed job: embedding-phase tokens/s over the repeated-batch forward tokens/s", "x")
    @skip_for_params(MEASURED)
    def track_fraction_of_forward(self, cache, model, precision):
        return self.row["embedding_tokens_per_second"] / self.row["forward_tokens_per_second"]

    @about("embed job: HF script wall seconds over the CLI's (whole processes, same FASTA)", "x")
    @skip_for_params(MEASURED)
    def track_speedup_over_hf_wall(self, cache, model, precision):
        return self.row["hf_wall_seconds"] / self.row["cli_wall_seconds"]

    @about("embed job: the HF script's tokens/s by the wall clock of its whole process", "tokens/s")
    @skip_for_params(MEASURED)
    def track_hf_wall_tokens_per_second(self, cache, model, precision):
        return self.row["fasta_tokens"] / self.row["hf_wall_seconds"]

    @about("embed job: wall seconds of the whole CLI process", "s")
    @skip_for_params(MEASURED)
    def track_wall_seconds(self, cache, model, precision):
        return self.row["cli_wall_seconds"]
