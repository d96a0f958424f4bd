"""KIVI: packing, round-trip error bound, real bytes, residual semantics, model-level behaviour."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from flexinference.cache import KIVICache, attach
from flexinference.cache.kivi import (
    KIVIConfig,
    KIVILayer,
    dequantize_keys,
    dequantize_values,
    pack_codes,
    quantize_keys,
    quantize_values,
    unpack_codes,
)
from tests.cache.reference import tiny_model
from tests.cache.test_policies import cache_kw, generate

# Half a unit in the last place, relative, of the dequantized output's dtype.
OUTPUT_HALF_ULP = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
FP32_SLACK = 2.0**-20  # fp32 arithmetic of quantize/dequantize, relative to the magnitudes involved


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 4]), shape=st.tuples(st.integers(1, 3), st.integers(1, 5)), m=st.integers(1, 8))
def test_pack_unpack_roundtrip(bits, shape, m):
    per_byte = 8 // bits
    codes = torch.randint(0, 1 << bits, (*shape, m * per_byte), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == m
    assert torch.equal(unpack_codes(packed, bits), codes)


def _group_view(x, kind, group):
    b, h, t, d = x.shape
    if kind == "keys":  # groups along tokens, per channel: reduce dim 3 of (B, H, T/G, G, D)
        return x.reshape(b, h, t // group, group, d), 3
    return x.reshape(b, h, t, d // group, group), 4  # values: groups along channels, per token


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["keys", "values"]),
    bits=st.sampled_from([2, 4]),
    group=st.sampled_from([8, 16, 32]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    groups=st.integers(1, 3),
    offset=st.sampled_from([0.0, 3.0, -50.0]),
    spread=st.sampled_from([1e-3, 1.0, 10.0]),
    seed=st.integers(0, 2**16),
)
def test_roundtrip_error_within_half_scale(kind, bits, group, dtype, groups, offset, spread, seed):
    gen = torch.Generator().manual_seed(seed)
    tokens, dim = (groups * group, 64) if kind == "keys" else (5, groups * group)
    x = (torch.randn(2, 3, tokens, dim, generator=gen) * spread + offset).to(dtype)
    quantize, dequantize = (quantize_keys, dequantize_keys) if kind == "keys" else (quantize_values, dequantize_values)
    packed, scale, minimum = quantize(x, bits, group)
    assert packed.dtype == torch.uint8 and packed.numel() * 8 == x.numel() * bits  # really packed
    assert scale.dtype == minimum.dtype == dtype
    out = dequantize(packed, scale, minimum, bits, group, dtype)
    assert out.shape == x.shape and out.dtype == dtype

    xg, dim_g = _group_view(x.float(), kind, group)
    err = (_group_view(out.float(), kind, group)[0] - xg).abs()
    s, lo = scale.float().unsqueeze(dim_g), minimum.float().unsqueeze(dim_g)
    levels = (1 << bits) - 1
    magnitude = xg.abs() + lo.abs() + levels * s
    bound = s / 2 + FP32_SLACK * magnitude + OUTPUT_HALF_ULP[dtype] * xg.abs()
    assert bool((err <= bound).all()), float((err - bound).max())
    # the stored range covers the group, and the scale is not inflated beyond the dtype's rounding
    assert bool((lo <= xg.amin(dim_g, keepdim=True)).all())
    top = xg.amax(dim_g, keepdim=True)
    assert bool((lo + levels * s >= top - FP32_SLACK * (top.abs() + lo.abs())).all())
    exact = (xg.amax(dim_g, keepdim=True) - lo) / levels
    assert bool((s <= exact * (1 + 4 * OUTPUT_HALF_ULP[dtype]) + 1e-30).all())


@pytest.mark.parametrize("bits, max_ratio", [(2, 0.2), (4, 0.33)])
def test_real_bytes_and_ratio(bits, max_ratio):
    cache = KIVICache(bits=bits, group_size=32, residual_length=32)
    b, h, d, t = 1, 2, 64, 16384 + 40
    k = torch.randn(b, h, t, d, dtype=torch.bfloat16)
    cache.update(k, k.clone(), 0)
    layer = cache.layers[0]
    quantized = layer.tokens_quantized()
    assert quantized == 16384 and layer.keys.shape[-2] == 40
    packed = 2 * b * h * quantized * d * bits // 8
    key_params = 2 * b * h * (quantized // 32) * d * 2
    value_params = 2 * b * h * quantized * (d // 32) * 2
    residual = 2 * b * h * 40 * d * 2
    assert cache.nbytes() == packed + key_params + value_params + residual
    assert cache.dense_nbytes() == 2 * b * h * t * d * 2
    assert cache.stats().bytes_ratio <= max_ratio
    assert cache.tokens_seen() == cache.tokens_kept() == t


@pytest.mark.parametrize("residual", [0, 8, 20])
def test_layer_returns_roundtrip_of_history_and_keeps_residual(residual):
    config = KIVIConfig(bits=2, group_size=8, residual_length=residual)
    layer = KIVILayer(config)
    gen = torch.Generator().manual_seed(7)
    history_k, history_v = [], []
    for q_len in [30, 1, 1, 1, 1, 1, 1, 1, 1, 1, 17, 1, 1, 3]:
        k = torch.randn(2, 2, q_len, 16, generator=gen)
        v = torch.randn(2, 2, q_len, 16, generator=gen)
        quantized_before = layer.tokens_quantized()
        out_k, out_v = layer.update(k, v)
        history_k.append(k)
        history_v.append(v)
        all_k, all_v = torch.cat(history_k, 2), torch.cat(history_v, 2)
        tq = quantized_before
        ref_k = torch.cat(
            [dequantize_keys(*quantize_keys(all_k[:, :, :tq], 2, 8), 2, 8, torch.float32), all_k[:, :, tq:]], 2
        )
        ref_v = torch.cat(
            [dequantize_values(*quantize_values(all_v[:, :, :tq], 2, 8), 2, 8, torch.float32), all_v[:, :, tq:]], 2
        )
        assert torch.equal(out_k, ref_k) and torch.equal(out_v, ref_v)
        seen = all_k.shape[2]
        assert layer.get_seq_length() == seen and layer.tokens_kept() == seen
        r = seen - layer.tokens_quantized()
        assert layer.tokens_quantized() % 8 == 0
        assert r < residual + 8 and (r >= residual or layer.tokens_quantized() == 0)
        assert torch.equal(layer.keys, all_k[:, :, layer.tokens_quantized() :])  # residual is exact
    assert layer.get_mask_sizes(1) == (seen + 1, 0)


def test_model_prefill_state_is_roundtrip_of_dense_cache():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 45), generator=torch.Generator().manual_seed(8))
    dense, cache = DynamicCache(), KIVICache(bits=4, group_size=16, residual_length=0)
    with torch.no_grad():
        a = model(ids, **cache_kw(model, dense)).logits
        b = model(ids, **cache_kw(model, cache)).logits
    assert torch.equal(a, b)  # prefill attends exactly
    for layer_idx, layer in enumerate(cache.layers):
        keys, values = layer.dequantized()
        assert layer.tokens_quantized() == 32
        dk, dv = dense.layers[layer_idx].keys, dense.layers[layer_idx].values
        assert torch.equal(keys, dequantize_keys(*quantize_keys(dk[:, :, :32], 4, 16), 4, 16, torch.float32))
        assert torch.equal(values, dequantize_values(*quantize_values(dv[:, :, :32], 4, 16), 4, 16, torch.float32))
        assert torch.equal(layer.keys, dk[:, :, 32:])


def test_multi_turn_appends_and_quantizes_as_groups_fill():
    model = tiny_model("qwen3")
    prompt1 = torch.randint(0, 128, (1, 37), generator=torch.Generator().manual_seed(9))
    prompt2 = torch.randint(0, 128, (1, 11), generator=torch.Generator().manual_seed(10))
    cache = KIVICache(bits=2, group_size=16, residual_length=16)
    with attach(model, cache):
        turn1 = generate(model, prompt1, cache, new_tokens=6)
        turn2 = generate(model, torch.cat([turn1, prompt2], 1), cache, new_tokens=6)
    seen = turn1.shape[1] + 11 + 5
    assert cache.get_seq_length() == seen
    for layer in cache.layers:
        assert layer.tokens_kept() == seen
        assert layer.tokens_quantized() == (seen - 16) // 16 * 16
    # the first answer token comes from the exact prefill
    dense = generate(model, prompt1, DynamicCache(), new_tokens=1)
    assert torch.equal(turn1[:, : dense.shape[1]], dense)
    assert turn2.shape[1] == turn1.shape[1] + 11 + 6


@pytest.mark.gpu
def test_cuda_matches_cpu_and_bound():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = torch.randn(1, 8, 256, 128, dtype=torch.bfloat16) * 3 + 1
    for quantize, dequantize in [(quantize_keys, dequantize_keys), (quantize_values, dequantize_values)]:
        cpu = quantize(x, 2, 32)
        gpu = quantize(x.cuda(), 2, 32)
        for a, b in zip(cpu, gpu, strict=True):
            assert torch.equal(a, b.cpu())
        out = dequantize(*gpu, 2, 32, torch.bfloat16)
        # one rounding of the same fp32 value; CPU and CUDA may fuse the multiply-add differently
        torch.testing.assert_close(out.cpu(), dequantize(*cpu, 2, 32, torch.bfloat16), atol=0, rtol=2**-7)
