"""MInference's per-head best-pattern JSON: reader, writer, and the real files when present."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from flexinference.compat.minference_config import (
    load_minference_config,
    minference_entry_to_pattern,
    pattern_to_minference_entry,
    save_minference_config,
)

import flexinference as fi
from flexinference.config import ModelConfig

from .helpers import make_model

REPO = Path(__file__).resolve().parents[2]
SHARED_CANDIDATES = [Path("/work/shared/minference_configs"), REPO.parent / "shared" / "minference_configs"]
SHARED = next((p for p in SHARED_CANDIDATES if p.is_dir()), None)


def fixture(layers: int = 2, heads: int = 4) -> list[dict]:
    """A small file in MInference's format with every pattern kind and int/float scores."""
    kinds = [["vertical_and_slash", 1000, 6096, 0.91], ["stream_llm", 100, 800, 0.5],
             ["block_sparse", 100, 0, 3], ["vertical_and_slash", 30, 800, 0.99]]
    return [{str(h): kinds[(h + i) % len(kinds)] for h in range(heads)} for i in range(layers)]


def test_mapping_of_each_pattern_kind():
    assert minference_entry_to_pattern(["vertical_and_slash", 1000, 6096, 0.3]) == fi.VerticalSlash(1000, 6096)
    assert minference_entry_to_pattern(["stream_llm", 100, 800, 0.9]) == fi.AShape(sink=100, local=800)
    assert minference_entry_to_pattern(["block_sparse", 100, 0, 1]) == fi.BlockTopK(block=64, topk=100)


def test_load_fixture_file(tmp_path):
    path = tmp_path / "Toy_best_pattern.json"
    path.write_text(json.dumps(fixture()))
    cfg = load_minference_config(path)
    assert (cfg.num_layers, cfg.num_heads, cfg.model_name) == (2, 4, "Toy_best_pattern.json")
    assert cfg.layers[0] == (fi.VerticalSlash(1000, 6096), fi.AShape(100, 800), fi.BlockTopK(64, 100),
                             fi.VerticalSlash(30, 800))
    assert cfg.layers[1][0] == fi.AShape(100, 800)
    assert load_minference_config(fixture(), min_sparse_len=5).min_sparse_len == 5


def test_round_trip_through_writer(tmp_path):
    cfg = load_minference_config(fixture(3, 2))
    scores = [[0.25, 0.5]] * 3
    save_minference_config(cfg, tmp_path / "out.json", scores=scores)
    data = json.loads((tmp_path / "out.json").read_text())
    assert data[2]["1"][3] == 0.5
    assert load_minference_config(tmp_path / "out.json").layers == cfg.layers


@pytest.mark.parametrize(
    "pattern, match",
    [
        (fi.Dense(), "cannot express Dense"),
        (fi.VerticalSlash(last_q=32), "last_q"),
        (fi.BlockTopK(block=128), "64-token blocks"),
    ],
)
def test_writer_rejects_what_the_format_cannot_hold(pattern, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        pattern_to_minference_entry(pattern)
    with pytest.raises(ValueError, match="layer 0 head 0"):
        save_minference_config(ModelConfig.uniform(pattern, num_layers=1, num_heads=1), tmp_path / "x.json")


def test_writer_checks_scores_shape(tmp_path):
    cfg = ModelConfig.uniform(fi.AShape(), num_layers=2, num_heads=2)
    with pytest.raises(ValueError, match="2 x 2"):
        save_minference_config(cfg, tmp_path / "x.json", scores=[[0.0, 0.0]])


@pytest.mark.parametrize(
    "data, match",
    [
        ({"0": {}}, "non-empty list"),
        ([], "non-empty list"),
        ([{}], "layer 0 must be a non-empty object"),
        ([{"0": ["vertical_and_slash", 1, 2, 0], "2": ["vertical_and_slash", 1, 2, 0]}], r"heads must be '0'..'1'"),
        ([{"0": ["diagonal", 1, 2, 0]}], "unknown MInference pattern 'diagonal'"),
        ([{"0": ["vertical_and_slash", -1, 2, 0]}], "vertical_size must be a non-negative integer"),
        ([{"0": ["vertical_and_slash", 1.5, 2, 0]}], "vertical_size"),
        ([{"0": ["vertical_and_slash", 10]}], r"\[pattern_name, vertical_size, slash_size, score\]"),
        ([{"0": ["vertical_and_slash", 10, 0, 1]}], "layer 0 head 0: VerticalSlash.slash"),
        ([{"0": ["stream_llm", 1, 2, 0]}, {"0": ["stream_llm", 1, 2, 0], "1": ["stream_llm", 1, 2, 0]}],
         "different head counts"),
    ],
)
def test_malformed_files_fail_clearly(data, match, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        load_minference_config(path)


def test_model_shape_checked():
    model = make_model("llama")  # 2 layers x 4 heads
    cfg = load_minference_config(fixture(2, 4), model)
    assert (cfg.num_key_value_heads, cfg.head_dim) == (2, 16)
    with pytest.raises(ValueError, match="3 layers x 4 heads, but the model has 2 layers x 4 query heads"):
        load_minference_config(fixture(3, 4), model)


@pytest.mark.skipif(SHARED is None, reason="MInference sample configs not present (../shared/minference_configs)")
@pytest.mark.parametrize(
    "name, layers, heads",
    [
        ("Llama_3.1_8B_Instruct_128k_kv_out_v32_fit_o_best_pattern.json", 32, 32),
        ("Phi_3_mini_128k_instruct_kv_out_v32_fit_o_best_pattern.json", 32, 32),
        ("GLM_4_9B_1M_instruct_kv_out_v32_fit_o_best_pattern.json", 40, 32),
        ("Qwen2.5_7B_Instruct_1M.json", 28, 28),
        ("Yi_9B_200k_kv_out_v32_fit_o_best_pattern.json", 48, 32),
    ],
)
def test_real_minference_files(name, layers, heads):
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"{name} not present")
    cfg = load_minference_config(path)
    assert (cfg.num_layers, cfg.num_heads) == (layers, heads)
    raw = json.loads(path.read_text())
    for i in (0, layers - 1):
        for h in range(heads):
            kind, v, s, _ = raw[i][str(h)]
            expected = fi.VerticalSlash(v, s) if kind == "vertical_and_slash" else fi.AShape(v, s)
            assert cfg.layers[i][h] == expected


@pytest.mark.skipif(SHARED is None, reason="MInference sample configs not present")
def test_all_real_files_load():
    files = sorted(os.listdir(SHARED))
    assert files
    for name in files:
        cfg = load_minference_config(SHARED / name)
        kinds = {type(p) for layer in cfg.layers for p in layer}
        assert kinds <= {fi.VerticalSlash, fi.AShape}, name
    phi = load_minference_config(SHARED / "Phi_3_mini_128k_instruct_kv_out_v32_fit_o_best_pattern.json")
    assert phi.layers[8][1] == fi.AShape(sink=100, local=800)  # one of its stream_llm heads
