"""The ``flexinference`` command line: ``info``, ``bench``, ``eval``, ``search``."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys

__all__ = ["main"]

# Subcommands whose implementation lives in its own module: name -> (module, help).
_MOUNTED = {
    "bench": ("flexinference.bench", "benchmark sparse prefill attention against dense SDPA (the main job)"),
    "eval": ("flexinference.scbench.cli", "SCBench-style shared-context evaluation of methods"),
    "search": ("flexinference.search_cli", "offline per-head pattern search"),
}


def _info(args: argparse.Namespace) -> int:
    import torch
    import transformers

    from flexinference import __version__
    from flexinference.patterns import PATTERN_TYPES

    print(f"flexinference {__version__}")
    print(f"python        {platform.python_version()}")
    print(f"torch         {torch.__version__}")
    print(f"transformers  {transformers.__version__}")
    try:
        import triton

        print(f"triton        {triton.__version__}")
    except ImportError:
        print("triton        not installed")
    if torch.cuda.is_available():
        print(f"device        cuda: {torch.cuda.get_device_name()}")
    else:
        print(f"device        cpu ({platform.processor() or platform.machine()})")
    print("patterns:")
    for name, cls in PATTERN_TYPES.items():
        kind = "dynamic" if cls.dynamic else "static"
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"  {name:<22} {kind:<8} {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexinference", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print versions, device and the available patterns")
    info.set_defaults(run=_info)
    for name, (module, help_) in _MOUNTED.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_)
        getattr(mod, f"add_{name}_arguments")(p)
        p.set_defaults(run=getattr(mod, f"run_{name}"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
