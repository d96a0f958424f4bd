"""A-shape (StreamingLLM, arXiv:2309.17453): sink 128 + local 4096; reports its FLOP-floor fraction.

Checks the fast output against the exact reference on random query rows, times the whole op and its
parts with CUDA events (median of --reps after --warmup) next to dense SDPA, prints a table; --json PATH
writes every number. All options of `flexinference bench` apply (see `--help`).
"""

import sys

from flexinference.bench import main

if __name__ == "__main__":
    raise SystemExit(main(["--families", "a_shape", *sys.argv[1:]]))
