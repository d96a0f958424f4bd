"""SCBench's per-task metrics, written from their definitions (Li et al., 2024, arXiv:2412.10319, and the
scoring rules of its reference harness, ``scbench/compute_scores.py``, which reuses InfiniteBench's, Zhang
et al., 2024, arXiv:2402.13718).

Each ``*_score`` function scores one prediction against one golden answer and returns a float in
``[0, 1]``; :func:`score_turn` picks the one of a task, :func:`aggregate` averages a task's turns.

* ``substring_match`` (kv, prefix_suffix; the kv half of repoqa_and_kv): the label occurs verbatim
  (case-sensitive) in the output.
* ``all_references_fraction`` (vt): fraction of the reference strings found (case-insensitive).
* ``containment`` (qa_eng, many_shot): 1 if any label occurs in the upper-cased output.
* ``char_f1`` (qa_chn): F1 over characters after removing whitespace and English/Chinese punctuation
  (one character = one token), maximised over labels.
* ``choice_accuracy`` (choice_eng): InfiniteBench's option rule: the first character when it is a
  letter A-D, else the text after "answer is"/"answer:"/"option is", else the first standalone A-D.
* ``rouge_lsum`` (summary, the summary half of summary_with_needles): see
  :mod:`flexinference.scbench.similarity`.
* ``first_number_match`` (mf): the first number (``\\d+\\.\\d+|\\d+``) of the output equals the label
  (compared as ``int(float(x))`` for integer labels).
* ``first_int_match`` (passkey turns of summary_with_needles): the first run of digits equals the label.
* ``repoqa_pass`` (repoqa): among the repository's functions ("needles"), the one with the highest BLEU
  similarity to the output (its first fenced code block if any) is the requested function, and that
  similarity is at least 0.8; averaged over turns this is pass@1 with one greedy sample.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flexinference.scbench.data import Turn
from flexinference.scbench.similarity import bleu4, rouge_lsum
from flexinference.scbench.tasks import Task, get_task

__all__ = [
    "aggregate",
    "all_references_fraction",
    "char_f1",
    "choice_accuracy",
    "containment",
    "first_int_match",
    "first_number_match",
    "repoqa_pass",
    "rouge_lsum",
    "score_turn",
    "substring_match",
]

REPOQA_THRESHOLD = 0.8

_ZH_PUNCT = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."  # noqa: E501
_ALL_PUNCT = frozenset(string.punctuation + _ZH_PUNCT)


def _labels(answer: Any) -> list[str]:
    if isinstance(answer, (list, tuple)):
        return [str(a) for a in answer]
    return [str(answer)]


def substring_match(prediction: str, answer: Any) -> float:
    """1.0 if the (first) label occurs verbatim in ``prediction``."""
    return float(_labels(answer)[0] in prediction)


def all_references_fraction(prediction: str, answer: Any) -> float:
    """Fraction of the references present in ``prediction``, case-insensitive."""
    refs = _labels(answer)
    low = prediction.lower()
    return sum(r.lower() in low for r in refs) / len(refs)


def containment(prediction: str, answer: Any) -> float:
    """1.0 if any label occurs in ``prediction``, case-insensitive."""
    up = prediction.strip().upper()
    return float(any(label.upper() in up for label in _labels(answer)))


def _normalize_zh(text: str) -> str:
    return "".join(ch for ch in "".join(text.lower().split()) if ch not in _ALL_PUNCT)


def _f1(pred: Sequence[str], gold: Sequence[str]) -> float:
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def char_f1(prediction: str, answer: Any) -> float:
    """Character-level F1 (Chinese QA), the best over labels."""
    pred = list(_normalize_zh(prediction))
    return max(_f1(pred, list(_normalize_zh(label))) for label in _labels(answer))


def _choice_labels(answer: Any, options: Sequence[str] | None) -> list[str]:
    labels = _labels(answer)
    if options:
        for label in list(labels):
            if label in options:
                labels.append("ABCD"[list(options).index(label)])
            elif label in ("A", "B", "C", "D") and "ABCD".index(label) < len(options):
                labels.append(options["ABCD".index(label)])
    return labels


def choice_accuracy(prediction: str, answer: Any, options: Sequence[str] | None = None) -> float:
    """Multiple-choice accuracy. ``answer`` may be the option letter or the option text; with ``options``
    both forms count."""
    labels = _choice_labels(answer, options)
    pred = prediction.strip()
    if not pred:
        return 0.0
    if pred[0] in "ABCD":
        return float(pred[0] in labels)
    if pred in labels:
        return 1.0
    for ch in "\n\"'.,?!{}":
        pred = pred.replace(ch, " ")
    pred = re.sub(" +", " ", pred)
    for prefix in ("answer is:", "answer:", "answer is", "option is"):
        idx = pred.find(prefix)
        if idx == -1:
            continue
        after = pred[idx + len(prefix) + 1 :]
        return float(any(after.startswith(label) for label in labels))
    for word in pred.split():
        if word in ("A", "B", "C", "D"):
            return float(word in labels)
    return 0.0


def first_number_match(prediction: str, answer: Any) -> float:
    """The first number in ``prediction`` equals the numeric label (Math.Find)."""
    label = answer[0] if isinstance(answer, (list, tuple)) else answer
    if isinstance(label, str):
        label = float(label) if "." in label else int(label)
    found = re.search(r"\d+\.\d+|\d+", prediction)
    if found is None:
        return 0.0
    if isinstance(label, int):
        return float(int(float(found.group(0))) == label)
    return float(float(found.group(0)) == float(label))


def first_int_match(prediction: str, answer: Any) -> float:
    """The first run of digits in ``prediction`` equals the label (pass-key turns)."""
    found = re.search(r"\d+", prediction)
    return float(found is not None and found.group(0) == _labels(answer)[0])


def _first_code_block(text: str) -> str:
    blocks = re.findall(r"^```(?:\w+)?\s*\n(.*?)(?=^```)```", text.strip(), re.DOTALL | re.MULTILINE)
    return blocks[0] if blocks else text.strip()


def repoqa_pass(prediction: str, name: str, needles: Mapping[str, str], threshold: float = REPOQA_THRESHOLD) -> float:
    """1.0 if the most BLEU-similar needle to the output is function ``name`` with similarity >=
    ``threshold``.

    Args:
        prediction: the model output; its first fenced code block is compared when it has one.
        name: the requested function's name.
        needles: every function of the repository, name -> source (must include ``name``).
    """
    if name not in needles:
        raise ValueError(f"repoqa_pass: requested function {name!r} is not among the needles {sorted(needles)}")
    code = _first_code_block(prediction)
    best_name, best = None, 0.0
    for needle_name, source in needles.items():
        sim = bleu4(code, source)
        if sim > best:
            best_name, best = needle_name, sim
    return float(best_name == name and best >= threshold)


def score_turn(task: str | Task, prediction: str, turn: Turn, needles: Mapping[str, str] | None = None) -> float:
    """Score one turn of ``task``.

    Args:
        task: task name or :class:`Task`.
        prediction: the decoded model output.
        turn: the turn with its golden answer.
        needles: RepoQA turns only: the repository's functions (name -> source).
    """
    task = get_task(task)
    kind = turn.task if task.subtask_budgets else task.name
    if kind in ("scbench_kv", "scbench_prefix_suffix"):
        return substring_match(prediction, turn.answer)
    if kind == "scbench_vt":
        return all_references_fraction(prediction, turn.answer)
    if kind in ("scbench_qa_eng", "scbench_many_shot"):
        return containment(prediction, turn.answer)
    if kind == "scbench_qa_chn":
        return char_f1(prediction, turn.answer)
    if kind == "scbench_choice_eng":
        return choice_accuracy(prediction, turn.answer, turn.options)
    if kind == "scbench_summary":
        return rouge_lsum(prediction, _labels(turn.answer)[0])
    if kind == "scbench_mf":
        return first_number_match(prediction, turn.answer)
    if kind == "scbench_passkey":
        return first_int_match(prediction, turn.answer)
    if kind == "scbench_repoqa":
        if turn.name is None:
            raise ValueError("scbench_repoqa turns need the function 'name'")
        pool = dict(needles or {})
        pool.setdefault(turn.name, _labels(turn.answer)[0])
        return repoqa_pass(prediction, turn.name, pool)
    raise ValueError(f"task {task.name}: no metric for turn kind {kind!r}")


def aggregate(task: str | Task, scored: Iterable[tuple[str | None, float]]) -> tuple[float, dict[str, float]]:
    """Average turn scores into the task score.

    Args:
        task: the task.
        scored: ``(turn.task, score)`` pairs.

    Returns:
        ``(score, subscores)``: mixed tasks report the mean of each subtask in ``subscores`` and their
        unweighted mean as the score; other tasks the plain mean and no subscores.
    """
    task = get_task(task)
    pairs = list(scored)
    if not pairs:
        raise ValueError(f"task {task.name}: no scored turns to aggregate")
    if not task.subtask_budgets:
        return sum(s for _, s in pairs) / len(pairs), {}
    groups: dict[str, list[float]] = {}
    for sub, s in pairs:
        groups.setdefault(str(sub), []).append(s)
    subscores = {sub: sum(v) / len(v) for sub, v in groups.items()}
    return sum(subscores.values()) / len(subscores), subscores
