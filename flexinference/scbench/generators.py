"""Offline, seeded generators for SCBench's synthetic tasks, sized in tokens of a given tokenizer.

Each generator writes records in SCBench's format (:class:`~flexinference.scbench.data.Record`) whose
answers can be found in the context, so the harness runs with no download. The context grows item by
item (key-value pairs, strings, filler lines, numbers) and the largest size whose context is at most
``context_tokens`` tokens of ``tokenizer`` is kept (found by doubling then bisection, every candidate
measured exactly).

* ``scbench_kv``: a JSON object of random UUID keys and values; each turn asks the value of one key
  (InfiniteBench's KV retrieval, Zhang et al., 2024, arXiv:2402.13718).
* ``scbench_prefix_suffix``: a list of random strings; each turn asks the one string with a given
  prefix and suffix (unique by construction).
* ``scbench_vt``: variable-tracking chains ``VAR A = 12345``, ``VAR B = VAR A``, ... hidden in filler
  lines; each turn asks every variable holding one value (RULER, Hsieh et al., 2024, arXiv:2404.06654).
* ``scbench_mf``: a list of distinct integers; each turn asks one statistic that is an element of the
  list (largest, smallest, first, last, second largest) (InfiniteBench's Math.Find).
* ``scbench_summary_with_needles``: chapters of event sentences among filler lines, with "magic
  number" needles; turns alternate between summarising a chapter (reference: its events, one a line)
  and retrieving a needle.

Seeds: record ``i`` of task ``t`` with seed ``s`` draws from ``random.Random(f"{t}:{s}:{i}")``, so a
record does not depend on how many others are generated.
"""

from __future__ import annotations

import json
import random
import string
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from flexinference.scbench.data import Record, Turn
from flexinference.scbench.tasks import get_task

__all__ = ["GENERATORS", "MAX_TURNS", "count_tokens", "generate_records"]

