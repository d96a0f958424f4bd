"""Keep tables -> FlexAttention ``BlockMask``, without touching the token grid.

For every (query block, key block) of the kernel's tiling the builder decides, from prefix sums of the
1-D tables and the per-cell block table, whether the block holds any kept pair (it is visited) and whether
it holds only kept pairs (it is *full*: visited without running ``mask_mod``). Cost is
``O(B * H * (S/Q_BLOCK) * (S/KV_BLOCK))``: block-level, never ``O(S^2)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from flexinference.masks.tables import KeepTables, keep_mask_mod

__all__ = ["block_grid", "block_mask_from_grid", "block_mask_from_lists", "block_mask_from_tables", "compact_grid", "demote_to_partial"]


def _range_count(prefix: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Count of ``True`` in ``[lo, hi]`` (inclusive, clamped) from an exclusive prefix sum ``(B, H, T+1)``.

    ``lo``/``hi``: int ``(nQ, nK)`` or broadcastable; returns ``(B, H, nQ, nK)``.
    """
    t = prefix.shape[-1] - 1
    lo_c = lo.clamp(0, t)
    hi_c = (hi + 1).clamp(0, t)
    b, h = prefix.shape[:2]
    shape = torch.broadcast_shapes(lo.shape, hi.shape)
    flat = prefix.reshape(b, h, 1, t + 1)
    upper = flat.expand(b, h, shape[0], t + 1).gather(-1, hi_c.expand(shape).expand(b, h, -1, -1))
    lower = flat.expand(b, h, shape[0], t + 1).gather(-1, lo_c.expand(shape).expand(b, h, -1, -1))
    return (upper - lower).clamp(min=0)


