"""ModelConfig / LayerPlan validation and our JSON format."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import flexinference as fi
from flexinference.attention import Impl
from flexinference.config import LayerPlan, ModelConfig, load_config, save_config

any_pattern = st.one_of(
    st.just(fi.Dense()),
    st.builds(fi.AShape, sink=st.integers(0, 300), local=st.integers(1, 5000)),
    st.builds(fi.TriShape, sink=st.integers(0, 300), local=st.integers(1, 5000), last=st.integers(0, 200)),
    st.builds(fi.VerticalSlash, vertical=st.integers(0, 4000), slash=st.integers(1, 9000), last_q=st.integers(1, 128)),
    st.builds(fi.VerticalSlashStatic, columns=st.lists(st.integers(0, 100), max_size=5).map(tuple),
              diagonals=st.lists(st.integers(0, 100), max_size=5).map(tuple)),
    st.builds(fi.BlockTopK, block=st.sampled_from([16, 64, 128]), topk=st.integers(1, 200)),
    st.builds(fi.Dilated, sink=st.integers(0, 2048), band=st.integers(0, 4096), span=st.integers(0, 9000),
              dilation=st.integers(1, 4)),
    st.builds(fi.Strided, stride=st.integers(1, 128), local=st.integers(1, 1024), sink=st.integers(0, 64)),
    st.builds(fi.FlexPrefill, gamma=st.floats(0.05, 1.0), tau=st.floats(0.0, 1.0)),
    st.builds(fi.XAttention, stride=st.sampled_from([4, 8, 16]), threshold=st.floats(0.05, 1.0)),
)


@st.composite
def model_configs(draw):
    heads = draw(st.integers(1, 4))
    layers = draw(st.integers(1, 3))
    return ModelConfig(
        layers=[draw(st.lists(any_pattern, min_size=heads, max_size=heads)) for _ in range(layers)],
        min_sparse_len=draw(st.integers(1, 10**6)),
        prefill_chunk_size=draw(st.one_of(st.none(), st.integers(1, 10**5))),
        impl=draw(st.sampled_from(list(Impl))),
        model_name=draw(st.one_of(st.none(), st.text(max_size=10))),
    )


@settings(max_examples=40, deadline=None)
@given(cfg=model_configs())
def test_json_round_trip(cfg, tmp_path_factory):
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert ModelConfig.load(path) == cfg


def test_file_is_one_layer_per_line_and_valid_json(tmp_path):
    cfg = ModelConfig.uniform(fi.AShape(), num_layers=3, num_heads=2)
    cfg.save(tmp_path / "c.json")
    text = (tmp_path / "c.json").read_text()
    assert sum('"pattern": "a_shape"' in line for line in text.splitlines()) == 3
    assert json.loads(text)["layers"][2][1] == {"pattern": "a_shape", "sink": 128, "local": 3968}


def test_layer_given_once_for_all_heads():
    data = ModelConfig.uniform(fi.Dense(), num_layers=2, num_heads=3).to_dict()
    data["layers"][1] = {"pattern": "a_shape", "sink": 4, "local": 8}
    cfg = ModelConfig.from_dict(data)
    assert cfg.layers[1] == (fi.AShape(4, 8),) * 3
    del data["num_heads"]
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig.from_dict(data)


def test_uniform_default_is_vertical_slash():
    cfg = ModelConfig.uniform(num_layers=2, num_heads=4)
    assert cfg.layers == ((fi.VerticalSlash(1000, 6096),) * 4,) * 2
    assert cfg.min_sparse_len == 4096 and cfg.prefill_chunk_size is None and cfg.impl is Impl.AUTO


def test_layer_plan_derived_fields():
    plan = ModelConfig.uniform([fi.Dense(), fi.AShape()], num_layers=1, num_heads=2, min_sparse_len=7).layer_plan(0)
    assert plan.sparse and plan.num_heads == 2 and plan.min_sparse_len == 7
    assert plan.kernel_patterns == (fi.Dense(), fi.AShape())
    uniform = LayerPlan((fi.AShape(),) * 3)
    assert uniform.kernel_patterns == fi.AShape()
    assert not LayerPlan([fi.Dense()] * 2).sparse
    with pytest.raises(ValueError, match="layer_idx"):
        ModelConfig.uniform(num_layers=2, num_heads=1).layer_plan(2)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(layers=[]), TypeError, "non-empty"),
        (dict(layers=[fi.Dense()]), TypeError, r"layers\[0\]"),
        (dict(layers=[[fi.Dense()], [fi.Dense(), fi.Dense()]]), ValueError, "same, non-zero number of heads"),
        (dict(layers=[["dense"]]), TypeError, r"layers\[0\]\[0\]"),
        (dict(layers=[[fi.Dense()]], min_sparse_len=0), ValueError, "min_sparse_len"),
        (dict(layers=[[fi.Dense()]], min_sparse_len=True), TypeError, "min_sparse_len"),
        (dict(layers=[[fi.Dense()]], prefill_chunk_size=0), ValueError, "prefill_chunk_size"),
        (dict(layers=[[fi.Dense()]], impl="fast"), ValueError, "impl"),
        (dict(layers=[[fi.Dense()] * 4], num_key_value_heads=3), ValueError, "num_key_value_heads"),
        (dict(layers=[[fi.Dense()]], head_dim=-1), ValueError, "head_dim"),
        (dict(layers=[[fi.Dense()]], model_name=3), TypeError, "model_name"),
    ],
)
def test_bad_model_config(kwargs, error, match):
    with pytest.raises(error, match=match):
        ModelConfig(**kwargs)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.update(format="other"), "not a flexinference config"),
        (lambda d: d.update(version=99), "unsupported config version"),
        (lambda d: d.update(extra=1), "unknown config key"),
        (lambda d: d.update(layers=[]), "non-empty list"),
        (lambda d: d.update(num_layers=5), "'num_layers' is 5"),
        (lambda d: d["layers"][0].__setitem__(0, {"pattern": "nope"}), "unknown pattern 'nope'"),
        (lambda d: d["layers"][0].__setitem__(0, {"pattern": "a_shape", "size": 3}), r"layers\[0\].*unknown field"),
        (lambda d: d["layers"].__setitem__(0, "dense"), r"layers\[0\] must be"),
    ],
)
def test_bad_json(mutate, match, tmp_path):
    data = ModelConfig.uniform(fi.AShape(), num_layers=2, num_heads=2).to_dict()
    mutate(data)
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="bad.json"):
        load_config(path)


def test_not_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(path)
