"""The end-to-end prefill benchmark runs on CPU at toy sizes (it is meant for the H100 at 128K)."""

import json

from tests.benchmark_scripts import load_benchmark


def test_model_prefill_benchmark_cpu(tmp_path):
    mod = load_benchmark("model_prefill")
    out = tmp_path / "r.json"
    rc = mod.main(["--seqlen", "600", "--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "4",
                   "--kv-heads", "2", "--vocab", "128", "--dtype", "float32", "--device", "cpu", "--reps", "1",
                   "--min-sparse-len", "256", "--search-seqlen", "400", "--floor", "--json", str(out)])
    data = json.loads(out.read_text())
    assert rc == 0 and data["dense_patterns_exact"] and data["finite"] and data["search_s"] > 0
    assert data["floor_ms"] > 0 and data["max_speedup"] > 0
