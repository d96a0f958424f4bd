"""AUTO's cost model and the length-bucket padding of the compiled path, checked on CPU."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexinference as fi
from flexinference.attention import DENSE_LAYER_COST, Impl, _route, _sdpa, padded_block_mask, sparse_attention
from flexinference.compose import build_tables, table_length
from flexinference.masks.tables import dense_keep
from flexinference.testing.blockmask import visited_tokens
from flexinference.testing.reference import reference_attention
from tests.strategies import dynamic_patterns, shapes, static_patterns


@settings(max_examples=60)
@given(shape=shapes(max_len=900), seed=st.integers(0, 2**16), data=st.data())
def test_bucket_padding_never_lets_padding_into_a_full_block(shape, seed, data):
    b, hq, hkv, sq, skv, d = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, 16, generator=g)
    k = torch.randn(b, hkv, skv, 16, generator=g)
    patterns = [data.draw(st.one_of(static_patterns(), dynamic_patterns())) for _ in range(hq)]
    tables = build_tables(q, k, patterns, scale=0.25)
    pad = table_length(skv) - skv
    bm = padded_block_mask(tables, (128, 128), pad)
    visited = visited_tokens(bm, sq + pad, skv + pad)
    assert torch.equal(visited[:, :, :sq, :skv], dense_keep(tables))
    assert not visited[:, :, :sq, skv:].any()  # real queries never see padding keys


def test_route_keeps_cheap_heads_and_densifies_costly_ones():
    q = torch.randn(1, 4, 8192, 8)
    k = torch.randn(1, 2, 8192, 8)
    # Scattered far diagonals touch every block: costlier than dense. A-shape is cheap.
    far = fi.VerticalSlashStatic(columns=(), diagonals=tuple(range(0, 8192, 37)))
    tables = build_tables(q, k, [far, fi.AShape(4, 64), fi.AShape(4, 64), fi.AShape(4, 64)], scale=0.2)
    impl, routed = _route(q, k, tables, (128, 128))
    assert impl is Impl.FLEX
    assert routed.row_start[0, 0] == 0 and (routed.row_start[0, 1:] > 8192).all()
    # A layer that is mostly costly goes to SDPA entirely.
    tables = build_tables(q, k, [far] * 4, scale=0.2)
    impl, _ = _route(q, k, tables, (128, 128))
    assert impl is None and DENSE_LAYER_COST < 1


def test_route_picks_gathered_for_scattered_columns():
    q = torch.randn(1, 2, 8192, 8)
    k = torch.randn(1, 1, 8192, 8)
    tables = build_tables(q, k, [fi.VerticalSlashStatic(columns=(5, 700, 1500), diagonals=(0, 1, 2))] * 2, scale=0.2)
    impl, _ = _route(q, k, tables, (128, 128))
    assert impl is Impl.GATHERED


def test_sdpa_fallback_equals_dense_with_padding_and_offset():
    q = torch.randn(2, 4, 100, 32)
    k = torch.randn(2, 2, 300, 32)
    v = torch.randn(2, 2, 300, 32)
    valid = torch.rand(2, 300) > 0.3
    valid[:, -100:] = True
    tables = build_tables(q, k, [fi.Dense()] * 4, scale=0.2, kv_valid=valid)
    keep = dense_keep(tables)
    out = _sdpa(q, k, v, tables, 0.2)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, keep, scale=0.2), atol=1e-5, rtol=1e-5)


def test_gathered_impl_equals_reference():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 700, 64, generator=g)
    k = torch.randn(2, 2, 700, 64, generator=g)
    v = torch.randn(2, 2, 700, 64, generator=g)
    p = [fi.VerticalSlash(40, 60), fi.AShape(4, 32), fi.BlockTopK(64, 2), fi.Dense()]
    a = sparse_attention(q, k, v, p, impl=Impl.GATHERED)
    r = sparse_attention(q, k, v, p, impl=Impl.REFERENCE)
    torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)
