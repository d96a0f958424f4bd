"""The sparse prefill kernel's index, and its builders (MInference, Jiang et al., 2024, arXiv:2407.02490,
Sec. 3.2 and App. C).

For every ``(batch, head, query block)`` the kernel reads a list of whole key blocks and a list of single
key columns, and attends both with one online softmax. MInference's vertical-slash layout turns the
slash diagonals of a query block into the key blocks they cross and the verticals not already inside
those blocks into the column list; block top-k lists its selected key blocks and no columns.

Exactness. A slash block holds keys that no kept diagonal or column reaches, so the vertical-slash
index also carries per-head bitmaps (``diag_keep`` over offsets ``i - j``, ``col_keep`` over columns) and
sorts each list into *full* blocks first (every causal element already kept: all offsets the block spans
are kept diagonals) and *partial* blocks after ``full_count``. The kernel's exact mode masks partial blocks
element-wise with ``diag_keep[i - j] | col_keep[j]``; its superset mode keeps every listed block whole.

Every builder here is vectorised over batch and heads (a few host syncs size the padded lists).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flexinference.masks.block_sparse import block_table
from flexinference.masks.vertical_slash import index_table

__all__ = ["SparseIndex", "block_topk_index", "vertical_slash_index"]

_INDEX_DTYPES = (torch.int32,)
_BITMAP_DTYPES = (torch.bool, torch.int8, torch.uint8)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_int32(name: str, t: Tensor, ndim: int) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{name} must be int32, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")


@dataclass(frozen=True)
class SparseIndex:
    """Per ``(batch, head, query block)`` key lists of the sparse kernel (``B`` may be 1 to broadcast).

    Query block ``m`` holds rows ``[m * block_m, (m + 1) * block_m)``; key block ``n`` holds keys
    ``[n * block_n, (n + 1) * block_n)``. Row ``i`` keeps key ``j`` iff ``j <= i`` and (``j`` lies in a
    listed block of its query block, or ``j`` is in its column list). Lists must be duplicate-free and
    mutually disjoint (the kernel would count a key twice); :meth:`check` verifies it.

    Attributes:
        block_count: int32 ``(B, H, NQ)``, ``NQ = ceil(seq_len / block_m)``.
        block_index: int32 ``(B, H, NQ, MAXB)`` key-block ids; entries past ``block_count`` are padding.
        column_count: int32 ``(B, H, NQ)``.
        column_index: int32 ``(B, H, NQ, MAXC)`` sorted key token columns; padding past ``column_count``.
        seq_len: ``S`` (square causal prefill).
        block_m, block_n: query rows / keys per block (powers of two, ``>= 16``).
        full_count: int32 ``(B, H, NQ)`` or ``None``: the first ``full_count`` listed blocks are kept whole
            in exact mode, the rest are masked by the bitmaps (``None``: every block is whole).
        diag_keep: bool/int8 ``(B, H, T >= S)`` kept diagonal offsets, or ``None``.
        col_keep: bool/int8 ``(B, H, T >= S)`` kept columns, or ``None``.
    """

    block_count: Tensor
    block_index: Tensor
    column_count: Tensor
    column_index: Tensor
    seq_len: int
    block_m: int = 64
    block_n: int = 64
    full_count: Tensor | None = None
    diag_keep: Tensor | None = None
    col_keep: Tensor | None = None

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 16 or val & (val - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {val!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {self.seq_len!r}")
        _check_int32("block_count", self.block_count, 3)
        _check_int32("block_index", self.block_index, 4)
        _check_int32("column_count", self.column_count, 3)
        _check_int32("column_index", self.column_index, 4)
        lead = tuple(self.block_count.shape)
        if lead[2] != _cdiv(self.seq_len, self.block_m):
            raise ValueError(f"block_count has {lead[2]} query blocks, expected ceil({self.seq_len} / {self.block_m})")
        for name in ("block_index", "column_count", "column_index"):
            if tuple(getattr(self, name).shape[:3]) != lead:
                raise ValueError(f"{name} leading shape {tuple(getattr(self, name).shape[:3])} != block_count {lead}")
        given = [x is not None for x in (self.full_count, self.diag_keep, self.col_keep)]
        if any(given) and not all(given):
            raise ValueError("full_count, diag_keep and col_keep must be given together (or all None)")
        if self.full_count is not None:
            _check_int32("full_count", self.full_count, 3)
            if tuple(self.full_count.shape) != lead:
                raise ValueError(f"full_count shape {tuple(self.full_count.shape)} != block_count {lead}")
            for name in ("diag_keep", "col_keep"):
                t = getattr(self, name)
                if t.dtype not in _BITMAP_DTYPES:
                    raise ValueError(f"{name} must be bool/int8/uint8, got {t.dtype}")
                if t.dim() != 3 or tuple(t.shape[:2]) != lead[:2] or t.shape[2] < self.seq_len:
                    raise ValueError(f"{name} must be (B, H, T >= {self.seq_len}) matching block_count, got {tuple(t.shape)}")

    @property
    def batch(self) -> int:
        return self.block_count.shape[0]

    @property
    def heads(self) -> int:
        return self.block_count.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return self.block_count.shape[2]

    @property
    def exact_bitmaps(self) -> bool:
        """Whether the index carries bitmaps (exact mode masks its partial blocks)."""
        return self.full_count is not None

    def check(self) -> None:
        """Validate the contents (host syncs, ``O(H * S^2)`` memory: small sizes, tests and debugging):
        counts within the list widths, ids in range, no duplicate or overlapping entries. Raises ``ValueError``."""
        nk = _cdiv(self.seq_len, self.block_n)
        for cnt_name, idx_name, hi in (("block_count", "block_index", nk), ("column_count", "column_index", self.seq_len)):
            cnt, idx = getattr(self, cnt_name).long(), getattr(self, idx_name).long()
            if bool(((cnt < 0) | (cnt > idx.shape[-1])).any()):
                raise ValueError(f"{cnt_name} must lie in [0, {idx.shape[-1]}]")
            live = torch.arange(idx.shape[-1], device=idx.device) < cnt[..., None]
            if bool((live & ((idx < 0) | (idx >= hi))).any()):
                raise ValueError(f"{idx_name} has listed entries outside [0, {hi})")
        if self.full_count is not None and bool(((self.full_count < 0) | (self.full_count > self.block_count)).any()):
            raise ValueError("full_count must lie in [0, block_count]")
        from flexinference.kernels.sparse_reference import listing_multiplicity

        rows = torch.arange(self.seq_len, device=self.block_count.device)
        if bool((listing_multiplicity(self, rows) > 1).any()):
            raise ValueError("block_index/column_index list some key more than once for a query block")


def _as_table(x: Tensor, seq_len: int, name: str) -> Tensor:
    """Bool ``(B, H, S)`` table from a bool table ``(B?, H, T >= S)`` or an int index list ``(B?, H, K)``."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() == 2:
        x = x[None]
    if x.dim() != 3:
        raise ValueError(f"{name} must be (H, K) or (B, H, K), got shape {tuple(x.shape)}")
    if x.dtype == torch.bool:
        if x.shape[-1] < seq_len:
            raise ValueError(f"{name} bool table length {x.shape[-1]} < seq_len {seq_len}")
        return x[..., :seq_len]
    if x.dtype.is_floating_point or x.dtype.is_complex:
        raise ValueError(f"{name} must be a bool table or an integer index list, got {x.dtype}")
    return index_table(x, seq_len)


