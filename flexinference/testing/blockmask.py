"""Turn a ``BlockMask`` back into the token-level set it makes a kernel compute (tests only)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

__all__ = ["visited_tokens"]


def visited_tokens(block_mask: BlockMask, q_len: int, kv_len: int) -> Tensor:
    """Bool ``(B, H, q_len, kv_len)``: pairs a block-sparse kernel keeps.

    A pair is kept when its block is listed as full, or listed as partial and ``mask_mod`` keeps it,
    which is exactly what the fused kernel computes (unlike eager CPU ``flex_attention``, which ignores
    the block lists). Full and partial lists must be disjoint: a pair in both raises ``AssertionError``.
    """
    qb, kb = block_mask.BLOCK_SIZE
    b, h, nq = block_mask.kv_num_blocks.shape
    nk = -(-kv_len // kb)

    def listed(num: Tensor | None, idx: Tensor | None) -> Tensor:
        grid = torch.zeros(b, h, nq, nk + 1, dtype=torch.bool, device=block_mask.kv_num_blocks.device)
        if num is None:
            return grid[..., :nk]
        slot = torch.arange(idx.shape[-1], device=idx.device)
        use = slot[None, None, None, :] < num[..., None]
        grid.scatter_(-1, torch.where(use, idx.long(), nk), True)
        return grid[..., :nk]

    partial = listed(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = listed(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    assert not (partial & full).any(), "a block is listed as both partial and full"
    qi = torch.arange(q_len)
    kj = torch.arange(kv_len)
    bi = torch.arange(b)[:, None, None, None]
    hi = torch.arange(h)[None, :, None, None]
    mod = block_mask.mask_mod(bi, hi, qi[None, None, :, None], kj[None, None, None, :])
    p_tok = partial[:, :, qi // qb][:, :, :, kj // kb]
    f_tok = full[:, :, qi // qb][:, :, :, kj // kb]
    return f_tok | (p_tok & mod)
