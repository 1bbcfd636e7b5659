"""`GradReport`: a block's records and findings, and the data its views show."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .. import _engine, stats
from ..findings import Finding, findings_for
from ..graph.steps import BackwardSteps, backward_steps
from ..records import BlockRecord, Change, LeafRecord, OptimizerSteps, rows
from ..trajectory import Trajectory
from .plot import GradientFlow, gradient_flow

# Rows drawn in HTML and text; `rep.table` always has them all. Problem rows come first.
MAX_SHOWN_ROWS = 200
PROBLEM_STATUSES = ("nan/inf", "none", "accumulated")
COLUMNS = (
    "shape",
    "dtype",
    "device",
    "before",
    "after",
    "added",
    "status",
    "runs",
    "then",
    "norms",
)


@dataclass
class LeafRow:
    """One row of the gradient table: what one leaf's `.grad` held, and when.

    `before`: before the block's first backward that reached it; `after`: right
    after the last one; `added`: what the backwards since it was last empty
    added; `then`: changes after the last backward (a clip, an unscale, a
    zeroing); `used`: what the last optimizer step used, when `stepped`; `end`:
    when the block ended (`end_read`: large gradients are not read again then).
    `tensor()` is the leaf itself, while it lives.
    """

    name: str
    names: list[str]
    shape: tuple[int, ...] | None
    dtype: str
    device: str
    before: Any
    after: Any
    added: Any
    status: str
    runs: int
    key: int
    then: list[Change] = field(default_factory=list)
    used: Any = None
    stepped: bool = False
    end: Any = None
    added_known: bool = True
    _ref: Any = field(default=None, repr=False)
    end_read: bool = True  # False: a large gradient not read again when the block ended
    trajectory: Trajectory = field(default_factory=Trajectory)  # ‖.grad‖ after each backward

    def tensor(self) -> torch.Tensor | None:
        return self._ref() if self._ref is not None else None

    @classmethod
    def of(cls, r: LeafRecord) -> LeafRow:
        """The row of a leaf's record: the fields they share, its later changes as `then`."""
        shared = {f.name: getattr(r, f.name) for f in fields(cls) if hasattr(r, f.name)}
        return cls(**shared, then=list(r.later), _ref=r.ref)


@dataclass
class GradGraph:
    """One distinct autograd graph of the block, and how often it ran."""

    snapshot: Any
    repeat: int
    kind: str
    leaf_names: dict[int, str]
    leaf_status: dict[int, str]
    max_nodes: int
    depth: int | None
    _digraph: Any = None
    _render: Any = None

    @property
    def digraph(self) -> Any:
        if self._digraph is None:
            from ..graph.draw import to_digraph

            title = "torch.autograd.grad" if self.kind == "grad" else None
            self._digraph = to_digraph(
                self.snapshot,
                leaf_names=self.leaf_names,
                leaf_status=self.leaf_status,
                max_nodes=self.max_nodes,
                depth=self.depth,
                repeat=self.repeat,
                title=title,
            )
        return self._digraph

    def rendered(self) -> Any:
        if self._render is None:
            from ..render import render_svg

            self._render = render_svg(self.digraph.source)
        return self._render


def distinct_graphs(block: BlockRecord) -> list[tuple[Any, int]]:
    """The first record of each graph structure, and how many records share it: a loop's
    steps and `retain_graph` repeats run the same structure, drawn once."""
    found: dict[tuple[str, str], list] = {}
    for record in block.backwards:
        snap = record.graph
        if snap is None or not (snap.nodes or snap.folded):  # a loss with no grad_fn
            continue
        first = snap.repeat_of or snap
        entry = found.setdefault((record.kind, first.structure), [record, 0])
        entry[1] += 1
    return [(record, repeat) for record, repeat in found.values()]


def _terminal_colours() -> bool:
    import os
    import sys

    if os.environ.get("NO_COLOR") or not sys.stdout.isatty():
        return False
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    if shell is None or type(shell).__name__ != "TerminalInteractiveShell":
        return False
    return str(getattr(shell, "colors", "")).lower() not in ("nocolor", "")


def complete_changes(block: BlockRecord) -> None:
    """How far the steps moved each parameter, from its copies before the first step and
    at the end: the difference of a small one, the norms of a large one."""
    with _engine.quiet():
        for steps in block.steps:
            for p in steps.params:
                if p.copies is not None:
                    first, last = p.copies
                    p.copies = None
                    before, after = stats.norms([first, last])
                    p.before = stats.norm_summary(first, before, p.part)
                    p.after = stats.norm_summary(last, after, p.part)
                    if first.shape == last.shape:
                        (p.change,) = stats.norms([last - first])
                    continue
                before, after = p.before, p.after
                small = isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)
                if p.change is None and small and after.shape == before.shape:
                    p.change = after - before


