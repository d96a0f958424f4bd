"""Block top-k index estimation (MInference's block-sparse head, Jiang et al., 2024, arXiv:2407.02490).

Queries and keys are mean-pooled over ``block``-token blocks (blocks aligned to absolute positions);
the pooled dot product (no scale, no softmax, as MInference does) ranks key blocks for each query block.
Each query block keeps its diagonal block and its top ``topk`` causal key blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["pool_blocks", "block_topk_blocks"]


def pool_blocks(x: Tensor, block: int, front_pad: int = 0, valid: Tensor | None = None) -> Tensor:
    """Mean of each ``block``-token block along dim -2, ignoring padding.

    Args:
        x: ``(B, H, S, D)``.
        block: tokens per block.
        front_pad: tokens that would precede ``x[..., 0, :]`` in its first block (for chunks whose
            first token is not block-aligned).
        valid: optional bool ``(B, S)``; ``False`` tokens are left out of the mean.

    Returns:
        fp32 ``(B, H, ceil((front_pad + S) / block), D)``; an empty block pools to zeros.
    """
    b, h, s, d = x.shape
    n = -(-(front_pad + s) // block)
    pad = (0, 0, front_pad, n * block - front_pad - s)
    if valid is None:  # sums accumulate in fp32 without an fp32 copy of x
        # (no data-dependent branch under torch.compile: it would guard on the length's padding)
        padded = F.pad(x, pad) if torch.compiler.is_compiling() or any(pad) else x
        xs = padded.unflatten(-2, (n, block)).sum(-2, dtype=torch.float32)
        start = torch.arange(n, device=x.device) * block
        count = (start + block).clamp(max=front_pad + s) - start.clamp(min=front_pad)
        return xs / count.clamp(min=1).to(torch.float32)[:, None]
    weight = valid[:, None, :, None].float()
    xs = F.pad(x.float() * weight, pad).view(b, h, n, block, d).sum(-2)
    count = F.pad(weight, pad).view(b, 1, n, block, 1).sum(-2)
    return xs / count.clamp(min=1.0)


def block_topk_blocks(
    q: Tensor,
    k: Tensor,
    *,
    topk: Tensor,
    max_topk: int,
    block: int,
    kv_valid: Tensor | None = None,
) -> Tensor:
    """Top-k key blocks per query block.

    Args:
        q: ``(B, H_q, S_q, D)``, the last ``S_q`` of ``S_kv`` positions.
        k: ``(B, H_kv, S_kv, D)``.
        topk: int ``(H_q,)`` key blocks kept per query block (the diagonal block is always kept and
            counts towards it).
        max_topk: a Python int ``>= topk.max()``.
        block: tokens per block.
        kv_valid: optional bool ``(B, S_kv)``.

    Returns:
        bool ``(B, H_q, N, N)``, ``N = ceil(S_kv / block)``, rows indexed by absolute query block.
    """
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    group = hq // hkv
    n = -(-skv // block)
    offset = skv - sq
    first_qb = offset // block
    pq = pool_blocks(q, block, front_pad=offset - first_qb * block)  # (B, Hq, n - first_qb, D)
    pk = pool_blocks(k, block, valid=kv_valid)  # (B, Hkv, n, D)
    nq = pq.shape[2]
    scores = torch.matmul(pq.view(b, hkv, group * nq, d), pk.transpose(-1, -2)).view(b, hq, nq, n)
    qb = torch.arange(first_qb, first_qb + nq, device=q.device)[:, None]
    kb = torch.arange(n, device=q.device)[None, :]
    # One pass: -inf above the causal block diagonal, +inf on it (always kept), scores below.
    bias = torch.zeros(nq, n, device=q.device)
    bias.masked_fill_(kb > qb, float("-inf")).masked_fill_(kb == qb, float("inf"))
    scores = scores.add_(bias)
    if kv_valid is not None:
        has_valid = F.pad(kv_valid, (0, n * block - skv)).view(b, n, block).any(-1)
        scores.masked_fill_(~has_valid[:, None, None, :] & (kb != qb), float("-inf"))
    kmax = min(max_topk, n)
    top = torch.topk(scores, kmax, dim=-1)
    keep = torch.arange(kmax, device=q.device)[None, None, None, :] < topk[None, :, None, None]
    keep = keep & torch.isfinite(top.values) | (top.values == float("inf"))
    rows = torch.zeros(b, hq, nq, n, dtype=torch.bool, device=q.device).scatter_(-1, top.indices, keep)
    return F.pad(rows, (0, 0, first_qb, 0))
