"""MInference-compatible API: switch from MInference in one line.

``from flexinference.compat import MInference`` then ``model = MInference("minference", name)(model)``.
"""

from flexinference.compat.kernels import block_sparse_attention, streaming_forward, vertical_slash_sparse_attention
from flexinference.compat.minference import MInference, MInferenceConfig, get_support_models
from flexinference.compat.minference_config import load_minference_config, save_minference_config

__all__ = [
    "MInference",
    "MInferenceConfig",
    "block_sparse_attention",
    "get_support_models",
    "load_minference_config",
    "save_minference_config",
    "streaming_forward",
    "vertical_slash_sparse_attention",
]
