"""One resolve for every kind of kernel (esmflash.kernels.registry.Registry) and one record of every
runtime choice (esmflash.config.EngineConfig), on CPU: "auto" order, names, preference lists,
"name@spec" variants, refusals that say why, presets, validation, and that the resolved config is
what the model runs with, what keys its CUDA graphs and what its outputs' metadata report."""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import pytest
import torch

import esmflash
from esmflash import BackendUnavailableError, EngineConfig, embed
from esmflash.batch import PackedBatch
from esmflash.config import DEFAULT_MICRO_BATCH_TOKENS, PRESETS
from esmflash.kernels import ATTENTION, GEMM, NORM, available_backends, resolve_backend
from esmflash.kernels.attention import TORCH_FLASH_MAX_SEQLEN, parse_fa4_tile
from esmflash.kernels.registry import Backend, Registry
from esmflash.pipeline.embed import model_info
from test_engine import _load

CPU = torch.device("cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_ENGINE = EngineConfig(attention="sdpa", gemm="cublas", norm="torch", compile=False, compile_mode=None,
                          cuda_graphs=False, micro_batch_tokens=DEFAULT_MICRO_BATCH_TOKENS)


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def model8():
    return _load("esm2_t6_8M_UR50D")[0]


# ----------------------------------------------------------------------------- Registry, generic


class Widget(Backend):
    def __init__(self, name: str, reason: str | None = None, auto_dtypes=None):
        self.name, self.reason, self.auto_dtypes = name, reason, auto_dtypes

    def unavailable_reason(self, device, dtype):
        return self.reason


@pytest.fixture
def widgets() -> Registry:
    reg = Registry("widget")
    reg.register(Widget("fast", "fast needs a GPU"))
    reg.register(Widget("half", None, (torch.float16,)))
    reg.register(Widget("slow"))
    return reg


def test_auto_takes_the_first_that_runs_and_may_be_picked_for_the_dtype(widgets):
    assert widgets.names() == ("fast", "half", "slow")
    assert widgets.resolve("auto", CPU, torch.float16) == "half"
    assert widgets.resolve("auto", "cpu", torch.float32) == "slow"  # "half" is not auto's for fp32
    assert widgets.resolve("half", CPU, torch.float32) == "half"  # but runs there when named
    assert widgets.available(CPU, torch.float32) == ["half", "slow"]
    assert widgets.unavailable_reason("fast", CPU, torch.float32) == "fast needs a GPU"
    assert widgets.unavailable_reason("slow", CPU, torch.float32) is None


def test_names_and_preference_lists(widgets):
    assert widgets.resolve("slow", CPU, torch.float32) == "slow"
    assert widgets.resolve(("fast", "half", "slow"), CPU, torch.float32) == "half"
    assert widgets.resolve(["fast", "slow"], CPU, torch.float32) == "slow"
    with pytest.raises(BackendUnavailableError, match=r"^widget backend 'fast' unavailable: fast needs a GPU$"):
        widgets.resolve("fast", CPU, torch.float32)
    with pytest.raises(BackendUnavailableError) as info:  # every reason, each with its name
        widgets.resolve(("fast", "nope"), CPU, torch.float32)
    assert str(info.value).startswith("widget backend 'fast/nope' unavailable: fast: fast needs a GPU; nope: unknown")
    with pytest.raises(BackendUnavailableError, match=r"unknown widget backend 'nope'; choose one of "
                                                      r"\('fast', 'half', 'slow'\) or 'auto'"):
        widgets.resolve("nope", CPU, torch.float32)
    with pytest.raises(BackendUnavailableError, match="unknown widget backend 'nope'"):
        widgets["nope"]
    with pytest.raises(ValueError, match="registered twice"):
        widgets.register(Widget("slow"))


def test_auto_with_nothing_that_runs_says_why_for_each(widgets):
    reg = Registry("widget")
    reg.register(Widget("a", "a is not installed"))
    reg.register(Widget("b", "b needs compute capability 9"))
    with pytest.raises(BackendUnavailableError) as info:
        reg.resolve("auto", CPU, torch.float32)
    assert str(info.value) == ("widget backend 'auto' unavailable: a: a is not installed; "
                               "b: b needs compute capability 9")


