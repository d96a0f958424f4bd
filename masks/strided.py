"""Strided sparse attention (Child et al., 2019, arXiv:1904.10509, the "strided" pattern).

Query ``i`` keeps key ``j <= i`` when ``(i - j) % stride == 0``, ``i - j < local`` or ``j < sink``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flexinference.masks.tables import HeadRows, head_rows, param
from flexinference.patterns import Strided

__all__ = ["strided_rows", "dense_mask"]


def strided_rows(patterns: Sequence[Strided], table_len: int, kv_len: int, device: torch.device) -> HeadRows:
    """Rule rows of ``len(patterns)`` strided heads."""
    stride = param((p.stride for p in patterns), device)[:, None]
    o = torch.arange(table_len, device=device)[None, :]
    return head_rows(
        len(patterns),
        table_len,
        device,
        sink=param((p.sink for p in patterns), device),
        local=param((p.local for p in patterns), device),
        extra_diagonals=o % stride == 0,
    )


def dense_mask(pattern: Strided, q_len: int, kv_len: int) -> Tensor:
    """Reference bool ``(q_len, kv_len)`` mask; queries are the last ``q_len`` positions."""
    i = torch.arange(kv_len - q_len, kv_len)[:, None]
    j = torch.arange(kv_len)[None, :]
    o = i - j
    return (j <= i) & ((o % pattern.stride == 0) | (o < pattern.local) | (j < pattern.sink))
