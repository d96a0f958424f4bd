"""The attention function transformers calls once :func:`flexinference.apply` has patched a model.

Registered under :data:`ATTENTION_NAME` with ``transformers.AttentionInterface``, together with
:func:`causal_mask_or_none` with ``AttentionMaskInterface`` (without a mask function every layer would get
``attention_mask=None`` and lose padding). The mask is ``None`` exactly when attention is causal, the
queries are the last ``S_q`` keys and nothing is padded; otherwise it is transformers' boolean
``(B, 1, S_q, S_kv)`` mask. Per call the function reads the :class:`~flexinference.config.LayerPlan` that
``apply`` attached to the attention module and picks one of two paths:

* **sparse**: the layer has a non-Dense head and the call brings ``>= plan.min_sparse_len`` queries (a
  long prefill, or a long chunk of one on top of a cache): :func:`~flexinference.attention.
  sparse_attention`, the queries being the last ``S_q`` of the ``S_kv`` keys; padding keys (from the
  mask transformers built) are passed as ``kv_valid`` and never attended.
* **dense**: everything else (decode steps, short prefills, all-Dense layers): SDPA with the mask,
  exactly what the unpatched model computes; a short unpadded chunk on top of a cache (``None`` with
  ``1 < S_q < S_kv``) runs FlexAttention with a :class:`~flexinference.patterns.Dense` pattern, i.e.
  causal with the queries last, so no ``S_q x S_kv`` mask is ever built for it.

The choice depends on shapes and on the plan only, so under ``torch.compile`` it is a guard, not a graph
break; no tensor value is read on the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flexinference.attention import sparse_attention
from flexinference.config import LayerPlan
from flexinference.patterns import Dense

__all__ = [
    "ATTENTION_NAME",
    "PLAN_ATTR",
    "dense_attention",
    "flexinference_attention",
    "is_registered",
    "kv_valid_from_mask",
    "sparse_per_row",
    "register",
    "unregister",
]

#: Name under which the attention and mask functions are registered (avoids "sdpa"/"flex_attention",
#: which trigger transformers' own checks).
ATTENTION_NAME = "flexinference"
#: Attribute holding the :class:`LayerPlan` on each patched attention module.
PLAN_ATTR = "flexinference_plan"


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def dense_attention(
    query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scale: float | None, groups: int
) -> Tensor:
    """Causal SDPA as transformers' ``sdpa`` integration computes it.

    Args:
        query: ``(B, H_q, S_q, D)``.
        key, value: ``(B, H_kv, S_kv, D)``.
        mask: bool (or additive float) ``(B, 1 or H_q, S_q, S_kv)``, ``True`` = attend; ``None`` means
            causal with ``S_q == S_kv``, or a single query seeing every key.
        scale: softmax scale (``None``: ``1/sqrt(D)``).
        groups: ``H_q // H_kv`` as a Python int (the module's ``num_key_value_groups``; a shape-derived
            value would be symbolic under ``torch.compile(dynamic=True)``).

    Returns:
        ``(B, H_q, S_q, D)``.
    """
    if mask is None:
        if query.shape[2] == 1:  # a Python branch: a SymBool is_causal would not trace under dynamic shapes
            return F.scaled_dot_product_attention(query, key, value, scale=scale, enable_gqa=groups > 1)
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=groups > 1)
    # With an explicit mask, CUDA SDPA's fused kernels refuse enable_gqa and fall back to the math kernel;
    # repeating the (small) KV heads keeps the efficient kernel, as transformers does.
    return F.scaled_dot_product_attention(
        query, _repeat_kv(key, groups), _repeat_kv(value, groups), attn_mask=mask, scale=scale
    )


def kv_valid_from_mask(mask: Tensor) -> Tensor:
    """Keys some query may attend: bool ``(B, S_kv)`` from a ``(B, 1 or H, S_q, S_kv)`` mask.

    With transformers' causal+padding mask the last query row sees every real key, so this is the padding
    mask of the keys (left padding, and padding inherited from earlier chunks in the cache).
    """
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask.any(dim=-2).any(dim=1)


def flexinference_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers attention-interface function (``AttentionInterface.register(ATTENTION_NAME, ...)``).

    Args:
        module: the attention module; its ``flexinference_plan`` attribute (set by ``apply``) says what
            each head runs.
        query: ``(B, H_q, S_q, D)`` after RoPE.
        key, value: ``(B, H_kv, S_kv, D)`` after RoPE and the cache update (past included), not repeated.
        attention_mask: bool ``(B, 1, S_q, S_kv)`` or ``None`` (causal, queries last, no padding; see
            :func:`causal_mask_or_none`).
        scaling: softmax scale.
        dropout: must be 0 (inference only).

    Returns:
        ``((B, S_q, H_q, D), None)`` as transformers expects.
    """
    plan: LayerPlan | None = getattr(module, PLAN_ATTR, None)
    if plan is None:
        raise ValueError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) has no flexinference plan; "
            "patch the model with flexinference.apply(model) instead of setting attn_implementation by hand"
        )
    if dropout:
        raise ValueError(f"flexinference attention is inference-only; got dropout={dropout} (call model.eval())")
    q_len, kv_len = query.shape[2], key.shape[2]
    if plan.sparse and q_len >= plan.min_sparse_len:
        kv_valid = None if attention_mask is None else kv_valid_from_mask(attention_mask)
        out = sparse_per_row(query, key, value, plan.kernel_patterns, scale=scaling, kv_valid=kv_valid,
                             impl=plan.impl)
    elif attention_mask is None and 1 < q_len < kv_len:
        out = sparse_attention(query, key, value, Dense(), scale=scaling, impl=plan.impl)
    else:
        out = dense_attention(query, key, value, attention_mask, scaling, module.num_key_value_groups)
    return out.transpose(1, 2).contiguous(), None


