"""`watch()`: record every call into the autograd engine while active.

Works in a plain script, without IPython::

    with gradmagic.watch() as rec:
        loss = (100 * x).sum()
        loss.backward()
    print(rec.report())

While active, the engine entry point is wrapped (see `_engine.py`). Each
backward is recorded as a `BackwardRecord`; each leaf it reaches gets a
`LeafRecord` holding its `.grad` before the first backward of the block and
after the last. Leaves are held through weak references only; small gradients
are copied, large ones summarised (`stats.py`).
"""

from __future__ import annotations

import re
import sys
import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import _engine, stats
from .graph import FlowRecorder, ModuleSpans, snapshot
from .graph.modules import install_module_hooks
from .history import History, RunEntry, default_history
from .naming import (
    CreatedLeafNames,
    Namer,
    fallback_name,
    may_run_user_code,
    parse_source,
    unique,
)


@dataclass
class Options:
    """What to record and show. The magic's flags map one to one onto these."""

    values: int = stats.DEFAULT_VALUES
    copies: bool = False
    only: re.Pattern[str] | None = None
    graph: bool = True
    max_nodes: int = 60
    depth: int | None = None
    flow_budget: int = 150
    # Findings' thresholds on gradient norms, and the gradient-flow chart (None: automatic).
    vanish: float = 1e-8
    explode: float = 1e4
    ratio: float = 1e4
    plot: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.values, bool) or not isinstance(self.values, int) or self.values < 0:
            raise ValueError(f"values must be a whole number >= 0, not {self.values!r}.")
        if isinstance(self.only, str):
            try:
                self.only = re.compile(self.only)
            except re.error as exc:
                raise ValueError(
                    f"only={self.only!r} is not a valid regular expression: {exc}."
                ) from None

    def keeps_values(self, t: torch.Tensor) -> bool:
        return self.copies or t.numel() <= self.values


@dataclass(slots=True)
class BackwardRecord:
    """One call into the autograd engine made while watching."""

    kind: str  # "backward" or "grad"
    roots: list[str]
    gradient: list[Any] | None  # the `gradient=` argument: copies or summaries
    retain_graph: bool
    create_graph: bool
    inputs: list[str] | None
    leaf_keys: list[int] = field(default_factory=list)
    error: str | None = None
    results: list[Any] | None = None  # what torch.autograd.grad returned
    # graph.GraphSnapshot when recorded; a repeat of a graph recorded earlier in the block
    # is folded (no nodes) and points to it through `graph.repeat_of`.
    graph: Any = None
    _root_refs: list[Any] = field(default_factory=list, repr=False)

    def __repr__(self) -> str:
        extra = f", gradient={self.gradient}" if self.gradient is not None else ""
        return f"BackwardRecord(kind={self.kind!r}, roots={self.roots}{extra})"


@dataclass(slots=True)
class LeafRecord:
    """One leaf tensor a backward reached (or that should have got a gradient)."""

    key: int
    ref: Any  # weakref.ref to the leaf
    shape: tuple[int, ...]
    dtype: str
    device: str
    numel: int
    local_name: str | None = None  # from the frame of a helper that made it
    consumer: str | None = None
    before: Any = None
    before_stale: bool = False
    runs_before: int = 0
    before_copy: torch.Tensor | None = None
    after: Any = None
    after_ref: Any = None
    after_version: int = -1
    after_nonfinite: bool | None = None  # known when `after` is a copy
    backwards: int = 0  # accumulating backwards that reached it
    grad_calls: int = 0
    accumulated_in_block: bool = False
    expected: bool = False
    # filled when the block closes
    name: str = ""
    names: list[str] = field(default_factory=list)
    added: Any = None
    status: str = ""
    runs: int = 0
    order: int = 0


def _value_or_summary(t: torch.Tensor | None, options: Options) -> Any:
    if t is None:
        return None
    if options.keeps_values(t):
        return stats.exact_copy(t)
    return stats.summaries([t])[0]


