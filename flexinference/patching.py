"""Patch a transformers causal LM so its attention runs flexinference's sparse prefill.

:func:`apply` validates a :class:`~flexinference.config.ModelConfig` against the model, attaches one
:class:`~flexinference.config.LayerPlan` to each attention module (attribute ``flexinference_plan``), sets
``attn_implementation="flexinference"`` and wraps ``model.forward`` (an instance attribute, so the class is
untouched) for two things the attention function cannot see:

* **chunked prefill** (``prefill_chunk_size``): an input longer than the chunk is fed as consecutive
  chunks through the model's own cache; each chunk's attention is a prefill on top of that cache, so a
  chunk attends (sparsely, if long enough) to the cache plus itself. Logits are concatenated (only the
  requested ``logits_to_keep`` tail is computed). Activation memory is bounded by the chunk.
* **static caches** are refused on the sparse path: their key tensor is the full pre-allocated length,
  so "the queries are the last keys" does not hold (the dense path works with them).

:func:`remove` undoes all of it and returns the same model; :func:`patched` is the context-manager form.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from flexinference.config import ModelConfig
from flexinference.hf_attention import ATTENTION_NAME, PLAN_ATTR, register
from flexinference.patterns import Pattern

__all__ = [
    "apply",
    "attention_modules",
    "install_attribute",
    "is_applied",
    "patched",
    "remove",
    "resolve_config",
    "validate_config",
]

_STATE_ATTR = "_flexinference_state"
_OVERRIDES = ("min_sparse_len", "prefill_chunk_size", "impl")


@dataclass(frozen=True)
class _PatchState:
    config: ModelConfig
    original_attn: str
    # instance attributes replaced on the model (forward, generate): name -> (was in __dict__, old value)
    saved: dict[str, tuple[bool, Any]] = field(default_factory=dict)


def _text_config(model: torch.nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder attention modules of ``model`` (those with ``layer_idx`` and GQA metadata), by layer."""
    mods = [m for m in model.modules()
            if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups") and hasattr(m, "head_dim")]
    return sorted(mods, key=lambda m: m.layer_idx)


def resolve_config(config: Any, model: torch.nn.Module, **overrides: Any) -> ModelConfig:
    """Turn ``config`` into a :class:`ModelConfig` for ``model``.

    Args:
        config: a :class:`ModelConfig`; a :class:`~flexinference.patterns.Pattern` (every head) or a list
            of ``H_q`` patterns (head ``h`` of every layer runs ``config[h]``); a path to
            our JSON or to MInference's per-head JSON (told apart by content); a dict in our format; or
            ``None`` for the documented default, :class:`~flexinference.patterns.VerticalSlash` with
            MInference's budgets (1000 columns, 6096 diagonals) on every head.
        model: the transformers model (its shape fills the uniform configs).
        **overrides: ``min_sparse_len``, ``prefill_chunk_size``, ``impl``.
    """
    unknown = set(overrides) - set(_OVERRIDES)
    if unknown:
        raise TypeError(f"unknown override(s) {sorted(unknown)}; valid: {list(_OVERRIDES)}")
    text = _text_config(model)
    mods = attention_modules(model)
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    shape = dict(num_layers=text.num_hidden_layers, num_heads=text.num_attention_heads)
    meta = dict(num_key_value_heads=kv_heads, head_dim=mods[0].head_dim if mods else None)
    per_head = isinstance(config, (list, tuple)) and bool(config) and all(isinstance(p, Pattern) for p in config)
    if config is None or isinstance(config, Pattern) or per_head:
        cfg = ModelConfig.uniform(config, **shape, **meta, model_name=getattr(text, "_name_or_path", None) or None)
    elif isinstance(config, ModelConfig):
        cfg = config
    elif isinstance(config, dict):
        cfg = ModelConfig.from_dict(config)
    elif isinstance(config, (str, os.PathLike)):
        cfg = _load_any(config, model)
    else:
        raise TypeError("config must be a ModelConfig, a Pattern, a per-head list of Patterns, a path, a dict or "
                        f"None; got {type(config).__name__}")
    return cfg.replace(**overrides) if overrides else cfg


def _load_any(path: str | os.PathLike, model: torch.nn.Module) -> ModelConfig:
    from flexinference.config import load_config

    if not os.path.isfile(path):
        raise ValueError(f"config path {os.fspath(path)!r} is not a file")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{os.fspath(path)} is not valid JSON: {err}") from None
    if isinstance(data, list):  # MInference's per-head best-pattern JSON: a list of layers
        from flexinference.compat.minference_config import load_minference_config

        return load_minference_config(path, model)
    return load_config(path)


def _sliding_window(module: torch.nn.Module) -> int | None:
    # Qwen2/Qwen3 store the per-layer window on the module; Mistral/Phi-3 pass config.sliding_window.
    if hasattr(module, "sliding_window"):
        return module.sliding_window
    return getattr(getattr(module, "config", None), "sliding_window", None)


def validate_config(config: ModelConfig, model: torch.nn.Module) -> list[torch.nn.Module]:
    """Check ``config`` against ``model``; return the attention modules (by layer). Raises ``ValueError``."""
    text = _text_config(model)
    mods = attention_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__} has no attention modules with layer_idx/head_dim/"
                         "num_key_value_groups: flexinference patches transformers decoder models whose attention "
                         "goes through AttentionInterface (Llama, Mistral, Qwen2/3, Phi-3, GLM, GLM-4, ...)")
    idx = [m.layer_idx for m in mods]
    if idx != list(range(len(mods))):
        raise ValueError(f"attention modules have layer_idx {idx}, expected 0..{len(mods) - 1} once each")
    if config.num_layers != len(mods):
        raise ValueError(f"config has {config.num_layers} layers but the model has {len(mods)} attention layers")
    if config.num_heads != text.num_attention_heads:
        raise ValueError(f"config has {config.num_heads} heads per layer but the model has "
                         f"{text.num_attention_heads} query heads (num_attention_heads)")
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    if config.num_key_value_heads is not None and config.num_key_value_heads != kv_heads:
        raise ValueError(f"config is for {config.num_key_value_heads} KV heads but the model has {kv_heads} "
                         "(num_key_value_heads)")
    for m in mods:
        if config.head_dim is not None and config.head_dim != m.head_dim:
            raise ValueError(f"config is for head_dim {config.head_dim} but layer {m.layer_idx} has {m.head_dim}")
        if not getattr(m, "is_causal", True):
            raise ValueError(f"layer {m.layer_idx} is not causal; flexinference patterns are causal only")
        window = _sliding_window(m)
        max_pos = getattr(text, "max_position_embeddings", None)
        if (window is not None and config.layer_plan(m.layer_idx).sparse
                and (max_pos is None or window < max_pos)):
            raise ValueError(
                f"layer {m.layer_idx} uses sliding-window attention (window {window}) and the config gives it "
                "sparse patterns, which replace full causal attention. Disable the window "
                "(model.config.sliding_window = None, as Mistral v0.2+ ship) or give that layer Dense heads."
            )
    return mods


