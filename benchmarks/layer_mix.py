"""A whole layer with the per-head (vertical, slash) budgets of MInference's Llama-3-8B-262K config
(layers 0, 15, 31; banded regime), all heads in one call. Needs the config JSON (--minference-config).

Checks the fast output against the exact reference on random query rows, times the whole op and its
parts with CUDA events (median of --reps after --warmup) next to dense SDPA, prints a table; --json PATH
writes every number. All options of `flexinference bench` apply (see `--help`).
"""

import sys

from flexinference.bench import main

if __name__ == "__main__":
    raise SystemExit(main(["--families", "layer_mix", *sys.argv[1:]]))
