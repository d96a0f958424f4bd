"""The kernel-level entry point: ``sparse_attention(q, k, v, patterns)``.

estimate (:mod:`flexinference.compose`) -> BlockMask (:mod:`flexinference.masks.block_mask`) ->
``flex_attention``. The implementation is chosen explicitly with :class:`Impl`; nothing falls back
silently.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import flex_attention

from flexinference.compose import build_tables
from flexinference.masks.block_mask import block_grid, block_mask_from_grid, block_mask_from_tables, demote_to_partial
from flexinference.masks.tables import KeepTables, dense_keep
from flexinference.patterns import Pattern
from flexinference.testing.reference import reference_attention

if TYPE_CHECKING:  # the kernels package imports triton lazily; only the annotation needs it here
    from flexinference.kernels.from_tables import TileGrid

__all__ = ["Impl", "DENSE_LAYER_COST", "attend_tables", "auto_route", "padded_block_mask", "sparse_attention", "normalize_patterns", "validate_qkv"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Impl(enum.Enum):
    """How :func:`sparse_attention` computes.

    * ``AUTO`` (documented default): dense SDPA when every head's tables mark all its rows dense
      (``row_start`` at or before the first query, e.g. ``Dense`` heads; outside ``torch.compile``).
      Otherwise on CPU, ``FLEX_EAGER``. On CUDA, outside ``torch.compile``, with
      triton importable, fp16/bf16 inputs, a head dim the kernel supports and tables it computes exactly
      at its measured tile shapes (:func:`flexinference.kernels.from_tables.choose_tiles`): ``TRITON``
      when :func:`~flexinference.kernels.from_tables.triton_route` predicts it (tiles plus the route's fixed
      cost, :func:`~flexinference.kernels.from_tables.route_overhead`) below
      :data:`~flexinference.kernels.from_tables.TRITON_MAX_COST` of dense SDPA (heads predicted costlier
      than dense inside the kernel run dense there), else dense SDPA. Other tables on CUDA: a cost model
      (:func:`flexinference.gathered.visited_block_fraction`) runs the whole layer with dense SDPA when
      its weighted block cost is above :data:`DENSE_LAYER_COST` of dense; heads costlier than dense alone
      run dense (all-full blocks); the rest run ``GATHERED`` when any head keeps scattered columns, else
      ``FLEX``. Inside a user's ``torch.compile``, ``FLEX`` (no host-side cost model, and the Triton path's
      index building needs host syncs). So a sparse method never makes a head slower than dense; a head
      routed to dense keeps *more* than its pattern (exact attention), never less.
    * ``TRITON``: the hand Triton sparse kernel (:mod:`flexinference.kernels.sparse_triton`) over the exact
      index of the tables (:mod:`flexinference.kernels.from_tables`). Raises ``ValueError`` naming what it
      cannot express (``kv_valid`` padding, dense rows starting inside a query block, cells < 16 tokens,
      fp64, a head dim outside 32/64/128); CPU tensors need ``TRITON_INTERPRET=1``. A chunk on a cache runs
      on zero-padded queries. ``kernel_options`` is ignored. Under ``torch.compile`` it runs as a graph
      break (``torch.compiler.disable``).
    * ``FLEX``: ``torch.compile``-d ``flex_attention`` over the tables' BlockMask (block sparsity honoured).
    * ``GATHERED``: kept columns gathered into a compact K/V prefix (:mod:`flexinference.gathered`), compiled
      on CUDA, eager on CPU; same kept set as ``FLEX``.
    * ``FLEX_EAGER``: eager ``flex_attention`` (materialises scores; for CPU and tests).
    * ``REFERENCE``: the dense boolean keep mask and plain softmax attention (small sizes only).

    An explicit choice other than ``AUTO`` computes exactly the pattern's kept set, with no rerouting.
    """

    AUTO = "auto"
    FLEX = "flex"
    TRITON = "triton"
    GATHERED = "gathered"
    FLEX_EAGER = "flex_eager"
    REFERENCE = "reference"


#: Distinct length buckets one process may compile kernels for (4 per doubling of the length, plus
#: block-size and dtype variants); dynamo's default of 8 would fall back to the unfused path that
#: materialises the full score matrix, an out-of-memory at long context.
_RECOMPILE_LIMIT = 64

#: ``AUTO`` on CUDA runs a layer with dense SDPA when its weighted block cost (relative to dense flex)
#: exceeds this: SDPA / dense flex measured 14 / 21 ns per causal block on the H100 (docs/benchmarks.md).
DENSE_LAYER_COST = 0.65


@functools.cache
def compiled_flex():
    """The process's one ``torch.compile``-d ``flex_attention`` (created on first use)."""
    return torch.compile(flex_attention, dynamic=False)


