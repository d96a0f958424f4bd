"""``flexinference bench``: time the whole sparse-attention op against dense SDPA, pattern by pattern.

For every case the fast output is first checked against an exact reference on a random subset of query
rows (relative error printed), then the whole op (estimation + mask build + attention) and each part
are timed after warm-up (CUDA events on a GPU, median of ``--reps``), with dense SDPA and, when the
``minference`` kernels are importable, MInference's kernels in the same run. The FLOP floor of a case
is its kept (query, key) pairs x 4 x D at the bf16 matmul rate measured in the same run.

On a GPU the default is the GPU-performance issue's table (H_q 32, H_kv 8, D 128, bf16) at 32K and
128K; on a CPU a small version (8/2 heads, D 64, fp32, budgets scaled to the length, compiled flex).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from flexinference.attention import Impl
from flexinference.bench_cases import kept_pairs, reference_rows
from flexinference.bench_families import (
    FAMILIES,
    Context,
    Prepared,
    load_minference_ops,
)

__all__ = ["BenchConfig", "add_bench_arguments", "bench_context", "bench_inputs", "config_from_args", "format_table",
           "main", "peak_matmul_tflops", "plot", "run", "run_bench", "time_ms"]

log = logging.getLogger(__name__)

DEFAULT_MINFERENCE_CONFIG = "Llama_3_8B_Instruct_262k_kv_out_v32_fit_o_best_pattern.json"
_CONFIG_DIRS = ("shared/minference_configs", "../shared/minference_configs", "/work/shared/minference_configs")
GPU_FAMILIES = ("vertical_slash", "layer_mix", "block_topk", "a_shape", "dense")
CPU_FAMILIES = ("vertical_slash", "a_shape", "dense", "block_topk")
#: Implementations a benchmark can time (REFERENCE materialises S x S scores: tests only).
BENCH_IMPLS = (Impl.AUTO, Impl.TRITON, Impl.GATHERED, Impl.FLEX, Impl.FLEX_EAGER)
REL_TOL = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-4}


@dataclass(frozen=True)
class BenchConfig:
    """What one ``bench`` run measures (validated; the CLI builds it from arguments)."""

    seqlens: tuple[int, ...]
    families: tuple[str, ...]
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    device: str
    reps: int
    warmup: int
    part_reps: int
    check_rows: int
    scale_budgets: bool
    compile: bool
    layers: tuple[int, ...] = (0, 15, 31)
    minference_config: str | None = None
    dense_max_len: int = 32768
    seed: int = 0
    impl: Impl = Impl.AUTO
    variants: tuple[str, ...] | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.families) - set(FAMILIES)
        if unknown:
            raise ValueError(f"families: unknown {sorted(unknown)}; valid: {sorted(FAMILIES)}")
        if not self.seqlens or any(s < 256 for s in self.seqlens):
            raise ValueError(f"seqlens must be non-empty and each >= 256, got {self.seqlens}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        if self.reps < 1 or self.part_reps < 1 or self.warmup < 0 or self.check_rows < 1:
            raise ValueError("reps and part_reps must be >= 1, warmup >= 0 and check_rows >= 1")
        if self.variants is not None:
            if not isinstance(self.variants, tuple) or not self.variants:
                raise TypeError(f"variants must be a non-empty tuple of names or None, got {self.variants!r}")
            known = {v for fam in self.families for v in FAMILIES[fam].variants(self)}
            if set(self.variants) - known:
                raise ValueError(f"variants: unknown {sorted(set(self.variants) - known)}; the chosen families "
                                 f"have {sorted(known)}")
        if not isinstance(self.impl, Impl):
            raise TypeError(f"impl must be an Impl (e.g. Impl.AUTO), got {type(self.impl).__name__} {self.impl!r}")
        if self.impl not in BENCH_IMPLS:
            raise ValueError(f"impl must be one of {[i.value for i in BENCH_IMPLS]}, got {self.impl!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, reps: int, warmup: int) -> float:
    """Median milliseconds of ``fn()`` after ``warmup`` calls (CUDA events on a GPU, else a host clock)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_matmul_tflops(device: torch.device, dtype: torch.dtype, reps: int = 20) -> float:
    """Measured dense matmul rate (TFLOP/s): 8192^3 on a GPU, 2048^3 on a CPU."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, reps=reps if device.type == "cuda" else 3, warmup=3)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _find_config(path: str | None) -> Path | None:
    if path:
        p = Path(path)
        return p if p.is_file() else None
    for d in _CONFIG_DIRS:
        p = Path(d) / DEFAULT_MINFERENCE_CONFIG
        if p.is_file():
            return p
    return None


def _check(prep: Prepared, ctx: Context, q, k, v, gen: torch.Generator) -> float:
    """Relative error of the fast output on ``check_rows`` random query rows."""
    out, tables = prep.check()
    s = q.shape[2]
    rows = torch.randperm(s, generator=gen)[: ctx.check_rows].sort().values
    ref = reference_rows(q, k, v, tables, rows, ctx.scale)
    got = out[:, :, rows.to(out.device)].to(ref.dtype)
    return float((got - ref).norm() / ref.norm().clamp(min=1e-30))


def _run_case(family: str, variant: str, seq_len: int, ctx: Context, qkv, sdpa_ms: float, peak: float) -> dict:
    q, k, v = qkv
    prep = FAMILIES[family](variant, seq_len, ctx, q, k, v)
    if prep.inputs is not None:
        q, k, v = prep.inputs
    gen = torch.Generator().manual_seed(seq_len)
    rel = _check(prep, ctx, q, k, v, gen)
    if not rel < REL_TOL[ctx.dtype]:
        raise AssertionError(f"{family}/{variant} at {seq_len}: relative error {rel:.3e} above {REL_TOL[ctx.dtype]}")
    row = {"case": prep.name, "route": prep.route, "family": family, "variant": variant, "seq_len": seq_len,
           "rel_err": rel,
           "sdpa_ms": sdpa_ms, "visited": prep.visited, "notes": prep.notes}
    row["whole_ms"] = time_ms(prep.whole, ctx.device, ctx.reps, ctx.warmup)
    for name, fn in prep.parts.items():
        row[f"{name}_ms"] = time_ms(fn, ctx.device, ctx.cfg.part_reps, ctx.warmup)
    if prep.peer is not None:
        row["minference_ms"] = time_ms(prep.peer, ctx.device, ctx.reps, ctx.warmup)
    pairs = int(kept_pairs(prep.tables).sum()) * q.shape[0]
    floor = pairs * 4 * q.shape[-1] / (peak * 1e12) * 1e3
    row.update(kept_pairs=pairs, floor_ms=floor, speedup=sdpa_ms / row["whole_ms"],
               floor_frac_attn=floor / row.get("attention_ms", row["whole_ms"]),
               floor_frac_whole=floor / row["whole_ms"])
    if "minference_ms" in row:
        row["vs_minference"] = row["minference_ms"] / row["whole_ms"]
    return row


def _sdpa_ms(q, k, v, cfg: BenchConfig, device: torch.device) -> float:
    """Dense causal SDPA over K/V repeated to the query heads (the repeat is not timed)."""
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return time_ms(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True), device, cfg.reps, cfg.warmup)


def _cases(cfg: BenchConfig, config_path: Path | None) -> list[tuple[str, str, int]]:
    out = []
    for s in cfg.seqlens:
        for fam in cfg.families:
            if fam == "dense" and s > cfg.dense_max_len:
                continue
            if fam in ("layer_mix", "e2e") and config_path is None:
                log.warning("%s skipped: MInference config %s not found", fam, DEFAULT_MINFERENCE_CONFIG)
                continue
            for variant in FAMILIES[fam].variants(cfg):
                if cfg.variants is None or variant in cfg.variants:
                    out.append((fam, variant, s))
    return out


def bench_context(cfg: BenchConfig, peer_ops: dict | None) -> Context:
    """The run-wide :class:`Context` of ``cfg`` (``peer_ops``: MInference's kernels, or ``None``)."""
    return Context(cfg=cfg, device=torch.device(cfg.device), dtype=getattr(torch, cfg.dtype),
                   scale=cfg.head_dim**-0.5, config_path=_find_config(cfg.minference_config), peer_ops=peer_ops,
                   impl=cfg.impl)


def bench_inputs(cfg: BenchConfig, seq_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """The seeded random ``q, k, v`` every case at ``seq_len`` runs on (batch 1, on ``cfg.device``)."""
    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    g = torch.Generator().manual_seed(cfg.seed + seq_len)
    q = torch.randn((1, cfg.heads, seq_len, cfg.head_dim), generator=g).to(device, dtype)
    k = torch.randn((1, cfg.kv_heads, seq_len, cfg.head_dim), generator=g).to(device, dtype)
    v = torch.randn((1, cfg.kv_heads, seq_len, cfg.head_dim), generator=g).to(device, dtype)
    return q, k, v


def run(cfg: BenchConfig, progress: bool = True, on_row=None) -> dict:
    """Run every case of ``cfg``; returns ``{"env": ..., "rows": [...]}``.

    ``on_row(result_so_far)`` is called after every case (the CLI saves partial JSON there)."""
    device = torch.device(cfg.device)
    ctx = bench_context(cfg, load_minference_ops() if device.type == "cuda" else None)
    config_path = ctx.config_path
    peak = peak_matmul_tflops(device, ctx.dtype)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "peak_tflops": peak, "config": {**asdict(cfg), "impl": cfg.impl.value},
           "minference": ctx.peer_ops is not None, "minference_config": str(config_path) if config_path else None}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    cases = _cases(cfg, config_path)
    rows = []
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; keep the bench usable without it
        tqdm = None
    bar = tqdm(total=len(cases), disable=not progress, desc="bench") if tqdm else None
    # Many shapes and masks compile in one process: raise dynamo's recompile limit for this run only.
    with torch._dynamo.config.patch(recompile_limit=256, accumulated_recompile_limit=1024):
        for s in cfg.seqlens:
            q, k, v = bench_inputs(cfg, s)
            sdpa = _sdpa_ms(q, k, v, cfg, device)
            for fam, variant, seq in cases:
                if seq != s:
                    continue
                if bar:
                    bar.set_postfix_str(f"{fam}/{variant} @{s}")
                rows.append(_run_case(fam, variant, s, ctx, (q, k, v), sdpa, peak))
                if on_row is not None:
                    on_row({"env": env, "rows": rows})
                if bar:
                    bar.update(1)
            del q, k, v
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if bar:
        bar.close()
    return {"env": env, "rows": rows}


def format_table(result: dict) -> str:
    """The compact results table (milliseconds)."""
    cols = [("case", "case", "{}"), ("route", "route", "{}"), ("S", "seq_len", "{}"), ("sdpa", "sdpa_ms", "{:.1f}"),
            ("whole", "whole_ms", "{:.1f}"), ("est", "estimate_ms", "{:.1f}"), ("mask", "mask_ms", "{:.1f}"),
            ("attn", "attention_ms", "{:.1f}"), ("x_sdpa", "speedup", "{:.2f}"), ("minf", "minference_ms", "{:.1f}"),
            ("x_minf", "vs_minference", "{:.2f}"), ("floor%", "floor_frac_whole", "{:.0%}"),
            ("visit", "visited", "{:.1%}"), ("err", "rel_err", "{:.1e}")]
    lines = [[h for h, _, _ in cols]]
    for r in result["rows"]:
        lines.append([fmt.format(r[key]) if r.get(key) is not None and not (isinstance(r[key], float) and
                      math.isnan(r[key])) else "-" for _, key, fmt in cols])
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    text = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in lines]
    env = result["env"]
    head = (f"device {env['device']}  torch {env['torch']}  triton {env.get('triton')}  "
            f"peak {env['peak_tflops']:.3g} TFLOP/s  minference {'yes' if env['minference'] else 'no'}")
    return "\n".join([head, *text])


