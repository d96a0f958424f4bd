"""KV-cache policies as transformers 5.x ``Cache`` subclasses.

* :class:`StreamingLLMCache` -- attention sinks + recent window (Xiao et al., 2023).
* :class:`SnapKVCache` -- keep what the last queries attend to (Li et al., 2024).
* :class:`PyramidKVCache` -- SnapKV with pyramidal per-layer budgets (Cai et al., 2024).
* :class:`KIVICache` -- 2/4-bit keys per channel, values per token, full-precision residual (Liu et al., 2024).
* :func:`attach` -- hooks that capture queries (SnapKV/PyramidKV) and reject padded batches.

All report ``nbytes()``, ``tokens_seen()``, ``tokens_kept()`` and ``stats()``.
"""

from flexinference.cache.base import CacheStats, PolicyCache
from flexinference.cache.hooks import SUPPORTED_MODEL_TYPES, CacheAttachment, attach
from flexinference.cache.kivi import KIVICache, KIVIConfig
from flexinference.cache.pyramidkv import PyramidKVCache, PyramidKVConfig, pyramid_budgets
from flexinference.cache.snapkv import SnapKVCache, SnapKVConfig, snapkv_scores
from flexinference.cache.streaming import StreamingLLMCache, StreamingLLMConfig

__all__ = [
    "CacheAttachment",
    "CacheStats",
    "KIVICache",
    "KIVIConfig",
    "PolicyCache",
    "PyramidKVCache",
    "PyramidKVConfig",
    "SUPPORTED_MODEL_TYPES",
    "SnapKVCache",
    "SnapKVConfig",
    "StreamingLLMCache",
    "StreamingLLMConfig",
    "attach",
    "pyramid_budgets",
    "snapkv_scores",
]
