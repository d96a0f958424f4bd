"""Vertical-slash masks (MInference, Jiang et al., 2024, arXiv:2407.02490).

Query ``i`` keeps key ``j <= i`` when ``j`` is a kept column (vertical) or ``i - j`` a kept diagonal
offset (slash). Columns and diagonals are token-granular; the main diagonal is always kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flexinference.masks.tables import HeadRows
from flexinference.patterns import VerticalSlashStatic

__all__ = ["index_table", "static_rows", "dense_mask", "dense_mask_from_indices"]


def index_table(indices: Tensor, table_len: int) -> Tensor:
    """Scatter integer indices ``(..., K)`` into a bool table ``(..., table_len)``.

    Negative indices and indices ``>= table_len`` are ignored; duplicates are harmless.
    """
    idx = indices.long()
    inside = (idx >= 0) & (idx < table_len)
    table = torch.zeros(*idx.shape[:-1], table_len + 1, dtype=torch.bool, device=idx.device)
    table.scatter_(-1, torch.where(inside, idx, table_len), True)
    return table[..., :table_len]


def static_rows(
    patterns: Sequence[VerticalSlashStatic], table_len: int, kv_len: int, device: torch.device
) -> HeadRows:
    """Rule rows of ``len(patterns)`` heads with fixed columns and diagonal offsets."""
    n = len(patterns)
    width = max(1, max(max(len(p.columns), len(p.diagonals)) for p in patterns))

    def padded(rows):
        out = torch.full((n, width), -1, dtype=torch.long)
        for r, values in enumerate(rows):  # config data, built once per layer on the host
            out[r, : len(values)] = torch.tensor(values, dtype=torch.long)
        return out.to(device)

    columns = index_table(padded([p.columns for p in patterns]), table_len)
    diagonals = index_table(padded([p.diagonals for p in patterns]), table_len)
    diagonals[:, 0] = True
    never = torch.full((n,), torch.iinfo(torch.int32).max, dtype=torch.int32, device=device)
    return HeadRows(columns, diagonals, never)


def dense_mask_from_indices(columns: Tensor, diagonals: Tensor, q_len: int, kv_len: int) -> Tensor:
    """Reference bool ``(..., q_len, kv_len)`` mask from index tensors ``(..., NV)`` and ``(..., NS)``."""
    i = torch.arange(kv_len - q_len, kv_len)[:, None]
    j = torch.arange(kv_len)[None, :]
    col = (j[..., None] == columns[..., None, None, :].cpu()).any(-1)
    diag = ((i - j)[..., None] == diagonals[..., None, None, :].cpu()).any(-1)
    return (j <= i) & (col | diag | (i == j))


def dense_mask(pattern: VerticalSlashStatic, q_len: int, kv_len: int) -> Tensor:
    """Reference bool ``(q_len, kv_len)`` mask of a static vertical-slash head."""
    return dense_mask_from_indices(
        torch.tensor(pattern.columns, dtype=torch.long),
        torch.tensor(pattern.diagonals, dtype=torch.long),
        q_len,
        kv_len,
    )
