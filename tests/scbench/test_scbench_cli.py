import argparse
import json

import pytest

import flexinference.cache
from flexinference.patterns import AShape
from flexinference.scbench.cli import _methods, add_eval_arguments, main, run_eval
from flexinference.scbench.data import save_records
from flexinference.scbench.embedded import EMBEDDED_NOTE, CharTokenizer
from flexinference.scbench.generators import generate_records

FAST = ["--num-records", "1", "--max-turns", "2", "--max-new-tokens", "3", "--context-tokens", "600", "--no-progress"]


def test_embedded_run_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(
        [
            "--model",
            "random",
            "--tasks",
            "scbench_kv,scbench_summary_with_needles",
            "--methods",
            "dense",
            "--mode",
            "both",
            "--json",
            str(out),
            *FAST,
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert text.count(EMBEDDED_NOTE) == 2 and "scbench_kv" in text and "prefill s" in text
    data = json.loads(out.read_text())
    assert (
        data["embedded"] is True and data["note"] == EMBEDDED_NOTE and data["modes"] == ["multi_turn", "multi_request"]
    )
    rows = {(r["task"], r["mode"]): r for r in data["results"]}
    assert set(rows) == {
        (t, m) for t in ("scbench_kv", "scbench_summary_with_needles") for m in ("multi_turn", "multi_request")
    }
    kv = rows[("scbench_kv", "multi_request")]
    assert kv["method"] == "dense" and kv["stats"]["prefill_calls"] == 3 and kv["stats"]["cache_copies"] == 2
    assert kv["peak_memory_bytes"] > 0 and len(kv["records"][0]["turns"]) == 2
    assert set(rows[("scbench_summary_with_needles", "multi_turn")]["subscores"]) == {
        "scbench_summary",
        "scbench_passkey",
    }


def test_data_dir_and_mounting(tmp_path, capsys):
    records = generate_records("scbench_mf", tokenizer=CharTokenizer(), num_records=2, num_turns=2, context_tokens=200)
    save_records(records, tmp_path / "scbench_mf.jsonl")
    root = argparse.ArgumentParser(prog="flexinference")
    sub = root.add_subparsers(dest="command")
    add_eval_arguments(sub.add_parser("eval"))
    args = root.parse_args(
        [
            "eval",
            "--data-dir",
            str(tmp_path),
            "--tasks",
            "scbench_mf",
            "--no-progress",
            "--json",
            str(tmp_path / "o.json"),
        ]
    )
    assert run_eval(args) == 0
    data = json.loads((tmp_path / "o.json").read_text())
    assert [r["id"] for r in data["results"][0]["records"]] == [0, 1]


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "p.png"
    assert main(["--tasks", "scbench_mf", "--methods", "dense,dense", "--plot", str(out), *FAST]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "dense,nope"], "unknown method 'nope'; available: "),
        (["--tasks", "scbench_kv,kv"], "unknown task 'kv'"),
        (["--tasks", "scbench_qa_eng"], "task scbench_qa_eng has no offline generator"),
        (["--method-kwargs", "{bad"], "--method-kwargs is not valid JSON"),
        (["--method-kwargs", '{"a_shape": 3}'], "--method-kwargs must map method names to objects"),
        (["--max-length", "0"], "--max-length must be >= 1"),
        (["--model", "/nonexistent/model"], "is not a folder"),
        (["--data-dir", "/nonexistent", "--tasks", "scbench_kv"], "no scbench_kv.jsonl or scbench_kv.json"),
        (["--context-tokens", "50"], "context_tokens=50 is too small for scbench_kv"),
    ],
)
def test_errors(argv, message):
    with pytest.raises(SystemExit) as err:
        main([*argv, "--no-progress"])
    assert message in str(err.value)


def test_bad_record_in_data_dir(tmp_path):
    (tmp_path / "scbench_kv.jsonl").write_text(json.dumps({"id": "x1", "context": "c", "multi_turns": []}) + "\n")
    with pytest.raises(SystemExit, match="record 'x1': 'multi_turns' must be a non-empty list"):
        main(["--data-dir", str(tmp_path), "--tasks", "scbench_kv", "--no-progress"])


def test_default_methods(monkeypatch, capsys):
    names = [m.name for m in _methods(None, None, embedded=True)]
    assert names == ["dense", "a_shape", "snapkv"]
    a_shape = _methods(None, '{"a_shape": {"local": 64}}', embedded=True)[1]
    assert a_shape.prefill.pattern == AShape(sink=128, local=64)  # user kwargs replace the scaled defaults
    assert [m.name for m in _methods(None, None, embedded=False)] == ["dense"]
    monkeypatch.delattr(flexinference.cache, "SnapKVCache", raising=False)
    assert [m.name for m in _methods(None, None, embedded=True)] == ["dense", "a_shape"]
    assert "skipping default method 'snapkv'" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="method 'snapkv' is unavailable"):
        _methods("dense,snapkv", None, embedded=True)  # requested explicitly: an error


def test_rope_factor_is_for_the_reference_model_only():
    from flexinference.scbench.cli import _load_model

    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    model, _, name = _load_model(parser.parse_args(["--rope-factor", "2", "--device", "cpu"]))
    assert name == "reference" and model.config.rope_parameters["rope_type"] == "yarn"
    with pytest.raises(SystemExit, match="reference model only"):
        _load_model(parser.parse_args(["--model", "random", "--rope-factor", "2", "--device", "cpu"]))
    with pytest.raises(SystemExit, match="rope-factor"):
        _load_model(parser.parse_args(["--rope-factor", "0.5", "--device", "cpu"]))
