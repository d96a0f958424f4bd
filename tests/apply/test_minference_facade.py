"""The MInference-compatible facade: strings -> patterns / cache policies, patching, errors."""

from __future__ import annotations

import json

import pytest
import torch
from flexinference.compat.minference import (
    MInference,
    MInferenceConfig,
    get_support_models,
)

import flexinference as fi
from flexinference.patching import attention_modules, is_applied, remove
from flexinference.cache import StreamingLLMCache
from flexinference.hf_attention import PLAN_ATTR

from .helpers import (
    FAMILIES,
    assert_close_on_real,
    cache_kw,
    inputs,
    make_model,
    reference_model,
)

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.mark.parametrize(
    "attn_type, attn_kwargs, expected",
    [
        ("dense", {}, fi.Dense()),
        ("hf", {}, fi.Dense()),
        ("minference", {}, fi.VerticalSlash(1000, 6096)),
        ("minference", {"vertical_size": 50, "slash_size": 70}, fi.VerticalSlash(50, 70)),
        ("a_shape", {}, fi.AShape(128, 3968)),
        ("a_shape", {"n_init": 4, "n_local": 64}, fi.AShape(4, 64)),
        ("tri_shape", {"n_init": 4, "n_local": 64, "n_last": 8}, fi.TriShape(4, 64, 8)),
        ("dilated1", {}, fi.Dilated.dilated1()),
        ("dilated2", {}, fi.Dilated.dilated2()),
        ("static", {"columns": [0, 5], "diagonals": [0, 3]}, fi.VerticalSlashStatic((0, 5), (0, 3))),
        ("flexprefill", {"gamma": 0.95, "tau": 0.2}, fi.FlexPrefill(gamma=0.95, tau=0.2)),
        ("xattention", {"stride": 16, "threshold": 0.8}, fi.XAttention(stride=16, threshold=0.8)),
    ],
)
def test_attn_type_maps_to_pattern(attn_type, attn_kwargs, expected):
    facade = MInference(attn_type, attn_kwargs=attn_kwargs)
    assert facade.config.pattern() == expected
    model = facade(make_model("llama"))
    assert all(getattr(m, PLAN_ATTR).kernel_patterns == expected for m in attention_modules(model))


def test_available_types():
    attn = MInferenceConfig.get_available_attn_types()
    assert {"dense", "minference", "static", "a_shape", "tri_shape", "dilated1", "dilated2", "flexprefill",
            "xattention"} <= set(attn)
    kv = MInferenceConfig.get_available_kv_types()
    assert {"dense", "streamingllm", "snapkv", "pyramidkv", "kivi"} <= set(kv)
    assert "quest" not in kv and "retr_attn" not in kv and "vllm" not in attn
    assert set(get_support_models()) == {"llama", "mistral", "qwen2", "qwen3", "phi3", "glm", "glm4"}
    assert {FAMILIES[f][0].model_type for f in FAMILIES} <= set(get_support_models())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(attn_type="vllm"), ValueError, r"'vllm' is not available .vLLM integration.*available: \['dense'"),
        (dict(attn_type="inf_llm"), ValueError, "InfLLM is not implemented"),
        (dict(attn_type="sparse_magic"), ValueError, r"unknown attn_type 'sparse_magic'; available"),
        (dict(kv_type="quest"), ValueError, r"'quest' is not available \(Quest.*available: \['dense', 'streamingllm'"),
        (dict(kv_type="retr_attn"), ValueError, "RetrievalAttention is not implemented"),
        (dict(kv_type="h2o"), ValueError, "unknown kv_type 'h2o'"),
        (dict(attn_type="a_shape", attn_kwargs={"n_sink": 1}), ValueError, r"'n_sink'; valid: \['local', 'n_init'"),
        (dict(attn_type="a_shape", attn_kwargs={"n_local": 0}), ValueError, "AShape.local must be >= 1"),
        (dict(attn_type="dilated1", attn_kwargs={"n_init": 1}), ValueError, "valid: none"),
        (dict(attn_type="static"), ValueError, "columns=.*diagonals="),
        (dict(attn_type="a_shape", config_path="x.json"), ValueError, "attn_type='minference' only"),
        (dict(config_path="x.json", attn_kwargs={"vertical_size": 3}), ValueError, "cannot be combined"),
        (dict(kv_kwargs={"budget": 3}), ValueError, "kv_type is 'dense'"),
        (dict(kv_cache_cpu=True), ValueError, "kv_cache_cpu=True is not supported"),
        (dict(is_search=True), ValueError, "is_search"),
        (dict(gpu_only=True), TypeError, r"unknown MInference argument\(s\) \['gpu_only'\]"),
        (dict(attn_kwargs=[1]), TypeError, "attn_kwargs must be a dict"),
        (dict(starting_layer="2"), TypeError, "starting_layer"),
    ],
)
def test_rejections_list_what_exists(kwargs, error, match):
    with pytest.raises(error, match=match):
        MInference(**kwargs)


