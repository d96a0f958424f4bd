"""Hand-written Triton sparse prefill kernel (MInference layout, arXiv:2407.02490) vs dense SDPA.

Cases per sequence length: vertical-slash with 1000 verticals (first 30 + random) and 6096 slashes in the
three index regimes of the GPU-performance issue (banded, band_far, scattered), and block top-k with 100
key blocks of 64 per query block (diagonal always in). For each case and kernel config: the index build
is timed on its own, the kernel output on the last --check-rows query rows is checked against a row-subset
reference (exact mode: the project's dense keep rule; superset mode: the index's own reference), then the
kernel (exact and superset) and dense SDPA (is_causal, enable_gqa) are timed with CUDA events (median of
--reps after --warmup) in the same run. Prints a table; --json PATH writes every number.

GPU (the default):   python benchmarks/triton_sparse.py --seqlens 32768 131072 --json out.json
CPU toy (Triton interpreter, minutes):
    python benchmarks/triton_sparse.py --device cpu --seqlens 256 --heads 4 --kv-heads 2 --dim 64 \\
        --vertical 40 --slash 64 --topk 3 --configs 64,64,4,3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from functools import partial


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--seqlens", type=int, nargs="+", default=[131072])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--vertical", type=int, default=1000)
    p.add_argument("--slash", type=int, default=6096)
    p.add_argument("--topk", type=int, default=100, help="key blocks of 64 per query block (block top-k)")
    p.add_argument("--cases", nargs="+", default=["banded", "band_far", "scattered", "block_topk"])
    p.add_argument("--configs", nargs="+", default=["64,64,4,3", "64,64,4,2", "128,64,8,3", "128,64,8,2"],
                   help="block_m,block_n,num_warps,num_stages per kernel config")
    p.add_argument("--warmup", type=int, default=None, help="default 3 (cuda) / 0 (cpu)")
    p.add_argument("--reps", type=int, default=None, help="default 20 (cuda) / 1 (cpu)")
    p.add_argument("--check-rows", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.warmup = (0 if cpu else 3) if args.warmup is None else args.warmup
    args.reps = (1 if cpu else 20) if args.reps is None else args.reps
    args.configs = [tuple(int(x) for x in c.split(",")) for c in args.configs]
    if any(len(c) != 4 for c in args.configs):
        p.error("--configs entries must be block_m,block_n,num_warps,num_stages")
    return args


def time_ms(fn, warmup: int, reps: int, cuda: bool) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs after ``warmup`` runs (flexinference.bench's timer)."""
    import torch

    from flexinference.bench import time_ms as bench_time_ms

    return bench_time_ms(fn, torch.device("cuda" if cuda else "cpu"), reps, warmup)


def rel_err(out, ref) -> float:
    """Frobenius relative error of ``out`` against ``ref`` (computed in ``ref``'s dtype)."""
    return float((out.to(ref.dtype) - ref).norm() / ref.norm().clamp_min(1e-30))


