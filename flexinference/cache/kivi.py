"""KIVI: asymmetric 2/4-bit KV cache, keys per channel, values per token, full-precision residual.

Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024
(arXiv:2402.02750).

Storage (per layer, ``P = 8 // bits`` codes per byte, packed along the head dimension):
    keys:   codes ``(B, H, T_q, D / P)`` uint8, ``minimum``/``scale`` ``(B, H, T_q / G, D)``: one pair per
            channel per group of ``G`` consecutive tokens (per-channel quantization).
    values: codes ``(B, H, T_q, D / P)`` uint8, ``minimum``/``scale`` ``(B, H, T_q, D / G)``: one pair per
            token per group of ``G`` channels (per-token quantization).
    residual: the most recent tokens in full precision, ``(B, H, r, D)``.
Parameters are stored in the cache's dtype, rounded outward (minimum down, scale up), so that every
value of a group lies in ``[minimum, minimum + (2^bits - 1) scale]`` and the round-trip error is at
most ``scale / 2`` (plus the output dtype's rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flexinference.cache.base import PolicyCache, PolicyLayer, _tensor_bytes, check_int

__all__ = [
    "KIVIConfig",
    "KIVICache",
    "KIVILayer",
    "pack_codes",
    "unpack_codes",
    "quantize_keys",
    "dequantize_keys",
    "quantize_values",
    "dequantize_values",
]


@dataclass(frozen=True, slots=True)
class KIVIConfig:
    """KIVI parameters (defaults: 2 bits, group 32, residual 32, as in the paper).

    Attributes:
        bits: 2 or 4.
        group_size: tokens per key group (per channel) and channels per value group (per token);
            a multiple of ``8 // bits``. The head dimension must be a multiple of it.
        residual_length: recent tokens always kept in full precision (>= 0).
    """

    bits: int = 2
    group_size: int = 32
    residual_length: int = 32

    def __post_init__(self) -> None:
        check_int(self, "bits", 1)
        check_int(self, "group_size", 1)
        check_int(self, "residual_length", 0)
        if self.bits not in (2, 4):
            raise ValueError(f"KIVIConfig.bits must be 2 or 4, got {self.bits}")
        if self.group_size % (8 // self.bits):
            raise ValueError(
                f"KIVIConfig.group_size must be a multiple of {8 // self.bits} for {self.bits}-bit packing, "
                f"got {self.group_size}"
            )


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``bits``-bit codes along the last dimension: ``(..., M)`` uint8 -> ``(..., M * bits / 8)``."""
    per_byte = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    return (grouped << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``(..., M')`` uint8 -> ``(..., M' * 8 / bits)`` uint8 codes."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * (8 // bits))


def _round_outward(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """``x`` (fp32) in ``dtype``, rounded toward +inf (``up``) or -inf so the stored range covers x."""
    y = x.to(dtype)
    if dtype == torch.float32:
        return y
    wrong = y.float() < x if up else y.float() > x
    toward = torch.full_like(y, float("inf") if up else float("-inf"))
    return torch.where(wrong, torch.nextafter(y, toward), y)


def _quantize_groups(
    x: torch.Tensor, dim: int, bits: int, param_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/scale quantization with groups reduced along ``dim`` of ``x``.

    Returns ``codes`` (uint8, shape of ``x``), ``scale`` and ``minimum`` (``dim`` kept as size 1).
    """
    levels = (1 << bits) - 1
    xf = x.float()
    minimum = _round_outward(xf.amin(dim=dim, keepdim=True), param_dtype, up=False)
    low = minimum.float()
    scale = _round_outward((xf.amax(dim=dim, keepdim=True) - low) / levels, param_dtype, up=True)
    step = scale.float()
    step = torch.where(step > 0, step, torch.ones_like(step))
    codes = ((xf - low) / step).round_().clamp_(0, levels).to(torch.uint8)
    return codes, scale, minimum


def quantize_keys(keys: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel quantization of keys, groups of ``group_size`` consecutive tokens.

    Args:
        keys: ``(B, H, T, D)``, ``T`` a multiple of ``group_size``.

    Returns:
        ``packed`` ``(B, H, T, D * bits / 8)`` uint8, ``scale`` and ``minimum`` ``(B, H, T / G, D)`` in
        ``keys.dtype``.
    """
    batch, heads, tokens, dim = keys.shape
    if tokens % group_size:
        raise ValueError(f"key tokens ({tokens}) must be a multiple of group_size ({group_size})")
    grouped = keys.reshape(batch, heads, tokens // group_size, group_size, dim)
    codes, scale, minimum = _quantize_groups(grouped, 3, bits, keys.dtype)
    packed = pack_codes(codes.reshape(batch, heads, tokens, dim), bits)
    return packed, scale.squeeze(3), minimum.squeeze(3)


def dequantize_keys(
    packed: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of :func:`quantize_keys`: ``(B, H, T, D)`` in ``dtype``.

    ``minimum + code * scale`` is one ``addcmul`` (fp32 internal math, one rounding to ``dtype``),
    written into ``out`` (``(B, H, T, D)``, may be a slice of a larger buffer) when given.
    """
    return _dequantize(packed, scale, minimum, bits, dtype, out, group_size, axis=3)


def _dequantize(packed, scale, minimum, bits: int, dtype: torch.dtype, out, group_size: int, axis: int):
    """``minimum + code * scale`` over groups of ``group_size`` along tokens (``axis`` 3: keys) or channels
    (``axis`` 4: values), written into ``out`` when given (a token slice of a larger buffer is fine:
    splitting one dimension is a valid view of it)."""
    codes = unpack_codes(packed, bits)
    batch, heads, tokens, dim = codes.shape
    if axis == 3:
        shape = (batch, heads, tokens // group_size, group_size, dim)
    elif axis == 4:
        shape = (batch, heads, tokens, dim // group_size, group_size)
    else:
        raise ValueError(f"axis must be 3 (keys) or 4 (values), got {axis}")
    if out is None:
        out = torch.empty((batch, heads, tokens, dim), dtype=dtype, device=packed.device)
    grouped = codes.view(shape).to(dtype)
    torch.addcmul(minimum.to(dtype).unsqueeze(axis), grouped, scale.to(dtype).unsqueeze(axis), out=out.view(shape))
    return out


def quantize_values(
    values: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token quantization of values, groups of ``group_size`` channels.

    Args:
        values: ``(B, H, T, D)``, ``D`` a multiple of ``group_size``.

    Returns:
        ``packed`` ``(B, H, T, D * bits / 8)`` uint8, ``scale`` and ``minimum`` ``(B, H, T, D / G)`` in
        ``values.dtype``.
    """
    batch, heads, tokens, dim = values.shape
    if dim % group_size:
        raise ValueError(f"KIVI group_size ({group_size}) must divide the head dimension ({dim})")
    grouped = values.reshape(batch, heads, tokens, dim // group_size, group_size)
    codes, scale, minimum = _quantize_groups(grouped, 4, bits, values.dtype)
    packed = pack_codes(codes.reshape(batch, heads, tokens, dim), bits)
    return packed, scale.squeeze(4), minimum.squeeze(4)


def dequantize_values(
    packed: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of :func:`quantize_values`: ``(B, H, T, D)`` in ``dtype`` (see :func:`dequantize_keys`)."""
    return _dequantize(packed, scale, minimum, bits, dtype, out, group_size, axis=4)


class KIVILayer(PolicyLayer):
    """One layer of KIVI: quantized groups of old tokens plus a full-precision residual (``keys``/``values``)."""

    _QUANT = ("key_codes", "key_scale", "key_min", "value_codes", "value_scale", "value_min")

    def __init__(self, config: KIVIConfig) -> None:
        super().__init__()
        self.config = config
        for name in self._QUANT:
            setattr(self, name, None)

    def _state_names(self) -> tuple[str, ...]:
        return ("keys", "values", *self._QUANT)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        head_dim = key_states.shape[-1]
        if head_dim % self.config.group_size or value_states.shape[-1] % self.config.group_size:
            raise ValueError(
                f"KIVICache group_size ({self.config.group_size}) must divide the head dimension ({head_dim})"
            )
        super().lazy_initialization(key_states, value_states)
        batch, heads = key_states.shape[:2]
        packed_dim = head_dim * self.config.bits // 8
        dev, dt = self.device, self.dtype
        self.key_codes = torch.empty((batch, heads, 0, packed_dim), dtype=torch.uint8, device=dev)
        self.value_codes = torch.empty((batch, heads, 0, packed_dim), dtype=torch.uint8, device=dev)
        self.key_scale = torch.empty((batch, heads, 0, head_dim), dtype=dt, device=dev)
        self.key_min = torch.empty_like(self.key_scale)
        self.value_scale = torch.empty((batch, heads, 0, head_dim // self.config.group_size), dtype=dt, device=dev)
        self.value_min = torch.empty_like(self.value_scale)

    def tokens_kept(self) -> int:
        return 0 if not self.is_initialized else self.key_codes.shape[-2] + self.keys.shape[-2]

    def tokens_quantized(self) -> int:
        """Tokens held in packed form (the rest are in the full-precision residual)."""
        return 0 if not self.is_initialized else self.key_codes.shape[-2]

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return _tensor_bytes(*(getattr(self, name) for name in self._state_names()))

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantized part read back: keys and values ``(B, H, T_q, D)`` in the cache dtype."""
        shape = (*self.key_codes.shape[:3], self.keys.shape[-1])
        keys = torch.empty(shape, dtype=self.dtype, device=self.device)
        values = torch.empty((*shape[:3], self.values.shape[-1]), dtype=self.dtype, device=self.device)
        self._dequantize_into(keys, values)
        return keys, values

    def _dequantize_into(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        cfg = self.config
        dequantize_keys(self.key_codes, self.key_scale, self.key_min, cfg.bits, cfg.group_size, self.dtype, out=keys)
        dequantize_values(
            self.value_codes, self.value_scale, self.value_min, cfg.bits, cfg.group_size, self.dtype, out=values
        )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return dequantized past + full-precision residual + new states; then quantize full groups.

        After the update, the oldest complete groups of ``group_size`` tokens beyond the last
        ``residual_length`` are quantized: the residual keeps between ``residual_length`` and
        ``residual_length + group_size - 1`` tokens.

        Args:
            key_states: ``(B, H, q_len, D)`` new keys (after RoPE).
            value_states: ``(B, H, q_len, D)`` new values.

        Returns:
            ``(keys, values)`` ``(B, H, seen, D)`` in the cache dtype.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        residual_k = torch.cat([self.keys, key_states], dim=-2)
        residual_v = torch.cat([self.values, value_states], dim=-2)
        quantized = self.key_codes.shape[-2]
        if quantized:
            out_k = key_states.new_empty(
                (*residual_k.shape[:2], quantized + residual_k.shape[-2], residual_k.shape[-1])
            )
            out_v = value_states.new_empty((*residual_v.shape[:2], out_k.shape[-2], residual_v.shape[-1]))
            self._dequantize_into(out_k[:, :, :quantized], out_v[:, :, :quantized])
            out_k[:, :, quantized:] = residual_k
            out_v[:, :, quantized:] = residual_v
        else:
            out_k, out_v = residual_k, residual_v
        cfg = self.config
        flush = (residual_k.shape[-2] - cfg.residual_length) // cfg.group_size * cfg.group_size
        if flush > 0:
            codes, scale, minimum = quantize_keys(residual_k[:, :, :flush], cfg.bits, cfg.group_size)
            self.key_codes = torch.cat([self.key_codes, codes], dim=-2)
            self.key_scale = torch.cat([self.key_scale, scale], dim=-2)
            self.key_min = torch.cat([self.key_min, minimum], dim=-2)
            codes, scale, minimum = quantize_values(residual_v[:, :, :flush], cfg.bits, cfg.group_size)
            self.value_codes = torch.cat([self.value_codes, codes], dim=-2)
            self.value_scale = torch.cat([self.value_scale, scale], dim=-2)
            self.value_min = torch.cat([self.value_min, minimum], dim=-2)
            residual_k, residual_v = residual_k[:, :, flush:], residual_v[:, :, flush:]
        self.keys, self.values = residual_k, residual_v
        return out_k, out_v


class KIVICache(PolicyCache):
    """KIVI 2/4-bit KV cache (Liu et al., ICML 2024, arXiv:2402.02750).

    Keys are quantized per channel (groups of ``group_size`` consecutive tokens), values per token
    (groups of ``group_size`` channels), asymmetric (min/scale per group), and packed into uint8
    (4 x 2-bit or 2 x 4-bit codes per byte). The most recent tokens stay in full precision until a whole
    key group beyond ``residual_length`` is available. Each update returns the quantized past read back
    (torch dequantization: one fused multiply-add per element, fp32 internal math,
    written straight into the returned buffer) plus the full-precision residual and the new tokens, so a
    prefill attends exactly; quantization only affects later steps. Nothing is evicted: padded batches
    and multi-turn use work as with ``DynamicCache`` (new tokens are appended and quantized as groups
    fill). :meth:`nbytes` reports the real packed bytes plus parameters plus residual.

    Unlike transformers' ``QuantizedCache`` (quanto/hqq), keys and values are quantized differently and
    each token is quantized once, never re-quantized.

    Args:
        bits: 2 or 4.
        group_size: group size (multiple of ``8 // bits``, must divide the head dimension).
        residual_length: recent tokens kept in full precision (>= 0).

    Example:
        >>> cache = KIVICache(bits=2, group_size=32, residual_length=32)
        >>> # model.generate(input_ids, past_key_values=cache, max_new_tokens=64)
    """

    evicts = False

    def __init__(self, bits: int = 2, group_size: int = 32, residual_length: int = 32) -> None:
        self.config = KIVIConfig(bits=bits, group_size=group_size, residual_length=residual_length)
        super().__init__()

    def _new_layer(self, layer_idx: int) -> KIVILayer:
        return KIVILayer(self.config)
