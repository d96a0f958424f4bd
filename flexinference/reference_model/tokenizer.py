"""The character-level tokenizer of the reference model (and of the embedded pipeline-check model).

One token per printable ASCII character, tab or newline, plus eight special tokens: 103 ids, so a
model's vocabulary of 128 leaves room. Pure Python, no files: the vocabulary is the code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["CharTokenizer"]


class CharTokenizer:
    """A character-level tokenizer: one token per printable ASCII character, tab or newline, plus special
    tokens; any other character maps to ``<unk>``.

    Chat format (``apply_chat_template``): ``<s>`` then, per message, ``<|role|>`` + content + ``<|end|>``;
    the generation prompt is ``<|assistant|>``. Special tokens written in text are parsed as one token.

    Example::

        tok = CharTokenizer()
        ids = tok.encode("hi")          # [bos, 'h', 'i']
        tok.decode(ids) == "hi"
    """

    SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
    chat_template = "<s>{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"

    def __init__(self) -> None:
        chars = "\t\n" + "".join(chr(c) for c in range(32, 127))
        self._vocab = list(self.SPECIAL_TOKENS) + list(chars)
        self._ids = {tok: i for i, tok in enumerate(self._vocab)}
        self._special_ids = {t: i for i, t in enumerate(self.SPECIAL_TOKENS)}
        self._special = re.compile("(" + "|".join(re.escape(t) for t in self.SPECIAL_TOKENS) + ")")
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id = range(4)

    @property
    def end_token_id(self) -> int:
        """Id of ``<|end|>``, which closes every chat message (a chat model stops on it)."""
        return self._special_ids["<|end|>"]

    @property
    def vocab(self) -> list[str]:
        """Every token, in id order."""
        return list(self._vocab)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def __len__(self) -> int:
        return len(self._vocab)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` prepends ``<s>``."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = [self.bos_token_id] if add_special_tokens else []
        for piece in self._special.split(text):
            if piece in self._special_ids:
                ids.append(self._special_ids[piece])
            else:
                ids.extend(self._ids.get(ch, self.unk_token_id) for ch in piece)
        return ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; out-of-vocabulary ids (a model's padded vocabulary) decode as nothing."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        n_special = len(self.SPECIAL_TOKENS)
        out = []
        for i in ids:
            if 0 <= i < len(self._vocab) and not (skip_special_tokens and i < n_special):
                out.append(self._vocab[i])
        return "".join(out)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        **_: Any,
    ) -> str | list[int]:
        """Render ``messages`` (``{"role": "system"|"user"|"assistant", "content": str}``)."""
        parts = ["<s>"]
        for m in messages:
            if m["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"unknown chat role {m['role']!r}")
            parts.append(f"<|{m['role']}|>{m['content']}<|end|>")
        if add_generation_prompt:
            parts.append("<|assistant|>")
        text = "".join(parts)
        return self.encode(text, add_special_tokens=False) if tokenize else text
