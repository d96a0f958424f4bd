"""Pure-PyTorch references: the specification every fast path is tested against."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["reference_attention"]


def reference_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, *, scale: float | None = None) -> Tensor:
    """Softmax attention restricted to a boolean keep mask, computed in fp64 on the inputs' device.

    Args:
        q: ``(B, H_q, S_q, D)``.
        k, v: ``(B, H_kv, S_kv, D)``, ``H_q % H_kv == 0`` (repeated here: a reference, small sizes only).
        keep: bool broadcastable to ``(B, H_q, S_q, S_kv)``; every query row must keep at least one key.
        scale: default ``1/sqrt(D)``.

    Returns:
        fp64 ``(B, H_q, S_q, D)``.
    """
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.double(), k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)
