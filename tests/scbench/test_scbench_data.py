import json
import sys

import pytest

from flexinference.scbench.data import Record, Turn, format_answer, load_hub, load_records, parse_record, save_records


def good(rid=0, **overrides):
    rec = {
        "id": rid,
        "context": "a long context",
        "multi_turns": [{"input": "q1?", "answer": "a1"}, {"input": "q2?", "answer": "a2"}],
    }
    rec.update(overrides)
    return rec


def test_parse_and_round_trip(tmp_path):
    raw = good("r1", repo="x/y", multi_turns=[{"input": "q", "answer": ["a", "b"], "name": "f", "hint": 3}])
    rec = parse_record(raw)
    assert rec.id == "r1" and rec.context == "a long context"
    assert rec.turns == (Turn("q", ["a", "b"], name="f", extra={"hint": 3}),)
    assert rec.extra == {"repo": "x/y"}
    assert rec.to_dict() == raw
    path = tmp_path / "t.jsonl"
    save_records([rec, parse_record(good(2))], path)
    back = load_records(path)
    assert [r.id for r in back] == ["r1", 2] and back[0] == rec
    assert len(load_records(path, limit=1)) == 1


def test_json_file_single_and_list(tmp_path):
    (tmp_path / "one.json").write_text(json.dumps(good(5)))
    (tmp_path / "many.json").write_text(json.dumps([good(1), good(2)]))
    assert [r.id for r in load_records(tmp_path / "one.json")] == [5]
    assert [r.id for r in load_records(tmp_path / "many.json")] == [1, 2]


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"context": "c", "multi_turns": [{"input": "q", "answer": "a"}]}, "record #3: missing field 'id'"),
        (good(7, context=None), "record 7: 'context' must be a string, got NoneType"),
        (good("r7", context=["x", "y"]), "record 'r7': 'context' must be a string, got list"),
        (good(8, context=[1, 2, 3]), "record 8: 'context' must be a string, got list"),
        ({"id": 9, "multi_turns": [{"input": "q", "answer": "a"}]}, "record 9: missing field 'context'"),
        ({"id": 10, "context": "c"}, "record 10: missing field 'multi_turns'"),
        (good(11, multi_turns=[]), "record 11: 'multi_turns' must be a non-empty list"),
        (good(12, multi_turns="q"), "record 12: 'multi_turns' must be a non-empty list"),
        (good(13, multi_turns=[{}]), "record 13, turn 0: missing field 'input'"),
        (good(14, multi_turns=[{"input": "q"}]), "record 14, turn 0: missing field 'answer'"),
        (
            good(15, multi_turns=[{"input": "  ", "answer": "a"}]),
            "record 15, turn 0: 'input' must be a non-empty string",
        ),
        (good(16, multi_turns=[{"input": "q", "answer": None}]), "record 16, turn 0: 'answer' must be"),
        (good(17, multi_turns=[{"input": "q", "answer": []}]), "record 17, turn 0: 'answer' must be"),
        (good(18, multi_turns=[{"input": "q", "answer": "a"}, "oops"]), "record 18, turn 1: a turn must be an object"),
        (good(True), "record #3: 'id' must be an int or a string"),
        ([1, 2], "record #3: expected a JSON object"),
    ],
)
def test_bad_records_are_rejected_with_their_id(raw, message):
    with pytest.raises(ValueError) as err:
        parse_record(raw, index=3)
    assert message in str(err.value)


def test_task_specific_checks():
    mf = good(1, context=[3, 1, 2], multi_turns=[{"input": "The largest number of the list is", "answer": 3}])
    assert parse_record(mf, task="scbench_mf").context == "[3, 1, 2]"
    with pytest.raises(ValueError, match="record 1: 'context' must be a string"):
        parse_record(mf)
    choice = good(2, multi_turns=[{"input": "q", "answer": "B", "options": ["w", "x", "y"]}])
    with pytest.raises(ValueError, match="record 2, turn 0: task scbench_choice_eng needs 'options'"):
        parse_record(choice, task="scbench_choice_eng")
    mixed = good(3, multi_turns=[{"input": "q", "answer": "a", "task": "scbench_kv"}])
    with pytest.raises(ValueError, match=r"record 3, turn 0: task scbench_summary_with_needles needs 'task' in"):
        parse_record(mixed, task="scbench_summary_with_needles")
    assert parse_record(mixed, task="scbench_repoqa_and_kv").turns[0].task == "scbench_kv"
    repoqa = good(4, multi_turns=[{"input": "find f", "answer": "def f(): pass"}])
    with pytest.raises(ValueError, match="record 4, turn 0: task scbench_repoqa needs the function 'name'"):
        parse_record(repoqa, task="scbench_repoqa")
    with pytest.raises(ValueError, match="unknown task 'scbench_nope'"):
        parse_record(good(5), task="scbench_nope")


def test_file_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good(1)) + "\n\n" + json.dumps(good(1)) + "\n")
    with pytest.raises(ValueError, match="record 1: duplicate id"):
        load_records(path)
    path.write_text(json.dumps(good(1)) + "\n{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        load_records(path)
    path.write_text(json.dumps(good(1)) + "\n" + json.dumps(good(2, multi_turns=[])) + "\n")
    with pytest.raises(ValueError, match="record 2: 'multi_turns'"):
        load_records(path)
    with pytest.raises(ValueError, match="limit must be a positive int"):
        load_records(path, limit=0)


def test_with_turns_and_format_answer():
    rec = parse_record(good(1))
    assert [t.input for t in rec.with_turns(1).turns] == ["q1?"]
    with pytest.raises(ValueError, match="max_turns"):
        rec.with_turns(0)
    assert format_answer(["AB", "CD"]) == "AB, CD" and format_answer(42) == "42"
    assert isinstance(rec, Record)


def test_load_hub_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="needs the 'datasets' package"):
        load_hub("scbench_kv")
    with pytest.raises(ValueError, match="unknown task"):
        load_hub("kv")
