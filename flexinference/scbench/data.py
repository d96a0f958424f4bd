"""SCBench records: the data model, validation, and loaders (local JSON/JSONL, optionally the HF hub).

A record is SCBench's shared-context example (Li et al., 2024, "SCBench: A KV Cache-Centric Analysis of
Long-Context Methods", arXiv:2412.10319)::

    {"id": 0, "context": "<long shared context>",
     "multi_turns": [{"input": "<question 1>", "answer": "<golden answer 1>"}, ...]}

Some tasks carry more per turn: ``options`` (four strings, ``scbench_choice_eng``), ``task`` (the subtask of a
turn in ``scbench_summary_with_needles`` / ``scbench_repoqa_and_kv``), ``name`` (the function a
``scbench_repoqa`` turn asks for; records then also carry ``repo`` and ``lang``). Anything else is kept in
``extra`` and written back unchanged.

``scbench_mf`` is the one task whose published context is a list of integers rather than a string; it is
rendered the way SCBench's prompt formatting renders it (Python's list repr, ``"[1, 2, 3]"``). Every other
non-string context is rejected.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flexinference.scbench.tasks import get_task

__all__ = ["Record", "Turn", "format_answer", "load_hub", "load_records", "parse_record", "save_records"]

HUB_DATASET = "microsoft/SCBench"

# Turn keys with a meaning of their own; everything else goes to Turn.extra.
_TURN_KEYS = ("input", "answer", "options", "task", "name")
_RECORD_KEYS = ("id", "context", "multi_turns")


@dataclass(frozen=True)
class Turn:
    """One question of a record with its golden answer.

    Attributes:
        input: the question text.
        answer: the golden answer: a string, a number (``scbench_mf``), or a list of strings (any one of
            them, or all of them for ``scbench_vt``, counts; see :mod:`flexinference.scbench.metrics`).
        options: the four options of a multiple-choice turn, else ``None``.
        task: the subtask of a turn in a mixed task (``"scbench_summary"``, ``"scbench_passkey"``,
            ``"scbench_repoqa"``, ``"scbench_kv"``), else ``None``.
        name: the function name a RepoQA turn asks for, else ``None``.
        extra: any other keys of the turn, kept verbatim.
    """

    input: str
    answer: Any
    options: tuple[str, ...] | None = None
    task: str | None = None
    name: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"input": self.input, "answer": self.answer}
        if self.options is not None:
            out["options"] = list(self.options)
        if self.task is not None:
            out["task"] = self.task
        if self.name is not None:
            out["name"] = self.name
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class Record:
    """One shared context and its questions.

    Attributes:
        id: the record id (int or str), quoted in every validation error.
        context: the shared long context.
        turns: the questions, in order (at least one).
        extra: other top-level keys (``repo``, ``lang``, ...), kept verbatim.
    """

    id: int | str
    context: str
    turns: tuple[Turn, ...]
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The record in SCBench's JSON format."""
        out: dict[str, Any] = {"id": self.id, "context": self.context}
        out["multi_turns"] = [t.to_dict() for t in self.turns]
        out.update(self.extra)
        return out

    def with_turns(self, max_turns: int) -> Record:
        """The record with only its first ``max_turns`` turns."""
        if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
            raise ValueError(f"max_turns must be a positive int, got {max_turns!r}")
        return Record(self.id, self.context, self.turns[:max_turns], self.extra)


def format_answer(answer: Any) -> str:
    """A golden answer as text, as it is replayed in later turns (lists joined with ``", "``)."""
    if isinstance(answer, (list, tuple)):
        return ", ".join(str(a) for a in answer)
    return str(answer)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_answer(answer: Any, where: str) -> None:
    if isinstance(answer, str) or _is_number(answer):
        return
    if isinstance(answer, (list, tuple)) and answer and all(isinstance(a, str) or _is_number(a) for a in answer):
        return
    raise ValueError(f"{where}: 'answer' must be a string, a number or a non-empty list of them, got {answer!r}")


