"""Benchmark inputs and exact checks: synthetic vertical-slash regimes, row-subsampled references, and
the exact number of kept (query, key) pairs (the FLOP floor) without materialising ``S x S``.

The regimes follow the GPU-performance issue (MInference's kernel speed depends on where the slashes
fall): *banded* (slashes = the nearest diagonals), *band_far* (90% nearest, 10% scattered far ones),
*scattered* (100 nearest, the rest anywhere). Verticals are always the first 30 columns plus scattered
ones. Indices are drawn per query head.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

from flexinference.compose import table_length
from flexinference.masks.tables import KeepTables, closed_form_pairs, dense_keep
from flexinference.masks.vertical_slash import index_table

__all__ = [
    "REGIMES",
    "keep_rows",
    "kept_pairs",
    "layer_budgets",
    "reference_rows",
    "regime_indices",
    "structured_qkv",
    "tables_from_indices",
]

REGIMES = ("banded", "band_far", "scattered")
FIRST_COLUMNS = 30
NEAREST_SCATTERED = 100
_NEVER = torch.iinfo(torch.int32).max


def _random_distinct(heads: int, low: int, high: int, counts: Tensor, gen: torch.Generator) -> Tensor:
    """``(heads, max(counts))`` distinct integers in ``[low, high)`` per row, ``-1`` past ``counts[h]``."""
    k = int(counts.max()) if counts.numel() else 0
    k = max(0, min(k, high - low))
    if k == 0:
        return torch.full((heads, 0), -1, dtype=torch.long, device=counts.device)
    scores = torch.rand(heads, high - low, generator=gen, device=gen.device).to(counts.device)
    idx = scores.topk(k, dim=-1).indices + low
    rank = torch.arange(k, device=counts.device)[None, :]
    return torch.where(rank < counts[:, None], idx, -1)


def regime_indices(
    regime: str, seq_len: int, vertical: Tensor, slash: Tensor, *, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Column positions and diagonal offsets of one regime.

    Args:
        regime: one of :data:`REGIMES`.
        seq_len: ``S``.
        vertical, slash: int ``(H,)`` budgets per head (on the target device).
        seed: random seed (a CPU generator, so every device draws the same indices).

    Returns:
        ``(columns (H, NV), offsets (H, NS))`` int64, ``-1`` entries are unused.
    """
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    dev = vertical.device
    heads = vertical.shape[0]
    gen = torch.Generator().manual_seed(seed)
    vertical, slash = vertical.clamp(max=seq_len).cpu(), slash.clamp(min=1, max=seq_len).cpu()
    first = vertical.clamp(max=FIRST_COLUMNS)
    lead = torch.arange(FIRST_COLUMNS)[None, :].expand(heads, -1)
    lead = torch.where(lead < first[:, None], lead, -1)
    rest = _random_distinct(heads, FIRST_COLUMNS, max(seq_len, FIRST_COLUMNS), vertical - first, gen)
    columns = torch.cat([lead, rest], 1)
    if regime == "banded":
        near = slash
    elif regime == "band_far":
        near = torch.ceil(slash * 0.9).long()
    else:
        near = slash.clamp(max=NEAREST_SCATTERED)
    width = int(near.max())
    band = torch.arange(width)[None, :].expand(heads, -1)
    band = torch.where(band < near[:, None], band, -1)
    # Far offsets are drawn above the largest band so they never repeat a band offset.
    far = _random_distinct(heads, width, max(seq_len, width), slash - near, gen)
    return columns.to(dev), torch.cat([band, far], 1).to(dev)


def tables_from_indices(columns: Tensor, offsets: Tensor, seq_len: int) -> KeepTables:
    """Keep tables (batch 1, ``H`` heads, square causal) of column positions and diagonal offsets."""
    t = table_length(seq_len)
    cols = index_table(columns, t)[None]
    diags = index_table(offsets, t)[None]
    diags[..., 0] = True
    heads = columns.shape[0]
    dev = columns.device
    return KeepTables(
        columns=cols,
        diagonals=diags,
        row_start=torch.full((1, heads), _NEVER, dtype=torch.int32, device=dev),
        blocks=None,
        q_offset=torch.tensor(0, dtype=torch.int32, device=dev),
        q_len=seq_len,
        kv_len=seq_len,
    )


