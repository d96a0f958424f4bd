"""One matrix over every KV policy on tiny random Llama / Qwen3 models (plus Mistral / Qwen2 for the
query capture), checked against DynamicCache and brute-force references."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from transformers import DynamicCache

from flexinference.cache import (
    KIVICache,
    PyramidKVCache,
    SnapKVCache,
    StreamingLLMCache,
    attach,
    pyramid_budgets,
)
from flexinference.cache.hooks import window_queries
from tests.cache.reference import (
    allowed_mask,
    assert_top_selection,
    eager_hook,
    pyramid_reference,
    snapkv_reference_scores,
    tiny_model,
)

LOGITS_ATOL = 2e-5  # fp32 tiny models: eager vs sdpa, masked dense vs compressed cache
warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)

# Budgets that cover every sequence of these tests: the policy must equal DynamicCache exactly.
FULL_BUDGET = {
    "streaming": lambda: StreamingLLMCache(sink=4, window=500),
    "snapkv": lambda: SnapKVCache(budget=500, window=4, kernel_size=3),
    "pyramidkv": lambda: PyramidKVCache(budget=500, window=4, kernel_size=3),
    "kivi2": lambda: KIVICache(bits=2, group_size=16, residual_length=500),
    "kivi4": lambda: KIVICache(bits=4, group_size=16, residual_length=500),
}
# Small budgets: (factory, per-layer budget(num_layers, tokens_seen), compresses on decode steps too)
SMALL_BUDGET = {
    "streaming": (lambda: StreamingLLMCache(sink=4, window=12, track_positions=True), lambda L, n: (16,) * L, True),
    "snapkv_avg": (
        lambda: SnapKVCache(budget=20, window=4, kernel_size=3, pooling="avg", track_positions=True),
        lambda L, n: (20,) * L,
        False,
    ),
    "snapkv_max": (
        lambda: SnapKVCache(budget=20, window=6, kernel_size=5, pooling="max", track_positions=True),
        lambda L, n: (20,) * L,
        False,
    ),
    "pyramidkv": (
        lambda: PyramidKVCache(budget=20, window=4, kernel_size=3, beta=4, track_positions=True),
        lambda L, n: pyramid_budgets(20, 4, 4, L, n),
        False,
    ),
}


def cache_kw(model, cache) -> dict:
    """transformers >= 5.2x names the argument `cache`, 5.17 `past_key_values`."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def generate(model, ids, cache, new_tokens=8, **kw):
    return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, **cache_kw(model, cache), **kw)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("policy", sorted(FULL_BUDGET))
def test_full_budget_generate_equals_dynamic_cache(family, policy):
    model = tiny_model(family)
    ids = torch.randint(0, 128, (2, 37), generator=torch.Generator().manual_seed(1))
    expected = generate(model, ids, DynamicCache())
    cache = FULL_BUDGET[policy]()
    with attach(model, cache):
        got = generate(model, ids, cache)
    assert torch.equal(got, expected)
    stats = cache.stats()
    assert stats.tokens_seen == 37 + 8 - 1 == cache.get_seq_length()
    assert stats.tokens_kept == (stats.tokens_seen,) * 3
    assert stats.nbytes == stats.dense_nbytes == 3 * 2 * 2 * stats.tokens_seen * 16 * 2 * 4