def is_applied(model: torch.nn.Module) -> bool:
    """Whether :func:`apply` has patched ``model`` (and :func:`remove` has not undone it)."""
    return getattr(model, _STATE_ATTR, None) is not None


def apply(model: torch.nn.Module, config: Any = None, **overrides: Any) -> torch.nn.Module:
    """Patch ``model`` in place to run flexinference attention; returns the same model.

    Args:
        model: a transformers 5.x causal LM (or its base model).
        config: see :func:`resolve_config` (``None``: vertical-slash on every head).
        **overrides: ``min_sparse_len`` (sparse path for prefills of at least this many tokens, default
            4096), ``prefill_chunk_size`` (chunked prefill), ``impl`` (:class:`~flexinference.Impl`).

    Raises:
        ValueError: the config does not fit the model (layers, heads, KV heads, head dim, sliding window),
            or the model's attention does not dispatch through transformers' ``AttentionInterface``.

    Example:
        >>> import flexinference as fi
        >>> model = fi.apply(model, fi.AShape(sink=128, local=3968), min_sparse_len=8192)  # doctest: +SKIP
        >>> out = model.generate(input_ids, max_new_tokens=32)                             # doctest: +SKIP
        >>> fi.remove(model)                                                                # doctest: +SKIP
    """
    cfg = resolve_config(config, model, **overrides)
    mods = validate_config(cfg, model)  # before touching the model: a bad config leaves it as it was
    if is_applied(model):
        remove(model)  # re-applying replaces the previous patch
    original_attn = model.config._attn_implementation
    register()
    model.set_attn_implementation(ATTENTION_NAME)
    if model.config._attn_implementation != ATTENTION_NAME:
        model.set_attn_implementation(original_attn)
        raise ValueError(f"{type(model).__name__} does not let transformers switch its attention implementation "
                         "(its attention does not call AttentionInterface), so flexinference cannot patch it")
    for m in mods:
        setattr(m, PLAN_ATTR, cfg.layer_plan(m.layer_idx))
    setattr(model, _STATE_ATTR, _PatchState(cfg, original_attn))
    install_attribute(model, "forward", _wrap_forward(model, model.forward, cfg))
    return model


