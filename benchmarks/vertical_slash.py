"""Vertical-slash (MInference, arXiv:2407.02490), 1000 verticals + 6096 slashes per head, in the three
index regimes (banded, band_far, scattered), through gathered verticals.

Checks the fast output against the exact reference on random query rows, times the whole op and its
parts with CUDA events (median of --reps after --warmup) next to dense SDPA, prints a table; --json PATH
writes every number. All options of `flexinference bench` apply (see `--help`).
"""

import sys

from flexinference.bench import main

if __name__ == "__main__":
    raise SystemExit(main(["--families", "vertical_slash", *sys.argv[1:]]))