def _expected_kept(kept, q_len, budget, every_step):
    total = kept + q_len
    return budget if total > budget and (every_step or q_len > 1) else total


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("policy", sorted(SMALL_BUDGET))
def test_small_budget_matches_references(policy, family, attn, monkeypatch):
    """Lockstep over prefill, decode steps, a second-turn prompt and more decode steps:

    * logits equal a dense run whose attention is masked to exactly the tokens the policy kept
      (so positions / RoPE phases of kept keys and of new tokens are right after eviction);
    * kept tokens equal the brute-force SnapKV selection of the recorded queries and keys;
    * kept counts follow the documented budgets and ``nbytes`` matches them exactly.
    """
    factory, budgets, every_step = SMALL_BUDGET[policy]
    model = tiny_model(family, attn="eager")
    cache, ref_cache = factory(), DynamicCache()
    layers, heads_kv, head_dim, batch = 3, 2, 16, 2
    gen = torch.Generator().manual_seed(2)
    chunks = [torch.randint(0, 128, (batch, n), generator=gen) for n in (40, 1, 1, 1, 12, 1, 1, 3, 1)]
    state: dict = {"ref": False, "records": {}}

    def on_call(mod, query, key, value, mask, scaling):
        if state["ref"]:
            return allowed_mask(state["kept"][mod.layer_idx], state["seen"], query.shape[2], query.shape[1])
        state["records"][mod.layer_idx] = (query.detach().clone(), key.detach().clone(), scaling)
        return None

    kept_counts = [0] * layers
    with eager_hook(model, monkeypatch, on_call), attach(model, cache), torch.no_grad():
        for chunk in chunks:
            seen, q_len = cache.get_seq_length(), chunk.shape[1]
            kept_before = [cache.kept_positions(i).clone() if seen else None for i in range(layers)]
            state.update(ref=False, records={})
            model.set_attn_implementation(attn)
            logits = model(chunk, **cache_kw(model, cache)).logits
            model.set_attn_implementation("eager")
            state.update(ref=True, kept=kept_before, seen=seen)
            expected = model(chunk, **cache_kw(model, ref_cache)).logits
            torch.testing.assert_close(logits, expected, atol=LOGITS_ATOL, rtol=0)

            assert cache.get_seq_length() == seen + q_len
            layer_budgets = budgets(layers, seen + q_len)
            for layer in range(layers):
                kept_counts[layer] = _expected_kept(kept_counts[layer], q_len, layer_budgets[layer], every_step)
                positions = cache.kept_positions(layer)
                assert positions.shape == (batch, heads_kv, kept_counts[layer])
                new_pos = torch.arange(seen, seen + q_len, dtype=torch.int32).expand(batch, heads_kv, q_len)
                full_pos = new_pos if kept_before[layer] is None else torch.cat([kept_before[layer], new_pos], -1)
                compressed = full_pos.shape[-1] > kept_counts[layer]
                if policy == "streaming":
                    expected_pos = torch.cat([full_pos[..., :4], full_pos[..., -12:]], -1) if compressed else full_pos
                    assert torch.equal(positions, expected_pos)
                elif compressed and state["records"]:
                    _check_selection(cache, layer, state["records"][layer], full_pos, positions, kept_counts[layer])
                elif not compressed:
                    assert torch.equal(positions, full_pos)
            per_token = batch * heads_kv * (2 * head_dim * 4 + 4)  # fp32 K and V + int32 position
            assert cache.nbytes() == per_token * sum(kept_counts)
            assert cache.stats().tokens_kept == tuple(kept_counts)
    assert max(kept_counts) < cache.get_seq_length()  # something was evicted


def _check_selection(cache, layer, record, full_pos, positions, budget):
    query, key, scaling = record
    cfg = cache.config
    assert key.shape[2] == full_pos.shape[-1]
    scores = snapkv_reference_scores(query, key, cfg.window, scaling, cfg.kernel_size, cfg.pooling)
    prefix = key.shape[2] - cfg.window
    for b in range(key.shape[0]):
        for h in range(key.shape[1]):
            # map kept original positions back to indices into this update's keys
            index = torch.searchsorted(full_pos[b, h].long(), positions[b, h].long())
            assert torch.equal(full_pos[b, h][index], positions[b, h])
            assert torch.equal(index[-cfg.window :], torch.arange(prefix, key.shape[2]))
            assert_top_selection(index[: budget - cfg.window], scores[b, h], budget - cfg.window)


