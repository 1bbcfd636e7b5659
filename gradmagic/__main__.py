"""Command line: `python -m gradmagic demo [--out DIR] [NOTEBOOK...]`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradmagic" if Path(sys.argv[0]).name == "gradmagic" else "python -m gradmagic",
        description="gradmagic: make PyTorch autograd visible. In Jupyter: %load_ext gradmagic.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run the demo notebooks in a Jupyter kernel and write static HTML pages",
        description="Run the demo notebooks top to bottom in a fresh ipykernel, and write the "
        "executed notebooks and static HTML pages (no JavaScript from the web) into DIR.",
    )
    demo.add_argument(
        "--out",
        metavar="DIR",
        default="gradmagic-demo",
        help="where to write the pages (default: ./gradmagic-demo/)",
    )
    demo.add_argument(
        "notebooks",
        nargs="*",
        metavar="NOTEBOOK",
        help="which notebooks: a path, a name like 03_gradient_argument, or a prefix like 03 "
        "(default: all of them)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command != "demo":
        parser.print_help()
        return 2
    from .demo import run_demo

    return run_demo(args.out, args.notebooks)


if __name__ == "__main__":
    sys.exit(main())
