"""The metrics process (bench_metrics.setup_cache): every derived metric of this tier, measured in
one process, one model at a time, in config.METRIC_CLASSES. The result (plain floats, strings and
dicts: track_ processes unpickle it without importing torch) maps keys to rows:

  (model, precision, length)             engine, "bundled" kernel set (fp32 and, on a GPU, fp16/bf16)
  ("hopper", model, precision, length)   engine, "hopper" kernel set (GPU fp16/bf16, where it runs)
  ("stock", model, precision, length)    stock fair-esm ESM2.forward on padded batches, fp32 / fp16
  ("hf", model, precision, length)       transformers EsmModel (SDPA) on padded batches, fp32 / fp16
  ("large_batch", model, precision)      activation bytes per token at one 32k-token batch
  ("conditions", "before"|"after")       esmflash.bench.conditions.snapshot() (GPU)
  "matmul_peak"                          measured fp16 8192^3 rate, MFU denominators (GPU)

A row that could not be measured holds {"error": message} (its tracks fail, naming it) or
{"na": reason} (n/a: the hopper kernels cannot run here). Engine rows: seconds (median of a pass
over the class's token set) and tokens_per_second (real tokens, BOS/EOS included, over it),
max_rel_err_vs_fp32 (half precisions, last-layer representations vs the fp32 row's), on a GPU
mfu_percent (over esmflash.bench.perf.mfu_denominator), mfu_datasheet_percent (over the card's
datasheet dense peak; NaN for a card with no entry), gpu_peak_memory_bytes,
activation_bytes_per_token, and what ran (backends, flash kernels, weights_source). Baseline rows:
seconds and tokens_per_second (the same real tokens over the padded pass); HF rows also
max_rel_err_vs_fp32 (last hidden state vs the esmflash fp32 reference, same weights). Speedups
are ratios of two rows' seconds, taken by the tracks (bench_metrics), so a failed baseline fails
only the ratios that need it.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
import time
import traceback

from . import config, helpers

GPU = config.TIER == "gpu"


@contextlib.contextmanager
def stopwatch(what: str):
    """Appends "<what>\t<seconds>" to the file $ESMFLASH_BENCH_LOG names, if set (where a
    setup_cache's time goes: asv keeps a successful setup_cache's output to itself)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        path = os.environ.get("ESMFLASH_BENCH_LOG")
        if path:
            with open(path, "a") as f:
                f.write(f"{what}\t{time.perf_counter() - start:.1f}\n")


def guarded(out: dict, keys: list, fn, what: str = "") -> None:
    """fn(); on an exception, every key of `keys` not yet in `out` gets {"error": message}."""
    try:
        with stopwatch(what or str(keys[0])):
            fn()
    except Exception as e:  # noqa: BLE001 -- recorded per row and raised again by its tracks
        traceback.print_exc(file=sys.stderr)
        message = f"{type(e).__name__}: {' '.join(str(e).split())[:800]}"
        for key in keys:
            out.setdefault(key, {"error": message})


def median_seconds(fn, samples: int, warmup: int) -> tuple[float, object]:
    from esmflash.bench.perf import median, timed_calls

    for _ in range(warmup):
        fn()
    seconds, result = timed_calls(fn, helpers.device(), samples)
    return median(seconds), result


def samples(table: dict, precision: str) -> int:
    return table[config.TIER]["fp32" if precision == "fp32" else "half"]


def matmul_peak() -> dict:
    import torch
    from esmflash.bench.perf import datasheet_peak_flops, matmul_peak_flops, mfu_denominator

    dev = helpers.device()
    measured = matmul_peak_flops(dev, torch.float16)
    denominator, source = mfu_denominator(dev, measured)
    return {"measured_flops": measured, "mfu_denominator_flops": denominator, "mfu_denominator_source": source,
            "datasheet_flops": datasheet_peak_flops(dev), "device_name": torch.cuda.get_device_name(dev)}


