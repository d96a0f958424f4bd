"""``flexinference search``: choose each head's pattern offline and write the config ``apply`` reads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

__all__ = ["add_search_arguments", "run_search", "plot_pattern_map", "minference_ready"]

#: MInference clamps budgets to the length, so this vertical-slash entry means "keep everything".
_DENSE_AS_VS = 1 << 30


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local Hugging Face checkpoint directory")
    p.add_argument("--calibration", help="text file to calibrate on (default: a synthetic retrieval prompt)")
    p.add_argument("--length", type=int, default=16384, help="calibration tokens (default 16384)")
    p.add_argument("--tokenizer", default="auto", choices=["auto", "char"],
                   help="'auto': the checkpoint's tokenizer; 'char': the project's character tokenizer")
    p.add_argument("--out", required=True, help="our JSON config (scores and density per head included)")
    p.add_argument("--minference-format", metavar="PATH", help="also write MInference's per-head JSON")
    p.add_argument("--min-recall", type=float, default=0.95)
    p.add_argument("--max-error", type=float, default=0.1)
    p.add_argument("--rows", type=int, default=256, help="query rows sampled per layer")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--plot", metavar="PNG", help="draw the per-layer / per-head pattern map")


def _tokenizer(args):
    if args.tokenizer == "char":
        from flexinference.scbench.embedded import CharTokenizer

        return CharTokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(args.model, local_files_only=True)


def minference_ready(config):
    """Dense heads as MInference's keep-everything vertical-slash entry (its format has no dense)."""
    from flexinference.patterns import Dense, VerticalSlash

    layers = tuple(tuple(VerticalSlash(vertical=_DENSE_AS_VS, slash=_DENSE_AS_VS) if isinstance(p, Dense) else p
                         for p in layer) for layer in config.layers)
    return config.replace(layers=layers)


def plot_pattern_map(config, path: str) -> None:
    """Image of pattern type per (layer, head)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    names = sorted({p.name for layer in config.layers for p in layer})
    grid = [[names.index(p.name) for p in layer] for layer in config.layers]
    fig, ax = plt.subplots(figsize=(max(4, config.num_heads * 0.25 + 2), max(3, config.num_layers * 0.2 + 1.5)))
    cmap = ListedColormap(plt.get_cmap("tab10").colors[: len(names)])
    im = ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5, aspect="auto", interpolation="nearest")
    cbar = fig.colorbar(im, ticks=range(len(names)))
    cbar.ax.set_yticklabels(names)
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title("searched pattern per head")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_search(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM

    from flexinference.compat.minference_config import save_minference_config
    from flexinference.search import SearchCriterion
    from flexinference.search_model import calibration_ids, search

    tok = _tokenizer(args)
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, dtype=dtype).to(args.device)
    model.eval()
    if args.calibration:
        text = Path(args.calibration).read_text(encoding="utf-8")
        ids = tok.encode(text) if hasattr(tok, "encode") else tok(text)["input_ids"]
        input_ids = torch.tensor([list(ids)[-args.length:]], dtype=torch.long)
    else:
        input_ids = calibration_ids(tok, args.length)
    criterion = SearchCriterion(min_recall=args.min_recall, max_error=args.max_error, num_rows=args.rows)
    result = search(model, input_ids, criterion=criterion, progress=True)
    data = result.config.to_dict()
    data["search"] = {
        "calibration_tokens": int(input_ids.shape[1]),
        "criterion": {"min_recall": args.min_recall, "max_error": args.max_error, "rows": args.rows},
        "heads": [[{"recall": c.recall, "error": c.error, "density": c.cost} for c in layer]
                  for layer in result.choices],
    }
    Path(args.out).write_text(json.dumps(data, indent=1), encoding="utf-8")
    if args.minference_format:
        save_minference_config(minference_ready(result.config), args.minference_format,
                               scores=[[c.recall for c in layer] for layer in result.choices])
    if args.plot:
        plot_pattern_map(result.config, args.plot)
    print(result.summary())
    print(f"wrote {args.out}")
    return 0
