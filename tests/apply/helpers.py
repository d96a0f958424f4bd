"""Tiny random models of every supported family, and a reference model whose attention is dense softmax
restricted to exactly the kept set (the specification the patched model is checked against)."""

from __future__ import annotations

import copy
import inspect
import itertools

import torch
import transformers
from flexinference.masks.tables import dense_keep
from torch import Tensor

import flexinference as fi
from flexinference.patching import apply, attention_modules, resolve_config
from flexinference.compose import build_tables
from flexinference.config import LayerPlan

ATOL = 1e-4  # fp32 logits, patched vs reference (the reference softmax runs in fp64)

BASE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=4096,
)
# family -> (config class, overrides). Phi-3: fused qkv_proj; GLM/GLM-4: partial rotary (factor 0.5 by default);
# Qwen2: qkv bias; Qwen3: q/k RMSNorm; Mistral: window disabled as in v0.2+; Yi: Llama-shaped, GQA ratio 8.
FAMILIES: dict[str, tuple[type, dict]] = {
    "llama": (transformers.LlamaConfig, {}),
    "mistral": (transformers.MistralConfig, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3Config, {}),
    "phi3": (transformers.Phi3Config, {}),
    "glm": (transformers.GlmConfig, {}),
    "glm4": (transformers.Glm4Config, {}),
    "yi": (transformers.LlamaConfig, {"num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 8}),
}

REF_NAME = "flexinference_test_reference"
REF_ATTR = "reference_plan"


def make_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = cls(**{**BASE, **extra, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():  # random init is small; widen it so attention patterns matter for the logits
        for name, p in model.named_parameters():
            if "proj" in name and p.dim() == 2:
                p.mul_(3.0)
    return model


def inputs(batch: int, length: int, pad: tuple[int, ...] = (), seed: int = 1) -> tuple[Tensor, Tensor]:
    """Random ids ``(batch, length)`` and a 2-D mask with ``pad[b]`` left-padding tokens in row ``b``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, BASE["vocab_size"], (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, n in enumerate(pad):
        ids[b, :n] = BASE["pad_token_id"]
        mask[b, :n] = 0
    return ids, mask


def cache_kw(model: torch.nn.Module, cache) -> dict:
    """``{name: cache}`` under the forward argument name of this transformers version (``cache`` from 5.20,
    ``past_key_values`` before)."""
    params = inspect.signature(type(model).forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def cycle_heads(patterns, num_heads: int) -> list:
    return list(itertools.islice(itertools.cycle(patterns), num_heads))


# -- reference ------------------------------------------------------------------------------------------
def brute_keep(pattern, q_len: int, kv_len: int) -> Tensor | None:
    """Independent token-level rule of a static pattern, bool ``(q_len, kv_len)``; ``None`` if dynamic."""
    i = torch.arange(q_len)[:, None] + (kv_len - q_len)
    j = torch.arange(kv_len)[None, :]
    causal, d = j <= i, i - j
    if isinstance(pattern, fi.Dense):
        return causal
    if isinstance(pattern, fi.AShape):
        return causal & ((j < pattern.sink) | (d < pattern.local))
    if isinstance(pattern, fi.TriShape):
        return causal & ((j < pattern.sink) | (d < pattern.local) | (i >= kv_len - pattern.last))
    if isinstance(pattern, fi.Dilated):
        dil = (d >= pattern.band) & (d < pattern.span) & ((d - pattern.band) % pattern.dilation == 0)
        return causal & ((j < pattern.sink) | (d < pattern.band) | dil | (d == 0))
    if isinstance(pattern, fi.Strided):
        return causal & ((d % pattern.stride == 0) | (d < pattern.local) | (j < pattern.sink))
    return None


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Dense fp64 softmax over the kept set: transformers' mask, intersected on the sparse path with each
    head's pattern (static heads by :func:`brute_keep`, dynamic heads by the estimator's tables)."""
    plan: LayerPlan = getattr(module, REF_ATTR)
    b, hq, sq, _ = query.shape
    skv = key.shape[2]
    if attention_mask is None:
        base = torch.ones(sq, skv, dtype=torch.bool).tril(skv - sq)[None, None] if sq > 1 else torch.ones(1, 1, 1, skv,
                                                                                                          dtype=torch.bool)
    else:
        base = attention_mask
    keep = base.expand(b, hq, sq, skv)
    if plan.sparse and sq >= plan.min_sparse_len:
        kv_valid = None if attention_mask is None else base.any(dim=-2).any(dim=1)
        # Left padding: each row's patterns count positions from its first real token (the prompt alone).
        first = [0] * b if kv_valid is None else [int(r.nonzero()[0]) if r.any() else skv for r in kv_valid]
        pattern_keep = torch.zeros(b, hq, sq, skv, dtype=torch.bool)
        for row, f in enumerate(first):
            qs = max(0, f - (skv - sq))
            if qs >= sq:
                continue
            tables = build_tables(query[row:row + 1, :, qs:], key[row:row + 1, :, f:], plan.patterns, scale=scaling)
            row_keep = dense_keep(tables)[0].clone()
            for h, p in enumerate(plan.patterns):
                static = brute_keep(p, sq - qs, skv - f)
                if static is not None:
                    row_keep[h] = static
            pattern_keep[row, :, qs:, f:] = row_keep
        if kv_valid is not None:
            pattern_keep &= kv_valid[:, None, None, :]
        keep = pattern_keep
    group = hq // key.shape[1]
    k = key.double().repeat_interleave(group, 1)
    v = value.double().repeat_interleave(group, 1)
    scores = (query.double() @ k.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows of padding queries keep nothing
    out = (probs @ v).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def reference_model(model: torch.nn.Module, config, **overrides) -> torch.nn.Module:
    """A copy of the (unpatched) ``model`` whose attention is :func:`reference_attention` under ``config``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(REF_NAME, reference_attention)
    AttentionMaskInterface.register(REF_NAME, sdpa_mask)
    ref = copy.deepcopy(model)
    cfg = resolve_config(config, ref, **overrides)
    for m in attention_modules(ref):
        setattr(m, REF_ATTR, cfg.layer_plan(m.layer_idx))
    ref.set_attn_implementation(REF_NAME)
    return ref


def patched_and_reference(model, config, **overrides):
    ref = reference_model(model, config, **overrides)
    return apply(model, config, **overrides), ref


def assert_close_on_real(out: Tensor, ref: Tensor, mask: Tensor | None, atol: float = ATOL) -> None:
    """Compare logits ``(B, S, V)`` at non-padding positions."""
    if mask is not None:
        out, ref = out[mask.bool()], ref[mask.bool()]
    err = (out - ref).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol}"