def vertical_slash_index(
    columns: Tensor, diagonals: Tensor, seq_len: int, *, block_m: int = 64, block_n: int = 64
) -> SparseIndex:
    """Kernel index of vertical-slash heads (MInference's ``block_offset`` + ``column_index`` layout).

    Query block ``m`` lists every key block that some kept diagonal offset crosses (the block superset of
    its slashes, full blocks first) and every kept column ``<=`` its last row that lies outside those
    blocks. Diagonal 0 is always kept, so no row is empty. One host sync sizes each list.

    Args:
        columns: kept key columns per head: bool ``(B?, H, T >= S)`` tables (e.g. from
            :func:`~flexinference.estimate.vertical_slash.vertical_slash_indices`) or int ``(B?, H, NV)``
            lists padded with ``-1`` (out-of-range entries ignored).
        diagonals: kept diagonal offsets ``i - j`` per head, same two forms.
        seq_len: ``S``.
        block_m, block_n: kernel block sizes; ``block_m % block_n == 0``.

    Returns:
        A :class:`SparseIndex` with bitmaps (exact mode available).
    """
    if block_m % block_n:
        raise ValueError(f"block_m ({block_m}) must be a multiple of block_n ({block_n})")
    cols = _as_table(columns, seq_len, "columns")
    diag = _as_table(diagonals, seq_len, "diagonals").clone()
    if cols.shape[1] != diag.shape[1]:
        raise ValueError(f"columns has {cols.shape[1]} heads, diagonals {diag.shape[1]}")
    b = max(cols.shape[0], diag.shape[0])
    if {cols.shape[0], diag.shape[0]} - {1, b}:
        raise ValueError(f"columns batch {cols.shape[0]} and diagonals batch {diag.shape[0]} do not broadcast")
    cols, diag = cols.expand(b, -1, -1), diag.expand(b, -1, -1).clone()
    diag[..., 0] = True
    dev, s, bn, r = diag.device, seq_len, block_n, block_m // block_n
    nq = _cdiv(s, block_m)

    # Block-diagonal distance t = r*m - n; query block m / key block n span offsets [bn*t - bn + 1, bn*t + block_m - 1].
    t = torch.arange(-(r - 1), r * (nq - 1) + 1, device=dev)
    lo = (bn * t - bn + 1).clamp(min=0)
    hi = (bn * t + block_m - 1).clamp(max=s - 1)
    live = lo <= hi
    prefix = torch.nn.functional.pad(diag.to(torch.int32).cumsum(-1, dtype=torch.int32), (1, 0))
    kept = prefix[..., (hi + 1).clamp(0, s)] - prefix[..., lo.clamp(max=s)]
    touched = live & (kept > 0)
    full = touched & (kept == hi - lo + 1)

    # Sort distances: full ones first, then partial ones, each by t (nearest blocks first).
    nt = t.numel()
    key = torch.where(touched, (~full).long() * nt + (t + r - 1), 2 * nt)
    order_t = key.sort(-1).values % nt - (r - 1)
    n_full, n_part = full.sum(-1, keepdim=True), (touched & ~full).sum(-1, keepdim=True)
    big = torch.iinfo(torch.long).max
    pos = torch.arange(nt, device=dev)
    f_vals = torch.where(pos < n_full, order_t, big)
    p_vals = torch.where(pos < n_part, order_t.gather(-1, (pos + n_full).clamp(max=nt - 1)), big)

    m = torch.arange(nq, device=dev)
    m_end = ((m + 1) * block_m).clamp(max=s) - 1
    t_hi = (r * m).expand(b, cols.shape[1], -1).contiguous()
    t_lo = (r * m - m_end // bn).expand_as(t_hi).contiguous()
    f_lo = torch.searchsorted(f_vals, t_lo)
    p_lo = torch.searchsorted(p_vals, t_lo)
    cf = torch.searchsorted(f_vals, t_hi, right=True) - f_lo
    cp = torch.searchsorted(p_vals, t_hi, right=True) - p_lo
    count = cf + cp
    width = max(1, int(count.max()))
    k = torch.arange(width, device=dev)
    in_f = k < cf[..., None]
    ft = f_vals.gather(-1, (f_lo[..., None] + k).clamp(max=nt - 1).flatten(-2)).view(in_f.shape)
    pt = p_vals.gather(-1, (p_lo[..., None] + k - cf[..., None]).clamp(0, nt - 1).flatten(-2)).view(in_f.shape)
    dist = torch.where(in_f, ft, pt)
    block_index = torch.where(k < count[..., None], r * m[:, None] - dist, -1)

    # Columns outside the listed blocks, per query block, kept in ascending order.
    nv = max(1, int(cols.sum(-1).max()))
    col_list = torch.where(cols, torch.arange(s, device=dev), s).topk(min(nv, s), -1, largest=False).values
    c = col_list[..., None, :]  # (B, H, 1, NV)
    cdist = r * m[:, None] - torch.div(c, bn, rounding_mode="floor")
    covered = touched.gather(-1, (cdist + r - 1).clamp(0, nt - 1).flatten(-2)).view(cdist.shape)
    keep_col = (c <= m_end[:, None]) & ~covered
    col_count = keep_col.sum(-1)
    slot = torch.where(keep_col, keep_col.cumsum(-1) - 1, col_list.shape[-1])
    column_index = torch.full((*keep_col.shape[:-1], col_list.shape[-1] + 1), -1, dtype=torch.long, device=dev)
    column_index.scatter_(-1, slot, c.expand_as(slot))

    return SparseIndex(
        block_count=count.to(torch.int32),
        block_index=block_index.to(torch.int32).contiguous(),
        column_count=col_count.to(torch.int32),
        column_index=column_index[..., :-1].to(torch.int32).contiguous(),
        seq_len=s,
        block_m=block_m,
        block_n=block_n,
        full_count=cf.to(torch.int32),
        diag_keep=diag.contiguous(),
        col_keep=cols.contiguous(),
    )


def block_topk_index(
    blocks: Tensor, seq_len: int, *, block: int, block_m: int = 64, block_n: int = 64
) -> SparseIndex:
    """Kernel index of block top-k heads (MInference's block-sparse head): whole blocks, no columns.

    Args:
        blocks: selected cells at ``block`` tokens per side, rows indexed by absolute query block: bool
            ``(B?, H, N, N')`` with ``N, N' >= ceil(S / block)`` (e.g. from
            :func:`~flexinference.estimate.block_topk.block_topk_blocks`), or int ``(B?, H, N, K)`` key-block
            ids padded with ``-1``. The diagonal cell is always added; cells above it are dropped.
        seq_len: ``S``.
        block: selection block size; a multiple of ``block_m`` and of ``block_n`` (so the index is exact).
        block_m, block_n: kernel block sizes.

    Returns:
        A :class:`SparseIndex` without bitmaps (every listed block is kept whole).
    """
    if not isinstance(block, int) or block < 1 or block % block_m or block % block_n:
        raise ValueError(f"block ({block!r}) must be a multiple of block_m ({block_m}) and block_n ({block_n})")
    if not isinstance(blocks, Tensor) or blocks.dim() not in (3, 4):
        raise ValueError(f"blocks must be a (B?, H, N, N') tensor, got {getattr(blocks, 'shape', type(blocks).__name__)}")
    nb = _cdiv(seq_len, block)
    cells = blocks if blocks.dim() == 4 else blocks[None]
    if cells.dtype != torch.bool:
        if cells.dtype.is_floating_point or cells.dtype.is_complex:
            raise ValueError(f"blocks must be bool cells or integer block ids, got {cells.dtype}")
        cells = block_table(cells[:, :, :nb], nb)
    if cells.shape[-2] < nb or cells.shape[-1] < nb:
        raise ValueError(f"blocks must cover {nb} x {nb} cells of {block} tokens, got {tuple(cells.shape[-2:])}")
    dev = cells.device
    qb, kb = torch.arange(nb, device=dev)[:, None], torch.arange(nb, device=dev)[None, :]
    cells = (cells[..., :nb, :nb] & (kb <= qb)) | (kb == qb)
    # Selected cells per selection row, nearest first: (B, H, nb, K).
    kmax = int(cells.sum(-1).max())
    sel = torch.where(cells, kb, -1).topk(kmax, -1).values
    # Kernel key blocks (nearest first) of each kernel query block's selection row.
    rn, nq = block // block_n, _cdiv(seq_len, block_m)
    m = torch.arange(nq, device=dev)
    m_end = ((m + 1) * block_m).clamp(max=seq_len) - 1
    u = torch.arange(rn - 1, -1, -1, device=dev)
    ids = (sel[..., :, None] * rn + u).flatten(-2)[:, :, m * block_m // block]  # (B, H, NQ, K * rn)
    valid = (sel[:, :, m * block_m // block, :, None] >= 0).expand(-1, -1, -1, -1, rn).flatten(-2)
    valid = valid & (ids * block_n <= m_end[:, None])
    ids = torch.where(valid, ids, -1).sort(-1, descending=True).values
    count = valid.sum(-1)
    columns = torch.full((*count.shape, 1), -1, dtype=torch.int32, device=dev)
    return SparseIndex(
        block_count=count.to(torch.int32),
        block_index=ids.to(torch.int32).contiguous(),
        column_count=torch.zeros_like(count, dtype=torch.int32),
        column_index=columns,
        seq_len=seq_len,
        block_m=block_m,
        block_n=block_n,
    )
