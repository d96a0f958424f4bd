"""Connect a policy cache to a model: query capture, per-layer mask fitting and the padding guard.

The cache sees keys and values only. SnapKV and PyramidKV score tokens with the last queries of a
multi-token update, so :func:`attach` installs a forward pre-hook on every attention module that, when
the cache is about to compress, recomputes those queries from the hook's ``hidden_states`` and
``position_embeddings`` with the module's own ``q_proj``, ``q_norm`` (Qwen3) and the family's
``apply_rotary_pos_emb``, for the last ``window`` tokens only, and hands them to the cache. The hooks are
removed by the returned handle (or on leaving the ``with`` block); nothing global is touched.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from flexinference.cache.base import PolicyCache

__all__ = ["SUPPORTED_MODEL_TYPES", "CacheAttachment", "attach"]

#: Model families whose attention computes ``q = rotary(q_norm?(q_proj(h)))`` with the module's
#: ``scaling``: the query capture reproduces exactly what their attention uses.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


class CacheAttachment:
    """Handle of the hooks installed by :func:`attach`: ``remove()`` or use as a context manager."""

    def __init__(self, handles: list[torch.utils.hooks.RemovableHandle]) -> None:
        self._handles = handles

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> CacheAttachment:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _call_cache(kwargs: dict[str, Any]) -> Any:
    # transformers >= 5.2x passes `cache=`, older 5.x `past_key_values=`.
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _model_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError("attach needs a transformers model (a module with a `.config`)")
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _check_full_attention(config: Any) -> None:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            raise ValueError(f"flexinference KV policies support full-attention layers only; model has {other}")
    elif getattr(config, "sliding_window", None) is not None:
        raise ValueError("flexinference KV policies support full-attention layers only; model uses a sliding window")


def _attention_modules(model: nn.Module, num_layers: int) -> list[nn.Module]:
    modules = [
        m for m in model.modules() if isinstance(getattr(m, "q_proj", None), nn.Linear) and hasattr(m, "layer_idx")
    ]
    if sorted(m.layer_idx for m in modules) != list(range(num_layers)):
        raise ValueError(
            f"expected one attention module with `q_proj` per layer (0..{num_layers - 1}), found layer indices "
            f"{sorted(m.layer_idx for m in modules)}"
        )
    return modules


def window_queries(
    module: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    count: int,
    rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Recompute the queries of the last ``count`` tokens as the attention module does.

    Args:
        module: a Llama-family attention module (``q_proj``, ``head_dim``, optional ``q_norm``).
        hidden_states: ``(B, S, hidden)`` the module's input.
        position_embeddings: ``(cos, sin)``, each ``(B, S, D)``.
        count: how many of the last tokens.
        rotary: the family's ``apply_rotary_pos_emb(q, k, cos, sin)``.

    Returns:
        ``(B, H_q, count, D)`` queries after (q-norm and) RoPE.
    """
    batch = hidden_states.shape[0]
    q = module.q_proj(hidden_states[:, -count:]).view(batch, count, -1, module.head_dim)
    q_norm = getattr(module, "q_norm", None)
    if q_norm is not None:
        q = q_norm(q)
    q = q.transpose(1, 2)
    cos, sin = position_embeddings
    q, _ = rotary(q, q, cos[:, -count:], sin[:, -count:])
    return q


def fit_mask(mask: Any, kept: int, q_len: int) -> Any:
    """Re-size a 4-D mask built for another layer's cache length to ``kept + q_len`` keys.

    Every kept token precedes the new queries, so its columns are all visible; the last ``q_len``
    columns (the new tokens, causal) are taken from the given mask. Works for boolean and additive masks.

    Args:
        mask: ``None`` or ``(B, 1 or H, q_len, K)`` tensor (no padding).
        kept: tokens this layer stores before the update.
        q_len: new tokens.
    """
    if mask is None:
        return None
    shape = getattr(mask, "shape", None)
    if shape is not None and len(shape) == 4 and shape[-1] == kept + q_len:
        return mask
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise NotImplementedError(
            f"per-layer cache lengths need a 4-D tensor attention mask, got {type(mask).__name__}; use the "
            "sdpa, eager or flexinference attention implementation"
        )
    visible = mask[..., -1:, -1:].expand(*mask.shape[:2], mask.shape[2], kept)
    return torch.cat([visible, mask[..., -q_len:]], dim=-1)


