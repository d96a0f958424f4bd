"""The 12 SCBench tasks: metric, generation budget and prompt templates of each.

Task list, metrics and max new tokens follow SCBench (Li et al., 2024, arXiv:2412.10319) and its reference
harness (``scbench/eval_utils.py`` and ``compute_scores.py`` in microsoft/MInference):

==============================  ==========================================  ==========================
task                            metric                                      max new tokens
==============================  ==========================================  ==========================
scbench_kv                      label is a substring of the output           150
scbench_prefix_suffix           label is a substring of the output           150
scbench_vt                      fraction of reference variables in output    30
scbench_repoqa                  pass@1 at BLEU similarity >= 0.8             1024
scbench_qa_eng                  a label is contained (case-insensitive)      40
scbench_qa_chn                  character-level F1                           40
scbench_choice_eng              option accuracy                              40
scbench_many_shot               a label is contained (case-insensitive)      10
scbench_summary                 ROUGE-Lsum F1                                200
scbench_mf                      first number equals the label                5
scbench_summary_with_needles    ROUGE-Lsum (summary) + first integer (key)   800 / 15
scbench_repoqa_and_kv           pass@1 (RepoQA) + substring (KV)             1024 / 80
==============================  ==========================================  ==========================

Prompts: a task's prompt is ``context_prompt`` (instruction + shared context), then ``"\\n\\n"``, then the
turn's ``query``. These are SCBench's templates (its ``multiturn_templates`` split at the context), with
the typo "The the correct answer is" fixed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flexinference.scbench.data import Record, Turn

__all__ = ["SYNTHETIC_TASKS", "TASKS", "TASK_NAMES", "Task", "get_task"]


@dataclass(frozen=True, slots=True)
class Task:
    """One SCBench task.

    Attributes:
        name: SCBench's task name (also the HF dataset config and the JSONL file stem).
        category: SCBench's capability group.
        metric: what the score measures (see :mod:`flexinference.scbench.metrics`).
        max_new_tokens: greedy decoding budget per turn.
        instruction: template of the shared part, with ``{context}``.
        query: template of one question, with ``{input}`` (and ``{A}``..``{D}`` for options).
        subtask_budgets: for mixed tasks, ``(subtask, max_new_tokens)`` pairs; a turn's ``task`` picks
            one (``subtasks`` lists their names).
        needs_options: turns carry four ``options``.
        needs_name: RepoQA turns carry the function ``name``.
        synthetic: an offline generator exists (:mod:`flexinference.scbench.generators`).
    """

    name: str
    category: str
    metric: str
    max_new_tokens: int
    instruction: str = "{context}"
    query: str = "{input}"
    subtask_budgets: tuple[tuple[str, int], ...] = ()
    needs_options: bool = False
    needs_name: bool = False
    synthetic: bool = False

    def __post_init__(self) -> None:
        if not self.name.startswith("scbench_"):
            raise ValueError(f"Task.name must start with 'scbench_', got {self.name!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise TypeError(f"Task.max_new_tokens must be an int, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"Task.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if "{context}" not in self.instruction:
            raise ValueError(f"Task.instruction must contain '{{context}}', got {self.instruction!r}")

    @property
    def subtasks(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.subtask_budgets)

    def max_new_tokens_for(self, turn: Turn) -> int:
        """The decoding budget of one turn (its subtask's, in mixed tasks)."""
        for name, budget in self.subtask_budgets:
            if turn.task == name:
                return budget
        return self.max_new_tokens

    def context_prompt(self, record: Record) -> str:
        """Instruction plus the shared context (``scbench_mf`` also puts the first question's target
        before the context, as SCBench does)."""
        text = self.instruction.format(context=record.context)
        if self.name == "scbench_mf":
            text = f"{_mf_target_question(record.turns[0].input)}\n\n{text}"
        return text

    def first_message(self, record: Record) -> str:
        """The first user message of a conversation: ``context_prompt``, a blank line, the first question
        (for ``scbench_mf`` without repeating the target question already before the context)."""
        first = record.turns[0]
        query = self.query.format(input=first.input) if self.name == "scbench_mf" else self.query_prompt(first)
        return f"{self.context_prompt(record)}\n\n{query}"

    def query_prompt(self, turn: Turn) -> str:
        """One question as the model sees it."""
        fields = {"input": turn.input}
        if self.needs_options:
            fields.update(zip("ABCD", turn.options or ("",) * 4))
        text = self.query.format(**fields)
        if self.name == "scbench_mf":
            text = f"{_mf_target_question(turn.input)}\n\n{text}"
        return text


def _mf_target_question(text: str) -> str:
    """SCBench's Math.Find prefix: "The largest number of the list is" -> "What is the largest number of
    the list?". Inputs without that phrase get no prefix."""
    found = re.findall(r"The .+ is", text)
    if not found:
        return ""
    return f"What is {found[0].lower()[:-3]}?"


_CHOICE_QUERY = "Question: {input}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\n\nThe correct answer is"

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "scbench_kv",
            "string retrieval",
            "substring",
            150,
            instruction="Extract the value corresponding to the specified key in the JSON object below.\n\n{context}",
            synthetic=True,
        ),
        Task("scbench_prefix_suffix", "string retrieval", "substring", 150, synthetic=True),
        Task("scbench_vt", "string retrieval", "fraction of references found", 30, synthetic=True),
        Task(
            "scbench_repoqa",
            "semantic retrieval",
            "pass@1 (BLEU >= 0.8)",
            1024,
            instruction=(
                "Based on the function description and code context, please retrieve and repeat the exact "
                "described function from the code context in a code block wrapped by ```:\n\n{context}"
            ),
            needs_name=True,
        ),
        Task(
            "scbench_qa_eng",
            "semantic retrieval",
            "containment",
            40,
            instruction="Read the book and answer the question. Be very concise in your answer.\n\n{context}",
            query="Question: {input}\nAnswer:",
        ),
        Task(
            "scbench_qa_chn",
            "semantic retrieval",
            "character F1",
            40,
            instruction="阅读以下书籍然后回答问题。\n\n{context}",
            query="问题：{input}\n答案：",
        ),
        Task(
            "scbench_choice_eng",
            "semantic retrieval",
            "option accuracy",
            40,
            instruction="Read the book and answer the question.\n\n{context}",
            query=_CHOICE_QUERY,
            needs_options=True,
        ),
        Task("scbench_many_shot", "global information", "containment", 10),
        Task("scbench_summary", "global information", "ROUGE-Lsum", 200),
        Task("scbench_mf", "global information", "first number", 5, synthetic=True),
        Task(
            "scbench_summary_with_needles",
            "multi-tasking",
            "ROUGE-Lsum + first integer",
            800,
            subtask_budgets=(("scbench_summary", 800), ("scbench_passkey", 15)),
            synthetic=True,
        ),
        Task(
            "scbench_repoqa_and_kv",
            "multi-tasking",
            "pass@1 + substring",
            1024,
            subtask_budgets=(("scbench_repoqa", 1024), ("scbench_kv", 80)),
            needs_name=True,
        ),
    )
}

TASK_NAMES: tuple[str, ...] = tuple(TASKS)
SYNTHETIC_TASKS: tuple[str, ...] = tuple(name for name, t in TASKS.items() if t.synthetic)


def get_task(name: str) -> Task:
    """The task called ``name``; unknown names raise ``ValueError`` listing the valid ones."""
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(TASK_NAMES)}")
    return TASKS[name]
