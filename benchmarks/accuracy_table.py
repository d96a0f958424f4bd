"""Accuracy of every method against dense attention on the shipped reference model (docs/accuracy.md).

    python benchmarks/accuracy_table.py --json benchmarks/results/accuracy.json --markdown docs/accuracy_table.md

Generated SCBench records (seeded, held out from training: seed 1000+) at the model's training context
(``TRAIN_CONTEXT`` = 2048 characters), both shared-context modes. Budgets are scaled to the length so
that each sparse method keeps at most ~15% of the causal (query, key) pairs: A-shape / tri-shape
windows, vertical-slash counts and block top-k counts proportional to ``S``; KV-cache budgets 15% of the
context. Each prefill method's kept fraction is *measured* on the prefill of one record (the keep
tables built from the model's own queries and keys, every layer and head); cache methods report the
fraction of the context their cache keeps (KIVI: bits per value / 16). ``vertical_slash_searched`` is the
per-head config ``flexinference.search`` picks on this model at this length from scaled candidates;
heads that no candidate satisfies (the search marks them dense) get the largest vertical-slash
candidate instead, so the config stays within the budget (their count is reported). FlexPrefill and
XAttention choose their own density (gamma 0.4, threshold 0.5 here: their measured kept fraction is
reported).

``--dense-lengths`` adds dense-only rows at longer contexts, to show where dense itself still works.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

import flexinference as fi
from flexinference.compose import build_tables
from flexinference.masks.tables import dense_keep
from flexinference.reference_model import TRAIN_CONTEXT, load
from flexinference.scbench.generators import generate_records
from flexinference.scbench.methods import Method, PatternPrefill, build_method
from flexinference.scbench.runner import Runner
from flexinference.search import SearchCriterion
from flexinference.search_model import _capturing, search

TASKS = ("scbench_kv", "scbench_prefix_suffix", "scbench_vt", "scbench_summary_with_needles", "scbench_mf")
KEEP = 0.15  # largest kept fraction of the causal pairs a sparse method may have


def scaled_patterns(s: int) -> dict[str, fi.Pattern]:
    """One pattern per prefill method with budgets proportional to the length ``s``."""
    local = max(16, int(0.06 * s))
    return {
        "a_shape": fi.AShape(sink=16, local=local),
        "tri_shape": fi.TriShape(sink=16, local=int(0.04 * s), last=32),
        "minference": fi.VerticalSlash(vertical=max(8, int(0.02 * s)), slash=max(16, int(0.045 * s)), last_q=64,
                                       keep_first_columns=4, keep_nearest_diagonals=16),
        "block_topk": fi.BlockTopK(block=64, topk=max(1, round(0.07 * s / 64))),
        "flexprefill": fi.FlexPrefill(block=64, last_q=64, min_len=128, gamma=0.4),
        "xattention": fi.XAttention(block=64, stride=8, threshold=0.5),
    }


def scaled_candidates(s: int) -> tuple[fi.Pattern, ...]:
    """The search space at length ``s`` (every candidate at most ~15% dense)."""
    return (
        fi.AShape(sink=16, local=int(0.03 * s)),
        fi.AShape(sink=16, local=int(0.06 * s)),
        fi.VerticalSlash(vertical=int(0.01 * s), slash=int(0.02 * s), keep_first_columns=4, keep_nearest_diagonals=16),
        fi.VerticalSlash(vertical=int(0.02 * s), slash=int(0.045 * s), keep_first_columns=4, keep_nearest_diagonals=16),
        fi.VerticalSlash(vertical=int(0.05 * s), slash=int(0.015 * s), keep_first_columns=4, keep_nearest_diagonals=16),
        fi.BlockTopK(block=64, topk=max(1, round(0.07 * s / 64))),
    )


def cache_methods(s: int) -> dict[str, tuple[str, dict, float]]:
    """name -> (registered method, kwargs, kept fraction of the context)."""
    budget = int(KEEP * s)
    return {
        "streamingllm": ("streamingllm", {"sink": 16, "window": budget - 16}, budget / s),
        "snapkv": ("snapkv", {"budget": budget, "window": 16}, budget / s),
        "pyramidkv": ("pyramidkv", {"budget": budget, "window": 16}, budget / s),
        "kivi2": ("kivi", {"bits": 2, "group_size": 32, "residual_length": 32}, 2 / 16),
        "kivi4": ("kivi", {"bits": 4, "group_size": 32, "residual_length": 32}, 4 / 16),
    }


def prompt_ids(tok, record, task: str = "scbench_kv") -> torch.Tensor:
    """The first prefill of ``record`` as the harness renders it: ``(1, S)`` token ids."""
    from flexinference.scbench.tasks import get_task

    first = get_task(task).first_message(record)
    return torch.tensor([tok.apply_chat_template([{"role": "user", "content": first}], add_generation_prompt=True,
                                                 tokenize=True)])


@torch.no_grad()
def measured_density(model, ids: torch.Tensor, config) -> float:
    """Mean over layers and heads of the kept fraction of causal pairs, from the model's own q and k."""
    layers = list(config.layers) if isinstance(config, fi.ModelConfig) else None
    fractions = []

    def on_layer(module, q, k, v):
        pats = layers[module.layer_idx] if layers is not None else (config,) * q.shape[1]
        tables = build_tables(q, k, list(pats), scale=module.scaling)
        keep = dense_keep(tables)
        s = q.shape[2]
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        fractions.append(float((keep & causal).sum() / (causal.sum() * keep.shape[0] * keep.shape[1])))

    with _capturing(model, on_layer):
        model(input_ids=ids, use_cache=False)
    return sum(fractions) / len(fractions)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context-tokens", type=int, default=TRAIN_CONTEXT)
    p.add_argument("--records", type=int, default=2)
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--dense-only-tasks", nargs="*", default=["scbench_kv"],
                   help="tasks run with dense attention only (where dense itself fails, methods cannot be compared)")
    p.add_argument("--min-sparse-len", type=int, default=1024,
                   help="prefills shorter than this stay dense (the context prefill is sparse; short follow-ups not)")
    p.add_argument("--methods", nargs="+", default=None, help="subset of the table's methods")
    p.add_argument("--modes", nargs="+", default=["multi_turn", "multi_request"])
    p.add_argument("--dense-lengths", type=int, nargs="*", default=[2 * TRAIN_CONTEXT])
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--rope-factor", type=float, default=1.0,
                   help="YaRN factor for lengths beyond the training length (e.g. 2 at --context-tokens 4096)")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model, tok = load(rope_factor=args.rope_factor)
    s = args.context_tokens
    options = {"min_sparse_len": args.min_sparse_len}
    calib = generate_records("scbench_kv", tokenizer=tok, num_records=1, context_tokens=s, seed=args.seed + 99)[0]
    ids = prompt_ids(tok, calib)
    t0 = time.time()
    searched = search(model, ids, scaled_candidates(s), SearchCriterion(min_recall=0.9, max_error=0.2),
                      min_sparse_len=args.min_sparse_len)
    search_s = time.time() - t0
    fallback = scaled_candidates(s)[3]
    dense_heads = sum(isinstance(p, fi.Dense) for layer in searched.config.layers for p in layer)
    searched_map = pattern_map(searched.config)
    capped = dataclasses.replace(searched.config, layers=tuple(
        tuple(fallback if isinstance(p, fi.Dense) else p for p in layer) for layer in searched.config.layers))
    methods: dict[str, tuple[Method, float]] = {"dense": (build_method("dense"), 1.0)}
    methods["vertical_slash_searched"] = (Method("vertical_slash_searched", prefill=PatternPrefill(capped, options)),
                                          measured_density(model, ids, capped))
    for name, pat in scaled_patterns(s).items():
        methods[name] = (Method(name, prefill=PatternPrefill(pat, options)), measured_density(model, ids, pat))
    for name, (registered, kwargs, kept) in cache_methods(s).items():
        m = build_method(registered, {registered: kwargs})
        methods[name] = (Method(name, cache_factory=m.cache_factory, cache_attach=m.cache_attach), kept)
    if args.methods:
        methods = {k: v for k, v in methods.items() if k in args.methods or k == "dense"}

    runner = Runner(model, tok, max_length=16 * s)
    rows = []
    for task in args.tasks:
        records = generate_records(task, tokenizer=tok, num_records=args.records, context_tokens=s, seed=args.seed)
        for mode in args.modes:
            for name, (method, kept) in methods.items():
                if task in args.dense_only_tasks and name != "dense":
                    continue
                t = time.time()
                res = runner.run(task, records, method, mode=mode)
                rows.append({"task": task, "mode": mode, "method": name, "length": s, "score": res.score,
                             "subscores": res.subscores, "kept": kept, "seconds": round(time.time() - t, 1)})
                print(json.dumps(rows[-1]), flush=True)
    for length in args.dense_lengths:
        for task in args.tasks:
            records = generate_records(task, tokenizer=tok, num_records=args.records, context_tokens=length,
                                       seed=args.seed)
            res = runner.run(task, records, methods["dense"][0], mode="multi_turn")
            rows.append({"task": task, "mode": "multi_turn", "method": "dense", "length": length,
                         "score": res.score, "subscores": res.subscores, "kept": 1.0})
            print(json.dumps(rows[-1]), flush=True)
    summary = {"context_tokens": s, "rope_factor": args.rope_factor, "records": args.records, "seed": args.seed,
               "search_seconds": round(search_s, 1),
               "searched_summary": searched.summary(), "searched_dense_heads": dense_heads,
               "searched_map": searched_map, "rows": rows,
               "patterns": {k: repr(v) for k, v in scaled_patterns(s).items()},
               "caches": {k: v[:2] for k, v in cache_methods(s).items()}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1, default=str)
    table = markdown(rows, s)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    return 0


