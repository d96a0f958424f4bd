"""Per-head patterns of one layer -> one set of keep tables.

Heads are grouped by pattern type (and by the few parameters that fix tensor shapes, e.g. a block size);
each group is filled by one vectorised call: static patterns by their ``masks/<pattern>.py`` row builder,
dynamic ones by their estimator in :mod:`flexinference.estimate`. Dispatch is on the pattern's type,
through the two tables below, not on strings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from flexinference.estimate.block_topk import block_topk_blocks
from flexinference.estimate.vertical_slash import vertical_slash_indices
from flexinference.masks.a_shape import a_shape_rows
from flexinference.masks.dense import dense_rows
from flexinference.masks.dilated import dilated_rows
from flexinference.masks.strided import strided_rows
from flexinference.masks.tables import HeadRows, KeepTables
from flexinference.masks.tri_shape import tri_shape_rows
from flexinference.masks.vertical_slash import static_rows
from flexinference.patterns import (
    AShape,
    BlockTopK,
    Dense,
    Dilated,
    FlexPrefill,
    Pattern,
    Strided,
    TriShape,
    VerticalSlash,
    VerticalSlashStatic,
    XAttention,
)

__all__ = ["build_tables", "table_length", "STATIC_ROWS"]

#: Kernel block size the tables are padded to (the largest tile any kernel here uses).
TABLE_PAD = 128

STATIC_ROWS: dict[type[Pattern], Callable[..., HeadRows]] = {
    Dense: dense_rows,
    AShape: a_shape_rows,
    TriShape: tri_shape_rows,
    Dilated: dilated_rows,
    Strided: strided_rows,
    VerticalSlashStatic: static_rows,
}


def table_length(kv_len: int) -> int:
    """Table length for ``kv_len`` keys: a *length bucket*, rounded up so padded lookups stay inside.

    Outside ``torch.compile`` lengths are rounded up to a multiple of ``max(128, 2**(bit_length - 3))``
    (at most 4 buckets per doubling, at most 25% padding). The compiled kernel is specialised on the
    padded length (torch <= 2.13 pins flex_attention's sequence length), so prompts of many lengths share
    a few kernels instead of recompiling per length; padded rows and keys are never visited, so the
    padding costs memory for one copy of K/V, not compute. Inside a user's ``torch.compile`` the length
    stays symbolic and is only rounded to the 128-token kernel block.
    """
    if torch.compiler.is_compiling():
        return max(1, -(-kv_len // TABLE_PAD)) * TABLE_PAD
    step = max(TABLE_PAD, 1 << max(0, int(kv_len).bit_length() - 3))
    return max(1, -(-kv_len // step)) * step


def _group_key(p: Pattern) -> tuple:
    if isinstance(p, VerticalSlash):
        return (VerticalSlash, p.last_q)
    if isinstance(p, BlockTopK):
        return (BlockTopK, p.block)
    if isinstance(p, FlexPrefill):
        return (FlexPrefill, p.block, p.last_q, p.min_budget, p.min_len)
    if isinstance(p, XAttention):
        return (XAttention, p.stride, p.block)
    return (type(p),)


def _per_head(patterns: Sequence[Pattern], heads: list[int], attr: str, default, dtype, device) -> Tensor:
    values = [default] * len(patterns)
    for h in heads:
        values[h] = getattr(patterns[h], attr)
    return torch.tensor(values, dtype=dtype, device=device)


def _vertical_slash(q, k, patterns, heads, scale, kv_valid, table_len):
    dev = q.device
    group = [patterns[h] for h in heads]

    def per(attr):
        return _per_head(patterns, heads, attr, 0, torch.long, dev)

    cols, diags = vertical_slash_indices(
        q,
        k,
        vertical=per("vertical"),
        slash=per("slash"),
        first_columns=per("keep_first_columns"),
        nearest_diagonals=per("keep_nearest_diagonals"),
        max_vertical=max(max(p.vertical, p.keep_first_columns) for p in group),
        max_slash=max(max(p.slash, p.keep_nearest_diagonals, 1) for p in group),
        last_q=group[0].last_q,
        scale=scale,
        table_len=table_len,
        kv_valid=kv_valid,
    )
    return cols, diags


def _block_cells(q, k, patterns, heads, scale, kv_valid) -> tuple[Tensor, int] | None:
    """Cell tables of a block-pattern group: ``(bool (B, H_q, N, N), block)``, or ``None`` to run dense."""
    p0 = patterns[heads[0]]
    if isinstance(p0, BlockTopK):
        topk = _per_head(patterns, heads, "topk", 1, torch.long, q.device)
        max_topk = max(patterns[h].topk for h in heads)
        return block_topk_blocks(q, k, topk=topk, max_topk=max_topk, block=p0.block, kv_valid=kv_valid), p0.block
    if isinstance(p0, FlexPrefill):
        if k.shape[2] < p0.min_len:
            return None
        from flexinference.estimate.flexprefill import flexprefill_blocks

        cells = flexprefill_blocks(
            q,
            k,
            gamma=_per_head(patterns, heads, "gamma", 1.0, torch.float32, q.device),
            tau=_per_head(patterns, heads, "tau", 0.0, torch.float32, q.device),
            block=p0.block,
            last_q=p0.last_q,
            min_budget=p0.min_budget,
            scale=scale,
            kv_valid=kv_valid,
        )
        return cells, p0.block
    if isinstance(p0, XAttention):
        from flexinference.estimate.xattention import xattention_blocks

        cells = xattention_blocks(
            q,
            k,
            threshold=_per_head(patterns, heads, "threshold", 1.0, torch.float32, q.device),
            stride=p0.stride,
            block=p0.block,
            scale=scale,
            kv_valid=kv_valid,
        )
        return cells, p0.block
    raise TypeError(f"no estimator registered for {type(p0).__name__}")


def _refine(cells: Tensor, block: int, g: int, n: int) -> Tensor:
    """Cell table at ``block`` granularity -> ``g`` granularity (``block % g == 0``), ``n`` cells a side.

    A gather, not a slice: cells past the table's end repeat the last real cell (they hold no keys or
    queries), and no shape comparison is left for dynamo to guard on."""
    idx = (torch.arange(n, device=cells.device) * g // block).clamp(max=cells.shape[-1] - 1)
    return cells[..., idx, :][..., idx]


def build_tables(
    q: Tensor,
    k: Tensor,
    patterns: Sequence[Pattern],
    *,
    scale: float,
    kv_valid: Tensor | None = None,
) -> KeepTables:
    """Estimate and assemble the keep tables of one attention call.

    Args:
        q: ``(B, H_q, S_q, D)``, the last ``S_q`` of ``S_kv`` positions.
        k: ``(B, H_kv, S_kv, D)``.
        patterns: one pattern per query head (length ``H_q``).
        scale: softmax scale used by the estimators.
        kv_valid: optional bool ``(B, S_kv)``; ``False`` keys are padding.

    Returns:
        :class:`~flexinference.masks.tables.KeepTables` with batch ``B`` and ``H_q`` heads.
    """
    b, hq, sq, _ = q.shape
    skv = k.shape[2]
    dev = q.device
    t = table_length(skv)
    groups: dict[tuple, list[int]] = {}
    for h, p in enumerate(patterns):
        groups.setdefault(_group_key(p), []).append(h)

    columns = torch.zeros(b, hq, t, dtype=torch.bool, device=dev)
    diagonals = torch.zeros(b, hq, t, dtype=torch.bool, device=dev)
    row_start = torch.full((b, hq), torch.iinfo(torch.int32).max, dtype=torch.int32, device=dev)
    cell_groups: list[tuple[list[int], Tensor, int]] = []
    for key, heads in groups.items():
        idx = torch.tensor(heads, dtype=torch.long, device=dev)
        kind = key[0]
        if kind in STATIC_ROWS:
            rows = STATIC_ROWS[kind]([patterns[h] for h in heads], t, skv, dev)
            columns[:, idx] = rows.columns
            diagonals[:, idx] = rows.diagonals
            row_start[:, idx] = rows.row_start
        elif kind is VerticalSlash:
            cols, diags = _vertical_slash(q, k, patterns, heads, scale, kv_valid, t)
            columns[:, idx] = cols[:, idx]
            diagonals[:, idx] = diags[:, idx]
        else:
            out = _block_cells(q, k, patterns, heads, scale, kv_valid)
            if out is None:
                row_start[:, idx] = 0
            else:
                cell_groups.append((heads, out[0], out[1]))

    blocks, g = None, TABLE_PAD
    if cell_groups:
        g = min(block for _, _, block in cell_groups)
        if any(block % g for _, _, block in cell_groups):
            raise ValueError(f"block sizes {sorted({c[2] for c in cell_groups})} of one layer must be multiples of {g}")
        if TABLE_PAD % g and g % TABLE_PAD:
            raise ValueError(f"pattern block size {g} must divide {TABLE_PAD} or be a multiple of it")
        n = -(-t // g)
        blocks = torch.zeros(b, hq, n, n, dtype=torch.bool, device=dev)
        for heads, cells, block in cell_groups:
            idx = torch.tensor(heads, dtype=torch.long, device=dev)
            blocks[:, idx] = _refine(cells[:, idx], block, g, n)

    valid = None
    if kv_valid is not None:
        valid = F.pad(kv_valid.to(torch.bool), (0, t - skv))
    return KeepTables(
        columns=columns,
        diagonals=diagonals,
        row_start=row_start,
        blocks=blocks,
        q_offset=torch.tensor(skv - sq, dtype=torch.int32, device=dev),
        q_len=sq,
        kv_len=skv,
        table_block=g,
        kv_valid=valid,
    )