# Graphs shown step by step: a few dozen ops read as a list; more do not.
STEPS_OPS = 60


def _backward_steps(block: BlockRecord, graphs: list[GradGraph]) -> tuple[list, list[str]]:
    """The step-by-step view of each distinct graph small enough, and why others lack one."""
    names = {r.key: r.name for r in block.leaves}
    # Each graph shows its first run: a leaf's gradient was empty then when it was empty
    # before the block's first backward and no graph shown before this one reached it.
    empty = {r.key for r in block.leaves if stats.is_empty(r.before)}
    reached: set[int] = set()
    out, notes = [], []
    for g in graphs:
        snap = g.snapshot
        n_ops = getattr(snap, "n_ops", 0)
        before = set(reached)
        if g.kind == "backward":  # a `torch.autograd.grad` call writes no `.grad`
            reached.update(n.leaf_key for n in snap.nodes if n.leaf_key is not None)
        if n_ops > STEPS_OPS:
            notes.append(
                f"The backward of {n_ops} ops is not shown step by step (at most {STEPS_OPS} ops)."
            )
            continue
        walked = backward_steps(
            snap,
            lambda key: names.get(key, f"leaf #{key}"),
            lambda key, before=before: key in empty and key not in before,
            g.kind,
        )
        if walked is None:
            notes.append(
                f"The backward of {n_ops} ops is not shown step by step: its gradients were "
                "too large to record what flowed."
            )
        else:
            walked.repeat = g.repeat
            out.append(walked)
    return out, notes


