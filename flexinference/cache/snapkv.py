"""SnapKV: keep the prefix tokens the last queries attend to most, plus the observation window.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024
(arXiv:2404.14469).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from flexinference.cache.base import EvictionLayer, PolicyCache, check_int, gather_tokens

__all__ = ["SnapKVConfig", "SnapKVCache", "ScoredEvictionLayer", "snapkv_scores", "select_top_prefix"]

POOLINGS = ("avg", "max")


def check_scoring_args(obj: Any) -> None:
    """Validate ``budget``, ``window``, ``kernel_size`` and ``pooling`` of a scoring config."""
    check_int(obj, "window", 1)
    check_int(obj, "budget", 1)
    check_int(obj, "kernel_size", 1)
    if obj.budget <= obj.window:
        raise ValueError(f"{type(obj).__name__}.budget must be > window ({obj.window}), got {obj.budget}")
    if obj.kernel_size % 2 == 0:
        raise ValueError(f"{type(obj).__name__}.kernel_size must be odd (same-length pooling), got {obj.kernel_size}")
    if obj.pooling not in POOLINGS:
        raise ValueError(f"{type(obj).__name__}.pooling must be one of {POOLINGS}, got {obj.pooling!r}")


@dataclass(frozen=True, slots=True)
class SnapKVConfig:
    """SnapKV parameters (defaults from the paper / MInference: 4096, 32, 5, avg).

    Attributes:
        budget: tokens kept after a compression (``budget - window`` prefix tokens plus the window).
        window: observation window: the last ``window`` queries score the prefix, the last ``window``
            tokens are always kept.
        kernel_size: odd 1-D pooling kernel over the prefix scores (1: no pooling).
        pooling: ``"avg"`` (zero-padded, divides by ``kernel_size``) or ``"max"``.
    """

    budget: int = 4096
    window: int = 32
    kernel_size: int = 5
    pooling: str = "avg"

    def __post_init__(self) -> None:
        check_scoring_args(self)


def snapkv_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    num_prefix: int,
    *,
    scaling: float | None = None,
    kernel_size: int = 5,
    pooling: str = "avg",
) -> torch.Tensor:
    """SnapKV prefix scores at KV-head granularity, from the last queries only.

    The ``w`` queries are the last ``w`` tokens of the ``N``-token sequence (query ``i`` sits at position
    ``N - w + i`` and sees keys ``<= N - w + i``). Scores are the softmax attention (fp32) of each query
    head, summed over the ``w`` queries, averaged over the query heads of each KV group, restricted to the
    first ``num_prefix`` keys, then 1-D pooled along the tokens. Only a ``(w, N)`` slab per query head is
    formed, never the ``N x N`` matrix. The product runs in the inputs' dtype (as SnapKV does), the
    softmax in fp32.

    Args:
        queries: ``(B, H_q, w, D)`` after RoPE; query head ``h`` reads KV head ``h // (H_q / H_kv)``.
        keys: ``(B, H_kv, N, D)`` after RoPE, ``N >= w``.
        num_prefix: how many leading keys to score (``<= N``).
        scaling: softmax scale (``None``: ``D ** -0.5``).
        kernel_size: odd pooling kernel (zero padding of ``kernel_size // 2``; 1: none).
        pooling: ``"avg"`` or ``"max"``.

    Returns:
        ``(B, H_kv, num_prefix)`` float32 scores.
    """
    batch, heads_q, w, head_dim = queries.shape
    heads_kv, n = keys.shape[1], keys.shape[2]
    if heads_q % heads_kv:
        raise ValueError(f"queries heads ({heads_q}) must be a multiple of keys heads ({heads_kv})")
    if w > n or num_prefix > n:
        raise ValueError(f"need w ({w}) <= N ({n}) and num_prefix ({num_prefix}) <= N")
    group = heads_q // heads_kv
    scale = head_dim**-0.5 if scaling is None else scaling
    q = queries.to(keys.dtype).reshape(batch, heads_kv, group * w, head_dim)
    logits = torch.matmul(q, keys.transpose(-1, -2)).float().mul_(scale).view(batch, heads_kv, group, w, n)
    query_pos = torch.arange(n - w, n, device=keys.device)
    future = torch.arange(n, device=keys.device)[None, :] > query_pos[:, None]  # (w, N)
    logits.masked_fill_(future, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    scores = probs[..., :num_prefix].sum(dim=3).mean(dim=2)  # (B, H_kv, num_prefix)
    if kernel_size > 1:
        flat = scores.reshape(batch * heads_kv, 1, num_prefix)
        if pooling == "avg":
            flat = F.avg_pool1d(flat, kernel_size, stride=1, padding=kernel_size // 2)
        elif pooling == "max":
            flat = F.max_pool1d(flat, kernel_size, stride=1, padding=kernel_size // 2)
        else:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        scores = flat.view(batch, heads_kv, num_prefix)
    return scores


def select_top_prefix(scores: torch.Tensor, keep: int, total: int) -> torch.Tensor:
    """Indices of the ``keep`` best prefix tokens (in original order) followed by the window.

    Args:
        scores: ``(B, H, P)`` prefix scores, ``keep <= P``.
        keep: prefix tokens to keep.
        total: sequence length ``N``; tokens ``P .. N-1`` (the window) are always kept.

    Returns:
        ``(B, H, keep + N - P)`` int64 indices, increasing.
    """
    batch, heads, prefix = scores.shape
    top = scores.topk(keep, dim=-1, sorted=False).indices.sort(dim=-1).values
    window = torch.arange(prefix, total, device=scores.device).expand(batch, heads, total - prefix)
    return torch.cat([top, window], dim=-1)


class ScoredEvictionLayer(EvictionLayer):
    """Layer of SnapKV and PyramidKV: compresses a multi-token update that exceeds the budget.

    ``update(..., budget=C, window_queries=(q, scaling))``: when ``q_len > 1`` and ``kept + q_len > C``,
    keeps the top ``C - window`` prefix tokens per KV head (SnapKV scores of the last
    ``min(window, q_len)`` queries) plus the last ``window`` tokens. Decode steps only append.
    """

    def __init__(self, config: Any, track_positions: bool = False) -> None:
        super().__init__(track_positions)
        self.config = config

    def _compress(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor | None,
        q_len: int,
        budget: int | None = None,
        window_queries: tuple[torch.Tensor, float | None] | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        n = keys.shape[-2]
        if budget is None or q_len <= 1 or n <= budget:
            return keys, values, positions
        if window_queries is None:
            raise RuntimeError(
                f"{type(self).__name__}: compressing {n} tokens to {budget} needs the last queries of this "
                "update; run the model inside `with flexinference.cache.attach(model, cache):` (or call "
                "cache.set_window_queries before the update)"
            )
        queries, scaling = window_queries
        w = min(self.config.window, q_len)
        if queries.shape[2] < w or queries.shape[2] > q_len:
            raise ValueError(f"window queries must cover the last {w} tokens of the update, got {queries.shape[2]}")
        if queries.shape[0] != keys.shape[0] or queries.shape[-1] != keys.shape[-1]:
            raise ValueError(f"queries {tuple(queries.shape)} do not match keys {tuple(keys.shape)}")
        window = self.config.window
        prefix = n - window
        scores = snapkv_scores(
            queries[:, :, -w:],
            keys,
            prefix,
            scaling=scaling,
            kernel_size=self.config.kernel_size,
            pooling=self.config.pooling,
        )
        index = select_top_prefix(scores, budget - window, n)
        kept_pos = None if positions is None else gather_tokens(positions, index)
        return gather_tokens(keys, index), gather_tokens(values, index), kept_pos


class ScoredEvictionCache(PolicyCache):
    """Base of SnapKV and PyramidKV: per-layer budget, query capture, scored eviction."""

    needs_query_capture = True

    def __init__(self, config: Any, track_positions: bool) -> None:
        self.config = config
        self.track_positions = bool(track_positions)
        super().__init__()

    def layer_budget(self, layer_idx: int, tokens_seen: int) -> int:
        """Tokens layer ``layer_idx`` keeps after compressing a ``tokens_seen``-token context."""
        return self.config.budget

    def _new_layer(self, layer_idx: int) -> ScoredEvictionLayer:
        return ScoredEvictionLayer(self.config, track_positions=self.track_positions)

    def query_window(self) -> int:
        return self.config.window

    def needs_queries(self, layer_idx: int, query_length: int) -> bool:
        if query_length <= 1:
            return False
        kept = self.tokens_kept(layer_idx)
        return kept + query_length > self.layer_budget(layer_idx, self.tokens_seen(layer_idx) + query_length)

    def _update_kwargs(self, layer_idx: int, query_length: int) -> dict[str, Any]:
        if query_length <= 1:  # decode steps never compress
            return {}
        seen = self.tokens_seen(layer_idx) + query_length
        return {
            "budget": self.layer_budget(layer_idx, seen),
            "window_queries": self._pop_window_queries(layer_idx),
        }


class SnapKVCache(ScoredEvictionCache):
    """SnapKV cache (Li et al., NeurIPS 2024, arXiv:2404.14469), KV-head granularity.

    When a multi-token update (a prefill, or a later turn's prompt) takes a layer over ``budget``
    tokens, the last ``min(window, q_len)`` queries of that update score every earlier token (softmax in
    fp32, summed over the window, averaged over the query heads of each KV group, 1-D pooled), and the
    layer keeps the ``budget - window`` best prefix tokens per KV head (original order) plus the last
    ``window`` tokens. The update itself attends to everything (exact prefill). Decode steps append
    without compression, so after ``T`` generated tokens a layer holds ``budget + T - 1``.

    Multi-turn: the next prompt is appended to what is kept; if ``kept + q_len > budget`` the whole
    stored cache plus the new prompt is re-scored by the new prompt's last queries and compressed back to
    ``budget`` (earlier compressed tokens compete again; evicted ones are gone for good).

    Keys are cached after RoPE: kept keys keep their original rotary phases, and ``get_seq_length``
    counts tokens seen, so positions stay right after eviction.

    Queries are captured by the hooks of :func:`flexinference.cache.attach` (Llama-family models: see
    :data:`flexinference.cache.SUPPORTED_MODEL_TYPES`); a compression without them raises. Padded
    batches are rejected by ``attach``.

    Args:
        budget: tokens kept after compression (> ``window``).
        window: observation window (>= 1).
        kernel_size: odd pooling kernel.
        pooling: ``"avg"`` or ``"max"``.
        track_positions: also store each kept token's original position (``kept_positions``).

    Example:
        >>> cache = SnapKVCache(budget=1024, window=32)
        >>> # with attach(model, cache):
        >>> #     out = model.generate(input_ids, past_key_values=cache, max_new_tokens=64)
    """

    def __init__(
        self,
        budget: int = 4096,
        window: int = 32,
        kernel_size: int = 5,
        pooling: str = "avg",
        *,
        track_positions: bool = False,
    ) -> None:
        super().__init__(SnapKVConfig(budget, window, kernel_size, pooling), track_positions)
