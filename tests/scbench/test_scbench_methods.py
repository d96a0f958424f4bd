import pytest
import torch
from transformers import DynamicCache

import flexinference.cache
from flexinference.patterns import AShape, BlockTopK, Dilated, FlexPrefill, TriShape, VerticalSlash, XAttention
from flexinference.scbench.methods import (
    METHODS,
    Method,
    MethodUnavailableError,
    Patch,
    PatternPrefill,
    build_method,
    register_method,
)


def test_dense_and_unknown():
    assert build_method("dense") == Method("dense")
    with pytest.raises(ValueError) as err:
        build_method("minferenc")
    assert "unknown method 'minferenc'" in str(err.value) and "dense" in str(err.value) and "snapkv" in str(err.value)
    with pytest.raises(ValueError, match="takes no arguments"):
        build_method("dense", {"dense": {"x": 1}})


@pytest.mark.parametrize(
    "name, pattern",
    [
        ("minference", VerticalSlash()),
        ("a_shape", AShape()),
        ("tri_shape", TriShape()),
        ("block_topk", BlockTopK()),
        ("flexprefill", FlexPrefill()),
        ("xattention", XAttention()),
        ("dilated1", Dilated.dilated1()),
        ("dilated2", Dilated.dilated2()),
    ],
)
def test_pattern_methods(name, pattern):
    method = build_method(name)
    assert method.name == name and method.prefill == PatternPrefill(pattern) and method.cache_factory is None


def test_pattern_method_kwargs():
    method = build_method("a_shape", {"a_shape": {"sink": 4, "local": 64, "apply_options": {"min_sparse_len": 128}}})
    assert method.prefill == PatternPrefill(AShape(sink=4, local=64), {"min_sparse_len": 128})
    assert build_method("dilated2", {"dilated2": {"sink": 8}}).prefill.pattern == Dilated(sink=8, band=2048, span=6144)
    with pytest.raises(ValueError, match="AShape.local must be >= 1"):
        build_method("a_shape", {"a_shape": {"local": 0}})


class FakeSnapKV(DynamicCache):
    def __init__(self, budget=4096, window=32):
        super().__init__()
        self.budget, self.window = budget, window


@pytest.mark.parametrize(
    "name, cls_name",
    [
        ("streamingllm", "StreamingLLMCache"),
        ("snapkv", "SnapKVCache"),
        ("pyramidkv", "PyramidKVCache"),
        ("kivi", "KIVICache"),
    ],
)
def test_cache_methods_resolve_lazily(monkeypatch, name, cls_name):
    monkeypatch.delattr(flexinference.cache, cls_name, raising=False)
    with pytest.raises(MethodUnavailableError, match=f"method '{name}' is unavailable: flexinference.cache.{cls_name}"):
        build_method(name)
    monkeypatch.setattr(flexinference.cache, cls_name, FakeSnapKV, raising=False)
    method = build_method(name, {name: {"budget": 8}})
    cache = method.new_cache(model=None)
    assert isinstance(cache, FakeSnapKV) and cache.budget == 8 and cache.window == 32


def test_combinations(monkeypatch):
    monkeypatch.setattr(flexinference.cache, "SnapKVCache", FakeSnapKV, raising=False)
    combo = build_method("a_shape+snapkv", {"snapkv": {"budget": 16}})
    assert combo.name == "a_shape+snapkv" and combo.prefill == PatternPrefill(AShape())
    assert combo.new_cache(None).budget == 16
    with pytest.raises(ValueError, match="at most one prefill method and one cache method"):
        build_method("a_shape+minference")


def test_register_method(monkeypatch):
    monkeypatch.setattr("flexinference.scbench.methods.METHODS", dict(METHODS))
    from flexinference.scbench import methods

    register_method("mine", lambda **kw: Method("mine", prefill=Patch(lambda m: m, lambda m: None)))
    assert build_method("mine").name == "mine" and "mine" in methods.METHODS
    with pytest.raises(ValueError, match="already registered"):
        register_method("mine", lambda **kw: Method("mine"))
    register_method("mine", lambda **kw: Method("other"), replace=True)
    assert build_method("mine").name == "other"
    with pytest.raises(ValueError, match="without '\\+'"):
        register_method("a+b", lambda **kw: Method("x"))
    with pytest.raises(TypeError, match="factory must be callable"):
        register_method("bad", 3)


def test_method_validation_and_default_cache():
    with pytest.raises(ValueError, match="Method.name"):
        Method("")
    with pytest.raises(TypeError, match="Method.cache_factory must be callable"):
        Method("x", cache_factory=3)
    with pytest.raises(TypeError, match="Patch.unpatch must be callable"):
        Patch(lambda m: m, None)
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, vocab_size=32
    )
    model = torch.nn.Linear(1, 1)
    model.config = config
    cache = Method("dense").new_cache(model)
    assert type(cache) is DynamicCache and len(cache.layers) == 3
