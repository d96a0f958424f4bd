"""Block-sparse masks (MInference's block-sparse head; also the output of FlexPrefill and XAttention).

Query ``i`` keeps key ``j <= i`` when the cell ``(i // block, j // block)`` is selected. The diagonal
cell is always kept so no query row is empty.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["block_table", "dense_mask"]


def block_table(block_indices: Tensor, num_blocks: int) -> Tensor:
    """Bool cell table ``(..., N, N)`` from key-block indices ``(..., N, K)`` per query block.

    Indices outside ``[0, N)`` are ignored; the diagonal cell is added.
    """
    idx = block_indices.long()
    inside = (idx >= 0) & (idx < num_blocks)
    table = torch.zeros(*idx.shape[:-1], num_blocks + 1, dtype=torch.bool, device=idx.device)
    table.scatter_(-1, torch.where(inside, idx, num_blocks), True)
    table = table[..., :num_blocks]
    return table | torch.eye(num_blocks, dtype=torch.bool, device=idx.device)


def dense_mask(cells: Tensor, block: int, q_len: int, kv_len: int) -> Tensor:
    """Reference bool ``(..., q_len, kv_len)`` mask of a cell table ``(..., N, N)``."""
    i = torch.arange(kv_len - q_len, kv_len)[:, None]
    j = torch.arange(kv_len)[None, :]
    kept = cells[..., i // block, j // block]
    return kept & (j <= i)