def plot(result: dict, path: str) -> None:
    """Speed-up over SDPA vs sequence length, one line per case (matplotlib, imported here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_case: dict[str, list[tuple[int, float]]] = {}
    for r in result["rows"]:
        by_case.setdefault(r["case"], []).append((r["seq_len"], r["speedup"]))
    for name, pts in sorted(by_case.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("speed-up over dense SDPA (whole op)")
    ax.set_title(result["env"]["device"])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``flexinference bench`` (defaults depend on the device; see :func:`run_bench`)."""
    parser.add_argument("--seqlens", type=int, nargs="+", help="sequence lengths (GPU: 32768 131072; CPU: 4096)")
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES), help="case families to run")
    parser.add_argument("--variants", nargs="+", help="only these variants of the families (e.g. banded t64 L0)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--heads", type=int, help="query heads (GPU 32, CPU 8)")
    parser.add_argument("--kv-heads", type=int, help="KV heads (GPU 8, CPU 2)")
    parser.add_argument("--head-dim", type=int, help="head dim (GPU 128, CPU 64)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="GPU bfloat16, CPU float32")
    parser.add_argument("--reps", type=int, help="timed repetitions, median reported (GPU 20, CPU 3)")
    parser.add_argument("--part-reps", type=int, help="repetitions for each part (GPU 10, CPU 3)")
    parser.add_argument("--warmup", type=int, help="untimed calls before timing (GPU 3, CPU 1)")
    parser.add_argument("--check-rows", type=int, default=256, help="query rows checked against the reference")
    parser.add_argument("--scale-budgets", action=argparse.BooleanOptionalAction, default=None,
                        help="scale budgets by S/131072 (default on for CPU, off for GPU)")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 15, 31], help="layers of the layer_mix case")
    parser.add_argument("--minference-config", help=f"path of {DEFAULT_MINFERENCE_CONFIG}")
    parser.add_argument("--impl", choices=[i.value for i in BENCH_IMPLS],
                        help="attention implementation (GPU default auto: what sparse_attention runs, each row "
                        "names its route; CPU default flex: compiled C++ kernels that honour block sparsity)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", metavar="PNG", help="plot speed-up vs sequence length (matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Fill device-dependent defaults and validate."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")

    def pick(value, gpu_default, cpu_default):
        return value if value is not None else (gpu_default if gpu else cpu_default)

    return BenchConfig(
        seqlens=tuple(pick(args.seqlens, [32768, 131072], [4096])),
        families=tuple(pick(args.families, GPU_FAMILIES, CPU_FAMILIES)),
        heads=pick(args.heads, 32, 8),
        kv_heads=pick(args.kv_heads, 8, 2),
        head_dim=pick(args.head_dim, 128, 64),
        dtype=pick(args.dtype, "bfloat16", "float32"),
        device=device,
        reps=pick(args.reps, 20, 3),
        warmup=pick(args.warmup, 3, 1),
        part_reps=pick(args.part_reps, 10, 3),
        check_rows=args.check_rows,
        scale_budgets=pick(args.scale_budgets, False, True),
        compile=True,
        layers=tuple(args.layers),
        minference_config=args.minference_config,
        impl=Impl(pick(args.impl, Impl.AUTO.value, Impl.FLEX.value)),
        variants=tuple(args.variants) if args.variants else None,
    )


def run_bench(args: argparse.Namespace) -> int:
    """The ``flexinference bench`` job: run, print the table, optionally write JSON and a plot."""
    logging.basicConfig(level=logging.WARNING)
    cfg = config_from_args(args)

    def save(result: dict) -> None:
        row = result["rows"][-1]
        print(f"{row['case']} @{row['seq_len']}: whole {row['whole_ms']:.2f} ms, sdpa {row['sdpa_ms']:.2f} ms, "
              f"err {row['rel_err']:.1e}", flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=1, default=str))

    result = run(cfg, progress=not getattr(args, "no_progress", False), on_row=save)
    if args.plot:
        plot(result, args.plot)
    print(format_table(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m flexinference.bench``)."""
    parser = argparse.ArgumentParser(prog="flexinference bench", description=__doc__.splitlines()[0])
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
