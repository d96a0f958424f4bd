"""A MInference-compatible entry point (Jiang et al., 2024, arXiv:2407.02490)::

    from flexinference.compat import MInference
    model = MInference("minference", model_name)(model)          # as with MInference
    model = MInference("a_shape", attn_kwargs={"n_local": 1024})(model)
    model = MInference("minference", config_path="best_pattern.json", kv_type="snapkv")(model)

MInference's ``attn_type`` strings map once, here, to our pattern dataclasses, and ``kv_type`` strings to
our cache policies (:mod:`flexinference.cache`); everything then runs through
:func:`flexinference.apply`. A string for a method this project does not have raises ``ValueError``
listing what is available: nothing falls back to dense silently.

Differences from MInference: ``model_name`` needs no entry in a table of shipped configs (without
``config_path`` every head gets our documented default, ``VerticalSlash(1000, 6096)``); the sparse path
also serves prefills on top of a cache (later turns, chunked prefill); vLLM attn types are not provided.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from flexinference.patching import _text_config, apply, install_attribute, resolve_config
from flexinference.config import ModelConfig
from flexinference.patterns import (
    AShape,
    Dense,
    Dilated,
    FlexPrefill,
    Pattern,
    TriShape,
    VerticalSlash,
    VerticalSlashStatic,
    XAttention,
)

__all__ = ["MInference", "MInferenceConfig", "get_support_models"]

logger = logging.getLogger(__name__)

#: transformers ``model_type`` values tested end to end (Yi checkpoints load as ``llama``).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "glm", "glm4")


@dataclass(frozen=True)
class _AttnType:
    build: Callable[..., Pattern]
    aliases: Mapping[str, str]  # MInference-style attn_kwargs name -> our pattern field
    needs: str | None = None  # module that must exist for the type to be available


# Each entry: how MInference's attn_type string becomes a pattern. Our own field names are accepted too.
_ATTN_TYPES: dict[str, _AttnType] = {
    "dense": _AttnType(Dense, {}),
    "hf": _AttnType(Dense, {}),
    "minference": _AttnType(VerticalSlash, {"vertical_size": "vertical", "slash_size": "slash",
                                            "vertical": "vertical", "slash": "slash", "last_q": "last_q"}),
    "static": _AttnType(VerticalSlashStatic, {"columns": "columns", "diagonals": "diagonals"}),
    "a_shape": _AttnType(AShape, {"n_init": "sink", "n_local": "local", "sink": "sink", "local": "local"}),
    "tri_shape": _AttnType(TriShape, {"n_init": "sink", "n_local": "local", "n_last": "last",
                                      "sink": "sink", "local": "local", "last": "last"}),
    "dilated1": _AttnType(Dilated.dilated1, {}),
    "dilated2": _AttnType(Dilated.dilated2, {}),
    "flexprefill": _AttnType(FlexPrefill, {"gamma": "gamma", "tau": "tau", "block_size": "block", "block": "block",
                                           "min_budget": "min_budget", "last_q": "last_q", "min_len": "min_len"},
                             needs="flexinference.estimate.flexprefill"),
    "xattention": _AttnType(XAttention, {"stride": "stride", "threshold": "threshold", "block_size": "block",
                                         "block": "block"}, needs="flexinference.estimate.xattention"),
}
#: MInference attn types this project does not provide, and why.
_MISSING_ATTN = {
    "vllm": "vLLM integration", "vllm_minference": "vLLM integration", "vllm_a_shape": "vLLM integration",
    "vllm_tri_shape": "vLLM integration", "vllm_flexprefill": "vLLM integration",
    "inf_llm": "InfLLM", "streaming": "InfLLM-style streaming attention",
    "minference_with_dense": "MInference-with-dense",
}
# kv_type -> (class in flexinference.cache, MInference kv_kwargs aliases; the class's own names also work)
_KV_TYPES: dict[str, tuple[str, Mapping[str, str]]] = {
    "streamingllm": ("StreamingLLMCache", {"n_init": "sink", "n_local": "window"}),
    "snapkv": ("SnapKVCache", {"window_size": "window", "max_capacity_prompt": "budget"}),
    "pyramidkv": ("PyramidKVCache", {"window_size": "window", "max_capacity_prompt": "budget"}),
    "kivi": ("KIVICache", {}),
}
_MISSING_KV = {"quest": "Quest", "retr_attn": "RetrievalAttention"}
_MINFERENCE_FLAGS = ("kv_cache_cpu", "is_search", "use_snapkv")  # accepted only at their off default


def _attn_available(name: str) -> bool:
    spec = _ATTN_TYPES.get(name)
    return spec is not None and (spec.needs is None or importlib.util.find_spec(spec.needs) is not None)


def _kv_class(name: str) -> type | None:
    if name not in _KV_TYPES:
        return None
    return getattr(importlib.import_module("flexinference.cache"), _KV_TYPES[name][0], None)


def get_support_models() -> list[str]:
    """transformers ``model_type`` values flexinference is tested on (any checkpoint of these works; Yi
    loads as ``llama``). MInference lists checkpoint names because it ships per-model pattern files; here
    ``config_path`` takes such a file and the default pattern needs none."""
    return list(SUPPORTED_MODEL_TYPES)


def _remap(kwargs: Mapping[str, Any], aliases: Mapping[str, str], what: str) -> dict[str, Any]:
    out = {}
    for key, value in kwargs.items():
        if key not in aliases:
            raise ValueError(f"unknown {what} key {key!r}; valid: {sorted(aliases) or 'none'}")
        out[aliases[key]] = value
    return out


@dataclass(frozen=True)
class MInferenceConfig:
    """The facade's settings, validated on construction (MInference's ``MInferenceConfig`` counterpart).

    Args:
        attn_type: one of :meth:`get_available_attn_types`.
        model_name: informational (recorded in the model config).
        config_path: MInference per-head JSON (or our JSON); ``attn_type="minference"`` only.
        kv_type: one of :meth:`get_available_kv_types`.
        attn_kwargs: pattern parameters, MInference's names (``n_init``, ``n_local``, ``n_last``,
            ``vertical_size``, ``slash_size``, ``block_size``) or ours.
        kv_kwargs: cache-policy parameters (MInference's ``n_init``/``n_local``/``window_size``/
            ``max_capacity_prompt`` or the policy's own argument names).
        starting_layer: layers below it stay dense (MInference's meaning); ``-1``: none.
        min_sparse_len, prefill_chunk_size, impl: see :class:`~flexinference.ModelConfig`; ``None`` (default)
            keeps the config file's value, else the ModelConfig default.
    """

    attn_type: str = "minference"
    model_name: str | None = None
    config_path: str | None = None
    kv_type: str = "dense"
    attn_kwargs: Mapping[str, Any] = field(default_factory=dict)
    kv_kwargs: Mapping[str, Any] = field(default_factory=dict)
    starting_layer: int = -1
    min_sparse_len: int | None = None
    prefill_chunk_size: int | None = None
    impl: Any = None

    def __post_init__(self) -> None:
        if self.attn_type not in self.get_available_attn_types():
            why = _MISSING_ATTN.get(self.attn_type)
            if why is None and self.attn_type in _ATTN_TYPES:
                why = f"the {self.attn_type} estimator"
            prefix = (f"attn_type {self.attn_type!r} is not available ({why} is not implemented in flexinference)"
                      if why else f"unknown attn_type {self.attn_type!r}")
            raise ValueError(f"{prefix}; available: {self.get_available_attn_types()}")
        if self.kv_type not in self.get_available_kv_types():
            why = _MISSING_KV.get(self.kv_type) or (self.kv_type if self.kv_type in _KV_TYPES else None)
            prefix = (f"kv_type {self.kv_type!r} is not available ({why} is not implemented in flexinference)"
                      if why else f"unknown kv_type {self.kv_type!r}")
            raise ValueError(f"{prefix}; available: {self.get_available_kv_types()}")
        for name in ("attn_kwargs", "kv_kwargs"):
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                raise TypeError(f"{name} must be a dict, got {type(value).__name__}")
            object.__setattr__(self, name, dict(value))
        if self.config_path is not None and self.attn_type != "minference":
            raise ValueError(f"config_path is used with attn_type='minference' only, got attn_type={self.attn_type!r}")
        if self.config_path is not None and self.attn_kwargs:
            raise ValueError("attn_kwargs cannot be combined with config_path (the file gives every head's budget)")
        if isinstance(self.starting_layer, bool) or not isinstance(self.starting_layer, int):
            raise TypeError(f"starting_layer must be an int, got {self.starting_layer!r}")
        if self.kv_type == "dense" and self.kv_kwargs:
            raise ValueError("kv_kwargs given but kv_type is 'dense'")
        self.pattern()  # validates attn_kwargs now, not at patch time

    @classmethod
    def get_available_attn_types(cls) -> list[str]:
        """MInference ``attn_type`` strings this install serves."""
        return [name for name in _ATTN_TYPES if _attn_available(name)]

    @classmethod
    def get_available_kv_types(cls) -> list[str]:
        """MInference ``kv_type`` strings this install serves (``"dense"``: transformers' own cache)."""
        return ["dense"] + [name for name in _KV_TYPES if _kv_class(name) is not None]

    def pattern(self) -> Pattern:
        """The pattern ``attn_type`` + ``attn_kwargs`` give every head (without ``config_path``)."""
        spec = _ATTN_TYPES[self.attn_type]
        fields = _remap(self.attn_kwargs, spec.aliases, f"attn_kwargs for attn_type={self.attn_type!r}")
        if self.attn_type == "static" and not {"columns", "diagonals"} <= set(fields):
            raise ValueError("attn_type='static' needs attn_kwargs columns=[...] and diagonals=[...] (the frozen "
                             "vertical/slash indices; MInference estimates them on its first call)")
        try:
            return spec.build(**fields)
        except (TypeError, ValueError) as err:
            raise ValueError(f"attn_kwargs for attn_type={self.attn_type!r}: {err}") from None

    def model_config(self, model: torch.nn.Module) -> ModelConfig:
        """The :class:`~flexinference.ModelConfig` this facade applies to ``model``."""
        # Only what the caller set overrides; otherwise a flexinference-format config_path keeps its own
        # runtime settings and everything else gets ModelConfig's defaults.
        runtime = {k: v for k, v in dict(min_sparse_len=self.min_sparse_len,
                                         prefill_chunk_size=self.prefill_chunk_size, impl=self.impl).items()
                   if v is not None}
        if self.config_path is not None:
            cfg = resolve_config(self.config_path, model, **runtime)
        else:
            cfg = resolve_config(self.pattern(), model, **runtime)
        if self.model_name is not None:
            cfg = cfg.replace(model_name=self.model_name)
        if self.starting_layer > 0:
            dense = (Dense(),) * cfg.num_heads
            layers = tuple(dense if i < self.starting_layer else layer for i, layer in enumerate(cfg.layers))
            cfg = cfg.replace(layers=layers)
        return cfg

    def make_cache(self) -> Any:
        """A fresh cache of ``kv_type`` built from ``kv_kwargs`` (``None`` for ``"dense"``)."""
        if self.kv_type == "dense":
            return None
        cls = _kv_class(self.kv_type)
        aliases = _KV_TYPES[self.kv_type][1]
        kwargs = {aliases.get(k, k): v for k, v in self.kv_kwargs.items()}
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise ValueError(f"kv_kwargs for kv_type={self.kv_type!r} ({cls.__name__}): {err}") from None


class MInference:
    """Patch a transformers model the way ``minference.MInference`` does; see the module docstring.

    Args:
        attn_type, model_name, config_path, kv_type, attn_kwargs, kv_kwargs: as in MInference (see
            :class:`MInferenceConfig`).
        **kw: ``starting_layer``, ``min_sparse_len``, ``prefill_chunk_size``, ``impl``; MInference's
            ``kv_cache_cpu``/``is_search``/``use_snapkv`` only at their ``False`` default.

    Calling the object (or :meth:`patch_model`) applies :func:`flexinference.apply` and, for a
    ``kv_type`` other than ``"dense"``, makes ``model.generate`` use a fresh cache of that policy when the
    caller passes none. :func:`flexinference.remove` undoes both.
    """

    def __init__(
        self,
        attn_type: str = "minference",
        model_name: str | None = None,
        config_path: str | None = None,
        kv_type: str = "dense",
        attn_kwargs: Mapping[str, Any] | None = None,
        kv_kwargs: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> None:
        for flag in _MINFERENCE_FLAGS:
            if kw.pop(flag, False):
                raise ValueError(f"MInference option {flag}=True is not supported by flexinference")
        kw.pop("kv_cache_cpu_device", None)  # meaningless without kv_cache_cpu
        valid = {"starting_layer", "min_sparse_len", "prefill_chunk_size", "impl"}
        unknown = set(kw) - valid
        if unknown:
            raise TypeError(f"unknown MInference argument(s) {sorted(unknown)}; valid extras: {sorted(valid)}")
        self.config = MInferenceConfig(
            attn_type=attn_type, model_name=model_name, config_path=config_path, kv_type=kv_type,
            attn_kwargs=attn_kwargs or {}, kv_kwargs=kv_kwargs or {}, **kw,
        )

    def __call__(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.patch_model(model)

    def patch_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Patch ``model`` in place and return it."""
        model_type = getattr(_text_config(model), "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            logger.warning("model_type %r is not among the tested families %s; patching it anyway",
                           model_type, SUPPORTED_MODEL_TYPES)
        apply(model, self.config.model_config(model))
        if self.config.kv_type != "dense":
            install_attribute(model, "generate", _generate_with_cache(model, model.generate, self.config))
        return model

    def __repr__(self) -> str:
        return f"MInference({self.config})"


def _generate_with_cache(model: torch.nn.Module, original, config: MInferenceConfig):
    # transformers >= 5.20 names the argument `cache` (`past_key_values` deprecated); 5.17 `past_key_values`.
    cache_key = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any):
        if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
            return original(*args, **kwargs)
        from flexinference.cache import attach

        cache = config.make_cache()
        with attach(model, cache):
            return original(*args, **{cache_key: cache}, **kwargs)

    return generate