def normalize_patterns(patterns: Pattern | Sequence[Pattern], num_heads: int) -> tuple[Pattern, ...]:
    """One pattern per query head; raises ``TypeError``/``ValueError`` naming ``patterns``."""
    if isinstance(patterns, Pattern):
        return (patterns,) * num_heads
    if isinstance(patterns, (str, bytes)) or not isinstance(patterns, Sequence):
        raise TypeError(f"patterns must be a Pattern or a sequence of Patterns, got {type(patterns).__name__}")
    out = tuple(patterns)
    if len(out) != num_heads:
        raise ValueError(f"patterns has {len(out)} entries, expected one per query head ({num_heads})")
    for i, p in enumerate(out):
        if not isinstance(p, Pattern):
            raise TypeError(f"patterns[{i}] must be a Pattern, got {type(p).__name__}")
    return out


def validate_block_size(block_size) -> None:
    """``block_size`` must be two positive ints ``(Q_BLOCK, KV_BLOCK)``."""
    if (not isinstance(block_size, tuple) or len(block_size) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block_size)):
        raise ValueError(f"block_size must be a tuple of two positive ints (Q_BLOCK, KV_BLOCK), got {block_size!r}")


def validate_qkv(q: Tensor, k: Tensor, v: Tensor, kv_valid: Tensor | None = None) -> None:
    """Metadata-only input checks (skipped while compiling)."""
    if torch.compiler.is_compiling():
        return
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, S, D), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and head dim")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k heads ({k.shape[1]})")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"q has {q.shape[2]} positions, more than k ({k.shape[2]})")
    if q.shape[2] == 0:
        raise ValueError("q must hold at least one query position")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if kv_valid is not None:
        if kv_valid.dtype != torch.bool or tuple(kv_valid.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(f"kv_valid must be bool (B, S_kv) = {(k.shape[0], k.shape[2])}, got "
                             f"{kv_valid.dtype} {tuple(kv_valid.shape)}")
        if kv_valid.device != k.device:
            raise ValueError(f"kv_valid must be on {k.device}, got {kv_valid.device}")


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    patterns: Pattern | Sequence[Pattern],
    *,
    scale: float | None = None,
    kv_valid: Tensor | None = None,
    impl: Impl = Impl.AUTO,
    block_size: tuple[int, int] = (128, 128),
    kernel_options: dict | None = None,
) -> Tensor:
    """Causal attention in which each query head keeps only its pattern's (query, key) pairs.

    Args:
        q: ``(B, H_q, S_q, D)``; the queries are the last ``S_q`` of the ``S_kv`` positions (so a chunk
            can attend to a cache of earlier keys).
        k: ``(B, H_kv, S_kv, D)``, ``H_q % H_kv == 0`` (grouped-query attention; never repeated here).
        v: same shape as ``k``.
        patterns: a :class:`~flexinference.patterns.Pattern` for every head, or a sequence of ``H_q``.
        scale: softmax scale, default ``1/sqrt(D)``.
        kv_valid: optional bool ``(B, S_kv)``; ``False`` marks padding keys, never attended.
        impl: see :class:`Impl`; an explicit choice never falls back.
        block_size: ``(Q_BLOCK, KV_BLOCK)`` kernel tiling of the BlockMask.
        kernel_options: passed to ``flex_attention``.

    Returns:
        ``(B, H_q, S_q, D)`` in ``q``'s dtype.

    Example:
        >>> import torch, flexinference as fi
        >>> q = torch.randn(1, 4, 300, 64); k = v = torch.randn(1, 2, 300, 64)
        >>> out = fi.sparse_attention(q, k, v, fi.AShape(sink=4, local=64))
        >>> out.shape
        torch.Size([1, 4, 300, 64])
    """
    validate_qkv(q, k, v, kv_valid)
    if not isinstance(impl, Impl):
        raise TypeError(f"impl must be an Impl, got {impl!r}; valid: {[i.name for i in Impl]}")
    pats = normalize_patterns(patterns, q.shape[1])
    validate_block_size(block_size)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    with torch.no_grad():
        tables = build_tables(q, k, pats, scale=scale, kv_valid=kv_valid)
    return attend_tables(q, k, v, tables, scale=scale, impl=impl, block_size=block_size,
                         kernel_options=kernel_options)