def test_variants_of_a_backend_without_any(widgets):
    with pytest.raises(ValueError, match=r"backend 'slow' has no variants \(got slow@x\)"):
        widgets["slow@x"]
    with pytest.raises(BackendUnavailableError, match=r"'slow@x' unavailable: backend 'slow' has no variants"):
        widgets.resolve("slow@x", CPU, torch.float32)


def test_empty_preference_list_says_why():
    with pytest.raises(BackendUnavailableError, match=r"no attention backend given"):
        ATTENTION.resolve((), CPU, torch.float32)


# ----------------------------------------------------------------------------- the three registries


def test_registries_and_their_auto_order_on_cpu():
    assert ATTENTION.names() == ("fa4+torch_flash", "fa4", "flash_attn", "torch_flash", "sdpa") == esmflash.BACKENDS
    assert GEMM.names() == ("quack", "cublas") and NORM.names() == ("triton", "torch")
    for dtype in DTYPES:
        assert ATTENTION.resolve("auto", CPU, dtype) == "sdpa" == resolve_backend("auto", "cpu", dtype)
        assert esmflash.resolve_backend("auto", "cpu", dtype) == "sdpa"
        assert available_backends("cpu", dtype) == ["sdpa"] == ATTENTION.available(CPU, dtype)
        assert GEMM.resolve("auto", CPU, dtype) == "cublas" and GEMM.available(CPU, dtype) == ["cublas"]
        assert NORM.resolve("auto", CPU, dtype) == "torch" and NORM.available(CPU, dtype) == ["torch"]
    # "triton" may run fp32 when named, but auto picks it for fp16/bf16 only (no CUDA call is made)
    if NORM.unavailable_reason("triton", "cuda", torch.float32) is None:
        assert NORM.resolve("triton", "cuda", torch.float32) == "triton"
        assert NORM.resolve("auto", "cuda", torch.float32) == "torch"
        assert NORM.resolve("auto", "cuda", torch.bfloat16) == "triton"


FA4_WHY = r"FlashAttention-4 needs a CUDA device|flash-attn-4 \(flash_attn.cute\) is not installed"


@pytest.mark.parametrize("registry, name, why", [
    (ATTENTION, "fa4", FA4_WHY),
    (ATTENTION, "fa4+torch_flash", FA4_WHY),
    (ATTENTION, "torch_flash", "torch_flash needs a CUDA device"),
    (ATTENTION, "flash_attn", r"flash_attn needs a CUDA device|flash-attn \(FlashAttention-2\) is not installed"),
    (GEMM, "quack", "quack needs a CUDA device"),
    (NORM, "triton", "triton needs a CUDA device"),
])
def test_a_named_backend_that_cannot_run_says_why(registry, name, why):
    pattern = rf"^{registry.kind} backend '{re.escape(name)}' unavailable: ({why})"
    with pytest.raises(BackendUnavailableError, match=pattern):
        registry.resolve(name, CPU, torch.float16)
    assert registry.unavailable_reason(name, CPU, torch.float16)
    fallback = registry.names()[-1]  # sdpa, cublas, torch: the backends that run anywhere
    assert registry.resolve((name, fallback), CPU, torch.float16) == fallback


def test_unknown_names_in_every_registry():
    for registry, name in ((ATTENTION, "xformers"), (GEMM, "cutlass"), (NORM, "apex")):
        with pytest.raises(BackendUnavailableError, match=rf"unknown {registry.kind} backend '{name}'; choose one of"):
            registry.resolve(name, CPU, torch.float32)
        assert "unknown" in registry.unavailable_reason(name, CPU, torch.float32)


def test_fa4_tile_variants():
    tiled = ATTENTION["fa4@128x96"]
    assert tiled.name == "fa4" and tiled is not ATTENTION["fa4"] and ATTENTION["fa4"].tile is None
    assert tiled.tile == {"tile_mn": (128, 96), "mma_pv_is_rs": True, "intra_wg_overlap": True}
    assert ATTENTION["fa4@128x128:nors:noov"].tile == parse_fa4_tile("128x128:nors:noov") == {
        "tile_mn": (128, 128), "mma_pv_is_rs": False, "intra_wg_overlap": False}
    assert tiled.markers == ATTENTION["fa4"].markers
    # a variant resolves like its backend: here it cannot run, and says why
    with pytest.raises(BackendUnavailableError, match=rf"'fa4@128x96' unavailable: ({FA4_WHY})"):
        ATTENTION.resolve("fa4@128x96", CPU, torch.float16)
    for bad, words in (("128", "expected TMxTN"), ("128xabc", "expected TMxTN"),
                       ("128x96:zz", r"unknown flag\(s\) \['zz'\]")):
        with pytest.raises(ValueError, match=words):
            ATTENTION[f"fa4@{bad}"]
        with pytest.raises(BackendUnavailableError, match=rf"'fa4@{re.escape(bad)}' unavailable: FA4 tile"):
            ATTENTION.resolve(f"fa4@{bad}", CPU, torch.float16)
    with pytest.raises(BackendUnavailableError, match="unknown attention backend 'fa5@128x96'"):
        ATTENTION["fa5@128x96"]