@pytest.mark.parametrize("policy", ["streaming", "snapkv_avg", "pyramidkv"])
def test_multi_turn_generate_reuses_compressed_cache(policy):
    """Turn 2 = turn 1 prompt + answer + new prompt: generate feeds only the unseen tokens, the kept
    cache is reused (re-compressed to budget when over it) and positions continue from tokens seen."""
    factory, budgets, every_step = SMALL_BUDGET[policy]
    model = tiny_model("llama")
    prompt1 = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    prompt2 = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(4))
    cache = factory()
    with attach(model, cache):
        turn1 = generate(model, prompt1, cache, new_tokens=5)
        assert cache.get_seq_length() == 44
        turn2 = generate(model, torch.cat([turn1, prompt2], 1), cache, new_tokens=5)
    assert torch.equal(turn2[:, : turn1.shape[1]], turn1)
    seen = turn1.shape[1] + 10 + 4
    assert cache.get_seq_length() == seen
    for layer in range(3):
        budget = budgets(3, turn1.shape[1] + 10)[layer]
        expected = budgets(3, seen)[layer] if every_step else budget + 4
        assert cache.tokens_kept(layer) == expected
        positions = cache.kept_positions(layer)
        assert positions[..., -1].eq(seen - 1).all() and positions.diff(dim=-1).gt(0).all()


@pytest.mark.parametrize(
    "factory",
    [
        lambda: StreamingLLMCache(sink=2, window=5, track_positions=True),
        lambda: SnapKVCache(budget=6, window=2, kernel_size=1, track_positions=True),
        lambda: KIVICache(bits=2, group_size=4, residual_length=0),
    ],
)
def test_batch_reorder_reset_and_crop(factory):
    cache = factory()
    keys = torch.randn(2, 2, 9, 8)
    if cache.needs_query_capture:
        cache.set_window_queries(0, torch.randn(2, 4, 2, 8))
    full_k, _ = cache.update(keys, keys + 1, 0)
    assert torch.equal(full_k, keys) or isinstance(cache, KIVICache)
    layer = cache.layers[0]
    before = {name: getattr(layer, name).clone() for name in layer._state_names() if getattr(layer, name) is not None}
    cache.reorder_cache(torch.tensor([1, 0]))
    for name, tensor in before.items():
        assert torch.equal(getattr(layer, name), tensor.flip(0)), name
    cache.batch_select_indices(torch.tensor([1]))
    assert layer.keys.shape[0] == 1
    with pytest.raises(NotImplementedError, match="cropped"):
        cache.crop(-1)
    seen = cache.get_seq_length()
    assert seen == 9 and cache.tokens_kept() < 9 or isinstance(cache, KIVICache)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0 and not layer.is_initialized


def test_pyramid_budgets_follow_methods_formula():
    for capacity, window, beta, layers, tokens in [
        (4096, 32, 20, 32, 131072),
        (4096, 32, 20, 32, 9000),  # max clipped to N - W
        (4096, 32, 20, 32, 7000),  # N < 2 (C - W): plain SnapKV
        (4096, 32, 20, 32, 4000),  # N < C: nothing to compress
        (20, 4, 4, 3, 40),
        (100, 8, 3, 7, 1000),
        (64, 8, 20, 1, 1000),
    ]:
        got = pyramid_budgets(capacity, window, beta, layers, tokens)
        real = pyramid_reference(capacity, window, beta, layers, tokens)
        assert len(got) == layers
        assert sum(got) == layers * capacity  # same total as SnapKV
        assert all(a >= b for a, b in zip(got, got[1:], strict=False))
        assert all(abs(g - window - r) < 1 for g, r in zip(got, real, strict=True))
        assert all(window <= g <= max(tokens, capacity) for g in got)


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "qwen2"])
def test_query_capture_equals_attention_queries(family, monkeypatch):
    model = tiny_model(family, attn="eager")
    cache = SnapKVCache(budget=12, window=5, kernel_size=1)
    seen_queries, captured = {}, {}
    original = cache.set_window_queries

    def spy(layer_idx, queries, scaling=None):
        captured[layer_idx] = (queries.clone(), scaling)
        original(layer_idx, queries, scaling)

    monkeypatch.setattr(cache, "set_window_queries", spy)

    def on_call(mod, query, key, value, mask, scaling):
        seen_queries[mod.layer_idx] = (query.clone(), scaling)

    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(5))
    with eager_hook(model, monkeypatch, on_call), attach(model, cache), torch.no_grad():
        model(ids, **cache_kw(model, cache))
    assert sorted(captured) == [0, 1, 2]
    for layer, (queries, scaling) in captured.items():
        torch.testing.assert_close(queries, seen_queries[layer][0][:, :, -5:], atol=1e-6, rtol=0)
        assert scaling == seen_queries[layer][1]


