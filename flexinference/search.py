"""Offline per-head pattern search (MInference's kernel-aware search, Jiang et al., 2024, Sec. 3.1).

For one layer's real ``q, k, v`` every candidate pattern is scored per head on a sample of query rows
against exact dense attention, computed for those rows only (never the ``S x S`` matrix):

* **recall**: the dense attention mass that lands on the pattern's kept keys, averaged over rows;
* **error**: relative L2 error of the pattern's output rows against the dense output rows.

A candidate *passes* a head when ``recall >= min_recall`` and ``error <= max_error`` and it visits
fewer kernel blocks than dense (``masks.block_mask.block_grid``; a pattern visiting every block is no
cheaper than dense). Its **cost** is its density: the fraction of causal (query, key) pairs it keeps,
measured on the sampled rows (the FLOPs it pays). Each head gets the cheapest passing candidate, ties
broken by fewer visited blocks, then by higher recall; a head no candidate passes stays :class:`~flexinference.patterns.Dense` (a sparse method must
never cost accuracy silently). MInference instead picks the highest-recall pattern among candidates of
similar FLOPs; asking for the cheapest pattern that is good enough makes the speed/accuracy trade an
explicit knob.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flexinference.compose import build_tables
from flexinference.gathered import visited_block_fraction
from flexinference.masks.tables import KeepTables, dense_keep
from flexinference.patterns import AShape, BlockTopK, Dense, Pattern, VerticalSlash

__all__ = ["SearchCriterion", "HeadChoice", "default_candidates", "keep_rows", "score_candidate", "search_layer"]


def default_candidates() -> tuple[Pattern, ...]:
    """MInference's search space: A-shape sink/local pairs, vertical-slash budgets, block top-k."""
    return (
        AShape(sink=128, local=1024),
        AShape(sink=128, local=3968),
        VerticalSlash(vertical=30, slash=800),
        VerticalSlash(vertical=100, slash=800),
        VerticalSlash(vertical=500, slash=700),
        VerticalSlash(vertical=1000, slash=4096),
        VerticalSlash(vertical=3500, slash=100),
        BlockTopK(block=64, topk=100),
    )


@dataclass(frozen=True)
class SearchCriterion:
    """When a candidate is good enough for a head.

    Attributes:
        min_recall: least mean fraction of the dense attention mass kept (0..1].
        max_error: largest relative L2 output error on the sampled rows.
        num_rows: query rows sampled per layer (the last 64 rows plus random rows of the later 7/8).
        seed: row-sampling seed.
    """

    min_recall: float = 0.95
    max_error: float = 0.1
    num_rows: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.min_recall <= 1.0:
            raise ValueError(f"min_recall must be in (0, 1], got {self.min_recall}")
        if self.max_error < 0:
            raise ValueError(f"max_error must be >= 0, got {self.max_error}")
        if self.num_rows < 1:
            raise ValueError(f"num_rows must be >= 1, got {self.num_rows}")


@dataclass(frozen=True)
class HeadChoice:
    """The pattern chosen for one head with its measured recall, error and cost (kept-pair density);
    ``scores`` maps every candidate's repr to its (recall, error, cost, density)."""

    pattern: Pattern
    recall: float
    error: float
    cost: float
    scores: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)


def sample_rows(q_len: int, criterion: SearchCriterion, device: torch.device) -> Tensor:
    """Sorted unique query rows: the last 64 plus random rows from the later 7/8 of the sequence."""
    g = torch.Generator().manual_seed(criterion.seed)
    last = torch.arange(max(0, q_len - 64), q_len)
    lo = q_len // 8
    extra = torch.randint(lo, q_len, (max(0, criterion.num_rows - last.numel()),), generator=g)
    return torch.unique(torch.cat([last, extra])).to(device)


def keep_rows(tables: KeepTables, rows: Tensor) -> Tensor:
    """The rule for the given query rows only: bool ``(B, H, R, S_kv)`` (rows relative to the queries)."""
    return dense_keep(tables, rows)


