"""Model-level search on a tiny random Llama: config written by the CLI round-trips through apply."""

import json

import pytest
import torch

import flexinference as fi
from flexinference.config import ModelConfig
from flexinference.scbench.embedded import build_embedded_model
from flexinference.search import SearchCriterion
from flexinference.search_model import calibration_ids, search

CANDIDATES = (fi.AShape(sink=4, local=64), fi.VerticalSlash(vertical=16, slash=64, keep_first_columns=4,
                                                             keep_nearest_diagonals=32), fi.BlockTopK(64, 3))


def test_search_picks_a_pattern_per_head_and_apply_reproduces_it():
    model, tok = build_embedded_model(seed=0)
    ids = calibration_ids(tok, 700)
    assert ids.shape[0] == 1 and 600 <= ids.shape[1] <= 700
    crit = SearchCriterion(min_recall=0.5, max_error=0.5, num_rows=64)
    result = search(model, ids, CANDIDATES, crit, min_sparse_len=128)
    cfg = result.config
    assert cfg.num_layers == 2 and cfg.num_heads == 4
    assert all(isinstance(p, (fi.AShape, fi.VerticalSlash, fi.BlockTopK, fi.Dense)) for layer in cfg.layers for p in layer)
    assert "mean density" in result.summary()
    # The capture left the model untouched.
    assert model.config._attn_implementation != "flexinference_capture"
    with torch.no_grad():
        fi_apply = pytest.importorskip("flexinference.patching")
        fi_apply.apply(model, cfg)
        a = model(ids).logits
        fi_apply.remove(model)
    # A config read back from JSON gives the same outputs.
    restored = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert restored == cfg
    with torch.no_grad():
        fi_apply.apply(model, restored)
        b = model(ids).logits
        fi_apply.remove(model)
    torch.testing.assert_close(a, b)


def test_search_rejects_bad_input():
    model, _ = build_embedded_model(seed=0)
    with pytest.raises(ValueError, match="input_ids"):
        search(model, torch.zeros(2, 10, dtype=torch.long))


def test_cli_writes_config_minference_json_and_plot(tmp_path):
    from flexinference.cli import main

    model, tok = build_embedded_model(seed=0)
    model.save_pretrained(tmp_path / "m")
    out, minf, png = tmp_path / "cfg.json", tmp_path / "minf.json", tmp_path / "map.png"
    assert main(["search", "--model", str(tmp_path / "m"), "--tokenizer", "char", "--length", "600",
                 "--rows", "32", "--out", str(out), "--minference-format", str(minf), "--plot", str(png),
                 "--device", "cpu", "--dtype", "float32"]) == 0
    data = json.loads(out.read_text())
    assert len(data["search"]["heads"]) == 2 and len(data["search"]["heads"][0]) == 4
    cfg = ModelConfig.from_dict(data)
    assert cfg.num_layers == 2
    from flexinference.compat.minference_config import load_minference_config

    assert load_minference_config(minf).num_layers == 2
    assert png.stat().st_size > 1000


def test_search_refuses_a_patched_model():
    model, tok = build_embedded_model(seed=0)
    fi.apply(model, fi.Dense(), prefill_chunk_size=100)
    with pytest.raises(ValueError, match="unpatched"):
        search(model, calibration_ids(tok, 300))
    fi.remove(model)
