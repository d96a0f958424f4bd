"""StreamingLLM KV cache: attention sinks plus a recent window.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024 (arXiv:2309.17453).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flexinference.cache.base import EvictionLayer, PolicyCache, check_int

__all__ = ["StreamingLLMConfig", "StreamingLLMCache"]


@dataclass(frozen=True, slots=True)
class StreamingLLMConfig:
    """Keep the first ``sink`` and the last ``window`` tokens (defaults: MInference's 128 + 3968)."""

    sink: int = 128
    window: int = 3968

    def __post_init__(self) -> None:
        check_int(self, "sink", 0)
        check_int(self, "window", 1)

    @property
    def capacity(self) -> int:
        """Tokens stored at most after any update (``sink + window``)."""
        return self.sink + self.window


class StreamingLLMLayer(EvictionLayer):
    """Stores the first ``sink`` tokens seen and the ``window`` most recent ones, in order."""

    def __init__(self, config: StreamingLLMConfig, track_positions: bool = False) -> None:
        super().__init__(track_positions)
        self.config = config

    def _compress(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor | None,
        q_len: int,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        sink, window = self.config.sink, self.config.window
        if keys.shape[-2] <= sink + window:
            return keys, values, positions

        # The stored prefix always starts with the sink tokens (never evicted), so slicing suffices.
        def keep(x: torch.Tensor | None) -> torch.Tensor | None:
            if x is None:
                return None
            return torch.cat([x[:, :, :sink], x[:, :, -window:]], dim=2)

        return keep(keys), keep(values), keep(positions)


class StreamingLLMCache(PolicyCache):
    """StreamingLLM cache: after every update, stores the first ``sink`` and last ``window`` tokens.

    Xiao et al., ICLR 2024 (arXiv:2309.17453). Each update first returns the stored tokens plus the new
    ones (so a prefill attends densely and causally, and a decode token sees ``sink + window`` past tokens
    plus itself), then evicts down to ``sink + window``. Keys are cached after RoPE: kept keys keep their
    original rotary phases, and ``get_seq_length`` counts tokens seen, so new tokens get their true
    positions. (The paper re-numbers positions inside the cache so that streams can exceed the trained
    length; that needs keys cached before RoPE, which transformers does not do. Here positions are the
    original ones, exact for contexts within the model's length, as in MInference/SCBench.)

    Multi-turn: a later prompt appended after an answer attends to the stored sink + window and to itself
    (causally); eviction then resumes. Padded batches would misalign the 2-D padding mask after eviction:
    :func:`flexinference.cache.attach` rejects them (``attach`` is optional for this policy).

    Args:
        sink: tokens kept at the start (>= 0).
        window: most recent tokens kept (>= 1).
        track_positions: also store each kept token's original position (``kept_positions``).

    Example:
        >>> cache = StreamingLLMCache(sink=4, window=60)
        >>> # model.generate(input_ids, past_key_values=cache, max_new_tokens=32)
    """

    def __init__(self, sink: int = 128, window: int = 3968, *, track_positions: bool = False) -> None:
        self.config = StreamingLLMConfig(sink=sink, window=window)
        self.track_positions = bool(track_positions)
        super().__init__()

    def _new_layer(self, layer_idx: int) -> StreamingLLMLayer:
        return StreamingLLMLayer(self.config, track_positions=self.track_positions)
