"""MInference's three kernel-level functions, served by flexinference.

Conventions follow MInference's public API (Jiang et al., 2024, arXiv:2407.02490): ``q`` ``(B, H, S, D)``,
``k``/``v`` ``(B, H_kv, S, D)`` (here GQA is allowed), causal attention, output ``(B, H, S, D)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flexinference.attention import Impl, attend_tables, sparse_attention, validate_qkv
from flexinference.compose import table_length
from flexinference.masks.tables import KeepTables
from flexinference.masks.vertical_slash import index_table
from flexinference.patterns import AShape, BlockTopK

__all__ = ["vertical_slash_sparse_attention", "block_sparse_attention", "streaming_forward"]


def _check_indices(name: str, idx: Tensor, q: Tensor) -> None:
    if not isinstance(idx, Tensor) or idx.dim() != 3 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor (B, H, N), got {getattr(idx, 'shape', type(idx))}")
    if idx.shape[:2] != q.shape[:2]:
        raise ValueError(f"{name} must have shape (B, H, N) = ({q.shape[0]}, {q.shape[1]}, N), got {tuple(idx.shape)}")
    if idx.device != q.device:
        raise ValueError(f"{name} must be on {q.device}, got {idx.device}")


def vertical_slash_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, vertical_topk: Tensor, slash: Tensor, *, impl: Impl = Impl.AUTO
) -> Tensor:
    """Attention over given key columns and diagonals.

    Args:
        q: ``(B, H, S, D)``; k, v: ``(B, H_kv, S, D)``.
        vertical_topk: integer ``(B, H, NV)`` key column indices (kept for every query at or after them).
        slash: integer ``(B, H, NS)`` diagonal offsets: offset ``o`` keeps key ``i - o`` for query ``i``
            (``0`` is the main diagonal, always kept). Out-of-range indices are ignored; duplicates are
            harmless.

    Returns:
        ``(B, H, S, D)``.
    """
    validate_qkv(q, k, v)
    _check_indices("vertical_topk", vertical_topk, q)
    _check_indices("slash", slash, q)
    b, h, sq, _ = q.shape
    skv = k.shape[2]
    t = table_length(skv)
    columns = index_table(vertical_topk, t) & (torch.arange(t, device=q.device) < skv)
    diagonals = index_table(slash, t) & (torch.arange(t, device=q.device) < skv)
    diagonals[..., 0] = True
    tables = KeepTables(
        columns=columns,
        diagonals=diagonals,
        row_start=torch.full((b, h), torch.iinfo(torch.int32).max, dtype=torch.int32, device=q.device),
        blocks=None,
        q_offset=torch.tensor(skv - sq, dtype=torch.int32, device=q.device),
        q_len=sq,
        kv_len=skv,
    )
    return attend_tables(q, k, v, tables, scale=1.0 / math.sqrt(q.shape[-1]), impl=impl)


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, topk: int, *, impl: Impl = Impl.AUTO) -> Tensor:
    """Block-sparse attention: each 64-token query block keeps the ``topk`` key blocks (64 tokens) with the
    largest mean-pooled ``q . k`` score, block-causal, its diagonal block always included."""
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    return sparse_attention(q, k, v, BlockTopK(block=64, topk=topk), impl=impl)


def streaming_forward(
    q: Tensor, k: Tensor, v: Tensor, init_num: int, local_window_num: int, *, impl: Impl = Impl.AUTO
) -> Tensor:
    """StreamingLLM-shaped attention: the first ``init_num`` keys plus the ``local_window_num`` keys
    nearest each query (the query's own key included), causal."""
    for name, value, low in (("init_num", init_num, 0), ("local_window_num", local_window_num, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return sparse_attention(q, k, v, AShape(sink=init_num, local=local_window_num), impl=impl)
