"""Decode-step latency and bytes of each KV-cache policy vs the dense cache.

Fills every cache with random (non-zero) keys/values of ``--seqlen`` tokens with Llama-3-8B attention
shapes (32 query heads, 8 KV heads, head dim 128, bf16), then times one decode step per layer:
``cache.update`` with the new token + attention of its 32 queries over what the cache returns (SDPA,
the 4 query heads of a KV group folded into the query axis, so no KV repeat). CUDA events, warm-up,
median of ``--iters`` steps. Correctness is checked first: with a budget covering everything each policy
equals the dense cache; compressed policies equal dense attention restricted to the tokens they kept.

    python benchmarks/bench_cache.py                       # GPU, 128K, 1 layer
    python benchmarks/bench_cache.py --device cpu --seqlen 4096 --budget 1024
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache

from flexinference.cache import KIVICache, PyramidKVCache, SnapKVCache, StreamingLLMCache
from flexinference.cache.base import gather_tokens

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CHECK_LEN = 8192  # sequence length of the correctness checks (capped by --seqlen)


@dataclass(frozen=True, slots=True)
class BenchConfig:
    seqlen: int = 131072
    layers: int = 1
    heads_q: int = 32
    heads_kv: int = 8
    head_dim: int = 128
    dtype: str = "bf16"
    device: str = "cuda"
    budget: int = 4096
    window: int = 32
    sink: int = 128
    kivi_group: int = 32
    kivi_residual: int = 32
    warmup: int = 5
    iters: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("seqlen", "layers", "heads_q", "heads_kv", "head_dim", "budget", "iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.heads_q % self.heads_kv:
            raise ValueError("--heads-q must be a multiple of --heads-kv")
        if self.iters < 20:
            raise ValueError(f"--iters must be >= 20 (median of at least 20 steps), got {self.iters}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype}")


def policies(cfg: BenchConfig, budget: int, residual: int, track: bool) -> dict[str, Callable[[], object]]:
    """Factories of every cache under test (``budget``/``residual`` let the checks cover everything)."""
    return {
        "dense": DynamicCache,
        "streaming": lambda: StreamingLLMCache(sink=cfg.sink, window=budget - cfg.sink, track_positions=track),
        "snapkv": lambda: SnapKVCache(budget=budget, window=cfg.window, track_positions=track),
        "pyramidkv": lambda: PyramidKVCache(
            budget=budget, window=cfg.window, num_layers=cfg.layers, track_positions=track
        ),
        "kivi2": lambda: KIVICache(bits=2, group_size=cfg.kivi_group, residual_length=residual),
        "kivi4": lambda: KIVICache(bits=4, group_size=cfg.kivi_group, residual_length=residual),
    }


def make_inputs(cfg: BenchConfig, seqlen: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    dt, dev = DTYPES[cfg.dtype], cfg.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=dev, dtype=dt)

    return {
        "k": rand(1, cfg.heads_kv, seqlen, cfg.head_dim),
        "v": rand(1, cfg.heads_kv, seqlen, cfg.head_dim) + 0.5,
        "q_window": rand(1, cfg.heads_q, cfg.window, cfg.head_dim),
        "q": rand(1, cfg.heads_q, 1, cfg.head_dim),
        "k1": rand(1, cfg.heads_kv, 1, cfg.head_dim),
        "v1": rand(1, cfg.heads_kv, 1, cfg.head_dim),
    }


def fill(cache, cfg: BenchConfig, x: dict[str, torch.Tensor]) -> None:
    """Prefill every layer with the same keys/values (and observation queries for scoring policies)."""
    for layer in range(cfg.layers):
        if getattr(cache, "needs_queries", None) and cache.needs_queries(layer, x["k"].shape[2]):
            cache.set_window_queries(layer, x["q_window"], cfg.head_dim**-0.5)
        cache.update(x["k"], x["v"], layer)


# Explicit SDPA backends on CUDA: left to itself, SDPA may pick cuDNN attention, which builds a new plan
# (~60 ms) for every new KV length, i.e. at every decode step of a growing cache.
CUDA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One decode token's GQA attention: ``q`` ``(B, H_q, 1, D)``, keys/values ``(B, H_kv, N, D)``."""
    batch, heads_q, _, dim = q.shape
    heads_kv = keys.shape[1]
    grouped = q.reshape(batch, heads_kv, heads_q // heads_kv, dim)  # query heads of a group as queries
    return F.scaled_dot_product_attention(grouped, keys, values).reshape(batch, heads_q, 1, dim)


def decode_step(cache, cfg: BenchConfig, x: dict[str, torch.Tensor]) -> torch.Tensor:
    out = x["q"]
    with sdpa_kernel(CUDA_BACKENDS) if x["q"].is_cuda else contextlib.nullcontext():
        for layer in range(cfg.layers):
            keys, values = cache.update(x["k1"], x["v1"], layer)
            out = attend(x["q"], keys, values)
    return out


def cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


def check_correctness(cfg: BenchConfig) -> dict[str, float]:
    """Full budget == dense; compressed eviction == dense attention over the kept tokens; KIVI error."""
    n = min(cfg.seqlen, CHECK_LEN)
    small = BenchConfig(**{**asdict(cfg), "layers": 1})
    x = make_inputs(small, n)
    dense = DynamicCache()
    fill(dense, small, x)
    expected = decode_step(dense, small, x)
    results: dict[str, float] = {}
    for name, factory in policies(small, budget=n + 64, residual=n + 64, track=False).items():
        cache = factory()
        fill(cache, small, x)
        torch.testing.assert_close(decode_step(cache, small, x), expected, msg=f"{name} at full budget != dense")
    full_k = torch.cat([x["k"], x["k1"]], dim=2)
    full_v = torch.cat([x["v"], x["v1"]], dim=2)
    for name, factory in policies(small, budget=cfg.budget, residual=cfg.kivi_residual, track=True).items():
        if name == "dense":
            continue
        cache = factory()
        fill(cache, small, x)
        if name.startswith("kivi"):
            got = decode_step(cache, small, x)
            results[f"{name}_max_abs_err_vs_dense"] = float((got.float() - expected.float()).abs().max())
            continue
        kept = cache.kept_positions(0).long()
        new = torch.full((*kept.shape[:2], 1), n, dtype=torch.long, device=kept.device)
        index = torch.cat([kept, new], dim=-1)  # what the decode step attends to
        got = decode_step(cache, small, x)
        reference = attend(x["q"], gather_tokens(full_k, index), gather_tokens(full_v, index))
        torch.testing.assert_close(got, reference, msg=f"{name} != attention over its kept tokens")
        results[f"{name}_tokens_kept"] = float(index.shape[-1])
    return results


def time_policy(cache, cfg: BenchConfig, x: dict[str, torch.Tensor]) -> list[float]:
    """Milliseconds of each timed decode step (all layers), after ``cfg.warmup`` untimed steps."""
    for _ in range(cfg.warmup):
        decode_step(cache, cfg, x)
    times = []
    cuda = cfg.device.startswith("cuda")
    for _ in range(cfg.iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            decode_step(cache, cfg, x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            decode_step(cache, cfg, x)
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def run(cfg: BenchConfig) -> dict:
    torch.manual_seed(cfg.seed)
    checks = check_correctness(cfg)
    x = make_inputs(cfg, cfg.seqlen)
    rows = []
    for name, factory in policies(cfg, budget=cfg.budget, residual=cfg.kivi_residual, track=False).items():
        cache = factory()
        fill(cache, cfg, x)
        nbytes = cache_bytes(cache)
        times = time_policy(cache, cfg, x)
        kept = [
            layer.tokens_kept() if hasattr(layer, "tokens_kept") else layer.keys.shape[-2] for layer in cache.layers
        ]
        rows.append(
            {
                "policy": name,
                "bytes": nbytes,
                "decode_ms": statistics.median(times),
                "min_ms": min(times),
                "max_ms": max(times),
                "tokens_kept_after": kept if len(set(kept)) > 1 else kept[0],
            }
        )
        del cache
        if cfg.device.startswith("cuda"):
            torch.cuda.empty_cache()
    dense = rows[0]
    for row in rows:
        row["bytes_ratio"] = row["bytes"] / dense["bytes"]
        row["speedup"] = dense["decode_ms"] / row["decode_ms"]
    device_name = torch.cuda.get_device_name() if cfg.device.startswith("cuda") else platform.processor() or "cpu"
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "device": device_name}
    env["sdpa_backends"] = [b.name for b in CUDA_BACKENDS] if cfg.device.startswith("cuda") else "default"
    return {"config": asdict(cfg), "env": env, "checks": checks, "results": rows}


def print_table(report: dict) -> None:
    cfg = report["config"]
    print(
        f"seqlen {cfg['seqlen']}, layers {cfg['layers']}, H_q {cfg['heads_q']}, H_kv {cfg['heads_kv']}, "
        f"D {cfg['head_dim']}, {cfg['dtype']}, {report['env']['device']}, budget {cfg['budget']}"
    )
    print(f"{'policy':<10} {'bytes':>14} {'ratio':>8} {'decode ms':>10} {'speed-up':>9}")
    for row in report["results"]:
        print(
            f"{row['policy']:<10} {row['bytes']:>14,d} {row['bytes_ratio']:>8.4f} "
            f"{row['decode_ms']:>10.4f} {row['speedup']:>8.2f}x"
        )
    print("checks:", json.dumps(report["checks"]))


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = BenchConfig()
    for field, value in asdict(defaults).items():
        p.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    p.add_argument("--out", default="bench_cache.json", help="JSON report path")
    args = vars(p.parse_args(argv))
    out = args.pop("out")
    return BenchConfig(**args), out


def main(argv: list[str] | None = None) -> dict:
    cfg, out = parse_args(argv)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu (e.g. --device cpu --seqlen 4096)")
    report = run(cfg)
    print_table(report)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
