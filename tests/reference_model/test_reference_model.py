"""The shipped reference model: loading, its training data, its training loop, and a handful of answers."""

import json
import random

import pytest
import torch

from flexinference.reference_model import META_FILE, TRAIN_CONTEXT, CharTokenizer, load, load_metadata
from flexinference.reference_model.data import (
    COPY_HEX_TASK,
    COPY_TASK,
    TaskMix,
    make_batch,
    make_copy_example,
    make_example,
)
from flexinference.reference_model.train import MIN_CONTEXT, TrainConfig, answer_exact_rate, recorded_stages
from flexinference.reference_model.train import main as train_main
from flexinference.scbench.data import format_answer
from flexinference.scbench.generators import GENERATORS, generate_records
from flexinference.scbench.methods import build_method
from flexinference.scbench.runner import Runner


@pytest.fixture(scope="module")
def reference():
    return load()


def test_load_offline_and_metadata(reference):
    model, tok = reference
    assert sum(p.numel() for p in model.parameters()) == 4_590_848
    assert model.config.num_attention_heads == 8 and model.config.num_key_value_heads == 2
    assert tok.end_token_id in model.generation_config.eos_token_id and not model.training
    meta = load_metadata(META_FILE)
    assert meta["vocab"] == tok.vocab and meta["command"].startswith("python -m flexinference.reference_model.train")
    assert meta["config"]["max_context"] == TRAIN_CONTEXT


def test_load_rejects_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="reference_model.train"):
        load(path=tmp_path / "none.safetensors")


def _dense_scores(model, tok, task, context_tokens, seed=5, records=2):
    recs = generate_records(task, tokenizer=tok, num_records=records, context_tokens=context_tokens, seed=seed)
    return Runner(model, tok, max_length=8192).run(task, recs, build_method("dense"), mode="multi_turn")


def test_a_handful_of_answers(reference):
    """Greedy answers of held-out records (seed 5; training uses other seeds), dense attention, CPU.
    Measured when the weights were committed: key-value retrieval 19/20 (4 records x 5 turns), prefix-suffix
    10/10, needle (passkey) 4/4 at 1024 tokens."""
    model, tok = reference
    torch.manual_seed(0)
    assert _dense_scores(model, tok, "scbench_kv", 1024, records=4).score >= 0.9
    assert _dense_scores(model, tok, "scbench_prefix_suffix", 1024).score >= 0.9
    needles = _dense_scores(model, tok, "scbench_summary_with_needles", 1024)
    assert needles.subscores["scbench_passkey"] >= 0.75


@pytest.mark.parametrize("task", list(GENERATORS))
def test_example_targets_are_the_golden_answers(task):
    tok = CharTokenizer()
    ex = make_example(task, random.Random(3), 900, tok)
    assert len(ex.ids) == len(ex.answer_mask) and ex.ids[0] == tok.bos_token_id
    spans, cur = [], []
    for i, m in zip(ex.ids, ex.answer_mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    spans.append(cur)
    assert len(spans) == 5 and all(s[-1] == tok.end_token_id for s in spans)
    # the answers are the generator's golden answers, in order
    context, turns = GENERATORS[task](random.Random(3), 5, len, 900)
    assert [tok.decode(s) for s in spans] == [format_answer(t.answer) for t in turns]


@pytest.mark.parametrize("task", list(GENERATORS))
def test_every_task_fits_five_turns_at_the_smallest_training_context(task):
    tok = CharTokenizer()
    for seed in range(10):
        ex = make_example(task, random.Random(seed), MIN_CONTEXT, tok)
        assert sum(m and i == tok.end_token_id for i, m in zip(ex.ids, ex.answer_mask)) == 5


@pytest.mark.parametrize("hex_ids", [False, True])
def test_copy_example(hex_ids):
    tok = CharTokenizer()
    ex = make_copy_example(random.Random(1), 400, tok, hex_ids=hex_ids)
    text = tok.decode(ex.ids)
    first, second = text.split("\n")
    assert first == second and 16 <= len(first) <= 200
    assert sum(ex.answer_mask) == len(second) + 1
    if hex_ids:
        assert set(first) <= set("0123456789abcdef-, ")
    with pytest.raises(ValueError, match="context_tokens"):
        make_copy_example(random.Random(1), 10, tok)


def test_batch_padding_and_masks():
    tok = CharTokenizer()
    ids, valid, answer = make_batch(random.Random(0), tok, TaskMix({COPY_TASK: 1, "scbench_kv": 1}), 700, 3, pad_to=64)
    assert ids.shape[0] == 3 and ids.shape[1] % 64 == 0
    assert (ids[~valid] == tok.pad_token_id).all() and not (answer & ~valid).any()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weights": {}}, "at least one task"),
        ({"weights": {"scbench_qa_eng": 1.0}}, "has no generator"),
        ({"weights": {COPY_HEX_TASK: 0}}, "positive weight"),
    ],
)
def test_task_mix_rejects_bad_weights(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TaskMix(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "steps must be >= 1"),
        ({"min_context": 100}, "min_context must be >= 640"),
        ({"min_context": 1000, "max_context": 800}, "max_context"),
        ({"copy_max": 4}, "copy_max"),
        ({"mix": {"nope": 1.0}}, "has no generator"),
    ],
)
def test_train_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_curriculum_and_schedule():
    cfg = TrainConfig(steps=1000, warmup=10, copy_steps=100, ramp_steps=200, min_context=640, max_context=2048)
    rng = random.Random(0)
    assert max(cfg.context_budget(100, rng) for _ in range(50)) <= 640 + 256
    assert max(cfg.context_budget(400, rng) for _ in range(200)) > 1800
    assert cfg.lr_at(0) < cfg.lr_at(9) == pytest.approx(cfg.lr) and cfg.lr_at(999) == pytest.approx(0.1 * cfg.lr, rel=0.01)


