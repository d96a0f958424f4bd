"""Prompt text for SCBench's two shared-context modes.

A task's first user message is ``context_prompt + "\\n\\n" + query(turn 0)`` (see
:meth:`~flexinference.scbench.tasks.Task.first_message`; ``scbench_mf`` states its target question once
there, and again before each later question, as SCBench does). With a chat template (the tokenizer's
``apply_chat_template``, used when the tokenizer has one):

* **multi-turn**: the conversation ``user(turn 0), assistant(golden answer 0), user(turn 1), ...`` is
  rendered with the generation prompt after each user message; piece ``k`` is what rendering the first
  ``k + 1`` user messages adds to rendering the first ``k``: the golden answer of turn ``k - 1`` as the
  assistant message, then question ``k``. If a template does not render conversations as growing
  prefixes, piece ``k`` is SCBench's construction instead: the rendering of
  ``[system "", assistant answer, user question]`` minus that of ``[system ""]`` with the generation
  prompt; a template that supports neither raises ``ValueError``.
* **multi-request**: the first user message is rendered with a marker between the context and the
  question and cut there: the shared prefix ends inside the user message, and each request appends
  ``"\\n\\n" + query + end of message + generation prompt``. Prefix + query is exactly the single-turn
  prompt of that question.

Without a chat template (the plain format): multi-turn piece 0 is the first user message, piece ``k`` is
``golden answer + "\\n\\n" + query(turn k)`` (SCBench's non-chat follow-up format); multi-request shares
the context prompt and appends ``"\\n\\n" + query``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flexinference.scbench.data import Record, format_answer
from flexinference.scbench.tasks import Task

__all__ = ["has_chat_template", "multi_request_prompts", "multi_turn_prompts"]

_SPLIT = "\x1fSCBENCH-SPLIT\x1f"


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer can render chats (``apply_chat_template`` and a non-empty template)."""
    return callable(getattr(tokenizer, "apply_chat_template", None)) and bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=generation_prompt, tokenize=False)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def multi_turn_prompts(task: Task, record: Record, tokenizer: Any, chat: bool) -> list[str]:
    """The text fed at each turn of one conversation (piece 0 includes the context).

    Args:
        task: the task (templates).
        record: the record; every turn is used.
        tokenizer: renders the chat template when ``chat``.
        chat: use the tokenizer's chat template, else the plain format.
    """
    first = task.first_message(record)
    if not chat:
        return [first] + [
            f"{format_answer(prev.answer)}\n\n{task.query_prompt(turn)}"
            for prev, turn in zip(record.turns, record.turns[1:])
        ]
    messages = [{"role": "user", "content": first}]
    pieces = [_render(tokenizer, messages, True)]
    so_far = pieces[0]
    for prev, turn in zip(record.turns, record.turns[1:]):
        answer, question = format_answer(prev.answer), task.query_prompt(turn)
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": question}]
        full = _render(tokenizer, messages, True)
        if full.startswith(so_far):
            pieces.append(full[len(so_far) :])
            so_far = full
            continue
        head = _render(tokenizer, [{"role": "system", "content": ""}], True)
        tail = _render(
            tokenizer,
            [
                {"role": "system", "content": ""},
                {"role": "assistant", "content": answer},
                {"role": "user", "content": question},
            ],
            True,
        )
        if not tail.startswith(head):
            raise ValueError(
                "the tokenizer's chat template cannot be continued turn by turn (neither as a growing prefix "
                "nor with SCBench's system-prompt construction); run with the plain format (chat=False)"
            )
        pieces.append(tail[len(head) :])
        so_far += pieces[-1]
    return pieces


def multi_request_prompts(task: Task, record: Record, tokenizer: Any, chat: bool) -> tuple[str, list[str]]:
    """The shared prefix and one suffix per question (``prefix + suffix_k`` is turn ``k``'s single-turn
    prompt)."""
    context = task.context_prompt(record)
    queries = [f"\n\n{task.query_prompt(turn)}" for turn in record.turns]
    if not chat:
        return context, queries
    prefix, suffixes = None, []
    for query in queries:
        text = _render(tokenizer, [{"role": "user", "content": context + _SPLIT + query}], True)
        parts = text.split(_SPLIT)
        if len(parts) != 2 or (prefix is not None and parts[0] != prefix):
            raise ValueError("the tokenizer's chat template altered the split marker; run with chat=False")
        prefix = parts[0]
        suffixes.append(parts[1])
    assert prefix is not None
    return prefix, suffixes
