"""Slow, loop-per-head references of the FlexPrefill and XAttention block estimators (tests only).

Everything is computed in float64 one (batch, query head) at a time, straight from the definitions:
full score matrices, explicit diagonal/antidiagonal walks, Python sorting for the cumulative covers.
They specify :mod:`flexinference.estimate.flexprefill` (Lai et al., 2025, arXiv:2502.20766) and
:mod:`flexinference.estimate.xattention` (Xu et al., 2025, arXiv:2503.16428).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "cover_reference",
    "flexprefill_estimates_reference",
    "flexprefill_blocks_reference",
    "xattention_mass_reference",
    "xattention_blocks_reference",
]


def _softmax_over(scores: Tensor, allowed: Tensor) -> Tensor:
    """Softmax of the allowed entries of a 1-D tensor; zeros elsewhere (all zeros if none allowed)."""
    out = torch.zeros_like(scores)
    if bool(allowed.any()):
        out[allowed] = torch.softmax(scores[allowed], dim=0)
    return out


def cover_reference(masses: list[float], frac: float, min_count: int = 0) -> set[int]:
    """Indices of the largest masses (ties: lower index first) until ``frac`` of the total is covered.

    Rank ``r`` is kept if its mass is positive and (the mass ranked before it is ``< frac * total``, or
    ``frac >= 1``, or ``r < min_count``).
    """
    order = sorted(range(len(masses)), key=lambda j: (-masses[j], j))
    total = 0.0
    for j in order:
        total += masses[j]
    kept, before = set(), 0.0
    for rank, j in enumerate(order):
        if masses[j] > 0 and (before < frac * total or frac >= 1 or rank < min_count):
            kept.add(j)
        before += masses[j]
    return kept


def _valid(kv_valid: Tensor | None, b: int, skv: int) -> Tensor:
    return torch.ones(skv, dtype=torch.bool) if kv_valid is None else kv_valid[b].cpu()


def flexprefill_estimates_reference(q, k, *, block, last_q, scale, kv_valid=None) -> dict[str, Tensor]:
    """FlexPrefill's intermediate estimates per (batch, query head).

    Returns a dict of float64 CPU tensors: ``vertical`` ``(B, H_q, N)`` (mean attention of the last
    queries pooled per key block), ``slash`` ``(B, H_q, N)`` (pooled per block offset
    ``(query - key) // block``), ``distance`` ``(B, H_q)`` (sqrt JS distance; ``inf`` when the vertical
    mass is zero) and ``pooled`` ``(B, H_q, N, N)`` (block-causal softmax of pooled q / pooled k blocks,
    zero rows for query blocks without a valid query).
    """
    bsz, hq, sq, _ = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    group = hq // hkv
    nb = -(-skv // block)
    off = skv - sq
    n = min(last_q, sq)
    out = {
        "vertical": torch.zeros(bsz, hq, nb, dtype=torch.float64),
        "slash": torch.zeros(bsz, hq, nb, dtype=torch.float64),
        "distance": torch.zeros(bsz, hq, dtype=torch.float64),
        "pooled": torch.zeros(bsz, hq, nb, nb, dtype=torch.float64),
    }
    for b in range(bsz):
        kval = _valid(kv_valid, b, skv)
        qval = kval[off:]
        for h in range(hq):
            qh = q[b, h].detach().cpu().double()
            kh = k[b, h // group].detach().cpu().double()
            scores = (qh @ kh.T) * scale  # (S_q, S_kv), query i at absolute position off + i
            # Vertical and slash from the last n queries.
            vertical = torch.zeros(skv, dtype=torch.float64)
            slash = torch.zeros(skv, dtype=torch.float64)
            last_rows = []  # scored last queries: valid, with at least one visible valid key
            for i in range(sq - n, sq):
                p = off + i
                if not bool(qval[i]):
                    continue
                allowed = (torch.arange(skv) <= p) & kval
                if not bool(allowed.any()):
                    continue
                last_rows.append(i)
                row = _softmax_over(scores[i], allowed)
                vertical += row
                slash[: p + 1] += row[: p + 1].flip(0)  # slash[o] += row[p - o]
            vertical /= max(len(last_rows), 1)
            slash /= max(len(last_rows), 1)
            v_blk = torch.stack([vertical[j * block : (j + 1) * block].sum() for j in range(nb)])
            s_blk = torch.stack([slash[o * block : (o + 1) * block].sum() for o in range(nb)])
            out["vertical"][b, h], out["slash"][b, h] = v_blk, s_blk
            # Pooled keys (mean of valid keys per block) and the query-aware distance.
            k_pool = torch.zeros(nb, kh.shape[1], dtype=torch.float64)
            k_has = torch.zeros(nb, dtype=torch.bool)
            for j in range(nb):
                sel = kval[j * block : (j + 1) * block]
                if bool(sel.any()):
                    k_pool[j], k_has[j] = kh[j * block : (j + 1) * block][sel].mean(0), True
            if not last_rows or float(v_blk.sum()) <= 0:
                out["distance"][b, h] = math.inf
            else:
                q_bar = qh[last_rows].mean(0)
                est = _softmax_over((k_pool @ q_bar) * scale, k_has)
                bar = v_blk / v_blk.sum()
                mid = (est + bar) / 2
                js = 0.0
                for a, c in zip(est.tolist(), mid.tolist()):
                    js += 0.5 * a * math.log(a / c) if a > 0 else 0.0
                for a, c in zip(bar.tolist(), mid.tolist()):
                    js += 0.5 * a * math.log(a / c) if a > 0 else 0.0
                out["distance"][b, h] = math.sqrt(max(js, 0.0))
            # Pooled query blocks x pooled key blocks.
            q_block = (off + torch.arange(sq)) // block
            for i in range(nb):
                rows = (q_block == i) & qval
                if not bool(rows.any()):
                    continue
                q_pool = qh[rows].mean(0)
                allowed = (torch.arange(nb) <= i) & k_has
                out["pooled"][b, h, i] = _softmax_over((k_pool @ q_pool) * scale, allowed)
    return out


def flexprefill_blocks_reference(q, k, *, gamma, tau, block, last_q, min_budget, scale, kv_valid=None) -> Tensor:
    """Loop reference of :func:`flexinference.estimate.flexprefill.flexprefill_blocks` (same arguments)."""
    est = flexprefill_estimates_reference(q, k, block=block, last_q=last_q, scale=scale, kv_valid=kv_valid)
    bsz, hq = q.shape[:2]
    nb = est["vertical"].shape[-1]
    keep = [[[[False] * nb for _ in range(nb)] for _ in range(hq)] for _ in range(bsz)]
    for b in range(bsz):
        for h in range(hq):
            g, t, cells = float(gamma[h]), float(tau[h]), keep[b][h]
            if float(est["distance"][b, h]) < t:  # query-aware head
                for i in range(nb):
                    for j in cover_reference(est["pooled"][b, h, i].tolist(), g):
                        cells[i][j] = True
            else:  # vertical-slash head
                cols = cover_reference(est["vertical"][b, h].tolist(), g, min_budget)
                offs = cover_reference(est["slash"][b, h].tolist(), g, min_budget)
                for i in range(nb):
                    for j in range(i + 1):
                        cells[i][j] = j in cols or (i - j) in offs
            for i in range(nb):
                cells[i][0] = cells[i][i] = True
    return torch.tensor(keep, dtype=torch.bool).view(bsz, hq, nb, nb)


def xattention_mass_reference(q, k, *, stride, block, scale, kv_valid=None) -> Tensor:
    """XAttention's block mass ``(B, H_q, N, N)`` (float64, CPU) from explicit antidiagonal walks.

    On the absolute grid ``0 .. N*block - 1`` (queries zero outside ``[S_kv - S_q, S_kv)`` and where
    invalid, keys zero beyond ``S_kv`` and where invalid): ``A[r, c] = sum_t (QK^T)[r*s + s-1-t, c*s + t]``,
    softmax of ``A * scale / s`` over ``c <= r`` with a valid key in group ``c``, for rows with a valid
    query; summed over ``block/s x block/s`` tiles.
    """
    bsz, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    group = hq // hkv
    nb = -(-skv // block)
    width, s, per = nb * block, stride, block // stride
    off = skv - sq
    mass = torch.zeros(bsz, hq, nb, nb, dtype=torch.float64)
    for b in range(bsz):
        kval = torch.zeros(width, dtype=torch.bool)
        kval[:skv] = _valid(kv_valid, b, skv)
        qval = torch.zeros(width, dtype=torch.bool)
        qval[off:skv] = kval[off:skv]
        col_ok = kval.view(-1, s).any(-1)
        row_ok = qval.view(-1, s).any(-1)
        for h in range(hq):
            qz = torch.zeros(width, d, dtype=torch.float64)
            kz = torch.zeros(width, d, dtype=torch.float64)
            qz[off:skv] = q[b, h].detach().cpu().double()
            kz[:skv] = k[b, h // group].detach().cpu().double()
            qz[~qval], kz[~kval] = 0, 0
            full = qz @ kz.T
            anti = torch.zeros(width // s, width // s, dtype=torch.float64)
            for t in range(s):
                anti += full[s - 1 - t :: s, t::s]
            anti *= scale / s
            reduced = torch.arange(width // s)
            allowed = (reduced[None, :] <= reduced[:, None]) & col_ok[None, :] & row_ok[:, None]
            probs = torch.softmax(anti.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num(0.0)
            mass[b, h] = probs.view(nb, per, nb, per).sum((1, 3))  # tile (i, j) = rows of block i, cols of j
    return mass


def xattention_blocks_reference(q, k, *, threshold, stride, block, scale, kv_valid=None) -> Tensor:
    """Loop reference of :func:`flexinference.estimate.xattention.xattention_blocks` (same arguments)."""
    mass = xattention_mass_reference(q, k, stride=stride, block=block, scale=scale, kv_valid=kv_valid)
    bsz, hq, nb, _ = mass.shape
    keep = [[[[False] * nb for _ in range(nb)] for _ in range(hq)] for _ in range(bsz)]
    for b in range(bsz):
        for h in range(hq):
            thr = float(threshold[h])
            for i, row in enumerate(mass[b, h].tolist()):
                total = sum(row)
                forced = {0, i}
                before = sum(row[j] for j in forced)
                cells = keep[b][h][i]
                cells[0] = cells[i] = True
                others = sorted((j for j in range(nb) if j not in forced), key=lambda j: (-row[j], j))
                for j in others:
                    if row[j] > 0 and (before < thr * total or thr >= 1) and j <= i:
                        cells[j] = True
                    before += row[j]
    return torch.tensor(keep, dtype=torch.bool).view(bsz, hq, nb, nb)
