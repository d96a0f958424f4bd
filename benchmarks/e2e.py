"""End to end: one layer through the public pieces (build_tables estimation on structured q/k, then
gathered_attention), budgets of MInference's Llama-3-8B-262K layer 0.

Checks the fast output against the exact reference on random query rows, times the whole op and its
parts with CUDA events (median of --reps after --warmup) next to dense SDPA, prints a table; --json PATH
writes every number. All options of `flexinference bench` apply (see `--help`).
"""

import sys

from flexinference.bench import main

if __name__ == "__main__":
    raise SystemExit(main(["--families", "e2e", *sys.argv[1:]]))
