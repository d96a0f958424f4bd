"""Model-level pattern search: run a model once on calibration text, choose every head's pattern.

The model's attention is routed (for the duration of one forward pass) through a capturing attention
function registered with transformers' ``AttentionInterface``: it receives each layer's real ``q, k, v``
(after RoPE, before any KV repeat), hands them to :func:`flexinference.search.search_layer`, and then
computes ordinary causal SDPA so the next layer sees exactly the dense model's activations. Nothing is
stored across layers, so calibration memory is one layer's sampled scores on top of the forward pass.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from flexinference.config import ModelConfig
from flexinference.patterns import Dense, Pattern
from flexinference.search import HeadChoice, SearchCriterion, search_layer

__all__ = ["SearchResult", "search", "calibration_ids", "CAPTURE_NAME"]

log = logging.getLogger(__name__)

#: Name of the capturing attention function (registered only inside :func:`search`).
CAPTURE_NAME = "flexinference_capture"
_HOOK_ATTR = "flexinference_capture_hook"


@dataclass(frozen=True)
class SearchResult:
    """A searched config and the per-(layer, head) evidence behind it."""

    config: ModelConfig
    choices: tuple[tuple[HeadChoice, ...], ...]

    def summary(self) -> str:
        """Pattern histogram, mean density and worst head recall/error, as a small text table."""
        counts: dict[str, int] = {}
        for layer in self.choices:
            for c in layer:
                key = repr(c.pattern)
                counts[key] = counts.get(key, 0) + 1
        flat = [c for layer in self.choices for c in layer]
        lines = ["pattern                                                  heads"]
        lines += [f"{k[:56]:<56} {v:>5}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])]
        lines.append(f"mean density {sum(c.cost for c in flat) / len(flat):.3f}  "
                     f"worst recall {min(c.recall for c in flat):.3f}  worst error {max(c.error for c in flat):.3f}")
        return "\n".join(lines)


def _capture_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None,
                       dropout: float = 0.0, **kwargs):
    hook = getattr(module, _HOOK_ATTR, None)
    if hook is not None:
        hook(module, query, key, value)
    groups = query.shape[1] // key.shape[1]
    if attention_mask is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=query.shape[2] > 1, scale=scaling,
                                             enable_gqa=groups > 1)
    else:
        k = key.repeat_interleave(groups, dim=1)
        v = value.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _capturing(model: torch.nn.Module, on_layer) -> Iterator[None]:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from flexinference.patching import attention_modules

    mods = attention_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__} has no attention modules with a layer_idx to search")
    original = model.config._attn_implementation
    AttentionInterface.register(CAPTURE_NAME, _capture_attention)
    AttentionMaskInterface.register(CAPTURE_NAME, sdpa_mask)
    for m in mods:
        setattr(m, _HOOK_ATTR, on_layer)
    try:
        model.set_attn_implementation(CAPTURE_NAME)
        yield
    finally:
        model.set_attn_implementation(original)
        for m in mods:
            m.__dict__.pop(_HOOK_ATTR, None)
        AttentionInterface._global_mapping.pop(CAPTURE_NAME, None)
        AttentionMaskInterface._global_mapping.pop(CAPTURE_NAME, None)


def calibration_ids(tokenizer, num_tokens: int, seed: int = 0) -> Tensor:
    """Token ids ``(1, <= num_tokens)`` of a synthetic long-context key-value retrieval prompt (SCBench's
    ``scbench_kv`` generator: UUID pairs and a question), so the search runs with no data set."""
    from flexinference.scbench.generators import generate_records

    (record,) = generate_records("scbench_kv", tokenizer=tokenizer, num_records=1, num_turns=1,
                                 context_tokens=max(16, num_tokens - 64), seed=seed)
    text = record.context + "\n" + record.turns[0].input
    ids = tokenizer.encode(text) if hasattr(tokenizer, "encode") else tokenizer(text)["input_ids"]
    return torch.tensor([list(ids)[:num_tokens]], dtype=torch.long)


def search(
    model: torch.nn.Module,
    input_ids: Tensor,
    candidates: Sequence[Pattern] | None = None,
    criterion: SearchCriterion = SearchCriterion(),
    *,
    min_sparse_len: int | None = None,
    progress: bool = False,
) -> SearchResult:
    """Choose a pattern per (layer, query head) of ``model`` from one calibration forward pass.

    Args:
        model: a transformers causal LM whose attention dispatches through ``AttentionInterface``.
        input_ids: ``(1, S)`` calibration tokens (e.g. :func:`calibration_ids`).
        candidates: patterns to try (default :func:`flexinference.search.default_candidates`).
        criterion: the pass rule (recall, error, sampled rows).
        min_sparse_len: written into the config (default: the config default).
        progress: show a per-layer progress bar (tqdm).

    Returns:
        :class:`SearchResult` whose ``config`` :func:`flexinference.apply` reads.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be a (1, S) tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    from flexinference.patching import attention_modules, is_applied

    if is_applied(model):
        raise ValueError("search needs the unpatched model (its dense attention is the reference, and a "
                         "chunked-prefill patch would split the calibration pass): call fi.remove(model) first")
    mods = attention_modules(model)
    found: dict[int, list[HeadChoice]] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mods), desc="search", unit="layer")

    def on_layer(module, q, k, v):
        found[module.layer_idx] = search_layer(q, k, v, candidates, criterion, scale=getattr(module, "scaling", None))
        if bar is not None:
            bar.update(1)

    with torch.no_grad(), _capturing(model, on_layer):
        model(input_ids=input_ids.to(next(model.parameters()).device), use_cache=False)
    if bar is not None:
        bar.close()
    num_layers = len(mods)
    missing = [i for i in range(num_layers) if i not in found]
    if missing:
        raise RuntimeError(f"layers {missing} were not reached by the calibration pass")
    choices = tuple(tuple(found[i]) for i in range(num_layers))
    extra = {} if min_sparse_len is None else {"min_sparse_len": min_sparse_len}
    cfg_model = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    config = ModelConfig(
        layers=tuple(tuple(c.pattern for c in layer) for layer in choices),
        model_name=getattr(cfg_model, "_name_or_path", None) or None,
        num_key_value_heads=getattr(cfg_model, "num_key_value_heads", None),
        **extra,
    )
    log.info("search: %d layers, %d dense heads", num_layers,
             sum(isinstance(c.pattern, Dense) for layer in choices for c in layer))
    return SearchResult(config, choices)
