"""`Recorder`: the facts of one watched block, taken as they happen.

At each call into the autograd engine it walks the graph, reads every reached
leaf's `.grad` before and after (by content: `stats.read_values`), and hooks
small graphs to see what flowed. The probes add optimizer steps, edit calls
(clipping, a GradScaler's work), warnings and module calls. `close()` reads
every gradient once more and writes the `BlockRecord` (`finish.py`).

Every hook gradmagic installs catches its own errors: they are recorded and
shown as one quiet line of the report, never raised into the user's code.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any

import torch

from .. import _engine, stats
from ..graph.modules import ModuleSpans
from ..graph.snapshot import snapshot
from ..history import History, default_history
from ..options import Options
from ..records import BackwardRecord, BlockRecord, Change, LeafRecord
from .custom import CustomFunctionCall, custom_functions, function_name
from .ddp import reduced_parameters, writes_unreached
from .flow import FlowRecorder, RepeatFolder, unhooked_leaves
from .holds import Holds
from .leaves import Edit, LeafTrack
from .lines import DEFAULT_BUDGET, SourceLines
from .modules import ModuleCalls
from .names import CreatedLeafNames, may_run_user_code

FORWARD_CHECK_NUMEL = 1 << 20  # larger outputs are not checked for NaN/Inf in the forward

# The recorders of the blocks running now, innermost last: the engine wrapper and the
# edit wrappers hand each call to the innermost one.
ACTIVE: list[Recorder] = []

# Set by the report layer (`gradmagic/__init__.py`): block record -> GradReport.
REPORT_BUILDER: list[Callable[[BlockRecord], Any]] = []


class Recorder:
    """Records the engine calls of one watched block. Use `watch()` to get one."""

    def __init__(
        self,
        namespace: Mapping[str, Any] | None = None,
        source: str | None = None,
        history: History | None = None,
        options: Options | None = None,
    ) -> None:
        from .probes import GradModeProbe, OptimizerStepProbe, WarningProbe

        self.namespace = namespace
        self.source = source
        self.history = history if history is not None else default_history
        self.options = options or Options()
        self.records: list[BackwardRecord] = []
        self.leaves: list[LeafRecord] = []
        self.internal_errors: list[str] = []
        self.unobserved: Counter[str] = Counter()
        self.edits: list[Edit] = []
        self.block: BlockRecord | None = None
        self.closed = False
        self._tracks: dict[int, LeafTrack] = {}  # id(leaf) -> its track, while `ref()` is it
        self._attributions: list[tuple[Change, list[Edit]]] = []
        self._clock = 0
        self._thread = threading.get_ident()
        self._depth = 0
        self._running: tuple[BackwardRecord, list] | None = None  # the backward in progress
        self._pending: list[tuple[torch.Tensor, LeafTrack]] = []
        self._scaled: dict[int, tuple[weakref.ref, float]] = {}  # id(loss) -> GradScaler scale
        # id(FSDP2 unsharded parameter) -> (it, its sharded parameter), weakly: for names
        self._unsharded: dict[int, tuple[weakref.ref, weakref.ref]] = {}
        self.scaler_stepping = 0  # inside `GradScaler.step`
        self._flow: tuple[FlowRecorder, dict[int, LeafTrack]] | None = None
        self._report = None
        self.created_names = CreatedLeafNames(
            on_name=self._named_in_frame,
            enabled=may_run_user_code(namespace, source),
            errors=self.internal_errors,
        )
        lines = self.options.lines
        self.lines = SourceLines(
            enabled=lines is not False,
            budget=None if lines is True else DEFAULT_BUDGET,
            source=source,
            errors=self.internal_errors,
        )
        self.holds = Holds(self.created_names, self.lines)
        self.module_spans = ModuleSpans() if self.options.graph else None
        self.module_name: Callable[[Any], str | None] | None = None  # set when the block closes
        self.module_calls = ModuleCalls(self.holds, self.module_spans, self.internal_errors)
        self.steps = OptimizerStepProbe(self)
        self.warnings = WarningProbe(self.internal_errors)
        self.grad_mode = GradModeProbe()
        # The naming hook and the line trace go on last and come off first: they would see
        # every call the other probes make while they install and remove themselves.
        self.probes: list[Any] = [
            self.module_calls,
            self.steps,
            self.warnings,
            self.grad_mode,
            self.created_names,
            self.lines,
        ]
        self._repeats = RepeatFolder()
        # The custom autograd Functions the graphs ran, for `check=True`: classes and shapes.
        self.custom_functions: list[CustomFunctionCall] = []

    # -- bookkeeping ---------------------------------------------------------------------------
    def guard(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run bookkeeping so that a fault in gradmagic never reaches the user's code."""
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - shown in the report, not raised
            self.internal_errors.append(f"{fn.__name__}: {type(exc).__name__}: {exc}")
            return None

    def tick(self) -> int:
        self._clock += 1
        return self._clock

    def edits_since(self, clock: int) -> list[Edit]:
        return [e for e in self.edits if e.clock > clock]

    def read(self, tensors: list[torch.Tensor | None], copies: bool | None = None) -> list[Any]:
        """The values of `tensors` now (see `stats.read_values`). Callers hold `quiet()`.

        `copies=True` (the option) copies gradients right after a backward; other readings
        (before a step, at the end) copy only small ones, and a content that did not change
        keeps the copy already made (`LeafTrack._reading`).
        """
        if not any(t is not None for t in tensors):
            return [None] * len(tensors)
        copies = self.options.copies if copies is None else copies
        return stats.read_values(tensors, self.options.values, copies)

    def track(self, leaf: torch.Tensor) -> LeafTrack:
        track = self._tracks.get(id(leaf))
        if track is None or track.record.ref() is not leaf:
            track = self._register(leaf)
        return track

    def tracked(self, leaf: torch.Tensor) -> LeafTrack | None:
        track = self._tracks.get(id(leaf))
        return track if track is not None and track.record.ref() is leaf else None

    def _register(self, leaf: torch.Tensor) -> LeafTrack:
        record = LeafRecord(
            key=len(self.leaves),
            ref=weakref.ref(leaf),
            shape=stats.shape_of(leaf),
            dtype=stats.dtype_name(leaf.dtype),
            device=stats.device_name(leaf),
            numel=stats.numel_of(leaf),
        )
        if self.created_names.enabled:
            local = self.created_names.get(leaf)  # a helper's frame named it as it returned
            if local:
                record.names = [local]
        self.leaves.append(record)
        track = LeafTrack(record, self._attributions)
        track.leaf_id = id(leaf)
        self._tracks[id(leaf)] = track
        return track

    def _leaf_key(self, leaf: torch.Tensor) -> int | None:
        track = self.tracked(leaf)
        return track.record.key if track is not None else None

    def _named_in_frame(self, tensor: torch.Tensor, name: str) -> None:
        track = self.tracked(tensor)
        if track is not None and not track.record.names:
            track.record.names = [name]

    # -- the engine wrapper's handler ----------------------------------------------------------
    def handle(self, original: Any, args: tuple, kwargs: dict, frame: Any) -> Any:
        __tracebackhide__ = True  # IPython leaves gradmagic's frames out of tracebacks
        if self.closed:
            return original(*args, **kwargs)
        nested = self._running is not None and _engine.in_backward()
        if not nested and (self._depth or threading.get_ident() != self._thread):
            return original(*args, **kwargs)
        naming, key = self.holds, object()
        naming.hold(key)  # first: the hook would see every call made here
        try:
            call = _engine.parse_call(args, kwargs)
            reason = self.guard(_engine.skip_reason, call)
            if reason is not None:
                if reason:
                    self.unobserved[reason] += 1
                return original(*args, **kwargs)
            if nested:
                return self._nested(original, args, kwargs, call)
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
        begun = self.guard(self._begin, call, frame)
        record, flow = begun if begun is not None else (None, nullcontext())
        self._running = (record, self._pending) if record is not None else None
        try:
            with flow:
                result = original(*args, **kwargs)
        except BaseException as exc:
            self._running = None
            if record is not None:
                record.error = f"{type(exc).__name__}: {exc}"
                self.guard(self._end, record, None, False)
            raise
        self._running = None
        if record is not None:
            self.guard(self._end, record, result, True)
        return result

    def _nested(self, original: Any, args: tuple, kwargs: dict, call: _engine.EngineCall) -> Any:
        """A backward inside the one being recorded (a reentrant checkpoint recomputes its
        segment and runs a backward through it): its leaves join the outer record."""
        __tracebackhide__ = True
        if call.accumulate_grad and self._running is not None:
            self.guard(self._join, call)
        return original(*args, **kwargs)

    def _join(self, call: _engine.EngineCall) -> None:
        with _engine.quiet():
            self._join_quietly(call)

    def _join_quietly(self, call: _engine.EngineCall) -> None:
        record, pending = self._running  # type: ignore[misc]
        found: list[torch.Tensor] = []
        sharded = _engine.fsdp_unsharded()

        def leaf_key(leaf: torch.Tensor) -> int:
            target = self._stand_in(leaf, sharded)
            found.append(target)
            return self.track(target).record.key

        snapshot(call.outputs, leaf_key=leaf_key, inputs=call.inputs or None, light=True)
        targets = list(call.inputs) if call.inputs else found
        known = {id(t) for t, _ in pending}
        fresh = [
            (t, self.track(t))
            for t in targets
            if isinstance(t, torch.Tensor) and id(t) not in known and _engine.reads_grad_quietly(t)
        ]
        for _, track in fresh:
            track.record.in_graph = True
            if not track.seen:
                track.record.nested_only = True  # dropped at close if it died: torch's own
        self._before(fresh)
        pending.extend(fresh)
        record.leaf_keys.extend(track.record.key for _, track in fresh)
        record.nested += 1

    # -- before the engine runs ----------------------------------------------------------------
    def _begin(self, call: _engine.EngineCall, frame: Any) -> tuple[BackwardRecord, Any]:
        _engine.caller_context(call, frame)
        with _engine.quiet():
            return self._begin_quietly(call, frame)

    def _stand_in(self, leaf: torch.Tensor, sharded: dict[int, _engine.ShardedParam]) -> Any:
        """The tensor whose `.grad` receives what reaches `leaf`: for an FSDP2 unsharded
        parameter, the sharded parameter FSDP reduces its gradient into."""
        param = sharded.get(id(leaf)) if sharded else None
        if param is None:
            return leaf
        if param.reduces:
            return param.sharded
        # Gradient sync off: the gradient stays on the unsharded parameter; its row is
        # named after the sharded one when the block closes.
        self._unsharded[id(leaf)] = (weakref.ref(leaf), weakref.ref(param.sharded))
        return leaf

    def _begin_quietly(self, call: _engine.EngineCall, frame: Any) -> tuple[BackwardRecord, Any]:
        roots = [t for t in call.outputs if isinstance(t, torch.Tensor)]
        found: list[tuple[torch.Tensor, LeafTrack]] = []
        sharded = _engine.fsdp_unsharded()

        def leaf_key(leaf: torch.Tensor) -> int:
            target = self._stand_in(leaf, sharded)
            track = self.track(target)
            found.append((target, track))
            return track.record.key

        snap, live = snapshot(
            call.outputs,
            leaf_key=leaf_key,
            inputs=call.inputs or None,
            light=not self.options.graph,
        )
        for _, track in found:
            track.record.in_graph = True
        self.lines.annotate(snap)
        if self.lines.enabled and self.options.graph:
            user = _engine.user_frame(frame)
            globals_ = user.f_globals if user is not None else None
            del user
            self.guard(self._forward_values, snap, live, globals_)
        for edge in snap.edges:
            src = snap.nodes[edge.src]
            if src.kind == "leaf" and src.leaf_key is not None:
                rec = self.leaves[src.leaf_key]
                rec.consumer = rec.consumer or snap.nodes[edge.dst].op
        if call.inputs:
            targets = [
                (t, self.track(t))
                for t in call.inputs
                if isinstance(t, torch.Tensor) and _engine.reads_grad_quietly(t)
            ]
        else:
            targets = found
            if call.accumulate_grad:
                targets = found + self._ddp_unreached(found)
        if self.created_names.enabled:
            for root in roots:
                self.created_names.want(root)
        gradient = call.user_gradient
        if gradient is not None:
            items = gradient if isinstance(gradient, (tuple, list)) else (gradient,)
            tensors = [g if isinstance(g, torch.Tensor) else None for g in items]
            gradient = [
                v if isinstance(g, torch.Tensor) else g for g, v in zip(items, self.read(tensors))
            ]
        scales = [self._scaled.get(id(t)) for t in roots]
        scale = next((s for ref, s in filter(None, scales) if ref() is not None), None)
        record = BackwardRecord(
            kind=call.kind,
            via=call.via,
            roots=["" for _ in roots],
            gradient=gradient,
            retain_graph=call.retain_graph,
            create_graph=call.create_graph,
            inputs=["" for _ in call.inputs] if call.inputs else None,
            leaf_keys=[track.record.key for _, track in targets],
            loss_scale=scale,
            _root_refs=[weakref.ref(t) for t in roots],
        )
        record._input_refs = [
            weakref.ref(t) if isinstance(t, torch.Tensor) else None for t in call.inputs
        ]
        record.graph = snap
        self.records.append(record)
        self._pending = targets if call.accumulate_grad else []
        self._before(targets)  # a `torch.autograd.grad` call's inputs too: their rows show it
        if self.options.check:
            self.custom_functions.extend(custom_functions(live, self._leaf_key))
        if self.options.steps and snap.n_ops <= self.options.flow_budget:
            for nid, node in live.items():
                cls = _engine.custom_function_class(node)
                if cls is not None:
                    snap.nodes[nid].function = function_name(cls)
        if not self.options.graph:
            return record, nullcontext()
        # The step-by-step view needs when each leaf's AccumulateGrad ran: every leaf is hooked.
        adding = call.accumulate_grad and not self.options.steps
        unhooked = unhooked_leaves(snap, found) if adding else {}
        flow = FlowRecorder(
            snap,
            live,
            budget=self.options.flow_budget,
            values=self.options.values,
            errors=self.internal_errors,
            from_readings=frozenset(unhooked),
        )
        self._flow = (flow, unhooked)
        return record, flow

    def _forward_values(
        self, snap: Any, live: dict[int, Any], globals_: Mapping[str, Any] | None
    ) -> None:
        """Note the ops whose output a variable of the user's holds, non-finite, as the
        backward begins: where a NaN or Inf was already in the forward. Read from the
        namespace (and the globals of the code that called backward), never from a saved
        tensor; a variable's `grad_fn` is the node that made its value."""
        spaces = [space for space in (self.namespace, globals_) if space]
        if not spaces or not snap.nodes:
            return
        ids = {id(node): nid for nid, node in live.items()}
        for space in spaces:
            for key, value in list(space.items()):
                if (
                    type(value) is not torch.Tensor
                    or not isinstance(key, str)
                    or key.startswith("_")
                    or not value.requires_grad
                    or value.is_leaf
                    or value.is_meta
                    or value.layout != torch.strided
                    or value.numel() > FORWARD_CHECK_NUMEL
                ):
                    continue
                try:
                    nid = ids.get(id(value.grad_fn))
                    if nid is None or nid in snap.forward_nonfinite:
                        continue
                    what = stats.nonfinite_words(value)
                except Exception:  # noqa: BLE001 - a view whose grad_fn raises: not ours to say
                    continue
                if what:
                    snap.forward_nonfinite[nid] = (key, what)
                    snap.forward_inputs[nid] = self._small_leaves(snap, live, nid)

    def _small_leaves(self, snap: Any, live: dict[int, Any], nid: int) -> list[tuple[int, Any]]:
        """The leaves a node took as inputs, with their values, when they are small."""
        found = []
        for e in snap.edges:
            leaf = snap.nodes[e.src]
            if e.dst != nid or leaf.kind != "leaf" or leaf.leaf_key is None:
                continue
            tensor = live[e.src].variable
            plain = type(tensor) in (torch.Tensor, torch.nn.Parameter)
            if plain and not tensor.is_meta and tensor.numel() <= 16:
                found.append((leaf.leaf_key, tensor.detach().tolist()))
        return found

    def _ddp_unreached(
        self, found: list[tuple[torch.Tensor, LeafTrack]]
    ) -> list[tuple[torch.Tensor, LeafTrack]]:
        """Parameters of a DDP whose synchronised forward this backward reduces, which the
        graph does not reach but whose `.grad` DDP's all-reduce may write (another rank used
        them): read before and after like the graph's leaves, so that a gradient DDP wrote
        is not said to be missing."""
        modules = self.module_calls.take_ddp_pending()
        seen = {id(t) for t, _ in found}
        extra = []
        for ddp in modules:
            if not writes_unreached(ddp):
                continue
            for p in reduced_parameters(ddp):
                if id(p) not in seen:
                    seen.add(id(p))
                    extra.append((p, self.track(p)))
        return extra

    def _before(self, targets: list[tuple[torch.Tensor, LeafTrack]]) -> None:
        """Read each target's `.grad` before the engine adds to it."""
        values = self.read([t.grad for t, _ in targets])
        clock = self.tick()
        adding = targets is self._pending
        for (t, track), value in zip(targets, values):
            if track.before_backward(value, clock, self.edits_since(track.last_clock)) and adding:
                track.base_copy = stats.exact_copies([t.grad])[0]

    # -- after the engine ran ------------------------------------------------------------------
    def _end(self, record: BackwardRecord, result: Any, ok: bool) -> None:
        with _engine.quiet():
            self._end_quietly(record, result, ok)

    def _end_quietly(self, record: BackwardRecord, result: Any, ok: bool) -> None:
        self._repeats.fold(record)
        if record.kind == "grad":
            if ok:
                for key in record.leaf_keys:
                    self.leaves[key].grad_calls += 1
                outs = result if isinstance(result, (tuple, list)) else (result,)
                tensors = [r if isinstance(r, torch.Tensor) else None for r in outs]
                record.results = self.read(tensors)
            return
        pending, self._pending = self._pending, []
        values = self.read([t.grad for t, _ in pending])
        found = stats.reading_norms(values)  # the readings' own norms: no pass over a gradient
        clock = self.tick()
        snap = record.graph

        flow, unhooked = self._flow if self._flow is not None else (None, {})
        self._flow = None
        after = {id(track): value for (_, track), value in zip(pending, values)}
        for nid, track in unhooked.items():
            if ok and id(track) in after:
                flow.derive(nid, after[id(track)])
        for (t, track), value, norm in zip(pending, values, found):
            if not track.after_backward(value, ok, snap, clock, norm):
                continue
            difference = None
            if track.base_copy is not None and not isinstance(value, torch.Tensor):
                difference = self._difference(t.grad, track.base_copy)
            track.added(value, difference)

    def _difference(self, grad: torch.Tensor | None, base: torch.Tensor) -> Any:
        """A summary of `grad - base` (`base` an exact copy of what this process held of the
        gradient before the backward); a DTensor's shard is said to be one."""
        if grad is None:
            return None
        now, note = stats.computable(grad) if stats.is_dtensor(grad) else (grad.detach(), "")
        if now is None or now.shape != base.shape:
            return None
        (difference,) = stats.read_values([now - base], 0, False)
        if note and isinstance(difference, stats.TensorSummary):
            difference = dataclasses.replace(difference, note=note)
        return difference

    # -- what the probes report ------------------------------------------------------------------
    def on_edit(self, edit: Edit) -> None:
        edit.clock = self.tick()
        self.edits.append(edit)

    def on_scaled(self, outputs: Any, scale: float) -> None:
        """A GradScaler scaled `outputs` (a loss, or several) by `scale`."""
        items = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        for t in items:
            if isinstance(t, torch.Tensor):
                self._scaled[id(t)] = (weakref.ref(t), scale)

    # -- closing ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Read every gradient once more and write the block's facts (`self.block`)."""
        if self.closed:
            return
        self.closed = True
        from .finish import finish

        with _engine.quiet():
            self.guard(finish, self)
        # The probes and the naming hook point back to the recorder: dropping them ends
        # the only reference cycles a block builds.
        self.probes = []
        self.created_names.on_name = None
        self.holds = Holds()
        self.steps = self.warnings = None  # type: ignore[assignment]
        self._tracks = {}
        self._scaled = {}
        self._unsharded = {}
        self.namespace = None

    def report(self) -> Any:
        """The `GradReport` of this block (built once, after it closed)."""
        if self._report is None:
            self.close()
            if self.block is None:
                raise RuntimeError(f"gradmagic could not record this block: {self.internal_errors}")
            from .finish import assign_modules

            self.guard(assign_modules, self)
            self._report = REPORT_BUILDER[0](self.block)
        return self._report
