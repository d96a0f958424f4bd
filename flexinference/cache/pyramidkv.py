"""PyramidKV: SnapKV selection with per-layer budgets that shrink with depth.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
2024 (arXiv:2406.02069).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from flexinference.cache.snapkv import ScoredEvictionCache, check_scoring_args

__all__ = ["PyramidKVConfig", "PyramidKVCache", "pyramid_budgets"]


@dataclass(frozen=True, slots=True)
class PyramidKVConfig:
    """PyramidKV parameters: SnapKV's plus ``beta`` (defaults 4096, 32, 5, avg, 20).

    ``budget`` is the *average* per-layer budget (PyramidKV's capacity ``C``); the total over layers
    equals SnapKV's at the same budget.
    """

    budget: int = 4096
    window: int = 32
    kernel_size: int = 5
    pooling: str = "avg"
    beta: float = 20.0

    def __post_init__(self) -> None:
        check_scoring_args(self)
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)):
            raise TypeError(f"PyramidKVConfig.beta must be a number, got {type(self.beta).__name__}")
        if not math.isfinite(self.beta) or self.beta < 1:
            raise ValueError(f"PyramidKVConfig.beta must be a finite number >= 1, got {self.beta}")


def pyramid_budgets(capacity: int, window: int, beta: float, num_layers: int, tokens: int) -> tuple[int, ...]:
    """Per-layer token budgets (window included) of PyramidKV for a ``tokens``-long context.

    With ``C`` capacity, ``W`` window, ``L`` layers and ``N`` tokens (METHODS.md):
    ``N <= C`` or ``N < 2(C - W)``: every layer keeps ``C`` (plain SnapKV; ``N <= C`` compresses nothing).
    Otherwise ``min = (C - W) / beta``, ``max = 2(C - W) - min``; if ``max >= N - W`` then ``max = N - W``
    and ``min = 2(C - W) - max``; layer ``l`` keeps ``max - l (max - min) / (L - 1)`` prefix tokens plus
    ``W``. The real-valued prefix budgets are rounded by largest remainder so that their sum is exactly
    ``L (C - W)``: the same total as SnapKV. ``L = 1`` keeps ``C``.

    Returns:
        ``L`` budgets, non-increasing with depth.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    span = capacity - window
    if num_layers == 1 or tokens <= capacity or tokens < 2 * span:
        return (capacity,) * num_layers
    low = span / beta
    high = 2 * span - low
    if high >= tokens - window:
        high = tokens - window
        low = 2 * span - high
    step = (high - low) / (num_layers - 1)
    real = [high - layer * step for layer in range(num_layers)]
    floors = [math.floor(x) for x in real]
    short = num_layers * span - sum(floors)
    # Largest remainder; ties go to shallower layers so budgets stay non-increasing.
    order = sorted(range(num_layers), key=lambda i: (floors[i] - real[i], i))
    for i in order[:short]:
        floors[i] += 1
    return tuple(f + window for f in floors)


class PyramidKVCache(ScoredEvictionCache):
    """PyramidKV cache (Cai et al., 2024, arXiv:2406.02069): SnapKV with pyramidal per-layer budgets.

    Same selection, compression trigger, multi-turn behaviour, RoPE/position handling and query capture
    as :class:`~flexinference.cache.SnapKVCache`, but layer ``l`` keeps ``pyramid_budgets(...)[l]`` tokens:
    more in shallow layers, fewer in deep ones, the same total as SnapKV at ``budget``. Budgets are a
    function of the tokens seen ``N`` (the context length at the compressing update).

    The number of decoder layers comes from the constructor (``num_layers``) or, when omitted, from the
    model config given to :func:`flexinference.cache.attach` (which PyramidKV needs anyway, for the
    queries); a mismatch between the two raises ``ValueError``. Layers keep different token counts, so
    ``attach`` also re-fits the 4-D attention mask of each layer (transformers builds one mask, sized
    for layer 0).

    Args:
        budget: average tokens kept per layer (> ``window``).
        window: observation window.
        kernel_size: odd pooling kernel.
        pooling: ``"avg"`` or ``"max"``.
        beta: pyramid steepness (>= 1; the last layer keeps about ``(budget - window) / beta + window``).
        num_layers: decoder layers (``None``: from ``attach``).
        track_positions: also store each kept token's original position (``kept_positions``).

    Example:
        >>> cache = PyramidKVCache(budget=1024, window=32)
        >>> # with attach(model, cache):
        >>> #     out = model.generate(input_ids, past_key_values=cache, max_new_tokens=64)
    """

    def __init__(
        self,
        budget: int = 4096,
        window: int = 32,
        kernel_size: int = 5,
        pooling: str = "avg",
        beta: float = 20.0,
        *,
        num_layers: int | None = None,
        track_positions: bool = False,
    ) -> None:
        if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int)):
            raise TypeError(f"PyramidKVCache.num_layers must be an int or None, got {type(num_layers).__name__}")
        if num_layers is not None and num_layers < 1:
            raise ValueError(f"PyramidKVCache.num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        self._memo: tuple[int, tuple[int, ...]] | None = None
        super().__init__(PyramidKVConfig(budget, window, kernel_size, pooling, beta), track_positions)

    def on_attach(self, model_config: Any) -> None:
        layers = int(model_config.num_hidden_layers)
        if self.num_layers is not None and self.num_layers != layers:
            raise ValueError(f"PyramidKVCache.num_layers is {self.num_layers} but the model has {layers} layers")
        self.num_layers = layers

    def budgets(self, tokens_seen: int) -> tuple[int, ...]:
        """All layers' budgets for a ``tokens_seen``-token context."""
        if self.num_layers is None:
            raise RuntimeError(
                "PyramidKVCache needs the number of layers: pass num_layers= or use "
                "flexinference.cache.attach(model, cache)"
            )
        if self._memo is None or self._memo[0] != tokens_seen:
            cfg = self.config
            self._memo = (tokens_seen, pyramid_budgets(cfg.budget, cfg.window, cfg.beta, self.num_layers, tokens_seen))
        return self._memo[1]

    def layer_budget(self, layer_idx: int, tokens_seen: int) -> int:
        if tokens_seen <= self.config.budget:
            return self.config.budget  # nothing to compress: no need to know the depth yet
        budgets = self.budgets(tokens_seen)
        if layer_idx >= len(budgets):
            raise ValueError(f"layer {layer_idx} is beyond PyramidKVCache.num_layers ({self.num_layers})")
        return budgets[layer_idx]