def _for_history(values: list[Any]) -> dict[int, Any]:
    """Summaries, by id, of the large tensors among `values`, each summarised once.

    History keeps exact values of small tensors only, so `--copies` does not
    pile up a full copy per run.
    """
    large = {
        id(v): v for v in values if isinstance(v, torch.Tensor) and v.numel() > stats.DEFAULT_VALUES
    }
    return dict(zip(large, stats.summaries(list(large.values()))))


def _is_nonfinite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return stats.has_nonfinite(value)
    if isinstance(value, stats.TensorSummary):
        return value.nonfinite
    return False


def _is_zero(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return stats.is_all_zero(value)
    if isinstance(value, stats.TensorSummary):
        return value.is_zero
    return value is None


class Recorder:
    """Records the engine calls of one watched block. Use `watch()` to get one."""

    def __init__(
        self,
        namespace: Mapping[str, Any] | None = None,
        source: str | None = None,
        history: History | None = None,
        options: Options | None = None,
    ) -> None:
        self.namespace = namespace
        self.source = source
        self.history = history if history is not None else default_history
        self.options = options or Options()
        self.records: list[BackwardRecord] = []
        self.leaves: list[LeafRecord] = []
        self.internal_errors: list[str] = []
        self.nonleaf_grad_reads: list[str] = []
        self.optimizer_steps: list[Any] = []
        self.grad_mode = "enabled"  # or "no_grad", "inference_mode" when the block began
        self.run_number = 0
        self.closed = False
        # id(leaf) -> its record; an entry counts only while `rec.ref()` is that leaf.
        self._by_leaf: dict[int, LeafRecord] = {}
        self._thread = threading.get_ident()
        self._depth = 0
        self._report = None
        self.created_names = CreatedLeafNames(
            on_name=self._named_in_frame, enabled=may_run_user_code(namespace, source)
        )
        self.module_spans: Any = None
        if self.options.graph:
            self.module_spans = ModuleSpans()
        self.module_calls = ModuleCalls(self.created_names, self.module_spans)
        # Probes watch the block alongside the engine wrapper; each is a context
        # manager that must undo everything it installed in __exit__.
        if not EXTRA_PROBES:
            from . import probes  # noqa: F401 - registers its probes in EXTRA_PROBES

        # The naming hook goes on last and comes off first: it would see every call
        # the other probes make while they install and remove themselves.
        self.probes: list[Any] = [self.module_calls]
        self.probes += [make(self) for make in EXTRA_PROBES]
        self.probes.append(self.created_names)
        self._pending: list[tuple[torch.Tensor, LeafRecord]] = []
        self._adds_to_earlier: list[LeafRecord] = []
        # Graphs recorded so far, by (kind, structure); the block's first one is keyed
        # only if a second backward comes, so a one-step cell never hashes its graph.
        self._firsts: dict[tuple[str, str], Any] = {}
        self._unkeyed: BackwardRecord | None = None
        self._retained = False  # some backward kept its graph (`retain_graph=True`)
        self.findings: list[Any] = []
        self.namer: Namer | None = None  # built once when the block closes

    # -- the engine wrapper's handler -------------------------------------------
    def handle(self, original: Any, args: tuple, kwargs: dict, frame: Any) -> Any:
        __tracebackhide__ = True  # IPython leaves gradmagic's frames out of tracebacks
        if self.closed or self._depth or threading.get_ident() != self._thread:
            return original(*args, **kwargs)
        naming, key = self.created_names, object()
        naming.hold(key)  # first: the hook would see every call made here
        try:
            call = _engine.parse_call(args, kwargs)
            if _engine.should_skip(call):
                return original(*args, **kwargs)
            self._depth += 1
            try:
                return self._record_call(original, args, kwargs, call, frame)
            finally:
                self._depth -= 1
        finally:
            naming.release(key)

    def _record_call(
        self, original: Any, args: tuple, kwargs: dict, call: _engine.EngineCall, frame: Any
    ) -> Any:
        __tracebackhide__ = True
        record, flow = self._begin_safely(call, frame)
        try:
            with flow:
                result = original(*args, **kwargs)
        except BaseException as exc:
            if record is not None:
                record.error = f"{type(exc).__name__}: {exc}"
            raise
        if record is not None:
            self._guard(self._end, record, call, result)
        return result

    def _guard(self, fn: Any, *args: Any) -> Any:
        """Run bookkeeping so that a fault in gradmagic never breaks the user's backward."""
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - reported in the report, not raised
            self.internal_errors.append(f"{fn.__name__}: {type(exc).__name__}: {exc}")
            return None

    def _begin_safely(self, call: _engine.EngineCall, frame: Any) -> tuple[Any, Any]:
        out = self._guard(self._begin, call, frame)
        return out if out is not None else (None, nullcontext())

    # -- before the engine runs -------------------------------------------------
    def _begin(self, call: _engine.EngineCall, frame: Any) -> tuple[BackwardRecord, Any]:
        _engine.caller_context(call, frame)
        roots = [t for t in call.outputs if isinstance(t, torch.Tensor)]
        found: list[tuple[torch.Tensor, LeafRecord]] = []

        def leaf_key(leaf: torch.Tensor) -> int:
            rec = self._leaf_record(leaf)
            found.append((leaf, rec))
            return rec.key

        # One walk finds the leaves and, when drawn, records the graph. It must be
        # the graph module's: it guards against a torch 2.13 crash on deep graphs.
        snap, live = snapshot(
            call.outputs,
            leaf_key=leaf_key,
            inputs=call.inputs or None,
            light=not self.options.graph,
        )
        for edge in snap.edges:
            src, dst = snap.nodes[edge.src], snap.nodes[edge.dst]
            if src.kind == "leaf" and src.leaf_key is not None:
                rec = self.leaves[src.leaf_key]
                rec.consumer = rec.consumer or dst.op
        if call.inputs:
            pairs = [(t, self._leaf_record(t)) for t in call.inputs if isinstance(t, torch.Tensor)]
        else:
            pairs = found
        if self.created_names.enabled:
            for root in roots:
                self.created_names.want(root)
        records = [rec for _, rec in pairs]
        # Decided now, before the engine adds to `.grad`; applied only if it succeeds.
        self._adds_to_earlier = (
            [rec for leaf, rec in pairs if self._adds_to_earlier_backward(leaf, rec)]
            if call.accumulate_grad
            else []
        )
        record = BackwardRecord(
            kind=call.kind,
            roots=["" for _ in roots],
            gradient=self._gradient_argument(call.user_gradient),
            retain_graph=call.retain_graph,
            create_graph=call.create_graph,
            inputs=["" for _ in records] if call.inputs else None,
            leaf_keys=[rec.key for rec in records],
            _root_refs=[weakref.ref(t) for t in roots],
        )
        self.records.append(record)
        self._pending = pairs if call.accumulate_grad else []
        if not self.options.graph:
            return record, nullcontext()
        record.graph = snap
        flow = FlowRecorder(snap, live, budget=self.options.flow_budget, values=self.options.values)
        return record, flow

    def recorded_grad(self, leaf: torch.Tensor) -> Any:
        """What the last backward recorded of `leaf.grad`, if that gradient is still current."""
        rec = self._record_of(leaf)
        grad = leaf.grad
        if rec is None or grad is None or rec.after_ref is None or rec.after_ref() is not grad:
            return None
        return rec.after if grad._version == rec.after_version else None

    def _named_in_frame(self, tensor: torch.Tensor, name: str) -> None:
        rec = self._record_of(tensor)
        if rec is not None and rec.local_name is None:
            rec.local_name = name

    def _record_of(self, leaf: torch.Tensor) -> LeafRecord | None:
        rec = self._by_leaf.get(id(leaf))
        return rec if rec is not None and rec.ref() is leaf else None

    def _leaf_record(self, leaf: torch.Tensor) -> LeafRecord:
        rec = self._by_leaf.get(id(leaf))
        if rec is None or rec.ref() is not leaf:
            rec = self._register(leaf)
        return rec

    def _register(self, leaf: torch.Tensor) -> LeafRecord:
        rec = LeafRecord(
            key=len(self.leaves),
            ref=weakref.ref(leaf),
            shape=tuple(leaf.shape),
            dtype=stats.dtype_name(leaf.dtype),
            device=stats.device_name(leaf),
            numel=leaf.numel(),
            local_name=self.created_names.get(leaf) if self.created_names.enabled else None,
        )
        grad = leaf.grad
        rec.before = _value_or_summary(grad, self.options)
        if grad is not None and not _is_zero(rec.before):
            item = self.history.get(leaf)
            rec.before_stale = True
            rec.runs_before = item.runs if item and item.grad_ref and item.grad_ref() is grad else 1
            if not isinstance(rec.before, torch.Tensor):
                # A transient copy, to say exactly what this block added.
                rec.before_copy = stats.exact_copy(grad)
        self.leaves.append(rec)
        self._by_leaf[id(leaf)] = rec
        return rec

    def _adds_to_earlier_backward(self, leaf: torch.Tensor, rec: LeafRecord) -> bool:
        """Whether this backward will add to what an earlier backward of the block left."""
        grad = leaf.grad
        if grad is None or rec.backwards == 0:
            return False
        untouched = rec.after_ref is not None and rec.after_ref() is grad
        return (untouched and grad._version == rec.after_version) or not stats.is_all_zero(grad)

    def _gradient_argument(self, gradient: Any) -> list[Any] | None:
        if gradient is None:
            return None
        items = gradient if isinstance(gradient, (tuple, list)) else (gradient,)
        return [
            _value_or_summary(g, self.options) if isinstance(g, torch.Tensor) else g for g in items
        ]

    # -- after the engine ran ---------------------------------------------------
    def _end(self, record: BackwardRecord, call: _engine.EngineCall, result: Any) -> None:
        self._fold_repeat(record)
        if record.kind == "grad":
            for key in record.leaf_keys:
                self.leaves[key].grad_calls += 1
            outs = result if isinstance(result, (tuple, list)) else (result,)
            record.results = [
                _value_or_summary(r, self.options) if isinstance(r, torch.Tensor) else None
                for r in outs
            ]
            return
        pending, self._pending = self._pending, []
        for rec in self._adds_to_earlier:
            rec.accumulated_in_block = True
        small, large = [], []
        for leaf, rec in pending:
            rec.backwards += 1
            grad = leaf.grad
            rec.after_ref = weakref.ref(grad) if grad is not None else None
            rec.after_version = grad._version if grad is not None else -1
            rec.after_nonfinite = None
            if grad is None:
                rec.after = None
            elif self.options.keeps_values(grad):
                small.append((rec, grad))
            else:
                large.append((rec, grad))
        # Small gradients are copied (whether a copy is finite is read when the block
        # closes, for all at once); large ones get one batched norm, taken now: a clip or
        # zero_grad() may change them before the block ends. Full statistics come when a
        # report is built, if the gradient is still the one this backward left.
        for (rec, _), copy in zip(small, stats.exact_copies([g for _, g in small])):
            rec.after = copy
        for (rec, grad), norm in zip(large, stats.norms([g for _, g in large])):
            rec.after = stats.norm_summary(grad, norm)

    def _fold_repeat(self, record: BackwardRecord) -> None:
        """Fold the graph of a backward that repeats one recorded earlier in the block:
        a training loop keeps one snapshot per structure, not one per step. A repeat
        whose gradients went non-finite is kept, for the op that made them."""
        snap = record.graph
        if snap is None:
            return
        self._retained = self._retained or record.retain_graph
        if not self._firsts and self._unkeyed is None:
            self._unkeyed = record  # the block's first graph: keyed if another comes
            return
        if self._unkeyed is not None:
            first, self._unkeyed = self._unkeyed, None
            self._firsts[(first.kind, first.graph.structure)] = first.graph
        key = (record.kind, snap.structure)
        first = self._firsts.setdefault(key, snap)
        if first is snap:
            return
        if snap.flow_nonfinite_nodes:
            snap.repeat_of = first
        else:
            snap.fold(first, keep_signature=self._retained)

    # -- closing ----------------------------------------------------------------
    def close(self) -> None:
        """Finish the records: names, full summaries, statuses, history."""
        if self.closed:
            return
        self.closed = True
        # The probes, the naming hook among them, have exited: nothing to pause here.
        self._guard(self._finish)
        for probe in self.probes:
            if hasattr(probe, "finish"):
                self._guard(probe.finish, self)
        # The probes and the naming hook point back to the recorder. Dropping them ends
        # the only reference cycles a block builds, so the recorder and what it holds go
        # as soon as the last reference does, not at the next cyclic collection.
        self.probes = []
        self.created_names.on_name = None
        # A recorder kept in a script's `rec` must not keep the user's tensors alive:
        # what the rules read later (modules, optimizers, tensors) is held weakly.
        if self.namespace is not None:
            self.namespace = WeakNamespace(self.namespace)
            if self.namer is not None:
                self.namer.rebind(self.namespace)

    def _finish(self) -> None:
        namer = self.namer = Namer(self.namespace)
        self._add_expected(namer)
        self._complete_added()
        self._check_finite_copies()
        for rec in self.leaves:
            self._settle(rec)
        self._name_leaves(namer)
        for record in self.records:
            for i, ref in enumerate(record._root_refs):
                t = ref()
                if t is not None:
                    record.roots[i] = namer.name(t) or self.created_names.get(t) or ""
            if record.inputs is not None:
                record.inputs = [self.leaves[k].name for k in record.leaf_keys]
            if record.graph is not None:
                self._name_graph(record, namer)
            record._root_refs = []
        run = self.history.new_run() if self.leaves else self.history.cell_runs
        self.run_number = run
        kept = [(rec, leaf) for rec in self.leaves if (leaf := rec.ref()) is not None]
        kept = [(rec, leaf) for rec, leaf in kept if rec.status != "unchanged"]
        for_history = _for_history(
            [v for rec, _ in kept for v in (rec.before, rec.after, rec.added)]
        )
        for rec, leaf in kept:
            values = [for_history.get(id(v), v) for v in (rec.before, rec.after, rec.added)]
            self.history.record(leaf, RunEntry(run, *values, rec.status, rec.runs))
        for rec in self.leaves:
            rec.before_copy = None

    def _name_graph(self, record: BackwardRecord, namer: Namer) -> None:
        """Put root names (`loss`) on the graph snapshot."""
        snap = record.graph
        if len(snap.roots) == len(record.roots):
            for nid, name in zip(snap.roots, record.roots):
                if name and not snap.nodes[nid].root_name:
                    snap.nodes[nid].root_name = name

    def _assign_modules(self) -> None:
        """Which module call made each op: for the drawing, so done when a report is built."""
        spans, self.module_spans = self.module_spans, None
        if spans is None or self.namer is None:
            return
        drawn = [record.graph for record, _ in self.distinct_graphs()]
        spans.assign(drawn, module_name=self.namer.module_name)

    def distinct_graphs(self) -> list[tuple[BackwardRecord, int]]:
        """The first record of each graph structure, and how many records share it.

        A loop's steps and `retain_graph` repeats run the same structure: it is
        drawn once.
        """
        found: dict[tuple[str, str], list] = {}
        for record in self.records:
            snap = record.graph
            if snap is None or not (snap.nodes or snap.folded):  # a loss with no grad_fn
                continue
            # A repeat folded in the block counts with the graph it repeats, which came first.
            first = snap.repeat_of or snap
            entry = found.setdefault((record.kind, first.structure), [record, 0])
            entry[1] += 1
        return [(record, repeat) for record, repeat in found.values()]

    def _live_grads(self, wanted: Any) -> list[tuple[LeafRecord, torch.Tensor]]:
        """(record, grad) for norm-only summaries whose gradient is still what backward left."""
        out = []
        for rec in self.leaves:
            if not isinstance(rec.after, stats.TensorSummary) or rec.after.mean is not None:
                continue
            if not wanted(rec):
                continue
            grad = rec.after_ref() if rec.after_ref else None
            if grad is not None and grad._version == rec.after_version:
                out.append((rec, grad))
        return out

    def _complete_added(self) -> None:
        """What the block added to large gradients that were not zeroed (needs the copy)."""
        todo = self._live_grads(lambda rec: rec.before_copy is not None or rec.after.nonfinite)
        for (rec, _), summary in zip(todo, stats.summaries([g for _, g in todo])):
            rec.after = summary
        diffs = [
            (rec, grad.detach() - rec.before_copy)
            for rec, grad in todo
            if rec.before_copy is not None and rec.before_copy.shape == grad.shape
        ]
        for (rec, _), summary in zip(diffs, stats.summaries([d for _, d in diffs])):
            rec.added = summary

    def complete_summaries(self) -> None:
        """Full statistics of large gradients, computed only when a report is built.

        During the block only a batched norm is taken, so watching costs little;
        the rest is read here if the gradient is still the one backward left.
        """
        todo = self._live_grads(lambda rec: True)
        for (rec, _), summary in zip(todo, stats.summaries([g for _, g in todo])):
            if rec.added is rec.after:
                rec.added = summary
            rec.after = summary

    def _check_finite_copies(self) -> None:
        """Whether each copied gradient is finite, checked once for the block."""
        todo = [
            rec
            for rec in self.leaves
            if rec.after_nonfinite is None and isinstance(rec.after, torch.Tensor)
        ]
        for rec, finite in zip(todo, stats.all_finite([rec.after for rec in todo])):
            rec.after_nonfinite = not finite

    def _settle(self, rec: LeafRecord) -> None:
        """Decide what this block added and the status word."""
        if rec.added is None:
            rec.added = self._added(rec)
        if rec.backwards == 0:
            rec.after = rec.before
            rec.status = "none" if rec.expected else "unchanged"
            item = self.history.get(rec.ref()) if rec.ref() is not None else None
            rec.runs = item.runs if (item and rec.status == "unchanged") else 0
            return
        if rec.after is None:
            rec.status, rec.runs = "none", 0
            return
        accumulated = rec.before_stale or rec.accumulated_in_block
        if rec.after_nonfinite if rec.after_nonfinite is not None else _is_nonfinite(rec.after):
            rec.status = "nan/inf"
        elif accumulated:
            rec.status = "accumulated"
        else:
            rec.status = "new"
        rec.runs = rec.runs_before + 1 if rec.before_stale else 1

    def _added(self, rec: LeafRecord) -> Any:
        if rec.backwards == 0 or rec.after is None:
            return None
        if isinstance(rec.after, torch.Tensor):
            if isinstance(rec.before, torch.Tensor) and rec.before.shape == rec.after.shape:
                return rec.after - rec.before
            return rec.after
        if rec.before is None:
            return rec.after
        return None

    def _name_leaves(self, namer: Namer) -> None:
        for rec in self.leaves:
            leaf = rec.ref()
            names = namer.names(leaf) if leaf is not None else []
            local = rec.local_name or (self.created_names.get(leaf) if leaf is not None else None)
            if local and local not in names:
                names.append(local)
            rec.names = names
            rec.name = names[0] if names else fallback_name(rec.key, rec.consumer)
            position = namer.order(leaf) if leaf is not None else None
            rec.order = position if position is not None else 1_000_000 + rec.key
        for rec, name in zip(self.leaves, unique(rec.name for rec in self.leaves)):
            rec.name = name

    def _add_expected(self, namer: Namer) -> None:
        """Leaves that should have got a gradient and did not (status `none`)."""
        if not self.namespace or not any(r.kind == "backward" for r in self.records):
            return
        named = _names_in_source(self.source)
        reached = {id(rec.ref()) for rec in self.leaves if rec.backwards and rec.ref() is not None}
        candidates: list[torch.Tensor] = []
        for name in named:
            value = self.namespace.get(name)
            if isinstance(value, torch.Tensor) and value.requires_grad and value.is_leaf:
                candidates.append(value)
        # The namer walked every module already: its parameter ids say which modules got
        # a gradient for some parameters and not others, and only those are walked again.
        for name, ids in namer.module_parameters().items():
            if reached.issuperset(ids):
                continue  # every parameter got its gradient: nothing expected is missing
            module = self.namespace.get(name)
            if not isinstance(module, nn.Module):
                continue
            ran_here = name in named and module in self.module_calls
            if ran_here or not reached.isdisjoint(ids):
                _, params = _engine.module_tree(module)
                candidates.extend(p for _, p in params if p.requires_grad)
        for leaf in candidates:
            if id(leaf) in reached:
                continue
            rec = self._leaf_record(leaf)
            rec.expected = True

    def report(self) -> Any:
        """The `GradReport` of this block (built once, after it closed)."""
        if self._report is None:
            from .diagnostics import findings_for
            from .report import GradReport

            self.close()
            self._guard(self.complete_summaries)
            self._guard(self._assign_modules)
            if self.optimizer_steps:
                from .probes import complete_steps

                self._guard(complete_steps, self.optimizer_steps)
            self.findings = self._guard(findings_for, self) or []
            # The namespace holds the user's tensors: a recorder kept around must not.
            self.namespace = None
            self._report = GradReport.from_recorder(self)
        return self._report

    def rows(self) -> list[LeafRecord]:
        """Leaf rows in table order, filtered by `only`."""
        rows = [rec for rec in self.leaves if rec.backwards or rec.grad_calls or rec.expected]
        rows.sort(key=lambda rec: rec.order)
        if self.options.only is not None:
            rows = [rec for rec in rows if self.options.only.search(rec.name)]
        return rows


def _names_in_source(source: str | None) -> frozenset[str]:
    """Top-level names the code mentions (`x`, `model`), for 'expected a gradient'."""
    if not source:
        return frozenset()
    parsed = parse_source(source)
    if parsed is None:
        return frozenset(re.findall(r"[A-Za-z_]\w*", source))
    return parsed.names


class WeakNamespace(Mapping):
    """The modules, optimizers and tensors of a namespace, through weak references."""

    def __init__(self, namespace: Mapping[str, Any]) -> None:
        kinds = (torch.Tensor, nn.Module, torch.optim.Optimizer)
        self._refs = {
            key: weakref.ref(value)
            for key, value in list(namespace.items())
            if isinstance(key, str) and isinstance(value, kinds)
        }

    def __getitem__(self, key: str) -> Any:
        value = self._refs[key]()
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return (key for key, ref in list(self._refs.items()) if ref() is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class ModuleCalls:
    """The block's one pair of global `nn.Module` hooks.

    Notes which modules ran a forward with grad enabled (weakly held), feeds
    module calls to `spans` (a `graph.ModuleSpans`, when a graph is drawn) and
    holds the `naming` hook off inside module calls: library code, where it
    would only cost time.
    """

    def __init__(self, naming: CreatedLeafNames, spans: Any = None) -> None:
        # id(module) -> weak reference, for modules called with grad enabled. A plain
        # reference, not a WeakIdMap entry: this runs on every module call, and an entry
        # whose module died is simply never matched again.
        self._called: dict[int, weakref.ref] = {}
        self._handles: list[Any] = []
        self._open: list[nn.Module] = []  # calls in progress, outermost first
        self._spans = spans
        self._naming = naming
        self._thread = threading.get_ident()

    # Both hooks return at once under torch.compile tracing, so Dynamo never meets their
    # untraceable calls (a graph break and a warning for the user otherwise), and on
    # other threads.
    def _enter(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling() or threading.get_ident() != self._thread:
            return
        if not self._open:
            self._naming.hold(self)
        self._open.append(module)
        if self._spans is not None:
            self._spans.enter(module)

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling() or threading.get_ident() != self._thread:
            return
        if torch.is_grad_enabled() and module not in self:
            self._called[id(module)] = weakref.ref(module)
        opened = self._open
        if opened and opened[-1] is module:
            opened.pop()
        else:
            for k in range(len(opened) - 1, -1, -1):
                if opened[k] is module:
                    del opened[k:]  # inner calls that never closed end here too
                    break
        if self._spans is not None:
            self._spans.exit(module)
        if not opened:
            self._naming.release(self)
        # None: a forward hook that returns something replaces the output

    def __contains__(self, module: object) -> bool:
        ref = self._called.get(id(module))
        return ref is not None and ref() is module

    def __enter__(self) -> ModuleCalls:
        self._thread = threading.get_ident()
        self._handles = install_module_hooks(self._enter, self._exit)
        return self

    def __exit__(self, *exc: Any) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()
        self._open.clear()
        if self._spans is not None:
            self._spans.close()
        self._naming.release(self)


# Factories `recorder -> probe` that other modules add (optimizer steps, warnings).
EXTRA_PROBES: list[Any] = []

_active: list[Recorder] = []


def _dispatch(original: Any, args: tuple, kwargs: dict, frame: Any) -> Any:
    """The engine wrapper's single handler: the innermost active recorder records."""
    __tracebackhide__ = True
    recorder = _active[-1] if _active else None
    if recorder is None:
        return original(*args, **kwargs)
    return recorder.handle(original, args, kwargs, frame)


@contextmanager
def watch(
    namespace: Mapping[str, Any] | None = None,
    *,
    source: str | None = None,
    history: History | None = None,
    values: int = stats.DEFAULT_VALUES,
    copies: bool = False,
    only: str | None = None,
    graph: bool = True,
    max_nodes: int = 60,
    depth: int | None = None,
    vanish: float = 1e-8,
    explode: float = 1e4,
    ratio: float = 1e4,
    plot: bool | None = None,
) -> Iterator[Recorder]:
    """Record every backward made inside the block.

    `namespace` names the leaves (defaults to the caller's globals and locals);
    `source` is the code of the block, used to tell which leaves were expected
    to get a gradient. The engine is restored when the block exits, also when
    it raises. `vanish`, `explode` and `ratio` are the gradient-norm thresholds
    of the findings; `plot` turns the gradient-flow chart on or off (None: on
    from 8 leaves).

    >>> x = torch.tensor([1., 2.], requires_grad=True)
    >>> with watch() as rec:
    ...     (100 * x).sum().backward()
    >>> rec.report().table.loc["x", "after"]
    tensor([100., 100.])
    """
    caller = sys._getframe(2) if namespace is None else None
    options = Options(
        values,
        copies,
        only,
        graph,
        max_nodes,
        depth,
        vanish=vanish,
        explode=explode,
        ratio=ratio,
        plot=plot,
    )
    recorder = Recorder(namespace, source, history, options)
    entered: list[Any] = []
    _engine.install(_dispatch)  # reference counted: undone once in `finally`
    try:
        _active.append(recorder)
        for probe in recorder.probes:
            probe.__enter__()
            entered.append(probe)
        yield recorder
    finally:
        for probe in reversed(entered):
            recorder._guard(probe.__exit__, None, None, None)
        if recorder in _active:
            _active.remove(recorder)
        _engine.uninstall()
        if caller is not None:
            # Read the caller's variables now: the block may have created them.
            recorder.namespace = {**caller.f_globals, **caller.f_locals}
            del caller
        recorder.close()
