"""Dense causal attention expressed in the keep-table rule (every row kept from position 0)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flexinference.masks.tables import HeadRows, head_rows
from flexinference.patterns import Dense

__all__ = ["dense_rows", "dense_mask"]


def dense_rows(patterns: Sequence[Dense], table_len: int, kv_len: int, device: torch.device) -> HeadRows:
    """Rule rows of ``len(patterns)`` dense heads."""
    n = len(patterns)
    return head_rows(n, table_len, device, row_start=torch.zeros(n, dtype=torch.long, device=device))


def dense_mask(pattern: Dense, q_len: int, kv_len: int) -> Tensor:
    """Reference bool ``(q_len, kv_len)`` causal mask; queries are the last ``q_len`` positions."""
    i = torch.arange(kv_len - q_len, kv_len)[:, None]
    return torch.arange(kv_len)[None, :] <= i
