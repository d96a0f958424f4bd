"""FlexPrefill block selection (Lai et al., 2025, "FlexPrefill: A Context-Aware Sparse Attention Mechanism
for Efficient Long-Sequence Inference", ICLR 2025, arXiv:2502.20766).

Per query head, from the real queries and keys of one layer:

1. The last ``last_q`` queries attend (scaled, causal at absolute positions, softmax) to every key.
   *Vertical* = mean attention per key column, *slash* = mean attention per diagonal offset
   ``query - key``; both are sum-pooled into ``block``-wide groups (key blocks / block offsets
   ``(query - key) // block``).
2. Query-aware test (the paper's Algorithm 2): ``d = sqrt(JSD(a_hat || a_bar))`` between the estimated
   block distribution ``a_hat = softmax(scale * mean(last queries) . blockmean(K))`` and the pooled
   vertical distribution ``a_bar``. ``d < tau`` makes the head *query-aware*.
3. Query-aware heads (Algorithm 4): mean-pooled query blocks against mean-pooled key blocks, block-causal
   softmax per query block; each query-block row keeps its largest key blocks until ``gamma`` of the
   row's mass is covered.
4. Vertical-slash heads (Algorithm 3): the smallest set of key blocks covering ``gamma`` of the pooled
   vertical mass and the smallest set of block offsets covering ``gamma`` of the pooled slash mass (each
   at least ``min_budget`` entries, never a zero-mass entry); a kept key block is kept in every row, a
   kept block offset ``o`` keeps cell ``(i, i - o)``.

Every row also keeps key block 0 and its diagonal block; nothing above the block diagonal is kept.

Differences from the paper / its reference code (deliberate, documented):

* The query-aware cover is per query-block row (each row keeps ``gamma`` of its own mass); the reference
  code flattens the whole block map of a head and covers ``gamma`` of the global mass.
* Budgets are counted on the block-pooled distributions (the reference code counts tokens and converts
  with ``// 128 + 1``); a head is exclusively query-aware or vertical-slash as in the paper's Algorithm 1
  (the reference code also gives query-aware heads ``min_budget`` vertical/slash blocks).
* Slash offsets are pooled on a grid anchored at offset 0 (``o // block``), blocks on a grid anchored at
  absolute position 0, so chunked prefill (``S_q < S_kv``) and any length work.
* ``kv_valid`` padding is excluded everywhere: padded keys get ``-inf`` scores and no weight in pooled
  key means; padded positions' queries get no weight in the statistics and pooled query means.

Precision: scores come from a matmul in the input dtype; softmax and every reduction run in
``promote(input dtype, float32)`` (fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 inputs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["flexprefill_blocks"]


def check_int(name: str, value: object, minimum: int) -> None:
    """Raise TypeError/ValueError naming ``name`` unless ``value`` is an int ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_per_head(name: str, value: object, heads: int, low: float, low_open: bool) -> None:
    """Raise TypeError/ValueError naming ``name`` unless ``value`` is a float ``(heads,)`` tensor in
    ``(low, 1]`` (``[low, 1]`` when not ``low_open``); the value check is skipped while compiling."""
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor of shape ({heads},), got {type(value).__name__}")
    if tuple(value.shape) != (heads,):
        raise ValueError(f"{name} must have shape (H_q,) = ({heads},), got {tuple(value.shape)}")
    if torch.compiler.is_compiling():
        return
    too_low = value <= low if low_open else value < low
    if bool((too_low | (value > 1.0) | value.isnan()).any()):
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must lie in {bracket}{low}, 1] for every head, got {value.tolist()}")


