"""Where one `flexinference bench` case spends its time: torch.profiler over the case's whole op.

    python benchmarks/profile_case.py --case block_topk/t64 --seqlens 131072 --out prof_block_topk.txt

Builds the case exactly as ``flexinference bench`` does (its arguments and device defaults, same inputs,
same route), runs the whole op twice to warm up, then profiles ``--prof-reps`` runs and prints the GPU
kernels (CPU ops on a CPU) that take the most time, and the host time per call.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from flexinference.bench import BenchConfig, add_bench_arguments, bench_context, bench_inputs, config_from_args
from flexinference.bench_families import FAMILIES


def profile_case(cfg: BenchConfig, family: str, variant: str, reps: int = 3, rows: int = 15) -> str:
    """The profiler table of ``reps`` runs of one case's whole op at ``cfg.seqlens[0]``."""
    if reps < 1 or rows < 1:
        raise ValueError(f"reps and rows must be >= 1, got {reps}, {rows}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    seq_len = cfg.seqlens[0]
    cuda = torch.device(cfg.device).type == "cuda"
    prep = FAMILIES[family](variant, seq_len, bench_context(cfg, None), *bench_inputs(cfg, seq_len))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(2):
        prep.whole()
    sync()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(reps):
            prep.whole()
        sync()
    host_ms = (time.perf_counter() - t0) * 1e3 / reps
    key = "cuda_time_total" if cuda else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)
    return (f"{prep.name} @ {seq_len} ({prep.notes}): {host_ms:.1f} ms per call under the profiler, "
            f"{reps} calls\n{table}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bench_arguments(p)
    p.add_argument("--case", required=True, help="family/variant, e.g. block_topk/t64 or vertical_slash/banded")
    p.add_argument("--prof-reps", type=int, default=3, help="profiled calls")
    p.add_argument("--rows", type=int, default=15, help="rows of the profiler table")
    p.add_argument("--out", default=None, help="also write the table here")
    args = p.parse_args(argv)
    family, _, variant = args.case.partition("/")
    text = profile_case(config_from_args(args), family, variant, args.prof_reps, args.rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
