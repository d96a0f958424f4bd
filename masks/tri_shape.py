"""Tri-shape (SCBench, Li et al., 2024, arXiv:2412.10319): A-shape plus dense last queries.

Query ``i`` keeps key ``j <= i`` when ``j < sink``, ``i - j < local`` or ``i >= S_kv - last``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flexinference.masks.tables import HeadRows, head_rows, param
from flexinference.patterns import TriShape

__all__ = ["tri_shape_rows", "dense_mask"]


def tri_shape_rows(patterns: Sequence[TriShape], table_len: int, kv_len: int, device: torch.device) -> HeadRows:
    """Rule rows of ``len(patterns)`` tri-shape heads for a sequence of ``kv_len`` keys."""
    return head_rows(
        len(patterns),
        table_len,
        device,
        sink=param((p.sink for p in patterns), device),
        local=param((p.local for p in patterns), device),
        row_start=kv_len - param((p.last for p in patterns), device),
    )


def dense_mask(pattern: TriShape, q_len: int, kv_len: int) -> Tensor:
    """Reference bool ``(q_len, kv_len)`` mask; queries are the last ``q_len`` positions."""
    i = torch.arange(kv_len - q_len, kv_len)[:, None]
    j = torch.arange(kv_len)[None, :]
    last_rows = i >= kv_len - pattern.last
    return (j <= i) & ((j < pattern.sink) | (i - j < pattern.local) | last_rows)