def engine_row(model, batches: list, peak: dict | None, reference=None) -> tuple[dict, list]:
    """One engine row over a token set; returns (row, the first pass's representations)."""
    import torch
    from esmflash.bench.accuracy import relative_errors
    from esmflash.bench.perf import cuda_allocation_peak, forward_flops

    tokens = sum(b.num_tokens for b in batches)
    if GPU:
        reps, activations = cuda_allocation_peak(lambda: helpers.forward(model, batches))
    else:
        reps = helpers.forward(model, batches)
    row = {"attention_backend": model.attention_backend, "gemm_backend": model.gemm_backend,
           "norm_backend": model.norm_backend, "forward_impl": model.forward_impl,
           "weights_source": model.weights_source}
    seconds, _ = median_seconds(lambda: helpers.forward(model, batches), samples(config.ENGINE_SAMPLES, model.precision),
                                warmup=1 if GPU else 0)  # GPU: the CUDA-graph capture
    row.update(seconds=seconds, tokens_per_second=tokens / seconds)
    if GPU:
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        inputs = sum(t.numel() * t.element_size() for b in batches
                     for t in (b.input_ids, b.cu_seqlens, b.positions, b.seq_index))
        row.update(gpu_peak_memory_bytes=float(params + inputs + activations),
                   activation_bytes_per_token=activations / tokens)
        flops = sum(forward_flops(b.lengths, model.num_layers, model.embed_dim) for b in batches) / seconds
        row["mfu_percent"] = 100.0 * flops / peak["mfu_denominator_flops"]
        row["mfu_datasheet_percent"] = 100.0 * flops / peak["datasheet_flops"] if peak["datasheet_flops"] else math.nan
    if reference is not None:
        row["max_rel_err_vs_fp32"] = relative_errors(torch.cat(reps).float(), reference)[0]
    return row, reps


def baseline_row(fn, tokens: int, precision: str, warmup: int) -> tuple[dict, object]:
    seconds, result = median_seconds(fn, samples(config.BASELINE_SAMPLES, precision), warmup)
    return {"seconds": seconds, "tokens_per_second": tokens / seconds}, result


def stock_rows(out: dict, model, precision: str, classes: list[str]) -> None:
    """Stock fair-esm ESM2.forward (the same weights, `model` is a PackedESM2) on padded batches."""
    from esmflash.bench.baseline import padded_batches, stock_forward
    from esmflash.bench.workloads import length_class_records

    budget = config.TOKENS_PER_SET[model.model_name]
    for i, length in enumerate(classes):
        records = length_class_records(length, budget)
        padded = [t.to(model.device) for t in padded_batches(records, model.alphabet, budget)]
        tokens = sum(len(s) + 2 for _, s in records)

        def run():
            stock_forward(model, padded, model.num_layers)
            helpers.synchronize()

        out[("stock", model.model_name, precision, length)], _ = baseline_row(run, tokens, precision, int(i == 0))


def hf_rows(out: dict, ref, precision: str, sets: dict, reference: dict) -> None:
    """transformers EsmModel (SDPA) with ref's weights, in `precision`, on padded batches."""
    from esmflash.bench.accuracy import relative_errors
    from esmflash.bench.hf import hf_batches, hf_forward, hf_model, packed_layout
    from esmflash.bench.workloads import length_class_records
    from esmflash.model import PRECISIONS

    name, budget = ref.model_name, config.TOKENS_PER_SET[ref.model_name]
    model = hf_model(ref.state_dict(), ref.num_layers, ref.embed_dim, ref.attention_heads, ref.device,
                     PRECISIONS[precision], ref.token_dropout)
    for i, (length, packed) in enumerate(sets.items()):
        batches = hf_batches(length_class_records(length, budget), ref.alphabet, budget, ref.device)

        def run():
            outputs = hf_forward(model, batches)
            helpers.synchronize()
            return outputs

        row, outputs = baseline_row(run, sum(b.num_tokens for b in batches), precision, int(i == 0))
        row["max_rel_err_vs_fp32"] = relative_errors(packed_layout(outputs, batches, packed).float(), reference[length])[0]
        out[("hf", name, precision, length)] = row


def free_memory() -> None:
    gc.collect()
    if GPU:
        import torch

        torch.cuda.empty_cache()


def unavailable(kernels: str, precision: str) -> str | None:
    """Why the hopper kernel set cannot run here at `precision` (None: it can). The bundled set
    is never pre-checked: its pins must run on their tier, and a failure there is an error."""
    from esmflash import BackendUnavailableError
    from esmflash.model import PRECISIONS

    if kernels == "bundled":
        return None
    if not GPU:
        return f"the {kernels} kernel set runs on the GPU tier only ({config.TIER} tier)"
    try:
        helpers.engine(kernels, precision).resolve(helpers.device(), PRECISIONS[precision])
    except BackendUnavailableError as e:
        return f"{kernels} kernels cannot run here: {e}"
    return None


def half_rows(out: dict, ref, precision: str, kernels: str, sets: dict, reference: dict, peak: dict) -> None:
    """The engine rows of one (precision, kernel set), on a copy of ref's weights; for the bundled
    set also the 32k-token activation memory and (fp16) stock fair-esm `.half()`."""
    from esmflash import cast_model

    name = ref.model_name
    model = cast_model(ref, precision, engine=helpers.engine(kernels, precision))
    names = helpers.verify_kernels(model)
    for length, batches in sets.items():
        row, _ = engine_row(model, batches, peak, reference[length])
        row["kernels"] = names
        out[(name, precision, length) if kernels == "bundled" else (kernels, name, precision, length)] = row
    helpers.check_graphs(model)
    if kernels == "bundled":
        guarded(out, [("large_batch", name, precision)], lambda: large_batch_row(out, model))
        if precision == "fp16":  # stock `.half()`: the same weights, padded batches
            guarded(out, [("stock", name, "fp16", c) for c in sets], lambda: stock_rows(out, model, "fp16", list(sets)))


