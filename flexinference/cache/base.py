"""Shared machinery of the KV-cache policies: a `Cache` base with memory reporting, and an eviction layer.

Every policy is a transformers 5.x layer-based :class:`~transformers.Cache` whose layers are created
lazily (one per decoder layer, at its first ``update``) by the policy's :meth:`PolicyCache._new_layer`.

Conventions shared by all policies
    * ``get_seq_length()`` returns the tokens **seen**, not the tokens kept: position ids, ``generate``'s
      prompt slicing on cache reuse and the attention mask's query offset all depend on it.
    * Keys are cached **after** RoPE, so a kept key keeps the rotary phase of its original position;
      evicting other tokens never changes it. ``get_mask_sizes`` reports ``kv_offset = seen - kept``,
      which places every kept token before the new queries (all of them are visible to the queries).
    * ``update`` returns the kept past plus the new states (what attention uses this step, exactly), and
      only afterwards trims what it stores, like transformers' ``DynamicSlidingWindowLayer``.
    * :meth:`PolicyCache.nbytes` counts the real bytes of every tensor held; :meth:`PolicyCache.stats`
      adds tokens seen and kept per layer and the bytes a dense cache would hold.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["check_int", "CacheStats", "PolicyCache", "PolicyLayer", "EvictionLayer", "gather_tokens"]


def check_int(obj: Any, name: str, minimum: int) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``name`` unless ``obj.name`` is an int >= ``minimum``."""
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{type(obj).__name__}.{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{type(obj).__name__}.{name} must be >= {minimum}, got {value}")


def _tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather tokens per (batch, head).

    Args:
        x: ``(B, H, N, D)`` (or ``(B, H, N)``).
        index: ``(B, H, K)`` int64 token indices into ``N``.

    Returns:
        ``(B, H, K, D)`` (or ``(B, H, K)``).
    """
    if x.dim() == 3:
        return torch.gather(x, 2, index)
    return torch.gather(x, 2, index.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


@dataclass(frozen=True, slots=True)
class CacheStats:
    """What a policy cache holds.

    Attributes:
        tokens_seen: tokens that went through the cache (the sequence length the model sees).
        tokens_kept: tokens stored per layer (quantized ones included).
        nbytes: real bytes of every tensor held (keys, values, quantization parameters, positions).
        dense_nbytes: bytes a dense cache (``DynamicCache``) would hold for the same tokens and dtype.
    """

    tokens_seen: int
    tokens_kept: tuple[int, ...]
    nbytes: int
    dense_nbytes: int

    @property
    def bytes_ratio(self) -> float:
        """``nbytes / dense_nbytes`` (1.0 for an empty cache)."""
        return self.nbytes / self.dense_nbytes if self.dense_nbytes else 1.0


class PolicyLayer(CacheLayerMixin):
    """Base of the policy layers: counts tokens seen and implements the batch/bookkeeping methods.

    Subclasses store their state in tensors listed by :meth:`_state_names` (each ``(B, ...)``, batch
    first) and implement ``update``, :meth:`tokens_kept` and :meth:`nbytes`.
    """

    is_sliding = False
    is_compileable = False
    # Eviction and quantization cannot be undone: `crop` (assisted decoding's rollback) is not supported.
    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.cumulative_length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        batch, heads, _, head_dim = key_states.shape
        self.keys = key_states.new_empty((batch, heads, 0, head_dim))
        self.values = value_states.new_empty((batch, heads, 0, value_states.shape[-1]))
        self.is_initialized = True

    def _state_names(self) -> tuple[str, ...]:
        return ("keys", "values")

    @abstractmethod
    def tokens_kept(self) -> int:
        """Tokens stored by this layer."""

    @abstractmethod
    def nbytes(self) -> int:
        """Real bytes of every tensor this layer holds."""

    def dense_nbytes(self) -> int:
        """Bytes a ``DynamicLayer`` would hold for the tokens seen, in this layer's dtype."""
        if not self.is_initialized:
            return 0
        batch, heads, _, head_dim = self.keys.shape
        per_token = batch * heads * (head_dim + self.values.shape[-1]) * self.keys.element_size()
        return self.cumulative_length * per_token

    def get_seq_length(self) -> int:
        """Tokens seen (not kept): positions and ``generate``'s cache reuse depend on it."""
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kept = self.tokens_kept()
        return kept + query_length, self.cumulative_length - kept

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        for name in self._state_names():
            setattr(self, name, None)
        self.is_initialized = False
        self.cumulative_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            f"{type(self).__name__} cannot be cropped: evicted or quantized tokens cannot be restored "
            "(assisted decoding / rollback is not supported by flexinference's KV policies)"
        )

    def offload(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support offloading")

    def prefetch(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support offloading")

    def _apply_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        for name in self._state_names():
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply_batch(lambda t: t[indices, ...])


class EvictionLayer(PolicyLayer):
    """A layer that stores a subset of the tokens seen, in their original order.

    Stores ``keys``/``values`` ``(B, H_kv, kept, D)`` and, with ``track_positions``, the original
    position of each kept token ``positions`` ``(B, H_kv, kept)`` int32 (counted in :meth:`nbytes`).
    Subclasses implement :meth:`_compress`.
    """

    def __init__(self, track_positions: bool = False) -> None:
        super().__init__()
        self.track_positions = track_positions
        self.positions: torch.Tensor | None = None

    def _state_names(self) -> tuple[str, ...]:
        return ("keys", "values", "positions")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        if self.track_positions:
            batch, heads = key_states.shape[:2]
            self.positions = torch.empty((batch, heads, 0), dtype=torch.int32, device=self.device)

    def tokens_kept(self) -> int:
        return 0 if not self.is_initialized else self.keys.shape[-2]

    def nbytes(self) -> int:
        return _tensor_bytes(self.keys, self.values, self.positions) if self.is_initialized else 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new states, return past + new (exact attention this step), then evict.

        Args:
            key_states: ``(B, H_kv, q_len, D)`` new keys, after RoPE.
            value_states: ``(B, H_kv, q_len, D)`` new values.
            **kwargs: policy inputs forwarded to :meth:`_compress` (``window_queries``, ``budget``).

        Returns:
            ``(keys, values)``, each ``(B, H_kv, kept_before + q_len, D)``.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q_len = key_states.shape[-2]
        seen_before = self.cumulative_length
        self.cumulative_length += q_len
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        positions = None
        if self.track_positions:
            batch, heads = key_states.shape[:2]
            new_pos = torch.arange(seen_before, seen_before + q_len, dtype=torch.int32, device=self.device)
            positions = torch.cat([self.positions, new_pos.expand(batch, heads, q_len)], dim=-1)
        self.keys, self.values, self.positions = self._compress(keys, values, positions, q_len, **kwargs)
        return keys, values

    @abstractmethod
    def _compress(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor | None,
        q_len: int,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Return what to store from ``keys``/``values``/``positions`` ``(B, H, N, ...)``."""


class PolicyCache(Cache):
    """Base of flexinference's KV-cache policies (a transformers 5.x layer-based ``Cache``).

    Layers are created lazily by :meth:`_new_layer` at their first ``update``. Policies that score
    tokens with the queries (SnapKV, PyramidKV) receive the last queries of a multi-token update through
    :meth:`set_window_queries`, called by the hooks that :func:`flexinference.cache.attach` installs
    (or by hand, see ``benchmarks/bench_cache.py``).
    """

    #: True when the policy drops tokens (padded batches are then rejected by ``attach``).
    evicts: ClassVar[bool] = True
    #: True when the policy needs the last queries of a multi-token update (``attach`` is required).
    needs_query_capture: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__(layers=[])
        self._window_queries: dict[int, tuple[torch.Tensor, float | None]] = {}

    @abstractmethod
    def _new_layer(self, layer_idx: int) -> PolicyLayer:
        """Create the layer that caches decoder layer ``layer_idx``."""

    def _update_kwargs(self, layer_idx: int, query_length: int) -> dict[str, Any]:
        """Extra keyword arguments for the layer's ``update`` (policy inputs)."""
        return {}

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Update layer ``layer_idx`` with ``(B, H_kv, q_len, D)`` keys/values; see ``Cache.update``."""
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer(len(self.layers)))
        policy_kwargs = self._update_kwargs(layer_idx, key_states.shape[-2])
        return self.layers[layer_idx].update(key_states, value_states, **policy_kwargs)

    # --- query capture -------------------------------------------------------------------------------
    def needs_queries(self, layer_idx: int, query_length: int) -> bool:
        """Whether the next update of ``layer_idx`` with ``query_length`` tokens scores with queries."""
        return False

    def query_window(self) -> int:
        """How many of the last queries a scoring update needs (0 when the policy needs none)."""
        return 0

    def set_window_queries(self, layer_idx: int, queries: torch.Tensor, scaling: float | None = None) -> None:
        """Hand the last queries of the coming update of ``layer_idx`` to the policy.

        Args:
            layer_idx: decoder layer index.
            queries: ``(B, H_q, w, D)`` the last ``w`` queries of the coming update, after RoPE (and after
                the family's q-norm), ``w <= q_len``; ``H_q`` a multiple of ``H_kv``.
            scaling: softmax scale of the attention (``None``: ``D ** -0.5``).
        """
        if not self.needs_query_capture:
            raise TypeError(f"{type(self).__name__} does not use queries")
        if queries.dim() != 4:
            raise ValueError(f"queries must be (B, H_q, w, D), got shape {tuple(queries.shape)}")
        self._window_queries[layer_idx] = (queries, scaling)

    def _pop_window_queries(self, layer_idx: int) -> tuple[torch.Tensor, float | None] | None:
        return self._window_queries.pop(layer_idx, None)

    def on_attach(self, model_config: Any) -> None:
        """Called by :func:`attach` with the model's (text) config; policies read what they need."""

    # --- reporting -----------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Real bytes of every tensor held by all layers."""
        return sum(layer.nbytes() for layer in self.layers)

    def dense_nbytes(self) -> int:
        """Bytes a dense ``DynamicCache`` would hold for the same tokens (same dtype)."""
        return sum(layer.dense_nbytes() for layer in self.layers)

    def tokens_seen(self, layer_idx: int = 0) -> int:
        """Tokens that went through layer ``layer_idx`` (equals ``get_seq_length``)."""
        return self.get_seq_length(layer_idx)

    def tokens_kept(self, layer_idx: int = 0) -> int:
        """Tokens stored by layer ``layer_idx``."""
        return self.layers[layer_idx].tokens_kept() if layer_idx < len(self.layers) else 0

    def stats(self) -> CacheStats:
        """Tokens seen and kept per layer, real bytes and dense bytes."""
        return CacheStats(
            tokens_seen=self.tokens_seen(0),
            tokens_kept=tuple(layer.tokens_kept() for layer in self.layers),
            nbytes=self.nbytes(),
            dense_nbytes=self.dense_nbytes(),
        )

    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """Original positions ``(B, H_kv, kept)`` (int32) of the tokens layer ``layer_idx`` stores.

        Needs ``track_positions=True`` at construction (eviction policies only).
        """
        layer = self.layers[layer_idx]
        if getattr(layer, "positions", None) is None:
            raise ValueError(f"{type(self).__name__} was built without track_positions=True")
        return layer.positions