MAX_TURNS = 5
_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_NAMES = ("Alice", "Bruno", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Jun")
_VERBS = ("repaired", "painted", "sold", "found", "borrowed", "hid", "measured", "carried", "cleaned", "lost")
_OBJECTS = ("the old clock", "a red kite", "the brass key", "a wooden boat", "the silver map", "a glass jar")
_PLACES = ("in the harbor", "near the mill", "at the market", "behind the school", "on the hill", "by the lake")
_WORDS = ("amber", "basil", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper")


def count_tokens(tokenizer: Any, text: str) -> int:
    """Number of tokens of ``text`` (no special tokens) for any tokenizer with ``encode`` or a
    ``__call__`` returning ids (a list, or a mapping / object with ``input_ids``)."""
    encode = getattr(tokenizer, "encode", None)
    if callable(encode):
        try:
            return len(encode(text, add_special_tokens=False))
        except TypeError:
            return len(encode(text))
    if callable(tokenizer):
        out = tokenizer(text)
        if isinstance(out, Mapping) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return len(out)
    raise TypeError(f"tokenizer must have an encode() method or be callable, got {type(tokenizer).__name__}")


class _Pool:
    """Items drawn lazily from one rng; ``take(n)`` is always the same first ``n`` items."""

    def __init__(self, rng: random.Random, make: Callable[[random.Random], Any], unique: bool = False):
        self.rng, self.make, self.unique = rng, make, unique
        self.items: list[Any] = []
        self._seen: set[Any] = set()

    def take(self, n: int) -> list[Any]:
        while len(self.items) < n:
            item = self.make(self.rng)
            if self.unique:
                if item in self._seen:
                    continue
                self._seen.add(item)
            self.items.append(item)
        return self.items[:n]


def _fit(render: Callable[[int], str], tokens: Callable[[str], int], target: int, minimum: int, what: str) -> int:
    """The largest ``n >= minimum`` with ``tokens(render(n)) <= target`` (doubling, then bisection)."""
    smallest = tokens(render(minimum))
    if smallest > target:
        raise ValueError(f"context_tokens={target} is too small for {what}: its smallest context has {smallest} tokens")
    lo, hi = minimum, minimum * 2
    while tokens(render(hi)) <= target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tokens(render(mid)) <= target:
            lo = mid
        else:
            hi = mid
    return lo


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _kv(rng: random.Random, num_turns: int, tokens: Callable[[str], int], target: int) -> tuple[str, list[Turn]]:
    pool = _Pool(rng, lambda r: (_uuid(r), _uuid(r)), unique=True)

    def render(n: int) -> str:
        return "JSON data:\n" + json.dumps(dict(pool.take(n)), indent=1)

    n = _fit(render, tokens, target, num_turns, "scbench_kv")
    pairs = pool.take(n)
    turns = [
        Turn(f'Key: "{pairs[i][0]}"\nThe value associated with the specified key is: ', pairs[i][1])
        for i in rng.sample(range(n), num_turns)
    ]
    return render(n), turns


def _prefix_suffix(rng: random.Random, num_turns: int, tokens: Callable[[str], int], target: int):
    chars = string.ascii_letters + string.digits
    pool = _Pool(rng, lambda r: "".join(r.choices(chars, k=24)), unique=True)

    def render(n: int) -> str:
        return "Here is a list of strings:\n" + "\n".join(pool.take(n))

    n = _fit(render, tokens, target, num_turns, "scbench_prefix_suffix")
    strings = pool.take(n)
    turns: list[Turn] = []
    for i in rng.sample(range(n), n):
        pre, suf = strings[i][:5], strings[i][-5:]
        if sum(s.startswith(pre) and s.endswith(suf) for s in strings) == 1:
            question = (
                f'What is the string that starts with "{pre}" and ends with "{suf}"? Answer with the full string.'
            )
            turns.append(Turn(question, strings[i]))
        if len(turns) == num_turns:
            break
    if len(turns) < num_turns:  # pragma: no cover - needs a prefix+suffix collision in most strings
        raise RuntimeError("scbench_prefix_suffix: could not find enough unique prefix/suffix pairs")
    return render(n), turns


def _interleave(rng: random.Random, n_lines: int, groups: list[list[str]], line: Callable[[int], str]) -> str:
    """``n_lines`` filler lines with each group's statements inserted in order at random places."""
    placed: list[tuple[int, int, int, str]] = []
    for g, statements in enumerate(groups):
        slots = sorted(rng.choices(range(n_lines + 1), k=len(statements)))
        placed += [(slot, g, k, s) for k, (slot, s) in enumerate(zip(slots, statements))]
    placed.sort()
    out, j = [], 0
    for slot in range(n_lines + 1):
        while j < len(placed) and placed[j][0] == slot:
            out.append(placed[j][3])
            j += 1
        if slot < n_lines:
            out.append(line(slot))
    return "\n".join(out)


def _vt(rng: random.Random, num_turns: int, tokens: Callable[[str], int], target: int):
    hops = 4
    names = _Pool(rng, lambda r: "".join(r.choices(string.ascii_uppercase, k=5)), unique=True).take(hops * num_turns)
    values = rng.sample(range(10000, 100000), num_turns)
    chains = [names[c * hops : (c + 1) * hops] for c in range(num_turns)]
    groups = []
    for chain, value in zip(chains, values):
        groups.append([f"VAR {chain[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(chain, chain[1:])])
    seed = rng.getrandbits(64)

    def render(n: int) -> str:
        return _interleave(random.Random(f"{seed}:{n}"), n, groups, lambda _: _NOISE)

    n = _fit(render, tokens, target, 1, "scbench_vt")
    turns = [
        Turn(
            f"Question: Find all variables that are assigned the value {value} in the text above. Answer: "
            f"According to the chain(s) of variable assignment in the text above, {hops} variables are "
            f"assigned the value {value}, they are: ",
            list(chain),
        )
        for chain, value in zip(chains, values)
    ]
    return render(n), turns


_MF_STATS: tuple[tuple[str, Callable[[list[int]], int]], ...] = (
    ("largest number", max),
    ("smallest number", min),
    ("first number", lambda xs: xs[0]),
    ("last number", lambda xs: xs[-1]),
    ("second largest number", lambda xs: sorted(xs)[-2]),
)


def _mf(rng: random.Random, num_turns: int, tokens: Callable[[str], int], target: int):
    pool = _Pool(rng, lambda r: r.randrange(100000), unique=True)

    def render(n: int) -> str:
        return str(pool.take(n))

    n = _fit(render, tokens, target, 2, "scbench_mf")
    numbers = pool.take(n)
    turns = [
        Turn(
            f"Find the {stat} in the list. You should answer with only one number, no other words. "
            f"The {stat} of the list is: ",
            fn(numbers),
        )
        for stat, fn in rng.sample(_MF_STATS, num_turns)
    ]
    return render(n), turns


def _event(rng: random.Random) -> str:
    return f"{rng.choice(_NAMES)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}."


def _summary_with_needles(rng: random.Random, num_turns: int, tokens: Callable[[str], int], target: int):
    kinds = ["scbench_summary" if i % 2 == 0 else "scbench_passkey" for i in range(num_turns)]
    n_chapters = max(2, kinds.count("scbench_summary"))
    events = [[_event(rng) for _ in range(3)] for _ in range(n_chapters)]
    words = rng.sample(_WORDS, kinds.count("scbench_passkey"))
    keys = [str(rng.randrange(10**6, 10**7)) for _ in words]
    needles = [f"The special magic number for {w} is: {k}." for w, k in zip(words, keys)]
    homes = [rng.randrange(n_chapters) for _ in needles]
    seed = rng.getrandbits(64)

    def render(n: int) -> str:
        r = random.Random(f"{seed}:{n}")
        parts = []
        for c in range(n_chapters):
            lines = n // n_chapters + (c < n % n_chapters)
            groups = [events[c]] + [[needle] for needle, home in zip(needles, homes) if home == c]
            parts.append(f"Chapter {c + 1}.\n" + _interleave(r, lines, groups, lambda _: _NOISE))
        return "\n\n".join(parts)

    n = _fit(render, tokens, target, 1, "scbench_summary_with_needles")
    chapters = iter(rng.sample(range(n_chapters), n_chapters))
    needle_iter = iter(zip(words, keys))
    turns = []
    for kind in kinds:
        if kind == "scbench_summary":
            c = next(chapters)
            question = f"Summarize the events of chapter {c + 1} in a few sentences, one a line."
            turns.append(Turn(question, "\n".join(events[c]), task=kind))
        else:
            word, key = next(needle_iter)
            question = f"What is the special magic number for {word} mentioned in the provided text?"
            turns.append(Turn(question, key, task=kind))
    return render(n), turns


GENERATORS: dict[str, Callable[..., tuple[str, list[Turn]]]] = {
    "scbench_kv": _kv,
    "scbench_prefix_suffix": _prefix_suffix,
    "scbench_vt": _vt,
    "scbench_mf": _mf,
    "scbench_summary_with_needles": _summary_with_needles,
}


def generate_records(
    task: str,
    *,
    tokenizer: Any,
    num_records: int = 2,
    num_turns: int = MAX_TURNS,
    context_tokens: int = 4096,
    seed: int = 0,
) -> list[Record]:
    """Generate ``num_records`` records of a synthetic task.

    Args:
        task: one of :data:`~flexinference.scbench.tasks.SYNTHETIC_TASKS`.
        tokenizer: measures the context (``encode`` or ``__call__``, see :func:`count_tokens`).
        num_records: how many records.
        num_turns: questions per record, 1 to 5 (SCBench's maximum).
        context_tokens: each context has at most this many tokens (as close as the items allow).
        seed: base seed.

    Example::

        records = generate_records("scbench_kv", tokenizer=tok, num_records=2, context_tokens=8192)
    """
    spec = get_task(task)
    if task not in GENERATORS:
        raise ValueError(f"task {spec.name} has no offline generator; generated tasks: {', '.join(GENERATORS)}")
    for name, value, low, high in (
        ("num_records", num_records, 1, None),
        ("num_turns", num_turns, 1, MAX_TURNS),
        ("context_tokens", context_tokens, 1, None),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < low or (high is not None and value > high):
            raise ValueError(f"{name} must be in [{low}, {high or 'inf'}], got {value}")

    def tokens(text: str) -> int:
        return count_tokens(tokenizer, text)

    records = []
    for i in range(num_records):
        rng = random.Random(f"{task}:{seed}:{i}")
        context, turns = GENERATORS[task](rng, num_turns, tokens, context_tokens)
        records.append(Record(i, context, tuple(turns), {"generator": f"flexinference:{task}", "seed": seed}))
    return records
