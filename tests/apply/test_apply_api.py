"""apply / remove / patched: reversibility, config resolution and validation errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache, StaticCache

import flexinference as fi
from flexinference.patching import (
    apply,
    attention_modules,
    is_applied,
    patched,
    remove,
    resolve_config,
)
from flexinference.config import ModelConfig
from flexinference.hf_attention import (
    ATTENTION_NAME,
    PLAN_ATTR,
    causal_mask_or_none,
    flexinference_attention,
    is_registered,
    kv_valid_from_mask,
    register,
    unregister,
)

from .helpers import assert_close_on_real, cache_kw, inputs, make_model

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def test_apply_returns_same_model_and_remove_restores_everything():
    model = make_model("llama")
    ids, mask = inputs(2, 30, (0, 4))
    forward_before = model.forward
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    assert apply(model, fi.AShape(sink=1, local=4), min_sparse_len=8) is model
    assert is_applied(model) and is_registered()
    assert model.config._attn_implementation == ATTENTION_NAME
    plans = [getattr(m, PLAN_ATTR) for m in attention_modules(model)]
    assert [p.kernel_patterns for p in plans] == [fi.AShape(1, 4)] * 2 and plans[0].min_sparse_len == 8
    with torch.no_grad():
        changed = model(input_ids=ids, attention_mask=mask).logits
    assert (changed - expected)[mask.bool()].abs().max() > 1e-3
    assert remove(model) is model
    assert not is_applied(model)
    assert model.config._attn_implementation == "sdpa"
    assert "forward" not in model.__dict__ and model.forward == forward_before
    assert all(not hasattr(m, PLAN_ATTR) for m in attention_modules(model))
    with torch.no_grad():
        assert_close_on_real(model(input_ids=ids, attention_mask=mask).logits, expected, mask, atol=0)
    with pytest.raises(ValueError, match="not patched"):
        remove(model)


def test_reapply_replaces_plan_and_keeps_original_attention():
    model = make_model("llama", attn_implementation="eager")
    model.set_attn_implementation("eager")
    apply(model, fi.AShape())
    apply(model, fi.Dense(), min_sparse_len=9)
    assert getattr(attention_modules(model)[0], PLAN_ATTR).min_sparse_len == 9
    with pytest.raises(ValueError, match="3 entries, expected one per head"):
        apply(model, [fi.Dense()] * 3)
    assert getattr(attention_modules(model)[0], PLAN_ATTR).min_sparse_len == 9  # a failed re-apply changes nothing
    remove(model)
    assert model.config._attn_implementation == "eager"


def test_patched_context_manager_removes_on_error():
    model = make_model("llama")
    with pytest.raises(RuntimeError, match="boom"), patched(model, fi.Dense()) as m:
        assert m is model and is_applied(model)
        raise RuntimeError("boom")
    assert not is_applied(model) and model.config._attn_implementation == "sdpa"


def test_unregistered_function_fails_loudly_and_register_is_idempotent():
    model = make_model("llama")
    apply(model)
    unregister()
    assert not is_registered()
    with pytest.raises(KeyError, match="flexinference"):
        model(input_ids=inputs(1, 5)[0])
    register()
    register()
    assert is_registered()
    with torch.no_grad():
        model(input_ids=inputs(1, 5)[0])


def test_attention_function_needs_a_plan_and_no_dropout():
    model = make_model("llama")
    module = attention_modules(model)[0]
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="no flexinference plan"):
        flexinference_attention(module, q, k, k, None, scaling=0.25)
    apply(model)
    with pytest.raises(ValueError, match="dropout"):
        flexinference_attention(module, q, k, k, None, scaling=0.25, dropout=0.1)
    out, weights = flexinference_attention(module, q, k, k, None, scaling=0.25)
    assert out.shape == (1, 5, 4, 16) and weights is None


def test_kv_valid_from_mask():
    mask = torch.ones(2, 1, 3, 6, dtype=torch.bool).tril(3)
    mask[1, :, :, :2] = False
    assert kv_valid_from_mask(mask).tolist() == [[True] * 6, [False, False] + [True] * 4]
    additive = torch.zeros(2, 1, 3, 6).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert torch.equal(kv_valid_from_mask(additive), kv_valid_from_mask(mask))


def test_mask_is_none_exactly_when_causal_queries_last_and_unpadded():
    from transformers.masking_utils import (
        sdpa_mask,
        sliding_window_causal_mask_function,
    )

    kw = dict(batch_size=2, q_length=5, kv_length=12, q_offset=7, kv_offset=0)
    assert causal_mask_or_none(**kw) is None  # a chunk on top of a cache: sdpa_mask would build a tensor
    assert causal_mask_or_none(**kw, attention_mask=torch.ones(2, 12, dtype=torch.bool)) is None
    assert sdpa_mask(**kw) is not None
    padded = torch.ones(2, 12, dtype=torch.bool)
    padded[1, :3] = False
    assert torch.equal(causal_mask_or_none(**kw, attention_mask=padded), sdpa_mask(**kw, attention_mask=padded))
    # an empty static cache: the queries are the first positions, so None would be ambiguous
    static = dict(batch_size=1, q_length=5, kv_length=20, q_offset=0, kv_offset=0)
    assert sdpa_mask(**static) is None
    assert torch.equal(causal_mask_or_none(**static), sdpa_mask(**static, allow_is_causal_skip=False))
    window = dict(kw, mask_function=sliding_window_causal_mask_function(3), local_size=3)
    assert torch.equal(causal_mask_or_none(**window), sdpa_mask(**window))
    assert causal_mask_or_none(**dict(kw, q_length=1, kv_length=8)) is None  # decode, unpadded
    assert causal_mask_or_none(**kw, allow_is_causal_skip=False) is not None


# -- config resolution ----------------------------------------------------------------------------------
def test_default_config_is_vertical_slash_with_model_metadata():
    model = make_model("qwen3")
    cfg = resolve_config(None, model, min_sparse_len=123)
    assert cfg.layers == ((fi.VerticalSlash(),) * 4,) * 2
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.min_sparse_len) == (2, 16, 123)


def test_config_from_our_json_minference_json_and_dict(tmp_path):
    model = make_model("llama")
    ours = ModelConfig.uniform(fi.TriShape(sink=1, local=2, last=3), num_layers=2, num_heads=4)
    ours.save(tmp_path / "ours.json")
    assert resolve_config(str(tmp_path / "ours.json"), model) == ours
    assert resolve_config(tmp_path / "ours.json", model, prefill_chunk_size=8).prefill_chunk_size == 8
    assert resolve_config(ours.to_dict(), model) == ours
    minf = [{str(h): ["stream_llm", 4, 16, 0.5] for h in range(4)} for _ in range(2)]
    (tmp_path / "minf.json").write_text(json.dumps(minf))
    cfg = resolve_config(str(tmp_path / "minf.json"), model)
    assert cfg.layers == ((fi.AShape(sink=4, local=16),) * 4,) * 2
    apply(model, str(tmp_path / "minf.json"))
    assert getattr(attention_modules(model)[1], PLAN_ATTR).kernel_patterns == fi.AShape(4, 16)


@pytest.mark.parametrize(
    "config, overrides, error, match",
    [
        (ModelConfig.uniform(num_layers=3, num_heads=4), {}, ValueError, "3 layers but the model has 2"),
        (ModelConfig.uniform(num_layers=2, num_heads=8), {}, ValueError, "8 heads per layer but the model has 4"),
        (ModelConfig.uniform(num_layers=2, num_heads=4, num_key_value_heads=4), {}, ValueError, "4 KV heads"),
        (ModelConfig.uniform(num_layers=2, num_heads=4, head_dim=64), {}, ValueError, "head_dim 64"),
        (None, {"chunk": 3}, TypeError, "unknown override"),
        (None, {"min_sparse_len": 0}, ValueError, "min_sparse_len"),
        (42, {}, TypeError, "config must be"),
        ("/nonexistent/config.json", {}, ValueError, "is not a file"),
    ],
)
def test_bad_configs_fail_clearly(config, overrides, error, match):
    model = make_model("llama")
    with pytest.raises(error, match=match):
        apply(model, config, **overrides)
    assert not is_applied(model) and model.config._attn_implementation == "sdpa"


def test_not_a_transformers_model():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        apply(torch.nn.Linear(2, 2))


def test_sliding_window_layers_need_dense_patterns():
    model = make_model("mistral", sliding_window=16)
    with pytest.raises(ValueError, match="sliding-window attention .window 16."):
        apply(model, fi.AShape())
    # Dense heads run SDPA with transformers' own sliding-window mask: exact beyond the window.
    ids, mask = inputs(2, 40, (0, 3))
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        apply(model, fi.Dense())
        assert_close_on_real(model(input_ids=ids, attention_mask=mask).logits, expected, mask)


def test_static_cache_rejected_on_sparse_path_only():
    model = make_model("llama")
    ids, _ = inputs(1, 20)
    apply(model, fi.AShape(), min_sparse_len=16)
    with torch.no_grad():
        with pytest.raises(ValueError, match="static"):
            model(input_ids=ids, **cache_kw(model, StaticCache(config=model.config, max_cache_len=64)))
        model(input_ids=ids[:, :10], **cache_kw(model, StaticCache(config=model.config, max_cache_len=64)))  # dense
        model(input_ids=ids, **cache_kw(model, DynamicCache(config=model.config)))
