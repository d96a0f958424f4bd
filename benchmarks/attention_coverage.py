"""What each sparse prefill pattern keeps of the reference model's own attention, layer by layer.

    python benchmarks/attention_coverage.py --context-tokens 2048 --task scbench_kv

One held-out record (generator seed 1000, as the accuracy table uses) is prefilled densely; the q/k of every
layer (after RoPE) are captured, and for every method of ``benchmarks/accuracy_table.py`` (budgets scaled
to the length) the script reports, per layer and averaged over heads:

* ``mass``: the dense attention probability the pattern keeps, mean over query rows;
* ``local``: the fraction of query rows that keep all of their 8 preceding tokens (the previous-token
  features copy heads build on);
* ``kept``: the fraction of causal (query, key) pairs kept.

Estimated patterns see the dense model's q/k here, not the q/k of a sparse forward pass (which differ from
layer 1 on), so this is a diagnosis of the patterns' choices, not of the end-to-end accuracy.
``--layer0-check`` tests the diagnosis end to end: the task's multi-turn score (2 records) of each
estimated block method alone, and with layer 0 given the A-shape of the table instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_table import prompt_ids, scaled_patterns  # noqa: E402

import flexinference as fi  # noqa: E402
from flexinference.compose import build_tables  # noqa: E402
from flexinference.masks.tables import dense_keep  # noqa: E402
from flexinference.reference_model import load  # noqa: E402
from flexinference.scbench.generators import generate_records  # noqa: E402
from flexinference.scbench.methods import Method, PatternPrefill  # noqa: E402
from flexinference.scbench.runner import Runner  # noqa: E402
from flexinference.search_model import _capturing  # noqa: E402

LOCAL = 8  # preceding tokens a row must keep to count as "local"
METHODS = ("a_shape", "tri_shape", "minference", "block_topk", "flexprefill", "xattention")


def coverage(context_tokens: int = 2048, task: str = "scbench_kv", methods=METHODS, seed: int = 1000) -> list[dict]:
    """One row per (layer, method): ``mass``, ``local`` and ``kept`` as in the module docstring."""
    patterns = scaled_patterns(context_tokens)
    unknown = set(methods) - set(patterns)
    if unknown:
        raise ValueError(f"methods: unknown {sorted(unknown)}; valid: {sorted(patterns)}")
    model, tok = load()
    rec = generate_records(task, tokenizer=tok, num_records=1, context_tokens=context_tokens, seed=seed)[0]
    ids = prompt_ids(tok, rec, task)
    s = ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    i = torch.arange(s)
    local = torch.zeros(s, s, dtype=torch.bool)
    for d in range(1, LOCAL + 1):
        local[i[d:], i[d:] - d] = True
    rows = []

    def on_layer(module, q, k, v):  # q, k after RoPE, as the attention function receives them
        hq = q.shape[1]
        kr = k.repeat_interleave(hq // k.shape[1], 1)
        att = (q @ kr.transpose(-1, -2) * module.scaling).masked_fill(~causal, float("-inf")).softmax(-1)
        for name in methods:
            keep = dense_keep(build_tables(q, k, [patterns[name]] * hq, scale=module.scaling))[..., :s, :s]
            rows.append({"layer": module.layer_idx, "method": name, "tokens": s,
                         "mass": float((att * keep).sum(-1).mean()),
                         "local": float((keep | ~local).all(-1).float().mean()),
                         "kept": float(keep.sum() / (hq * s * (s + 1) / 2))})

    with torch.no_grad(), _capturing(model, on_layer):
        model(input_ids=ids, use_cache=False)
    return rows


def layer0_check(context_tokens: int = 2048, task: str = "scbench_kv", methods=("flexprefill", "xattention"),
                 records: int = 2, seed: int = 1000) -> dict[str, tuple[float, float]]:
    """``{method: (score alone, score with layer 0 running the table's A-shape)}``, multi-turn, prefills of
    >= 1024 tokens sparse (as in the accuracy table)."""
    patterns = scaled_patterns(context_tokens)
    model, tok = load()
    n_layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    runner = Runner(model, tok, max_length=16 * context_tokens)
    recs = generate_records(task, tokenizer=tok, num_records=records, context_tokens=context_tokens, seed=seed)
    out = {}
    for name in methods:
        scores = []
        for first in (patterns[name], patterns["a_shape"]):
            config = fi.ModelConfig(layers=tuple((first if i == 0 else patterns[name],) * heads
                                                 for i in range(n_layers)))
            method = Method(name, prefill=PatternPrefill(config, {"min_sparse_len": 1024}))
            scores.append(runner.run(task, recs, method, mode="multi_turn").score)
        out[name] = tuple(scores)
    return out


def table(rows: list[dict]) -> str:
    """Markdown: one line per layer, ``mass / local / kept`` per method."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = ["| layer | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for layer in sorted({r["layer"] for r in rows}):
        by = {r["method"]: r for r in rows if r["layer"] == layer}
        out.append(f"| {layer} | " + " | ".join(
            f"{by[m]['mass']:.2f} / {by[m]['local']:.2f} / {by[m]['kept']:.2f}" for m in methods) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context-tokens", type=int, default=2048)
    p.add_argument("--task", default="scbench_kv")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--layer0-check", action="store_true",
                   help="also score FlexPrefill / XAttention with and without an A-shape layer 0 (~3 min CPU)")
    args = p.parse_args(argv)
    rows = coverage(args.context_tokens, args.task, tuple(args.methods))
    print(f"{rows[0]['tokens']} tokens; cells: mass / local / kept")
    print(table(rows))
    result = {"rows": rows}
    if args.layer0_check:
        result["layer0_check"] = layer0_check(args.context_tokens, args.task)
        for name, (alone, local0) in result["layer0_check"].items():
            print(f"{name}: {args.task} multi-turn {alone:.0%} alone, {local0:.0%} with an A-shape layer 0")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