def large_batch_row(out: dict, model) -> None:
    """The most any of 3 passes (first, CUDA-graph capture, replay) over one 32k-token "mixed"
    batch allocates above weights and batch, per token (the engine's default micro-batch cap)."""
    from esmflash.bench.perf import cuda_allocation_peak
    from esmflash.bench.workloads import LARGE_BATCH_TOKENS

    big = helpers.token_set(model, "mixed", LARGE_BATCH_TOKENS)
    worst = max(cuda_allocation_peak(lambda: helpers.forward(model, big))[1] for _ in range(3))
    out[("large_batch", model.model_name, model.precision)] = {"activation_bytes_per_token": worst / big[0].num_tokens}


def fp32_rows(out: dict, ref, sets: dict, peak: dict | None) -> dict:
    """The fp32 engine rows; returns {length: the fp32 last-layer representations [T, D]} (the
    reference of every other row)."""
    import torch

    reference = {}
    for length, batches in sets.items():
        row, reps = engine_row(ref, batches, peak)
        reference[length] = torch.cat(reps).float()
        out[(ref.model_name, "fp32", length)] = row
    helpers.check_graphs(ref)
    ref.set_max_graphs(8)  # drop the fp32 graphs (their memory) before the other rows
    return reference


def block_keys(name: str, precision: str, kernels: str, classes: list[str]) -> list:
    if kernels == "hopper":
        return [("hopper", name, precision, c) for c in classes]
    return [(name, precision, c) for c in classes] + [("large_batch", name, precision)] + (
        [("stock", name, "fp16", c) for c in classes] if precision == "fp16" else [])


def model_keys(name: str, classes: list[str]) -> list:
    """Every key the metrics process fills for a model on this tier."""
    keys = [(name, "fp32", c) for c in classes] + [(kind, name, p, c) for kind in ("stock", "hf")
                                                    for p in (["fp32", "fp16"] if GPU else ["fp32"]) for c in classes]
    for precision in (config.HALF_PRECISIONS if GPU else []):
        keys += [k for kernels in config.KERNEL_SETS for k in block_keys(name, precision, kernels, classes)]
    return list(dict.fromkeys(keys))


def measure_model(out: dict, name: str, classes: list[str], peak: dict | None) -> None:
    """Every row of one model: fp32 (the reference), stock fp32, HF, then each half-precision
    kernel set on a copy of the same weights."""
    with stopwatch(f"{name} fp32 load + rows"):
        ref = helpers.load_model(name, "fp32")
        sets = {length: helpers.token_set(ref, length) for length in classes}
        reference = fp32_rows(out, ref, sets, peak)
    guarded(out, [("stock", name, "fp32", c) for c in classes], lambda: stock_rows(out, ref, "fp32", classes))
    for precision in (["fp32", "fp16"] if GPU else ["fp32"]):
        guarded(out, [("hf", name, precision, c) for c in classes],
                lambda: hf_rows(out, ref, precision, sets, reference))
        free_memory()  # the HF model is gone with hf_rows' frame
    for precision in (config.HALF_PRECISIONS if GPU else []):
        for kernels in config.KERNEL_SETS:
            keys, reason = block_keys(name, precision, kernels, classes), unavailable(kernels, precision)
            if reason is not None:
                out.update({k: {"na": reason} for k in keys if k not in out})
            else:
                guarded(out, keys, lambda: half_rows(out, ref, precision, kernels, sets, reference, peak),
                        f"{name} {precision} {kernels}")
                free_memory()  # the model copy is gone with half_rows' frame


def snapshot_into(out: dict, moment: str) -> None:
    from esmflash.bench import conditions

    guarded(out, [("conditions", moment)], lambda: out.update({("conditions", moment): conditions.snapshot()}))


def measure_metrics() -> dict:
    """The whole metrics cache (module docstring)."""
    import torch

    out: dict = {}
    peak = None
    if GPU:
        snapshot_into(out, "before")
        with stopwatch("matmul peak"):
            out["matmul_peak"] = peak = matmul_peak()
    classes = config.METRIC_CLASSES[config.TIER]
    with torch.no_grad():
        for name in config.MODELS_BY_TIER[config.TIER]:
            guarded(out, model_keys(name, classes), lambda: measure_model(out, name, classes, peak), f"{name} in all")
            free_memory()
    if GPU:
        snapshot_into(out, "after")
    return out
