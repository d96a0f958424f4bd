import ast
import json
import re

import pytest

from flexinference.scbench.data import parse_record
from flexinference.scbench.embedded import CharTokenizer
from flexinference.scbench.generators import GENERATORS, count_tokens, generate_records
from flexinference.scbench.tasks import SYNTHETIC_TASKS


class WhitespaceTokenizer:
    """One token per whitespace-separated word."""

    def encode(self, text, add_special_tokens=True):
        return text.split()


class CallableTokenizer:
    """Only ``__call__``, HF-style output."""

    def __call__(self, text):
        return {"input_ids": list(text)}


TOKENIZERS = {"chars": CharTokenizer(), "words": WhitespaceTokenizer()}
TARGETS = {"chars": 2000, "words": 400}


def test_generators_cover_the_synthetic_tasks():
    assert set(GENERATORS) == set(SYNTHETIC_TASKS)


def test_count_tokens_interfaces():
    assert count_tokens(WhitespaceTokenizer(), "a b  c") == 3
    assert count_tokens(CharTokenizer(), "abc") == 3  # no BOS counted
    assert count_tokens(CallableTokenizer(), "abcd") == 4
    with pytest.raises(TypeError, match="encode"):
        count_tokens(object(), "x")


@pytest.mark.parametrize("tok_name", sorted(TOKENIZERS))
@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_format_length_and_determinism(task, tok_name):
    tok, target = TOKENIZERS[tok_name], TARGETS[tok_name]
    records = generate_records(task, tokenizer=tok, num_records=2, num_turns=5, context_tokens=target, seed=3)
    assert len(records) == 2 and [r.id for r in records] == [0, 1]
    for rec in records:
        raw = rec.to_dict()
        assert set(raw) >= {"id", "context", "multi_turns"}
        assert all(set(t) >= {"input", "answer"} for t in raw["multi_turns"])
        assert parse_record(json.loads(json.dumps(raw)), task=task) == rec  # exact format, survives JSON
        assert len(rec.turns) == 5
        n = count_tokens(tok, rec.context)
        assert 0.8 * target <= n <= target, (task, n)
    again = generate_records(task, tokenizer=tok, num_records=2, num_turns=5, context_tokens=target, seed=3)
    assert again == records
    other = generate_records(task, tokenizer=tok, num_records=1, num_turns=5, context_tokens=target, seed=4)
    assert other[0].context != records[0].context
    assert records[0].context != records[1].context


def _records(task, turns=5):
    return generate_records(
        task, tokenizer=CharTokenizer(), num_records=3, num_turns=turns, context_tokens=3000, seed=1
    )


def test_kv_answers_findable():
    for rec in _records("scbench_kv"):
        table = json.loads(rec.context.removeprefix("JSON data:\n"))
        keys = [re.search(r'Key: "([^"]+)"', t.input).group(1) for t in rec.turns]
        assert len(set(keys)) == len(keys)
        for key, turn in zip(keys, rec.turns):
            assert table[key] == turn.answer and turn.answer in rec.context


def test_prefix_suffix_answers_findable_and_unique():
    for rec in _records("scbench_prefix_suffix"):
        strings = rec.context.split("\n")[1:]
        for turn in rec.turns:
            pre, suf = re.findall(r'"([^"]+)"', turn.input)
            matches = [s for s in strings if s.startswith(pre) and s.endswith(suf)]
            assert matches == [turn.answer]


def test_vt_chains_resolve_to_the_answer():
    for rec in _records("scbench_vt"):
        value_of = {}
        for line in rec.context.split("\n"):
            m = re.fullmatch(r"VAR ([A-Z]{5}) = (VAR ([A-Z]{5})|\d+)", line)
            if m:
                value_of[m.group(1)] = value_of[m.group(3)] if m.group(3) else int(m.group(2))
        for turn in rec.turns:
            value = int(re.search(r"assigned the value (\d+) in the text", turn.input).group(1))
            assert sorted(turn.answer) == sorted(v for v, x in value_of.items() if x == value)
            assert len(turn.answer) == 4


def test_mf_answers_are_the_statistics():
    stats = {
        "largest number": max,
        "smallest number": min,
        "first number": lambda xs: xs[0],
        "last number": lambda xs: xs[-1],
        "second largest number": lambda xs: sorted(xs)[-2],
    }
    for rec in _records("scbench_mf"):
        numbers = ast.literal_eval(rec.context)
        assert len(set(numbers)) == len(numbers)
        asked = set()
        for turn in rec.turns:
            stat = re.search(r"The (.+) of the list is", turn.input).group(1)
            asked.add(stat)
            assert turn.answer == stats[stat](numbers) and turn.answer in numbers
        assert asked == set(stats)


def test_summary_with_needles_answers_findable():
    for rec in _records("scbench_summary_with_needles"):
        kinds = [t.task for t in rec.turns]
        assert kinds == ["scbench_summary", "scbench_passkey"] * 2 + ["scbench_summary"]
        chapters = re.split(r"\n\n(?=Chapter \d+\.)", rec.context)
        for turn in rec.turns:
            if turn.task == "scbench_summary":
                c = int(re.search(r"chapter (\d+)", turn.input).group(1))
                lines = turn.answer.split("\n")
                assert len(lines) == 3 and all(line in chapters[c - 1].split("\n") for line in lines)
            else:
                word = re.search(r"number for (\w+) mentioned", turn.input).group(1)
                assert f"The special magic number for {word} is: {turn.answer}." in rec.context


def test_fewer_turns_and_bad_arguments():
    assert [len(r.turns) for r in _records("scbench_kv", turns=2)] == [2, 2, 2]
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="context_tokens=50 is too small for scbench_kv"):
        generate_records("scbench_kv", tokenizer=tok, context_tokens=50)
    with pytest.raises(ValueError, match="num_turns must be in"):
        generate_records("scbench_kv", tokenizer=tok, num_turns=6)
    with pytest.raises(TypeError, match="num_records must be an int"):
        generate_records("scbench_kv", tokenizer=tok, num_records=1.5)
    with pytest.raises(ValueError, match="has no offline generator"):
        generate_records("scbench_qa_eng", tokenizer=tok)
