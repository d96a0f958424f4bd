"""The search recovers patterns planted in q/k, and its scores are what they claim."""

import pytest
import torch

import flexinference as fi
from flexinference.search import SearchCriterion, keep_rows, search_layer
from flexinference.compose import build_tables
from flexinference.masks.tables import dense_keep

S, BLOCK = 1024, 64
CANDIDATES = (
    fi.AShape(sink=16, local=64),
    fi.VerticalSlash(vertical=64, slash=64, keep_first_columns=16, keep_nearest_diagonals=64),
    fi.BlockTopK(block=64, topk=3),
)


def planted(seed: int = 0):
    """Three heads (one KV head each): 0 = sink + own-block local, 1 = four retrieval columns + local,
    2 = each query block reads one random earlier key block (besides its own)."""
    g = torch.Generator().manual_seed(seed)
    d, nb = 64, S // BLOCK
    q = torch.zeros(1, 3, S, d)
    k = torch.zeros(1, 3, S, d)
    pos = torch.arange(S)
    blk = pos // BLOCK
    big = 12.0
    # head 0: sinks (dim 0) and own block (dims 1..16)
    q[0, 0, :, 0] = 1.0
    k[0, 0, :16, 0] = big
    q[0, 0, pos, 1 + blk] = 1.0
    k[0, 0, pos, 1 + blk] = big
    # head 1: retrieval columns (dim 0) plus own-block local attention (dims 1..16)
    q[0, 1, :, 0] = 1.0
    k[0, 1, [300, 500, 700, 900], 0] = big
    q[0, 1, pos, 1 + blk] = 1.0
    k[0, 1, pos, 1 + blk] = big
    # head 2: block i reads block target[i] < i (dims 1..16), and its own block (dims 17..32)
    target = torch.tensor([0] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, nb)])
    q[0, 2, pos, 1 + target[blk]] = 1.0
    k[0, 2, pos, 1 + blk] = big
    q[0, 2, pos, 17 + blk] = 1.0
    k[0, 2, pos, 17 + blk] = big
    v = torch.randn(1, 3, S, d, generator=g)
    return q, k, v


def test_search_recovers_planted_patterns():
    q, k, v = planted()
    choices = search_layer(q, k, v, CANDIDATES, SearchCriterion(min_recall=0.9, max_error=0.2, num_rows=256),
                           scale=1.0)
    assert [type(c.pattern) for c in choices] == [fi.AShape, fi.VerticalSlash, fi.BlockTopK]
    for c in choices:
        assert c.recall >= 0.9 and c.error <= 0.2 and 0 < c.cost < 1
        assert c.cost == min(sc[3] for sc in c.scores.values() if sc[0] >= 0.9 and sc[1] <= 0.2)


def test_nothing_passes_falls_back_to_dense():
    q, k, v = planted()
    choices = search_layer(q, k, v, (fi.AShape(sink=1, local=1),), SearchCriterion(min_recall=0.99), scale=1.0)
    assert all(isinstance(c.pattern, fi.Dense) for c in choices)


def test_keep_rows_matches_dense_keep():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 300, 32, generator=g)
    k = torch.randn(2, 2, 500, 32, generator=g)
    pats = [fi.AShape(3, 20), fi.VerticalSlash(10, 20), fi.BlockTopK(64, 2), fi.TriShape(2, 5, 30)]
    tables = build_tables(q, k, pats, scale=0.2)
    rows = torch.tensor([0, 7, 128, 299])
    assert torch.equal(keep_rows(tables, rows), dense_keep(tables)[:, :, rows])


def test_recall_and_error_of_a_pattern_that_keeps_everything():
    q, k, v = planted()
    choices = search_layer(q, k, v, (fi.AShape(sink=0, local=S),), scale=1.0)
    # keeps every pair: visits every causal block, so it is no cheaper than dense and dense is kept
    assert all(isinstance(ch.pattern, fi.Dense) for ch in choices)
    recall, error, cost, density = next(iter(choices[0].scores.values()))
    assert recall == pytest.approx(1.0, abs=1e-5) and error == pytest.approx(0.0, abs=1e-5)
    assert cost == pytest.approx(1.0) and density == pytest.approx(1.0)


def test_bad_criterion():
    with pytest.raises(ValueError, match="min_recall"):
        SearchCriterion(min_recall=0.0)
    with pytest.raises(ValueError, match="num_rows"):
        SearchCriterion(num_rows=0)