def _parse_turn(raw: Any, where: str, task: str | None) -> Turn:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: a turn must be an object with 'input' and 'answer', got {type(raw).__name__}")
    for key in ("input", "answer"):
        if key not in raw:
            raise ValueError(f"{where}: missing field {key!r}")
    text = raw["input"]
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: 'input' must be a non-empty string, got {text!r}")
    _check_answer(raw["answer"], where)
    options = raw.get("options")
    if options is not None:
        if (
            not isinstance(options, Sequence)
            or isinstance(options, str)
            or not all(isinstance(o, str) for o in options)
        ):
            raise ValueError(f"{where}: 'options' must be a list of strings, got {options!r}")
        options = tuple(options)
    sub, name = raw.get("task"), raw.get("name")
    for key, value in (("task", sub), ("name", name)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where}: {key!r} must be a string, got {value!r}")
    if task is not None:
        spec = get_task(task)
        if spec.needs_options and (options is None or len(options) != 4):
            raise ValueError(f"{where}: task {task} needs 'options' with exactly 4 strings, got {options!r}")
        if spec.subtasks and sub not in spec.subtasks:
            raise ValueError(f"{where}: task {task} needs 'task' in {list(spec.subtasks)}, got {sub!r}")
        if spec.needs_name and sub in (None, "scbench_repoqa") and name is None:
            raise ValueError(f"{where}: task {task} needs the function 'name' of each RepoQA turn")
    extra = {k: v for k, v in raw.items() if k not in _TURN_KEYS}
    return Turn(text, raw["answer"], options, sub, name, extra)


def parse_record(raw: Any, *, task: str | None = None, index: int | None = None) -> Record:
    """Validate one SCBench record and return it as a :class:`Record`.

    Args:
        raw: the decoded JSON object.
        task: the task name, for task-specific checks (options, subtasks, function names) and for
            ``scbench_mf``'s integer-list context. ``None`` checks the common format only.
        index: the record's position in its file, named in errors when the id is missing.

    Raises:
        ValueError: missing or ill-typed fields, an empty ``multi_turns``, a non-string context; the
            message starts with ``record <id>``.
    """
    label = f"record #{index}" if index is not None else "record"
    if not isinstance(raw, Mapping):
        raise ValueError(f"{label}: expected a JSON object, got {type(raw).__name__}")
    if "id" not in raw:
        raise ValueError(f"{label}: missing field 'id'")
    rid = raw["id"]
    if isinstance(rid, bool) or not isinstance(rid, (int, str)):
        raise ValueError(f"{label}: 'id' must be an int or a string, got {rid!r}")
    where = f"record {rid!r}"
    for key in ("context", "multi_turns"):
        if key not in raw:
            raise ValueError(f"{where}: missing field {key!r}")
    context = raw["context"]
    if task == "scbench_mf" and isinstance(context, list) and all(_is_number(x) for x in context):
        context = str(context)
    if not isinstance(context, str):
        raise ValueError(f"{where}: 'context' must be a string, got {type(context).__name__}")
    turns_raw = raw["multi_turns"]
    if not isinstance(turns_raw, list) or not turns_raw:
        raise ValueError(f"{where}: 'multi_turns' must be a non-empty list of turns, got {turns_raw!r}")
    turns = tuple(_parse_turn(t, f"{where}, turn {i}", task) for i, t in enumerate(turns_raw))
    extra = {k: v for k, v in raw.items() if k not in _RECORD_KEYS}
    return Record(rid, context, turns, extra)


def parse_records(raws: Iterable[Any], *, task: str | None = None, limit: int | None = None) -> list[Record]:
    """Validate many records; ids must be unique."""
    records: list[Record] = []
    seen: set[Any] = set()
    for i, raw in enumerate(raws):
        if limit is not None and len(records) >= limit:
            break
        rec = parse_record(raw, task=task, index=i)
        if rec.id in seen:
            raise ValueError(f"record {rec.id!r}: duplicate id")
        seen.add(rec.id)
        records.append(rec)
    return records


def load_records(path: str | os.PathLike, *, task: str | None = None, limit: int | None = None) -> list[Record]:
    """Read SCBench records from a ``.jsonl`` file (one record a line) or a ``.json`` file (one record or a
    list of records), validating each.

    Args:
        path: the file.
        task: the task name, for task-specific checks (see :func:`parse_record`).
        limit: read at most this many records.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            raws = []
            for lineno, line in enumerate(f, 1):
                if limit is not None and len(raws) >= limit:
                    break
                if line.strip():
                    try:
                        raws.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
        else:
            data = json.load(f)
            raws = data if isinstance(data, list) else [data]
    return parse_records(raws, task=task, limit=limit)


def save_records(records: Iterable[Record], path: str | os.PathLike) -> None:
    """Write records as JSONL in SCBench's format (UTF-8, one record a line)."""
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec.to_dict(), ensure_ascii=False) + "\n")


def load_hub(task: str, *, split: str = "train", limit: int | None = None) -> list[Record]:
    """Load a task from the Hugging Face hub dataset ``microsoft/SCBench`` (needs ``datasets`` and
    network access; never used by the tests).

    Raises:
        ImportError: ``datasets`` is not installed.
    """
    get_task(task)  # validates the name before any download
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "loading SCBench from the hub needs the 'datasets' package (pip install datasets); "
            "or download the JSONL files and pass their folder"
        ) from e
    ds = datasets.load_dataset(HUB_DATASET, task, split=split)
    return parse_records(iter(ds), task=task, limit=limit)
