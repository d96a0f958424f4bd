"""Run SCBench tasks in its two shared-context modes, with greedy decoding, counting every model call.

* **multi_turn** (SCBench's default): one conversation per record on one cache. Turn 0 prefills the
  context and the first question; turn ``k`` prefills the golden answer of turn ``k - 1`` (as the
  assistant message) and question ``k`` on top of the same cache. Generated tokens never stay in the
  shared cache: after decoding, a plain ``DynamicCache`` is cropped back (``cache.crop(-n)``); any other
  cache (compressed, quantised, sliding) is decoded on a ``copy.deepcopy`` of the shared cache.
* **multi_request**: the context is prefilled once into a cache; each question is a separate request that
  prefills its own text and decodes on a ``copy.deepcopy`` of that prefix cache, never seeing the other
  questions.

A method's ``cache_attach`` (e.g. ``flexinference.cache.attach``) is entered around every use of each
cache object: the shared cache and every copy.

Inputs longer than ``max_length`` are truncated in the middle of the first prompt (SCBench's rule), to
the exact room left: ``max_length`` minus every later piece and the decoding budget (multi-turn), or minus
the longest question plus its budget (multi-request).

Calls are counted in :class:`CallStats` (prefill and decode forwards, tokens, cache copies and rollbacks,
seconds); peak memory per task run comes from :class:`~flexinference.scbench.measure.PeakMemory`.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from flexinference.scbench.data import Record
from flexinference.scbench.measure import PeakMemory
from flexinference.scbench.methods import Method
from flexinference.scbench.metrics import aggregate, score_turn
from flexinference.scbench.prompts import has_chat_template, multi_request_prompts, multi_turn_prompts
from flexinference.scbench.tasks import Task, get_task

__all__ = ["MODES", "CallStats", "RecordResult", "Runner", "TaskResult", "TurnResult", "truncate_middle"]

MODES = ("multi_turn", "multi_request")


@dataclass
class CallStats:
    """Counters of one task run (mutable, owned by that run)."""

    prefill_calls: int = 0
    decode_calls: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    generated_tokens: int = 0
    cache_copies: int = 0
    cache_rollbacks: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


@dataclass(frozen=True)
class TurnResult:
    """One answered question. ``cache_tokens_before`` is the cache length its prefill started from."""

    turn: int
    subtask: str | None
    prediction: str
    answer: Any
    score: float
    prompt_tokens: int
    new_tokens: int
    cache_tokens_before: int


@dataclass(frozen=True)
class RecordResult:
    id: int | str
    context_tokens: int
    truncated: bool
    turns: tuple[TurnResult, ...]


@dataclass(frozen=True)
class TaskResult:
    """A task evaluated with one method in one mode."""

    task: str
    method: str
    mode: str
    score: float
    subscores: dict[str, float]
    records: tuple[RecordResult, ...]
    stats: CallStats
    peak_memory_bytes: int | None
    memory_kind: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def truncate_middle(ids: Sequence[int], budget: int) -> list[int]:
    """Keep the first ``budget // 2`` and the last ``budget - budget // 2`` ids (SCBench's rule)."""
    if budget < 1:
        raise ValueError(f"max_length leaves no room for the context (budget {budget} tokens)")
    ids = list(ids)
    if len(ids) <= budget:
        return ids
    head = budget // 2
    return ids[:head] + ids[len(ids) - (budget - head) :]


def _eos_ids(tokenizer: Any, model: Any) -> set[int]:
    ids: set[int] = set()
    for value in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    try:
        ids = tokenizer.encode(text, add_special_tokens=special)
    except TypeError:
        ids = tokenizer.encode(text)
    return list(ids)


