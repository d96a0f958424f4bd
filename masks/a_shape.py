"""A-shape (StreamingLLM's attention sinks plus a local window; Xiao et al., 2023, arXiv:2309.17453).

Query ``i`` keeps key ``j <= i`` when ``j < sink`` or ``i - j < local``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flexinference.masks.tables import HeadRows, head_rows, param
from flexinference.patterns import AShape

__all__ = ["a_shape_rows", "dense_mask"]


def a_shape_rows(patterns: Sequence[AShape], table_len: int, kv_len: int, device: torch.device) -> HeadRows:
    """Rule rows of ``len(patterns)`` A-shape heads (``kv_len`` unused: the shape is length-free)."""
    return head_rows(
        len(patterns),
        table_len,
        device,
        sink=param((p.sink for p in patterns), device),
        local=param((p.local for p in patterns), device),
    )


def dense_mask(pattern: AShape, q_len: int, kv_len: int) -> Tensor:
    """Reference bool ``(q_len, kv_len)`` mask; queries are the last ``q_len`` positions."""
    i = torch.arange(kv_len - q_len, kv_len)[:, None]
    j = torch.arange(kv_len)[None, :]
    return (j <= i) & ((j < pattern.sink) | (i - j < pattern.local))