def layer_budgets(path: str | Path, layer: int) -> list[tuple[int, int]]:
    """``(vertical, slash)`` per head of ``layer`` from a MInference per-head pattern JSON."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list) or not 0 <= layer < len(data):
        raise ValueError(f"layer must be in [0, {len(data) if isinstance(data, list) else 0}), got {layer}")
    heads = data[layer]
    out = []
    for h in sorted(heads, key=int):
        kind, v, s = heads[h][:3]
        if kind != "vertical_and_slash":
            raise ValueError(f"layer {layer} head {h}: only vertical_and_slash entries are supported, got {kind!r}")
        out.append((int(v), int(s)))
    return out


def structured_qkv(
    batch: int, heads: int, kv_heads: int, seq_len: int, dim: int, *, dtype, device, seed: int = 0,
    sinks: int = 64,
) -> tuple[Tensor, Tensor, Tensor]:
    """Random q, k, v with LLM-like structure: RoPE-rotated shared directions (attention decays with
    distance, so the nearest diagonals score highest) plus ``sinks`` scattered keys every query likes
    (verticals). Returns ``(B, H, S, D)``, ``(B, H_kv, S, D)``, ``(B, H_kv, S, D)``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    half = dim // 2
    freq = 500000.0 ** (-torch.arange(half, device=device, dtype=torch.float32) / half)
    angle = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * freq[None, :]
    cos, sin = torch.cos(angle), torch.sin(angle)

    def rope(x):
        a, b = x[..., :half], x[..., half:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)

    group = heads // kv_heads
    base = rnd(1, kv_heads, 1, dim)
    q = rope(base.repeat_interleave(group, 1) * 1.5 + rnd(batch, heads, seq_len, dim))
    k = rope(base * 1.5 + rnd(batch, kv_heads, seq_len, dim))
    pos = torch.randperm(seq_len, generator=gen)[:sinks].to(device)
    k[:, :, pos] += 4.0 * rnd(1, kv_heads, 1, dim)
    k[:, :, :4] += 4.0
    v = rnd(batch, kv_heads, seq_len, dim)
    return q.to(dtype).contiguous(), k.to(dtype).contiguous(), v.to(dtype).contiguous()


def keep_rows(tables: KeepTables, rows: Tensor, heads: slice = slice(None)) -> Tensor:
    """The keep rule for chosen query rows and heads only: bool ``(B, H', R, kv_len)``
    (:func:`~flexinference.masks.tables.dense_keep` on a row subset)."""
    return dense_keep(tables, rows, heads)


def reference_rows(q: Tensor, k: Tensor, v: Tensor, tables: KeepTables, rows: Tensor, scale: float) -> Tensor:
    """Exact attention of the chosen query rows under ``tables`` (fp32 on GPU, fp64 on CPU), computed one
    KV head at a time: ``(B, H_q, R, D)``. Never materialises more than ``R x S_kv`` scores per head group."""
    acc = torch.float64 if q.device.type == "cpu" else torch.float32
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    tables = tables.with_batch(q.shape[0])
    out = []
    for h in range(hkv):  # reference code: a loop over KV heads bounds memory
        sl = slice(h * group, (h + 1) * group)
        keep = keep_rows(tables, rows, sl)
        qs = q[:, sl][:, :, rows.to(q.device)].to(acc)
        scores = torch.matmul(qs, k[:, h : h + 1].to(acc).transpose(-1, -2)) * scale
        probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
        out.append(torch.matmul(probs, v[:, h : h + 1].to(acc)))
    return torch.cat(out, 1)


def kept_pairs(tables: KeepTables, chunk: int = 256) -> Tensor:
    """Exact number of kept (query, key) pairs per head: int64 ``(B, H)``.

    Closed forms for rule-only tables and for pure block tables; otherwise an exact count over query
    chunks of ``chunk`` rows (``O(S^2)`` work, bounded memory).
    """
    closed = closed_form_pairs(tables)
    if closed is not None:
        return closed
    total = torch.zeros(tables.batch, tables.heads, dtype=torch.long, device=tables.columns.device)
    for start in range(0, tables.q_len, chunk):
        rows = torch.arange(start, min(start + chunk, tables.q_len))
        total += keep_rows(tables, rows).sum((-1, -2))
    return total


def flop_floor_ms(pairs: int, head_dim: int, peak_tflops: float) -> float:
    """Milliseconds for ``pairs x 4 x D`` FLOPs at ``peak_tflops``."""
    return pairs * 4 * head_dim / (peak_tflops * 1e12) * 1e3 if peak_tflops > 0 else math.nan