def test_bad_kv_kwargs_fail_when_the_cache_is_built():
    facade = MInference("dense", kv_type="snapkv", kv_kwargs={"capacity": 10})
    with pytest.raises(ValueError, match="kv_kwargs for kv_type='snapkv' .SnapKVCache."):
        facade.config.make_cache()


def test_kv_kwargs_aliases():
    cache = MInference("dense", kv_type="streamingllm", kv_kwargs={"n_init": 4, "n_local": 60}).config.make_cache()
    assert isinstance(cache, StreamingLLMCache)
    assert (cache.config.sink, cache.config.window) == (4, 60)


def test_config_path_with_model_name_and_starting_layer(tmp_path):
    path = tmp_path / "best.json"
    path.write_text(json.dumps([{str(h): ["stream_llm", 2, 8, 0.9] for h in range(4)} for _ in range(2)]))
    model = MInference("minference", "my/model", config_path=str(path), starting_layer=1, min_sparse_len=8)(
        make_model("llama"))
    plans = [getattr(m, PLAN_ATTR) for m in attention_modules(model)]
    assert plans[0].kernel_patterns == fi.Dense() and not plans[0].sparse
    assert plans[1].kernel_patterns == fi.AShape(2, 8) and plans[1].min_sparse_len == 8
    assert model._flexinference_state.config.model_name == "my/model"


def test_patched_model_equals_reference():
    model = make_model("glm4")
    ids, mask = inputs(2, 40, (0, 5))
    ref = reference_model(model, fi.TriShape(sink=2, local=6, last=4), min_sparse_len=16)
    model = MInference("tri_shape", attn_kwargs={"n_init": 2, "n_local": 6, "n_last": 4}, min_sparse_len=16)(model)
    with torch.no_grad():
        assert_close_on_real(model(input_ids=ids, attention_mask=mask).logits,
                             ref(input_ids=ids, attention_mask=mask).logits, mask)


def test_kv_type_generate_uses_the_policy_and_remove_restores():
    model = make_model("llama")
    ids, _ = inputs(1, 30)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **kw)
    facade = MInference("a_shape", kv_type="streamingllm", attn_kwargs={"n_init": 0, "n_local": 10**6},
                        kv_kwargs={"n_init": 4, "n_local": 10**6}, min_sparse_len=8)
    model = facade.patch_model(model)
    out = model.generate(ids, return_dict_in_generate=True, **kw)
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    assert isinstance(cache, StreamingLLMCache)
    assert torch.equal(out.sequences, expected)  # budgets cover everything: exact
    own = StreamingLLMCache(sink=1, window=8)  # a caller's cache is used as given
    model.generate(ids, **cache_kw(model, own), **kw)
    assert own.get_seq_length() > 0
    remove(model)
    assert not is_applied(model) and "generate" not in model.__dict__
    assert torch.equal(model.generate(ids, **kw), expected)


def test_repr_names_the_settings():
    assert "attn_type='a_shape'" in repr(MInference("a_shape"))


def test_config_path_in_our_format_keeps_its_runtime_settings(tmp_path):
    from flexinference.compat import MInference
    from flexinference.patching import remove as fi_remove
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128)).eval()
    path = tmp_path / "ours.json"
    fi.ModelConfig.uniform(fi.AShape(sink=4, local=64), num_layers=2, num_heads=4, min_sparse_len=64,
                           prefill_chunk_size=128, impl="flex_eager").save(path)
    MInference("minference", config_path=str(path))(model)
    cfg = model._flexinference_state.config
    assert (cfg.min_sparse_len, cfg.prefill_chunk_size, cfg.impl) == (64, 128, fi.Impl.FLEX_EAGER)
    fi_remove(model)
    MInference("minference", config_path=str(path), min_sparse_len=256)(model)
    assert model._flexinference_state.config.min_sparse_len == 256
