"""Hypothesis strategies shared by the tests: shapes and patterns."""

from __future__ import annotations

from hypothesis import strategies as st

import flexinference as fi


@st.composite
def shapes(draw, max_len: int = 1200):
    """(B, H_q, H_kv, S_q, S_kv, D) with GQA ratios 1..4 and lengths off block multiples."""
    b = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 4))
    group = draw(st.integers(1, 4))
    skv = draw(st.one_of(st.integers(1, 300), st.integers(1, max_len)))
    sq = draw(st.one_of(st.just(skv), st.integers(1, skv)))
    d = draw(st.sampled_from([64, 128]))
    return b, hkv * group, hkv, sq, skv, d


def static_patterns():
    small = st.integers(0, 200)
    pos = st.integers(1, 400)
    return st.one_of(
        st.just(fi.Dense()),
        st.builds(fi.AShape, sink=small, local=pos),
        st.builds(fi.TriShape, sink=small, local=pos, last=small),
        st.builds(fi.Dilated, sink=small, band=small, span=st.integers(0, 900), dilation=st.integers(1, 5)),
        st.builds(fi.Strided, stride=st.integers(1, 100), local=pos, sink=small),
        st.builds(
            fi.VerticalSlashStatic,
            columns=st.lists(st.integers(0, 1500), max_size=20).map(tuple),
            diagonals=st.lists(st.integers(0, 1500), max_size=20).map(tuple),
        ),
    )


def dynamic_patterns():
    return st.one_of(
        st.builds(
            fi.VerticalSlash,
            vertical=st.integers(0, 300),
            slash=st.integers(1, 300),
            last_q=st.integers(1, 80),
            keep_first_columns=st.integers(0, 40),
            keep_nearest_diagonals=st.integers(0, 40),
        ),
        st.builds(fi.BlockTopK, block=st.sampled_from([32, 64, 128, 256]), topk=st.integers(1, 12)),
        flexprefill(),
        xattention(),
    )


def flexprefill():
    return st.builds(
        fi.FlexPrefill,
        gamma=st.floats(0.05, 1.0),
        tau=st.floats(0.0, 1.0),
        block=st.sampled_from([32, 64, 128]),
        last_q=st.integers(1, 130),
        min_budget=st.integers(1, 3),
        min_len=st.integers(0, 300),
    )


def xattention():
    return st.builds(
        fi.XAttention,
        stride=st.sampled_from([4, 8, 16]),
        threshold=st.floats(0.05, 1.0),
        block=st.sampled_from([32, 64, 128]),
    )
