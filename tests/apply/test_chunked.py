"""Chunked prefill (``prefill_chunk_size``): each chunk is a prefill on top of the cache."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import flexinference as fi
from flexinference.patching import apply, attention_modules

from .helpers import (
    assert_close_on_real,
    cache_kw,
    cycle_heads,
    inputs,
    make_model,
    reference_model,
)

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

KEEP_ALL = [fi.AShape(sink=0, local=10**6), fi.VerticalSlash(vertical=10**6, slash=10**6, last_q=8)]
SPARSE = [
    fi.AShape(sink=2, local=8),
    fi.VerticalSlash(vertical=4, slash=6, last_q=8, keep_first_columns=2, keep_nearest_diagonals=3),
    fi.BlockTopK(block=16, topk=2),
    fi.TriShape(sink=2, local=6, last=4),
]


def record_chunk_lengths(model) -> list[int]:
    """Query lengths of every call into the base model (a forward pre-hook)."""
    lengths: list[int] = []

    def hook(module, args, kwargs):
        x = kwargs.get("input_ids")
        lengths.append((x if x is not None else kwargs["inputs_embeds"]).shape[1])

    model.model.register_forward_pre_hook(hook, with_kwargs=True)
    return lengths


def record_attention_masks(model) -> list:
    """The ``attention_mask`` each attention module receives (``None`` or its shape)."""
    seen: list = []

    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        seen.append(None if mask is None else tuple(mask.shape))

    for m in attention_modules(model):
        m.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_chunked_keep_all_equals_unchunked_and_unpatched(family):
    model = make_model(family)
    ids, mask = inputs(2, 70, (0, 7))
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        apply(model, cycle_heads(KEEP_ALL, 4), min_sparse_len=8)
        whole = model(input_ids=ids, attention_mask=mask).logits
        apply(model, cycle_heads(KEEP_ALL, 4), min_sparse_len=8, prefill_chunk_size=16)
        chunked = model(input_ids=ids, attention_mask=mask).logits
    assert chunked.shape == expected.shape
    assert_close_on_real(whole, expected, mask)
    assert_close_on_real(chunked, expected, mask)


def test_chunked_sparse_equals_reference_fed_chunk_by_chunk():
    # The reference model receives the same chunks by hand through a DynamicCache: each chunk's attention
    # keeps exactly its patterns' set over cache + chunk.
    model = make_model("llama")
    ids, mask = inputs(2, 75, (0, 6))
    patterns, chunk = cycle_heads(SPARSE, 4), 20
    ref = reference_model(model, patterns, min_sparse_len=8)
    apply(model, patterns, min_sparse_len=8, prefill_chunk_size=chunk)
    lengths = record_chunk_lengths(model)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
        cache, pieces = DynamicCache(config=ref.config), []
        for s in range(0, ids.shape[1], chunk):
            e = min(s + chunk, ids.shape[1])
            pieces.append(ref(input_ids=ids[:, s:e], attention_mask=mask[:, :e], **cache_kw(ref, cache)).logits)
        expected = torch.cat(pieces, dim=1)
    assert lengths == [20, 20, 20, 15]
    assert_close_on_real(out, expected, mask)


def test_positional_input_ids_and_last_logits_only():
    model = make_model("llama")
    ids, _ = inputs(1, 50)
    apply(model, fi.AShape(sink=2, local=8), min_sparse_len=8, prefill_chunk_size=16)
    lengths = record_chunk_lengths(model)
    with torch.no_grad():
        out = model(ids, logits_to_keep=1)
    assert lengths == [16, 16, 16, 2]
    assert out.logits.shape == (1, 1, model.config.vocab_size)


def test_logits_to_keep_and_tuple_output():
    model = make_model("llama")
    ids, mask = inputs(2, 45, (0, 3))
    with torch.no_grad():
        unpatched = model(input_ids=ids, attention_mask=mask).logits
    apply(model, fi.Dense(), prefill_chunk_size=16)  # the slicing logic does not depend on the pattern
    masks = record_attention_masks(model)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        assert masks[:2] == [(2, 1, 16, 16)] * 2 and masks[-1] == (2, 1, 13, 45)  # padded: real masks
        assert_close_on_real(full, unpatched, mask)
        for keep in (1, 5, 17, 40):
            tail = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
            assert tail.shape[1] == keep
            torch.testing.assert_close(tail, full[:, -keep:], atol=1e-5, rtol=0)
        as_tuple = model(input_ids=ids, attention_mask=mask, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], full, atol=1e-5, rtol=0)


def test_chunked_prefill_then_cache_continues():
    # Unpadded dense chunks on top of the cache get no mask (causal, queries last); the cache filled chunk
    # by chunk serves the next step like one filled at once.
    model = make_model("llama")
    ids, _ = inputs(1, 40)
    nxt = torch.tensor([[7]])
    with torch.no_grad():
        c0 = DynamicCache(config=model.config)
        whole = model(input_ids=ids, **cache_kw(model, c0)).logits
        expected = model(input_ids=nxt, **cache_kw(model, c0)).logits
        apply(model, fi.Dense(), prefill_chunk_size=12)
        masks = record_attention_masks(model)
        c1 = DynamicCache(config=model.config)
        chunked = model(input_ids=ids, past_key_values=c1).logits  # the pre-5.20 name works on every version
        assert c1.get_seq_length() == 40
        assert masks == [None] * 8  # 4 chunks x 2 layers: no (B, 1, S_q, S_kv) mask was built
        torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(input_ids=nxt, **cache_kw(model, c1)).logits, expected, atol=1e-5, rtol=0)


def test_generate_chunked_keep_all_equals_unpatched():
    model = make_model("qwen2")
    ids, mask = inputs(2, 50, (0, 4))
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **kw)
    apply(model, cycle_heads(KEEP_ALL, 4), min_sparse_len=8, prefill_chunk_size=16)
    assert torch.equal(model.generate(ids, **kw), expected)


def test_chunked_rejects_unsupported_arguments():
    model = make_model("llama")
    ids, _ = inputs(1, 40)
    apply(model, fi.Dense(), prefill_chunk_size=16)
    with torch.no_grad():
        with pytest.raises(ValueError, match="output_hidden_states"):
            model(input_ids=ids, output_hidden_states=True)
        with pytest.raises(ValueError, match="labels"):
            model(input_ids=ids, labels=ids)
        with pytest.raises(ValueError, match="integer logits_to_keep"):
            model(input_ids=ids, logits_to_keep=torch.tensor([0, 1]))
        with pytest.raises(TypeError, match="multiple values"):
            model(ids, input_ids=ids)


def test_compiled_model_with_chunked_prefill_keeps_every_chunk():
    """Regression: traced in one dynamo frame, the chunk loop lost cache updates next to flex_attention."""
    model = make_model("llama")
    ids, _ = inputs(1, 64)
    with torch.no_grad():
        expected = model(ids).logits
        apply(model, fi.Dense(), prefill_chunk_size=32)
        cache = DynamicCache(config=model.config)
        torch._dynamo.reset()
        out = torch.compile(model, backend="eager")(ids, **cache_kw(model, cache)).logits
        torch._dynamo.reset()
    assert [layer.keys.shape[2] for layer in cache.layers] == [64] * len(cache.layers)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
