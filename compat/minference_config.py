"""Read and write MInference's per-head best-pattern JSON (Jiang et al., 2024, arXiv:2407.02490).

The format, as MInference's offline search writes it: a list with one object per layer, mapping each
query head index (a string, ``"0"`` .. ``"H-1"``) to ``[pattern_name, vertical_size, slash_size, score]``::

    [{"0": ["vertical_and_slash", 1000, 6096, 0.96], "1": ["stream_llm", 100, 800, 0.98], ...}, ...]

Pattern names and how their two sizes map to our patterns:

* ``"vertical_and_slash"`` -> :class:`~flexinference.patterns.VerticalSlash` ``(vertical, slash)``;
* ``"stream_llm"`` (A-shape) -> :class:`~flexinference.patterns.AShape` ``(sink=vertical, local=slash)``;
* ``"block_sparse"`` -> :class:`~flexinference.patterns.BlockTopK` ``(block=64, topk=vertical)``.

``score`` is the search's recall and does not affect inference.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from flexinference.config import ModelConfig
from flexinference.patterns import AShape, BlockTopK, Pattern, VerticalSlash

__all__ = [
    "MINFERENCE_PATTERN_NAMES",
    "load_minference_config",
    "minference_entry_to_pattern",
    "pattern_to_minference_entry",
    "save_minference_config",
]

#: MInference's block-sparse heads use 64x64 blocks.
MINFERENCE_BLOCK = 64
MINFERENCE_PATTERN_NAMES = ("vertical_and_slash", "stream_llm", "block_sparse")


def _size(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where} must be a non-negative integer, got {value!r}")
    return value


def minference_entry_to_pattern(entry: Sequence[Any], where: str = "entry") -> Pattern:
    """``[name, vertical_size, slash_size, score]`` -> our pattern (``ValueError`` naming ``where``)."""
    if not isinstance(entry, (list, tuple)) or len(entry) < 3:
        raise ValueError(f"{where} must be [pattern_name, vertical_size, slash_size, score], got {entry!r}")
    name = entry[0]
    v = _size(entry[1], f"{where} vertical_size")
    s = _size(entry[2], f"{where} slash_size")
    try:
        if name == "vertical_and_slash":
            return VerticalSlash(vertical=v, slash=s)
        if name == "stream_llm":
            return AShape(sink=v, local=s)
        if name == "block_sparse":
            return BlockTopK(block=MINFERENCE_BLOCK, topk=v)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None
    raise ValueError(f"{where}: unknown MInference pattern {name!r}; valid: {list(MINFERENCE_PATTERN_NAMES)}")


def pattern_to_minference_entry(pattern: Pattern, score: float = 0.0) -> list[Any]:
    """Our pattern -> ``[name, vertical_size, slash_size, score]``; ``ValueError`` if the format cannot
    express it (MInference's format has no field for our extra parameters)."""
    if isinstance(pattern, VerticalSlash):
        default = VerticalSlash()
        extras = {f: getattr(pattern, f) for f in ("last_q", "keep_first_columns", "keep_nearest_diagonals")
                  if getattr(pattern, f) != getattr(default, f)}
        if extras:
            raise ValueError(f"MInference's format cannot express VerticalSlash with non-default {extras}")
        return ["vertical_and_slash", pattern.vertical, pattern.slash, score]
    if isinstance(pattern, AShape):
        return ["stream_llm", pattern.sink, pattern.local, score]
    if isinstance(pattern, BlockTopK):
        if pattern.block != MINFERENCE_BLOCK:
            raise ValueError(f"MInference's block_sparse uses {MINFERENCE_BLOCK}-token blocks, got {pattern.block}")
        return ["block_sparse", pattern.topk, 0, score]
    raise ValueError(f"MInference's format cannot express {type(pattern).__name__}; it holds VerticalSlash, "
                     "AShape and BlockTopK(block=64) only")


def load_minference_config(
    path: str | os.PathLike | list, model: Any = None, **overrides: Any
) -> ModelConfig:
    """Read MInference's per-head JSON into a :class:`~flexinference.config.ModelConfig`.

    Args:
        path: the JSON file (or its already-parsed list).
        model: optional transformers model; when given, the layer and head counts are checked against it
            and its KV-head count and head dim are recorded.
        **overrides: :class:`ModelConfig` fields (``min_sparse_len``, ``prefill_chunk_size``, ``impl``,
            ``model_name``).

    Raises:
        ValueError: malformed file, unknown pattern name, or a shape that does not fit ``model``.

    Example:
        >>> from flexinference.compat import load_minference_config
        >>> cfg = load_minference_config("Llama_3.1_8B_Instruct_128k_kv_out_v32_fit_o_best_pattern.json")  # doctest: +SKIP
        >>> cfg.num_layers, cfg.num_heads                                                                # doctest: +SKIP
        (32, 32)
    """
    where = "MInference config" if isinstance(path, list) else os.fspath(path)
    if isinstance(path, list):
        data = path
    else:
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where} is not valid JSON: {err}") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"{where}: expected a non-empty list with one {{head: [pattern, v, s, score]}} object per layer")
    layers = []
    for i, layer in enumerate(data):
        if not isinstance(layer, dict) or not layer:
            raise ValueError(f"{where}: layer {i} must be a non-empty object mapping head index to an entry")
        expected = {str(h) for h in range(len(layer))}
        if set(layer) != expected:
            raise ValueError(f"{where}: layer {i} heads must be '0'..'{len(layer) - 1}', got {sorted(layer)[:8]}...")
        layers.append(tuple(minference_entry_to_pattern(layer[str(h)], f"{where}: layer {i} head {h}")
                            for h in range(len(layer))))
    counts = {len(layer) for layer in layers}
    if len(counts) != 1:
        raise ValueError(f"{where}: layers have different head counts {sorted(counts)}")
    meta: dict[str, Any] = {}
    if model is not None:
        from flexinference.patching import _text_config, attention_modules

        text = _text_config(model)
        if len(layers) != text.num_hidden_layers or len(layers[0]) != text.num_attention_heads:
            raise ValueError(
                f"{where} is for {len(layers)} layers x {len(layers[0])} heads, but the model has "
                f"{text.num_hidden_layers} layers x {text.num_attention_heads} query heads"
            )
        mods = attention_modules(model)
        meta = dict(num_key_value_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
                    head_dim=mods[0].head_dim if mods else None)
    if not isinstance(path, list):
        meta["model_name"] = os.path.basename(os.fspath(path))
    meta.update(overrides)
    return ModelConfig(layers=tuple(layers), **meta)


def save_minference_config(
    config: ModelConfig, path: str | os.PathLike, scores: Sequence[Sequence[float]] | None = None
) -> None:
    """Write ``config`` in MInference's per-head format.

    Args:
        config: every head must be expressible (see :func:`pattern_to_minference_entry`).
        path: output file.
        scores: optional per-layer, per-head search scores (written as the 4th field; default 0.0).
    """
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    if scores is not None and (len(scores) != config.num_layers
                               or any(len(row) != config.num_heads for row in scores)):
        raise ValueError(f"scores must be {config.num_layers} x {config.num_heads}")
    out = []
    for i, layer in enumerate(config.layers):
        row = {}
        for h, p in enumerate(layer):
            try:
                row[str(h)] = pattern_to_minference_entry(p, 0.0 if scores is None else float(scores[i][h]))
            except ValueError as err:
                raise ValueError(f"layer {i} head {h}: {err}") from None
        out.append(row)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f)
