"""The project's keep tables as the Triton sparse kernel's index, exactly, and the kernel's cost rule.

The kernel (:mod:`flexinference.kernels.sparse_triton`, MInference's ``block_offset`` + ``column_index``
layout, Jiang et al., 2024, arXiv:2407.02490, Sec. 3.2 / App. C) keeps, for query block ``m``: listed key
blocks whole (causal), listed *partial* blocks masked by ``diagonals[i - j] | columns[j]``, and listed key
columns. :func:`tile_grid` classifies every causal ``(query block, key block)`` tile of every head:

* *full* when the tile's rows are dense rows (``row_start``), its cell is kept (``blocks``), every diagonal
  offset it spans is kept, or every key of it is a kept column: the rule keeps every causal pair;
* *partial* otherwise when some kept diagonal crosses it: the kernel's bitmaps are then exactly the rule
  (no cell or dense row reaches it, by the first case);
* kept columns of unlisted tiles go to the column list (so blocks and columns never overlap).

Hence the kernel keeps exactly :func:`~flexinference.masks.tables.dense_keep`. What it cannot express
raises :class:`UnsupportedTables`: padding keys (``kv_valid`` with a ``False``), dense rows that start
inside a query block of real rows, and block cells smaller than 16 tokens. A chunk of queries on a cache
(``q_offset > 0``) runs on queries zero-padded to the key length: query blocks without real rows list
nothing (no work), but the padded ``q``/output cost ``S_kv / S_q`` times their memory.

Memory: the grid holds a few bytes per tile and head (``B * H * S_q * S_kv / (block_m * block_n)``; ~0.5 GB
transient for a 128K prefill with 32 heads), the same order as the FlexAttention path's block grid.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from flexinference.kernels.index_build import SparseIndex
from flexinference.masks.tables import KeepTables, closed_form_pairs

__all__ = [
    "BLOCK_TILES",
    "SDPA_PS_PER_PAIR",
    "TRITON_FIXED_MS",
    "TRITON_FULL_TILE",
    "TRITON_GRID_MS",
    "TRITON_INDEX_COST",
    "TRITON_MAX_COST",
    "TRITON_PARTIAL_TILE",
    "VS_TILES",
    "TileConfig",
    "TileGrid",
    "UnsupportedTables",
    "cost_lower_bound",
    "choose_tiles",
    "index_from_tables",
    "route_overhead",
    "tile_cost",
    "tile_grid",
    "triton_route",
]


class UnsupportedTables(ValueError):
    """The tables keep a set the sparse kernel cannot compute exactly (the message names the field)."""


@dataclass(frozen=True)
class TileConfig:
    """Kernel tile shape and launch options."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 16 or val & (val - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {val!r}")
        if self.block_m % self.block_n:
            raise ValueError(f"block_m ({self.block_m}) must be a multiple of block_n ({self.block_n})")
        for name in ("num_warps", "num_stages"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")


#: Fastest measured config for vertical-slash tables (H100, bf16, 128K, banded: 42.2 ms exact).
VS_TILES = TileConfig(128, 64, 8, 2)
#: Fastest measured config for block tables (H100, bf16, 128K, block top-k 100 x 64: 34.0 ms).
BLOCK_TILES = TileConfig(64, 64, 4, 3)
_SMALL_TILES = (TileConfig(32, 32, 4, 2), TileConfig(16, 16, 4, 2))  # not timed: explicit TRITON only

# Cost rule (H100 80GB, bf16, 32 query / 8 KV heads, D 128, 128K; benchmarks/results/h100_triton_sparse_*.json),
# per listed tile relative to dense SDPA per causal tile (SDPA 252-254 ms):
#: Whole tile: scattered superset (every causal tile listed whole) 425 ms = 1.67x SDPA at tile fraction 1.0;
#: banded 42.2 ms = 0.168x at tile fraction 0.101 (1.66). Column tiles are counted at this cost too (the
#: banded fit is then within 3%). Block top-k's 64 x 64 tiles measured 1.42 (34.0 ms at 0.095): 1.67 is
#: the conservative value for both configs.
TRITON_FULL_TILE = 1.67
#: Partial (bitmap-masked) tile: scattered exact 767 ms = 3.02x at tile fraction 1.0, 99.9% partial.
#: With both constants band+far (tile fraction 0.644, 87% partial, 433 ms = 1.70x) is predicted 1.82x.
TRITON_PARTIAL_TILE = 3.0
#: Index building, relative to SDPA: the dedicated builders took 3.8 (vertical-slash) to 10.3 ms (block
#: top-k) of 252 ms; rounded up, as this converter (a dense tile grid) was not timed on the GPU.
TRITON_INDEX_COST = 0.05
#: The route's fixed cost on top of its tiles (routing decision, tile grid, index, launches), fitted to the
#: AUTO run (benchmarks/results/h100_bench_auto_prev_*.json): measured attention time minus the per-tile
#: prediction was 5.9-6.7 ms at 32K for every kernel row, 7.6-17.5 ms at 128K and 17-52 ms at 256K (block
#: tables the most); modelled as ``FIXED + GRID x (S_q x S_kv / 128K^2) x (batch x heads / 32)`` ms.
TRITON_FIXED_MS = 6.5
TRITON_GRID_MS = 11.0
#: Dense SDPA time per causal (query, key) pair and head at head dim 128, H100 bf16, picoseconds: 0.81 at
#: 32K, 0.90 at 128K, 0.96 at 256K; the smallest, so the fixed cost is never underestimated relative to SDPA.
SDPA_PS_PER_PAIR = 0.81
#: Use the kernel when the predicted layer cost (plus the index) is below this fraction of SDPA; the
#: margin covers the fit (within -1% (scattered) to +18% (block top-k) of the four measured cases) and
#: shapes never timed (other lengths, head dims, GPUs: the constants come from 128K on one H100).
TRITON_MAX_COST = 0.85


def tile_cost(tile_frac: Tensor, partial_frac: Tensor) -> Tensor:
    """Predicted kernel time per head relative to dense SDPA.

    Args:
        tile_frac: ``(listed blocks + column tiles) / causal tiles`` per head (any shape).
        partial_frac: partial blocks / (listed blocks + column tiles), same shape.

    Returns:
        ``tile_frac * (F + (P - F) * partial_frac)`` with ``F`` = :data:`TRITON_FULL_TILE`,
        ``P`` = :data:`TRITON_PARTIAL_TILE`.
    """
    return tile_frac * (TRITON_FULL_TILE + (TRITON_PARTIAL_TILE - TRITON_FULL_TILE) * partial_frac)


def route_overhead(batch_heads: int, q_len: int, kv_len: int, head_dim: int) -> float:
    """The Triton route's fixed cost relative to the predicted dense SDPA time of the same inputs.

    Args:
        batch_heads: batch x query heads.
        q_len, kv_len: query rows (the last ``q_len`` of ``kv_len`` positions) and keys.
        head_dim: ``D``.
    """
    pairs = q_len * (kv_len - q_len) + q_len * (q_len + 1) / 2
    sdpa_ms = SDPA_PS_PER_PAIR * 1e-9 * pairs * batch_heads * head_dim / 128
    # The tile grid spans the chunk's query blocks only: q_len x kv_len tiles (kv_len^2 for a whole prefill).
    fixed_ms = TRITON_FIXED_MS + TRITON_GRID_MS * q_len * kv_len / 131072**2 * batch_heads / 32
    return fixed_ms / sdpa_ms


def _causal_tiles(tables: KeepTables, tiles: TileConfig) -> int:
    """Causal tiles of the query blocks holding real rows (``TileGrid.causal.sum()``, in closed form; what
    :meth:`TileGrid.stats` and :func:`cost_lower_bound` divide by)."""
    lo, hi = _query_span(tables)
    bm, bn, s = tiles.block_m, tiles.block_n, tables.kv_len
    m = torch.arange(lo // bm, _cdiv(hi, bm))
    m_end = ((m + 1) * bm).clamp(max=s) - 1
    return int((m_end // bn + 1).sum())


def cost_lower_bound(tables: KeepTables, tiles: TileConfig) -> float | None:
    """A lower bound of the kernel's predicted layer cost (relative to SDPA) from the kept pairs alone, with
    no tile grid (``None`` where the pairs have no closed form).

    Every listed tile (whole, partial or a tile of columns) holds at most ``block_m x block_n`` kept pairs,
    so a head keeping ``K`` pairs lists at least ``K / (block_m x block_n)`` of the ``C`` causal tiles and
    :func:`triton_route` prices it at least ``TRITON_FULL_TILE x min(K / (block_m x block_n x C), 1)``. A
    bound that already loses to SDPA settles the route without building the grid."""
    pairs = closed_form_pairs(tables)
    if pairs is None:
        return None
    frac = (pairs.double() / (tiles.block_m * tiles.block_n * _causal_tiles(tables, tiles))).clamp(max=1.0)
    return TRITON_FULL_TILE * float(frac.mean())


def triton_route(tile_frac: Tensor, partial_frac: Tensor, overhead: float = TRITON_INDEX_COST) -> tuple[bool, Tensor]:
    """Whether a layer should run the sparse kernel, and which heads it should run dense.

    A head whose predicted cost exceeds :data:`TRITON_FULL_TILE` (all causal tiles whole) runs dense in the
    kernel; the layer runs the kernel when the mean head cost plus ``overhead`` is below
    :data:`TRITON_MAX_COST`, else dense SDPA (a sparse method is never slower than dense).

    Args:
        tile_frac, partial_frac: ``(B, H)`` as in :func:`tile_cost`.
        overhead: the route's fixed cost relative to SDPA (:func:`route_overhead`; default
            :data:`TRITON_INDEX_COST`, the 128K value).

    Returns:
        ``(use_kernel, dense_heads)`` with ``dense_heads`` bool ``(B, H)``.
    """
    cost = tile_cost(tile_frac, partial_frac)
    dense = cost > TRITON_FULL_TILE
    layer = torch.where(dense, torch.full_like(cost, TRITON_FULL_TILE), cost).mean()
    return bool(layer + overhead < TRITON_MAX_COST), dense


def _query_span(tables: KeepTables) -> tuple[int, int]:
    """Absolute rows ``[lo, hi)`` of the real queries (one host sync)."""
    if not isinstance(tables, KeepTables):
        raise TypeError(f"tables must be KeepTables, got {type(tables).__name__}")
    lo = int(tables.q_offset)
    if lo < 0 or lo + tables.q_len > tables.kv_len:
        raise UnsupportedTables(f"q_offset ({lo}) + q_len ({tables.q_len}) must lie within kv_len ({tables.kv_len})")
    return lo, lo + tables.q_len


def _row_alignment(tables: KeepTables, lo: int, hi: int) -> int:
    """Largest power of two dividing every ``row_start`` that has real query rows on both sides."""
    rs = tables.row_start.long()
    inside = (rs > lo) & (rs < hi)
    return int(torch.where(inside, rs & -rs, 1 << 30).min())


def _unsupported(tables: KeepTables, tiles: TileConfig, align: int) -> str | None:
    if tables.blocks is not None and tables.table_block % tiles.block_m:
        return (f"table_block {tables.table_block}: block cells need tiles that divide them, got "
                f"({tiles.block_m}, {tiles.block_n}); the kernel's smallest tile is 16")
    if align % tiles.block_m:
        return (f"row_start: dense rows starting inside a query block of real rows (alignment {align}) need "
                f"query blocks of <= {align} rows, got {tiles.block_m} (the kernel's smallest is 16)")
    return None


def _check_keys(tables: KeepTables) -> None:
    if tables.kv_valid is not None and not bool(tables.kv_valid[:, : tables.kv_len].all()):
        raise UnsupportedTables("kv_valid marks padding keys: the sparse kernel has no key padding mask")


def choose_tiles(tables: KeepTables) -> TileConfig:
    """The fastest measured tile config that computes ``tables`` exactly (:data:`VS_TILES` without block
    cells, :data:`BLOCK_TILES` with them; smaller tiles when cells or dense rows need them).

    Raises:
        UnsupportedTables: naming ``kv_valid``, ``q_offset``, ``table_block`` or ``row_start``.
    """
    lo, hi = _query_span(tables)
    _check_keys(tables)
    align = _row_alignment(tables, lo, hi)
    candidates = (BLOCK_TILES, *_SMALL_TILES) if tables.blocks is not None else (VS_TILES, BLOCK_TILES, *_SMALL_TILES)
    reasons = [_unsupported(tables, tiles, align) for tiles in candidates]
    for tiles, reason in zip(candidates, reasons):
        if reason is None:
            return tiles
    raise UnsupportedTables(reasons[-1])


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _cdiv_t(a: Tensor, b: int) -> Tensor:
    return torch.div(a + b - 1, b, rounding_mode="floor")


#: Elements reduced per call in :func:`_row_counts` (a reduction with a dtype first copies its input to that
#: dtype: 4 bytes x this per chunk).
_COUNT_CHUNK = 1 << 28


def _row_counts(mask: Tensor) -> Tensor:
    """int32 row sums (over the last dim) of a bool grid, shape ``mask.shape[:-1]``. Rows are summed in chunks
    of about :data:`_COUNT_CHUNK` elements: one call over a whole layer's grid at 1M tokens would first copy
    it to int32 (17 GB), or to int64 without a dtype (34 GB)."""
    rows = mask.reshape(-1, mask.shape[-1])
    step = max(1, _COUNT_CHUNK // max(1, rows.shape[1]))
    parts = [rows[i : i + step].sum(-1, dtype=torch.int32) for i in range(0, rows.shape[0], step)]
    return torch.cat(parts).view(mask.shape[:-1])


@dataclass(frozen=True)
class TileGrid:
    """Every causal tile of every head, classified (see the module docstring).

    Only the ``R`` query blocks holding real query rows, ``first_block`` on, are classified (a short chunk on
    a long cache classifies a few rows of tiles); the index lists nothing for the others.

    Attributes:
        full, partial: bool ``(B, H, R, NK)``, ``NK = ceil(S_kv / block_n)``.
        causal: bool ``(R, NK)``: the causal tiles.
        column_count: int32 ``(B, H, R)``; column_index: int32 ``(B, H, R, NV)`` (padding ``-1``).
        tables: the tables; tiles: the tile config.
        first_block: the first classified query block; num_q_blocks: ``ceil(S_kv / block_m)``.
    """

    full: Tensor
    partial: Tensor
    causal: Tensor
    column_count: Tensor
    column_index: Tensor
    tables: KeepTables
    tiles: TileConfig
    first_block: int
    num_q_blocks: int

    def stats(self) -> tuple[Tensor, Tensor]:
        """``(tile_frac, partial_frac)`` fp32 ``(B, H)``, the inputs of :func:`triton_route`."""
        partial = _row_counts(self.partial).sum(-1, dtype=torch.int64).float()
        blocks = _row_counts(self.full).sum(-1, dtype=torch.int64).float() + partial
        col_tiles = torch.div(self.column_count + self.tiles.block_n - 1, self.tiles.block_n,
                              rounding_mode="floor").sum(-1).float()
        listed = blocks + col_tiles
        frac = listed / _causal_tiles(self.tables, self.tiles)
        return frac, partial / listed.clamp(min=1)

    def densify(self, heads: Tensor) -> TileGrid:
        """Heads ``heads`` (bool ``(B, H)``) keep every causal pair: all causal tiles whole, no columns.
        The kernel then computes dense attention for them (exact attention, more than the pattern)."""
        h = heads[..., None, None]
        return replace(self, full=torch.where(h, self.causal, self.full), partial=self.partial & ~h,
                       column_count=torch.where(heads[..., None], 0, self.column_count))

    def index(self) -> SparseIndex:
        """The kernel index (full blocks first, each group by key block; three host syncs size the lists).

        Only the listed tiles are touched (``nonzero`` and a scatter), never a sort of every tile."""
        n_full, n_part = _row_counts(self.full), _row_counts(self.partial)
        count = n_full + n_part
        width = max(1, int(count.max()))
        block_index = torch.full((*count.shape, width), -1, dtype=torch.int32, device=count.device)
        flat = block_index.view(-1, width)
        for mask, per_row, base in ((self.full, n_full.flatten(), None), (self.partial, n_part.flatten(),
                                                                         n_full.flatten())):
            row, col = mask.flatten(0, -2).nonzero(as_tuple=True)  # row-major: ascending key blocks in a row
            slot = torch.arange(row.numel(), device=row.device) - (per_row.cumsum(0) - per_row)[row]
            if base is not None:
                slot = slot + base[row]
            flat[row, slot] = col.to(torch.int32)
        rows = (self.first_block, self.num_q_blocks - self.first_block - count.shape[-1])  # unclassified: empty

        def pad(x: Tensor, value: int = 0) -> Tensor:
            return F.pad(x, rows if x.dim() == 3 else (0, 0, *rows), value=value).contiguous()

        t = self.tables
        return SparseIndex(
            block_count=pad(count), block_index=pad(block_index, -1), column_count=pad(self.column_count),
            column_index=pad(self.column_index, -1), seq_len=t.kv_len, block_m=self.tiles.block_m,
            block_n=self.tiles.block_n, full_count=pad(n_full), diag_keep=t.diagonals, col_keep=t.columns,
        )


def tile_grid(tables: KeepTables, tiles: TileConfig | None = None) -> TileGrid:
    """Classify the tiles of ``tables`` (batched over batch and heads; a few host syncs).

    Args:
        tables: keep tables; ``blocks`` need ``table_block`` divisible by the tile sides.
        tiles: the tile config, default :func:`choose_tiles` (which also validates the tables).

    Raises:
        UnsupportedTables: what the kernel cannot express (see :func:`choose_tiles`).
    """
    lo_q, hi_q = _query_span(tables)
    if tiles is None:
        tiles = choose_tiles(tables)
    else:
        if not isinstance(tiles, TileConfig):
            raise TypeError(f"tiles must be a TileConfig, got {type(tiles).__name__}")
        _check_keys(tables)
        reason = _unsupported(tables, tiles, _row_alignment(tables, lo_q, hi_q))
        if reason is not None:
            raise UnsupportedTables(reason)
    s, bm, bn, r = tables.kv_len, tiles.block_m, tiles.block_n, tiles.block_m // tiles.block_n
    dev = tables.columns.device
    m0, m1, nk = lo_q // bm, _cdiv(hi_q, bm), _cdiv(s, bn)
    m, n = torch.arange(m0, m1, device=dev), torch.arange(nk, device=dev)
    m_end = ((m + 1) * bm).clamp(max=s) - 1
    causal = n[None, :] * bn <= m_end[:, None]

    # Diagonals by block distance t = r*m - n: the tile spans offsets [bn*t - bn + 1, bn*t + bm - 1] (>= the
    # last block's real span, so "every offset kept" stays sufficient and "some offset kept" necessary).
    diag = tables.diagonals[..., :s]
    t = torch.arange(-(r - 1), r * (m1 - 1) + 1, device=dev)
    lo, hi = (bn * t - bn + 1).clamp(min=0), (bn * t + bm - 1).clamp(max=s - 1)
    prefix = F.pad(diag.to(torch.int32).cumsum(-1, dtype=torch.int32), (1, 0))
    kept = prefix[..., (hi + 1).clamp(0, s)] - prefix[..., lo.clamp(max=s)]
    touched_t, full_t = (lo <= hi) & (kept > 0), (lo <= hi) & (kept == hi - lo + 1)
    tidx = (r * m[:, None] - n[None, :] + r - 1).clamp(0, t.numel() - 1)

    # Key blocks whose every key is a kept column.
    cols = tables.columns[..., :s]
    per_block = F.pad(cols, (0, nk * bn - s)).view(*cols.shape[:2], nk, bn).sum(-1)
    col_full = per_block == (s - n * bn).clamp(max=bn)

    # Dense rows from row_start (aligned by choose_tiles where real rows sit on both sides).
    rs = tables.row_start.long()
    rs_eff = torch.where(rs <= lo_q, rs // bm * bm, _cdiv_t(rs, bm) * bm)
    dense_rows = (m * bm)[None, None, :] >= rs_eff[..., None]

    full = dense_rows[..., None] | full_t[..., tidx] | col_full[..., None, :]
    if tables.blocks is not None:
        g = tables.table_block
        if bm == bn == g:  # one table cell per tile: a view
            cells = tables.blocks[:, :, m0:m1, :nk]
        else:
            cells = tables.blocks[:, :, m * bm // g][:, :, :, n * bn // g]
        full = full | cells
    full = full & causal
    partial = touched_t[..., tidx] & causal & ~full
    count, index = _columns(cols, full | partial, m_end, bn)
    return TileGrid(full, partial, causal, count, index, tables, tiles, m0, _cdiv(s, bm))


def _columns(cols: Tensor, listed: Tensor, m_end: Tensor, bn: int) -> tuple[Tensor, Tensor]:
    """Kept columns ``<=`` each query block's last row that no listed tile covers, ascending."""
    b, h, s = cols.shape
    nq = m_end.numel()
    nv = int(cols.sum(-1).max())
    if nv == 0:
        return (torch.zeros(b, h, nq, dtype=torch.int32, device=cols.device),
                torch.full((b, h, nq, 1), -1, dtype=torch.int32, device=cols.device))
    pos = torch.arange(s, device=cols.device)
    col_list = torch.where(cols, pos, s).topk(nv, -1, largest=False).values  # ascending; s marks padding
    kb = (col_list // bn).clamp(max=listed.shape[-1] - 1)[:, :, None, :].expand(-1, -1, nq, -1)
    keep = (col_list[:, :, None, :] <= m_end[:, None]) & ~listed.gather(-1, kb)
    count = keep.sum(-1, dtype=torch.int32)
    slot = torch.where(keep, keep.cumsum(-1, dtype=torch.int32) - 1, nv).long()
    index = torch.full((b, h, nq, nv + 1), -1, dtype=torch.int32, device=cols.device)
    index.scatter_(-1, slot, col_list[:, :, None, :].expand_as(slot).to(torch.int32))
    return count, index[..., :nv]


def index_from_tables(tables: KeepTables, tiles: TileConfig | None = None) -> SparseIndex:
    """The sparse kernel's exact index of ``tables`` (rows are absolute positions ``[0, kv_len)``).

    Example:
        >>> import torch, flexinference as fi
        >>> from flexinference.compose import build_tables
        >>> q = torch.randn(1, 2, 300, 64); k = torch.randn(1, 1, 300, 64)
        >>> index = index_from_tables(build_tables(q, k, [fi.AShape(4, 64)] * 2, scale=0.125))
        >>> index.block_m, index.block_n, index.num_q_blocks
        (128, 64, 3)
    """
    return tile_grid(tables, tiles).index()