def test_fa4_with_torch_flash_routes_by_longest_sequence():
    both = ATTENTION["fa4+torch_flash"]
    assert both.route(TORCH_FLASH_MAX_SEQLEN) is ATTENTION["torch_flash"]
    assert both.route(TORCH_FLASH_MAX_SEQLEN + 1) is ATTENTION["fa4"]
    assert ATTENTION["sdpa"].route(10**6) is ATTENTION["sdpa"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resolve_for_cuda_without_cuda_says_why():
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        EngineConfig().resolve("cuda", torch.float16)


# ----------------------------------------------------------------------------- EngineConfig


def test_presets():
    assert PRESETS["auto"] == EngineConfig() == EngineConfig.preset("auto") == EngineConfig.of(None)
    assert EngineConfig() == EngineConfig(attention="auto", gemm="auto", norm="auto", compile=None,
                                          compile_mode=None, cuda_graphs=None,
                                          micro_batch_tokens=DEFAULT_MICRO_BATCH_TOKENS)
    assert EngineConfig.preset("bundled") == EngineConfig(attention=("torch_flash", "sdpa"), gemm="cublas",
                                                          norm=("triton", "torch"))
    assert EngineConfig.preset("hopper") == EngineConfig(attention="fa4+torch_flash", gemm="quack", norm="triton")
    with pytest.raises(ValueError, match=r"unknown engine preset 'turbo'; choose one of "
                                         r"\('auto', 'bundled', 'hopper'\)"):
        EngineConfig.preset("turbo")


def test_of_a_preset_a_mapping_or_a_config():
    bundled = EngineConfig.preset("bundled")
    assert EngineConfig.of("bundled") is bundled and EngineConfig.of(bundled) is bundled
    assert EngineConfig.of({"gemm": "cublas", "attention": ["torch_flash", "sdpa"]}) == \
        EngineConfig(attention=("torch_flash", "sdpa"), gemm="cublas")  # fields over "auto"; lists as tuples
    assert EngineConfig.of({}) == EngineConfig()
    with pytest.raises(ValueError, match=r"unknown engine option\(s\) \['atention'\]"):
        EngineConfig.of({"atention": "sdpa"})
    with pytest.raises(ValueError, match="unknown engine preset"):
        EngineConfig.of("fast")


def test_replace_and_frozen():
    base = EngineConfig()
    changed = base.replace(gemm="cublas", micro_batch_tokens=4096)
    assert (changed.gemm, changed.micro_batch_tokens) == ("cublas", 4096) and base == EngineConfig()
    with pytest.raises(ValueError, match=r"unknown engine option\(s\) \['bogus', 'graphs'\]"):
        base.replace(graphs=True, bogus=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.gemm = "quack"


def test_micro_batch_tokens_validation():
    assert EngineConfig(micro_batch_tokens=0).micro_batch_tokens is None  # 0: never split
    assert EngineConfig(micro_batch_tokens=None).micro_batch_tokens is None
    assert EngineConfig().replace(micro_batch_tokens=0) == EngineConfig(micro_batch_tokens=None)
    for bad in (-1, -16384, 1.5, "4096"):
        with pytest.raises(ValueError, match="micro_batch_tokens must be an int >= 0 or None"):
            EngineConfig(micro_batch_tokens=bad)


def test_micro_batch_tokens_refuses_a_bool():
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        EngineConfig(micro_batch_tokens=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_resolve_on_cpu(dtype):
    for request in (EngineConfig(), EngineConfig.preset("bundled"), EngineConfig(attention=("fa4", "sdpa"))):
        resolved = request.resolve("cpu", dtype)
        assert resolved == CPU_ENGINE and resolved.resolved and not request.resolved
        assert resolved.resolve(CPU, dtype) == resolved  # resolving a resolved config changes nothing
    assert EngineConfig(compile=True).resolve(CPU, dtype).compile is True  # compiling is allowed on the CPU
    assert EngineConfig(compile=True, compile_mode="max-autotune").resolve(CPU, dtype).compile_mode == "max-autotune"
    assert EngineConfig(compile=False, compile_mode="max-autotune").resolve(CPU, dtype).compile_mode is None
    assert EngineConfig(cuda_graphs=False).resolve(CPU, dtype).cuda_graphs is False
    assert EngineConfig(micro_batch_tokens=0).resolve(CPU, dtype).micro_batch_tokens is None
    with pytest.raises(ValueError, match=r"CUDA graphs need a CUDA device \(got cpu\)"):
        EngineConfig(cuda_graphs=True).resolve(CPU, dtype)
    with pytest.raises(BackendUnavailableError, match="attention backend 'fa4\\+torch_flash' unavailable"):
        EngineConfig.preset("hopper").resolve(CPU, dtype)
    with pytest.raises(BackendUnavailableError, match="GEMM backend 'quack' unavailable"):
        EngineConfig(gemm="quack").resolve(CPU, dtype)


def test_as_dict_is_json_and_round_trips():
    for config in (EngineConfig(), EngineConfig.preset("bundled"), EngineConfig.preset("hopper"), CPU_ENGINE,
                   EngineConfig(micro_batch_tokens=None, compile=True, compile_mode="reduce-overhead")):
        plain = config.as_dict()
        assert set(plain) == {f.name for f in dataclasses.fields(EngineConfig)}
        again = json.loads(json.dumps(plain))
        assert again == plain and EngineConfig.of(again) == config
    assert EngineConfig.preset("bundled").as_dict()["attention"] == ["torch_flash", "sdpa"]


def test_hashable_and_equal_for_equal_fields():
    a = EngineConfig.of({"attention": ["torch_flash", "sdpa"], "gemm": "cublas", "norm": ("triton", "torch")})
    b = EngineConfig.preset("bundled")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1 and {a: 1}[b] == 1
    assert EngineConfig(gemm="cublas") != EngineConfig(gemm="quack")
    assert len({EngineConfig().resolve(CPU, d) for d in DTYPES}) == 1  # the dtype is not a field


# ----------------------------------------------------------------------------- what the model runs with


def test_loading_resolves_the_engine(model8):
    assert model8.engine == CPU_ENGINE and model8.engine.resolved
    assert model8.engine_request == EngineConfig.preset("auto")
    assert (model8.attention_backend, model8.gemm_backend, model8.norm_backend, model8.forward_impl,
            model8.cuda_graphs, model8.micro_batch_tokens) == ("sdpa", "cublas", "torch", "eager", False, 16384)
    for engine in ("bundled", EngineConfig.preset("bundled"), {"attention": ["torch_flash", "sdpa"], "gemm": "cublas",
                                                               "norm": ["triton", "torch"]}):
        m, _ = _load("esm2_t6_8M_UR50D", engine=engine)
        assert m.engine == CPU_ENGINE and m.engine_request == EngineConfig.preset("bundled")
    m, _ = _load("esm2_t6_8M_UR50D", engine=None)
    assert m.engine == CPU_ENGINE and m.engine_request == EngineConfig()
    m, _ = _load("esm2_t6_8M_UR50D", engine={"micro_batch_tokens": 0, "compile": True})
    assert m.engine == CPU_ENGINE.replace(micro_batch_tokens=None, compile=True) and m.forward_impl == "compiled"
    with pytest.raises(BackendUnavailableError, match="fa4"):
        _load("esm2_t6_8M_UR50D", engine="hopper")
    with pytest.raises(ValueError, match="unknown engine option"):
        _load("esm2_t6_8M_UR50D", engine={"gpu": True})


def test_configure_changes_one_choice_and_refuses_atomically(model8):
    m = esmflash.cast_model(model8, "fp32")
    assert m.configure(micro_batch_tokens=512) == m.engine == CPU_ENGINE.replace(micro_batch_tokens=512)
    assert m.engine_request == EngineConfig(micro_batch_tokens=512)
    assert m.configure(compile=True).micro_batch_tokens == 512  # None: the current request, one field replaced
    assert m.configure("bundled") == CPU_ENGINE and m.engine_request == EngineConfig.preset("bundled")
    assert m.configure(EngineConfig(micro_batch_tokens=None)).micro_batch_tokens is None
    assert m.configure({"norm": "torch"}, micro_batch_tokens=64).micro_batch_tokens == 64
    before = m.engine, m.engine_request, m.runner
    for bad in ({"attention": "fa4"}, {"gemm": "quack"}, {"norm": "triton"}):
        with pytest.raises(BackendUnavailableError):
            m.configure(**bad)
    with pytest.raises(ValueError, match="CUDA graphs"):
        m.configure(cuda_graphs=True)
    with pytest.raises(ValueError, match="unknown engine option"):
        m.configure(graphs=False)
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        m.configure(micro_batch_tokens=-2)
    assert (m.engine, m.engine_request, m.runner) == before  # nothing changed, not even the runner


def test_engine_follows_the_model_to_another_dtype(model8, caplog):
    m = esmflash.cast_model(model8, "fp32", {"micro_batch_tokens": 1024})
    m.to(torch.bfloat16)
    assert m.dtype == torch.bfloat16 and m.engine == CPU_ENGINE.replace(micro_batch_tokens=1024)
    assert m.engine_request == EngineConfig(micro_batch_tokens=1024)
    # a request that cannot run after a move (e.g. a CUDA model moved to the CPU) runs "auto", logged
    m.engine_request = EngineConfig(norm="triton")
    with caplog.at_level(logging.INFO, logger="esmflash.model.packed"):
        m.to(torch.float32)
    assert m.engine == CPU_ENGINE and m.engine_request == EngineConfig.preset("auto")
    assert "cannot run on cpu" in caplog.text and "running 'auto'" in caplog.text


class _SaysCuda(PackedBatch):
    """A CPU batch that reports a CUDA device, so the runner takes its CUDA-graph path on the CPU."""

    @property
    def device(self) -> torch.device:
        return torch.device("cuda")


class _RecordingGraphs:
    """Stands in for the GraphCache: records the keys it is asked for and runs the pass directly."""

    max_graphs = 8

    def __init__(self):
        self.keys = []

    def run(self, key, batch, forward, clone=True, warm_key=None):
        self.keys.append((key, warm_key))
        return forward(batch)


def test_the_graph_key_holds_the_resolved_engine(model8):
    m = esmflash.cast_model(model8, "fp32")
    batch = esmflash.pack_sequences([("a", "MKTAYIAK"), ("b", "GAV")], m.alphabet, 64)[0]
    on_cuda = _SaysCuda(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(PackedBatch)})
    keys = {}
    for cap in (None, 4096):
        m.configure(micro_batch_tokens=cap)
        recorder = m.runner.graphs = _RecordingGraphs()
        full = m.forward_packed(on_cuda, repr_layers=[6])["representations"][6]
        pooled = m.pooled_packed(on_cuda, [6])["mean"][6]
        (key, _), (pool_key, warm) = recorder.keys
        assert m.engine in key and m.engine in pool_key and m.engine in warm and m.engine.resolved
        assert m.engine.micro_batch_tokens == cap
        keys[cap] = key
        assert torch.equal(full, m.forward_packed(batch, repr_layers=[6])["representations"][6])
        assert torch.equal(pooled, m.pooled_packed(batch, [6])["mean"][6])
    assert keys[None] != keys[4096]  # another engine, another graph


def test_model_info_and_embeddings_report_the_resolved_engine(model8):
    info = model_info(model8)
    assert info == {"model": "esm2_t6_8M_UR50D", "weights_source": "random-init:seed=0", "precision": "fp32",
                    **{f"engine_{k}": v for k, v in model8.engine.as_dict().items()}}
    assert (info["engine_attention"], info["engine_gemm"], info["engine_norm"], info["engine_compile"],
            info["engine_cuda_graphs"]) == ("sdpa", "cublas", "torch", False, False)
    json.dumps(info)
    m = esmflash.cast_model(model8, "fp32", {"micro_batch_tokens": 0})
    out = embed(m, [("a", "MKTAYIAK")])
    assert out.info == model_info(m) and out.info["engine_micro_batch_tokens"] is None
    assert embed(m, []).info == model_info(m)