def _row_scores(q: Tensor, k: Tensor, rows: Tensor, scale: float) -> Tensor:
    """fp32 ``(B, H_q, R, S_kv)`` causal scores of the sampled rows (grouped per KV head, K not repeated)."""
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    g = hq // hkv
    qr = q[:, :, rows].float().reshape(b, hkv, g * rows.numel(), d)
    s = torch.matmul(qr, k.float().transpose(-1, -2)).view(b, hq, rows.numel(), skv) * scale
    causal = torch.arange(skv, device=q.device)[None, :] <= (rows[:, None] + skv - sq)
    return s.masked_fill(~causal, float("-inf"))


def score_candidate(
    q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, rows: Tensor, dense_probs: Tensor, dense_out: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Recall, relative error, visited-block cost and kept-pair density of ``pattern`` on every head.

    Returns:
        four fp32 ``(H_q,)`` tensors (averaged over batch); density is measured on the sampled rows.
    """
    b, hq = q.shape[:2]
    hkv = k.shape[1]
    tables = build_tables(q, k, [pattern] * hq, scale=scale)
    keep = keep_rows(tables, rows)
    recall = (dense_probs * keep).sum(-1).mean(-1)
    causal_rows = (torch.arange(k.shape[2], device=q.device)[None, :] <= rows[:, None] + k.shape[2] - q.shape[2])
    density = keep.sum((-1, -2)).float() / causal_rows.sum()
    probs = dense_probs * keep
    probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-30)
    out = torch.matmul(probs.view(b, hkv, -1, k.shape[2]), v.float()).view_as(dense_out)
    err = (out - dense_out).norm(dim=-1) / dense_out.norm(dim=-1).clamp(min=1e-12)
    cost = visited_block_fraction(tables, num_kv_heads=hkv, gathered=False)
    return recall.mean(0), err.mean(-1).mean(0), cost.mean(0), density.mean(0)


def search_layer(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    candidates: Sequence[Pattern] | None = None,
    criterion: SearchCriterion = SearchCriterion(),
    *,
    scale: float | None = None,
) -> list[HeadChoice]:
    """Choose a pattern for every query head of one layer.

    Args:
        q: ``(B, H_q, S, D)``; k, v: ``(B, H_kv, S, D)`` (after RoPE, as the attention sees them).
        candidates: patterns to try (default :func:`default_candidates`); ``Dense`` is the fallback.
        criterion: the pass rule.
        scale: softmax scale, default ``1/sqrt(D)``.

    Returns:
        one :class:`HeadChoice` per query head.
    """
    candidates = tuple(default_candidates() if candidates is None else candidates)
    for i, c in enumerate(candidates):
        if not isinstance(c, Pattern):
            raise TypeError(f"candidates[{i}] must be a Pattern, got {type(c).__name__}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    b, hq, sq, _ = q.shape
    hkv = k.shape[1]
    with torch.no_grad():
        rows = sample_rows(sq, criterion, q.device)
        dense_probs = torch.softmax(_row_scores(q, k, rows, scale), dim=-1)
        dense_out = torch.matmul(dense_probs.view(b, hkv, -1, k.shape[2]), v.float()).view(b, hq, rows.numel(), -1)
        results = [score_candidate(q, k, v, c, rows, dense_probs, dense_out, scale) for c in candidates]
    choices = []
    for h in range(hq):  # host-side bookkeeping over a handful of numbers per head
        scored = {repr(c): tuple(float(t[h]) for t in r) for c, r in zip(candidates, results)}
        passing = [
            (round(r[3][h].item(), 6), r[2][h].item(), -r[0][h].item(), i)
            for i, r in enumerate(results)
            if r[0][h] >= criterion.min_recall and r[1][h] <= criterion.max_error and r[2][h] < 1.0
        ]
        if passing:
            _, _, neg_recall, i = min(passing)
            density = float(results[i][3][h])
            choices.append(HeadChoice(candidates[i], -neg_recall, float(results[i][1][h]), density, scored))
        else:
            choices.append(HeadChoice(Dense(), 1.0, 0.0, 1.0, scored))
    return choices
