"""Triton sparse prefill attention over key-block lists plus token-granular key columns (MInference's
vertical-slash ``block_offset`` + ``column_index`` layout and block top-k; Jiang et al., 2024,
arXiv:2407.02490, Sec. 3.2 and App. C). Our own kernel, written from the paper's algorithm.

One program owns ``block_m`` query rows of one ``(batch, query head)``; its KV head is
``h // (H_q // H_kv)`` (K/V are never repeated). It runs one online softmax (fp32, base 2) over three
loops: the listed key blocks kept whole (causal mask on the diagonal), in exact mode the partial blocks
masked by ``diag_keep[i - j] | col_keep[j]``, and the column list gathered ``block_n`` columns at a time.
The pure-PyTorch specification is :mod:`flexinference.kernels.sparse_reference`.

On CPU the kernel runs in Triton's interpreter, which triton decides when the kernel is decorated: set
``TRITON_INTERPRET=1`` before triton is first imported (tests run it in a subprocess).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from flexinference.kernels.index_build import SparseIndex

__all__ = ["SUPPORTED_HEAD_DIMS", "interpreted", "sparse_attention"]

SUPPORTED_HEAD_DIMS = (32, 64, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


@triton.jit
def _tile(q, kt, vt, keep, m_i, l_i, acc, scale_log2, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One online-softmax step over a key tile: ``kt`` is ``(D, N)``, ``vt`` ``(N, D)``, ``keep`` ``(M, N)``."""
    if UPCAST:  # Triton's interpreter mis-computes bf16 tl.dot; bf16 products are exact in fp32
        qk = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
    else:
        qk = tl.dot(q, kt, input_precision=DOT_PREC)
    qk = tl.where(keep, qk * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(vt.dtype)
    if UPCAST:
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float32), vt.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _sparse_fwd(
    Q, K, V, Out, Lse,
    BlockCount, FullCount, BlockIndex, ColCount, ColIndex, DiagKeep, ColKeep,
    scale_log2, seq_len, heads, group, num_q_blocks,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
    s_cnt_b, s_cnt_h, s_bi_b, s_bi_h, s_bi_m, s_ci_b, s_ci_h, s_ci_m, s_dk_b, s_dk_h, s_ck_b, s_ck_h,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EXACT: tl.constexpr, STORE_LSE: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    # Heaviest (last) query blocks first: better load balance under causality.
    start_m = num_q_blocks - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    hk = h // group
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len

    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqs + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    meta = b * s_cnt_b + h * s_cnt_h + start_m
    bi_base = BlockIndex + b.to(tl.int64) * s_bi_b + h.to(tl.int64) * s_bi_h + start_m.to(tl.int64) * s_bi_m
    ci_base = ColIndex + b.to(tl.int64) * s_ci_b + h.to(tl.int64) * s_ci_h + start_m.to(tl.int64) * s_ci_m

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    n_blocks = tl.load(BlockCount + meta)
    if EXACT:
        n_full = tl.load(FullCount + meta)
    else:
        n_full = n_blocks

    # 1) Whole key blocks (causal mask only).
    for it in range(n_full):
        cols = tl.load(bi_base + it) * BLOCK_N + offs_n
        col_ok = cols < seq_len
        kt = tl.load(k_base + cols[None, :] * sks + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        vt = tl.load(v_base + cols[:, None] * svs + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        keep = cols[None, :] <= offs_m[:, None]
        m_i, l_i, acc = _tile(q, kt, vt, keep, m_i, l_i, acc, scale_log2, DOT_PREC, UPCAST)

    # 2) Exact mode: partial blocks, masked by the kept diagonals and columns.
    if EXACT:
        diag_base = DiagKeep + b.to(tl.int64) * s_dk_b + h.to(tl.int64) * s_dk_h
        colk_base = ColKeep + b.to(tl.int64) * s_ck_b + h.to(tl.int64) * s_ck_h
        for it in range(n_full, n_blocks):
            cols = tl.load(bi_base + it) * BLOCK_N + offs_n
            col_ok = cols < seq_len
            kt = tl.load(k_base + cols[None, :] * sks + offs_d[:, None], mask=col_ok[None, :], other=0.0)
            vt = tl.load(v_base + cols[:, None] * svs + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            causal = (cols[None, :] <= offs_m[:, None]) & row_ok[:, None]
            dk = tl.load(diag_base + (offs_m[:, None] - cols[None, :]), mask=causal, other=0)
            ck = tl.load(colk_base + cols, mask=col_ok, other=0)
            keep = causal & ((dk != 0) | (ck != 0)[None, :])
            m_i, l_i, acc = _tile(q, kt, vt, keep, m_i, l_i, acc, scale_log2, DOT_PREC, UPCAST)

    # 3) Token-granular columns, gathered BLOCK_N at a time.
    n_cols = tl.load(ColCount + meta)
    for c0 in range(0, n_cols, BLOCK_N):
        slot = c0 + offs_n
        slot_ok = slot < n_cols
        cols = tl.load(ci_base + slot, mask=slot_ok, other=0)
        col_ok = slot_ok & (cols < seq_len)
        kt = tl.load(k_base + cols[None, :] * sks + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        vt = tl.load(v_base + cols[:, None] * svs + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        keep = col_ok[None, :] & (cols[None, :] <= offs_m[:, None])
        m_i, l_i, acc = _tile(q, kt, vt, keep, m_i, l_i, acc, scale_log2, DOT_PREC, UPCAST)

    # Rows that kept nothing (l_i == 0) return 0 and lse -inf.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = Out + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None] * sos + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    if STORE_LSE:
        lse = tl.where(l_i > 0.0, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(Lse + bh.to(tl.int64) * seq_len + offs_m, lse, mask=row_ok)


def interpreted() -> bool:
    """Whether the kernel was decorated under ``TRITON_INTERPRET=1`` (it then runs on CPU tensors)."""
    return type(_sparse_fwd).__name__ == "InterpretedFunction"


def _validate(q: Tensor, k: Tensor, v: Tensor, index: SparseIndex) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D (B, H, S, D) tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be fp16, bf16 or fp32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, hq, s, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        raise ValueError(f"k and v must be (B, H_kv, S, D) = ({b}, H_kv, {s}, {d}), got {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[1] < 1 or hq % k.shape[1]:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({k.shape[1]})")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim (q.shape[-1]) must be one of {SUPPORTED_HEAD_DIMS}, got {d}")
    if not isinstance(index, SparseIndex):
        raise ValueError(f"index must be a SparseIndex, got {type(index).__name__}")
    if index.seq_len != s:
        raise ValueError(f"index.seq_len ({index.seq_len}) != q's sequence length ({s})")
    if index.heads != hq or index.batch not in (1, b):
        raise ValueError(f"index is for (batch {index.batch}, {index.heads} heads), q has ({b}, {hq})")
    tensors = (q, k, v, index.block_count, index.block_index, index.column_count, index.column_index,
               index.full_count, index.diag_keep, index.col_keep)
    devs = {t.device for t in tensors if t is not None}
    if len(devs) != 1:
        raise ValueError(f"q, k, v and index must be on one device, got {sorted(map(str, devs))}")
    if q.device.type == "cpu" and not interpreted():
        raise ValueError("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing triton")


def _bitmap(t: Tensor) -> Tensor:
    t = t.contiguous() if t.stride(-1) != 1 else t
    return t.view(torch.int8) if t.dtype == torch.bool else t


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    index: SparseIndex,
    *,
    exact: bool = True,
    scale: float | None = None,
    return_lse: bool = False,
    num_warps: int = 4,
    num_stages: int = 3,
) -> Tensor | tuple[Tensor, Tensor]:
    """Causal sparse prefill attention over an index's key blocks and key columns.

    Row ``i`` attends key ``j`` iff ``j <= i`` and ``j`` is in one of its query block's listed blocks or
    columns (see :class:`~flexinference.kernels.index_build.SparseIndex`). Rows with no kept key return
    0 (builders always keep the diagonal, so this does not happen with them).

    Args:
        q: ``(B, H_q, S, D)``; k, v: ``(B, H_kv, S, D)``, ``H_q % H_kv == 0``; fp16/bf16/fp32;
            ``D`` in :data:`SUPPORTED_HEAD_DIMS`; the last dim must be contiguous (others any stride).
        index: the kernel index (batch ``B`` or 1, ``H_q`` heads); its ``block_m``/``block_n`` are
            the kernel's tile sizes.
        exact: mask partial blocks with the index's bitmaps (exact vertical-slash); ``False`` keeps
            every listed block whole (the block superset). Ignored for indices without bitmaps.
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return the fp32 ``(B, H_q, S)`` natural-log log-sum-exp.
        num_warps, num_stages: Triton launch options (``num_stages`` is ignored by the interpreter).

    Returns:
        ``(B, H_q, S, D)`` in ``q.dtype`` (and the lse when asked).
    """
    for name, val in (("num_warps", num_warps), ("num_stages", num_stages)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    _validate(q, k, v, index)
    b, hq, s, d = q.shape
    # Row offsets inside one head are int32 in the kernel: fall back to the contiguous layout if they could overflow.
    q, k, v = (t if t.stride(-1) == 1 and t.stride(2) * s < 2**31 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(b, hq, s, dtype=torch.float32, device=q.device) if return_lse else out
    use_exact = bool(exact) and index.exact_bitmaps
    counts = index.block_count.contiguous()
    full = index.full_count.contiguous() if use_exact else counts
    diag = _bitmap(index.diag_keep) if use_exact else counts
    colk = _bitmap(index.col_keep) if use_exact else counts
    col_count = index.column_count.contiguous()
    bidx, cidx = index.block_index.contiguous(), index.column_index.contiguous()

    def bstride(t: Tensor) -> int:
        return t.stride(0) if index.batch > 1 else 0

    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    grid = (index.num_q_blocks, b * hq)
    _sparse_fwd[grid](
        q, k, v, out, lse,
        counts, full, bidx, col_count, cidx, diag, colk,
        scale * _LOG2E, s, hq, hq // k.shape[1], index.num_q_blocks,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        bstride(counts), counts.stride(1), bstride(bidx), bidx.stride(1), bidx.stride(2),
        bstride(cidx), cidx.stride(1), cidx.stride(2),
        bstride(diag), diag.stride(1), bstride(colk), colk.stride(1),
        HEAD_DIM=d, BLOCK_M=index.block_m, BLOCK_N=index.block_n,
        EXACT=use_exact, STORE_LSE=return_lse, DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=interpreted() and q.dtype == torch.bfloat16,
        num_warps=num_warps, num_stages=num_stages,
    )
    return (out, lse) if return_lse else out