def attach(model: nn.Module, cache: PolicyCache) -> CacheAttachment:
    """Install the hooks ``cache`` needs on ``model``; remove them with the handle or a ``with`` block.

    * Always: the model's config is given to the cache (PyramidKV reads the number of layers), models
      with sliding-window layers are rejected, and for evicting policies a forward pre-hook on ``model``
      rejects padded batches (a 2-D ``attention_mask`` with zeros): after eviction the padding mask,
      indexed by original position, would no longer line up with the kept tokens.
    * For SnapKV / PyramidKV: a forward pre-hook on each attention module hands the last ``window``
      queries to the cache when it is about to compress, and re-fits the 4-D mask to the layer's own
      cache length (PyramidKV layers hold different counts). Only the model types in
      :data:`SUPPORTED_MODEL_TYPES` (standard ``q_proj``, optional ``q_norm``, rotary in the family's
      ``apply_rotary_pos_emb``) are accepted; others raise ``ValueError``.

    Hooks act only on calls that use this ``cache`` (``cache=`` or ``past_key_values=``).

    Args:
        model: a transformers causal LM (or its base model).
        cache: a :class:`~flexinference.cache.base.PolicyCache`.

    Returns:
        A :class:`CacheAttachment` (context manager).

    Example:
        >>> cache = SnapKVCache(budget=1024)
        >>> # with attach(model, cache):
        >>> #     out = model.generate(input_ids, past_key_values=cache, max_new_tokens=32)
    """
    if not isinstance(cache, PolicyCache):
        raise TypeError(f"cache must be a flexinference PolicyCache, got {type(cache).__name__}")
    config = _model_config(model)
    _check_full_attention(config)
    if cache.needs_query_capture and getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{type(cache).__name__} captures queries only for model types {sorted(SUPPORTED_MODEL_TYPES)}, "
            f"got {getattr(config, 'model_type', None)!r}"
        )
    cache.on_attach(config)
    handles: list[torch.utils.hooks.RemovableHandle] = []
    if cache.evicts:
        handles.append(model.register_forward_pre_hook(_padding_guard(cache), with_kwargs=True))
    if cache.needs_query_capture:
        for module in _attention_modules(model, int(config.num_hidden_layers)):
            rotary = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
            if rotary is None:
                raise ValueError(f"{type(module).__name__}: no apply_rotary_pos_emb in its modeling module")
            handles.append(module.register_forward_pre_hook(_query_hook(cache, rotary), with_kwargs=True))
    return CacheAttachment(handles)


def _padding_guard(cache: PolicyCache) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if _call_cache(kwargs) is not cache:
            return None
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
            raise ValueError(
                f"{type(cache).__name__} evicts tokens and does not support padded batches (attention_mask has "
                "zeros): run sequences one by one or without padding"
            )
        return None

    return hook


def _query_hook(cache: PolicyCache, rotary: Callable) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        if _call_cache(kwargs) is not cache:
            return None
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        layer_idx, q_len = module.layer_idx, hidden.shape[1]
        if cache.needs_queries(layer_idx, q_len):
            embeddings = kwargs.get("position_embeddings")
            if embeddings is None:
                raise ValueError(f"{type(module).__name__} was called without position_embeddings=")
            count = min(cache.query_window(), q_len)
            queries = window_queries(module, hidden, embeddings, count, rotary)
            cache.set_window_queries(layer_idx, queries, getattr(module, "scaling", None))
        if "attention_mask" in kwargs:
            kwargs["attention_mask"] = fit_mask(kwargs["attention_mask"], cache.tokens_kept(layer_idx), q_len)
            return args, kwargs
        return None

    return hook
