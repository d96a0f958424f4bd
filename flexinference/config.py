"""Which pattern each attention head runs: :class:`ModelConfig` (a whole model) and :class:`LayerPlan`
(one layer, what :func:`flexinference.apply` attaches to each attention module).

A config is data: a tuple per layer of one :class:`~flexinference.patterns.Pattern` per query head, plus
the few runtime options that decide when the sparse path runs. It round-trips through our JSON format::

    {
      "format": "flexinference.model_config", "version": 1,
      "num_layers": 32, "num_heads": 32,
      "num_key_value_heads": 8, "head_dim": 128,     # optional, checked against the model when present
      "model_name": "meta-llama/Llama-3.1-8B-Instruct",  # optional, informational
      "min_sparse_len": 4096, "prefill_chunk_size": null, "impl": "auto",
      "layers": [
        [{"pattern": "vertical_slash", "vertical": 1000, "slash": 6096, ...}, ...],   # one entry per head
        {"pattern": "dense"},                                                     # or one for all heads
        ...
      ]
    }

MInference's per-head JSON is read by :func:`flexinference.compat.load_minference_config`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from flexinference.attention import Impl
from flexinference.patterns import (
    Dense,
    Pattern,
    VerticalSlash,
    pattern_from_dict,
    pattern_to_dict,
)

__all__ = ["DEFAULT_MIN_SPARSE_LEN", "LayerPlan", "ModelConfig", "load_config", "save_config"]

#: Shorter prefills (and every decode step) run dense SDPA: below a few thousand tokens the estimation
#: costs more than the sparse kernel saves, and the result is exact.
DEFAULT_MIN_SPARSE_LEN = 4096

FORMAT_NAME = "flexinference.model_config"
FORMAT_VERSION = 1


def _check_positive_int(owner: str, name: str, value: Any, *, optional: bool = False, minimum: int = 1) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}.{name} must be an int{' or None' if optional else ''}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}, got {value}")


def _as_impl(value: Any, owner: str) -> Impl:
    if isinstance(value, Impl):
        return value
    try:
        return Impl(value)
    except ValueError:
        raise ValueError(f"{owner}.impl must be one of {[i.value for i in Impl]}, got {value!r}") from None


@dataclass(frozen=True)
class LayerPlan:
    """The patterns of one attention layer, as the attention function reads them.

    Attributes:
        patterns: one pattern per query head (length ``H_q``).
        min_sparse_len: prefills with at least this many query tokens take the sparse path; shorter ones
            and decode steps run dense SDPA.
        impl: how :func:`~flexinference.attention.sparse_attention` computes.
        sparse: ``False`` when every head is :class:`~flexinference.patterns.Dense` (the layer always runs
            SDPA: same result, no estimation cost). Derived.
        kernel_patterns: the single pattern when all heads share one, else ``patterns``. Derived.
    """

    patterns: tuple[Pattern, ...]
    min_sparse_len: int = DEFAULT_MIN_SPARSE_LEN
    impl: Impl = Impl.AUTO
    sparse: bool = field(init=False)
    kernel_patterns: Pattern | tuple[Pattern, ...] = field(init=False)

    def __post_init__(self) -> None:
        pats = tuple(self.patterns) if isinstance(self.patterns, (list, tuple)) else self.patterns
        if not isinstance(pats, tuple) or not pats:
            raise TypeError(f"LayerPlan.patterns must be a non-empty sequence of Patterns, got {self.patterns!r}")
        for i, p in enumerate(pats):
            if not isinstance(p, Pattern):
                raise TypeError(f"LayerPlan.patterns[{i}] must be a Pattern, got {type(p).__name__}")
        _check_positive_int("LayerPlan", "min_sparse_len", self.min_sparse_len)
        object.__setattr__(self, "patterns", pats)
        object.__setattr__(self, "impl", _as_impl(self.impl, "LayerPlan"))
        object.__setattr__(self, "sparse", any(not isinstance(p, Dense) for p in pats))
        uniform = all(p == pats[0] for p in pats)
        object.__setattr__(self, "kernel_patterns", pats[0] if uniform else pats)

    @property
    def num_heads(self) -> int:
        return len(self.patterns)


@dataclass(frozen=True)
class ModelConfig:
    """Patterns for every (layer, query head) of a model, and when to use them.

    Args:
        layers: per layer, one pattern per query head. Every layer has the same head count.
        min_sparse_len: see :class:`LayerPlan` (default :data:`DEFAULT_MIN_SPARSE_LEN`).
        prefill_chunk_size: when set, :func:`flexinference.apply` splits longer inputs into chunks of this
            many tokens, each attending to the cache plus itself (bounded activation memory). A chunk
            shorter than ``min_sparse_len`` runs dense.
        impl: :class:`~flexinference.attention.Impl` (or its value string) for the sparse path.
        model_name: informational (where the config came from).
        num_key_value_heads, head_dim: optional; when set, :func:`flexinference.apply` checks them
            against the model.

    Example:
        >>> import flexinference as fi
        >>> cfg = fi.ModelConfig.uniform(fi.AShape(sink=64, local=1024), num_layers=2, num_heads=4)
        >>> cfg.layer_plan(1).patterns[3]
        AShape(sink=64, local=1024)
    """

    layers: tuple[tuple[Pattern, ...], ...]
    min_sparse_len: int = DEFAULT_MIN_SPARSE_LEN
    prefill_chunk_size: int | None = None
    impl: Impl = Impl.AUTO
    model_name: str | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Sequence) or not self.layers:
            raise TypeError(f"ModelConfig.layers must be a non-empty sequence of per-head sequences, got "
                            f"{type(self.layers).__name__}")
        layers = []
        for i, layer in enumerate(self.layers):
            if isinstance(layer, (Pattern, str, bytes)) or not isinstance(layer, Sequence):
                raise TypeError(f"ModelConfig.layers[{i}] must be a sequence of Patterns (one per head), got "
                                f"{type(layer).__name__}")
            heads = tuple(layer)
            for h, p in enumerate(heads):
                if not isinstance(p, Pattern):
                    raise TypeError(f"ModelConfig.layers[{i}][{h}] must be a Pattern, got {type(p).__name__}")
            layers.append(heads)
        counts = {len(layer) for layer in layers}
        if len(counts) != 1 or 0 in counts:
            raise ValueError(f"ModelConfig.layers must give every layer the same, non-zero number of heads; got "
                             f"{[len(layer) for layer in layers]}")
        object.__setattr__(self, "layers", tuple(layers))
        _check_positive_int("ModelConfig", "min_sparse_len", self.min_sparse_len)
        _check_positive_int("ModelConfig", "prefill_chunk_size", self.prefill_chunk_size, optional=True)
        _check_positive_int("ModelConfig", "num_key_value_heads", self.num_key_value_heads, optional=True)
        _check_positive_int("ModelConfig", "head_dim", self.head_dim, optional=True)
        object.__setattr__(self, "impl", _as_impl(self.impl, "ModelConfig"))
        if self.model_name is not None and not isinstance(self.model_name, str):
            raise TypeError(f"ModelConfig.model_name must be a str or None, got {type(self.model_name).__name__}")
        if self.num_key_value_heads is not None and self.num_heads % self.num_key_value_heads:
            raise ValueError(f"ModelConfig.num_key_value_heads ({self.num_key_value_heads}) must divide the "
                             f"number of query heads ({self.num_heads})")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_heads(self) -> int:
        return len(self.layers[0])

    def layer_plan(self, layer_idx: int) -> LayerPlan:
        """The :class:`LayerPlan` of layer ``layer_idx``."""
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer_idx must be in [0, {self.num_layers}), got {layer_idx}")
        return LayerPlan(self.layers[layer_idx], min_sparse_len=self.min_sparse_len, impl=self.impl)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)

    @classmethod
    def uniform(
        cls, pattern: Pattern | Sequence[Pattern] | None = None, *, num_layers: int, num_heads: int, **kwargs: Any
    ) -> ModelConfig:
        """The same pattern on every head of every layer (or one per-head sequence for every layer).

        ``pattern=None`` is the documented default, :class:`~flexinference.patterns.VerticalSlash` with
        MInference's budgets (1000 columns, 6096 diagonals).
        """
        _check_positive_int("ModelConfig.uniform", "num_layers", num_layers)
        _check_positive_int("ModelConfig.uniform", "num_heads", num_heads)
        pattern = VerticalSlash() if pattern is None else pattern
        if isinstance(pattern, Pattern):
            heads = (pattern,) * num_heads
        elif isinstance(pattern, Sequence) and not isinstance(pattern, (str, bytes)):
            heads = tuple(pattern)
            if len(heads) != num_heads:
                raise ValueError(f"pattern has {len(heads)} entries, expected one per head ({num_heads})")
        else:
            raise TypeError(f"pattern must be a Pattern or a per-head sequence of Patterns, got {pattern!r}")
        return cls(layers=(heads,) * num_layers, **kwargs)

    # -- JSON -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Our JSON format (see the module docstring); every head written out."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "model_name": self.model_name,
            "min_sparse_len": self.min_sparse_len,
            "prefill_chunk_size": self.prefill_chunk_size,
            "impl": self.impl.value,
            "layers": [[pattern_to_dict(p) for p in layer] for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`. A layer given as one pattern dict applies to all ``num_heads``."""
        if not isinstance(data, dict):
            raise ValueError(f"config must be a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT_NAME:
            raise ValueError(f"not a flexinference config: 'format' is {data.get('format')!r}, expected "
                             f"{FORMAT_NAME!r} (MInference's per-head JSON: flexinference.compat.load_minference_config)")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported config version {data.get('version')!r}; this reader knows {FORMAT_VERSION}")
        known = {"format", "version", "num_layers", "num_heads", "num_key_value_heads", "head_dim", "model_name",
                 "min_sparse_len", "prefill_chunk_size", "impl", "layers", "search"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config key(s) {sorted(unknown)}; valid: {sorted(known)}")
        raw_layers = data.get("layers")
        if not isinstance(raw_layers, list) or not raw_layers:
            raise ValueError("config 'layers' must be a non-empty list")
        num_heads = data.get("num_heads")
        layers = []
        for i, entry in enumerate(raw_layers):
            if isinstance(entry, dict):
                if not isinstance(num_heads, int):
                    raise ValueError(f"layers[{i}] is one pattern for all heads, which needs 'num_heads'")
                layers.append((pattern_from_dict(entry),) * num_heads)
            elif isinstance(entry, list):
                try:
                    layers.append(tuple(pattern_from_dict(p) for p in entry))
                except ValueError as err:
                    raise ValueError(f"layers[{i}]: {err}") from None
            else:
                raise ValueError(f"layers[{i}] must be a list of pattern objects or one pattern object")
        cfg = cls(
            layers=tuple(layers),
            min_sparse_len=data.get("min_sparse_len", DEFAULT_MIN_SPARSE_LEN),
            prefill_chunk_size=data.get("prefill_chunk_size"),
            impl=data.get("impl", Impl.AUTO.value),
            model_name=data.get("model_name"),
            num_key_value_heads=data.get("num_key_value_heads"),
            head_dim=data.get("head_dim"),
        )
        for key, actual in (("num_layers", cfg.num_layers), ("num_heads", cfg.num_heads)):
            if data.get(key) is not None and data[key] != actual:
                raise ValueError(f"config '{key}' is {data[key]} but 'layers' holds {actual}")
        return cfg

    def save(self, path: str | os.PathLike) -> None:
        """Write our JSON format to ``path``."""
        save_config(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelConfig:
        """Read our JSON format from ``path``."""
        return load_config(path)


def save_config(config: ModelConfig, path: str | os.PathLike) -> None:
    """Write ``config`` to ``path`` in our JSON format (one line per layer)."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    data = config.to_dict()
    layers = data.pop("layers")
    head = json.dumps(data, indent=1)[:-2]  # drop the closing "\n}" to append the layers one per line
    body = ",\n".join("  " + json.dumps(layer) for layer in layers)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f'{head},\n "layers": [\n{body}\n ]\n}}\n')


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Read a config written by :func:`save_config`."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{os.fspath(path)} is not valid JSON: {err}") from None
    try:
        return ModelConfig.from_dict(data)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{os.fspath(path)}: {err}") from None
