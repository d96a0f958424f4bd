"""Sparse Triton prefill kernel (MInference layout) against its pure-PyTorch reference and the project's
dense keep rule.

Triton decides interpretation when a kernel is decorated, so the kernel tests (``test_interp_*``) run in a
child pytest with ``TRITON_INTERPRET=1`` started by :func:`test_interpreted_suite`; in this process they
are skipped and nothing global is changed. Index-builder, reference and validation tests run here.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexinference.bench_cases import regime_indices, tables_from_indices
from flexinference.compose import build_tables
from flexinference.kernels.index_build import SparseIndex, block_topk_index, vertical_slash_index
from flexinference.kernels.sparse_reference import keep_weight, sparse_attention_reference
from flexinference.masks.block_sparse import dense_mask as block_dense_mask
from flexinference.masks.tables import dense_keep
from flexinference.patterns import VerticalSlash
from flexinference.testing.reference import reference_attention
from tests.kernels.interpreted import interp, run_interpreted_child



def _qkv(b, hq, hkv, s, d, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g).to(device=device, dtype=dtype) for h in (hq, hkv, hkv)]


def _random_vs(heads, s, seed, nv=12, ns=3, batch=None):
    """Columns ``(B?, H, nv)`` and offsets: a random-width band of nearest diagonals plus ``ns`` random ones
    (entries out of range included: the builders ignore them), so full blocks, partial blocks and
    surviving columns all occur."""
    g = torch.Generator().manual_seed(seed)
    lead = (heads,) if batch is None else (batch, heads)
    band = torch.arange(100).expand(*lead, -1)
    band = torch.where(band < torch.randint(1, 100, (*lead, 1), generator=g), band, -1)
    far = torch.randint(-2, s + 3, (*lead, ns), generator=g)
    return torch.randint(-2, s + 3, (*lead, nv), generator=g), torch.cat([band, far], -1)


# ---------------------------------------------------------------- builders and reference (this process)


@settings(max_examples=60, deadline=None)
@given(s=st.integers(1, 300), seed=st.integers(0, 2**16), cfg=st.sampled_from([(64, 64), (128, 64), (32, 16)]),
       band=st.booleans())
def test_vertical_slash_index_is_exactly_the_dense_rule(s, seed, cfg, band):
    cols, offs = _random_vs(3, s, seed, nv=12, ns=10)
    offs = offs if band else offs[..., 100:]  # with a band of nearest diagonals, or random offsets only
    index = vertical_slash_index(cols, offs, s, block_m=cfg[0], block_n=cfg[1])
    index.check()  # no key listed twice for a query block
    rows = torch.arange(s)
    want = dense_keep(tables_from_indices(cols.masked_fill(cols >= s, -1), offs.masked_fill(offs >= s, -1), s))
    exact = keep_weight(index, rows, exact=True)
    superset = keep_weight(index, rows, exact=False)
    assert torch.equal(exact, want.to(torch.int32))
    assert int(superset.max()) <= 1 and bool((superset >= exact).all())
    # The superset is the union of whole slash blocks: every kept block of a row is listed whole.
    assert bool((superset.bool() | ~want).all())


@pytest.mark.parametrize("regime", ["banded", "band_far", "scattered"])
def test_vertical_slash_index_on_benchmark_regimes(regime):
    s = 1500
    cols, offs = regime_indices(regime, s, torch.tensor([100, 20]), torch.tensor([300, 50]), seed=1)
    want = dense_keep(tables_from_indices(cols, offs, s)).to(torch.int32)
    for bm, bn in ((64, 64), (128, 64)):
        index = vertical_slash_index(cols, offs, s, block_m=bm, block_n=bn)
        assert torch.equal(keep_weight(index, torch.arange(s)), want)
        assert int(index.column_count.max()) > 0 and int(index.full_count.max()) > 0


def test_vertical_slash_index_from_estimated_tables_batched():
    q, k, _ = _qkv(2, 4, 2, 300, 32, seed=3)
    pat = VerticalSlash(vertical=20, slash=40, last_q=16, keep_first_columns=4, keep_nearest_diagonals=8)
    tables = build_tables(q, k, [pat] * 4, scale=32**-0.5)
    index = vertical_slash_index(tables.columns, tables.diagonals, 300)
    assert index.batch == 2
    index.check()
    assert torch.equal(keep_weight(index, torch.arange(300)).bool(), dense_keep(tables))


@settings(max_examples=30, deadline=None)
@given(s=st.integers(1, 400), seed=st.integers(0, 2**16), cfg=st.sampled_from([(64, 64, 64), (64, 64, 128), (64, 32, 128), (128, 64, 128)]))
def test_block_topk_index_is_exactly_the_cells(s, seed, cfg):
    bm, bn, block = cfg
    nb = -(-s // block)
    g = torch.Generator().manual_seed(seed)
    cells = torch.rand(2, 3, nb, nb, generator=g) < 0.3
    index = block_topk_index(cells, s, block=block, block_m=bm, block_n=bn)
    index.check()
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    want = block_dense_mask((cells & causal) | torch.eye(nb, dtype=torch.bool), block, s, s)
    assert torch.equal(keep_weight(index, torch.arange(s)), want.to(torch.int32))
    # Integer ids give the same index.
    ids = torch.where(cells, torch.arange(nb), -1)
    same = block_topk_index(ids, s, block=block, block_m=bm, block_n=bn)
    assert torch.equal(keep_weight(same, torch.arange(s)), want.to(torch.int32))


def test_reference_matches_project_reference_and_counts_duplicates():
    q, k, v = _qkv(2, 4, 2, 130, 32, dtype=torch.float64)
    cols, offs = _random_vs(4, 130, 5)
    index = vertical_slash_index(cols, offs, 130)
    keep = dense_keep(tables_from_indices(cols.masked_fill(cols >= 130, -1), offs.masked_fill(offs >= 130, -1), 130))
    torch.testing.assert_close(sparse_attention_reference(q, k, v, index), reference_attention(q, k, v, keep))
    # A key listed twice weighs twice (what the kernel would do): equal to duplicating it by hand.
    dup = SparseIndex(
        block_count=torch.ones(1, 4, 1, dtype=torch.int32), block_index=torch.zeros(1, 4, 1, 1, dtype=torch.int32),
        column_count=torch.ones(1, 4, 1, dtype=torch.int32), column_index=torch.zeros(1, 4, 1, 1, dtype=torch.int32),
        seq_len=3,
    )
    with pytest.raises(ValueError, match="more than once"):
        dup.check()
    q3, k3, v3 = q[:, :, :3], k[:, :, :3], v[:, :, :3]
    out = sparse_attention_reference(q3, k3, v3, dup)
    k4, v4 = torch.cat([k3[:, :, :1], k3], 2), torch.cat([v3[:, :, :1], v3], 2)
    keep4 = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(out, reference_attention(q3, k4, v4, keep4))


def test_reference_empty_rows_are_zero():
    q, k, v = _qkv(1, 2, 1, 70, 32)
    z = torch.zeros(1, 2, 2, dtype=torch.int32)
    empty = SparseIndex(z, torch.zeros(1, 2, 2, 1, dtype=torch.int32), z, torch.zeros(1, 2, 2, 1, dtype=torch.int32), 70)
    out, lse = sparse_attention_reference(q, k, v, empty, return_lse=True)
    assert bool((out == 0).all()) and bool(torch.isinf(lse).all())


def _index_kwargs():
    z3 = torch.zeros(1, 2, 2, dtype=torch.int32)
    z4 = torch.zeros(1, 2, 2, 3, dtype=torch.int32)
    return dict(block_count=z3, block_index=z4, column_count=z3, column_index=z4, seq_len=100)


@pytest.mark.parametrize("change, match", [
    (dict(block_count=torch.zeros(1, 2, 2)), "block_count"),
    (dict(block_index=torch.zeros(1, 2, 2, 3, dtype=torch.int64)), "block_index"),
    (dict(column_index=torch.zeros(1, 2, 3, 3, dtype=torch.int32)), "column_index"),
    (dict(seq_len=200), "query blocks"),
    (dict(block_m=48), "block_m"),
    (dict(full_count=torch.zeros(1, 2, 2, dtype=torch.int32)), "together"),
    (dict(full_count=torch.zeros(1, 2, 2, dtype=torch.int32), diag_keep=torch.zeros(1, 2, 99, dtype=torch.bool),
          col_keep=torch.zeros(1, 2, 100, dtype=torch.bool)), "diag_keep"),
    (dict(full_count=torch.zeros(1, 2, 2, dtype=torch.int32), diag_keep=torch.zeros(1, 2, 100),
          col_keep=torch.zeros(1, 2, 100, dtype=torch.bool)), "diag_keep"),
])
def test_index_validation(change, match):
    with pytest.raises(ValueError, match=match):
        SparseIndex(**{**_index_kwargs(), **change})


def test_index_check_catches_out_of_range_entries():
    kw = _index_kwargs()
    with pytest.raises(ValueError, match="block_index"):
        SparseIndex(**{**kw, "block_count": torch.ones(1, 2, 2, dtype=torch.int32),
                       "block_index": torch.full((1, 2, 2, 3), 7, dtype=torch.int32)}).check()
    with pytest.raises(ValueError, match="column_count"):
        SparseIndex(**{**kw, "column_count": torch.full((1, 2, 2), 4, dtype=torch.int32)}).check()


def test_builder_validation():
    cols, offs = _random_vs(2, 100, 0)
    with pytest.raises(ValueError, match="block_m"):
        vertical_slash_index(cols, offs, 100, block_m=32, block_n=64)
    with pytest.raises(ValueError, match="columns"):
        vertical_slash_index(cols.float(), offs, 100)
    with pytest.raises(ValueError, match="diagonals"):
        vertical_slash_index(cols, torch.zeros(2, 50, dtype=torch.bool), 100)
    with pytest.raises(ValueError, match="heads"):
        vertical_slash_index(cols, offs[:1], 100)
    with pytest.raises(ValueError, match="block"):
        block_topk_index(torch.ones(2, 2, 2, dtype=torch.bool), 100, block=96)
    with pytest.raises(ValueError, match="blocks"):
        block_topk_index(torch.ones(2, 1, 1, dtype=torch.bool), 100, block=64)


def test_launcher_validation():
    pytest.importorskip("triton")
    from flexinference.kernels.sparse_triton import sparse_attention

    q, k, v = _qkv(1, 4, 2, 100, 64)
    index = vertical_slash_index(*_random_vs(4, 100, 0), 100)
    cases = [
        ((q, k, v[:, :1]), {}, "k and v"),
        ((q, torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1)), {}, "multiple"),
        ((q, k.half(), v), {}, "share a dtype"),
        ((q.double(), k.double(), v.double()), {}, "q must be"),
        ((q[..., :48], k[..., :48], v[..., :48]), {}, "head dim"),
        ((q[:, :, :99], k[:, :, :99], v[:, :, :99]), {}, "seq_len"),
        ((q[:, :2], k, v), {}, "heads"),
        ((q, k, v), {"num_warps": 0}, "num_warps"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            sparse_attention(*args, index, **kwargs)
    with pytest.raises(ValueError, match="index"):
        sparse_attention(q, k, v, "index")


def test_interpreted_suite():
    """Runs every ``test_interp_*`` below in a child pytest under ``TRITON_INTERPRET=1``."""
    run_interpreted_child(__file__)


# ---------------------------------------------------------------- kernel under the interpreter (child)


def _check(q, k, v, index, *, atol, exact=True, scale=None, **kw):
    pytest.importorskip("triton")
    from flexinference.kernels.sparse_triton import sparse_attention

    out, lse = sparse_attention(q, k, v, index, exact=exact, scale=scale, return_lse=True, **kw)
    ref, ref_lse = sparse_attention_reference(q, k, v, index, exact=exact, scale=scale, return_lse=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=atol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=atol, rtol=atol)
    return out


@interp
@pytest.mark.parametrize("s", [1, 63, 64, 65, 200, 257])
@pytest.mark.parametrize("ratio", [1, 2, 4])
def test_interp_vertical_slash_both_modes(s, ratio):
    q, k, v = _qkv(2, 4, 4 // ratio, s, 64, seed=s + ratio)
    cols, offs = _random_vs(4, s, seed=s * ratio, batch=2)
    index = vertical_slash_index(cols, offs, s)
    exact = _check(q, k, v, index, atol=1e-5, exact=True)
    _check(q, k, v, index, atol=1e-5, exact=False)
    # The exact kernel equals the project's reference on the dense keep rule (batch-1 tables per batch).
    for b in range(2):
        keep = dense_keep(tables_from_indices(cols[b].masked_fill(cols[b] >= s, -1), offs[b].masked_fill(offs[b] >= s, -1), s))
        torch.testing.assert_close(exact[b : b + 1].double(), reference_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], keep),
                                   atol=1e-5, rtol=1e-5)


@interp
@pytest.mark.parametrize("s, block, cfg", [(200, 64, (64, 64)), (257, 128, (128, 64)), (300, 128, (64, 32))])
def test_interp_block_topk(s, block, cfg):
    q, k, v = _qkv(2, 4, 2, s, 64, seed=s)
    nb = -(-s // block)
    cells = torch.rand(2, 4, nb, nb, generator=torch.Generator().manual_seed(s)) < 0.4
    index = block_topk_index(cells, s, block=block, block_m=cfg[0], block_n=cfg[1])
    out = _check(q, k, v, index, atol=1e-5, num_warps=8)
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    keep = block_dense_mask((cells & causal) | torch.eye(nb, dtype=torch.bool), block, s, s)[:, :]
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, keep), atol=1e-5, rtol=1e-5)


@interp
@pytest.mark.parametrize("dtype, d, cfg", [(torch.bfloat16, 64, (64, 64)), (torch.float16, 128, (128, 64)),
                                           (torch.float32, 32, (32, 16))])
def test_interp_dtypes_head_dims_tiles(dtype, d, cfg):
    s = 150
    q, k, v = _qkv(1, 4, 2, s, d, dtype=dtype, seed=d)
    index = vertical_slash_index(*_random_vs(4, s, seed=d, nv=20, ns=20), s, block_m=cfg[0], block_n=cfg[1])
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    _check(q, k, v, index, atol=atol)
    _check(q, k, v, index, atol=atol, exact=False)


@interp
def test_interp_strided_inputs_broadcast_index_scale_and_empty_rows():
    s = 130
    g = torch.Generator().manual_seed(1)
    # (B, S, H, D) layouts transposed to (B, H, S, D): non-contiguous head/sequence strides.
    q = torch.randn(2, s, 4, 64, generator=g).transpose(1, 2)
    k, v = (torch.randn(2, s, 2, 64, generator=g).transpose(1, 2) for _ in range(2))
    index = vertical_slash_index(*_random_vs(4, s, 9), s)  # batch 1, broadcast over B = 2
    _check(q, k, v, index, atol=1e-5, scale=0.3)
    # Rows with no kept key: query block 1 lists nothing, its rows return 0 and lse -inf.
    empty = SparseIndex(
        block_count=torch.tensor([[[1, 0, 1]]], dtype=torch.int32).expand(1, 4, 3).contiguous(),
        block_index=torch.tensor([[[[0], [0], [2]]]], dtype=torch.int32).expand(1, 4, 3, 1).contiguous(),
        column_count=torch.zeros(1, 4, 3, dtype=torch.int32),
        column_index=torch.zeros(1, 4, 3, 1, dtype=torch.int32),
        seq_len=s,
    )
    out = _check(q, k, v, empty, atol=1e-5)
    assert bool((out[:, :, 64:128] == 0).all())


# ---------------------------------------------------------------- compiled kernel on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("cfg", [(64, 64, 4, 3), (128, 64, 8, 3)])
def test_gpu_vertical_slash_bf16_4k(exact, cfg):
    from flexinference.kernels.sparse_triton import sparse_attention

    s, dev = 4096, "cuda"
    q, k, v = _qkv(1, 8, 2, s, 128, dtype=torch.bfloat16, seed=7, device=dev)
    g = torch.Generator().manual_seed(7)
    cols = torch.cat([torch.arange(30).expand(8, -1), torch.randint(30, s, (8, 200), generator=g)], 1)
    offs = torch.cat([torch.arange(500).expand(8, -1), torch.randint(500, s, (8, 300), generator=g)], 1)
    index = vertical_slash_index(cols.to(dev), offs.to(dev), s, block_m=cfg[0], block_n=cfg[1])
    out = sparse_attention(q, k, v, index, exact=exact, num_warps=cfg[2], num_stages=cfg[3])
    ref = sparse_attention_reference(q, k, v, index, exact=exact)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_block_topk_bf16_4k():
    from flexinference.kernels.sparse_triton import sparse_attention

    s, dev, nb = 4096, "cuda", 64
    q, k, v = _qkv(1, 8, 2, s, 128, dtype=torch.bfloat16, seed=8, device=dev)
    cells = (torch.rand(1, 8, nb, nb, generator=torch.Generator().manual_seed(8)) < 0.3).to(dev)
    index = block_topk_index(cells, s, block=64)
    out = sparse_attention(q, k, v, index)
    torch.testing.assert_close(out.float(), sparse_attention_reference(q, k, v, index), atol=2e-2, rtol=2e-2)
