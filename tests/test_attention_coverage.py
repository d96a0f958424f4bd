"""benchmarks/attention_coverage.py on the shipped reference model, at a short length (CPU)."""

import pytest

from tests.benchmark_scripts import load_benchmark


def test_coverage_rows_are_fractions_and_windows_keep_their_neighbours():
    mod = load_benchmark("attention_coverage")
    rows = mod.coverage(context_tokens=768, methods=("a_shape", "minference", "flexprefill"))
    assert {r["layer"] for r in rows} == set(range(6)) and len(rows) == 18
    for r in rows:
        assert 0.0 <= r["mass"] <= 1.0 + 1e-6 and 0.0 < r["kept"] <= 1.0 and 0.0 <= r["local"] <= 1.0
        if r["method"] in ("a_shape", "minference"):  # local windows / nearest diagonals cover 8 neighbours
            assert r["local"] == 1.0
    text = mod.table(rows)
    assert text.splitlines()[0] == "| layer | a_shape | minference | flexprefill |" and len(text.splitlines()) == 8
    with pytest.raises(ValueError, match="methods: unknown"):
        mod.coverage(context_tokens=768, methods=("nope",))
