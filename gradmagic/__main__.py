"""Command line: `python -m gradmagic demo [--out DIR] [NOTEBOOK...]`, and
`python -m gradmagic run [--steps 1,100] [--out DIR] train.py [ARGS...]`."""

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
    run = commands.add_parser(
        "run",
        help="run a training script unchanged and write a report of the steps you name",
        description="Run SCRIPT as `python SCRIPT ARGS` would (its arguments, output, "
        "exceptions and exit code are its own), watch its backwards and optimizer steps, "
        "and write an HTML report of each step in --steps into DIR, one line on stderr per "
        "report. A step is an optimizer step; in a script without an optimizer, a "
        "backward. Under torchrun, each rank writes its own files. Options go before SCRIPT.",
    )
    run.add_argument(
        "--steps",
        metavar="N[,N...]",
        type=_steps,
        default=[1],
        help="which steps to report, counted from 1 (default: 1)",
    )
    run.add_argument(
        "--out",
        metavar="DIR",
        default="gradmagic-run",
        help="where to write the reports (default: ./gradmagic-run/)",
    )
    run.add_argument("script", metavar="SCRIPT", help="the Python script to run")
    run.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="its arguments")
    return parser


def _steps(text: str) -> list[int]:
    from .run import parse_steps

    try:
        return parse_steps(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        from .run import run_script

        return run_script(args.script, args.args, args.steps, args.out)
    if args.command != "demo":
        parser.print_help()
        return 2
    from .demo import run_demo

    return run_demo(args.out, args.notebooks)


if __name__ == "__main__":
    sys.exit(main())