def test_window_queries_helper_shapes():
    model = tiny_model("qwen3")
    attn = model.model.layers[0].self_attn
    hidden = torch.randn(2, 9, 64)
    cos, sin = model.model.rotary_emb(hidden, torch.arange(9)[None].expand(2, 9))
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    q = window_queries(attn, hidden, (cos, sin), 3, apply_rotary_pos_emb)
    assert q.shape == (2, 4, 3, 16)


def test_hooks_are_removed_and_scoring_policies_need_them():
    model = tiny_model("llama")
    before = sum(len(m._forward_pre_hooks) for m in model.modules())
    cache = SnapKVCache(budget=12, window=4, kernel_size=3)
    with attach(model, cache) as handle:
        assert handle.active
        assert sum(len(m._forward_pre_hooks) for m in model.modules()) == before + 1 + 3
    assert not handle.active
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == before
    ids = torch.randint(0, 128, (1, 20))
    with pytest.raises(RuntimeError, match="attach"):
        model(ids, **cache_kw(model, SnapKVCache(budget=12, window=4, kernel_size=3)))
    # a cache that never needs to compress works without hooks
    out = model(ids, **cache_kw(model, SnapKVCache(budget=64, window=4, kernel_size=3)))
    assert out.logits.shape == (1, 20, 128)


def test_hooks_ignore_calls_with_other_caches():
    model = tiny_model("llama")
    cache = SnapKVCache(budget=12, window=4, kernel_size=3)
    ids = torch.randint(0, 128, (1, 20))
    with attach(model, cache):
        a = model(ids, **cache_kw(model, DynamicCache())).logits
    b = model(ids, **cache_kw(model, DynamicCache())).logits
    assert torch.equal(a, b) and cache.get_seq_length() == 0


@pytest.mark.parametrize("policy", ["streaming", "snapkv_avg", "pyramidkv"])
def test_padded_batches_rejected_by_evicting_policies(policy):
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    cache = SMALL_BUDGET[policy][0]()
    with attach(model, cache), pytest.raises(ValueError, match="padded"):
        generate(model, ids, cache, attention_mask=mask)


def test_kivi_supports_padded_batches():
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    expected = generate(model, ids, DynamicCache(), attention_mask=mask)
    cache = KIVICache(bits=2, group_size=16, residual_length=64)
    with attach(model, cache):
        assert torch.equal(generate(model, ids, cache, attention_mask=mask), expected)


def test_unsupported_models_raise():
    mistral_sliding = tiny_model("mistral", sliding_window=8)
    with pytest.raises(ValueError, match="full-attention"):
        attach(mistral_sliding, StreamingLLMCache())
    from transformers import Phi3Config, Phi3ForCausalLM

    phi = Phi3ForCausalLM(Phi3Config(**{k: v for k, v in _phi_kwargs().items()})).eval()
    with pytest.raises(ValueError, match="model types"):
        attach(phi, SnapKVCache())
    attach(phi, KIVICache(group_size=16)).remove()  # no query capture needed
    with pytest.raises(TypeError, match="PolicyCache"):
        attach(tiny_model("llama"), DynamicCache())


def _phi_kwargs():
    return dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        pad_token_id=0,
        sliding_window=None,
    )


