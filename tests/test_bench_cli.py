"""`flexinference bench` (the main job) runs on CPU, checks correctness first and writes its table/JSON."""

import json


def test_bench_cpu_small(tmp_path, capsys):
    from flexinference.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", "--device", "cpu", "--seqlens", "1024", "--families", "a_shape", "vertical_slash",
               "--heads", "4", "--kv-heads", "2", "--head-dim", "32", "--reps", "1", "--part-reps", "1",
               "--warmup", "1", "--check-rows", "32", "--json", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "a_shape" in text and "vs_banded" in text
    data = json.loads(out.read_text())
    assert data