def install_attribute(model: torch.nn.Module, name: str, value: Any) -> None:
    """Set instance attribute ``name`` on a patched model; :func:`remove` restores what was there."""
    state: _PatchState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("model is not patched by flexinference.apply")
    if name not in state.saved:
        state.saved[name] = (name in model.__dict__, model.__dict__.get(name))
    setattr(model, name, value)


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply`: original attention implementation, no plans, original ``forward``."""
    state: _PatchState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("model is not patched by flexinference.apply")
    for m in attention_modules(model):
        m.__dict__.pop(PLAN_ATTR, None)
    for name, (had, value) in state.saved.items():
        if had:
            setattr(model, name, value)
        else:
            model.__dict__.pop(name, None)
    model.set_attn_implementation(state.original_attn)
    delattr(model, _STATE_ATTR)
    return model


@contextlib.contextmanager
def patched(model: torch.nn.Module, config: Any = None, **overrides: Any) -> Iterator[torch.nn.Module]:
    """``with patched(model, cfg) as m:`` applies on entry and removes on exit (also on error)."""
    apply(model, config, **overrides)
    try:
        yield model
    finally:
        if is_applied(model):
            remove(model)


# -- forward wrapper: static-cache guard and chunked prefill ---------------------------------------------
def _wrap_forward(model: torch.nn.Module, original, cfg: ModelConfig):
    names = [n for n, p in inspect.signature(original).parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    cache_key = "cache" if "cache" in names else "past_key_values"
    any_sparse = any(cfg.layer_plan(i).sparse for i in range(cfg.num_layers))
    chunk = cfg.prefill_chunk_size

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any):
        if args:
            if len(args) > len(names):
                raise TypeError(f"forward takes at most {len(names)} positional arguments, got {len(args)}")
            for name, value in zip(names, args):
                if name in kwargs:
                    raise TypeError(f"forward got multiple values for argument {name!r}")
                kwargs[name] = value
        if cache_key != "past_key_values" and "past_key_values" in kwargs:
            kwargs[cache_key] = kwargs.pop("past_key_values")
        x = kwargs.get("input_ids")
        x = kwargs.get("inputs_embeds") if x is None else x
        if x is None:
            return original(**kwargs)
        q_len = x.shape[1]
        step = q_len if chunk is None else min(q_len, chunk)
        cache = kwargs.get(cache_key)
        if any_sparse and step >= cfg.min_sparse_len and getattr(cache, "is_compileable", False):
            raise ValueError(
                f"{type(cache).__name__} is a static (pre-allocated) cache, which the sparse prefill path does not "
                "support; use a DynamicCache (generate's default) or a flexinference cache policy"
            )
        if chunk is None or q_len <= chunk:
            return original(**kwargs)
        return _chunked_forward(model, original, kwargs, chunk, cache_key, "logits_to_keep" in names)

    return forward


@torch.compiler.disable
def _chunked_forward(model, original, kwargs: dict, chunk: int, cache_key: str, has_keep: bool):
    # Run outside dynamo: traced in one frame, several cache updates next to flex_attention lose their
    # mutations (observed with torch 2.13's eager/aot_eager backends). Each chunk is a plain forward.
    from transformers import DynamicCache

    for flag in ("output_attentions", "output_hidden_states"):
        if kwargs.get(flag):
            raise ValueError(f"prefill_chunk_size does not support {flag}=True")
    if kwargs.get("labels") is not None:
        raise ValueError("prefill_chunk_size does not support labels (it is an inference-time prefill)")
    tokens_key = "input_ids" if kwargs.get("input_ids") is not None else "inputs_embeds"
    x = kwargs[tokens_key]
    total = x.shape[1]
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise ValueError(f"prefill_chunk_size needs a 2-D attention_mask (B, past + S), got shape {tuple(mask.shape)}")
    keep = kwargs.get("logits_to_keep", 0)
    if not isinstance(keep, int):
        raise ValueError("prefill_chunk_size supports an integer logits_to_keep only")
    keep = total if keep == 0 or keep > total else keep
    return_dict = kwargs.get("return_dict", True)
    cache = kwargs.get(cache_key)
    if cache is None:
        cache = DynamicCache(config=model.config)
    past = cache.get_seq_length()
    positions, cache_position = kwargs.get("position_ids"), kwargs.get("cache_position")

    pieces, out = [], None
    for s in range(0, total, chunk):
        e = min(s + chunk, total)
        need = max(0, e - max(s, total - keep))  # how many of the kept tail positions fall in this chunk
        kw = dict(kwargs, return_dict=True, use_cache=True)
        kw[cache_key] = cache
        kw[tokens_key] = x[:, s:e]
        if mask is not None:
            kw["attention_mask"] = mask[:, : past + e]
        if positions is not None:
            kw["position_ids"] = positions[..., s:e]
        if cache_position is not None:
            kw["cache_position"] = cache_position[s:e]
        if has_keep:
            kw["logits_to_keep"] = max(need, 1)
        out = original(**kw)
        main = "logits" if getattr(out, "logits", None) is not None else "last_hidden_state"
        if need:
            pieces.append(getattr(out, main)[:, -need:])
    setattr(out, main, torch.cat(pieces, dim=1))
    return out if return_dict else out.to_tuple()
