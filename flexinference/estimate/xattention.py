"""XAttention block selection (Xu et al., 2025, "XAttention: Block Sparse Attention with Antidiagonal
Scoring", arXiv:2503.16428).

Per query head, on a ``stride``-token grid aligned to absolute position 0:

1. *Antidiagonal scoring.* For reduced query row ``r`` and reduced key column ``c`` the score is the sum
   along the antidiagonal of the ``stride x stride`` sub-block of ``Q K^T``:
   ``sum_t q[r*stride + stride-1-t] . k[c*stride + t]``. It is one matmul of interleaved strided rows:
   reduced query ``r`` concatenates its group's queries in reverse order, reduced key ``c`` its keys in
   order.
2. Softmax over reduced keys with scale ``scale / stride``, causal at the reduced resolution
   (``c <= r``), in fp32 (fp64 for fp64 inputs).
3. The probabilities are summed into ``block x block`` tiles (``block / stride`` reduced rows/columns).
4. Per query-block row: keep key block 0 and the diagonal block, then the largest remaining blocks
   until the kept mass reaches ``threshold`` x the row's total (the forced blocks' mass counts first,
   as in the paper's reference code). Zero-mass blocks are never added.

Differences from the reference code (deliberate): the stride grid is aligned to absolute positions, so
chunked prefill (``S_q < S_kv``, queries not starting on a stride boundary) scores the same sub-blocks
as a full prefill (positions of the group without a query contribute nothing); GQA is served by grouping
query heads per KV head (K is never repeated) and batches are supported. ``kv_valid`` padding keys and
queries contribute nothing to any antidiagonal; a stride group without a valid key scores ``-inf``.

Cost: ``(S / stride)^2`` scores per head, computed in chunks of query-block rows
(at most ``_CHUNK_ELEMENTS`` scores at a time) and only against causally visible key columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flexinference.estimate.flexprefill import check_int, check_per_head, validate_qk

__all__ = ["xattention_blocks", "xattention_block_mass", "select_blocks"]

_CHUNK_ELEMENTS = 1 << 27  # scores materialised per chunk of query-block rows (fp32: 512 MiB)


def select_blocks(mass: Tensor, threshold: Tensor) -> Tensor:
    """XAttention's per-row selection over a block-mass map.

    Args:
        mass: non-negative ``(B, H, N, N)``, row ``i`` = query block ``i``.
        threshold: ``(H,)`` in ``(0, 1]``, same dtype as ``mass``.

    Returns:
        bool ``(B, H, N, N)``: block 0 and the diagonal block, then the largest other blocks while the
        mass kept before them is ``< threshold * row total`` (all positive blocks when threshold is 1),
        restricted to ``j <= i``.
    """
    nb = mass.shape[-1]
    ii = torch.arange(nb, device=mass.device)[:, None]
    jj = torch.arange(nb, device=mass.device)[None, :]
    forced = (jj == 0) | (jj == ii)
    thr = threshold.view(1, -1, 1, 1)
    total = mass.sum(-1, keepdim=True)
    forced_mass = mass.masked_fill(~forced, 0).sum(-1, keepdim=True)
    vals, order = torch.sort(mass.masked_fill(forced, 0), dim=-1, descending=True, stable=True)
    before = forced_mass + F.pad(vals.cumsum(-1)[..., :-1], (1, 0))
    need = ((before < thr * total) | (thr >= 1)) & (vals > 0)
    keep = torch.zeros_like(need).scatter_(-1, order, need)
    return (keep | forced) & (jj <= ii)


@torch.no_grad()
def xattention_blocks(q: Tensor, k: Tensor, *, threshold: Tensor, stride: int, block: int, scale: float,
                      kv_valid: Tensor | None = None) -> Tensor:
    """XAttention's kept ``block x block`` tiles for every query head (Xu et al., 2025, arXiv:2503.16428).

    Args:
        q: ``(B, H_q, S_q, D)``; query ``i`` sits at absolute position ``i + S_kv - S_q``.
        k: ``(B, H_kv, S_kv, D)``, ``H_q`` a multiple of ``H_kv`` (query head ``h`` reads kv head
            ``h // (H_q // H_kv)``); never repeated.
        threshold: float ``(H_q,)`` in ``(0, 1]``, fraction of each row's estimated mass kept.
        stride: antidiagonal stride; ``block % stride == 0``.
        block: tokens per block.
        scale: softmax scale (usually ``D ** -0.5``); the antidiagonal sums use ``scale / stride``.
        kv_valid: optional bool ``(B, S_kv)``; ``False`` keys (padding) get zero estimated mass.

    Returns:
        bool ``(B, H_q, N, N)``, ``N = ceil(S_kv / block)``; ``[b, h, i, j]`` keeps key block ``j`` for
        absolute query block ``i``. Column 0 and the diagonal are always kept, nothing above it is.

    Example:
        >>> q, k = torch.randn(1, 4, 300, 32), torch.randn(1, 2, 300, 32)
        >>> keep = xattention_blocks(q, k, threshold=torch.full((4,), 0.9), stride=8, block=64,
        ...                          scale=32 ** -0.5)
        >>> keep.shape
        torch.Size([1, 4, 5, 5])
    """
    validate_qk(q, k, kv_valid, scale)
    check_per_head("threshold", threshold, q.shape[1], 0.0, low_open=True)
    check_int("stride", stride, 1)
    check_int("block", block, 1)
    if block % stride:
        raise ValueError(f"block ({block}) must be a multiple of stride ({stride})")
    mass = xattention_block_mass(q, k, stride=stride, block=block, scale=scale, kv_valid=kv_valid)
    return select_blocks(mass, threshold.to(device=mass.device, dtype=mass.dtype))


def xattention_block_mass(q: Tensor, k: Tensor, *, stride: int, block: int, scale: float,
                          kv_valid: Tensor | None = None, chunk_elements: int = _CHUNK_ELEMENTS) -> Tensor:
    """Antidiagonal-scored attention mass summed into ``block x block`` tiles (arguments pre-validated).

    Args:
        q, k, stride, block, scale, kv_valid: as in :func:`xattention_blocks`.
        chunk_elements: bound on the scores materialised at once (rows are processed in chunks of
            whole query blocks; at least one block per chunk).

    Returns:
        ``(B, H_q, N, N)`` in ``promote(q.dtype, float32)``; row ``i`` sums to the number of its
        reduced rows (stride groups) holding a valid query (each is a softmax distribution), so rows
        before the first query are 0.
    """
    bsz, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    group = hq // hkv
    nb = -(-skv // block)
    per = block // stride  # reduced rows / columns per block
    width = nb * block
    offset = skv - sq
    first_qb = offset // block
    dev = q.device
    cdt = torch.promote_types(q.dtype, torch.float32)

    # Keys on the grid [0, width): padded / invalid keys are zeros; reduced column c = k[c*stride + t], t.
    k_ok = torch.ones(1, skv, dtype=torch.bool, device=dev) if kv_valid is None else kv_valid
    k_grid = k if kv_valid is None else k.masked_fill(~kv_valid[:, None, :, None], 0)
    if width != skv:
        k_grid = F.pad(k_grid, (0, 0, 0, width - skv))
    k_red = k_grid.reshape(bsz, hkv, nb * per, stride * d)
    col_ok = F.pad(k_ok, (0, width - skv)).view(-1, nb * per, stride).any(-1)  # (B|1, N*per)

    # Queries on the grid [first_qb*block, width), scaled; reduced row r = q[r*stride + stride-1-t], t.
    span = width - first_qb * block
    lead = offset - first_qb * block
    q_ok = torch.ones(1, sq, dtype=torch.bool, device=dev) if kv_valid is None else kv_valid[:, offset:]
    q_grid = q.new_zeros(bsz, hq, span, d)
    q_grid[:, :, lead : lead + sq] = (q * (scale / stride)).masked_fill(~q_ok[:, None, :, None], 0)
    q_red = q_grid.view(bsz, hq, span // stride, stride, d).flip(-2).reshape(bsz, hq, span // stride, stride * d)
    row_ok = F.pad(q_ok, (lead, span - lead - sq)).view(-1, span // stride, stride).any(-1)  # (B|1, rows)

    mass = torch.zeros(bsz, hq, nb, nb, dtype=cdt, device=dev)
    rows_per_chunk = max(1, chunk_elements // max(1, bsz * hq * per * per * nb))  # in query blocks
    for qb0 in range(first_qb, nb, rows_per_chunk):
        qb1 = min(nb, qb0 + rows_per_chunk)
        r0, r1, ncol = (qb0 - first_qb) * per, (qb1 - first_qb) * per, qb1 * per
        q_chunk = q_red[:, :, r0:r1].reshape(bsz, hkv, group * (r1 - r0), stride * d)
        scores = torch.matmul(q_chunk, k_red[:, :, :ncol].transpose(-1, -2)).view(bsz, hq, r1 - r0, ncol)
        red_row = torch.arange(qb0 * per, qb1 * per, device=dev)[:, None]
        blocked = (torch.arange(ncol, device=dev)[None, :] > red_row) | ~col_ok[:, None, None, :ncol]
        probs = torch.softmax(scores.masked_fill_(blocked, float("-inf")), dim=-1, dtype=cdt)
        row_mass = probs.view(bsz, hq, r1 - r0, qb1, per).sum(-1)  # (B, Hq, rows, key blocks)
        live = row_ok[:, None, r0:r1, None] & ~blocked.all(-1, keepdim=True)  # also drops NaN rows
        row_mass = torch.where(live, row_mass, 0)
        mass[:, :, qb0:qb1, :qb1] = row_mass.view(bsz, hq, qb1 - qb0, per, qb1).sum(3)
    return mass
