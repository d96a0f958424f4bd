"""torch.compile: no graph break in the attention function (either path), and what recompiles.

Guarantees on torch <= 2.13, stated by these tests at the dynamo level (backend "eager"/counting, so no
inductor time on this CPU):

* the attention function traces with ``fullgraph=True`` on the dense and the sparse path;
* dense path (decode, prompts below ``min_sparse_len``): one graph for every length once the sequence
  dimension is dynamic;
* sparse path: one more graph when lengths cross ``min_sparse_len``, then at most one per 128-token
  bucket of the key length (the keep tables are padded to the kernel block). On the GPU, inductor's
  flex_attention additionally specialises on the length in torch <= 2.13 (FLEX_NOTES.md);
* the whole patched model compiles into one graph when the cache is created outside the compiled call
  (``generate`` does); a ``DynamicCache`` created inside a compiled forward before ``flex_attention``
  breaks the graph (a dynamo issue that transformers' own ``flex_attention`` path shows as well).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter
from transformers import DynamicCache

import flexinference as fi
from flexinference.patching import apply, attention_modules
from flexinference.hf_attention import flexinference_attention

from .helpers import cache_kw, make_model

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

PATTERNS = {
    "a_shape": fi.AShape(sink=4, local=16),
    "mixed_static": [fi.AShape(4, 16), fi.Dense(), fi.TriShape(4, 16, 8), fi.Dilated(sink=4, band=4, span=32)],
    "vertical_slash": fi.VerticalSlash(vertical=8, slash=16, last_q=8),
    "block_topk": fi.BlockTopK(block=16, topk=2),
}


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _qkv(s_q: int, s_kv: int | None = None, batch: int = 1):
    s_kv = s_q if s_kv is None else s_kv
    g = torch.Generator().manual_seed(s_q * 1000 + s_kv)
    q = torch.randn(batch, 4, s_q, 16, generator=g)
    k = torch.randn(batch, 2, s_kv, 16, generator=g)
    v = torch.randn(batch, 2, s_kv, 16, generator=g)
    return q, k, v


def _padded_mask(batch: int, s_q: int, s_kv: int, pad: int) -> torch.Tensor:
    mask = torch.ones(s_q, s_kv, dtype=torch.bool).tril(s_kv - s_q)[None, None].repeat(batch, 1, 1, 1)
    mask[-1, ..., :pad] = False
    return mask


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_attention_function_fullgraph_both_paths(name):
    model = apply(make_model("llama"), PATTERNS[name], min_sparse_len=32)
    module = attention_modules(model)[0]
    compiled = torch.compile(flexinference_attention, fullgraph=True, backend="eager")
    # A left-padded batch on the sparse path reads where each row's padding ends (a host read), so it is
    # the one case compiled with a graph break (fullgraph=False); every other call is one graph.
    padded = torch.compile(flexinference_attention, backend="eager")
    cases = [(16, 16, None), (48, 48, None), (40, 64, _padded_mask(2, 40, 64, pad=7)), (1, 50, None)]
    with torch.no_grad():
        for s_q, s_kv, mask in cases:
            q, k, v = _qkv(s_q, s_kv, batch=1 if mask is None else 2)
            fn = padded if (mask is not None and s_q >= 32) else compiled
            out, _ = fn(module, q, k, v, mask, scaling=0.25)
            expected, _ = flexinference_attention(module, q, k, v, mask, scaling=0.25)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def _count_frames(module, lengths) -> int:
    counter = CompileCounter()
    fn = torch.compile(flexinference_attention, fullgraph=True, backend=counter)
    with torch.no_grad():
        for s in lengths:
            q, k, v = _qkv(s)
            for t in (q, k, v):
                torch._dynamo.mark_dynamic(t, 2)
            fn(module, q, k, v, None, scaling=0.25)
    return counter.frame_count


def test_dense_path_one_graph_for_all_lengths():
    model = apply(make_model("llama"), fi.AShape(sink=4, local=16), min_sparse_len=64)
    assert _count_frames(attention_modules(model)[0], [5, 9, 16, 23, 40, 63]) == 1


@pytest.mark.parametrize("name", ["a_shape", "vertical_slash"])
def test_sparse_path_recompiles_at_most_once_per_128_bucket(name):
    model = apply(make_model("llama"), PATTERNS[name], min_sparse_len=32)
    module = attention_modules(model)[0]
    # dense lengths, then sparse lengths inside the first 128-token bucket: one graph each side
    assert _count_frames(module, [8, 16, 24, 40, 57, 77, 100, 128]) == 2
    torch._dynamo.reset()
    lengths = [40, 90, 130, 200, 256, 300]
    buckets = {-(-s // 128) for s in lengths}
    assert _count_frames(module, lengths) <= len(buckets)


@pytest.mark.parametrize("pattern", [fi.Dense(), fi.AShape(sink=4, local=16)], ids=["dense", "a_shape"])
def test_model_compiles_without_graph_breaks(pattern):
    model = apply(make_model("llama"), pattern, min_sparse_len=32)
    ids = torch.randint(3, 128, (1, 48))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        explanation = torch._dynamo.explain(model)(input_ids=ids, **cache_kw(model, DynamicCache(config=model.config)))
        assert explanation.graph_break_count == 0, explanation.break_reasons
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        out = compiled(input_ids=ids, **cache_kw(model, DynamicCache(config=model.config))).logits
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_model_recompiles_over_prompt_lengths():
    # Prompts of several lengths inside one 128-token bucket on the sparse path: one graph. Decode steps
    # (dense path) after it: one more graph for all cache lengths.
    model = apply(make_model("llama"), fi.AShape(sink=4, local=16), min_sparse_len=32)
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with torch.no_grad():
        for length in (40, 57, 77, 100):
            ids = torch.randint(3, 128, (1, length))
            torch._dynamo.mark_dynamic(ids, 1)
            cache = DynamicCache(config=model.config)
            compiled(input_ids=ids, **cache_kw(model, cache))
        prefill_graphs = counter.frame_count
        for _ in range(3):
            compiled(input_ids=torch.tensor([[5]]), **cache_kw(model, cache))
    assert prefill_graphs == 1
    assert counter.frame_count <= prefill_graphs + 2  # decode: static first step, then one dynamic graph
