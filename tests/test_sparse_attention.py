"""sparse_attention against the dense reference on exactly the kept set (CPU, eager flex)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import flexinference as fi
from flexinference.attention import Impl, sparse_attention
from flexinference.compose import build_tables
from flexinference.masks import a_shape, dense, dilated, strided, tri_shape, vertical_slash
from flexinference.masks.tables import dense_keep
from flexinference.testing.reference import reference_attention
from tests.strategies import dynamic_patterns, flexprefill, shapes, static_patterns, xattention

ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
EXAMPLES_PER_PATTERN = 200

STATIC_REFERENCE = {
    fi.Dense: dense.dense_mask,
    fi.AShape: a_shape.dense_mask,
    fi.TriShape: tri_shape.dense_mask,
    fi.Dilated: dilated.dense_mask,
    fi.Strided: strided.dense_mask,
    fi.VerticalSlashStatic: vertical_slash.dense_mask,
}

FAMILIES = {
    "dense": st.just(fi.Dense()),
    "a_shape": st.builds(fi.AShape, sink=st.integers(0, 200), local=st.integers(1, 400)),
    "tri_shape": st.builds(fi.TriShape, sink=st.integers(0, 200), local=st.integers(1, 400), last=st.integers(0, 300)),
    "dilated": st.builds(fi.Dilated, sink=st.integers(0, 200), band=st.integers(0, 200),
                         span=st.integers(0, 900), dilation=st.integers(1, 5)),
    "strided": st.builds(fi.Strided, stride=st.integers(1, 100), local=st.integers(1, 300), sink=st.integers(0, 50)),
    "static_vs": st.builds(fi.VerticalSlashStatic,
                           columns=st.lists(st.integers(0, 1500), max_size=20).map(tuple),
                           diagonals=st.lists(st.integers(0, 1500), max_size=20).map(tuple)),
    "vertical_slash": dynamic_patterns().filter(lambda p: isinstance(p, fi.VerticalSlash)),
    "block_topk": st.builds(fi.BlockTopK, block=st.sampled_from([32, 64, 128, 256]), topk=st.integers(1, 12)),
    "flexprefill": flexprefill(),
    "xattention": xattention(),
}


def _inputs(shape, dtype, seed):
    b, hq, hkv, sq, skv, d = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, skv, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, skv, d, generator=g).to(dtype)
    return q, k, v


def _check_against_reference(q, k, v, patterns, kv_valid=None):
    out = sparse_attention(q, k, v, patterns, kv_valid=kv_valid, impl=Impl.FLEX_EAGER)
    tables = build_tables(q, k, fi.attention.normalize_patterns(patterns, q.shape[1]),
                          scale=q.shape[-1] ** -0.5, kv_valid=kv_valid)
    keep = dense_keep(tables)
    rows = keep.any(-1)
    if kv_valid is None:
        assert rows.all(), "a query row keeps nothing"
    ref = reference_attention(q, k, v, keep)
    tol = ATOL[q.dtype]
    torch.testing.assert_close(out.double()[rows], ref[rows], atol=tol, rtol=tol)
    # A row whose kept keys are all padding attends to nothing and returns zeros.
    assert not out[~rows].any()
    return keep


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_matches_reference_on_kept_set(family):
    @settings(max_examples=EXAMPLES_PER_PATTERN)
    @given(shape=shapes(max_len=700), pattern=FAMILIES[family], seed=st.integers(0, 2**16),
           bf16=st.booleans())
    def check(shape, pattern, seed, bf16):
        q, k, v = _inputs(shape, torch.bfloat16 if bf16 else torch.float32, seed)
        keep = _check_against_reference(q, k, v, pattern)
        if type(pattern) in STATIC_REFERENCE:
            b, hq, hkv, sq, skv, d = shape
            expected = STATIC_REFERENCE[type(pattern)](pattern, sq, skv)
            assert torch.equal(keep, expected.expand_as(keep))

    check()


@settings(max_examples=60)
@given(shape=shapes(max_len=900), seed=st.integers(0, 2**16), data=st.data())
def test_mixed_heads_in_one_call(shape, seed, data):
    """Heads of one layer with different patterns share one BlockMask."""
    q, k, v = _inputs(shape, torch.float32, seed)
    patterns = [data.draw(st.one_of(static_patterns(), dynamic_patterns())) for _ in range(shape[1])]
    _check_against_reference(q, k, v, patterns)


@settings(max_examples=60)
@given(shape=shapes(max_len=600), seed=st.integers(0, 2**16), pattern=st.one_of(static_patterns(), dynamic_patterns()))
def test_padding_keys_never_attended(shape, seed, pattern):
    b, hq, hkv, sq, skv, d = shape
    q, k, v = _inputs(shape, torch.float32, seed)
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(b, skv, generator=g) > 0.3
    valid[:, -1] = True  # every query sees at least its own key in the cases below
    keep = _check_against_reference(q, k, v, pattern, kv_valid=valid)
    assert not (keep & ~valid[:, None, None, :]).any()
    # Changing padded keys/values changes nothing.
    k2, v2 = k.clone(), v.clone()
    k2[~valid[:, None, :, None].expand_as(k)] = 7.0
    v2[~valid[:, None, :, None].expand_as(v)] = -3.0
    a = sparse_attention(q, k, v, pattern, kv_valid=valid)
    c = sparse_attention(q, k2, v2, pattern, kv_valid=valid)
    rows = keep.any(-1)
    torch.testing.assert_close(a[rows], c[rows], atol=1e-5, rtol=1e-5)


@settings(max_examples=40)
@given(shape=shapes(max_len=1500), seed=st.integers(0, 2**16))
def test_patterns_that_keep_everything_equal_sdpa(shape, seed):
    b, hq, hkv, sq, skv, d = shape
    q, k, v = _inputs(shape, torch.float32, seed)
    big = skv + 1
    everything = [
        fi.Dense(),
        fi.AShape(sink=0, local=big),
        fi.TriShape(sink=0, local=1, last=big),
        fi.Strided(stride=1, local=1),
        fi.VerticalSlash(vertical=big, slash=big),
        fi.BlockTopK(block=64, topk=big),
        fi.Dilated(sink=big, band=0, span=0),
        fi.FlexPrefill(gamma=1.0, min_len=0),
        fi.XAttention(threshold=1.0),
    ]
    causal = torch.ones(sq, skv, dtype=torch.bool).tril(skv - sq)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=hq != hkv)
    for p in everything:
        out = sparse_attention(q, k, v, p)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=f"{p}")


def test_no_query_row_is_empty():
    """The main diagonal is always kept, even by patterns with zero budgets."""
    q = torch.randn(1, 3, 257, 64)
    k = torch.randn(1, 3, 257, 64)
    patterns = [fi.VerticalSlashStatic(columns=(), diagonals=()),
                fi.VerticalSlash(vertical=0, slash=1, keep_first_columns=0, keep_nearest_diagonals=0),
                fi.Dilated(sink=0, band=0, span=0)]
    keep = dense_keep(build_tables(q, k, patterns, scale=0.125))
    assert keep.any(-1).all()
    assert keep.diagonal(dim1=-2, dim2=-1).all()


def test_reference_impl_equals_flex():
    q, k, v = _inputs((2, 4, 2, 200, 333, 64), torch.float32, 0)
    p = [fi.AShape(3, 40), fi.VerticalSlash(30, 40), fi.BlockTopK(64, 2), fi.Dense()]
    a = sparse_attention(q, k, v, p, impl=Impl.FLEX_EAGER)
    r = sparse_attention(q, k, v, p, impl=Impl.REFERENCE)
    torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(q=torch.randn(4, 64, 8)), ValueError, "q must be 4-D"),
        (dict(k=torch.randn(1, 3, 16, 64), v=torch.randn(1, 3, 16, 64)), ValueError, "multiple of k heads"),
        (dict(v=torch.randn(1, 2, 15, 64)), ValueError, "k and v must have the same shape"),
        (dict(q=torch.randn(1, 4, 32, 64)), ValueError, "more than k"),
        (dict(q=torch.randn(1, 4, 16, 32)), ValueError, "head dim"),
        (dict(q=torch.randn(1, 4, 16, 64).double()), TypeError, "share a dtype"),
        (dict(q=torch.zeros(1, 4, 16, 64, dtype=torch.long)), TypeError, "floating"),
        (dict(patterns="a_shape"), TypeError, "patterns must be"),
        (dict(patterns=[fi.Dense()] * 3), ValueError, "patterns has 3 entries"),
        (dict(patterns=[fi.Dense()] * 3 + [None]), TypeError, r"patterns\[3\]"),
        (dict(kv_valid=torch.ones(1, 15, dtype=torch.bool)), ValueError, "kv_valid"),
        (dict(impl="flex"), TypeError, "impl"),
        (dict(block_size=(128,)), ValueError, "block_size"),
        (dict(block_size=(0, 128)), ValueError, "block_size"),
        (dict(block_size=(128.0, 128.0)), ValueError, "block_size"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(q=torch.randn(1, 4, 16, 64), k=torch.randn(1, 2, 16, 64), v=torch.randn(1, 2, 16, 64),
                patterns=fi.Dense())
    args.update(kwargs)
    with pytest.raises(error, match=match):
        sparse_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("patterns"), **args)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: fi.AShape(sink=-1), ValueError, "AShape.sink"),
        (lambda: fi.AShape(local=0), ValueError, "AShape.local"),
        (lambda: fi.VerticalSlash(vertical=-5), ValueError, "VerticalSlash.vertical"),
        (lambda: fi.VerticalSlash(slash=0), ValueError, "VerticalSlash.slash"),
        (lambda: fi.BlockTopK(topk=1.5), TypeError, "BlockTopK.topk"),
        (lambda: fi.FlexPrefill(gamma=1.5), ValueError, "FlexPrefill.gamma"),
        (lambda: fi.XAttention(stride=8, block=100), ValueError, "XAttention.block"),
        (lambda: fi.VerticalSlashStatic(columns=(-1,)), ValueError, "columns"),
        (lambda: fi.Strided(stride=0), ValueError, "Strided.stride"),
    ],
)
def test_bad_pattern_parameters(make, error, match):
    with pytest.raises(error, match=match):
        make()
