"""flexinference: dynamic sparse attention and KV-cache policies on FlexAttention."""

from flexinference.attention import Impl, sparse_attention
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
    "Pattern",
    "Strided",
    "TriShape",
    "VerticalSlash",
    "VerticalSlashStatic",
    "XAttention",
    "__version__",
    "sparse_attention",
]
