"""`%%grad` and `%grad`: parse options, run the cell under `watch()`, display.

Kept thin: everything worth testing lives in `capture`, `report` and below.
"""

from __future__ import annotations

import ast
import re
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display

from .capture import watch
from .capture.ddp import is_main_process
from .history import History


def _count(name: str, low: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise UsageError(f"{name} takes a whole number, not {text!r}.") from None
        if value < low:
            raise UsageError(f"{name} must be at least {low}, not {value}.")
        return value

    return parse


def _positive(name: str) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise UsageError(f"{name} takes a number such as 1e-8, not {text!r}.") from None
        if not value > 0:
            raise UsageError(f"{name} must be above 0, not {text}.")
        return value

    return parse


def _unquote(text: str) -> str:
    # IPython's argument splitter keeps the quotes around a quoted option value.
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _regex(text: str) -> re.Pattern[str]:
    text = _unquote(text)
    try:
        return re.compile(text)
    except re.error as exc:
        raise UsageError(f"--only {text!r} is not a valid regular expression: {exc}.") from None


@magics_class
class GradMagics(Magics):
    """The `%%grad` cell magic and the `%grad` line magic."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.history = History()
        self.last_report: Any = None  # the last %%grad report, for `%grad why NAME`

    @magic_arguments()
    @argument("-o", "--output", metavar="NAME", help="Store the report as NAME in the namespace.")
    @argument("-q", "--quiet", action="store_true", help="Record, but display nothing.")
    @argument(
        "--values",
        metavar="N",
        type=_count("--values", 0),
        default=16,
        help="Keep exact values of gradients with at most N elements (default 16); "
        "larger ones are summarised.",
    )
    @argument("--copies", action="store_true", help="Keep full copies of every gradient.")
    @argument("--only", metavar="REGEX", type=_regex, help="Show only leaves whose name matches.")
    @argument("-G", "--no-graph", action="store_true", help="Do not record or draw the graph.")
    @argument("--graph-only", action="store_true", help="Show the graph without the table.")
    @argument(
        "--max-nodes",
        metavar="N",
        type=_count("--max-nodes", 3),
        default=60,
        help="Collapse the graph by module above N visible nodes (default 60).",
    )
    @argument(
        "--depth",
        metavar="N",
        type=_count("--depth", 0),
        default=None,
        help="Collapse modules deeper than N in the graph.",
    )
    @argument(
        "--plot",
        dest="plot",
        action="store_const",
        const=True,
        default=None,
        help="Draw the gradient-flow chart (on by default from 8 leaves).",
    )
    @argument("--no-plot", dest="plot", action="store_const", const=False, help="Do not draw it.")
    @argument(
        "--vanish",
        metavar="X",
        type=_positive("--vanish"),
        default=1e-8,
        help="Call a gradient norm below X vanishing (default 1e-8).",
    )
    @argument(
        "--explode",
        metavar="X",
        type=_positive("--explode"),
        default=1e4,
        help="Call a gradient norm above X exploding (default 1e4).",
    )
    @argument(
        "--ratio",
        metavar="X",
        type=_positive("--ratio"),
        default=1e4,
        help="Flag a model whose layers' gradient norms differ by more than X (default 1e4).",
    )
    @argument(
        "--check-ranks",
        action="store_true",
        help="Under torch.distributed: compare every parameter's .grad across the ranks when "
        "the cell ends and name those that differ. Every rank must run the cell with it.",
    )
    @argument(
        "--rank-timeout",
        metavar="S",
        type=_positive("--rank-timeout"),
        default=60.0,
        help="How long --check-ranks waits for the other ranks, in seconds (default 60).",
    )
    @argument(
        "--all-ranks",
        action="store_true",
        help="Under torch.distributed: show the report on every rank, not only on rank 0.",
    )
    @argument(
        "--steps",
        action="store_true",
        help="Show the backward step by step on graphs of at most 60 ops: the order the "
        "engine ran the ops, what each received and sent, its local derivative, and the chain "
        "rule for each leaf, with the numbers.",
    )
    @argument(
        "--check",
        action="store_true",
        help="Run torch.autograd.gradcheck on every custom autograd.Function the cell's "
        "graphs ran (float64, fresh inputs of the recorded shapes; your tensors and random "
        "state are left alone) and say which backward disagrees with finite differences.",
    )
    @argument(
        "--lines",
        dest="lines",
        action="store_const",
        const=True,
        default=None,
        help="Record the line that created each op of the graph, however large the graph "
        "(by default until the cell has created 10,000 autograd nodes).",
    )
    @argument(
        "--no-lines",
        dest="lines",
        action="store_const",
        const=False,
        help="Do not record the lines that created the graph's ops.",
    )
    @argument(
        "args",
        nargs="*",
        help="For the line magic: `reset`, `history NAME`, or `why NAME`.",
    )
    @line_cell_magic
    def grad(self, line: str, cell: str | None = None) -> Any:
        """Show what the cell's backward passes did to every leaf's `.grad`.

        %%grad runs the cell as usual, records every call into the autograd
        engine, and shows under the cell: findings, each leaf's gradient
        before and after (accumulation across runs highlighted), and the
        grad_fn graph. `%grad reset` forgets the run history; `%grad history
        NAME` shows how NAME.grad changed run by run.
        """
        try:
            args = parse_argstring(self.grad, line)
        except ValueError as exc:  # IPython's splitter: "No closing quotation"
            raise UsageError(f"%%grad could not read its options {line!r}: {exc}.") from None
        if cell is None:
            return self._line(args.args)
        if args.args:
            raise UsageError(
                f"%%grad takes options only, not {' '.join(args.args)!r}; see %%grad? for them."
            )
        if args.steps and args.no_graph:
            raise UsageError("--steps shows the graph's ops one by one: drop -G/--no-graph.")
        # The magic's line, as a comment, keeps line numbers in tracebacks equal
        # to the lines the user sees in the cell.
        code = f"# %%grad {' '.join(line.split())}\n" + self.shell.transform_cell(cell)
        filename = self.shell.compile.cache(code, self.shell.execution_count, raw_code=cell)
        error: BaseException | None = None
        with watch(
            self.shell.user_ns,
            source=code,
            history=self.history,
            values=args.values,
            copies=args.copies,
            only=args.only,
            graph=not args.no_graph,
            max_nodes=args.max_nodes,
            depth=args.depth,
            vanish=args.vanish,
            explode=args.explode,
            ratio=args.ratio,
            plot=args.plot,
            check_ranks=args.check_ranks,
            rank_timeout=args.rank_timeout,
            steps=args.steps,
            check=args.check,
            lines=args.lines,
        ) as recorder:
            try:
                self._execute(code, filename)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the report
                error = exc
        self._show(recorder, args)
        if error is not None:
            raise _pointing_at_user_code(self.shell, error, filename)
        return None

    def _show(self, recorder: Any, args: Any) -> None:
        shown = not args.quiet and (args.all_ranks or is_main_process())
        try:
            report = recorder.report()
        except Exception as exc:  # noqa: BLE001 - the user's cell already ran; say why, briefly
            if shown:
                print(f"gradmagic could not build its report: {type(exc).__name__}: {exc}")
            return
        self.last_report = report
        report.show_table = not args.graph_only
        report.show_graph = not args.no_graph
        if args.output:
            self.shell.user_ns[args.output] = report
        if shown:
            display(report)

    def _execute(self, code: str, filename: str) -> None:
        """Run the cell's code like IPython does: the last expression is displayed."""
        shell = self.shell
        tree = shell.transform_ast(shell.compile.ast_parse(code, filename=filename))
        nodes = tree.body
        last_expr = bool(nodes) and isinstance(nodes[-1], ast.Expr)
        body, tail = (nodes[:-1], nodes[-1:]) if last_expr else (nodes, [])
        chunks = [(ast.Module(body, type_ignores=[]), "exec")] if body else []
        if tail:
            chunks.append((ast.Interactive(tail), "single"))
        for tree_part, mode in chunks:
            exec(shell.compile(tree_part, filename, mode), shell.user_global_ns, shell.user_ns)

    def _line(self, words: list[str]) -> Any:
        if words == ["reset"]:
            self.history.reset()
            if is_main_process():
                print("gradmagic: forgot the gradient history of every tensor.")
            return None
        if len(words) == 2 and words[0] == "history":
            return self._history(words[1])
        if words and words[0] == "why":
            return self._why(words[1:])
        raise UsageError(
            "%grad takes `reset`, `history NAME` or `why NAME`; to watch a cell, use %%grad on "
            "its first line."
        )

    def _why(self, words: list[str]) -> Any:
        if len(words) != 1:
            raise UsageError("%grad why takes one name, the leaf to explain: `%grad why w`.")
        name = words[0]
        report = self.last_report
        if report is None:
            raise UsageError(
                f"%grad why {name}: no %%grad cell has run yet; run one, then ask why."
            )
        known = {row.name for row in report.rows} | {n for row in report.rows for n in row.names}
        if name not in known:
            self._not_a_row(name, report)
        try:
            return report.why(name)
        except ValueError as exc:
            raise UsageError(f"%grad why {name}: {exc}") from None

    def _not_a_row(self, name: str, report: Any) -> None:
        """Say why `name` has no row: not a tensor, not a leaf, or not in the last cell."""
        import torch

        leaves = ", ".join(f"`{row.name}`" for row in report.rows) or "none"
        value = self.shell.user_ns.get(name) if name.isidentifier() else None
        if isinstance(value, torch.Tensor) and not value.is_leaf:
            try:
                op = type(value.grad_fn).__name__ if value.grad_fn is not None else ""
            except Exception:  # noqa: BLE001 - a view whose grad_fn raises
                op = ""
            made = f" (made by `{op}`)" if op else ""
            raise UsageError(
                f"%grad why {name}: `{name}` is not a leaf: it was computed{made}, and "
                f"backward keeps `.grad` only on leaves (call `{name}.retain_grad()` before "
                f"backward to keep it). Leaves of the last report: {leaves}."
            )
        if isinstance(value, torch.Tensor) and not value.requires_grad:
            from .source import cuts

            block = report.block
            off = [
                c
                for c in cuts(block.source if block is not None else None)
                if c.kind == "requires_grad_" and c.tensor == name
            ]
            how = (
                f"the last %%grad cell turned it off at line {off[0].line}: `{off[0].code}`"
                if off
                else "make it with `requires_grad=True`"
            )
            raise UsageError(
                f"%grad why {name}: `{name}` does not require grad, so autograd gives it no "
                f"gradient ({how}). Leaves of the last report: {leaves}."
            )
        if name in self.shell.user_ns and not isinstance(value, torch.Tensor):
            raise UsageError(
                f"%grad why {name}: `{name}` is a {type(value).__name__}, not a tensor. "
                f"Leaves of the last report: {leaves}."
            )
        raise UsageError(
            f"%grad why {name}: the last %%grad report has no leaf named `{name}`; "
            f"its leaves: {leaves}."
        )

    def _history(self, name: str) -> Any:
        import torch

        from .report import HistoryView

        try:
            value = self.shell.ev(name)
        except Exception as exc:  # noqa: BLE001 - the user's expression
            raise UsageError(f"%grad history: cannot evaluate {name!r}: {exc}.") from None
        if not isinstance(value, torch.Tensor):
            raise UsageError(f"%grad history: {name!r} is a {type(value).__name__}, not a tensor.")
        return HistoryView(name, self.history.entries(value))


def _pointing_at_user_code(shell: Any, error: BaseException, filename: str | None) -> BaseException:
    """Make IPython show the traceback from the user's line, once.

    Re-raising marks the cell as failed (Run All stops, nbclient raises); the
    traceback IPython would print includes the magic's own frames, so the
    exception carries a rendering that starts at the cell's code.
    """
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    if tb is not None and not isinstance(error, SyntaxError):
        try:
            stb = shell.InteractiveTB.structured_traceback(type(error), error, tb, tb_offset=0)
            error._render_traceback_ = lambda: stb  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - fall back to IPython's own rendering
            pass
    return error


def load(shell: Any) -> GradMagics:
    magics = GradMagics(shell)
    shell.register_magics(magics)
    return magics


def unload(shell: Any) -> None:
    table = shell.magics_manager.magics
    for kind in ("line", "cell"):
        table[kind].pop("grad", None)
    shell.magics_manager.registry.pop("GradMagics", None)