def _cells_cover(blocks: Tensor, g: int, q_lo: Tensor, q_hi: Tensor, q_block: int, kv_len: int, kv_block: int):
    """(any, all) of the cell table over each kernel block's cell range, both ``(B, H, nQ, nK)``."""
    b, h, nqc, nkc = blocks.shape
    nk = -(-kv_len // kv_block)
    if kv_block % g == 0:
        r = kv_block // g
        pad = nk * r - nkc
        cells = F.pad(blocks, (0, max(pad, 0)))[..., : nk * r].view(b, h, nqc, nk, r)
        # Cells past the sequence end hold no keys: they must not veto "all".
        in_seq = (torch.arange(nk * r, device=blocks.device) * g < kv_len).view(nk, r)
        k_any = cells.any(-1)
        k_all = (cells | ~in_seq).all(-1)
    elif g % kv_block == 0:
        col = torch.arange(nk, device=blocks.device) * kv_block // g
        k_any = k_all = blocks[..., col]
    else:
        raise ValueError(f"table block {g} and kernel KV block {kv_block} must divide one another")
    c_lo = (q_lo // g).clamp(max=nqc - 1)
    c_hi = (q_hi // g).clamp(max=nqc - 1)
    span = -(-q_block // g) + 1
    any_ = torch.zeros(b, h, q_lo.shape[0], nk, dtype=torch.bool, device=blocks.device)
    all_ = torch.ones_like(any_)
    for step in range(span):  # at most Q_BLOCK / g + 1 cells per kernel row
        row = torch.minimum(c_lo + step, c_hi)
        any_ |= k_any[:, :, row]
        all_ &= k_all[:, :, row]
    return any_, all_


def block_grid(tables: KeepTables, q_block: int = 128, kv_block: int = 128) -> tuple[Tensor, Tensor]:
    """Which kernel blocks hold kept pairs (``partial``) and which hold only kept pairs (``full``).

    Returns:
        ``(partial, full)``, disjoint bool ``(B, H, ceil(q_len/q_block), ceil(kv_len/kv_block))``.
    """
    dev = tables.columns.device
    sq, skv = tables.q_len, tables.kv_len
    nq, nk = -(-sq // q_block), -(-skv // kv_block)
    off = tables.q_offset.to(dev).long()
    qi = torch.arange(nq, device=dev)
    kj = torch.arange(nk, device=dev)
    q_lo = (off + qi * q_block)[:, None]
    q_hi = (off + torch.clamp((qi + 1) * q_block, max=sq) - 1)[:, None]
    kv_lo = (kj * kv_block)[None, :]
    kv_hi = torch.clamp((kj + 1) * kv_block, max=skv)[None, :] - 1
    causal_any = kv_lo <= q_hi
    causal_full = kv_hi <= q_lo

    def prefix(t: Tensor) -> Tensor:
        return F.pad(t.to(torch.int32).cumsum(-1, dtype=torch.int32), (1, 0))

    d_lo, d_hi = q_lo - kv_hi, q_hi - kv_lo
    d_count = _range_count(prefix(tables.diagonals), d_lo, d_hi)
    any_ = d_count > 0
    full = d_count == (d_hi - d_lo + 1)
    c_count = _range_count(prefix(tables.columns), kv_lo.expand(nq, nk), kv_hi.expand(nq, nk))
    any_ |= c_count > 0
    full |= c_count == (kv_hi - kv_lo + 1)
    row_start = tables.row_start[:, :, None, None].long()
    any_ |= q_hi >= row_start
    full |= q_lo >= row_start
    if tables.blocks is not None:
        b_any, b_all = _cells_cover(
            tables.blocks, tables.table_block, q_lo[:, 0], q_hi[:, 0], q_block, skv, kv_block
        )
        any_ |= b_any
        full |= b_all
    any_ &= causal_any
    full &= causal_full & any_
    if tables.kv_valid is not None:
        v_count = _range_count(prefix(tables.kv_valid[:, None, :]), kv_lo.expand(nq, nk), kv_hi.expand(nq, nk))
        any_ &= v_count > 0
        full &= v_count == (kv_hi - kv_lo + 1)
    return any_ & ~full, full


def compact_grid(grid: Tensor) -> tuple[Tensor, Tensor]:
    """``(num, indices)`` of a bool block grid ``(..., N)``: the visited block indices of each row first
    (ascending), full width ``N`` (entries past ``num`` are 0 and ignored). A prefix sum and one scatter,
    no sort."""
    n = grid.shape[-1]
    rank = grid.to(torch.int32).cumsum(-1, dtype=torch.int32) - 1
    dest = torch.where(grid, rank, n).long()
    src = torch.arange(n, dtype=torch.int32, device=grid.device).expand_as(dest)
    idx = torch.zeros(*grid.shape[:-1], n + 1, dtype=torch.int32, device=grid.device).scatter_(-1, dest, src)
    return (rank[..., -1] + 1).contiguous(), idx[..., :n].contiguous()


def demote_to_partial(partial: Tensor, full: Tensor, column: int) -> tuple[Tensor, Tensor]:
    """Move KV block ``column`` from full to partial (e.g. a block that padding keys reach into: its
    mask_mod must run so causality drops them)."""
    partial, full = partial.clone(), full.clone()
    partial[..., column] |= full[..., column]
    full[..., column] = False
    return partial, full


def block_mask_from_lists(
    partial: Tensor, full: Tensor, mask_mod, block_size: tuple[int, int], seq_lengths: tuple[int, int]
) -> BlockMask:
    """BlockMask from bool ``(partial, full)`` block grids ``(B, H, nQ, nK)`` (grids smaller than
    ``seq_lengths`` needs are padded with unvisited blocks), for inference (no q-side transpose)."""
    q_block, kv_block = block_size
    nq, nk = -(-seq_lengths[0] // q_block), -(-seq_lengths[1] // kv_block)
    pad = (0, nk - partial.shape[-1], 0, nq - partial.shape[-2])
    partial, full = F.pad(partial, pad), F.pad(full, pad)
    kv_num, kv_idx = compact_grid(partial)
    full_num, full_idx = compact_grid(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=seq_lengths,
        compute_q_blocks=False,
    )


def block_mask_from_grid(
    partial: Tensor,
    full: Tensor,
    tables: KeepTables,
    q_block: int,
    kv_block: int,
    seq_lengths: tuple[int, int] | None = None,
) -> BlockMask:
    """BlockMask over ``(partial, full)`` kernel blocks with ``tables``' exact ``mask_mod``.

    ``seq_lengths`` ``(Q, KV)`` may exceed the tables' real lengths by the same amount (inputs padded at
    the end to a length bucket): the extra blocks are never visited."""
    lengths = (tables.q_len, tables.kv_len) if seq_lengths is None else seq_lengths
    return block_mask_from_lists(partial, full, keep_mask_mod(tables), (q_block, kv_block), lengths)


def block_mask_from_tables(tables: KeepTables, q_block: int = 128, kv_block: int = 128) -> BlockMask:
    """The ``BlockMask`` of ``tables`` for a ``(q_block, kv_block)`` kernel tiling."""
    partial, full = block_grid(tables, q_block, kv_block)
    return block_mask_from_grid(partial, full, tables, q_block, kv_block)
