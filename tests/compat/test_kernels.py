"""MInference-compatible kernel functions against the dense reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexinference.compat.kernels import block_sparse_attention, streaming_forward, vertical_slash_sparse_attention
from flexinference.masks.vertical_slash import dense_mask_from_indices
from flexinference.testing.reference import reference_attention
from tests.strategies import shapes


@settings(max_examples=80)
@given(shape=shapes(max_len=600), seed=st.integers(0, 2**16), nv=st.integers(1, 40), ns=st.integers(1, 40))
def test_vertical_slash_keeps_exactly_given_indices(shape, seed, nv, ns):
    b, hq, hkv, sq, skv, d = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, skv, d, generator=g)
    k = torch.randn(b, hkv, skv, d, generator=g)
    v = torch.randn(b, hkv, skv, d, generator=g)
    # Random indices include duplicates, negatives and positions past the sequence (ignored).
    cols = torch.randint(-5, skv + 20, (b, hq, nv), generator=g)
    offs = torch.randint(-5, skv + 20, (b, hq, ns), generator=g)
    out = vertical_slash_sparse_attention(q, k, v, cols, offs)
    keep = dense_mask_from_indices(cols, offs, skv, skv)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, keep), atol=1e-5, rtol=1e-5)


@settings(max_examples=40)
@given(shape=shapes(max_len=600), seed=st.integers(0, 2**16), init=st.integers(0, 50), local=st.integers(1, 200))
def test_streaming_forward(shape, seed, init, local):
    b, hq, hkv, sq, skv, d = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, skv, d, generator=g)
    k = torch.randn(b, hkv, skv, d, generator=g)
    v = torch.randn(b, hkv, skv, d, generator=g)
    i = torch.arange(skv)[:, None]
    j = torch.arange(skv)[None, :]
    keep = (j <= i) & ((j < init) | (i - j < local))
    out = streaming_forward(q, k, v, init, local)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, keep), atol=1e-5, rtol=1e-5)


def test_block_sparse_with_enough_blocks_is_dense():
    q, k, v = torch.randn(3, 1, 4, 333, 64)
    out = block_sparse_attention(q, k, v, topk=6)
    causal = torch.ones(333, 333, dtype=torch.bool).tril()
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda q: vertical_slash_sparse_attention(q, q, q, torch.zeros(1, 2, 3), torch.zeros(1, 2, 3, dtype=torch.long)), "vertical_topk"),
        (lambda q: vertical_slash_sparse_attention(q, q, q, torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 3, 3, dtype=torch.long)), "slash"),
        (lambda q: block_sparse_attention(q, q, q, topk=0), "topk"),
        (lambda q: streaming_forward(q, q, q, -1, 4), "init_num"),
        (lambda q: streaming_forward(q, q, q, 1, 0), "local_window_num"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(1, 2, 16, 64))
