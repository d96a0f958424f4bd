"""Block top-k (MInference's block-sparse head): 100 key blocks of 64 per query block, estimated from
mean-pooled q and k.

Checks the fast output against the exact reference on random query rows, times the whole op and its
parts with CUDA events (median of --reps after --warmup) next to dense SDPA, prints a table; --json PATH
writes every number. All options of `flexinference bench` apply (see `--help`).
"""

import sys

from flexinference.bench import main

if __name__ == "__main__":
    raise SystemExit(main(["--families", "block_topk", *sys.argv[1:]]))
