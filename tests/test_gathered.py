"""Gathered verticals: the kept set equals the tables' rule exactly, counted once.

Two independent checks on CPU: eager ``flex_attention`` (applies ``mask_mod`` to every pair, so it checks
the token rule) against the fp64 reference, and the BlockMask structure rebuilt in pure PyTorch (full
blocks, plus partial blocks where ``mask_mod`` keeps), mapped back to original key positions and compared
with ``dense_keep`` (which also proves full blocks hold only kept pairs and nothing is counted twice).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexinference.bench_cases import (
    keep_rows,
    kept_pairs,
    reference_rows,
    regime_indices,
    tables_from_indices,
)
from flexinference.compose import build_tables, table_length
from flexinference.gathered import (
    gathered_attention,
    gathered_block_mask,
    plan_gathered,
    visited_block_fraction,
)
from flexinference.masks.tables import KeepTables, dense_keep
from flexinference.patterns import (
    AShape,
    BlockTopK,
    Dense,
    Dilated,
    Strided,
    TriShape,
    VerticalSlash,
    VerticalSlashStatic,
)
from flexinference.testing.reference import reference_attention

FP32_ATOL = 1e-5
NEVER = torch.iinfo(torch.int32).max
BLOCK_SIZES = [(16, 16), (32, 32), (16, 32), (32, 16), (64, 32), (32, 64)]


def random_tables(seed: int, b: int, hq: int, sq: int, skv: int, *, cells: int | None, valid: bool,
                  col_p: float, diag_p: float, sink: int, full_run: bool, diag0: bool = True) -> KeepTables:
    gen = torch.Generator().manual_seed(seed)
    t = table_length(skv)
    columns = torch.rand(b, hq, t, generator=gen) < col_p
    columns[..., :sink] = True
    if full_run and skv > 64:
        start = int(torch.randint(0, skv - 64, (1,), generator=gen))
        columns[..., start : start + 64] = True
    diagonals = torch.rand(b, hq, t, generator=gen) < diag_p
    diagonals[..., : int(torch.randint(1, 20, (1,), generator=gen))] = True
    diagonals[..., 0] = diag0  # the patterns always keep it; the rule itself does not need it
    row_start = torch.where(torch.rand(b, hq, generator=gen) < 0.2, torch.randint(0, skv + 1, (b, hq), generator=gen),
                            NEVER).to(torch.int32)
    blocks = None
    if cells is not None:
        n = -(-skv // cells)
        blocks = torch.rand(b, hq, n, n, generator=gen) < 0.1
    kv_valid = None
    if valid:
        kv_valid = torch.zeros(b, t, dtype=torch.bool)
        kv_valid[:, :skv] = torch.rand(b, skv, generator=gen) < 0.85
    return KeepTables(columns=columns, diagonals=diagonals, row_start=row_start, blocks=blocks,
                      q_offset=torch.tensor(skv - sq, dtype=torch.int32), q_len=sq, kv_len=skv,
                      table_block=cells or 128, kv_valid=kv_valid)


def kept_counts(block_mask, plan, kv_len: int) -> torch.Tensor:
    """How many times the kernel would compute each original (query, key) pair: int ``(B, H, S_q, S_kv)``.

    Rows and keys past the real lengths (a length-bucket pad) must never be computed for a real row."""
    qb, kb = block_mask.BLOCK_SIZE
    b, h, nq = block_mask.kv_num_blocks.shape
    g_len = plan.gathered_len
    q_total, total = block_mask.seq_lengths
    nk = -(-total // kb)
    sq = plan.main.q_len

    def grid(num, idx):
        out = torch.zeros(b, h, nq, nk + 1, dtype=torch.bool)
        if num is None:
            return out[..., :nk]
        use = torch.arange(idx.shape[-1])[None, None, None, :] < num[..., None]
        return out.scatter_(-1, torch.where(use, idx.long(), nk), True)[..., :nk]

    partial = grid(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = grid(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    assert not (partial & full).any(), "a block is listed as both partial and full"
    assert nq == -(-q_total // qb)
    qi, kj = torch.arange(sq), torch.arange(total)
    mod = block_mask.mask_mod(torch.arange(b)[:, None, None, None], torch.arange(h)[None, :, None, None],
                              qi[None, None, :, None], kj[None, None, None, :])
    tok = full[:, :, qi // qb][..., kj // kb] | (partial[:, :, qi // qb][..., kj // kb] & mod)
    assert not tok[..., g_len + kv_len :].any(), "a padded key is visited"
    t = plan.main.columns.shape[-1]
    counts = torch.zeros(b, h, sq, t + 1, dtype=torch.long)
    counts[..., :kv_len] += tok[..., g_len : g_len + kv_len].long()
    if g_len:
        pos = plan.slot_pos.long()[:, :, None, :].expand(b, h, sq, g_len)
        counts.scatter_add_(-1, pos, tok[..., :g_len].long())
    assert counts[..., kv_len:].sum() == 0, "a padding slot or out-of-range key is visited"
    return counts[..., :kv_len]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    b=st.integers(1, 2),
    hkv=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4]),
    skv=st.integers(1, 300),
    q_frac=st.sampled_from([1.0, 1.0, 0.5, 0.1]),
    block=st.sampled_from(BLOCK_SIZES),
    cells=st.sampled_from([None, None, 16, 32]),
    valid=st.booleans(),
    col_p=st.sampled_from([0.0, 0.02, 0.2, 0.9]),
    diag_p=st.sampled_from([0.0, 0.05, 0.3]),
    sink=st.sampled_from([0, 4, 16, 40]),
    full_run=st.booleans(),
    max_gathered=st.sampled_from([None, None, 0, 8, 40]),
    batch1=st.booleans(),
    diag0=st.sampled_from([True, True, False]),
    bucket=st.booleans(),
)
def test_structure_and_output_match_reference(seed, b, hkv, group, skv, q_frac, block, cells, valid, col_p,
                                              diag_p, sink, full_run, max_gathered, batch1, diag0, bucket):
    hq = hkv * group
    sq = max(1, int(skv * q_frac))
    tb = 1 if batch1 else b
    tables = random_tables(seed, tb, hq, sq, skv, cells=cells, valid=valid, col_p=col_p, diag_p=diag_p,
                           sink=sink, full_run=full_run, diag0=diag0)
    plan = plan_gathered(tables.with_batch(b), hkv, kv_block=block[1], max_gathered=max_gathered)
    keep = dense_keep(tables.with_batch(b))
    pad = tables.columns.shape[-1] - skv if bucket else 0
    counts = kept_counts(gathered_block_mask(plan, block[0], pad=pad), plan, skv)
    assert torch.equal(counts, keep.long())

    gen = torch.Generator().manual_seed(seed)
    d = 16
    q = torch.randn(b, hq, sq, d, generator=gen)
    k = torch.randn(b, hkv, skv, d, generator=gen)
    v = torch.randn(b, hkv, skv, d, generator=gen)
    out = gathered_attention(q, k, v, tables, scale=0.3, block_size=block, max_gathered=max_gathered,
                             bucket=bucket)
    rows = keep.any(-1)  # padding keys or no main diagonal may leave a row empty (reference NaN)
    ref = reference_attention(q, k, v, keep | ~rows[..., None], scale=0.3)
    assert torch.allclose(out.double()[rows], ref[rows], atol=FP32_ATOL, rtol=0)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), skv=st.integers(64, 400), q_frac=st.sampled_from([1.0, 0.3]))
def test_build_tables_mixed_layer(seed, skv, q_frac):
    torch.manual_seed(seed)
    sq = max(1, int(skv * q_frac))
    pats = [VerticalSlash(vertical=24, slash=12, keep_first_columns=3, keep_nearest_diagonals=4),
            AShape(sink=4, local=16), BlockTopK(block=32, topk=2), Dense(),
            TriShape(sink=2, local=8, last=5), Dilated(sink=8, band=4, span=40, dilation=3),
            Strided(stride=7, local=5, sink=1), VerticalSlashStatic(columns=(1, 50, 99), diagonals=(0, 9))]
    q = torch.randn(1, 8, sq, 32)
    k, v = torch.randn(1, 2, skv, 32), torch.randn(1, 2, skv, 32)
    tables = build_tables(q, k, pats, scale=32**-0.5)
    out = gathered_attention(q, k, v, tables, block_size=(32, 32))
    ref = reference_attention(q, k, v, dense_keep(tables))
    assert torch.allclose(out.double(), ref, atol=FP32_ATOL, rtol=0)


def test_sink_blocks_stay_in_main_part():
    """Columns covering whole kernel blocks (sinks) are not gathered: they are full blocks already."""
    q, k = torch.randn(1, 4, 512, 16), torch.randn(1, 2, 512, 16)
    tables = build_tables(q, k, [AShape(sink=128, local=64)] * 4, scale=0.25)
    assert plan_gathered(tables, 2).gathered_len == 0
    tables = build_tables(q, k, [AShape(sink=130, local=64)] * 4, scale=0.25)
    plan = plan_gathered(tables, 2)
    assert plan.gathered_len == 128 and int(plan.own.sum(-1).max()) == 2  # columns 128, 129


def test_column_visible_from_its_own_row_only():
    """A column kept by no other rule is first seen by its own row, the last of a query block."""
    tables = tables_from_indices(torch.tensor([[31, 64]]), torch.tensor([[-1]]), 128)
    tables.diagonals[..., 0] = False
    plan = plan_gathered(tables, 1, kv_block=32)
    keep = dense_keep(tables)
    assert torch.equal(kept_counts(gathered_block_mask(plan, 32), plan, 128), keep.long())
    assert keep[0, 0, 31].tolist() == [False] * 31 + [True] + [False] * 96


@pytest.mark.parametrize("case", ["no_other_rule", "dense_rows_inside_block", "diagonal_at_block_corner",
                                  "diagonal_at_far_corner"])
def test_full_gathered_blocks_are_exact(case):
    """Edges of the full-gathered-block test: a head owning a whole gathered block (keys 40..55, 16-token
    tiles), seen from query blocks of 32 rows."""
    tables = tables_from_indices(torch.arange(40, 56)[None], torch.tensor([[-1]]), 128)
    tables.diagonals[..., 0] = False
    if case == "dense_rows_inside_block":
        tables.row_start[...] = 80  # rows 80.. keep everything: query block 64..95 is not exclusive
    if case == "diagonal_at_block_corner":
        tables.diagonals[..., 64 - 55] = True  # keeps (64, 55): the block's corner pair
    if case == "diagonal_at_far_corner":
        tables.diagonals[..., 95 - 40] = True  # keeps (95, 40) and (96..127, 41..72)
    plan = plan_gathered(tables, 1, kv_block=16)
    block_mask = gathered_block_mask(plan, 32)
    assert torch.equal(kept_counts(block_mask, plan, 128), dense_keep(tables).long())
    num, idx = block_mask.full_kv_num_blocks[0, 0], block_mask.full_kv_indices[0, 0]
    gathered_full = [0 in idx[r, : num[r]].tolist() for r in range(4)]  # kernel block 0 is the gathered one
    assert gathered_full == {"no_other_rule": [False, False, True, True],
                             "dense_rows_inside_block": [False, False, False, False],
                             "diagonal_at_block_corner": [False, False, False, True],
                             "diagonal_at_far_corner": [False, False, False, False]}[case]


def test_buffer_length_and_static_bound():
    tables = tables_from_indices(torch.tensor([[5, 300, 700]] * 4), torch.tensor([[0]] * 4), 1000)
    plan = plan_gathered(tables, 1)
    assert plan.gathered_len == 128  # union {5, 300, 700} rounded up to one block
    assert plan_gathered(tables, 1, max_gathered=300).gathered_len == 384
    small = plan_gathered(tables, 1, max_gathered=1)
    assert small.gathered_len == 128 and int(small.own[0, 0].sum()) == 3
    assert int(small.main.columns.sum()) == 0
    # Slots of one KV head are grouped by owner set, then sorted by position.
    cols = torch.tensor([[10, 400], [20, 400]])
    plan = plan_gathered(tables_from_indices(cols, torch.tensor([[0], [0]]), 1000), 1)
    assert plan.slot_pos[0, 0, :3].tolist() == [10, 20, 400]


def test_128k_vertical_slash_visits_few_blocks():
    """At 128K, 32/8 heads, 1000 verticals (30 first + scattered) and 6096 banded slashes per head: at most
    ~15% of the causal blocks are visited with gathered verticals; the plain BlockMask visits most."""
    s, heads, kv_heads = 131072, 32, 8
    vertical = torch.full((heads,), 1000)
    slash = torch.full((heads,), 6096)
    cols, offs = regime_indices("banded", s, vertical, slash, seed=0)
    tables = tables_from_indices(cols, offs, s)
    gathered = visited_block_fraction(tables, num_kv_heads=kv_heads)
    plain = visited_block_fraction(tables, num_kv_heads=kv_heads, gathered=False)
    assert float(gathered.max()) <= 0.15, float(gathered.max())
    assert float(plain.min()) > 0.5, float(plain.min())
    assert float(gathered.mean()) < 0.2 * float(plain.mean())


def test_visited_fraction_and_cost_weights():
    q, k = torch.randn(1, 2, 512, 16), torch.randn(1, 1, 512, 16)
    dense = build_tables(q, k, [Dense()] * 2, scale=0.25)
    for gathered in (True, False):  # 10 causal blocks: 6 full, 4 partial (the diagonal ones)
        assert torch.equal(visited_block_fraction(dense, num_kv_heads=1, gathered=gathered), torch.ones(1, 2))
        frac = visited_block_fraction(dense, num_kv_heads=1, gathered=gathered, partial_weight=4.0)
        assert torch.allclose(frac, torch.full((1, 2), 2.2))
    # One column (kept by no other rule) at key 300 and the main diagonal: 4 diagonal blocks (partial),
    # plus the gathered block visited by query blocks 2 and 3 (partial).
    tables = tables_from_indices(torch.tensor([[300]]), torch.tensor([[0]]), 512)
    assert float(visited_block_fraction(tables, num_kv_heads=1)) == pytest.approx(6 / 10)
    assert float(visited_block_fraction(tables, num_kv_heads=1, partial_weight=4.0)) == pytest.approx(24 / 10)
    assert float(visited_block_fraction(tables, num_kv_heads=1, gathered=False)) == pytest.approx(5 / 10)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), skv=st.integers(1, 200), q_frac=st.sampled_from([1.0, 0.4]),
       cells=st.sampled_from([None, 16]), only_cells=st.booleans(), valid=st.booleans())
def test_kept_pairs_and_keep_rows(seed, skv, q_frac, cells, only_cells, valid):
    sq = max(1, int(skv * q_frac))
    tables = random_tables(seed, 2, 3, sq, skv, cells=cells, valid=valid, col_p=0.1, diag_p=0.1, sink=3,
                           full_run=False)
    if cells is not None and only_cells:
        tables = KeepTables(columns=torch.zeros_like(tables.columns), diagonals=torch.zeros_like(tables.diagonals),
                            row_start=torch.full_like(tables.row_start, NEVER), blocks=tables.blocks,
                            q_offset=tables.q_offset, q_len=sq, kv_len=skv, table_block=cells)
    keep = dense_keep(tables)
    assert torch.equal(kept_pairs(tables), keep.sum((-1, -2)))
    rows = torch.randperm(sq)[: max(1, sq // 3)]
    assert torch.equal(keep_rows(tables, rows), keep[:, :, rows])


def test_reference_rows_matches_reference():
    q, k, v = torch.randn(2, 4, 90, 8), torch.randn(2, 2, 120, 8), torch.randn(2, 2, 120, 8)
    tables = random_tables(0, 2, 4, 90, 120, cells=None, valid=False, col_p=0.1, diag_p=0.1, sink=2,
                           full_run=False)
    rows = torch.tensor([0, 7, 89])
    full = reference_attention(q, k, v, dense_keep(tables), scale=0.5)
    assert torch.allclose(reference_rows(q, k, v, tables, rows, 0.5), full[:, :, rows], atol=1e-12)


@pytest.mark.parametrize("regime", ["banded", "band_far", "scattered"])
def test_regime_indices_budgets(regime):
    vertical, slash = torch.tensor([40, 100]), torch.tensor([50, 200])
    cols, offs = regime_indices(regime, 5000, vertical, slash, seed=1)
    tables = tables_from_indices(cols, offs, 5000)
    assert tables.columns.sum(-1).tolist() == [[40, 100]]
    assert tables.diagonals.sum(-1).tolist() == [[50, 200]]
    assert bool(tables.columns[0, :, :30].all())
    near = {"banded": 50, "band_far": 45, "scattered": 50}[regime]
    assert bool(tables.diagonals[0, 0, :near].all())


def test_bad_arguments():
    q, k = torch.randn(1, 4, 64, 8), torch.randn(1, 2, 64, 8)
    tables = build_tables(q, k, [VerticalSlash(vertical=8, slash=4)] * 4, scale=0.3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        plan_gathered(tables, 3)
    with pytest.raises(ValueError, match="max_gathered"):
        plan_gathered(tables, 2, max_gathered=-1)
    with pytest.raises(ValueError, match="block_size"):
        gathered_attention(q, k, k, tables, block_size=(64,))
    with pytest.raises(ValueError, match="tables"):
        gathered_attention(q[:, :, :32], k, k, tables)
    with pytest.raises(TypeError, match="tables"):
        gathered_attention(q, k, k, "tables")
    with pytest.raises(ValueError, match="multiple"):
        gathered_attention(torch.randn(1, 3, 64, 8), k, k, tables)


# ----------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("seq_len", [5000, 32768])
@pytest.mark.parametrize("regime", ["banded", "scattered"])
def test_gpu_gathered_compiled_matches_reference(seq_len, regime):
    torch.manual_seed(0)
    dev, heads, kv_heads, d = "cuda", 8, 2, 128
    q = torch.randn(1, heads, seq_len, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, kv_heads, seq_len, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, kv_heads, seq_len, d, device=dev, dtype=torch.bfloat16)
    vertical = torch.full((heads,), 1000, device=dev)
    slash = torch.full((heads,), 2000, device=dev)
    tables = tables_from_indices(*regime_indices(regime, seq_len, vertical, slash, seed=3), seq_len)
    with torch._dynamo.config.patch(recompile_limit=64):
        out = gathered_attention(q, k, v, tables, compiled=True, scale=d**-0.5)
    rows = torch.randperm(seq_len)[:256]
    ref = reference_rows(q, k, v, tables, rows, d**-0.5)
    got = out[:, :, rows.to(dev)].float()
    assert float((got - ref).norm() / ref.norm()) < 2e-2
    assert math.isfinite(float(out.float().abs().max()))


def test_more_slots_than_table_entries_adds_no_duplicate_keys():
    """Regression: padding slots beyond the table length were taken as copies of key 0."""
    import flexinference as fi
    from flexinference.attention import Impl
    from flexinference.compose import build_tables
    from flexinference.gathered import gathered_attention
    from flexinference.masks.tables import dense_keep
    from flexinference.testing.reference import reference_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 200, 32, generator=g)
    k = torch.randn(1, 1, 200, 32, generator=g)
    v = torch.randn(1, 1, 200, 32, generator=g)
    t = build_tables(q, k, [fi.AShape(sink=4, local=16)], scale=0.125)
    ref = reference_attention(q, k, v, dense_keep(t), scale=0.125)
    out = gathered_attention(q, k, v, t, scale=0.125, max_gathered=512)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    s = 300
    pat = fi.VerticalSlashStatic(columns=tuple(c for c in range(s) if c not in (1, 128, 256)), diagonals=(0,))
    q = torch.randn(1, 2, s, 32, generator=g)
    k = torch.randn(1, 1, s, 32, generator=g)
    v = torch.randn(1, 1, s, 32, generator=g)
    out = fi.sparse_attention(q, k, v, pat, impl=Impl.GATHERED)
    ref = fi.sparse_attention(q, k, v, pat, impl=Impl.REFERENCE)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
