"""XAttention block estimation (Xu et al., 2025, arXiv:2503.16428) against the per-head loop reference."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexinference.estimate.xattention import xattention_block_mass, xattention_blocks
from flexinference.testing.estimate_reference import xattention_blocks_reference, xattention_mass_reference

COVER_TOL = 1e-9  # relative slack on fp64 cumulative-mass comparisons


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls: on a 2-core runner extra threads only contend with other processes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@st.composite
def cases(draw, max_len: int = 700):
    """Random fp64 inputs and per-head thresholds; lengths off block/stride multiples, chunked prefill,
    padding. Sizes come from a ``random.Random`` seeded by hypothesis (uniform over the ranges)."""
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    b, hkv, group = rng.randint(1, 2), rng.randint(1, 3), rng.randint(1, 3)
    d, block = rng.choice([16, 32, 64]), rng.choice([16, 32, 64])
    stride = rng.choice([s for s in (1, 2, 4, 8, 16) if block % s == 0 and s <= block])
    skv = rng.randint(1, 3 * block) if rng.random() < 0.3 else rng.randint(1, max_len)
    sq = skv if rng.random() < 0.5 else rng.randint(1, skv)
    hq = hkv * group
    g = torch.Generator().manual_seed(rng.getrandbits(31))
    temp = rng.choice([0.5, 1.0, 3.0])
    q = torch.randn(b, hq, sq, d, generator=g, dtype=torch.float64) * temp
    k = torch.randn(b, hkv, skv, d, generator=g, dtype=torch.float64)
    padding = rng.choice([None, None, "left", "holes"])
    kv_valid = None
    if padding == "left":
        kv_valid = torch.arange(skv)[None, :] >= torch.randint(0, skv, (b, 1), generator=g)
    elif padding == "holes":
        kv_valid = torch.rand(b, skv, generator=g) < 0.7
    params = dict(
        threshold=torch.tensor([rng.choice([0.3, 0.7, 0.9, 0.95, 1.0]) for _ in range(hq)]),
        stride=stride,
        block=block,
        scale=d**-0.5,
        kv_valid=kv_valid,
    )
    return q, k, params


def assert_invariants(keep: torch.Tensor, q: torch.Tensor, k: torch.Tensor, block: int) -> None:
    nb = -(-k.shape[2] // block)
    assert keep.dtype == torch.bool and keep.shape == (q.shape[0], q.shape[1], nb, nb)
    tri = torch.ones(nb, nb, dtype=torch.bool).tril()
    assert not (keep & ~tri).any(), "a cell above the block diagonal is kept"
    assert keep[..., :, 0].all(), "block column 0 must always be kept"
    assert keep.diagonal(dim1=-2, dim2=-1).all(), "the diagonal block must always be kept"


@settings(max_examples=100, deadline=None)
@given(cases())
def test_matches_loop_reference(case):
    q, k, p = case
    keep = xattention_blocks(q, k, **p)
    assert_invariants(keep, q, k, p["block"])
    assert torch.equal(keep, xattention_blocks_reference(q, k, **p))


@settings(max_examples=30, deadline=None)
@given(cases())
def test_mass_matches_reference_and_kept_blocks_cover_threshold(case):
    q, k, p = case
    args = {n: p[n] for n in ("stride", "block", "scale", "kv_valid")}
    mass = xattention_block_mass(q, k, **args)
    ref = xattention_mass_reference(q, k, **args)
    torch.testing.assert_close(mass, ref, rtol=1e-10, atol=1e-12)
    rows = ref.sum(-1)
    assert torch.allclose(rows, rows.round())  # each live reduced row is a distribution: integer tile sums
    keep = xattention_blocks(q, k, **p)
    need = p["threshold"].double().view(1, -1, 1) * rows * (1 - COVER_TOL)
    assert ((ref * keep).sum(-1) >= need).all()


@settings(max_examples=25, deadline=None)
@given(cases(max_len=500), st.integers(1, 5000))
def test_row_chunking_does_not_change_the_result(case, chunk_elements):
    q, k, p = case
    args = {n: p[n] for n in ("stride", "block", "scale", "kv_valid")}
    whole = xattention_block_mass(q, k, **args)
    torch.testing.assert_close(xattention_block_mass(q, k, **args, chunk_elements=chunk_elements), whole,
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("skv,sq,block,stride", [(300, 300, 32, 8), (517, 200, 64, 16), (64, 64, 16, 16),
                                                 (1, 1, 16, 4), (40, 1, 16, 2), (129, 65, 32, 1)])
def test_threshold_one_keeps_every_block_with_mass(skv, sq, block, stride):
    g = torch.Generator().manual_seed(skv + sq)
    q = torch.randn(2, 4, sq, 32, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, skv, 32, generator=g, dtype=torch.float64)
    keep = xattention_blocks(q, k, threshold=torch.ones(4), stride=stride, block=block, scale=32**-0.5)
    nb = -(-skv // block)
    first = (skv - sq) // block  # rows before the first query block are ignored by the caller
    tri = torch.ones(nb, nb, dtype=torch.bool).tril()
    assert torch.equal(keep[..., first:, :], tri[first:].expand_as(keep[..., first:, :]))


def test_heads_follow_their_own_threshold():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 512, 32, generator=g, dtype=torch.float64) * 3
    k = torch.randn(1, 2, 512, 32, generator=g, dtype=torch.float64)
    thr = torch.tensor([0.2, 0.5, 0.9, 1.0])
    keep = xattention_blocks(q, k, threshold=thr, stride=8, block=32, scale=32**-0.5)
    assert torch.equal(keep, xattention_blocks_reference(q, k, threshold=thr, stride=8, block=32, scale=32**-0.5))
    counts = keep[0].sum((-1, -2))
    assert counts[0] < counts[1] < counts[3] and counts[2] < counts[3]


@settings(max_examples=25, deadline=None)
@given(cases(max_len=400), st.floats(0.0, 1.0))
def test_smaller_threshold_keeps_a_subset(case, shrink):
    q, k, p = case
    big = xattention_blocks(q, k, **p)
    small = xattention_blocks(q, k, **{**p, "threshold": (p["threshold"] * shrink).clamp(min=1e-3)})
    assert not (small & ~big).any()


@settings(max_examples=15, deadline=None)
@given(cases(max_len=400))
def test_gqa_equals_repeated_kv_heads(case):
    q, k, p = case
    group = q.shape[1] // k.shape[1]
    repeated = k.repeat_interleave(group, dim=1)  # test only: the estimator never repeats K
    assert torch.equal(xattention_blocks(q, k, **p), xattention_blocks(q, repeated, **p))


@settings(max_examples=15, deadline=None)
@given(cases(max_len=400), st.integers(0, 2**31 - 1))
def test_padded_positions_never_drive_selection(case, seed):
    q, k, p = case
    skv, sq = k.shape[2], q.shape[2]
    kv_valid = p["kv_valid"]
    if kv_valid is None:
        kv_valid = torch.rand(q.shape[0], skv, generator=torch.Generator().manual_seed(seed)) < 0.6
        p = {**p, "kv_valid": kv_valid}
    base = xattention_blocks(q, k, **p)
    g = torch.Generator().manual_seed(seed)
    k2 = torch.where(kv_valid[:, None, :, None], k, torch.randn(k.shape, generator=g, dtype=k.dtype) * 50)
    q_pad = ~kv_valid[:, None, skv - sq :, None]
    q2 = torch.where(q_pad, torch.randn(q.shape, generator=g, dtype=q.dtype) * 50, q)
    assert torch.equal(base, xattention_blocks(q2, k2, **p))
    # A key block without any valid key has no mass: only the forced cells can keep it.
    nb = base.shape[-1]
    empty = ~torch.nn.functional.pad(kv_valid, (0, nb * p["block"] - skv)).view(-1, nb, p["block"]).any(-1)
    ii, jj = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
    unforced = (jj != 0) & (jj != ii)
    assert not (base & empty[:, None, None, :] & unforced).any()


def test_all_true_kv_valid_equals_none():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 150, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, 333, 16, generator=g, dtype=torch.float64)
    args = dict(threshold=torch.full((6,), 0.9), stride=4, block=32, scale=0.25)
    assert torch.equal(xattention_blocks(q, k, **args),
                       xattention_blocks(q, k, **args, kv_valid=torch.ones(2, 333, dtype=torch.bool)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 300, 64, generator=g) * 2
    k = torch.randn(2, 2, 333, 64, generator=g)
    args = dict(threshold=torch.tensor([0.5, 0.8, 0.9, 0.95]), stride=8, block=32, scale=0.125)
    keep = xattention_blocks(q.to(dtype), k.to(dtype), **args)
    assert_invariants(keep, q, k, 32)
    agree = (keep == xattention_blocks(q.double(), k.double(), **args)).double().mean().item()
    assert agree >= (0.999 if dtype == torch.float32 else 0.9), agree


def _good():
    q, k = torch.randn(1, 4, 50, 16), torch.randn(1, 2, 60, 16)
    return dict(q=q, k=k, threshold=torch.full((4,), 0.9), stride=4, block=16, scale=0.25, kv_valid=None)


@pytest.mark.parametrize(
    "change,name",
    [
        (dict(q=torch.randn(4, 50, 16)), "q"),
        (dict(k=torch.randn(1, 3, 60, 16)), "heads"),
        (dict(k=torch.randn(2, 2, 60, 16)), "k shape"),
        (dict(k=torch.randn(1, 2, 40, 16)), "S_q"),
        (dict(k=torch.randn(1, 2, 60, 16, dtype=torch.float64)), "k dtype"),
        (dict(threshold=torch.full((4,), 1.01)), "threshold"),
        (dict(threshold=torch.zeros(4)), "threshold"),
        (dict(threshold=torch.full((2,), 0.9)), "threshold"),
        (dict(block=24, stride=16), "stride"),
        (dict(stride=0), "stride"),
        (dict(block=0), "block"),
        (dict(scale=-1.0), "scale"),
        (dict(kv_valid=torch.ones(1, 61, dtype=torch.bool)), "kv_valid"),
    ],
)
def test_bad_arguments_name_the_argument(change, name):
    args = {**_good(), **change}
    with pytest.raises(ValueError, match=name):
        xattention_blocks(args.pop("q"), args.pop("k"), **args)


@pytest.mark.parametrize(
    "change,name",
    [(dict(stride=8.0), "stride"), (dict(threshold=0.9), "threshold"), (dict(kv_valid=torch.ones(1, 60)), "kv_valid")],
)
def test_bad_types_name_the_argument(change, name):
    args = {**_good(), **change}
    with pytest.raises(TypeError, match=name):
        xattention_blocks(args.pop("q"), args.pop("k"), **args)