def attend_tables(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tables: KeepTables,
    *,
    scale: float,
    impl: Impl = Impl.AUTO,
    block_size: tuple[int, int] = (128, 128),
    kernel_options: dict | None = None,
) -> Tensor:
    """Attention over exactly the pairs ``tables`` keep (shapes as in :func:`sparse_attention`)."""
    validate_block_size(block_size)
    if impl is Impl.REFERENCE:
        return reference_attention(q, k, v, dense_keep(tables), scale=scale).to(q.dtype)
    grid = None
    if impl is Impl.AUTO:
        impl, plan = _auto(q, k, tables, block_size)
        if impl is None:
            return _sdpa(q, k, v, tables, scale)
        if impl is Impl.TRITON:
            grid = plan
        else:
            tables = plan
    if impl is Impl.TRITON:
        return _triton(q, k, v, tables, scale, grid)
    gqa = q.shape[1] != k.shape[1]
    if impl is Impl.GATHERED:
        from flexinference.gathered import gathered_attention

        with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
            return gathered_attention(q, k, v, tables, scale=scale, block_size=block_size, compiled=q.is_cuda,
                                      kernel_options=kernel_options)
    if impl is Impl.FLEX_EAGER or torch.compiler.is_compiling():
        block_mask = block_mask_from_tables(tables, *block_size)
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                              kernel_options=kernel_options)
    # Compiled kernel: pad to the tables' length bucket so a handful of kernels serve every length.
    sq, skv = q.shape[2], k.shape[2]
    pad = tables.columns.shape[-1] - skv
    block_mask = padded_block_mask(tables, block_size, pad)
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
        out = compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                               kernel_options=kernel_options)
    return out[:, :, :sq]


