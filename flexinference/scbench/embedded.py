"""``flexinference eval --model random``: a tiny randomly initialised Llama and the character-level
tokenizer, so the whole pipeline (generation, prompts, both cache modes, every metric) is exercised in
seconds with no download.

Its weights are random: its scores are meaningless (:data:`EMBEDDED_NOTE` says so in every output). The
default model of ``flexinference eval`` is the trained one in :mod:`flexinference.reference_model`.
"""

from __future__ import annotations

import torch

from flexinference.reference_model.tokenizer import CharTokenizer

__all__ = ["EMBEDDED_NOTE", "CharTokenizer", "build_embedded_model"]

EMBEDDED_NOTE = (
    "embedded tiny model with RANDOM weights: scores are meaningless; this run only checks the pipeline "
    "(pass --model PATH for real numbers)"
)


def build_embedded_model(seed: int = 0, *, max_positions: int = 16384) -> tuple[torch.nn.Module, CharTokenizer]:
    """A tiny random Llama (2 layers, hidden 64, 4 query / 2 KV heads of dim 32) and its tokenizer.

    Head dim 32 lets every method run on it as configured by default (KIVI's group size is 32).

    Weights are drawn from a forked RNG seeded with ``seed``: the caller's global RNG is untouched and the
    same seed gives the same model.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = CharTokenizer()
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, tok
