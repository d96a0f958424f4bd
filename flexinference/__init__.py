"""flexinference: dynamic sparse attention and KV-cache policies on FlexAttention."""

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
    "Pattern",
    "Strided",
    "TriShape",
    "VerticalSlash",
    "VerticalSlashStatic",
    "XAttention",
    "__version__",
]
