"""The decode benchmark runs on CPU at small sizes, and its checks and table are consistent."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_cache.py"


def _load(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_cache", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_cache", module)  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


def test_cpu_mode_small(tmp_path, capsys, monkeypatch):
    bench = _load(monkeypatch)
    out = tmp_path / "bench.json"
    args = ["--device", "cpu", "--seqlen", "1024", "--budget", "256", "--heads-q", "8", "--heads-kv", "2"]
    args += ["--head-dim", "64", "--layers", "2", "--warmup", "1", "--dtype", "fp32", "--out", str(out)]
    report = bench.main(args)
    assert json.loads(out.read_text()) == report
    rows = {row["policy"]: row for row in report["results"]}
    assert list(rows) == ["dense", "streaming", "snapkv", "pyramidkv", "kivi2", "kivi4"]
    dense_bytes = 2 * 2 * 1024 * 64 * 4 * 2  # layers x H_kv x N x D x fp32 x (K, V)
    assert rows["dense"]["bytes"] == dense_bytes and rows["dense"]["speedup"] == 1.0
    for name in ("streaming", "snapkv", "pyramidkv"):
        assert rows[name]["bytes"] == dense_bytes * 256 // 1024
        assert report["checks"][f"{name}_tokens_kept"] == 257
    assert rows["kivi2"]["bytes_ratio"] < rows["kivi4"]["bytes_ratio"] < 0.25  # fp32: 16x smaller codes
    assert all(row["decode_ms"] > 0 for row in rows.values())
    assert "speed-up" in capsys.readouterr().out


def test_bad_arguments(monkeypatch):
    bench = _load(monkeypatch)
    with pytest.raises(ValueError, match="iters"):
        bench.main(["--device", "cpu", "--iters", "5"])
    with pytest.raises(ValueError, match="dtype"):
        bench.main(["--dtype", "int8", "--device", "cpu"])