def test_pyramid_num_layers_from_attach_or_constructor():
    model = tiny_model("llama")
    cache = PyramidKVCache(budget=12, window=4, kernel_size=3)
    with attach(model, cache):
        assert cache.num_layers == 3
    with pytest.raises(ValueError, match="num_layers"):
        attach(model, PyramidKVCache(budget=12, window=4, num_layers=5))
    direct = PyramidKVCache(budget=12, window=4, kernel_size=3, num_layers=3)
    assert direct.budgets(100) == pyramid_budgets(12, 4, 20.0, 3, 100)
    with pytest.raises(RuntimeError, match="num_layers"):
        PyramidKVCache(budget=12, window=4).budgets(100)


BAD_PARAMETERS = [
    (StreamingLLMCache, dict(sink=-1), ValueError, "sink"),
    (StreamingLLMCache, dict(window=0), ValueError, "window"),
    (StreamingLLMCache, dict(window=2.5), TypeError, "window"),
    (SnapKVCache, dict(budget=32, window=32), ValueError, "budget"),
    (SnapKVCache, dict(budget=4096.0), TypeError, "budget"),
    (SnapKVCache, dict(window=0), ValueError, "window"),
    (SnapKVCache, dict(kernel_size=4), ValueError, "kernel_size"),
    (SnapKVCache, dict(kernel_size=0), ValueError, "kernel_size"),
    (SnapKVCache, dict(pooling="sum"), ValueError, "pooling"),
    (PyramidKVCache, dict(beta=0.5), ValueError, "beta"),
    (PyramidKVCache, dict(beta="20"), TypeError, "beta"),
    (PyramidKVCache, dict(budget=8, window=8), ValueError, "budget"),
    (PyramidKVCache, dict(num_layers=0), ValueError, "num_layers"),
    (KIVICache, dict(bits=3), ValueError, "bits"),
    (KIVICache, dict(bits=8), ValueError, "bits"),
    (KIVICache, dict(bits=2, group_size=6), ValueError, "group_size"),
    (KIVICache, dict(residual_length=-1), ValueError, "residual_length"),
]


@pytest.mark.parametrize("cls, kwargs, error, name", BAD_PARAMETERS)
def test_bad_parameters_raise_naming_the_argument(cls, kwargs, error, name):
    with pytest.raises(error, match=name):
        cls(**kwargs)


def test_kivi_group_size_must_divide_head_dim():
    model = tiny_model("llama")  # head_dim 16
    with pytest.raises(ValueError, match="group_size"):
        model(torch.randint(0, 128, (1, 8)), **cache_kw(model, KIVICache(group_size=32)))


def test_snapkv_scores_match_reference_with_gqa():
    from flexinference.cache import snapkv_scores

    gen = torch.Generator().manual_seed(6)
    q = torch.randn(2, 6, 5, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, 23, 8, generator=gen, dtype=torch.float64)
    for pooling, kernel in [("avg", 1), ("avg", 5), ("max", 3)]:
        got = snapkv_scores(q, k, 23 - 7, scaling=0.3, kernel_size=kernel, pooling=pooling)
        ref = snapkv_reference_scores(q, k, 7, 0.3, kernel, pooling)[..., :16]
        # reference window = 7 but only 5 queries: scores cover the first N - 7 tokens
        torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", sorted(FULL_BUDGET))
def test_cuda_bf16_full_budget_equals_dynamic_cache_and_small_budget_runs(policy):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_model("qwen3").to(device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(11)).cuda()
    expected = generate(model, ids, DynamicCache())
    cache = FULL_BUDGET[policy]()
    with attach(model, cache):
        assert torch.equal(generate(model, ids, cache), expected)
    small = {
        "streaming": lambda: StreamingLLMCache(sink=4, window=60),
        "snapkv": lambda: SnapKVCache(budget=64, window=8),
        "pyramidkv": lambda: PyramidKVCache(budget=64, window=8),
        "kivi2": lambda: KIVICache(bits=2, group_size=16, residual_length=16),
        "kivi4": lambda: KIVICache(bits=4, group_size=16, residual_length=16),
    }[policy]()
    with attach(model, small):
        out = generate(model, ids, small)
    assert out.shape == expected.shape and torch.equal(out[:, :301], expected[:, :301])  # exact prefill
    assert small.nbytes() < small.dense_nbytes()
