"""The BlockMask built from tables makes a block-sparse kernel keep exactly the rule's pairs.

Eager CPU flex ignores the block lists, so this checks them directly: full blocks hold only kept pairs,
partial blocks run the mask_mod, and no kept pair lies outside the visited blocks.
"""

import torch
from attn_gym.masks import generate_dilated_sliding_window, generate_sliding_window
from hypothesis import given, settings
from hypothesis import strategies as st

import flexinference as fi
from flexinference.compose import build_tables
from flexinference.masks import a_shape, dilated
from flexinference.masks.block_mask import block_mask_from_tables
from flexinference.masks.tables import dense_keep
from flexinference.testing.blockmask import visited_tokens
from tests.strategies import dynamic_patterns, shapes, static_patterns


@settings(max_examples=150)
@given(shape=shapes(max_len=1100), seed=st.integers(0, 2**16), padded=st.booleans(),
       block=st.sampled_from([(128, 128), (64, 128), (128, 64), (64, 64)]), data=st.data())
def test_visited_blocks_reproduce_the_rule(shape, seed, padded, block, data):
    b, hq, hkv, sq, skv, d = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, 32, generator=g)
    k = torch.randn(b, hkv, skv, 32, generator=g)
    patterns = [data.draw(st.one_of(static_patterns(), dynamic_patterns())) for _ in range(hq)]
    valid = (torch.rand(b, skv, generator=g) > 0.25) if padded else None
    tables = build_tables(q, k, patterns, scale=0.2, kv_valid=valid)
    bm = block_mask_from_tables(tables, *block)
    assert torch.equal(visited_tokens(bm, sq, skv), dense_keep(tables))


@settings(max_examples=100)
@given(sink=st.integers(0, 64), window=st.integers(0, 300), length=st.integers(1, 700))
def test_a_shape_agrees_with_attn_gym_sliding_window(sink, window, length):
    """attn-gym's sliding window keeps q - kv <= window: our local window of window + 1, no sinks."""
    oracle = generate_sliding_window(window)
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    zero = torch.tensor(0)
    expected = oracle(zero, zero, i, j) & (j <= i)
    assert torch.equal(a_shape.dense_mask(fi.AShape(sink=0, local=window + 1), length, length), expected)
    with_sink = a_shape.dense_mask(fi.AShape(sink=sink, local=window + 1), length, length)
    assert torch.equal(with_sink, expected | ((j < sink) & (j <= i)))


@settings(max_examples=100)
@given(window=st.integers(0, 300), dilation=st.integers(1, 6), length=st.integers(1, 700))
def test_dilated_agrees_with_attn_gym(window, dilation, length):
    """attn-gym's dilated window (|i-j| <= window, |i-j| % dilation == 0), made causal, is our
    Dilated(sink=0, band=0, span=window + 1)."""
    oracle = generate_dilated_sliding_window(window, dilation)
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    zero = torch.tensor(0)
    expected = oracle(zero, zero, i, j) & (j <= i)
    ours = dilated.dense_mask(fi.Dilated(sink=0, band=0, span=window + 1, dilation=dilation), length, length)
    assert torch.equal(ours, expected)


def test_vertical_slash_block_fraction_at_128k_banded():
    """Fit for speed: a 1000-vertical / 6096-slash head at 128K with banded slashes.

    Without gathering, scattered token verticals touch most 128-blocks; this records that baseline so the
    gathered layout (flexinference.gathered) has something to beat."""
    s, t = 131072, 131072
    g = torch.Generator().manual_seed(0)
    cols = torch.zeros(1, 1, t, dtype=torch.bool)
    cols[0, 0, :30] = True
    cols[0, 0, torch.randperm(s - 30, generator=g)[:970] + 30] = True
    diags = torch.zeros(1, 1, t, dtype=torch.bool)
    diags[0, 0, :6096] = True
    from flexinference.masks.block_mask import block_grid
    from flexinference.masks.tables import KeepTables

    tables = KeepTables(cols, diags, torch.full((1, 1), 2**31 - 1, dtype=torch.int32), None,
                        torch.tensor(0, dtype=torch.int32), s, s)
    partial, full = block_grid(tables)
    visited = (partial | full).sum().item()
    causal = 1024 * 1025 // 2
    assert visited / causal > 0.5  # verticals in place: most causal blocks are visited
