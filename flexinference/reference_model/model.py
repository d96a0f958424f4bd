"""The reference model: a small Llama trained on SCBench-style synthetic tasks, shipped as weights.

Architecture: transformers' ``LlamaForCausalLM`` with 6 layers, hidden 256, 8 query heads and 2 KV heads
of dim 32 (GQA 4:1), RoPE (theta 10000), a 128-id vocabulary over :class:`CharTokenizer`; about 4.6M
parameters. Trained by :mod:`flexinference.reference_model.train` on multi-turn conversations whose
contexts hold up to :data:`TRAIN_CONTEXT` characters (see ``docs/accuracy.md``).

Example::

    from flexinference.reference_model import load
    model, tok = load()                 # CPU, float32, no network
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from flexinference.reference_model.tokenizer import CharTokenizer

__all__ = ["META_FILE", "TRAIN_CONTEXT", "WEIGHTS_FILE", "build_model", "load", "load_metadata",
           "reference_config", "save"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = WEIGHTS_DIR / "model.safetensors"
META_FILE = WEIGHTS_DIR / "training.json"
#: Longest context (characters = tokens) of the training conversations.
TRAIN_CONTEXT = 2048


def reference_config(max_positions: int = 32768, rope_factor: float = 1.0) -> Any:
    """The reference model's ``LlamaConfig`` (``max_positions`` only bounds the RoPE cache).

    Args:
        max_positions: ``max_position_embeddings``.
        rope_factor: ``> 1`` stretches RoPE with YaRN (Peng et al., 2023, arXiv:2309.00071) from the training
            length :data:`TRAIN_CONTEXT` to ``rope_factor`` times it, untrained: the model's only way past its
            training contexts (plain RoPE fails at 2x; measured in docs/accuracy.md).
    """
    from transformers import LlamaConfig

    if isinstance(rope_factor, bool) or not isinstance(rope_factor, (int, float)) or not rope_factor >= 1:
        raise ValueError(f"rope_factor must be a number >= 1, got {rope_factor!r}")
    tok = CharTokenizer()
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=max_positions,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, tok.end_token_id],
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    if rope_factor > 1:
        config.rope_parameters = {**config.rope_parameters, "rope_type": "yarn", "factor": float(rope_factor),
                                  "original_max_position_embeddings": TRAIN_CONTEXT}
    return config


def build_model(seed: int = 0, max_positions: int = 32768, rope_factor: float = 1.0) -> Any:
    """A freshly initialised reference model (the training starting point), seeded from a forked RNG."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(reference_config(max_positions, rope_factor))
    _stop_on_end(model)
    return model


def _stop_on_end(model: Any) -> None:
    tok = CharTokenizer()
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.end_token_id]
    model.generation_config.pad_token_id = tok.pad_token_id


def save(model: Any, path: str | Path = WEIGHTS_FILE, metadata: dict[str, Any] | None = None) -> None:
    """Write ``model``'s weights (bfloat16 safetensors: 9 MB; the model is trained under bf16 autocast) and, if given, ``metadata`` as ``training.json``
    beside them (with the tokenizer's vocabulary, checked again at load)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})
    if metadata is not None:
        meta = dict(metadata, vocab=CharTokenizer().vocab)
        (path.parent / "training.json").write_text(json.dumps(meta, indent=1) + "\n")


def load_metadata(path: str | Path = META_FILE) -> dict[str, Any]:
    """The training record shipped beside the weights (command, seed, steps, measured accuracy)."""
    return json.loads(Path(path).read_text())


def load(device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
         path: str | Path = WEIGHTS_FILE, attn_implementation: str = "sdpa",
         rope_factor: float = 1.0) -> tuple[Any, CharTokenizer]:
    """The trained reference model (eval mode) and its tokenizer; reads only files in the package.

    Args:
        device: where to put the model (default CPU).
        dtype: parameter dtype (weights are stored in bfloat16 and cast).
        path: a weights file written by :func:`save` (default: the shipped one).
        attn_implementation: transformers' attention backend to start from.
        rope_factor: YaRN context extension factor (see :func:`reference_config`); 1 = as trained.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no reference weights at {path}; train them with `python -m flexinference.reference_model.train`"
        )
    meta_file = path.parent / "training.json"
    tok = CharTokenizer()
    if meta_file.is_file():
        vocab = load_metadata(meta_file).get("vocab")
        if vocab is not None and vocab != tok.vocab:
            raise ValueError(f"{meta_file}: the weights were trained with another tokenizer vocabulary")
    model = build_model(rope_factor=rope_factor)
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the reference architecture "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.set_attn_implementation(attn_implementation)
    return model.to(device=device or "cpu", dtype=dtype).eval(), tok
