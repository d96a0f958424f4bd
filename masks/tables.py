"""The one token-level rule every pattern is expressed in.

A layer's heads may each run a different pattern, but every pattern in this project is a union of four
simple token rules, each stored as a small per-head lookup table:

* ``columns[b, h, j]``     key ``j`` is kept for every query at or after it (sinks, verticals);
* ``diagonals[b, h, o]``   key ``i - o`` is kept for query ``i`` (local windows, slashes, dilation);
* ``row_start[b, h]``      queries at absolute position ``>= row_start`` keep every earlier key
                           (dense heads, tri-shape's last rows);
* ``blocks[b, h, qb, kb]`` the (query block, key block) cell of ``table_block`` tokens is kept
                           (block top-k, FlexPrefill, XAttention).

A pair is kept when it is causal (``j <= i``) and at least one rule keeps it. One ``mask_mod`` applies the
rule for all heads at once; its lookups are 1-D or per-block, so no ``q * KV_LEN`` product can overflow
int32 (FLEX_NOTES.md). Query indices inside the kernel are relative to the query chunk; ``q_offset``
(a tensor, so it never pins a compiled graph) turns them into absolute positions, which lets a chunk of
queries attend to a cache of earlier keys.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

__all__ = ["KeepTables", "HeadRows", "closed_form_pairs", "keep_mask_mod", "dense_keep", "head_rows", "param"]


@dataclass(frozen=True)
class KeepTables:
    """Per-head lookup tables of one attention call.

    Shapes (``B`` batch, ``H`` query heads, ``T`` table length ``>=`` the key length rounded up to the
    kernel block, ``Nq``/``Nk`` table-block counts):

    * ``columns``:   bool ``(B, H, T)``
    * ``diagonals``: bool ``(B, H, T)``
    * ``row_start``: int32 ``(B, H)``
    * ``blocks``:    bool ``(B, H, Nq, Nk)`` or ``None`` when no head uses a block pattern
    * ``q_offset``:  int32 0-d tensor, absolute position of query 0 (``S_kv - S_q`` for a chunk)
    * ``q_len``, ``kv_len``: the real (unpadded) lengths
    * ``table_block``: tokens per ``blocks`` cell (ignored when ``blocks`` is ``None``)
    * ``kv_valid``: bool ``(B, T)`` or ``None``; ``False`` keys (padding) are never kept
    """

    columns: Tensor
    diagonals: Tensor
    row_start: Tensor
    blocks: Tensor | None
    q_offset: Tensor
    q_len: int
    kv_len: int
    table_block: int = 128
    kv_valid: Tensor | None = None

    @property
    def batch(self) -> int:
        return self.columns.shape[0]

    @property
    def heads(self) -> int:
        return self.columns.shape[1]

    def with_batch(self, batch: int) -> "KeepTables":
        """Broadcast tables built for batch 1 to ``batch`` (views, no copy)."""
        if self.batch == batch:
            return self
        if self.batch != 1:
            raise ValueError(f"tables have batch {self.batch}, cannot broadcast to {batch}")
        blocks = None if self.blocks is None else self.blocks.expand(batch, -1, -1, -1)
        valid = None if self.kv_valid is None else self.kv_valid.expand(batch, -1)
        return replace(
            self,
            kv_valid=valid,
            columns=self.columns.expand(batch, -1, -1),
            diagonals=self.diagonals.expand(batch, -1, -1),
            row_start=self.row_start.expand(batch, -1),
            blocks=blocks,
        )


def keep_mask_mod(tables: KeepTables):
    """The FlexAttention ``mask_mod`` of ``tables``: ``(b, h, q_idx, kv_idx) -> bool``."""
    columns, diagonals, row_start = tables.columns, tables.diagonals, tables.row_start
    blocks, q_offset, g = tables.blocks, tables.q_offset, tables.table_block
    last = columns.shape[-1] - 1
    if tables.kv_valid is not None:
        return _with_valid(keep_mask_mod(replace(tables, kv_valid=None)), tables.kv_valid, last)

    if blocks is None:

        def vertical_slash_rows(b, h, q_idx, kv_idx):
            qa = q_idx + q_offset
            causal = kv_idx <= qa
            kv = kv_idx.clamp(0, last)
            off = (qa - kv_idx).clamp(0, last)
            kept = columns[b, h, kv] | diagonals[b, h, off] | (qa >= row_start[b, h])
            return causal & kept

        return vertical_slash_rows

    last_qb, last_kb = blocks.shape[-2] - 1, blocks.shape[-1] - 1

    def vertical_slash_rows_blocks(b, h, q_idx, kv_idx):
        qa = q_idx + q_offset
        causal = kv_idx <= qa
        kv = kv_idx.clamp(0, last)
        off = (qa - kv_idx).clamp(0, last)
        cell = blocks[b, h, (qa // g).clamp(0, last_qb), (kv_idx // g).clamp(0, last_kb)]
        kept = columns[b, h, kv] | diagonals[b, h, off] | (qa >= row_start[b, h]) | cell
        return causal & kept

    return vertical_slash_rows_blocks


def _with_valid(inner, kv_valid: Tensor, last: int):
    def valid_keys(b, h, q_idx, kv_idx):
        return inner(b, h, q_idx, kv_idx) & kv_valid[b, kv_idx.clamp(0, last)]

    valid_keys.__name__ = f"{inner.__name__}_valid_keys"
    return valid_keys


def dense_keep(tables: KeepTables, rows: Tensor | None = None, heads: slice = slice(None)) -> Tensor:
    """Materialise the rule as a bool ``(B, H', R, kv_len)`` mask. Reference only: O(R * S) memory.

    Args:
        tables: the keep tables.
        rows: optional int ``(R,)`` query indices (relative to the query chunk); default all ``q_len``.
        heads: the query heads to evaluate (default all).
    """
    dev = tables.columns.device
    rows = torch.arange(tables.q_len, device=dev) if rows is None else rows.to(dev).long()
    q = rows[:, None] + tables.q_offset.to(dev).long()
    k = torch.arange(tables.kv_len, device=dev)[None, :]
    off = (q - k).clamp(min=0)
    keep = tables.columns[:, heads][:, :, k.expand_as(off)] | tables.diagonals[:, heads][:, :, off]
    keep = keep | (q >= tables.row_start[:, heads, None, None])
    if tables.blocks is not None:
        g = tables.table_block
        blocks = tables.blocks[:, heads]
        qb = (q // g).expand_as(off).clamp(max=blocks.shape[-2] - 1)
        kb = (k // g).expand_as(off).clamp(max=blocks.shape[-1] - 1)
        keep = keep | blocks[:, :, qb, kb]
    if tables.kv_valid is not None:
        keep = keep & tables.kv_valid[:, None, None, : tables.kv_len]
    return keep & (k <= q)


@dataclass(frozen=True)
class HeadRows:
    """Static rule rows of ``n`` heads: ``columns``/``diagonals`` bool ``(n, T)``, ``row_start`` int32 ``(n,)``."""

    columns: Tensor
    diagonals: Tensor
    row_start: Tensor


def head_rows(
    n: int,
    table_len: int,
    device: torch.device,
    *,
    sink: Tensor | None = None,
    local: Tensor | None = None,
    row_start: Tensor | None = None,
    extra_diagonals: Tensor | None = None,
) -> HeadRows:
    """Rows keeping, per head, the first ``sink`` columns, the ``local`` nearest diagonals and the rows
    from ``row_start`` on (each an int ``(n,)`` tensor), plus any ``extra_diagonals`` bool ``(n, T)``.
    The main diagonal is always kept."""
    idx = torch.arange(table_len, device=device)[None, :]
    zero = torch.zeros(n, dtype=torch.long, device=device)
    sink = zero if sink is None else sink
    local = zero if local is None else local
    columns = idx < sink[:, None]
    diagonals = (idx < local[:, None]) | (idx == 0)
    if extra_diagonals is not None:
        diagonals = diagonals | extra_diagonals
    never = torch.full((n,), torch.iinfo(torch.int32).max, dtype=torch.int32, device=device)
    rows = never if row_start is None else row_start.to(torch.int32)
    return HeadRows(columns, diagonals, rows)


def param(values, device: torch.device) -> Tensor:
    """A per-head parameter list as an int64 tensor ``(n,)``."""
    return torch.tensor(list(values), dtype=torch.long, device=device)


def _pairs_rule(tables: KeepTables) -> Tensor:
    """Kept pairs of tables without a block table or key padding, in closed form: int64 ``(B, H)``."""
    dev = tables.columns.device
    s, t = tables.kv_len, tables.columns.shape[-1]
    off = int(tables.q_offset)
    end = tables.row_start.long().clamp(off, s)[..., None]  # rows [off, end) sparse, [end, s) dense
    i = torch.arange(t, device=dev)
    cols = tables.columns & (i < s)
    cp = cols.long().cumsum(-1)
    dp = tables.diagonals.long().cumsum(-1)
    sparse_rows = (i >= off) & (i < end)
    total = ((cp + dp) * sparse_rows).sum(-1)
    # Overlap: column c and offset o keep the same pair for row c + o; count rows in [off, end).
    hi = end - 1 - i
    lo = off - 1 - i
    upper = torch.where(hi >= 0, dp.gather(-1, hi.clamp(0, t - 1)), 0)
    lower = torch.where(lo >= 0, dp.gather(-1, lo.clamp(0, t - 1).expand_as(hi)), 0)
    total = total - ((upper - lower) * cols).sum(-1)
    e = end[..., 0]
    return total + (s * (s + 1) - e * (e + 1)) // 2


#: Elements of the ``(B, H, rows, N)`` product :func:`_pairs_cells` forms at once (int32: 4 bytes each).
_CELL_CHUNK = 1 << 28


def _cell_weights(a: Tensor, n: int, g: int, s: int, off: int) -> Tensor:
    """Causal pairs of the cells ``(a, c)`` for query-block rows ``a`` (1-D) and every key block ``c < n``:
    int32 ``(len(a), n)``, at most ``g^2`` each."""
    a, c = a[:, None], torch.arange(n, device=a.device)[None, :]
    ilo, ihi = (a * g).clamp(min=off), ((a + 1) * g).clamp(max=s) - 1
    jlo, jhi = c * g, ((c + 1) * g).clamp(max=s) - 1
    # rows in [max(ilo, jlo), min(ihi, jhi)] keep i - jlo + 1 keys; rows in [max(ilo, jhi+1), ihi] keep all.
    r0, r1 = torch.maximum(ilo, jlo), torch.minimum(ihi, jhi)
    cnt = (r1 - r0 + 1).clamp(min=0)
    tri = torch.where(cnt > 0, (r0 - jlo + 1 + r1 - jlo + 1) * cnt // 2, 0)
    full = (ihi - torch.maximum(ilo, jhi + 1) + 1).clamp(min=0) * (jhi - jlo + 1).clamp(min=0)
    return (tri + full).to(torch.int32)


def _pairs_cells(tables: KeepTables) -> Tensor:
    """Kept pairs of a pure block table (no columns, diagonals or dense rows): int64 ``(B, H)``.

    Query-block rows go in chunks, so neither the weights nor the cells x weights product is ever a whole
    ``(N, N)`` / ``(B, H, N, N)`` integer tensor (tens of GB at 1M tokens)."""
    g, s, off = tables.table_block, tables.kv_len, int(tables.q_offset)
    b, h, rows, n = tables.blocks.shape
    dev = tables.blocks.device
    step = max(1, _CELL_CHUNK // max(1, b * h * n))
    # A row of cells holds at most n x g^2 ~ S x g pairs: int32 row sums while that fits
    acc = torch.int32 if (n * g) * g < 2**31 else torch.int64
    total = torch.zeros(b, h, dtype=torch.int64, device=dev)
    for r in range(0, rows, step):
        w = _cell_weights(torch.arange(r, min(r + step, rows), device=dev), n, g, s, off).to(acc)
        total += (tables.blocks[:, :, r : r + step] * w).sum(-1, dtype=acc).sum(-1, dtype=torch.int64)
    return total


def closed_form_pairs(tables: KeepTables) -> Tensor | None:
    """Exact kept (query, key) pairs per head, int64 ``(B, H)``, in ``O(H x S)`` work (``O(H x N^2)`` for
    block cells), or ``None`` where no closed form applies (key padding, or cells mixed with other rules)."""
    if tables.kv_valid is not None:
        return None
    if tables.blocks is None:
        return _pairs_rule(tables)
    cells_only = not tables.columns.any() and not tables.diagonals.any() and bool(
        (tables.row_start.long() >= tables.kv_len).all())
    return _pairs_cells(tables) if cells_only else None