def topk_cells(heads: int, seq_len: int, topk: int, device, seed: int):
    """Block top-k cells of 64 tokens: the diagonal plus ``topk - 1`` random earlier blocks per query block."""
    import torch

    n = -(-seq_len // 64)
    gen = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(1, heads, n, n, generator=gen, device=device)
    qb, kb = torch.arange(n, device=device)[:, None], torch.arange(n, device=device)[None, :]
    scores = scores.masked_fill(kb >= qb, -1.0)
    k = max(1, min(topk - 1, n))
    top = scores.topk(k, dim=-1)
    cells = torch.zeros(1, heads, n, n, dtype=torch.bool, device=device)
    cells.scatter_(-1, top.indices, top.values >= 0)
    return cells | (kb == qb)


def run_case(args, case, seq_len, q, k, v, cuda, sdpa_ms):
    """Rows of one case: build, check and time the kernel for every config in both modes."""
    import torch

    from flexinference.bench_cases import reference_rows, regime_indices, tables_from_indices
    from flexinference.kernels.index_build import block_topk_index, vertical_slash_index
    from flexinference.kernels.sparse_reference import sparse_attention_reference
    from flexinference.kernels.sparse_triton import sparse_attention

    dev, hq, d = q.device, args.heads, args.dim
    scale = d**-0.5
    rows = torch.arange(max(0, seq_len - args.check_rows), seq_len, device=dev)
    if case == "block_topk":
        cells = topk_cells(hq, seq_len, args.topk, dev, args.seed)
        build = partial(block_topk_index, cells, seq_len, block=64)
        exact_ref = None
    else:
        vert = torch.full((hq,), args.vertical, dtype=torch.long, device=dev)
        sl = torch.full((hq,), args.slash, dtype=torch.long, device=dev)
        cols, offs = regime_indices(case, seq_len, vert, sl, seed=args.seed)
        build = partial(vertical_slash_index, cols, offs, seq_len)
        exact_ref = reference_rows(q, k, v, tables_from_indices(cols, offs, seq_len), rows, scale)
    out_rows = []
    for bm, bn, warps, stages in args.configs:
        base = dict(seq_len=seq_len, case=case, config=f"{bm}x{bn}w{warps}s{stages}", sdpa_ms=sdpa_ms)
        try:
            if case == "block_topk" and 64 % bm:
                out_rows.append(dict(base, mode="-", skipped=f"blocks of 64 need block_m dividing 64, got {bm}"))
                continue
            make = partial(build, block_m=bm, block_n=bn)
            build_ms = time_ms(make, min(args.warmup, 1), max(1, args.reps // 4), cuda)
            index = make()
            nq = index.num_q_blocks
            tiles = index.block_count.double() + torch.ceil(index.column_count.double() / bn)
            dense_tiles = (torch.arange(nq, device=dev) * bm // bn + bm // bn).clamp(max=-(-seq_len // bn)).sum()
            stats = dict(build_ms=build_ms, max_blocks=int(index.block_count.max()), max_columns=int(index.column_count.max()),
                         tile_frac=float(tiles.sum(-1).mean() / dense_tiles))
            if index.full_count is not None:
                stats["partial_frac"] = float((index.block_count - index.full_count).sum() / index.block_count.sum())
            for exact in (True, False):
                row = dict(base, mode="exact" if exact else "superset", **stats)
                try:
                    call = partial(sparse_attention, q, k, v, index, exact=exact, num_warps=warps, num_stages=stages)
                    out = call()[:, :, rows]
                    ref = exact_ref if (exact and exact_ref is not None) else sparse_attention_reference(
                        q, k, v, index, exact=exact, rows=rows)
                    row["rel_err"] = rel_err(out, ref)
                    del out
                    row["ms"] = time_ms(call, args.warmup, args.reps, cuda)
                    row["vs_sdpa"] = row["ms"] / sdpa_ms if sdpa_ms else None
                except Exception as exc:  # one failure must not kill the table
                    row["error"] = f"{type(exc).__name__}: {exc}"
                    traceback.print_exc(file=sys.stderr)
                out_rows.append(row)
        except Exception as exc:
            out_rows.append(dict(base, mode="-", error=f"{type(exc).__name__}: {exc}"))
            traceback.print_exc(file=sys.stderr)
        if cuda:
            torch.cuda.empty_cache()
    return out_rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import (a CLI, not a library)
    import torch
    import torch.nn.functional as F
    import triton

    from flexinference.bench_cases import structured_qkv

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu for the interpreted toy run", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device_name = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    results = []
    for seq_len in args.seqlens:
        q, k, v = structured_qkv(args.batch, args.heads, args.kv_heads, seq_len, args.dim, dtype=dtype,
                                 device=args.device, seed=args.seed)
        try:
            sdpa = partial(F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=True)
            sdpa_ms = time_ms(sdpa, args.warmup, args.reps, cuda)
        except Exception as exc:
            print(f"SDPA failed at {seq_len}: {exc}", file=sys.stderr)
            sdpa_ms = None
        results.append(dict(seq_len=seq_len, case="dense_sdpa", config="-", mode="-", ms=sdpa_ms, sdpa_ms=sdpa_ms))
        for case in args.cases:
            try:
                results.extend(run_case(args, case, seq_len, q, k, v, cuda, sdpa_ms))
            except Exception as exc:
                results.append(dict(seq_len=seq_len, case=case, config="-", mode="-", error=f"{type(exc).__name__}: {exc}"))
                traceback.print_exc(file=sys.stderr)
        q = k = v = sdpa = None  # free this length's tensors before the next one
        if cuda:
            torch.cuda.empty_cache()

    def fmt(x, spec):
        return f"{'-':>{int(spec.split('.')[0].rstrip('defg'))}}" if x is None else format(x, spec)

    print(f"# {device_name}, torch {torch.__version__}, triton {triton.__version__}, {args.dtype}, B={args.batch} "
          f"Hq={args.heads} Hkv={args.kv_heads} D={args.dim}")
    print(f"{'S':>7} {'case':<11} {'config':<12} {'mode':<8} {'ms':>9} {'/sdpa':>6} {'rel_err':>8} {'build':>8} "
          f"{'tiles':>6} {'partial':>7} {'maxB':>5} {'maxC':>5}")
    for r in results:
        line = (f"{r['seq_len']:>7} {r['case']:<11} {r['config']:<12} {r['mode']:<8} {fmt(r.get('ms'), '9.2f')} "
                f"{fmt(r.get('vs_sdpa'), '6.3f')} {fmt(r.get('rel_err'), '8.1e')} {fmt(r.get('build_ms'), '8.2f')} "
                f"{fmt(r.get('tile_frac'), '6.3f')} {fmt(r.get('partial_frac'), '7.3f')} "
                f"{fmt(r.get('max_blocks'), '5d')} {fmt(r.get('max_columns'), '5d')}")
        print(line + (f"  ERROR {r['error']}" if "error" in r else "") + (f"  skipped: {r['skipped']}" if "skipped" in r else ""))
    if args.json:
        meta = dict(device=device_name, torch=torch.__version__, triton=triton.__version__, args=vars(args))
        with open(args.json, "w") as fh:
            json.dump(dict(meta=meta, rows=results), fh, indent=1, default=str)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