@dataclass
class GradReport:
    """What one `%%grad` cell (or `watch()` block) did to the gradients.

    `table` is a pandas DataFrame indexed by leaf name; `backwards` the engine
    calls; `findings` what gradmagic noticed; `graph` the `graphviz.Digraph`
    (a list when the block ran several distinct graphs); `steps` what each
    optimizer's `step()` did (`step_table`); `flow` the gradient-flow chart;
    `block` every fact recorded; `rank` and `world_size` where torch.distributed
    ran with more than one rank.
    """

    rows: list[LeafRow]
    backwards: list[Any]
    findings: list[Finding]
    graphs: list[GradGraph] = field(default_factory=list)
    run: int = 0
    show_table: bool = True
    show_graph: bool = True
    errors: list[str] = field(default_factory=list)
    steps: list[OptimizerSteps] = field(default_factory=list)
    flow: GradientFlow | None = None
    notes: list[str] = field(default_factory=list)
    block: BlockRecord | None = field(default=None, repr=False)
    # What the headline calls the block: "cell run 2" by default; the script runner's
    # "train.py · optimizer step 100".
    label: str | None = None
    # `steps=True`: the backward step by step, one per distinct graph (None: not recorded,
    # `steps_notes` says why).
    backward_steps: list[BackwardSteps] = field(default_factory=list)
    steps_notes: list[str] = field(default_factory=list)

    @classmethod
    def from_block(cls, block: BlockRecord) -> GradReport:
        complete_changes(block)
        with _engine.quiet():
            findings = findings_for(block)
            flow = gradient_flow(block)
        names = {r.key: r.name for r in block.leaves}
        status = {r.key: r.status for r in block.leaves}
        graphs = []
        if block.options.graph:
            graphs = [
                GradGraph(
                    record.graph,
                    repeat,
                    record.kind,
                    names,
                    status,
                    block.options.max_nodes,
                    block.options.depth,
                )
                for record, repeat in distinct_graphs(block)
            ]
        walked, walk_notes = _backward_steps(block, graphs) if block.options.steps else ([], [])
        return cls(
            backward_steps=walked,
            steps_notes=walk_notes,
            rows=[LeafRow.of(r) for r in rows(block)],
            backwards=list(block.backwards),
            findings=findings,
            graphs=graphs,
            run=block.run,
            errors=list(block.internal_errors),
            steps=list(block.steps),
            flow=flow,
            block=block,
        )

    # -- data -------------------------------------------------------------------------------
    @property
    def table(self) -> Any:
        """One row per leaf: shape, dtype, device, before, after, added, status, runs,
        `then` (the changes after the last backward, as text) and `norms`, the norm of
        `.grad` right after each backward that reached it (past `trajectory.MAX_POINTS`
        backwards, the smallest and largest of each bucket: `rep[name].trajectory`)."""
        import pandas as pd

        from .cells import then_text

        data = [
            [
                r.shape,
                r.dtype,
                r.device,
                r.before,
                r.after,
                r.added,
                r.status,
                r.runs,
                "; ".join(then_text(c) for c in r.then),
                r.trajectory.norms(),
            ]
            for r in self.rows
        ]
        frame = pd.DataFrame(data, columns=list(COLUMNS), index=[r.name for r in self.rows])
        frame.index.name = "name"
        return frame

    @property
    def step_table(self) -> Any:
        """One row per parameter an optimizer stepped: the gradient its last step used, the
        parameter before the first step and at the end of the block, and the change."""
        import pandas as pd

        data = [
            [s.name, s.kind, p.steps, p.grad, p.before, p.after, p.change]
            for s in self.steps
            for p in s.params
        ]
        columns = ["optimizer", "kind", "steps", "grad", "before", "after", "change"]
        frame = pd.DataFrame(
            data, columns=columns, index=[p.name for s in self.steps for p in s.params]
        )
        frame.index.name = "name"
        return frame

    @property
    def graph(self) -> Any:
        digraphs = [g.digraph for g in self.graphs]
        if not digraphs:
            return None
        return digraphs[0] if len(digraphs) == 1 else digraphs

    def __getitem__(self, name: str) -> LeafRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"No row named {name!r}; rows are: {', '.join(r.name for r in self.rows)}")

    def why(self, name: str) -> Any:
        """Why the leaf `name` got the gradient it got: the path from the loss to it with the
        lines that made each op, where that path was cut and by what, which op made an
        all-zero gradient zero, where a NaN or Inf came from.

        >>> rep.why("w")  # doctest: +SKIP
        `w` required grad but received none: the path from the loss to it is cut at line 4: ...
        """
        from ..findings.why import UnknownName, explain
        from .why import WhyView

        if not isinstance(name, str):
            raise TypeError(f"why() takes the name of a leaf as a string, not {name!r}.")
        if self.block is None:
            raise ValueError("This report keeps no records to explain.")
        try:
            with _engine.quiet():
                return WhyView(name, explain(self.block, name))
        except UnknownName as exc:
            raise ValueError(str(exc)) from None

    def shown_rows(self) -> tuple[list[LeafRow], int]:
        """The rows to draw (problems first, then table order) and how many were left out."""
        if len(self.rows) <= MAX_SHOWN_ROWS:
            return self.rows, 0
        problems = [r for r in self.rows if r.status in PROBLEM_STATUSES]
        rest = [r for r in self.rows if r.status not in PROBLEM_STATUSES]
        keep = {id(r) for r in (problems + rest)[:MAX_SHOWN_ROWS]}
        shown = [r for r in self.rows if id(r) in keep]
        return shown, len(self.rows) - len(shown)

    def headline(self) -> str:
        n = len(self.backwards)
        kinds = sorted({b.kind for b in self.backwards})
        calls = f"{n} engine call{'s' if n != 1 else ''}" + (f" ({', '.join(kinds)})" if n else "")
        leaves = f"{len(self.rows)} lea{'f' if len(self.rows) == 1 else 'ves'}"
        where = f"rank {self.rank}/{self.world_size} · " if self.rank is not None else ""
        label = self.label or f"cell run {self.run}"
        return f"gradmagic · {where}{label} · {calls} · {leaves}"

    @property
    def rank(self) -> int | None:
        """This process's rank when the block ran under torch.distributed with more than
        one rank; None otherwise."""
        block = self.block
        if block is None or block.rank is None or block.world_size <= 1:
            return None
        return block.rank

    @property
    def world_size(self) -> int:
        return self.block.world_size if self.block is not None else 1

    # -- views ------------------------------------------------------------------------------
    def __repr__(self) -> str:
        from .text import report_text

        # Formatting reads gradmagic's own copies: out of the user's modes and grad mode.
        with _engine.quiet():
            return report_text(self)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """Terminal IPython with its colours on gets a coloured report; elsewhere (Jupyter's
        text fallback, logs) the plain one."""
        from .text import report_text

        with _engine.quiet():
            text = report_text(self, color=_terminal_colours())
        printer.text(text)

    def _repr_html_(self) -> str:
        from .html import report_html

        with _engine.quiet():
            return report_html(self)

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write a standalone HTML page with the findings, table and graphs; return the
        path written. Under torch.distributed with more than one rank, each rank writes
        its own page: `grad.html` becomes `grad.rank1.html` on rank 1."""
        from .html import esc

        if self.rank is not None:
            root, ext = os.path.splitext(os.fspath(path))
            path = f"{root}.rank{self.rank}{ext}"
        where = f"rank {self.rank}/{self.world_size} · " if self.rank is not None else ""
        page = (
            '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
            f"<title>gradmagic report · {where}{esc(self.label or f'run {self.run}')}</title>"
            "</head>"
            f'<body style="margin: 16px;">{self._repr_html_()}</body></html>\n'
        )
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(page)
        return os.fspath(path)
