"""Mode semantics of the runner: call counts, cache reuse, exactness against fresh runs, scoring."""

import dataclasses
import inspect

import pytest
import torch
from transformers import DynamicCache

import flexinference
from flexinference.patterns import AShape
from flexinference.scbench.embedded import build_embedded_model
from flexinference.scbench.generators import generate_records
from flexinference.scbench.methods import Method, Patch, PatternPrefill
from flexinference.scbench.prompts import multi_request_prompts, multi_turn_prompts
from flexinference.scbench.runner import Runner, truncate_middle
from flexinference.scbench.tasks import get_task

BUDGET = 4  # max new tokens per turn in these tests
TURNS = 3


@pytest.fixture(scope="module")
def embedded():
    return build_embedded_model(seed=0)


@pytest.fixture(scope="module")
def records(embedded):
    _, tok = embedded
    return generate_records("scbench_kv", tokenizer=tok, num_records=2, num_turns=TURNS, context_tokens=300)


class CallLog:
    """Forward pre-hook: (input length, cache object, cache length before the call) per model call."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.calls.append((kwargs["input_ids"].shape[1], cache, int(cache.get_seq_length())))

    def close(self):
        self.handle.remove()


def run_logged(model, tok, records, method=None, mode="multi_turn", **kw):
    log = CallLog(model)
    try:
        result = Runner(model, tok, max_new_tokens=BUDGET, eos_token_ids=(), **kw).run(
            "scbench_kv", records, method, mode=mode
        )
    finally:
        log.close()
    return result, log.calls


def fresh_greedy(model, ids, budget):
    """Reference: a fresh cache, the whole prompt at once, plain greedy decoding."""
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = DynamicCache()
    out = []
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids]), use_cache=True, **{key: cache}).logits[0, -1]
        for step in range(budget):
            out.append(int(logits.argmax()))
            if step < budget - 1:
                logits = model(input_ids=torch.tensor([[out[-1]]]), use_cache=True, **{key: cache}).logits[0, -1]
    return out


def pieces(tok, records, mode):
    task = get_task("scbench_kv")
    out = []
    for rec in records:
        if mode == "multi_turn":
            texts = multi_turn_prompts(task, rec, tok, chat=True)
            out.append([tok.encode(t, add_special_tokens=False) for t in texts])
        else:
            prefix, queries = multi_request_prompts(task, rec, tok, chat=True)
            out.append(
                [tok.encode(prefix, add_special_tokens=False)]
                + [tok.encode(q, add_special_tokens=False) for q in queries]
            )
    return out


def test_multi_turn_counts_and_cache_reuse(embedded, records):
    model, tok = embedded
    result, calls = run_logged(model, tok, records)
    stats = result.stats
    assert stats.prefill_calls == 2 * TURNS
    assert stats.decode_calls == 2 * TURNS * (BUDGET - 1) and stats.generated_tokens == 2 * TURNS * BUDGET
    assert stats.cache_rollbacks == 2 * TURNS and stats.cache_copies == 0  # a DynamicCache is cropped back
    assert len(calls) == stats.prefill_calls + stats.decode_calls
    for rec_calls, rec_pieces in zip(
        [calls[: len(calls) // 2], calls[len(calls) // 2 :]], pieces(tok, records, "multi_turn")
    ):
        caches = {id(c) for _, c, _ in rec_calls}
        assert len(caches) == 1  # one conversation, one cache, reused by every turn
        prefills = [(n, before) for n, _, before in rec_calls if n > 1]
        assert [n for n, _ in prefills] == [len(p) for p in rec_pieces]
        # each turn starts from exactly the earlier prompts: no generated token stayed in the cache
        assert [before for _, before in prefills] == [sum(map(len, rec_pieces[:k])) for k in range(TURNS)]
    first = pieces(tok, records, "multi_turn")[0]
    assert [t.cache_tokens_before for t in result.records[0].turns] == [sum(map(len, first[:k])) for k in range(TURNS)]
    assert [t.prompt_tokens for t in result.records[0].turns] == [len(p) for p in first]


def test_multi_turn_matches_fresh_runs(embedded, records):
    model, tok = embedded
    result, _ = run_logged(model, tok, records[:1])
    rec_pieces = pieces(tok, records[:1], "multi_turn")[0]
    for k, turn in enumerate(result.records[0].turns):
        ids = [i for p in rec_pieces[: k + 1] for i in p]
        assert turn.prediction == tok.decode(fresh_greedy(model, ids, BUDGET)) and turn.new_tokens == BUDGET


class NoCrop(DynamicCache):
    """A cache the runner must not crop (any subclass: compressed caches cannot roll back)."""


def test_multi_turn_copies_a_non_croppable_cache(embedded, records):
    model, tok = embedded
    method = Method("nocrop", cache_factory=NoCrop)
    result, calls = run_logged(model, tok, records[:1], method)
    assert result.stats.cache_copies == TURNS and result.stats.cache_rollbacks == 0
    shared = calls[0][1]
    assert isinstance(shared, NoCrop)
    prefill_caches = [c for n, c, _ in calls if n > 1]
    assert all(c is shared for c in prefill_caches)
    assert all(c is not shared for n, c, _ in calls if n == 1)  # decoding ran on copies
    rec_pieces = pieces(tok, records[:1], "multi_turn")[0]
    assert [b for n, _, b in calls if n > 1] == [sum(map(len, rec_pieces[:k])) for k in range(TURNS)]
    dense, _ = run_logged(model, tok, records[:1])
    assert [t.prediction for t in result.records[0].turns] == [t.prediction for t in dense.records[0].turns]


def test_multi_request_counts_and_copies(embedded, records):
    model, tok = embedded
    result, calls = run_logged(model, tok, records, mode="multi_request")
    stats = result.stats
    assert stats.prefill_calls == 2 * (1 + TURNS)  # the context once, then one prefill per request
    assert stats.decode_calls == 2 * TURNS * (BUDGET - 1)
    assert stats.cache_copies == 2 * TURNS and stats.cache_rollbacks == 0
    half = len(calls) // 2
    for rec_calls, rec_pieces in zip([calls[:half], calls[half:]], pieces(tok, records, "multi_request")):
        n0, shared, before0 = rec_calls[0]
        assert (n0, before0) == (len(rec_pieces[0]), 0)  # context prefilled once, into an empty cache
        requests = [(n, c, b) for n, c, b in rec_calls[1:] if n > 1]
        assert [n for n, _, _ in requests] == [len(q) for q in rec_pieces[1:]]
        assert all(b == len(rec_pieces[0]) for _, _, b in requests)  # every request sees only the context
        assert len({id(c) for _, c, _ in requests} | {id(shared)}) == TURNS + 1
        assert shared not in [c for _, c, _ in rec_calls[1:]]
        assert int(shared.get_seq_length()) == len(rec_pieces[0])  # the shared prefix stayed untouched
    rec_pieces = pieces(tok, records[:1], "multi_request")[0]
    for k, turn in enumerate(result.records[0].turns):
        assert turn.prediction == tok.decode(fresh_greedy(model, rec_pieces[0] + rec_pieces[k + 1], BUDGET))


def test_eos_stops_and_truncation(embedded, records):
    model, tok = embedded
    first = Runner(model, tok, max_new_tokens=BUDGET, eos_token_ids=()).run("scbench_kv", records[:1])
    stop = tok.encode(first.records[0].turns[0].prediction, add_special_tokens=False)[0]
    stopped = Runner(model, tok, max_new_tokens=BUDGET, eos_token_ids=(stop,)).run("scbench_kv", records[:1])
    assert stopped.records[0].turns[0].new_tokens == 0 and stopped.records[0].turns[0].prediction == ""
    small = Runner(model, tok, max_new_tokens=BUDGET, max_length=500, eos_token_ids=()).run("scbench_kv", records[:1])
    rec_pieces = pieces(tok, records[:1], "multi_turn")[0]
    assert (
        small.records[0].truncated and small.records[0].context_tokens == 500 - sum(map(len, rec_pieces[1:])) - BUDGET
    )
    assert sum(map(len, rec_pieces)) > 500
    with pytest.raises(ValueError, match="record 0: max_length=100 leaves"):
        Runner(model, tok, max_new_tokens=BUDGET, max_length=100).run("scbench_kv", records[:1])
    assert truncate_middle([1, 2, 3, 4, 5], 3) == [1, 4, 5] and truncate_middle([1, 2], 5) == [1, 2]
    with pytest.raises(ValueError, match="no room"):
        truncate_middle([1, 2], 0)


class ScriptedLM(torch.nn.Module):
    """A stand-in model that answers each prefill with the next scripted text, then EOS; it appends its
    inputs to the cache like a one-layer model would."""

    def __init__(self, tok, script):
        super().__init__()
        self.tok, self.script, self.queue = tok, list(script), []
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Cfg", (), {"num_hidden_layers": 1})()

    def forward(self, input_ids, cache=None, use_cache=True, logits_to_keep=0):
        n = input_ids.shape[1]
        cache.update(torch.zeros(1, 1, n, 2), torch.zeros(1, 1, n, 2), 0)
        if n > 1:  # a prefill: load the next answer
            self.queue = self.tok.encode(self.script.pop(0), add_special_tokens=False) + [self.tok.eos_token_id]
        logits = torch.zeros(1, n, 128)
        logits[0, -1, self.queue.pop(0)] = 1.0
        return type("Out", (), {"logits": logits})()


@pytest.mark.parametrize("mode", ["multi_turn", "multi_request"])
def test_perfect_answers_score_one(embedded, mode):
    _, tok = embedded
    recs = generate_records(
        "scbench_summary_with_needles", tokenizer=tok, num_records=1, num_turns=3, context_tokens=900
    )
    answers = [str(t.answer) for t in recs[0].turns]
    script = answers if mode == "multi_turn" else ["(context)"] + answers
    model = ScriptedLM(tok, script)
    result = Runner(model, tok, max_new_tokens=2000).run(
        "scbench_summary_with_needles", recs, Method("dyn", cache_factory=lambda: DynamicCache()), mode=mode
    )
    assert result.score == 1.0 and result.subscores == {"scbench_summary": 1.0, "scbench_passkey": 1.0}
    assert [t.prediction for t in result.records[0].turns] == answers


def test_methods_patch_and_apply(embedded, records, monkeypatch):
    model, tok = embedded
    events = []
    patch = Patch(lambda m: events.append("patch") or m, lambda m: events.append("unpatch"))
    Runner(model, tok, max_new_tokens=2).run("scbench_kv", records[:1], Method("p", prefill=patch))
    assert events == ["patch", "unpatch"]

    seen = []
    monkeypatch.setattr(flexinference, "apply", lambda m, cfg, **kw: seen.append((cfg, kw)) or m, raising=False)
    monkeypatch.setattr(flexinference, "remove", lambda m: seen.append("removed"), raising=False)
    method = Method("a_shape", prefill=PatternPrefill(AShape(sink=4, local=16), {"min_sparse_len": 8}))
    Runner(model, tok, max_new_tokens=2).run("scbench_kv", records[:1], method)
    assert seen == [(AShape(sink=4, local=16), {"min_sparse_len": 8}), "removed"]
    seen.clear()
    Runner(model, tok, max_new_tokens=2).run("scbench_kv", records[:1], Method("cfg", prefill={"my": "config"}))
    assert seen == [({"my": "config"}, {}), "removed"]


def test_cache_factory_gets_the_config(embedded, records):
    model, tok = embedded
    seen = []

    def factory(config):
        seen.append(config)
        return DynamicCache(config=config)

    Runner(model, tok, max_new_tokens=2).run("scbench_kv", records, Method("c", cache_factory=factory))
    assert seen == [model.config, model.config]


def test_bad_arguments(embedded, records):
    model, tok = embedded
    runner = Runner(model, tok)
    with pytest.raises(ValueError, match="mode must be one of"):
        runner.run("scbench_kv", records, mode="multi-turn")
    with pytest.raises(ValueError, match="no records"):
        runner.run("scbench_kv", [])
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        Runner(model, tok, max_length=0)


class Recording:
    """Wraps a cache factory and keeps the caches it makes."""

    def __init__(self, factory):
        self.factory, self.made = factory, []

    def __call__(self):
        self.made.append(self.factory())
        return self.made[-1]


@pytest.mark.parametrize("mode", ["multi_turn", "multi_request"])
def test_real_cache_policy(embedded, records, mode):
    cache_mod = pytest.importorskip("flexinference.cache")
    if not hasattr(cache_mod, "SnapKVCache"):
        pytest.skip("flexinference.cache.SnapKVCache not available")
    from flexinference.scbench.methods import build_method

    model, tok = embedded
    method = build_method("snapkv", {"snapkv": {"budget": 64, "window": 8}})
    factory = Recording(method.cache_factory)
    method = dataclasses.replace(method, cache_factory=factory)
    result, calls = run_logged(model, tok, records[:1], method, mode=mode)
    assert result.stats.cache_copies == TURNS and result.stats.prefill_calls == TURNS + (mode == "multi_request")
    (shared,) = factory.made
    assert isinstance(shared, cache_mod.SnapKVCache)
    assert shared.tokens_kept() < int(shared.get_seq_length())  # the context was compressed
    rec_pieces = pieces(tok, records[:1], mode)[0]
    if mode == "multi_turn":  # seen-token counts still exclude every generated token
        assert [b for n, _, b in calls if n > 1] == [sum(map(len, rec_pieces[:k])) for k in range(TURNS)]
    else:
        assert int(shared.get_seq_length()) == len(rec_pieces[0])


def test_real_apply(embedded, records):
    pytest.importorskip("flexinference.patching")
    from flexinference.patching import is_applied
    from flexinference.scbench.methods import build_method

    model, tok = embedded
    method = build_method("a_shape", {"a_shape": {"sink": 4, "local": 32, "apply_options": {"min_sparse_len": 64}}})
    states = []
    handle = model.register_forward_pre_hook(lambda m, a, k: states.append(is_applied(m)), with_kwargs=True)
    try:
        result = Runner(model, tok, max_new_tokens=2, eos_token_ids=()).run("scbench_kv", records[:1], method)
    finally:
        handle.remove()
    assert result.stats.prefill_calls == TURNS and all(states) and len(states) == TURNS * 2
    assert not is_applied(model)  # removed after the run
