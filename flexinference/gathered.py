"""Gathered verticals: token-granular key columns at the cost of their count, not of the blocks they touch.

MInference's vertical-slash heads (Jiang et al., 2024, arXiv:2407.02490) keep e.g. 1000 individual key
columns of 128K. Rounded up to 128-token kernel blocks those columns touch almost every key block, so a
plain BlockMask is nearly dense (DESIGN.md section 3). Here the kept columns of each KV head are copied
into a compact buffer in front of the keys and one ``flex_attention`` runs over
``cat([gathered, K])`` (length ``G + S_kv``) with one softmax:

* slot ``s < G`` holds original key ``pos[s]``; query head ``h`` keeps it for absolute query ``i`` when
  ``h`` keeps column ``pos[s]``, ``pos[s] <= i``, and the pair is *not* also kept by the rest of the rule
  (diagonals, dense rows, block cells), so no pair is counted twice;
* position ``G + j`` is key ``j`` under the rule with the gathered columns removed.

The union of both parts is exactly the keep set of the tables. Per KV head the gathered columns are the
union of its query heads' columns (K/V are never repeated per query head), minus kernel blocks that the
columns cover completely (attention sinks: cheaper as full blocks of the main part). Slots are sorted by
the set of query heads that own the column, then by position, so a query head visits mostly blocks of
its own columns; a gathered block is visited by query block ``qb`` only when it holds a column of that
head at or before the block's last query. Padding slots get position ``T`` (never causal) and are never
visited.

One host sync sizes the buffer (the largest union, rounded up to a power of two of kernel blocks so that
compiled kernels see few distinct shapes); pass ``max_gathered`` to avoid it. A bound that is too small
stays exact: columns that do not fit remain in the main part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from flexinference.masks.block_mask import block_grid, block_mask_from_lists, demote_to_partial
from flexinference.masks.tables import KeepTables, keep_mask_mod

__all__ = [
    "PARTIAL_WEIGHT",
    "GatheredPlan",
    "gather_kv",
    "gathered_attention",
    "gathered_block_mask",
    "gathered_grid",
    "plan_gathered",
    "visited_block_fraction",
]

#: Cost of a partial kernel block relative to a full one (H100, bf16, D 128; see visited_block_fraction).
PARTIAL_WEIGHT = 4.0
_MAX_OWNER_BITS = 32  # owner-set sort keys (bitmask * T + position) must fit in int64


@dataclass(frozen=True)
class GatheredPlan:
    """Layout of one gathered-verticals call (``G`` slots, a multiple of the kernel KV block, may be 0).

    Attributes:
        slot_pos: int32 ``(B, H_q, G)``, original key position of each slot as seen by each query head
            (the slots of its KV head); padding slots hold ``T`` (the table length).
        own: bool ``(B, H_q, G)``, the query head keeps the slot's column.
        kv_slot_pos: int64 ``(B, H_kv, G)``, positions to gather (padding slots read key 0).
        main: the tables with every gathered column removed (batch ``B``).
        gathered_len: ``G``.
        kv_block: kernel KV block the layout is aligned to.
    """

    slot_pos: Tensor
    own: Tensor
    kv_slot_pos: Tensor
    main: KeepTables
    gathered_len: int
    kv_block: int


def _bucket_len(n: int, kv_block: int) -> int:
    """``n`` slots rounded up to a power of two of kernel blocks (0 stays 0)."""
    if n <= 0:
        return 0
    blocks = -(-n // kv_block)
    return kv_block * (1 << (blocks - 1).bit_length())


def _covered_blocks(cand: Tensor, kv_len: int, kv_block: int) -> Tensor:
    """Bool ``(B, H_kv, T)``: tokens of kernel KV blocks whose every key is a candidate column."""
    t = cand.shape[-1]
    nk = -(-kv_len // kv_block)
    counts = F.pad(cand[..., :kv_len], (0, nk * kv_block - kv_len)).view(*cand.shape[:2], nk, kv_block).sum(-1)
    lengths = torch.clamp(kv_len - torch.arange(nk, device=cand.device) * kv_block, max=kv_block)
    tokens = (counts == lengths).repeat_interleave(kv_block, dim=-1)
    return tokens[..., :t] if tokens.shape[-1] >= t else F.pad(tokens, (0, t - tokens.shape[-1]))


def plan_gathered(
    tables: KeepTables, num_kv_heads: int, *, kv_block: int = 128, max_gathered: int | None = None
) -> GatheredPlan:
    """Choose the gathered columns of every KV head and the slot order.

    Args:
        tables: keep tables with ``H_q`` heads (already broadcast to the batch of ``q``).
        num_kv_heads: ``H_kv``; ``H_q % H_kv == 0``.
        kv_block: kernel KV block size (``G`` is a multiple of it).
        max_gathered: static bound on the gathered columns per KV head (no host sync); ``None`` syncs
            once for the largest union.

    Returns:
        The :class:`GatheredPlan`.
    """
    b, hq, t = tables.columns.shape
    if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1 or hq % num_kv_heads:
        raise ValueError(f"num_kv_heads must be a positive divisor of the {hq} table heads, got {num_kv_heads!r}")
    if max_gathered is not None and (isinstance(max_gathered, bool) or not isinstance(max_gathered, int)
                                     or max_gathered < 0):
        raise ValueError(f"max_gathered must be None or an int >= 0, got {max_gathered!r}")
    group = hq // num_kv_heads
    dev = tables.columns.device
    cols = tables.columns.reshape(b, num_kv_heads, group, t)
    pos = torch.arange(t, device=dev)
    cand = cols.any(2) & (pos < tables.kv_len)
    if tables.kv_valid is not None:
        cand = cand & tables.kv_valid[:, None, :t]
    cand = cand & ~_covered_blocks(cand, tables.kv_len, kv_block)

    if max_gathered is None:
        g_len = _bucket_len(int(cand.sum(-1).max()), kv_block)  # the one host sync
    else:
        g_len = -(-max_gathered // kv_block) * kv_block
    if g_len == 0:
        empty = torch.zeros(b, hq, 0, dtype=torch.int32, device=dev)
        return GatheredPlan(empty, empty.bool(), empty.long()[:, :num_kv_heads], tables, 0, kv_block)

    never = torch.iinfo(torch.int64).max
    if group <= _MAX_OWNER_BITS:
        bits = torch.tensor([1 << i for i in range(group)], dtype=torch.int64, device=dev)
        owners = (cols.long() * bits[:, None]).sum(2)
    else:
        owners = torch.zeros(b, num_kv_heads, t, dtype=torch.int64, device=dev)
    key = torch.where(cand, owners * t + pos, never)
    keys, order = torch.sort(key, dim=-1)
    take = min(g_len, t)
    keys, order = keys[..., :take], order[..., :take]
    if take < g_len:
        # torch.cat, not F.pad(value=never): pad's float value rounds int64 max to 2**63, which wraps to
        # int64 min and would make the padding slots look valid (copies of key 0).
        extra = keys.new_full((*keys.shape[:-1], g_len - take), never)
        keys = torch.cat([keys, extra], -1)
        order = torch.cat([order, torch.zeros_like(extra)], -1)
    valid = keys != never
    slot_pos = torch.where(valid, order, t)  # (B, H_kv, G); T marks padding
    chosen = torch.zeros(b, num_kv_heads, t + 1, dtype=torch.bool, device=dev).scatter_(-1, slot_pos, True)
    gathered = chosen[..., :t].repeat_interleave(group, dim=1)
    main = replace(tables, columns=tables.columns & ~gathered)

    slot_q = slot_pos.repeat_interleave(group, dim=1)
    own = tables.columns.gather(-1, slot_q.clamp(max=t - 1)) & valid.repeat_interleave(group, dim=1)
    return GatheredPlan(
        slot_pos=slot_q.to(torch.int32).contiguous(),
        own=own.contiguous(),
        kv_slot_pos=torch.where(valid, order, 0),
        main=main,
        gathered_len=g_len,
        kv_block=kv_block,
    )


def gathered_grid(plan: GatheredPlan, q_block: int = 128) -> tuple[Tensor, Tensor]:
    """Visited blocks of the gathered layout: ``(partial, full)`` bool ``(B, H_q, nQ, G/KV_BLOCK + nK)``.

    A gathered block is full when a block-level test proves every pair in it kept and kept by no other rule
    (see the code), else partial (its mask_mod removes pairs the main part keeps); the main part's
    blocks come from :func:`~flexinference.masks.block_mask.block_grid` of the reduced tables.
    """
    kv_block, g_len, main = plan.kv_block, plan.gathered_len, plan.main
    partial, full = block_grid(main, q_block, kv_block)
    if g_len == 0:
        return partial, full
    b, hq, nq, _ = partial.shape
    dev = partial.device
    big = torch.iinfo(torch.int32).max
    shape = (b, hq, g_len // kv_block, kv_block)
    pos, own = plan.slot_pos.view(shape).long(), plan.own.view(shape)
    first = torch.where(own, pos, big).amin(-1)
    qi = torch.arange(nq, device=dev)
    q_lo = (main.q_offset.to(dev).long() + qi * q_block)[:, None]
    q_hi = (main.q_offset.to(dev).long() + torch.clamp((qi + 1) * q_block, max=main.q_len) - 1)[:, None]
    visit = first[:, :, None, :] <= q_hi
    # Full: the head owns every slot, all are causal for every row of the query block, and no other rule
    # can keep any of the pairs (no diagonal offset in [q_lo - max_pos, q_hi - min_pos], no dense row, no
    # block cell in the head): a conservative test at block level, exact enough for banded slashes.
    lo_p, hi_p = pos.amin(-1)[:, :, None, :], pos.amax(-1)[:, :, None, :]
    t = main.diagonals.shape[-1]
    prefix = F.pad(main.diagonals.to(torch.int32).cumsum(-1, dtype=torch.int32), (1, 0))
    idx_hi = (q_hi - lo_p + 1).clamp(0, t).reshape(b, hq, -1)
    idx_lo = (q_lo - hi_p).clamp(0, t).reshape(b, hq, -1)
    d_count = (prefix.gather(-1, idx_hi) - prefix.gather(-1, idx_lo)).view(visit.shape)
    if main.blocks is None:
        no_cells = torch.ones(b, hq, dtype=torch.bool, device=dev)
    else:
        no_cells = ~main.blocks.flatten(2).any(-1)
    quiet = (q_hi < main.row_start.long()[:, :, None, None]) & no_cells[:, :, None, None]
    g_full = own.all(-1)[:, :, None, :] & (hi_p <= q_lo) & (d_count == 0) & quiet
    return torch.cat([visit & ~g_full, partial], -1), torch.cat([g_full, full], -1)


def gathered_mask_mod(plan: GatheredPlan):
    """The exact token rule over ``cat([gathered, K])``: ``(b, h, q_idx, kv_idx) -> bool``."""
    main_mod = keep_mask_mod(plan.main)
    slot_pos, own, q_offset = plan.slot_pos, plan.own, plan.main.q_offset
    g_len = plan.gathered_len
    last_slot = g_len - 1

    def gathered_verticals(b, h, q_idx, kv_idx):
        is_gathered = kv_idx < g_len
        slot = kv_idx.clamp(0, last_slot)
        pos = slot_pos[b, h, slot]
        key = torch.where(is_gathered, pos, kv_idx - g_len)
        kept_main = main_mod(b, h, q_idx, key)
        kept_slot = own[b, h, slot] & (pos <= q_idx + q_offset) & ~kept_main
        return torch.where(is_gathered, kept_slot, kept_main)

    gathered_verticals.__name__ = f"gathered_verticals_{g_len}_{main_mod.__name__}"
    return gathered_verticals


def gathered_block_mask(plan: GatheredPlan, q_block: int = 128, pad: int = 0) -> BlockMask:
    """The ``BlockMask`` over ``cat([gathered, K])`` (the plain tables' rule when nothing is gathered).

    Args:
        plan: the layout.
        q_block: kernel query block.
        pad: tokens appended to the queries and keys (a length bucket, see
            :func:`~flexinference.compose.table_length`): padded rows and keys are never visited, and
            a main block that reaches into the padding is never *full* (its mask_mod drops the padded
            keys; a full block would let them into the softmax).
    """
    main, kv_block, g_len = plan.main, plan.kv_block, plan.gathered_len
    partial, full = gathered_grid(plan, q_block)
    if pad and main.kv_len % kv_block:
        partial, full = demote_to_partial(partial, full, g_len // kv_block + main.kv_len // kv_block)
    mask_mod = gathered_mask_mod(plan) if g_len else keep_mask_mod(main)
    return block_mask_from_lists(partial, full, mask_mod, (q_block, kv_block),
                                 (main.q_len + pad, g_len + main.kv_len + pad))


def gather_kv(k: Tensor, v: Tensor, plan: GatheredPlan) -> tuple[Tensor, Tensor]:
    """``(cat([k[slots], k]), cat([v[slots], v]))``, each ``(B, H_kv, G + S_kv, D)``, contiguous."""
    if plan.gathered_len == 0:
        return k.contiguous(), v.contiguous()
    idx = plan.kv_slot_pos[..., None].expand(-1, -1, -1, k.shape[-1])
    return torch.cat([k.gather(2, idx), k], 2), torch.cat([v.gather(2, idx), v], 2)


def _check(q: Tensor, k: Tensor, v: Tensor, tables: KeepTables, block_size) -> None:
    if torch.compiler.is_compiling():
        return
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, S, D), got {getattr(x, 'shape', type(x))}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree on B/D/shape")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k heads ({k.shape[1]})")
    if not isinstance(tables, KeepTables):
        raise TypeError(f"tables must be KeepTables, got {type(tables).__name__}")
    if tables.heads != q.shape[1] or tables.q_len != q.shape[2] or tables.kv_len != k.shape[2]:
        raise ValueError(f"tables (heads {tables.heads}, q_len {tables.q_len}, kv_len {tables.kv_len}) do not "
                         f"match q {tuple(q.shape)} and k {tuple(k.shape)}")
    if tables.batch not in (1, q.shape[0]):
        raise ValueError(f"tables batch {tables.batch} must be 1 or {q.shape[0]}")
    if (not isinstance(block_size, tuple) or len(block_size) != 2
            or not all(isinstance(x, int) and x > 0 for x in block_size)):
        raise ValueError(f"block_size must be a (Q_BLOCK, KV_BLOCK) tuple of positive ints, got {block_size!r}")


def gathered_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tables: KeepTables,
    *,
    scale: float | None = None,
    block_size: tuple[int, int] = (128, 128),
    compiled: bool = False,
    kernel_options: dict | None = None,
    max_gathered: int | None = None,
    bucket: bool | None = None,
) -> Tensor:
    """Attention restricted to ``tables``' keep set, with the kept columns gathered.

    Args:
        q: ``(B, H_q, S_q, D)``, the last ``S_q`` of ``S_kv`` positions.
        k, v: ``(B, H_kv, S_kv, D)``, ``H_q % H_kv == 0`` (grouped-query attention, never repeated).
        tables: :class:`~flexinference.masks.tables.KeepTables` of the call (batch 1 or ``B``).
        scale: softmax scale, default ``1/sqrt(D)``.
        block_size: ``(Q_BLOCK, KV_BLOCK)`` of the BlockMask.
        compiled: run ``torch.compile``-d ``flex_attention`` (block sparsity honoured) instead of eager.
        kernel_options: passed to ``flex_attention``.
        max_gathered: static bound on gathered columns per KV head (see :func:`plan_gathered`).
        bucket: pad q, k, v to the tables' length bucket so compiled kernels are shared across lengths
            (default: when ``compiled``); the output is sliced back.

    Returns:
        ``(B, H_q, S_q, D)`` in ``q``'s dtype; equal to attention over exactly ``dense_keep(tables)``.

    Example:
        >>> import torch
        >>> from flexinference.compose import build_tables
        >>> from flexinference.patterns import VerticalSlash
        >>> q = torch.randn(1, 4, 256, 64); k = v = torch.randn(1, 2, 256, 64)
        >>> t = build_tables(q, k, [VerticalSlash(vertical=40, slash=20)] * 4, scale=0.125)
        >>> gathered_attention(q, k, v, t, scale=0.125, block_size=(64, 64)).shape
        torch.Size([1, 4, 256, 64])
    """
    _check(q, k, v, tables, block_size)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    with torch.no_grad():
        plan = plan_gathered(tables.with_batch(q.shape[0]), k.shape[1], kv_block=block_size[1],
                             max_gathered=max_gathered)
        bucket = compiled if bucket is None else bucket
        pad = tables.columns.shape[-1] - k.shape[2] if bucket and not torch.compiler.is_compiling() else 0
        block_mask = gathered_block_mask(plan, block_size[0], pad=pad)
        kk, vv = gather_kv(k, v, plan)
        if pad:
            q, kk, vv = (F.pad(t, (0, 0, 0, pad)) for t in (q, kk, vv))
    if compiled and not torch.compiler.is_compiling():
        from flexinference.attention import compiled_flex

        fn = compiled_flex()
    else:
        fn = flex_attention
    out = fn(q, kk, vv, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
             kernel_options=kernel_options)
    return out[:, :, : tables.q_len] if pad else out


def visited_block_fraction(
    tables: KeepTables,
    *,
    num_kv_heads: int,
    block_size: tuple[int, int] = (128, 128),
    gathered: bool = True,
    max_gathered: int | None = None,
    partial_weight: float = 1.0,
) -> Tensor:
    """Kernel blocks a call visits, as a fraction of the causal blocks of dense attention, per head.

    With ``partial_weight > 1`` it is a cost estimate relative to dense flex attention (all full blocks):
    a partial block runs ``mask_mod`` on every pair and costs more than a full one. Measured on an H100
    (bf16, D 128, 128x128 tiles, torch 2.11): a full block ~21 ns, a partial one ~84 ns (weight
    :data:`PARTIAL_WEIGHT` = 4), dense SDPA ~14 ns per causal block. So a head is cheaper dense
    (``row_start = 0``: all full blocks) when the weighted fraction exceeds 1, and a layer is cheaper with
    SDPA when the weighted fraction over its heads exceeds ~0.65 (SDPA / dense flex).

    Args:
        tables: keep tables ``(B, H_q, ...)``.
        num_kv_heads: ``H_kv`` (the gathered union is per KV head).
        block_size: ``(Q_BLOCK, KV_BLOCK)``.
        gathered: measure the gathered layout (``True``) or the plain BlockMask of ``tables``.
        max_gathered: as in :func:`plan_gathered`.
        partial_weight: weight of a partial block relative to a full one (1: plain visited fraction).

    Returns:
        fp32 ``(B, H_q)``; ``1.0`` is the work of dense causal attention (values above 1 are possible
        for the gathered layout, whose extra blocks are the gathered ones).
    """
    qb, kb = block_size
    if gathered:
        plan = plan_gathered(tables, num_kv_heads, kv_block=kb, max_gathered=max_gathered)
        partial, full = gathered_grid(plan, qb)
    else:
        partial, full = block_grid(tables, qb, kb)
    dev = tables.columns.device
    nq, nk = -(-tables.q_len // qb), -(-tables.kv_len // kb)
    q_hi = tables.q_offset.to(dev).long() + torch.clamp((torch.arange(nq, device=dev) + 1) * qb,
                                                        max=tables.q_len) - 1
    causal = (torch.arange(nk, device=dev)[None, :] * kb <= q_hi[:, None]).sum()
    visited = full.sum((-1, -2)).float() + partial_weight * partial.sum((-1, -2)).float()
    return visited / causal.float()
