"""``flexinference eval``: SCBench-style evaluation of methods on a model, from the command line.

Without ``--model`` it runs the trained reference model shipped with the package
(:mod:`flexinference.reference_model`) on short generated contexts, with no download; ``--model random``
runs a tiny random model instead (a pipeline check whose scores are meaningless, and the output says so). ``add_eval_arguments`` / ``run_eval`` let the
``flexinference`` CLI mount this as its ``eval`` subcommand; ``main`` runs it standalone::

    python -c "from flexinference.scbench.cli import main; main([])"
    flexinference eval --model /models/Llama-3.1-8B-Instruct --data-dir scbench_data --tasks all \\
        --methods dense,minference,a_shape,snapkv --mode multi-turn --max-length 131072 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from flexinference.scbench.data import Record, load_hub, load_records
from flexinference.scbench.embedded import EMBEDDED_NOTE, build_embedded_model
from flexinference.scbench.generators import generate_records
from flexinference.scbench.methods import METHODS, Method, MethodUnavailableError, build_method
from flexinference.scbench.runner import Runner, TaskResult
from flexinference.scbench.tasks import SYNTHETIC_TASKS, TASK_NAMES, get_task

__all__ = ["add_eval_arguments", "main", "run_eval"]

EMBEDDED_DEFAULTS = {"context_tokens": 768, "max_length": 4096, "num_records": 2}
#: The built-in models: the trained reference model (the default) and a tiny random one (pipeline check).
BUILTIN_MODELS = ("reference", "random")
#: Methods of a built-in model's run when --methods is not given, with budgets scaled to its short contexts
#: so that each one acts (sparse prefill from 256 tokens, eviction beyond 256 cached tokens).
EMBEDDED_METHODS = "dense,a_shape,snapkv"
EMBEDDED_METHOD_KWARGS = {
    "a_shape": {"sink": 16, "local": 128, "apply_options": {"min_sparse_len": 256}},
    "snapkv": {"budget": 256, "window": 16},
}
MODEL_DEFAULTS = {"context_tokens": 8192, "num_records": 2}


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``flexinference eval``'s options to ``parser`` (for mounting as a subcommand)."""
    parser.add_argument(
        "--model",
        default=None,
        help="local Hugging Face checkpoint folder, 'reference' (the trained reference model shipped with the "
        "package, the default) or 'random' (a tiny random model: a pipeline check, scores meaningless)",
    )
    parser.add_argument(
        "--tasks",
        default="synthetic",
        help=f"comma-separated task names, 'synthetic' ({', '.join(SYNTHETIC_TASKS)}) or 'all' (default: synthetic)",
    )
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated methods, 'a+b' combines a prefill and a cache method (default: dense; built-in models: "
        f"{EMBEDDED_METHODS} with budgets scaled to its short contexts); known: {', '.join(sorted(METHODS))}",
    )
    parser.add_argument(
        "--method-kwargs", default=None, help='JSON of per-method arguments, e.g. \'{"snapkv": {"budget": 1024}}\''
    )
    parser.add_argument("--mode", choices=("multi-turn", "multi-request", "both"), default="multi-turn")
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="truncate each record to this many tokens (default: model limit; built-in models 4096)",
    )
    parser.add_argument(
        "--num-records", type=int, default=None, help="records per task (default: all loaded; 2 generated)"
    )
    parser.add_argument("--max-turns", type=int, default=5, help="turns per record (SCBench: 5)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="cap every task's decoding budget")
    parser.add_argument("--data-dir", default=None, help="folder with <task>.jsonl files in SCBench's format")
    parser.add_argument(
        "--hf", action="store_true", help="load tasks from the hub dataset microsoft/SCBench (needs 'datasets')"
    )
    parser.add_argument(
        "--context-tokens",
        type=int,
        default=None,
        help="context length of generated records (default: 8192; built-in models 768)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of generated records and of the random model")
    parser.add_argument("--rope-factor", type=float, default=1.0,
                        help="reference model only: YaRN factor for contexts beyond its 2048-token training length "
                        "(e.g. 2 for 4096)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto")
    parser.add_argument("--chat-template", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--json", dest="json_out", default=None, help="write results to this JSON file")
    parser.add_argument("--plot", default=None, help="write a score / prefill-time chart to this PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _fail(message: str) -> SystemExit:
    return SystemExit(f"flexinference eval: error: {message}")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _task_names(spec: str) -> list[str]:
    if spec == "synthetic":
        return list(SYNTHETIC_TASKS)
    if spec == "all":
        return list(TASK_NAMES)
    names = _split(spec)
    for name in names:
        if name not in TASK_NAMES:
            raise _fail(f"unknown task {name!r}; valid: {', '.join(TASK_NAMES)}")
    return names


def _methods(spec: str | None, kwargs_json: str | None, embedded: bool) -> list[Method]:
    """Build the methods. Explicitly requested ones must all be available; of the embedded run's default
    set, unavailable ones are skipped with a printed notice."""
    try:
        kwargs = json.loads(kwargs_json) if kwargs_json else {}
    except json.JSONDecodeError as e:
        raise _fail(f"--method-kwargs is not valid JSON ({e})") from None
    if not isinstance(kwargs, dict) or not all(isinstance(v, dict) for v in kwargs.values()):
        raise _fail('--method-kwargs must map method names to objects, e.g. {"snapkv": {"budget": 1024}}')
    default = spec is None and embedded
    if default:
        kwargs = {**EMBEDDED_METHOD_KWARGS, **kwargs}
    methods = []
    for name in _split(spec or (EMBEDDED_METHODS if embedded else "dense")):
        try:
            method = build_method(name, kwargs)
            method.check_available()
        except MethodUnavailableError as e:
            if default:
                print(f"skipping default method {name!r}: {e}")
                continue
            raise _fail(str(e)) from None
        except (ValueError, TypeError) as e:
            raise _fail(str(e)) from None
        methods.append(method)
    if not methods:
        raise _fail("--methods is empty")
    return methods


def _describe(method: Method) -> str:
    """One line naming what a method runs (pattern and apply options, cache class and arguments)."""
    parts = []
    if method.prefill is not None:
        prefill = method.prefill
        options = getattr(prefill, "options", None)
        parts.append(repr(getattr(prefill, "pattern", prefill)) + (f" {dict(options)}" if options else ""))
    factory = method.cache_factory
    if factory is not None:
        func = getattr(factory, "func", factory)
        kwargs = getattr(factory, "keywords", {})
        parts.append(getattr(func, "__name__", repr(func)) + (f"({kwargs})" if kwargs else "()"))
    return f"{method.name} = " + (" + ".join(parts) if parts else "dense")


def _load_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model in (None, "reference"):
        from flexinference.reference_model import load

        try:
            model, tok = load(device, rope_factor=args.rope_factor)
        except ValueError as e:
            raise _fail(f"--rope-factor: {e}") from None
        return model, tok, "reference"
    if args.rope_factor != 1.0:
        raise _fail("--rope-factor applies to the built-in reference model only")
    if args.model == "random":
        model, tok = build_embedded_model(args.seed)
        return model.to(device), tok, "embedded"
    if not os.path.isdir(args.model):
        raise _fail(f"--model {args.model!r} is not a folder (a local Hugging Face checkpoint is expected)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, dtype=dtype)
    return model.to(device).eval(), tok, args.model


def _records(task: str, args: argparse.Namespace, tokenizer: Any, embedded: bool) -> list[Record]:
    defaults = EMBEDDED_DEFAULTS if embedded else MODEL_DEFAULTS
    if args.data_dir:
        for ext in (".jsonl", ".json"):
            path = os.path.join(args.data_dir, task + ext)
            if os.path.isfile(path):
                try:
                    return load_records(path, task=task, limit=args.num_records)
                except ValueError as e:
                    raise _fail(f"{path}: {e}") from None
        raise _fail(f"no {task}.jsonl or {task}.json in --data-dir {args.data_dir!r}")
    if args.hf:
        try:
            return load_hub(task, limit=args.num_records)
        except (ImportError, ValueError) as e:
            raise _fail(str(e)) from None
    if not get_task(task).synthetic:
        raise _fail(f"task {task} has no offline generator: pass --data-dir with {task}.jsonl, or --hf")
    try:
        return generate_records(
            task,
            tokenizer=tokenizer,
            num_records=args.num_records or defaults["num_records"],
            num_turns=min(args.max_turns, 5),
            context_tokens=args.context_tokens or defaults["context_tokens"],
            seed=args.seed,
        )
    except ValueError as e:
        raise _fail(f"{e} (set --context-tokens)") from None


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op threads (the embedded model's tensors are too small to split)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _table(results: Sequence[TaskResult]) -> str:
    head = ("task", "method", "mode", "score", "subscores", "prefill s", "decode s", "peak MiB", "prefills", "decodes")
    rows = [head]
    for r in results:
        subs = " ".join(f"{k.removeprefix('scbench_')}={100 * v:.1f}" for k, v in r.subscores.items())
        mem = "n/a" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**20:.0f}"
        rows.append(
            (
                r.task,
                r.method,
                r.mode,
                f"{100 * r.score:.1f}",
                subs or "-",
                f"{r.stats.prefill_seconds:.3f}",
                f"{r.stats.decode_seconds:.2f}",
                mem,
                str(r.stats.prefill_calls),
                str(r.stats.decode_calls),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _plot(results: Sequence[TaskResult], path: str, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(f"{r.task.removeprefix('scbench_')}\n{r.mode}" for r in results))
    methods = list(dict.fromkeys(r.method for r in results))
    fig = Figure(figsize=(max(6.0, 1.4 * len(tasks)), 7.0))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 1, sharex=True)
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        by_task = {f"{r.task.removeprefix('scbench_')}\n{r.mode}": r for r in results if r.method == method}
        xs = [i + j * width for i, t in enumerate(tasks) if t in by_task]
        axes[0].bar(xs, [100 * by_task[t].score for t in tasks if t in by_task], width, label=method)
        axes[1].bar(xs, [by_task[t].stats.prefill_seconds for t in tasks if t in by_task], width, label=method)
    axes[0].set_ylabel("score (%)")
    axes[0].set_ylim(0, 100)
    axes[1].set_ylabel("prefill time (s)")
    axes[1].set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks, fontsize=8)
    axes[0].legend(fontsize=8)
    axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def run_eval(args: argparse.Namespace) -> int:
    """Run ``flexinference eval`` with parsed ``args``; returns the exit code."""
    tasks = _task_names(args.tasks)
    builtin = args.model in (None, *BUILTIN_MODELS)  # short generated contexts by default
    methods = _methods(args.methods, args.method_kwargs, embedded=builtin)
    modes = ["multi_turn", "multi_request"] if args.mode == "both" else [args.mode.replace("-", "_")]
    if args.data_dir and args.hf:
        raise _fail("--data-dir and --hf are exclusive")
    for name in ("max_length", "num_records", "max_turns", "max_new_tokens", "context_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise _fail(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise _fail("--plot needs matplotlib (pip install 'flexinference[plot]')") from None
    print("methods: " + "; ".join(_describe(m) for m in methods))
    model, tok, model_name = _load_model(args)
    note = EMBEDDED_NOTE if model_name == "embedded" else None
    if note:
        print(f"NOTE: {note}")
    max_length = args.max_length or (
        EMBEDDED_DEFAULTS["max_length"] if builtin else getattr(model.config, "max_position_embeddings", None)
    )
    chat = {"auto": None, "on": True, "off": False}[args.chat_template]
    runner = Runner(
        model,
        tok,
        chat_template=chat,
        max_length=max_length,
        max_new_tokens=args.max_new_tokens,
        max_turns=args.max_turns,
    )
    from tqdm.auto import tqdm

    data = {task: _records(task, args, tok, builtin) for task in tasks}  # all inputs checked before any run
    results: list[TaskResult] = []
    with _threads(1 if builtin and runner.device.type == "cpu" else None), warnings.catch_warnings():
        # On CPU FlexAttention runs eagerly (unfused) and says so once per shape: expected here.
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        for task, records in data.items():
            for mode in modes:
                for method in methods:
                    desc = f"{task.removeprefix('scbench_')} | {method.name} | {mode}"
                    with tqdm(total=len(records), desc=desc, unit="rec", disable=args.no_progress, leave=False) as bar:
                        result = runner.run(task, records, method, mode=mode, on_record=lambda _: bar.update())
                    results.append(result)
    print(_table(results))
    if note:
        print(f"NOTE: {note}")
    if args.json_out:
        payload = {
            "note": note,
            "model": model_name,
            "embedded": builtin,
            "modes": modes,
            "methods": {m.name: _describe(m) for m in methods},
            "max_length": max_length,
            "chat_template": runner.chat,
            "device": str(runner.device),
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
            "results": [r.to_dict() for r in results],
        }
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1, ensure_ascii=False, default=str)
    if args.plot:
        _plot(
            results,
            args.plot,
            f"SCBench on {model_name}" + (" (random weights: scores meaningless)" if note else ""),
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: parse ``argv`` and run."""
    parser = add_eval_arguments(
        argparse.ArgumentParser(prog="flexinference eval", description=__doc__.split("\n\n")[0])
    )
    return run_eval(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