def sparse_per_row(query: Tensor, key: Tensor, value: Tensor, patterns, *, scale, kv_valid, impl) -> Tensor:
    """Sparse attention where a left-padded row runs on its own real tokens.

    Pattern positions (sinks, first columns, block grids) count from each row's first real token, so a
    prompt gives the same result alone or left-padded in a batch. Rows whose valid keys are not one
    contiguous suffix (other masks) keep the padding masked in place (``kv_valid``). Padded query rows
    get zeros. Reading where the padding ends needs the host: under ``torch.compile`` a padded batch on
    the sparse path is a graph break (unpadded calls, the common case, stay in the graph).
    """
    from flexinference.attention import sparse_attention

    if kv_valid is None:
        return sparse_attention(query, key, value, patterns, scale=scale, impl=impl)
    return _sparse_padded(query, key, value, patterns, scale=scale, kv_valid=kv_valid, impl=impl)


@torch.compiler.disable
def _sparse_padded(query: Tensor, key: Tensor, value: Tensor, patterns, *, scale, kv_valid, impl) -> Tensor:
    from flexinference.attention import sparse_attention

    b, _, sq, _ = query.shape
    skv = key.shape[2]
    first = kv_valid.int().argmax(-1)
    pos = torch.arange(skv, device=kv_valid.device)
    if not bool((kv_valid == (pos[None, :] >= first[:, None])).all()):
        return sparse_attention(query, key, value, patterns, scale=scale, kv_valid=kv_valid, impl=impl)
    firsts = first.tolist()
    if not any(firsts):
        return sparse_attention(query, key, value, patterns, scale=scale, impl=impl)
    out = query.new_zeros(query.shape)
    for row, f in enumerate(firsts):  # one host loop over the (small) batch, only for padded batches
        qs = max(0, f - (skv - sq))
        if qs < sq:
            out[row : row + 1, :, qs:] = sparse_attention(
                query[row : row + 1, :, qs:], key[row : row + 1, :, f:], value[row : row + 1, :, f:], patterns,
                scale=scale, impl=impl,
            )
    return out


def _unpadded(attention_mask: Tensor | None, kv_length: int) -> bool:
    if attention_mask is None:
        return True
    if attention_mask.dim() != 2 or attention_mask.shape[-1] != kv_length or torch.compiler.is_compiling():
        return False  # under compile the values cannot be read: materialise, as transformers does
    return bool(attention_mask.all())


def causal_mask_or_none(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    **kwargs,
) -> Tensor | None:
    """transformers' ``sdpa_mask`` with one change: ``None`` means *causal, queries at the last positions,
    no padding* and is returned whenever that holds (also for a chunk on top of a cache, where
    ``sdpa_mask`` would build a ``(B, 1, S_q, S_kv)`` bool tensor), and never otherwise (``sdpa_mask``
    also returns ``None`` for an empty static cache, whose queries are the *first* positions).

    Same keyword interface as ``transformers.masking_utils.sdpa_mask`` (transformers 5.17 - 5.24).
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    mask_function = causal_mask_function if mask_function is None else mask_function
    queries_last = (not isinstance(q_offset, Tensor) and kv_offset == 0 and q_offset + q_length == kv_length)
    if (allow_is_causal_skip and queries_last and local_size is None and mask_function is causal_mask_function
            and _unpadded(attention_mask, kv_length)):
        return None
    return sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        mask_function=mask_function, attention_mask=attention_mask, local_size=local_size,
        allow_is_causal_skip=allow_is_causal_skip and queries_last, **kwargs,
    )


def register() -> None:
    """Register the attention and mask functions with transformers under :data:`ATTENTION_NAME`.

    Idempotent. The entries point at stateless functions: a model whose ``attn_implementation`` is not
    ``"flexinference"`` never reaches them.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, flexinference_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, causal_mask_or_none)


def unregister() -> None:
    """Remove both registrations (a model still set to ``"flexinference"`` then fails loudly)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface._global_mapping.pop(ATTENTION_NAME, None)
    AttentionMaskInterface._global_mapping.pop(ATTENTION_NAME, None)


def is_registered() -> bool:
    """Whether both functions are registered."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    return (AttentionInterface._global_mapping.get(ATTENTION_NAME) is flexinference_attention
            and AttentionMaskInterface._global_mapping.get(ATTENTION_NAME) is causal_mask_or_none)
