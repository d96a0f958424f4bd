"""Training examples for the reference model: SCBench-style multi-turn conversations, generated offline.

Each example is one record of a synthetic task (:mod:`flexinference.scbench.generators`) rendered exactly
as the harness feeds it in multi-turn mode with the tokenizer's chat template: the first user message
(instruction, shared context, first question), then for each turn the golden answer as the assistant
message and the next question. The answer tokens and the ``<|end|>`` that closes each answer are the
targets (``answer_mask``); turn 0 of a conversation is also exactly the multi-request prompt of that
question, so both harness modes are in distribution.

The generators measure contexts with the tokenizer; here ``len`` stands in, which is exact for the
character tokenizer on plain ASCII contexts (no special tokens) and keeps generation cheap.
"""

from __future__ import annotations

import random
import string
import uuid
from dataclasses import dataclass, field

import torch

from flexinference.reference_model.tokenizer import CharTokenizer
from flexinference.scbench.data import Record, format_answer
from flexinference.scbench.generators import GENERATORS, MAX_TURNS
from flexinference.scbench.prompts import multi_turn_prompts
from flexinference.scbench.tasks import get_task

__all__ = ["AUX_TASKS", "COPY_HEX_TASK", "COPY_TASK", "DEFAULT_MIX", "Example", "TaskMix", "make_batch", "make_copy_example", "make_example"]

#: An auxiliary training task (not an SCBench task): a random string, a newline, the same string again;
#: the copy is the answer. It makes induction (copy) heads form early, which retrieval builds on.
COPY_TASK = "copy"
#: The copy task over comma-separated random UUIDs: a 16-letter alphabet makes short n-grams ambiguous, so
#: copying them needs position tracking, not local matching (what KV retrieval's values need).
COPY_HEX_TASK = "copy_hex"
AUX_TASKS = (COPY_TASK, COPY_HEX_TASK)
_COPY_CHARS = string.ascii_letters + string.digits + "-_"

#: Task weights of the training mix: the generated SCBench tasks plus the auxiliary copy task.
DEFAULT_MIX: dict[str, float] = {
    "scbench_kv": 0.3,
    "scbench_prefix_suffix": 0.15,
    "scbench_vt": 0.1,
    "scbench_summary_with_needles": 0.15,
    "scbench_mf": 0.1,
    COPY_TASK: 0.2,
}


@dataclass(frozen=True)
class TaskMix:
    """Which generated tasks a batch draws from, and how often.

    Args:
        weights: task name -> relative weight (> 0); every name must have an offline generator.
    """

    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))

    def __post_init__(self) -> None:
        if not self.weights:
            raise ValueError("weights must name at least one task")
        for name, w in self.weights.items():
            if name not in GENERATORS and name not in AUX_TASKS:
                raise ValueError(f"weights: task {name!r} has no generator; choose from "
                                 f"{', '.join([*GENERATORS, *AUX_TASKS])}")
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not w > 0:
                raise ValueError(f"weights: {name} must have a positive weight, got {w!r}")

    def draw(self, rng: random.Random) -> str:
        names = list(self.weights)
        return rng.choices(names, weights=[self.weights[n] for n in names])[0]


@dataclass(frozen=True)
class Example:
    """One tokenised conversation.

    Attributes:
        ids: token ids, ``<s>`` first.
        answer_mask: 1 where the token is part of an answer (or the ``<|end|>`` after it), else 0.
        task: the generated task.
        context_tokens: the generator's context budget.
    """

    ids: list[int]
    answer_mask: list[int]
    task: str
    context_tokens: int


def make_example(task: str, rng: random.Random, context_tokens: int, tokenizer: CharTokenizer,
                 num_turns: int = MAX_TURNS) -> Example:
    """One multi-turn conversation of ``task`` with a context of at most ``context_tokens`` characters.

    Args:
        task: a task with an offline generator.
        rng: the randomness (the record is a function of it).
        context_tokens: the context budget (the generator's ``context_tokens``).
        tokenizer: the character tokenizer (renders the chat template).
        num_turns: questions in the conversation, 1 to 5.
    """
    if task in AUX_TASKS:
        return make_copy_example(rng, context_tokens, tokenizer, hex_ids=task == COPY_HEX_TASK)
    if task not in GENERATORS:
        raise ValueError(f"task {task!r} has no generator; choose from {', '.join([*GENERATORS, *AUX_TASKS])}")
    if not 1 <= num_turns <= MAX_TURNS:
        raise ValueError(f"num_turns must be in [1, {MAX_TURNS}], got {num_turns}")
    context, turns = GENERATORS[task](rng, num_turns, len, context_tokens)
    record = Record(0, context, tuple(turns), {})
    pieces = multi_turn_prompts(get_task(task), record, tokenizer, chat=True)
    ids = tokenizer.encode(pieces[0], add_special_tokens=False)
    mask = [0] * len(ids)
    answers = [tokenizer.encode(format_answer(t.answer), add_special_tokens=False) + [tokenizer.end_token_id]
               for t in record.turns]
    for k, piece in enumerate(pieces[1:]):
        piece_ids = tokenizer.encode(piece, add_special_tokens=False)
        n = len(answers[k])
        if piece_ids[:n] != answers[k]:  # the template renders answer + <|end|> first; guard against drift
            raise RuntimeError(f"{task}: turn {k + 1} does not start with the previous golden answer")
        ids += piece_ids
        mask += [1] * n + [0] * (len(piece_ids) - n)
    ids += answers[-1]
    mask += [1] * len(answers[-1])
    return Example(ids, mask, task, context_tokens)


def make_copy_example(rng: random.Random, context_tokens: int, tokenizer: CharTokenizer,
                      hex_ids: bool = False) -> Example:
    """``<s>`` + a random string of 16 to ``min(1024, context_tokens // 2)`` characters + newline + the same
    string + ``<|end|>``; the copy and its ``<|end|>`` are the answer. ``hex_ids``: the string is random
    UUIDs joined by ``", "`` (cut to length) instead of letters and digits."""
    if context_tokens < 32:
        raise ValueError(f"context_tokens must be >= 32 for the copy task, got {context_tokens}")
    n = rng.randint(16, min(1024, context_tokens // 2))
    if hex_ids:
        text = ", ".join(str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n // 38 + 1))[:n]
    else:
        text = "".join(rng.choices(_COPY_CHARS, k=n))
    first = tokenizer.encode(text + "\n")
    copy = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.end_token_id]
    return Example(first + copy, [0] * len(first) + [1] * len(copy), COPY_TASK, context_tokens)


def make_batch(rng: random.Random, tokenizer: CharTokenizer, mix: TaskMix, context_tokens: int,
               batch_size: int, pad_to: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batch_size`` examples with one context budget, right-padded to a multiple of ``pad_to``.

    Returns:
        ``(ids, valid, answer)``: int64 ``(batch, length)`` ids (padding = the pad id), bool masks of real
        tokens and of answer tokens.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if pad_to < 1:
        raise ValueError(f"pad_to must be >= 1, got {pad_to}")
    examples = [make_example(mix.draw(rng), rng, context_tokens, tokenizer) for _ in range(batch_size)]
    longest = max(len(e.ids) for e in examples)
    length = -(-longest // pad_to) * pad_to
    ids = torch.full((batch_size, length), tokenizer.pad_token_id, dtype=torch.long)
    valid = torch.zeros(batch_size, length, dtype=torch.bool)
    answer = torch.zeros(batch_size, length, dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        valid[i, :n] = True
        answer[i, :n] = torch.tensor(e.answer_mask, dtype=torch.bool)
    return ids, valid, answer
