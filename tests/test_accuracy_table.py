"""The accuracy-table benchmark runs end to end at toy size on CPU (it is meant for 2048-token records)."""

import importlib.util
import json
from pathlib import Path

import torch

import flexinference as fi
from flexinference.masks.a_shape import dense_mask as a_shape_mask
from flexinference.reference_model import load


def _module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy_table.py"
    spec = importlib.util.spec_from_file_location("accuracy_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_accuracy_table_toy_run(tmp_path):
    mod = _module()
    out, md = tmp_path / "a.json", tmp_path / "a.md"
    rc = mod.main(["--context-tokens", "700", "--records", "1", "--tasks", "scbench_prefix_suffix", "scbench_mf",
                   "--dense-only-tasks", "scbench_mf", "--modes", "multi_turn", "--dense-lengths",
                   "--min-sparse-len", "256", "--json", str(out), "--markdown", str(md)])
    data = json.loads(out.read_text())
    assert rc == 0
    rows = {(r["task"], r["method"]): r for r in data["rows"]}
    methods = {m for t, m in rows if t == "scbench_prefix_suffix"}
    assert len(methods) == 13 and {m for t, m in rows if t == "scbench_mf"} == {"dense"}
    assert rows[("scbench_prefix_suffix", "dense")]["kept"] == 1.0
    assert all(0 < r["kept"] < 1 for r in data["rows"] if r["method"] != "dense")
    assert len(data["searched_map"].splitlines()) == 7  # header + 6 layers
    assert "| a_shape |" in md.read_text()


def test_measured_density_of_dense_and_a_shape():
    """Dense keeps every causal pair; A-shape's fraction equals its dense reference mask's."""
    mod = _module()
    model, tok = load()
    ids = torch.tensor([tok.encode("hello world " * 30)])
    s = ids.shape[1]
    assert mod.measured_density(model, ids, fi.Dense()) == 1.0
    pattern = fi.AShape(sink=8, local=32)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    expected = float((a_shape_mask(pattern, s, s) & causal).sum() / causal.sum())
    assert abs(mod.measured_density(model, ids, pattern) - expected) < 1e-6 and expected < 0.5