def validate_qk(q: object, k: object, kv_valid: object, scale: object) -> None:
    """Shared checks of ``q``, ``k``, ``kv_valid`` and ``scale`` (metadata only); raises ValueError/TypeError
    naming the argument."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, S, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    assert isinstance(q, Tensor) and isinstance(k, Tensor)
    if k.dtype != q.dtype:
        raise ValueError(f"k dtype {k.dtype} must match q dtype {q.dtype}")
    if k.device != q.device:
        raise ValueError(f"k device {k.device} must match q device {q.device}")
    b, hq, sq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k shape {tuple(k.shape)} must be (B={b}, H_kv, S_kv, D={d}) to match q {tuple(q.shape)}")
    hkv, skv = k.shape[1], k.shape[2]
    if hkv < 1 or hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a positive multiple of k heads ({hkv})")
    if skv < 1 or not 1 <= sq <= skv:
        raise ValueError(f"q length S_q={sq} must satisfy 1 <= S_q <= S_kv={skv} (k length)")
    if kv_valid is not None:
        if not isinstance(kv_valid, Tensor) or kv_valid.dtype != torch.bool:
            raise TypeError("kv_valid must be a bool tensor of shape (B, S_kv)")
        if tuple(kv_valid.shape) != (b, skv):
            raise ValueError(f"kv_valid must have shape (B, S_kv) = ({b}, {skv}), got {tuple(kv_valid.shape)}")
        if kv_valid.device != q.device:
            raise ValueError(f"kv_valid device {kv_valid.device} must match q device {q.device}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive float, got {scale!r}")


def block_sums(x: Tensor, first_pos: int, block: int, n_blocks: int, dtype: torch.dtype) -> Tensor:
    """Sums of ``x`` over absolute ``block``-aligned position blocks along dim -2, without padding copies.

    Args:
        x: ``(..., L, C)`` covering absolute positions ``first_pos .. first_pos + L - 1``.
        first_pos: absolute position of ``x[..., 0, :]``.
        block: block width.
        n_blocks: number of output blocks (blocks ``0 .. n_blocks - 1``; blocks without a position sum to 0).
        dtype: accumulation and output dtype.

    Returns:
        ``(..., n_blocks, C)`` in ``dtype``.
    """
    length = x.shape[-2]
    head = min(length, (-first_pos) % block)
    full = (length - head) // block
    tail = length - head - full * block
    parts = []
    if head:
        parts.append(x[..., :head, :].sum(-2, keepdim=True, dtype=dtype))
    if full:
        body = x[..., head : head + full * block, :].unflatten(-2, (full, block))
        parts.append(body.sum(-2, dtype=dtype))
    if tail:
        parts.append(x[..., head + full * block :, :].sum(-2, keepdim=True, dtype=dtype))
    sums = torch.cat(parts, dim=-2)
    first_block = first_pos // block
    return F.pad(sums, (0, 0, first_block, n_blocks - first_block - sums.shape[-2]))


def block_means(x: Tensor, first_pos: int, block: int, n_blocks: int, valid: Tensor | None,
                dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Mean of ``x`` over each absolute block, ignoring ``valid == False`` rows.

    Args:
        x: ``(B, H, L, C)`` at absolute positions ``first_pos ..``; valid: optional bool ``(B, L)``.

    Returns:
        ``(means, has_any)``: ``(B, H, n_blocks, C)`` in ``dtype`` (zeros for empty blocks) and bool
        ``(B or 1, 1, n_blocks)``, True where the block holds at least one valid position.
    """
    if valid is None:
        lo = torch.arange(n_blocks, device=x.device) * block
        hi = (lo + block).clamp(max=first_pos + x.shape[-2])
        count = (hi - lo.clamp(min=first_pos)).clamp(min=0).to(dtype).view(1, 1, n_blocks, 1)
    else:
        x = x.masked_fill(~valid[:, None, :, None], 0)
        count = block_sums(valid[:, None, :, None].to(dtype), first_pos, block, n_blocks, dtype)
    sums = block_sums(x, first_pos, block, n_blocks, dtype)
    return sums / count.clamp(min=1), (count > 0).squeeze(-1)


def cover(mass: Tensor, frac: Tensor, min_count: int = 0) -> Tensor:
    """Smallest set of largest entries whose mass reaches ``frac`` of the total (along dim -1).

    Entry of rank ``r`` (descending mass, ties by index) is kept when the mass ranked before it is
    ``< frac * total``, or ``r < min_count``, or ``frac >= 1``; zero-mass entries are never kept.

    Args:
        mass: non-negative ``(..., M)``.
        frac: broadcastable to ``(..., 1)``.
        min_count: minimum number of (positive-mass) entries kept.

    Returns:
        bool ``(..., M)``.
    """
    vals, order = torch.sort(mass, dim=-1, descending=True, stable=True)
    csum = vals.cumsum(-1)
    before = F.pad(csum[..., :-1], (1, 0))
    rank = torch.arange(mass.shape[-1], device=mass.device)
    need = (before < frac * csum[..., -1:]) | (frac >= 1) | (rank < min_count)
    return torch.zeros_like(need).scatter_(-1, order, need & (vals > 0))


