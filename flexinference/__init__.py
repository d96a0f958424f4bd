"""flexinference: dynamic sparse attention and KV-cache policies on FlexAttention."""

from flexinference.patching import apply, is_applied, patched, remove
from flexinference.attention import Impl, sparse_attention
from flexinference.cache import KIVICache, PyramidKVCache, SnapKVCache, StreamingLLMCache
from flexinference.cache import attach as attach_cache
from flexinference.config import LayerPlan, ModelConfig, load_config, save_config
from flexinference.patterns import (
    AShape,
    BlockTopK,
    Dense,
    Dilated,
    FlexPrefill,
    Pattern,
    Strided,
    TriShape,
    VerticalSlash,
    VerticalSlashStatic,
    XAttention,
)

__version__ = "0.1.0"

__all__ = [
    "AShape",
    "BlockTopK",
    "Dense",
    "Dilated",
    "FlexPrefill",
    "Impl",
    "KIVICache",
    "LayerPlan",
    "ModelConfig",
    "PyramidKVCache",
    "SnapKVCache",
    "StreamingLLMCache",
    "Pattern",
    "Strided",
    "TriShape",
    "VerticalSlash",
    "VerticalSlashStatic",
    "XAttention",
    "__version__",
    "apply",
    "attach_cache",
    "is_applied",
    "load_config",
    "patched",
    "remove",
    "save_config",
    "sparse_attention",
]