def padded_block_mask(tables: KeepTables, block_size: tuple[int, int], pad: int):
    """The tables' BlockMask for inputs padded by ``pad`` positions at the end (queries and keys alike)."""
    partial, full = block_grid(tables, *block_size)
    skv = tables.kv_len
    if pad and skv % block_size[1]:
        # The last real KV block now also spans padding keys: it must run mask_mod (causality drops the
        # padding for every real query), never count as full.
        partial, full = demote_to_partial(partial, full, skv // block_size[1])
    return block_mask_from_grid(partial, full, tables, *block_size,
                                seq_lengths=(tables.q_len + pad, skv + pad))


def auto_route(
    q: Tensor, k: Tensor, tables: KeepTables, block_size: tuple[int, int] = (128, 128)
) -> tuple[Impl | None, KeepTables]:
    """What ``Impl.AUTO`` runs for these inputs (:func:`attend_tables` decides the same way), and the keep
    tables it then computes exactly.

    Returns:
        ``(impl, computed)``: ``impl`` is ``Impl.TRITON``, ``Impl.GATHERED``, ``Impl.FLEX``,
        ``Impl.FLEX_EAGER`` (CPU) or ``None`` for dense SDPA; in ``computed`` the heads the cost model
        sends to dense attention keep every causal pair (more than their pattern, never less).
    """
    impl, plan = _auto(q, k, tables, block_size)
    if impl is None:
        return None, _dense_heads(tables, None)
    if impl is Impl.TRITON:
        return impl, _triton_computed(tables, plan)
    return impl, plan


def _triton_computed(tables: KeepTables, grid: TileGrid) -> KeepTables:
    """The tables a Triton tile grid computes: heads whose every causal tile is whole (densified) are dense."""
    whole = (grid.full | ~grid.causal).flatten(-2).all(-1) & (grid.column_count == 0).all(-1)
    return _dense_heads(tables.with_batch(whole.shape[0]), whole)


def _dense_heads(tables: KeepTables, heads: Tensor | None) -> KeepTables:
    """``tables`` with every query row of ``heads`` (bool ``(B, H)``; ``None``: all) keeping all earlier keys."""
    zero = torch.zeros_like(tables.row_start)
    return replace(tables, row_start=zero if heads is None else torch.where(heads, zero, tables.row_start))


def _auto(q: Tensor, k: Tensor, tables: KeepTables, block_size: tuple[int, int]) -> tuple[Impl | None, object]:
    """``AUTO``'s decision: ``(impl or None for SDPA, plan)``; the plan is the Triton tile grid for
    ``Impl.TRITON``, else the tables to run (too-costly heads made dense)."""
    if torch.compiler.is_compiling():
        return (Impl.FLEX if q.is_cuda else Impl.FLEX_EAGER), tables  # no host-side decisions in a user's graph
    if bool((tables.row_start <= tables.q_offset).all()):  # every head dense: SDPA, no index building
        return None, tables
    if not q.is_cuda:
        return Impl.FLEX_EAGER, tables
    plan = _triton_plan(q, tables)
    if plan is _DENSE:
        return None, tables
    if plan is not None:
        return Impl.TRITON, plan
    return _route(q, k, tables, block_size)


def _route(q: Tensor, k: Tensor, tables: KeepTables, block_size: tuple[int, int]):
    """``AUTO``'s cost model: ``(impl or None for SDPA, tables with too-costly heads made dense)``."""
    from flexinference.gathered import PARTIAL_WEIGHT, visited_block_fraction

    tables = tables.with_batch(q.shape[0])
    scattered = bool(tables.columns[..., block_size[1]:].any())
    cost = visited_block_fraction(tables, num_kv_heads=k.shape[1], block_size=block_size, gathered=scattered,
                                  partial_weight=PARTIAL_WEIGHT)
    costly = cost > 1.0
    layer_cost = torch.where(costly, torch.ones_like(cost), cost).mean()
    if float(layer_cost) > DENSE_LAYER_COST:
        return None, tables
    if bool(costly.any()):
        tables = _dense_heads(tables, costly)
    return (Impl.GATHERED if scattered else Impl.FLEX), tables


_DENSE = object()  # _triton_plan's answer "dense SDPA"


def _triton_plan(q: Tensor, tables: KeepTables):
    """``AUTO``'s Triton route: the tile grid to run, :data:`_DENSE` for SDPA, or ``None`` when the kernel
    does not apply (triton missing, dtype, head dim, tables it cannot express, unmeasured tile shapes)."""
    kernel = _triton_kernel()
    if kernel is None or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    if q.shape[-1] not in kernel.SUPPORTED_HEAD_DIMS:
        return None
    from flexinference.kernels import from_tables as ft

    try:
        tiles = ft.choose_tiles(tables)
    except ft.UnsupportedTables:
        return None
    if tiles.block_m < 64:  # 32/16-row tiles were never timed
        return None
    overhead = ft.route_overhead(q.shape[0] * q.shape[1], tables.q_len, tables.kv_len, q.shape[-1])
    if overhead >= ft.TRITON_MAX_COST:  # short input: no tile layout can win, SDPA without building the grid
        return _DENSE
    lower = ft.cost_lower_bound(tables, tiles)
    if lower is not None and lower + overhead >= ft.TRITON_MAX_COST:  # too dense for its length: no grid either
        return _DENSE
    grid = ft.tile_grid(tables, tiles)
    use, dense_heads = ft.triton_route(*grid.stats(), overhead=overhead)
    if not use:
        return _DENSE
    return grid.densify(dense_heads) if bool(dense_heads.any()) else grid


@functools.cache
def _triton_kernel():
    """The Triton kernel module, or ``None`` where triton cannot be imported."""
    try:
        from flexinference.kernels import sparse_triton
    except ImportError:
        return None
    return sparse_triton


@torch.compiler.disable
def _triton(q: Tensor, k: Tensor, v: Tensor, tables: KeepTables, scale: float, grid=None) -> Tensor:
    """Attention over exactly the pairs ``tables`` keep, through the Triton sparse kernel; a chunk of
    queries on a cache is zero-padded to the key length (its padding rows list no work)."""
    kernel = _triton_kernel()
    if kernel is None:
        raise ImportError("Impl.TRITON needs the triton package (pip install triton)")
    sq, skv = q.shape[2], k.shape[2]
    if tables.kv_len != skv or tables.q_len != sq:
        raise ValueError(f"tables are for (q_len {tables.q_len}, kv_len {tables.kv_len}), inputs ({sq}, {skv})")
    if grid is None:
        from flexinference.kernels.from_tables import tile_grid

        grid = tile_grid(tables)  # raises UnsupportedTables (a ValueError) naming what it cannot express
    lo = int(tables.q_offset)
    if sq != skv:
        padded = q.new_zeros(q.shape[0], q.shape[1], skv, q.shape[3])
        padded[:, :, lo : lo + sq] = q
        q = padded
    out = kernel.sparse_attention(q, k, v, grid.index(), exact=True, scale=scale, num_warps=grid.tiles.num_warps,
                                  num_stages=grid.tiles.num_stages)
    return out[:, :, lo : lo + sq] if sq != skv else out


def _sdpa(q: Tensor, k: Tensor, v: Tensor, tables: KeepTables, scale: float) -> Tensor:
    """Dense causal attention (queries last) with padding keys excluded, through SDPA."""
    sq, skv = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if tables.kv_valid is None and sq == skv:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = torch.ones(sq, skv, dtype=torch.bool, device=q.device).tril(skv - sq)[None, None]
    if tables.kv_valid is not None:
        mask = mask & tables.kv_valid[:, None, None, :skv]
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask, scale=scale
    )
