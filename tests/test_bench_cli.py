"""`flexinference bench` (the main job) runs on CPU, checks correctness first and writes its table/JSON."""

import json

import pytest
import torch

from flexinference.attention import Impl, attend_tables, auto_route
from flexinference.bench import BenchConfig, run
from flexinference.compose import build_tables
from flexinference.masks.tables import dense_keep
from flexinference.patterns import AShape, Dense
from flexinference.testing.reference import reference_attention
from tests.benchmark_scripts import load_benchmark


def test_bench_cpu_small(tmp_path, capsys):
    from flexinference.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", "--device", "cpu", "--seqlens", "1024", "--families", "a_shape", "vertical_slash",
               "--heads", "4", "--kv-heads", "2", "--head-dim", "32", "--reps", "1", "--part-reps", "1",
               "--warmup", "1", "--check-rows", "32", "--json", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "a_shape" in text and "vs_banded" in text
    header = next(line for line in text.splitlines() if line.startswith("case"))
    assert header.split()[:3] == ["case", "route", "S"]
    assert all(r["route"] == "flex" for r in json.loads(out.read_text())["rows"])  # the CPU default
    data = json.loads(out.read_text())
    assert data



def _config(**kw) -> BenchConfig:
    base = {"seqlens": (640,), "families": ("vertical_slash", "block_topk", "a_shape", "dense"), "heads": 4,
            "kv_heads": 2, "head_dim": 32, "dtype": "float32", "device": "cpu", "reps": 1, "warmup": 0,
            "part_reps": 1, "check_rows": 16, "scale_budgets": True, "compile": True}
    return BenchConfig(**{**base, **kw})


@pytest.mark.parametrize("impl", [Impl.AUTO, Impl.GATHERED, Impl.FLEX_EAGER])
def test_every_cpu_family_checks_and_names_its_route(impl):
    """Each row passed the reference check inside run() (it raises above tolerance) and says what ran."""
    result = run(_config(impl=impl), progress=False)
    rows = result["rows"]
    assert {r["case"] for r in rows} == {"vs_banded", "vs_band_far", "vs_scattered", "block_topk_t64", "a_shape",
                                         "dense"}
    for r in rows:
        # the dense row is a patched layer's short-prompt fallback: SDPA whatever the sparse impl
        expected = "sdpa" if r["case"] == "dense" else impl.value if impl is not Impl.AUTO else "flex_eager"
        assert f"route={expected}" in r["notes"] and r["route"] == expected
        assert r["rel_err"] < 1e-4 and r["whole_ms"] > 0
        assert 0 < r["visited"] <= 1.5
    assert result["env"]["config"]["impl"] == impl.value
    json.dumps(result)


def test_variants_select_cases_and_unknown_ones_are_rejected():
    rows = run(_config(families=("vertical_slash", "a_shape"), variants=("banded",)), progress=False)["rows"]
    assert [r["case"] for r in rows] == ["vs_banded"]
    with pytest.raises(ValueError, match="variants: unknown \\['t64'\\]"):
        _config(families=("vertical_slash",), variants=("banded", "t64"))
    for bad in ((), "banded"):
        with pytest.raises(TypeError, match="variants must be a non-empty tuple"):
            _config(families=("vertical_slash",), variants=bad)


def test_bench_rejects_the_reference_impl():
    with pytest.raises(ValueError, match="impl"):
        _config(impl=Impl.REFERENCE)
    with pytest.raises(TypeError, match="impl must be an Impl"):
        _config(impl="auto")


def test_auto_route_on_cpu_is_eager_flex_and_exact():
    q = torch.randn(1, 4, 300, 32)
    k = v = torch.randn(1, 2, 300, 32)
    tables = build_tables(q, k, [AShape(sink=4, local=64)] * 4, scale=32**-0.5)
    assert auto_route(q, k, tables) == (Impl.FLEX_EAGER, tables)
    auto = attend_tables(q, k, v, tables, scale=32**-0.5)
    ref = reference_attention(q, k, v, dense_keep(tables), scale=32**-0.5).float()
    torch.testing.assert_close(auto, ref, atol=1e-5, rtol=1e-5)


def test_auto_route_sends_all_dense_tables_to_sdpa_with_padding_and_chunks():
    """The all-dense shortcut (SDPA, no index building) on a chunk of queries on a cache with padding keys."""
    k = v = torch.randn(2, 2, 200, 32)
    q = torch.randn(2, 4, 60, 32)  # the last 60 of 200 positions
    valid = torch.ones(2, 200, dtype=torch.bool)
    valid[1, :17] = False  # left padding of the second row
    tables = build_tables(q, k, [Dense()] * 4, scale=32**-0.5, kv_valid=valid)
    impl, computed = auto_route(q, k, tables)
    assert impl is None and bool((computed.row_start == 0).all())
    out = attend_tables(q, k, v, tables, scale=32**-0.5)
    ref = reference_attention(q, k, v, dense_keep(tables), scale=32**-0.5).float()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    mixed = build_tables(q, k, [Dense()] * 3 + [AShape(sink=4, local=32)], scale=32**-0.5, kv_valid=valid)
    assert auto_route(q, k, mixed)[0] is Impl.FLEX_EAGER


@pytest.mark.gpu
def test_gpu_bench_routes_banded_to_the_kernel_and_scattered_to_sdpa():
    """On CUDA at 64K, AUTO runs banded vertical-slash (1000 + 6096) in the Triton kernel and scattered
    slashes as SDPA (never slower than dense); every row passed its reference check inside run()."""
    pytest.importorskip("triton")
    cfg = _config(seqlens=(65536,), families=("vertical_slash", "dense"), heads=32, kv_heads=8, head_dim=128,
                  dtype="bfloat16", device="cuda", reps=2, warmup=1, check_rows=64, scale_budgets=False,
                  dense_max_len=65536)
    routes = {r["case"]: r["notes"] for r in run(cfg, progress=False)["rows"]}
    assert "route=triton" in routes["vs_banded"] and "route=sdpa" in routes["vs_scattered"]
    assert "route=sdpa" in routes["dense"]


def test_profile_case_prints_the_top_ops_of_one_case(tmp_path):
    mod = load_benchmark("profile_case")
    out = tmp_path / "prof.txt"
    mod.main(["--case", "a_shape/128+4096", "--seqlens", "640", "--heads", "4", "--kv-heads", "2", "--head-dim", "32",
              "--prof-reps", "1", "--rows", "5", "--out", str(out)])
    text = out.read_text()
    assert text.startswith("a_shape @ 640 (route=") and "Name" in text and "per call" in text
    with pytest.raises(ValueError, match="family must be one of"):
        mod.profile_case(_config(), "nope", "x")
    with pytest.raises(ValueError, match="reps and rows"):
        mod.profile_case(_config(), "a_shape", "128+4096", reps=0)