class Runner:
    """Greedy SCBench evaluation of one model and tokenizer.

    Args:
        model: a transformers causal LM (forward takes ``input_ids``, the cache and ``use_cache``).
        tokenizer: ``encode(text, add_special_tokens=)``, ``decode(ids, skip_special_tokens=)``, and
            optionally a chat template.
        chat_template: ``None`` uses the tokenizer's chat template when it has one; ``True``/``False``
            force it on/off (off: the plain format of :mod:`flexinference.scbench.prompts`).
        max_length: truncate the first prompt in the middle so a record fits this many tokens
            (``None``: no truncation).
        max_new_tokens: cap every task's decoding budget (``None``: SCBench's budgets).
        max_turns: use at most this many turns of each record (SCBench: 5).
        eos_token_ids: stop tokens; ``None`` takes the tokenizer's and the generation config's.

    Example::

        runner = Runner(model, tokenizer, max_length=131072)
        result = runner.run("scbench_kv", records, Method("dense"), mode="multi_request")
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        chat_template: bool | None = None,
        max_length: int | None = None,
        max_new_tokens: int | None = None,
        max_turns: int = 5,
        eos_token_ids: Iterable[int] | None = None,
    ):
        for name, value in (("max_length", max_length), ("max_new_tokens", max_new_tokens), ("max_turns", max_turns)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"{name} must be a positive int{' or None' if name != 'max_turns' else ''}, got {value!r}"
                )
        self.model, self.tokenizer = model, tokenizer
        self.chat = has_chat_template(tokenizer) if chat_template is None else bool(chat_template)
        self.max_length, self.max_new_tokens, self.max_turns = max_length, max_new_tokens, max_turns
        self.eos = _eos_ids(tokenizer, model) if eos_token_ids is None else set(eos_token_ids)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in params
        self.device = next(model.parameters()).device

    # -- model calls ------------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _forward(self, model: Any, ids: Sequence[int], cache: Any, stats: CallStats, prefill: bool) -> torch.Tensor:
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        kwargs: dict[str, Any] = {self._cache_kw: cache, "use_cache": True}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        self._sync()
        start = time.perf_counter()
        logits = model(input_ids=x, **kwargs).logits[0, -1]
        self._sync()
        elapsed = time.perf_counter() - start
        if prefill:
            stats.prefill_calls += 1
            stats.prefill_tokens += len(ids)
            stats.prefill_seconds += elapsed
        else:
            stats.decode_calls += 1
            stats.decode_tokens += len(ids)
            stats.decode_seconds += elapsed
        return logits

    def _greedy(
        self, model: Any, logits: torch.Tensor, cache: Any, budget: int, stats: CallStats
    ) -> tuple[list[int], int]:
        """Greedy tokens after a prefill's ``logits``; returns them and how many were fed to ``cache``."""
        tokens: list[int] = []
        fed = 0
        nxt = int(logits.argmax())
        for step in range(budget):
            if nxt in self.eos:
                break
            tokens.append(nxt)
            if step == budget - 1:
                break
            nxt = int(self._forward(model, [nxt], cache, stats, prefill=False).argmax())
            fed += 1
        stats.generated_tokens += len(tokens)
        return tokens, fed

    @staticmethod
    def _croppable(cache: Any) -> bool:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)

    def _decode_and_forget(
        self, model: Any, logits: torch.Tensor, cache: Any, budget: int, stats: CallStats, method: Method
    ) -> list[int]:
        """Decode on ``cache`` and leave it as it was (crop back, or decode on a deep copy)."""
        if self._croppable(cache):
            tokens, fed = self._greedy(model, logits, cache, budget, stats)
            if fed:
                cache.crop(-fed)
                stats.cache_rollbacks += 1
            return tokens
        scratch = copy.deepcopy(cache)
        stats.cache_copies += 1
        with method.attached(model, scratch):
            return self._greedy(model, logits, scratch, budget, stats)[0]

    # -- modes ------------------------------------------------------------------------------------------
    def _budget(self, task: Task, turn: Any) -> int:
        budget = task.max_new_tokens_for(turn)
        return min(budget, self.max_new_tokens) if self.max_new_tokens else budget

    def _room(self, rec: Record, room: int) -> int:
        if room < 1:
            raise ValueError(
                f"record {rec.id!r}: max_length={self.max_length} leaves {room} tokens for the context once the "
                "other prompts and the decoding budget are counted; raise max_length or lower max_turns"
            )
        return room

    def _multi_turn(self, model: Any, task: Task, rec: Record, method: Method, stats: CallStats, score: Callable):
        texts = multi_turn_prompts(task, rec, self.tokenizer, self.chat)
        pieces = [_encode(self.tokenizer, texts[0], not self.chat)]
        pieces += [_encode(self.tokenizer, t, False) for t in texts[1:]]
        budgets = [self._budget(task, t) for t in rec.turns]
        full = len(pieces[0])
        if self.max_length is not None:
            room = self.max_length - sum(map(len, pieces[1:])) - budgets[-1]
            pieces[0] = truncate_middle(pieces[0], self._room(rec, room))
        cache = method.new_cache(model)
        results = []
        with method.attached(model, cache):
            for k, (turn, ids, budget) in enumerate(zip(rec.turns, pieces, budgets)):
                before = int(cache.get_seq_length())
                logits = self._forward(model, ids, cache, stats, prefill=True)
                tokens = self._decode_and_forget(model, logits, cache, budget, stats, method)
                results.append(score(k, turn, tokens, len(ids), before))
        return len(pieces[0]), len(pieces[0]) < full, results

    def _multi_request(self, model: Any, task: Task, rec: Record, method: Method, stats: CallStats, score: Callable):
        prefix_text, query_texts = multi_request_prompts(task, rec, self.tokenizer, self.chat)
        prefix = _encode(self.tokenizer, prefix_text, not self.chat)
        queries = [_encode(self.tokenizer, t, False) for t in query_texts]
        budgets = [self._budget(task, t) for t in rec.turns]
        full = len(prefix)
        if self.max_length is not None:
            room = self.max_length - max(len(q) + b for q, b in zip(queries, budgets))
            prefix = truncate_middle(prefix, self._room(rec, room))
        shared = method.new_cache(model)
        with method.attached(model, shared):
            self._forward(model, prefix, shared, stats, prefill=True)
        results = []
        for k, (turn, ids, budget) in enumerate(zip(rec.turns, queries, budgets)):
            request = copy.deepcopy(shared)
            stats.cache_copies += 1
            before = int(request.get_seq_length())
            with method.attached(model, request):
                logits = self._forward(model, ids, request, stats, prefill=True)
                tokens, _ = self._greedy(model, logits, request, budget, stats)
            del request
            results.append(score(k, turn, tokens, len(ids), before))
        return len(prefix), len(prefix) < full, results

    def run(
        self,
        task: str | Task,
        records: Sequence[Record],
        method: Method | None = None,
        *,
        mode: str = "multi_turn",
        on_record: Callable[[RecordResult], None] | None = None,
    ) -> TaskResult:
        """Evaluate ``records`` of ``task`` with ``method`` (default dense) in ``mode``.

        Args:
            task: task name or :class:`~flexinference.scbench.tasks.Task`.
            records: validated records (:mod:`flexinference.scbench.data`).
            method: the method; ``None`` is ``Method("dense")``.
            mode: ``"multi_turn"`` or ``"multi_request"``.
            on_record: called after each record (progress bars).
        """
        task = get_task(task)
        method = Method("dense") if method is None else method
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not records:
            raise ValueError(f"task {task.name}: no records to evaluate")
        records = [rec.with_turns(self.max_turns) for rec in records]
        needles = _needles(records)
        method.check_available()
        stats = CallStats()
        run_record = self._multi_turn if mode == "multi_turn" else self._multi_request
        done: list[RecordResult] = []
        start = time.perf_counter()
        with PeakMemory(self.device) as memory, torch.inference_mode(), method.applied(self.model) as model:
            for rec in records:
                pool = needles.get(_repo_key(rec), {})

                def score(k: int, turn: Any, tokens: list[int], n_prompt: int, before: int, pool=pool) -> TurnResult:
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    value = score_turn(task, text, turn, pool)
                    return TurnResult(k, turn.task, text, turn.answer, value, n_prompt, len(tokens), before)

                n_ctx, truncated, turns = run_record(model, task, rec, method, stats, score)
                result = RecordResult(rec.id, n_ctx, truncated, tuple(turns))
                done.append(result)
                if on_record is not None:
                    on_record(result)
        total, subscores = aggregate(task, ((t.subtask, t.score) for r in done for t in r.turns))
        return TaskResult(
            task.name,
            method.name,
            mode,
            total,
            subscores,
            tuple(done),
            stats,
            memory.bytes,
            memory.kind,
            time.perf_counter() - start,
        )


def _repo_key(rec: Record) -> Any:
    return rec.extra.get("repo", ("record", rec.id))


def _needles(records: Sequence[Record]) -> dict[Any, dict[str, str]]:
    """RepoQA needles: every requested function (name -> golden source) of each repository."""
    out: dict[Any, dict[str, str]] = {}
    for rec in records:
        for turn in rec.turns:
            if turn.name is not None and turn.task in (None, "scbench_repoqa"):
                answer = turn.answer[0] if isinstance(turn.answer, (list, tuple)) else turn.answer
                out.setdefault(_repo_key(rec), {})[turn.name] = str(answer)
    return out