def _slash_block_mass(probs: Tensor, skv: int, block: int, n_blocks: int) -> Tensor:
    """Pooled slash mass from the last queries' attention, in place on ``probs``.

    Args:
        probs: ``(B, H, n, n_blocks * block)``; row ``r`` is absolute query ``skv - n + r``.

    Returns:
        ``(B, H, n_blocks)``: entry ``o`` sums ``probs[r, key]`` over ``(query - key) // block == o``.
    """
    bsz, heads, n, _ = probs.shape
    dev = probs.device
    local = probs.view(bsz, heads, n, n_blocks, block).cumsum_(-1)  # in-block inclusive cumsums
    total = local[..., -1]
    # A block-offset window ends (exclusive) at e = pos + 1 - o * block; with e = a * block + r it is
    # (tail of block a - 1 from r) + (head of block a up to r).
    end = torch.arange(skv - n + 1, skv + 1, device=dev)  # pos + 1
    r = (end % block)[:, None]  # (n, 1)
    head = local.gather(-1, (r - 1).clamp(min=0).view(1, 1, n, 1, 1).expand(bsz, heads, n, n_blocks, 1))
    head = head.squeeze(-1).masked_fill((r == 0).view(1, 1, n, 1), 0)  # first r entries of each block
    tail = total - head  # entries r.. of each block
    zero = head.new_zeros(bsz, heads, n, 1)
    head, tail = torch.cat([head, zero], -1), torch.cat([tail, zero], -1)  # index n_blocks reads 0
    a = (end // block)[:, None] - torch.arange(n_blocks, device=dev)[None, :]  # (n, n_blocks)
    a_tail, a_head = a - 1, a
    a_tail = torch.where(a_tail < 0, n_blocks, a_tail)
    a_head = torch.where((a_head < 0) | (a_head >= n_blocks), n_blocks, a_head)
    window = tail.gather(-1, a_tail.expand(bsz, heads, n, n_blocks))
    window = window + head.gather(-1, a_head.expand(bsz, heads, n, n_blocks))
    return window.sum(-2)


def _js_distance(p: Tensor, q: Tensor) -> Tensor:
    """sqrt of the Jensen-Shannon divergence (natural log) between distributions along dim -1."""
    m = (p + q) / 2
    kl_p = torch.where(p > 0, p * torch.log(p / m.clamp(min=torch.finfo(m.dtype).tiny)), 0).sum(-1)
    kl_q = torch.where(q > 0, q * torch.log(q / m.clamp(min=torch.finfo(m.dtype).tiny)), 0).sum(-1)
    return (0.5 * kl_p + 0.5 * kl_q).clamp(min=0).sqrt()


@torch.no_grad()
def flexprefill_blocks(q: Tensor, k: Tensor, *, gamma: Tensor, tau: Tensor, block: int, last_q: int,
                       min_budget: int, scale: float, kv_valid: Tensor | None = None) -> Tensor:
    """FlexPrefill's kept ``block x block`` tiles for every query head (Lai et al., 2025, arXiv:2502.20766).

    Args:
        q: ``(B, H_q, S_q, D)``; query ``i`` sits at absolute position ``i + S_kv - S_q``.
        k: ``(B, H_kv, S_kv, D)``, ``H_q`` a multiple of ``H_kv`` (query head ``h`` reads kv head
            ``h // (H_q // H_kv)``); never repeated.
        gamma: float ``(H_q,)`` in ``(0, 1]``, mass fraction each selection covers.
        tau: float ``(H_q,)`` in ``[0, 1]``; a head with sqrt-JS distance ``< tau`` is query-aware.
        block: tokens per block.
        last_q: trailing queries used for the vertical/slash statistics (clamped to ``S_q``).
        min_budget: at least this many vertical blocks and block offsets for vertical-slash heads.
        scale: softmax scale (usually ``D ** -0.5``).
        kv_valid: optional bool ``(B, S_kv)``; ``False`` keys (padding) get zero estimated mass.

    Returns:
        bool ``(B, H_q, N, N)``, ``N = ceil(S_kv / block)``; ``[b, h, i, j]`` keeps key block ``j`` for
        absolute query block ``i``. Column 0 and the diagonal are always kept, nothing above it is.

    Example:
        >>> q, k = torch.randn(1, 4, 300, 32), torch.randn(1, 2, 300, 32)
        >>> keep = flexprefill_blocks(q, k, gamma=torch.full((4,), 0.9), tau=torch.full((4,), 0.1),
        ...                           block=64, last_q=64, min_budget=1, scale=32 ** -0.5)
        >>> keep.shape
        torch.Size([1, 4, 5, 5])
    """
    validate_qk(q, k, kv_valid, scale)
    bsz, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    check_per_head("gamma", gamma, hq, 0.0, low_open=True)
    check_per_head("tau", tau, hq, 0.0, low_open=False)
    check_int("block", block, 1)
    check_int("last_q", last_q, 1)
    check_int("min_budget", min_budget, 0)

    group = hq // hkv
    nb = -(-skv // block)
    offset = skv - sq
    dev = q.device
    cdt = torch.promote_types(q.dtype, torch.float32)
    gamma_c = gamma.to(device=dev, dtype=cdt)
    tau_c = tau.to(device=dev, dtype=cdt)
    q_valid = None if kv_valid is None else kv_valid[:, offset:]
    ii = torch.arange(nb, device=dev)[:, None]
    jj = torch.arange(nb, device=dev)[None, :]

    # 1) Last queries against every key (keys padded to the block grid with -inf scores).
    n = min(last_q, sq)
    k_grid = k if skv == nb * block else F.pad(k, (0, 0, 0, nb * block - skv))
    q_last = (q[:, :, sq - n :] * scale).reshape(bsz, hkv, group * n, d)
    scores = torch.matmul(q_last, k_grid.transpose(-1, -2)).view(bsz, hq, n, nb * block)
    pos = torch.arange(skv - n, skv, device=dev)[:, None]
    blocked = torch.arange(nb * block, device=dev)[None, :] > pos  # covers the grid padding too
    row_w = torch.ones(1, 1, n, device=dev, dtype=cdt)
    if kv_valid is not None:
        key_ok = F.pad(kv_valid, (0, nb * block - skv))
        blocked = blocked | ~key_ok[:, None, None, :]
        first_key = torch.where(kv_valid.any(-1), kv_valid.to(torch.int8).argmax(-1), skv)  # (B,)
        row_w = (q_valid[:, None, sq - n :] & (first_key[:, None, None] <= pos.view(1, 1, n))).to(cdt)
    probs = torch.softmax(scores.masked_fill_(blocked, float("-inf")), dim=-1, dtype=cdt)
    if kv_valid is not None:  # rows of padded queries / queries without a valid key: no weight (and no NaN)
        probs = torch.where(row_w[..., None] > 0, probs, 0)
    probs = probs / row_w.sum(-1, keepdim=True)[..., None].clamp(min=1)  # mean over the scored queries
    v_mass = probs.sum(-2).view(bsz, hq, nb, block).sum(-1)  # (B, Hq, N)
    s_mass = _slash_block_mass(probs, skv, block, nb)
    del probs, scores

    # 2) Query-aware test: estimated block distribution vs pooled vertical distribution.
    k_pool, k_any = block_means(k, 0, block, nb, kv_valid, cdt)  # (B, Hkv, N, D), (B|1, 1, N)
    q_tail = q[:, :, sq - n :]
    q_bar = (q_tail.to(cdt) * row_w.view(-1, 1, n, 1)).sum(-2) / row_w.sum(-1).view(-1, 1, 1).clamp(min=1)
    est = torch.matmul(q_bar.view(bsz, hkv, group, d) * scale, k_pool.transpose(-1, -2)).view(bsz, hq, nb)
    est = torch.softmax(est.masked_fill(~k_any, float("-inf")), dim=-1)
    v_total = v_mass.sum(-1, keepdim=True)
    dist = _js_distance(est, v_mass / v_total.clamp(min=torch.finfo(cdt).tiny))
    query_aware = (dist < tau_c) & (v_total.squeeze(-1) > 0)  # (B, Hq)

    # 3) Query-aware tiles: pooled query blocks x pooled key blocks, block-causal, per-row cover.
    q_pool, q_any = block_means(q, offset, block, nb, q_valid, cdt)  # (B, Hq, N, D)
    qa_scores = torch.matmul(q_pool.view(bsz, hkv, group * nb, d) * scale, k_pool.transpose(-1, -2))
    qa_blocked = (jj > ii) | ~k_any[..., None, :]
    qa_probs = torch.softmax(qa_scores.view(bsz, hq, nb, nb).masked_fill(qa_blocked, float("-inf")), dim=-1)
    qa_rows = q_any[..., :, None] & ~qa_blocked.all(-1, keepdim=True)
    qa_keep = cover(torch.where(qa_rows, qa_probs, 0), gamma_c.view(1, hq, 1, 1))

    # 4) Vertical-slash tiles: covering key blocks in every row, covering block offsets along diagonals.
    frac = gamma_c.view(1, hq, 1)
    v_keep = cover(v_mass, frac, min_budget)  # (B, Hq, N)
    s_keep = cover(s_mass, frac, min_budget)
    vs_keep = v_keep[..., None, :] | s_keep[..., (ii - jj).clamp(min=0)]

    keep = torch.where(query_aware[..., None, None], qa_keep, vs_keep)
    return (keep | (jj == 0) | (jj == ii)) & (jj <= ii)