def test_answer_exact_rate():
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    answer = torch.tensor([[False, True, True, False, True, True]])
    logits = torch.full((1, 5, 16), -1.0)
    for t, target in enumerate(ids[0, 1:].tolist()):
        logits[0, t, target] = 1.0
    assert answer_exact_rate(logits, ids, answer) == 1.0
    logits[0, 4, 10] = -5.0  # last token of the second answer wrong
    assert answer_exact_rate(logits, ids, answer) == 0.5


def test_training_runs_and_continues(tmp_path):
    """Two tiny CPU runs: from scratch, then a second stage from its weights (``--init``)."""
    first = tmp_path / "a" / "model.safetensors"
    common = ["--device", "cpu", "--workers", "0", "--tokens-per-batch", "1500", "--max-context", "700",
              "--eval-examples", "1", "--eval-every", "1", "--mix", json.dumps({"scbench_kv": 1, COPY_TASK: 1})]
    assert train_main(["--steps", "2", "--copy-steps", "1", *common, "--out", str(first)]) == 0
    meta = json.loads((first.parent / "training.json").read_text())
    assert meta["steps_done"] == 2 and "--steps 2" in meta["command"] and "--mix" in meta["command"]
    second = tmp_path / "b" / "model.safetensors"
    assert train_main(["--steps", "1", "--copy-steps", "0", *common, "--init", str(first), "--out", str(second)]) == 0
    meta2 = json.loads((second.parent / "training.json").read_text())
    assert meta2["previous_stage"]["steps_done"] == 2 and "--init" in meta2["command"]
    model, _ = load(path=second)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_reproduce_reruns_a_recorded_chain_bit_for_bit(tmp_path):
    """``--reproduce`` re-runs the stages a training.json records (oldest first, each from the previous
    weights) and, on CPU, gets the same weights."""
    from safetensors.torch import load_file

    common = ["--device", "cpu", "--workers", "0", "--tokens-per-batch", "1500", "--max-context", "700",
              "--eval-examples", "1", "--eval-every", "1"]
    first, second = tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors"
    assert train_main(["--steps", "2", "--copy-steps", "1", *common, "--out", str(first),
                       "--mix", json.dumps({"scbench_kv": 1, COPY_TASK: 1})]) == 0
    assert train_main(["--steps", "1", "--copy-steps", "0", "--lr", "5e-4", *common, "--init", str(first),
                       "--out", str(second), "--mix", json.dumps({"scbench_kv": 1, COPY_HEX_TASK: 1})]) == 0
    meta = second.parent / "training.json"
    stages = recorded_stages(json.loads(meta.read_text()))
    assert [s.steps for s in stages] == [2, 1] and stages[1].lr == 5e-4 and COPY_HEX_TASK in stages[1].mix
    again = tmp_path / "c" / "model.safetensors"
    assert train_main(["--reproduce", str(meta), "--device", "cpu", "--out", str(again)]) == 0
    want, got = load_file(second), load_file(again)
    assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)
    assert recorded_stages(json.loads((again.parent / "training.json").read_text())) == stages


def test_reproduce_refuses_to_overwrite_the_shipped_weights():
    with pytest.raises(SystemExit):
        train_main(["--reproduce", "--device", "cpu"])


def test_shipped_record_lists_every_stage():
    stages = recorded_stages(load_metadata(META_FILE))
    assert len(stages) == 7 and stages[0].copy_steps == 1000
    assert all(s.copy_steps == 0 and COPY_HEX_TASK in s.mix for s in stages[1:])


def test_yarn_extension_changes_only_the_rotary_frequencies(reference):
    """``rope_factor`` loads the same weights with YaRN-stretched RoPE (the 2x rows of docs/accuracy.md)."""
    from flexinference.reference_model.model import reference_config

    stretched, _ = load(rope_factor=2.0)
    params = stretched.config.rope_parameters
    assert params["rope_type"] == "yarn" and params["factor"] == 2.0
    assert params["original_max_position_embeddings"] == TRAIN_CONTEXT
    base = reference[0]
    assert not torch.equal(stretched.model.rotary_emb.inv_freq, base.model.rotary_emb.inv_freq)
    weights = dict(base.named_parameters())
    assert all(torch.equal(p, weights[n]) for n, p in stretched.named_parameters())
    for bad in (0.5, True, "2"):
        with pytest.raises(ValueError, match="rope_factor"):
            reference_config(rope_factor=bad)
