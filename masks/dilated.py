"""Dilated diagonals plus leading columns (MInference's ``dilated1`` / ``dilated2`` heads).

Query ``i`` keeps key ``j <= i`` when ``j < sink``, or ``o = i - j`` satisfies ``o < band``, or
``band <= o < span`` and ``(o - band) % dilation == 0``. The main diagonal is always kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flexinference.masks.tables import HeadRows, head_rows, param
from flexinference.patterns import Dilated

__all__ = ["dilated_rows", "dense_mask"]


def dilated_rows(patterns: Sequence[Dilated], table_len: int, kv_len: int, device: torch.device) -> HeadRows:
    """Rule rows of ``len(patterns)`` dilated heads."""
    band = param((p.band for p in patterns), device)[:, None]
    span = param((p.span for p in patterns), device)[:, None]
    dilation = param((p.dilation for p in patterns), device)[:, None]
    o = torch.arange(table_len, device=device)[None, :]
    dilated = (o >= band) & (o < span) & ((o - band) % dilation == 0)
    return head_rows(
        len(patterns),
        table_len,
        device,
        sink=param((p.sink for p in patterns), device),
        local=band[:, 0],
        extra_diagonals=dilated,
    )


def dense_mask(pattern: Dilated, q_len: int, kv_len: int) -> Tensor:
    """Reference bool ``(q_len, kv_len)`` mask; queries are the last ``q_len`` positions."""
    i = torch.arange(kv_len - q_len, kv_len)[:, None]
    j = torch.arange(kv_len)[None, :]
    o = i - j
    p = pattern
    dilated = (o >= p.band) & (o < p.span) & ((o - p.band) % p.dilation == 0)
    return (j <= i) & ((j < p.sink) | (o < p.band) | (o == 0) | dilated)
