"""Batched estimators against slow per-head loops written from the method descriptions."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexinference.estimate.block_topk import block_topk_blocks
from flexinference.estimate.vertical_slash import vertical_slash_indices
from tests.strategies import shapes


def _slow_vertical_slash(q, k, v_budget, s_budget, first, nearest, last_q, scale):
    """Per (batch, head) loop: MInference's estimation as written in the paper (Sec. 3.2)."""
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    cols = torch.zeros(b, hq, skv, dtype=torch.bool)
    diags = torch.zeros(b, hq, skv, dtype=torch.bool)
    n = min(last_q, sq)
    for bi in range(b):
        for h in range(hq):
            kh = k[bi, h // (hq // hkv)].double()
            qh = q[bi, h, sq - n:].double()
            s = qh @ kh.T * scale
            for r in range(n):
                s[r, skv - n + r + 1:] = -math.inf
            a = torch.softmax(s, -1)
            col = a.sum(0)
            diag = torch.zeros(skv, dtype=torch.float64)
            for r in range(n):
                for j in range(skv - n + r + 1):
                    diag[skv - n + r - j] += a[r, j]
            col[: first[h]] = math.inf
            diag[: max(nearest[h], 1)] = math.inf
            kv = min(max(v_budget[h], first[h]), skv)
            ks = min(max(s_budget[h], nearest[h], 1), skv)
            cols[bi, h, col.topk(kv).indices] = True
            diags[bi, h, diag.topk(ks).indices] = True
    return cols, diags


@settings(max_examples=40)
@given(shape=shapes(max_len=160), seed=st.integers(0, 1000), data=st.data())
def test_vertical_slash_matches_per_head_loop(shape, seed, data):
    b, hq, hkv, sq, skv, d = shape
    torch.manual_seed(seed)
    q = torch.randn(b, hq, sq, d, dtype=torch.float64)
    k = torch.randn(b, hkv, skv, d, dtype=torch.float64) * 2
    budgets = st.lists(st.integers(0, 200), min_size=hq, max_size=hq)
    v, s = data.draw(budgets), data.draw(budgets)
    first = data.draw(st.lists(st.integers(0, 40), min_size=hq, max_size=hq))
    near = data.draw(st.lists(st.integers(0, 40), min_size=hq, max_size=hq))
    last_q = data.draw(st.integers(1, 70))
    scale = d ** -0.5
    t = skv + 5
    cols, diags = vertical_slash_indices(
        q, k, vertical=torch.tensor(v), slash=torch.tensor(s), first_columns=torch.tensor(first),
        nearest_diagonals=torch.tensor(near), max_vertical=max(v + first), max_slash=max(s + near + [1]),
        last_q=last_q, scale=scale, table_len=t,
    )
    ec, ed = _slow_vertical_slash(q, k, v, s, first, near, last_q, scale)
    assert not cols[..., skv:].any() and not diags[..., skv:].any()
    # Every column and offset gets positive mass from the last query, and fp64 random inputs make
    # exact ties practically impossible, so the kept sets must agree exactly.
    assert torch.equal(cols[..., :skv], ec)
    assert torch.equal(diags[..., :skv], ed)


def test_vertical_slash_finds_planted_structure():
    """Keys planted to attract attention at fixed columns and a fixed offset are found."""
    torch.manual_seed(0)
    s, d = 512, 64
    q = torch.randn(1, 2, s, d) * 0.1
    k = torch.randn(1, 1, s, d) * 0.1
    anchor = torch.randn(d)
    q[0, :, :] += anchor
    for col in (37, 200, 333):
        k[0, 0, col] += 3 * anchor
    cols, diags = vertical_slash_indices(
        q, k, vertical=torch.tensor([33, 33]), slash=torch.tensor([1, 1]), first_columns=torch.tensor([30, 30]),
        nearest_diagonals=torch.tensor([0, 0]), max_vertical=33, max_slash=1, last_q=64, scale=d ** -0.5,
        table_len=s,
    )
    for col in (37, 200, 333):
        assert cols[0, :, col].all()
    assert cols[0, :, :30].all() and cols.sum() == 2 * 33
    assert diags[0, :, 0].all() and diags.sum() == 2


def _slow_block_topk(q, k, topk, block):
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    n = -(-skv // block)
    off = skv - sq
    out = torch.zeros(b, hq, n, n, dtype=torch.bool)
    for bi in range(b):
        for h in range(hq):
            kh = k[bi, h // (hq // hkv)].double()
            pk = torch.stack([kh[j * block:(j + 1) * block].mean(0) for j in range(n)])
            for i in range(off // block, n):
                lo, hi = max(i * block, off), min((i + 1) * block, skv)
                pq = q[bi, h, lo - off:hi - off].double().mean(0)
                sc = pk[: i + 1] @ pq
                sc[i] = math.inf
                keep = sc.topk(min(topk[h], i + 1)).indices
                out[bi, h, i, keep] = True
    return out


@settings(max_examples=40)
@given(shape=shapes(max_len=700), seed=st.integers(0, 1000), block=st.sampled_from([16, 64, 128]), data=st.data())
def test_block_topk_matches_per_head_loop(shape, seed, block, data):
    b, hq, hkv, sq, skv, d = shape
    torch.manual_seed(seed)
    q = torch.randn(b, hq, sq, d, dtype=torch.float64)
    k = torch.randn(b, hkv, skv, d, dtype=torch.float64)
    topk = data.draw(st.lists(st.integers(1, 10), min_size=hq, max_size=hq))
    got = block_topk_blocks(q, k, topk=torch.tensor(topk), max_topk=max(topk), block=block)
    expected = _slow_block_topk(q, k, topk, block)
    first = (skv - sq) // block
    assert torch.equal(got[:, :, first:], expected[:, :, first:])
    n = got.shape[-1]
    assert not (got & ~torch.ones(n, n, dtype=torch.bool).tril()).any()
