"""Brute-force references and tiny models for the KV-policy tests."""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=512,
)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
}


def tiny_model(family: str = "llama", attn: str = "sdpa", seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised fp32 model of ``family`` (3 layers, 4 query heads, 2 KV heads, D = 16)."""
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **extra, **overrides}, attn_implementation=attn)
    model = model_cls(config).eval()
    # Larger q/k weights make attention peaked, so top-k selections are far from ties.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model


def modeling_module(model: torch.nn.Module):
    return sys.modules[type(model.model.layers[0].self_attn).__module__]


def snapkv_reference_scores(
    queries: torch.Tensor, keys: torch.Tensor, window: int, scaling: float, kernel_size: int, pooling: str
) -> torch.Tensor:
    """SnapKV prefix scores by definition, in float64, one (batch, KV head, query head, query) at a time.

    Args:
        queries: ``(B, H_q, Q, D)`` every query of the update (the last ``Q`` of the ``N`` tokens).
        keys: ``(B, H_kv, N, D)``.

    Returns:
        ``(B, H_kv, N - window)`` pooled scores.
    """
    batch, heads_q, q_len, _ = queries.shape
    heads_kv, n = keys.shape[1], keys.shape[2]
    group = heads_q // heads_kv
    w = min(window, q_len)
    prefix = n - window
    out = torch.zeros(batch, heads_kv, prefix, dtype=torch.float64)
    for b in range(batch):
        for j in range(heads_kv):
            acc = torch.zeros(n, dtype=torch.float64)
            for g in range(group):
                h = j * group + g
                for i in range(w):
                    pos = n - w + i
                    q = queries[b, h, q_len - w + i].double()
                    logits = keys[b, j, : pos + 1].double() @ q * scaling
                    acc[: pos + 1] += torch.softmax(logits, dim=0)
            acc = acc[:prefix] / group
            radius = kernel_size // 2
            for t in range(prefix):
                lo, hi = max(0, t - radius), min(prefix, t + radius + 1)
                if pooling == "avg":
                    out[b, j, t] = acc[lo:hi].sum() / kernel_size
                else:
                    out[b, j, t] = acc[lo:hi].max()
    return out


def assert_top_selection(kept: torch.Tensor, scores: torch.Tensor, keep: int, rel_tol: float = 1e-6) -> None:
    """``kept`` (sorted prefix indices of one head) must be the ``keep`` best of ``scores`` (ties allowed)."""
    assert kept.numel() == keep, (kept.numel(), keep)
    if keep == 0:
        return
    expected = set(torch.argsort(scores, descending=True, stable=True)[:keep].tolist())
    got = set(kept.tolist())
    if got == expected:
        return
    threshold = torch.sort(scores, descending=True).values[keep - 1].item()
    tol = rel_tol * max(abs(threshold), 1e-30)
    for idx in got ^ expected:  # only near-ties may differ
        assert abs(scores[idx].item() - threshold) <= tol, (idx, scores[idx].item(), threshold)


def pyramid_reference(capacity: int, window: int, beta: float, layers: int, tokens: int) -> list[float]:
    """METHODS.md's PyramidKV per-layer prefix budgets, real-valued (window excluded)."""
    span = capacity - window
    if layers == 1 or tokens <= capacity or tokens < 2 * span:
        return [float(span)] * layers
    low = span / beta
    high = 2 * span - low
    if high >= tokens - window:
        high = tokens - window
        low = 2 * span - high
    step = (high - low) / (layers - 1)
    return [high - layer * step for layer in range(layers)]


def allowed_mask(kept_before: torch.Tensor | None, seen_before: int, q_len: int, heads_q: int) -> torch.Tensor:
    """Additive mask ``(B, H_q, q_len, seen_before + q_len)``: each query sees the kept past and the new
    tokens up to itself. ``kept_before``: ``(B, H_kv, kept)`` original positions (``None``: no past)."""
    total = seen_before + q_len
    key_pos = torch.arange(total)
    q_pos = seen_before + torch.arange(q_len)
    new_ok = (key_pos[None, :] >= seen_before) & (key_pos[None, :] <= q_pos[:, None])  # (Q, total)
    if kept_before is None:
        batch, heads_kv = 1, 1
        past_ok = torch.zeros(1, 1, total, dtype=torch.bool)
    else:
        batch, heads_kv = kept_before.shape[:2]
        past_ok = torch.zeros(batch, heads_kv, total, dtype=torch.bool)
        past_ok.scatter_(2, kept_before.long(), True)
    ok = past_ok[:, :, None, :] | new_ok[None, None]  # (B, H_kv, Q, total)
    ok = ok.repeat_interleave(heads_q // heads_kv, dim=1)
    mask = torch.zeros(ok.shape, dtype=torch.float32)
    return mask.masked_fill(~ok, torch.finfo(torch.float32).min)


@contextmanager
def eager_hook(model: torch.nn.Module, monkeypatch, on_call):
    """Wrap the family's eager attention: ``on_call(module, query, key, value, mask, scaling)`` may return a
    replacement mask (or ``None`` to keep it)."""
    module = modeling_module(model)
    original = module.eager_attention_forward

    def wrapper(mod, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        replaced = on_call(mod, query, key, value, attention_mask, scaling)
        if replaced is not None:
            attention_mask = replaced
        return original(mod, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(module, "eager_attention_forward", wrapper)
        yield
