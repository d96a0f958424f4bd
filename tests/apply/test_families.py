"""Every supported family, tiny and random: patched logits and generations against the unpatched model
(patterns that keep everything) and against the reference model (sparse patterns)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexinference as fi
from flexinference.patching import apply, attention_modules, remove
from flexinference.hf_attention import PLAN_ATTR

from .helpers import (
    FAMILIES,
    assert_close_on_real,
    cycle_heads,
    inputs,
    make_model,
    patched_and_reference,
)

KEEP_ALL = [
    fi.AShape(sink=0, local=10**6),
    fi.VerticalSlash(vertical=10**6, slash=10**6, last_q=8),
    fi.BlockTopK(block=16, topk=10**6),
    fi.TriShape(sink=0, local=1, last=10**6),
]
SPARSE = [
    fi.AShape(sink=2, local=8),
    fi.VerticalSlash(vertical=4, slash=6, last_q=8, keep_first_columns=2, keep_nearest_diagonals=3),
    fi.BlockTopK(block=16, topk=2),
    fi.TriShape(sink=2, local=6, last=4),
]
PAD = (0, 5)  # row 1 is left-padded


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dense_and_keep_all_equal_unpatched(family):
    model = make_model(family)
    ids, mask = inputs(2, 40, PAD)
    heads = model.config.num_attention_heads
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        apply(model, fi.Dense())
        assert all(not getattr(m, PLAN_ATTR).sparse for m in attention_modules(model))
        assert_close_on_real(model(input_ids=ids, attention_mask=mask).logits, expected, mask)
        apply(model, cycle_heads(KEEP_ALL, heads), min_sparse_len=16)  # sparse path, nothing dropped
        assert_close_on_real(model(input_ids=ids, attention_mask=mask).logits, expected, mask)
        remove(model)
        assert_close_on_real(model(input_ids=ids, attention_mask=mask).logits, expected, mask)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sparse_equals_reference(family):
    model = make_model(family)
    ids, mask = inputs(2, 48, PAD)
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask).logits
        patterns = cycle_heads(SPARSE, model.config.num_attention_heads)
        model, ref = patched_and_reference(model, patterns, min_sparse_len=16)
        out = model(input_ids=ids, attention_mask=mask).logits
        assert_close_on_real(out, ref(input_ids=ids, attention_mask=mask).logits, mask)
    # the patterns really dropped something: the result is not dense attention's
    assert (out - dense)[mask.bool()].abs().max() > 1e-3


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_equals_reference(family):
    model = make_model(family)
    ids, mask = inputs(2, 40, PAD, seed=2)
    patterns = cycle_heads(SPARSE, model.config.num_attention_heads)
    model, ref = patched_and_reference(model, patterns, min_sparse_len=16)
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    out = model.generate(ids, **kw)
    assert torch.equal(out, ref.generate(ids, **kw))


def test_short_prompt_and_decode_are_dense():
    # Below min_sparse_len the patched model is the unpatched one, whatever the patterns say.
    model = make_model("llama")
    ids, mask = inputs(2, 30, PAD)
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected_logits = model(input_ids=ids, attention_mask=mask).logits
    expected = model.generate(ids, **kw)
    apply(model, fi.AShape(sink=1, local=2), min_sparse_len=31)
    with torch.no_grad():
        assert_close_on_real(model(input_ids=ids, attention_mask=mask).logits, expected_logits, mask)
    assert torch.equal(model.generate(ids, **kw), expected)


static_pattern = st.one_of(
    st.just(fi.Dense()),
    st.builds(fi.AShape, sink=st.integers(0, 8), local=st.integers(1, 24)),
    st.builds(fi.TriShape, sink=st.integers(0, 8), local=st.integers(1, 24), last=st.integers(0, 12)),
    st.builds(fi.Dilated, sink=st.integers(0, 8), band=st.integers(0, 8), span=st.integers(0, 40),
              dilation=st.integers(1, 4)),
    st.builds(fi.Strided, stride=st.integers(1, 9), local=st.integers(1, 12), sink=st.integers(0, 4)),
)


@settings(max_examples=8, deadline=None)
@given(
    patterns=st.lists(static_pattern, min_size=4, max_size=4),
    length=st.integers(17, 70),
    pad=st.integers(0, 9),
    min_sparse_len=st.sampled_from([1, 16]),
)
def test_property_static_patterns_equal_brute_force_reference(patterns, length, pad, min_sparse_len):
    # Static heads are checked against an independent token rule (helpers.brute_keep), not the tables.
    model = make_model("llama")
    ids, mask = inputs(2, length, (0, pad))
    with torch.no_grad():
        model, ref = patched_and_reference(model, patterns, min_sparse_len=min_sparse_len)
        out = model(input_ids=ids, attention_mask=mask).logits
        assert_close_on_real(out, ref(input_ids=ids, attention_mask=mask).logits, mask)
