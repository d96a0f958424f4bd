"""A small Llama trained on SCBench-style synthetic tasks and shipped with the package, so a sparse
method's cost in accuracy is measurable anywhere with no download (``docs/accuracy.md``).

    model, tok = flexinference.reference_model.load()
"""

from flexinference.reference_model.model import (
    META_FILE,
    TRAIN_CONTEXT,
    WEIGHTS_FILE,
    build_model,
    load,
    load_metadata,
    reference_config,
    save,
)
from flexinference.reference_model.tokenizer import CharTokenizer

__all__ = ["META_FILE", "TRAIN_CONTEXT", "WEIGHTS_FILE", "CharTokenizer", "build_model", "load", "load_metadata",
           "reference_config", "save"]
