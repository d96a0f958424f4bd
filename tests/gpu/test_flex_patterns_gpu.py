"""Compiled ``flex_attention`` (block sparsity honoured) against the exact reference, bf16, every pattern.

Runs only with CUDA (``pytest -m gpu``). Each pattern's tables are estimated once; the plain BlockMask
path and, where a head keeps columns, the gathered-verticals path are checked on 256 random query rows
against fp32 attention restricted to exactly the tables' keep set.
"""

from __future__ import annotations

import pytest
import torch
from flexinference.masks.block_mask import block_mask_from_tables

from flexinference.bench_cases import reference_rows
from flexinference.compose import build_tables
from flexinference.attention import compiled_flex
from flexinference.gathered import gathered_attention
from flexinference.patterns import (
    AShape,
    BlockTopK,
    Dense,
    Dilated,
    FlexPrefill,
    Strided,
    TriShape,
    VerticalSlash,
    VerticalSlashStatic,
    XAttention,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BF16_REL = 2e-2
HEADS, KV_HEADS, DIM = 8, 2, 128
PATTERNS = [
    Dense(),
    AShape(sink=128, local=1024),
    TriShape(sink=64, local=1024, last=100),
    VerticalSlash(vertical=500, slash=1000),
    VerticalSlashStatic(columns=(0, 7, 999, 20000, 30001), diagonals=(0, 1, 2, 300, 5000)),
    BlockTopK(block=64, topk=20),
    Dilated.dilated2(),
    Strided(stride=64, local=512, sink=4),
    FlexPrefill(),
    XAttention(),
]
CASES = [(p, 32768) for p in PATTERNS] + [(VerticalSlash(vertical=300, slash=700), 5000),
                                          (BlockTopK(block=64, topk=8), 5000)]


def _inputs(seq_len: int):
    g = torch.Generator().manual_seed(seq_len)
    q = torch.randn(1, HEADS, seq_len, DIM, generator=g).to("cuda", torch.bfloat16)
    k = torch.randn(1, KV_HEADS, seq_len, DIM, generator=g).to("cuda", torch.bfloat16)
    v = torch.randn(1, KV_HEADS, seq_len, DIM, generator=g).to("cuda", torch.bfloat16)
    return q, k, v


def _rel_err(out, q, k, v, tables, scale) -> float:
    rows = torch.randperm(q.shape[2], generator=torch.Generator().manual_seed(1))[:256]
    ref = reference_rows(q, k, v, tables, rows, scale)
    got = out[:, :, rows.to(out.device)].float()
    assert torch.isfinite(got).all()
    return float((got - ref).norm() / ref.norm())


@pytest.mark.parametrize("pattern,seq_len", CASES, ids=lambda x: type(x).__name__ if not isinstance(x, int) else str(x))
def test_compiled_flex_matches_reference(pattern, seq_len):
    q, k, v = _inputs(seq_len)
    scale = DIM**-0.5
    try:
        tables = build_tables(q, k, [pattern] * HEADS, scale=scale)
    except (ImportError, NotImplementedError) as exc:  # estimator of another issue not there yet
        pytest.skip(f"{type(pattern).__name__} tables unavailable: {exc}")
    with torch._dynamo.config.patch(recompile_limit=64):
        out = compiled_flex()(q, k, v, block_mask=block_mask_from_tables(tables), scale=scale, enable_gqa=True)
        assert _rel_err(out, q, k, v, tables, scale) < BF16_REL
        if bool(tables.columns.any()):
            out = gathered_attention(q, k, v, tables, scale=scale, compiled=True)
            assert _rel_err(out, q, k, v, tables, scale) < BF16_REL
