"""End-to-end prefill of a Llama-3-8B-shaped model (random weights): unpatched SDPA vs flexinference.

    python benchmarks/model_prefill.py --seqlen 131072            # H100: 32 layers, bf16, 128K prompt
    python benchmarks/model_prefill.py --search-seqlen 32768      # also time `flexinference.search` at 32K

Checks first that ``apply`` with Dense patterns reproduces the unpatched last-token logits exactly (same
SDPA path), then times the prefill (logits for the last token only) of the unpatched model and of the
model patched with vertical-slash on every head (the documented default), CUDA events, median of
``--reps`` after one warm-up. Random weights, so the sparse logits are compared only for finiteness and
reported as a relative difference. Prints a table; ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import flexinference as fi
from flexinference.bench import time_ms


def build_model(args) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=max(args.seqlen, args.search_seqlen or 0) + 1, rope_theta=500000.0,
        attn_implementation="sdpa",
    )
    dtype = getattr(torch, args.dtype)
    with torch.device(args.device):
        torch.set_default_dtype(dtype)
        try:
            torch.manual_seed(0)
            model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(torch.float32)
    return model.eval()


def timed(fn, reps: int, device: str) -> float:
    """Median milliseconds of ``reps`` calls after one warm-up call (which compiles)."""
    return time_ms(fn, torch.device(device), reps, warmup=1)


def floor_ms(model, prefill, args) -> float:
    """Prefill time with every attention call replaced by a no-op returning the queries: everything
    the model does besides attention (projections, MLPs, norms, RoPE), the floor of any sparse method."""
    from transformers import AttentionInterface

    def no_attention(module, query, key, value, attention_mask, **kwargs):
        return query.transpose(1, 2), None

    AttentionInterface.register("flexinference_floor", no_attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation("flexinference_floor")
    try:
        return timed(prefill, args.reps, args.device)
    finally:
        model.set_attn_implementation(previous)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlen", type=int, default=131072)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--min-sparse-len", type=int, default=4096)
    p.add_argument("--search-seqlen", type=int, default=0, help="also time the offline search at this length")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--floor", action="store_true",
                   help="also time the model with attention replaced by a no-op: the non-attention floor, "
                        "which bounds the achievable speed-up")
    args = p.parse_args(argv)

    model = build_model(args)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (1, args.seqlen), generator=g).to(args.device)

    def prefill():
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1].float()

    dense_logits = prefill()
    with fi.patched(model, fi.Dense(), min_sparse_len=args.min_sparse_len):
        same = prefill()
    exact = torch.equal(dense_logits, same)
    sdpa_ms = timed(prefill, args.reps, args.device)
    with fi.patched(model, fi.VerticalSlash(), min_sparse_len=args.min_sparse_len):
        sparse_logits = prefill()
        sparse_ms = timed(prefill, args.reps, args.device)
    rel = float((sparse_logits - dense_logits).norm() / dense_logits.norm())
    result = {
        "seqlen": args.seqlen, "layers": args.layers, "dtype": args.dtype, "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "dense_patterns_exact": exact, "sdpa_ms": sdpa_ms,
        "vertical_slash_ms": sparse_ms, "speedup": sdpa_ms / sparse_ms, "logits_rel_diff": rel,
        "finite": bool(torch.isfinite(sparse_logits).all()),
    }
    if args.floor:
        result["floor_ms"] = floor_ms(model, prefill, args)
        result["max_speedup"] = sdpa_ms / result["floor_ms"]
    if args.search_seqlen:
        from flexinference.search import SearchCriterion
        from flexinference.search_model import search

        sids = torch.randint(0, args.vocab, (1, args.search_seqlen), generator=g).to(args.device)
        t0 = time.perf_counter()
        found = search(model, sids, criterion=SearchCriterion(num_rows=256))
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        result["search_s"] = time.perf_counter() - t0
        result["search_summary"] = found.summary()
    print(f"{'S':>8} {'layers':>6} {'sdpa ms':>10} {'vs ms':>10} {'speed-up':>8} {'dense exact':>11} {'rel diff':>9}")
    print(f"{args.seqlen:>8} {args.layers:>6} {sdpa_ms:>10.1f} {sparse_ms:>10.1f} {sdpa_ms / sparse_ms:>8.2f} "
          f"{str(exact):>11} {rel:>9.3f}")
    if "floor_ms" in result:
        print(f"non-attention floor {result['floor_ms']:.1f} ms: no attention method can exceed "
              f"{result['max_speedup']:.2f}x on this model")
    if "search_s" in result:
        print(f"search at {args.search_seqlen}: {result['search_s']:.1f} s\n{result['search_summary']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if exact and result["finite"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
