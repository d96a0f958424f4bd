"""Pure-PyTorch reference of the sparse prefill kernel (MInference, Jiang et al., 2024, arXiv:2407.02490,
Sec. 3.2 / App. C): the specification :func:`~flexinference.kernels.sparse_triton.sparse_attention` is
tested against.

It applies a :class:`~flexinference.kernels.index_build.SparseIndex` literally, including what the kernel
would do with a malformed index: a key listed twice for a query block is weighted twice (its probability
mass doubled), exactly as the kernel's online softmax would count it. Rows with no kept key return 0 and
a log-sum-exp of ``-inf``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flexinference.kernels.index_build import SparseIndex

__all__ = ["keep_weight", "listing_multiplicity", "sparse_attention_reference"]


def _scatter_counts(count: Tensor, index: Tensor, size: int) -> Tensor:
    """int32 ``(..., size)`` histogram of the first ``count`` entries of ``index`` (others ignored)."""
    live = torch.arange(index.shape[-1], device=index.device) < count[..., None].long()
    idx = index.long()
    slot = torch.where(live & (idx >= 0) & (idx < size), idx, size)
    out = torch.zeros(*index.shape[:-1], size + 1, dtype=torch.int32, device=index.device)
    return out.scatter_add_(-1, slot, torch.ones_like(slot, dtype=torch.int32))[..., :size]


def _lists(index: SparseIndex, qblocks: Tensor, heads: slice):
    """Per-block and per-column listing counts for the given query blocks."""
    nk = -(-index.seq_len // index.block_n)

    def pick(t: Tensor) -> Tensor:
        return t[:, heads][:, :, qblocks]

    blocks = _scatter_counts(pick(index.block_count), pick(index.block_index), nk)
    full = blocks
    if index.full_count is not None:
        full = _scatter_counts(pick(index.full_count), pick(index.block_index), nk)
    cols = _scatter_counts(pick(index.column_count), pick(index.column_index), index.seq_len)
    return blocks, full, cols


def listing_multiplicity(index: SparseIndex, rows: Tensor, heads: slice = slice(None)) -> Tensor:
    """How many times each key ``j < S`` is listed for each row's query block, ignoring causality and the
    bitmaps: int32 ``(B, H', R, S)``. A well-formed index has no entry above 1."""
    rows = rows.to(index.block_count.device).long()
    blocks, _, cols = _lists(index, rows // index.block_m, heads)
    kb = torch.arange(index.seq_len, device=rows.device) // index.block_n
    return blocks[..., kb] + cols


def keep_weight(index: SparseIndex, rows: Tensor, *, exact: bool = True, heads: slice = slice(None)) -> Tensor:
    """How many times the kernel attends key ``j`` from query row ``i``: int32 ``(B, H', R, S)``.

    ``j <= i`` is required; a listed block counts whole when ``exact`` is ``False`` or it is one of the
    first ``full_count`` entries, otherwise only where ``diag_keep[i - j] | col_keep[j]``; a listed column
    counts once. For a well-formed index the result is the 0/1 keep mask.

    Args:
        index: the kernel index.
        rows: int ``(R,)`` absolute query rows in ``[0, S)``.
        exact: apply the bitmaps to partial blocks (ignored when the index has none).
        heads: query heads to evaluate.
    """
    s = index.seq_len
    rows = rows.to(index.block_count.device).long()
    blocks, full, cols = _lists(index, rows // index.block_m, heads)
    j = torch.arange(s, device=rows.device)
    kb = j // index.block_n
    if exact and index.full_count is not None:
        partial = (blocks - full)[..., kb]
        offset = (rows[:, None] - j[None, :]).clamp(min=0)
        diag = index.diag_keep[:, heads][..., offset].bool()
        col = index.col_keep[:, heads][..., :s].bool()[:, :, None, :]
        weight = full[..., kb] + partial * (diag | col)
    else:
        weight = blocks[..., kb]
    return (weight + cols) * (j[None, :] <= rows[:, None])


def sparse_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    index: SparseIndex,
    *,
    exact: bool = True,
    scale: float | None = None,
    rows: Tensor | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sparse causal attention under ``index``, computed one KV head group at a time.

    Args:
        q: ``(B, H_q, S, D)``; k, v: ``(B, H_kv, S, D)`` with ``H_q % H_kv == 0``.
        index: a :class:`SparseIndex` with ``H_q`` heads and batch ``B`` or 1.
        exact: as in the kernel (mask partial blocks with the bitmaps).
        scale: softmax scale, default ``1 / sqrt(D)``.
        rows: optional int ``(R,)`` query rows to evaluate (default all ``S``); memory is
            ``O(H_q / H_kv * R * S)`` per step, so a few hundred rows are fine at 128K.
        return_lse: also return the natural-log log-sum-exp of the kept scores.

    Returns:
        ``(B, H_q, R, D)`` in fp64 on CPU, fp32 on other devices (and ``(B, H_q, R)`` lse).
    """
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    acc = torch.float64 if q.device.type == "cpu" else torch.float32
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    rows = torch.arange(s, device=q.device) if rows is None else rows.to(q.device).long()
    outs, lses = [], []
    for h in range(hkv):  # reference code: one KV head group at a time bounds memory
        heads = slice(h * group, (h + 1) * group)
        weight = keep_weight(index, rows, exact=exact, heads=heads).to(acc)
        qs = q[:, heads][:, :, rows].to(acc)
        scores = torch.matmul(qs, k[:, h : h + 1].to(acc).transpose(-1, -2)) * scale + weight.log()
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
        outs.append(torch.matmul(probs, v[:, h : h + 1].to(acc)))
        lses.append(lse.expand(b, -1, -1))
    out = torch.cat(outs, 1)
    return (out, torch.cat(lses, 1)) if return_lse else out
