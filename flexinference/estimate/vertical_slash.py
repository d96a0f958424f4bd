"""Vertical-slash index estimation (MInference, Jiang et al., 2024, arXiv:2407.02490, Sec. 3.2).

The last ``last_q`` queries of every head are scored against all keys (scaled, causal, softmax in fp32).
Column sums rate the verticals, sums along each diagonal rate the slashes; the top columns and diagonals
are kept, with the first columns and nearest diagonals always forced in. One batched computation serves
all query heads of a layer: Q is reshaped per KV group, K is never repeated.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["last_query_attention", "vertical_slash_scores", "vertical_slash_indices", "topk_table"]


def last_query_attention(q: Tensor, k: Tensor, last_q: int, scale: float, kv_valid: Tensor | None) -> Tensor:
    """Softmax attention of the last ``last_q`` queries over all keys.

    The scores are computed in the inputs' dtype (as MInference does: bf16 inputs give bf16 scores, so K is
    never copied to fp32; fp16 inputs are scored in fp32, where a score cannot overflow) and the softmax in
    fp32 (fp64 for fp64 inputs).

    Args:
        q: ``(B, H_q, S_q, D)``; query ``i`` sits at absolute position ``i + S_kv - S_q``.
        k: ``(B, H_kv, S_kv, D)``.
        last_q: number of trailing queries scored (clamped to ``S_q``).
        scale: softmax scale.
        kv_valid: optional bool ``(B, S_kv)``; ``False`` keys get zero probability.

    Returns:
        fp32 (fp64 for fp64 inputs) ``(B, H_q, L, S_kv)`` probabilities with ``L = min(last_q, S_q)``.
    """
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    n = min(last_q, sq)
    group = hq // hkv
    q_last = q[:, :, sq - n :].reshape(b, hkv, group * n, d) * scale
    if q.dtype == torch.float16:  # fp16 scores could overflow to inf (bf16 has fp32's range)
        q_last, k = q_last.float(), k.float()
    scores = torch.matmul(q_last, k.transpose(-1, -2)).view(b, hq, n, skv)
    # Causality only cuts into the last n keys: mask that slice in place (never an (n, S_kv) mask).
    tail = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    scores[..., skv - n :].masked_fill_(tail, float("-inf"))
    if kv_valid is not None:
        scores.masked_fill_(~kv_valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32))
    return probs if kv_valid is None else torch.nan_to_num(probs, nan=0.0)  # all-padding rows: 0, not NaN


def vertical_slash_scores(probs: Tensor) -> tuple[Tensor, Tensor]:
    """Column sums and diagonal sums of the last queries' attention.

    Args:
        probs: ``(B, H, L, S_kv)`` from :func:`last_query_attention` (row ``r`` is absolute query
            ``S_kv - L + r``).

    Returns:
        ``(columns, diagonals)``, each ``(B, H, S_kv)`` in ``probs``' dtype; ``diagonals[..., o]`` sums the
        entries with ``query - key == o``.
    """
    n, skv = probs.shape[-2], probs.shape[-1]
    columns = probs.sum(dim=-2)
    # Skew instead of scatter: left-pad each row by n, then read row r with a stride one longer than a row,
    # which shifts it by r: skewed[r, c] = probs[r, c + r - n]. Entry (r, key j) lands in column
    # c = S_kv - (query - key), so the column sums of the skewed view are the diagonal sums, reversed.
    # The padded copy is as large as probs (~1 GB at 128K for 32 heads x 64 rows in fp32): a transient
    # cost of one more pass, cheaper than scatter_add's int64 offsets (twice that) and its atomics.
    padded = torch.nn.functional.pad(probs, (n, 0)).contiguous()
    row = skv + n
    skewed = padded.as_strided((*probs.shape[:2], n, skv + 1), (*padded.stride()[:2], row + 1, 1))
    diagonals = skewed.sum(dim=-2).flip(-1)[..., :skv]
    return columns, diagonals


def topk_table(scores: Tensor, budget: Tensor, forced: Tensor, max_budget: int, table_len: int) -> Tensor:
    """Boolean table of each head's top-``budget`` entries, the first ``forced`` entries always in.

    Args:
        scores: fp32 ``(B, H, S)``.
        budget: int ``(H,)`` entries to keep per head (clamped to ``[forced, S]``).
        forced: int ``(H,)`` leading entries kept regardless of score.
        max_budget: a Python int ``>=`` every entry of ``max(budget, forced)`` (sizes the top-k).
        table_len: length ``T >= S`` of the returned table (padding entries are ``False``).

    Returns:
        bool ``(B, H, T)``.
    """
    b, h, s = scores.shape
    idx = torch.arange(s, device=scores.device)
    lead = idx[None, :] < forced[:, None]
    ranked = scores.masked_fill(lead[None], float("inf"))
    budget = torch.maximum(budget, forced).clamp(max=s)
    kmax = min(max_budget, s)
    top = torch.topk(ranked, kmax, dim=-1).indices
    rank_ok = torch.arange(kmax, device=scores.device)[None, None, :] < budget[None, :, None]
    table = torch.zeros(b, h, table_len, dtype=torch.bool, device=scores.device)
    return table.scatter_(-1, top, rank_ok.expand(b, -1, -1))


def vertical_slash_indices(
    q: Tensor,
    k: Tensor,
    *,
    vertical: Tensor,
    slash: Tensor,
    first_columns: Tensor,
    nearest_diagonals: Tensor,
    max_vertical: int,
    max_slash: int,
    last_q: int,
    scale: float,
    table_len: int,
    kv_valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Estimate every head's kept columns and diagonals.

    Args:
        q: ``(B, H_q, S_q, D)``; k: ``(B, H_kv, S_kv, D)``.
        vertical, slash: int ``(H_q,)`` budgets per head.
        first_columns, nearest_diagonals: int ``(H_q,)`` always-kept leading columns / diagonals.
        max_vertical, max_slash: Python ints bounding the budgets above (forced entries included).
        last_q: trailing queries used for scoring.
        scale: softmax scale.
        table_len: length of the returned tables (``>= S_kv``).
        kv_valid: optional bool ``(B, S_kv)``.

    Returns:
        ``(columns, diagonals)`` bool ``(B, H_q, table_len)``. Diagonal 0 is always kept.
    """
    probs = last_query_attention(q, k, last_q, scale, kv_valid)
    col_scores, diag_scores = vertical_slash_scores(probs)
    columns = topk_table(col_scores, vertical, first_columns, max_vertical, table_len)
    diagonals = topk_table(diag_scores, slash, nearest_diagonals.clamp(min=1), max_slash, table_len)
    return columns, diagonals