def pattern_map(config) -> str:
    """A layer x head grid of the searched config: V vertical-slash, A A-shape, B block top-k, D dense."""
    letter = {fi.VerticalSlash: "V", fi.AShape: "A", fi.BlockTopK: "B", fi.Dense: "D"}
    lines = ["layer | " + " ".join(str(h) for h in range(len(config.layers[0])))]
    for i, layer in enumerate(config.layers):
        lines.append(f"{i:>5} | " + " ".join(letter.get(type(p), "?") for p in layer))
    return "\n".join(lines)


def markdown(rows: list[dict], s: int) -> str:
    """Task x method table at length ``s`` (multi-turn / multi-request scores), kept fraction per method."""
    main_rows = [r for r in rows if r["length"] == s]
    methods = list(dict.fromkeys(r["method"] for r in main_rows))
    tasks = list(dict.fromkeys(r["task"] for r in main_rows))
    score = {(r["task"], r["mode"], r["method"]): r["score"] for r in main_rows}
    kept = {r["method"]: r["kept"] for r in main_rows}
    head = "| method | kept | " + " | ".join(t.removeprefix("scbench_") for t in tasks) + " |"
    lines = [head, "|" + "---|" * (len(tasks) + 2)]
    for m in methods:
        cells = []
        for t in tasks:
            mt, mr = score.get((t, "multi_turn", m)), score.get((t, "multi_request", m))
            cells.append(" / ".join("-" if x is None else f"{100 * x:.0f}" for x in (mt, mr)))
        lines.append(f"| {m} | {100 * kept[m]:.1f}% | " + " | ".join(cells) + " |")
    longer = [r for r in rows if r["length"] != s]
    if longer:
        lines += ["", "| dense, multi-turn | " + " | ".join(t.removeprefix("scbench_") for t in tasks) + " |",
                  "|" + "---|" * (len(tasks) + 1)]
        for length in dict.fromkeys(r["length"] for r in longer):
            by = {r["task"]: r["score"] for r in longer if r["length"] == length}
            lines.append(f"| {length} | " + " | ".join(f"{100 * by[t]:.0f}" if t in by else "-" for t in tasks) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
