"""torch.compile stability of the sparse attention call: one graph, no break, no recompiles."""

import torch
from torch._dynamo.utils import counters

import flexinference as fi
from flexinference.attention import Impl, sparse_attention

PATTERNS = [fi.AShape(4, 32), fi.VerticalSlash(20, 30, 16), fi.BlockTopK(64, 3), fi.Dense()]


def test_no_graph_break_and_no_recompile_across_lengths_and_indices():
    """fullgraph=True proves there is no graph break; with dynamic shapes, new lengths (query and key)
    and new index values (different inputs -> different estimated columns/blocks) reuse one graph.

    The backend is aot_eager: dynamo's tracing and guards are what is under test; Inductor codegen for
    flex on CPU adds minutes and is exercised by the GPU tests. On torch <= 2.13 Inductor's flex kernel
    itself may still specialise on length (FLEX_NOTES.md), which the GPU tests report."""
    torch._dynamo.reset()
    counters.clear()

    def attend(q, k, v):
        return sparse_attention(q, k, v, PATTERNS, impl=Impl.FLEX_EAGER)

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True, dynamic=True)
    # Guarantee on these versions: every length with more than one 128-query block shares the graph
    # (a single-block query length is a size-1 dimension dynamo specialises once more).
    # The first call has S_q != S_kv so dynamo gives them separate symbols (duck sizing would tie them).
    for seed, (sq, skv) in enumerate([(180, 200), (333, 333), (517, 517), (300, 650), (701, 701)]):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(1, 4, sq, 64, generator=g)
        k = torch.randn(1, 2, skv, 64, generator=g)
        v = torch.randn(1, 2, skv, 64, generator=g)
        out = compiled(q, k, v)
        ref = sparse_attention(q, k, v, PATTERNS, impl=Impl.REFERENCE)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
