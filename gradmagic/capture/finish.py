"""Closing a block: the last reading of every gradient, names, statuses, history, and the
`BlockRecord` that findings and the report read."""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .. import _engine, stats
from ..graph.data import is_compiled_op
from ..history import RunEntry
from ..records import BlockRecord, EditEvent, LeafRecord, ModuleFact, OptimizerSteps, ParamStep
from ..source import dotted_names, grad_reads, names_in
from .ddp import ddp_facts, rank_and_world
from .names import Namer, fallback_name, unique
from .probes import NONLEAF_WARNING

SATURATING = (nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.Hardtanh, nn.Softsign)
NO_GRAD_ERROR = "does not require grad and does not have a grad_fn"
HISTORY_POINTS = 32  # buckets of a run's trajectory the history keeps (it keeps many runs)


def finish(recorder: Any) -> None:
    """Write `recorder.block`; drop every transient copy."""
    _read_at_end(recorder)
    namespace = recorder.namespace or {}
    namer = Namer(namespace)
    _add_expected(recorder, namer)
    _drop_internal(recorder)
    _name_leaves(recorder, namer)
    _place_leaves(recorder, namer, namespace)
    run = recorder.history.new_run() if recorder.leaves else recorder.history.cell_runs
    for rec in recorder.leaves:
        _settle(recorder, rec)
    _remember(recorder, run)
    rank, world_size = rank_and_world()
    block = BlockRecord(
        run=run,
        source=recorder.source,
        options=recorder.options,
        grad_mode=recorder.grad_mode.mode,
        leaves=recorder.leaves,
        backwards=recorder.records,
        steps=_steps(recorder, namer, namespace),
        events=_events(recorder, namespace),
        modules=_modules(recorder, namer),
        nonleaf_grad_reads=_nonleaf_reads(recorder, namespace),
        unobserved=[_unobserved(reason, n) for reason, n in recorder.unobserved.items()],
        internal_errors=recorder.internal_errors,
        compiled_ops=_compiled_ops(recorder),
        transforms=_transforms(recorder.source, namespace),
        rank=rank,
        world_size=world_size,
        ddp=recorder.guard(ddp_facts, recorder, namer) or [],
    )
    if block.compiled_ops:
        block.compiled = _compiled(recorder, namespace)
    _name_backwards(recorder, namer)
    namer.forget()
    recorder.module_name = namer.module_name  # ids and names only: for `assign_modules`
    recorder.block = block


def _compiled_ops(recorder: Any) -> int:
    """Backward ops of compiled regions in the block's graphs (each graph counted once)."""
    seen: set[int] = set()
    count = 0
    for record in recorder.records:
        snap = record.graph
        snap = snap.repeat_of or snap if snap is not None else None
        if snap is None or id(snap) in seen:
            continue
        seen.add(id(snap))
        count += sum(n.kind == "op" and is_compiled_op(n.op) for n in snap.nodes)
    return count


def _compiled(recorder: Any, namespace: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The `torch.compile` results of the namespace that the block ran (a compiled module
    whose forward ran) or whose variable the code names."""
    named = names_in(recorder.source)
    found = []
    for key, what in _engine.compiled_callables(namespace):
        value = namespace.get(key)
        if key in named or (isinstance(value, nn.Module) and value in recorder.module_calls):
            found.append((key, what))
    return found


def _transforms(source: str | None, namespace: Mapping[str, Any]) -> list[str]:
    """The torch.func transforms the code calls, as it spells them: `torch.func.grad`."""
    if not source:
        return []
    transforms = _func_transforms()
    found = []
    for dotted in dotted_names(source):
        head, *rest = dotted.split(".")
        value, spelled = namespace.get(head), [head]
        for attr in rest:
            if any(value is t for t in transforms):
                break
            if not isinstance(value, types.ModuleType):  # only modules: no user __getattr__
                value = None
                break
            value = getattr(value, attr, None)
            spelled.append(attr)
        if value is not None and any(value is t for t in transforms):
            found.append(".".join(spelled))
    return list(dict.fromkeys(found))


def _func_transforms() -> tuple[Any, ...]:
    func = torch.func
    names = ("grad", "grad_and_value", "vjp", "jvp", "linearize", "jacrev", "jacfwd", "hessian")
    names += ("vmap", "functionalize")
    found = [getattr(func, name, None) for name in names]
    found.append(getattr(torch, "vmap", None))
    return tuple(t for t in found if t is not None)


def _unobserved(reason: str, count: int) -> str:
    calls = "1 call" if count == 1 else f"{count} calls"
    return (
        f"{calls} into the autograd engine {reason} {'was' if count == 1 else 'were'} not observed"
    )


def _read_at_end(recorder: Any) -> None:
    """What the gradients hold as the block ends: None and small ones are read (one
    reading for all); a large one would cost a pass over it, and is not read again."""
    options = recorder.options
    live, large = [], []
    for track in recorder._tracks.values():
        leaf = track.record.ref()
        track.base_copy = None
        if leaf is None or not track.seen:
            continue
        grad = leaf.grad
        if grad is None or stats.numel_of(grad) <= options.values:
            live.append((track, grad))
        else:
            large.append(track)
    values = recorder.read([grad for _, grad in live], copies=False)
    clock = recorder.tick()
    for (track, _), value in zip(live, values):
        track.at_end(value, clock, recorder.edits_since(track.last_clock))
    for track in large:
        track.at_end(None, clock, [], read=False)


def _add_expected(recorder: Any, namer: Namer) -> None:
    """Leaves that should have got a gradient and did not (status `none`): named in the
    code or parameters of a module that took part, when a backward succeeded or failed
    only because nothing in its graph required grad."""
    backwards = [r for r in recorder.records if r.kind == "backward"]
    ok = any(r.error is None for r in backwards)
    cut = backwards and all(r.error is None or NO_GRAD_ERROR in r.error for r in backwards)
    namespace = recorder.namespace
    if not namespace or not (ok or cut):
        return
    named = names_in(recorder.source)
    reached = {id(r.ref()) for r in recorder.leaves if r.backwards and r.ref() is not None}
    for leaf_ref, sharded_ref in list(recorder._unsharded.values()):
        # FSDP2 with gradient sync off: the unsharded parameter got the gradient.
        leaf, sharded = leaf_ref(), sharded_ref()
        if leaf is not None and sharded is not None and id(leaf) in reached:
            reached.add(id(sharded))
    candidates: list[torch.Tensor] = []
    for name in named:
        value = namespace.get(name)
        if isinstance(value, torch.Tensor) and _engine.is_named_leaf(value):
            candidates.append(value)
    for name, ids in namer.module_parameters().items():
        if reached.issuperset(ids):
            continue  # every parameter got its gradient: nothing expected is missing
        module = namespace.get(name)
        if not isinstance(module, nn.Module):
            continue
        ran_here = name in named and module in recorder.module_calls
        if ran_here or not reached.isdisjoint(ids):
            _, params = _engine.module_tree(module)
            candidates.extend(p for _, p in params if p.requires_grad)
    for leaf in candidates:
        if id(leaf) in reached or leaf.numel() == 0:  # an empty parameter gets no gradient
            continue
        track = recorder.track(leaf)
        if not track.record.in_graph:  # a graph reached it: `inputs=` left it out
            rec = track.record
            rec.expected = True
            if not track.seen:
                (value,) = recorder.read([leaf.grad])
                rec.before = rec.end = rec.latest = value
                rec.end_read = True


def _name_leaves(recorder: Any, namer: Namer) -> None:
    created = recorder.created_names
    for rec in recorder.leaves:
        leaf = rec.ref()
        names = namer.names(leaf) if leaf is not None else []
        gathered_from = _gathered_from(recorder, leaf) if not names else None
        if gathered_from is not None:
            names = [f"{name} (unsharded)" for name in namer.names(gathered_from)]
        local = rec.names[0] if rec.names else (created.get(leaf) if leaf is not None else None)
        if local and local not in names:
            names.append(local)
        rec.names = names
        rec.name = names[0] if names else fallback_name(rec.key, rec.consumer)
        position = namer.order(gathered_from if gathered_from is not None else leaf)
        rec.order = position if position is not None else 1_000_000 + rec.key
    for rec, name in zip(recorder.leaves, unique(rec.name for rec in recorder.leaves)):
        rec.name = name


def _gathered_from(recorder: Any, leaf: torch.Tensor | None) -> torch.Tensor | None:
    """The sharded parameter an FSDP2 unsharded one was gathered from, when the unsharded
    one kept its gradient (gradient sync off): its row is named after it."""
    refs = recorder._unsharded.get(id(leaf)) if leaf is not None else None
    if refs is None or refs[0]() is not leaf:
        return None
    return refs[1]()


def _place_leaves(recorder: Any, namer: Namer, namespace: Mapping[str, Any]) -> None:
    """Each leaf's module (`model`), its layer (`model.0`) and its optimizer's variable."""
    owners: dict[int, str] = {}
    for name, ids in namer.module_parameters().items():
        for i in ids:
            owners.setdefault(i, name)
    optimizers: dict[int, str] = {}
    for key, value in list(namespace.items()):
        if isinstance(value, torch.optim.Optimizer) and not str(key).startswith("_"):
            for group in value.param_groups:
                for p in group["params"]:
                    optimizers.setdefault(id(p), key)
    for rec in recorder.leaves:
        leaf = rec.ref()
        if leaf is None:
            continue
        rec.owner = owners.get(id(leaf))
        if rec.owner:
            path = next((n for n in rec.names if n.startswith(rec.owner + ".")), None)
            rec.layer = path.rpartition(".")[0] if path else rec.owner
        rec.optimizer = optimizers.get(id(leaf))


def _drop_internal(recorder: Any) -> None:
    """Leaves first reached inside a reentrant checkpoint's own backward that are gone by
    now: the detached inputs torch made to run it, not the user's tensors."""
    for rec in recorder.leaves:
        if rec.nested_only and rec.ref() is None:
            rec.internal = True


def _settle(recorder: Any, rec: LeafRecord) -> None:
    """Where `before` came from, the status word and the run count."""
    leaf = rec.ref()
    item = recorder.history.get(leaf) if leaf is not None else None
    if not stats.is_empty(rec.before):
        ended = _comparable(item.end) if item is not None else None
        if item is not None and stats.same(ended, _comparable(rec.before)):
            rec.before_origin, rec.runs_before = "watched run", max(item.runs, 1)
        else:
            rec.before_origin = "changed" if item is not None and ended is not None else "unwatched"
            rec.runs_before = 1
    if rec.backwards == 0:
        rec.status = "none" if rec.expected else "unchanged"
        rec.runs = rec.runs_before if rec.status == "unchanged" else 0
        rec.after = rec.before
        return
    if rec.after is None:
        rec.status, rec.runs = "none", 0
        return
    looped = rec.summed > 1 and rec.steps == 0 and rec.summed_structures == 1
    if stats.nonfinite(rec.after):
        rec.status = "nan/inf"
    elif rec.stale_start or rec.stale_steps or looped:
        rec.status = "accumulated"
    else:
        rec.status = "new"
    rec.runs = rec.runs_before + 1 if rec.stale_start else 1


def _comparable(value: Any) -> Any:
    """A value as history keeps it: large exact copies (from `copies=True`) as summaries."""
    if isinstance(value, torch.Tensor) and value.numel() > stats.DEFAULT_VALUES:
        return stats.read_values([value], 0, False)[0]
    return value


def _remember(recorder: Any, run: int) -> None:
    recorder.run_number = run
    for rec in recorder.leaves:
        leaf = rec.ref()
        if leaf is None or rec.backwards == 0:
            continue
        values = [_comparable(v) for v in (rec.before, rec.after, rec.added, rec.latest)]
        path = rec.trajectory
        kept = path.compact(HISTORY_POINTS) if path.count > 1 else None
        entry = RunEntry(run, *values[:3], rec.status, rec.runs, kept)
        recorder.history.record(leaf, entry, values[3])


def _name_backwards(recorder: Any, namer: Namer) -> None:
    created = recorder.created_names
    names = {id(r.ref()): r.name for r in recorder.leaves if r.ref() is not None}
    for record in recorder.records:
        for i, ref in enumerate(record._root_refs):
            t = ref()
            if t is not None:
                record.roots[i] = namer.name(t) or created.get(t) or names.get(id(t)) or ""
        if record.inputs is not None:
            for i, ref in enumerate(record._input_refs):
                t = ref() if ref is not None else None
                if t is not None:
                    record.inputs[i] = names.get(id(t)) or namer.name(t) or ""
        snap = record.graph
        if snap is not None and len(snap.roots) == len(record.roots):
            for nid, name in zip(snap.roots, record.roots):
                if name and not snap.nodes[nid].root_name:
                    snap.nodes[nid].root_name = name
        record._root_refs, record._input_refs = [], []


def assign_modules(recorder: Any) -> None:
    """Which module call made each op, for the drawing: when a report is built, not at
    every block's end (a loop of watched steps that builds none never pays for it)."""
    spans, recorder.module_spans = recorder.module_spans, None
    if spans is None or recorder.block is None:
        return
    seen: set[int] = set()
    drawn = []
    for record in recorder.block.backwards:
        snap = record.graph
        if snap is not None and not snap.folded and id(snap) not in seen:
            seen.add(id(snap))
            drawn.append(snap)
    spans.assign(drawn, module_name=recorder.module_name)


def _variable(namespace: Mapping[str, Any], obj: Any) -> str | None:
    for key, value in list(namespace.items()):
        if value is obj and isinstance(key, str) and not key.startswith("_"):
            return key
    return None


def _steps(recorder: Any, namer: Namer, namespace: Mapping[str, Any]) -> list[OptimizerSteps]:
    """What each optimizer's steps did: the gradient the last step used, each parameter
    before the first step and at the end of the block, and how far it moved."""
    probe = recorder.steps
    rows = {id(r.ref()): r.name for r in recorder.leaves if r.ref() is not None}
    out = []
    for live in probe.live.values():
        optimizer = live.ref()
        items = [(item, item.ref()) for item in live.params.values()]
        items = [(item, p) for item, p in items if p is not None]
        # Parameters copied before the first step are copied again now: the report works
        # out their values and how far they moved from the two copies. The others would
        # cost a pass over the model at every block.
        measured = [item.before is not None or item.first_copy is not None for item, _ in items]
        ends = stats.exact_copies([p for (_, p), m in zip(items, measured) if m])
        ends.reverse()
        params = []
        for i, ((item, p), m) in enumerate(zip(items, measured)):
            name = rows.get(id(p)) or namer.name(p) or f"param #{i} of {live.kind}"
            end = ends.pop() if m else stats.not_measured(p, _unmeasured(p))
            step = ParamStep(name, stats.shape_of(p), item.grad, item.before, end, None, item.steps)
            step.ref, step.part = item.ref, item.part
            step.moved_after_step = item.steps > 0 and p._version != item.version
            if item.first_copy is not None:  # a large one: summarised by the report
                step.before, step.after = None, None
                step.copies = (item.first_copy, end)
                item.first_copy = None
            params.append(step)
        name = (_variable(namespace, optimizer) if optimizer is not None else None) or live.kind
        skipped = sum(
            1
            for e in recorder.edits
            if e.what == "scaler_step" and e.skipped and e.refs and e.refs[1]() is optimizer
        )
        out.append(
            OptimizerSteps(
                name, live.kind, live.hyperparameters, live.steps, params, probe.budget, skipped
            )
        )
    return out


def _unmeasured(p: torch.Tensor) -> str:
    v, note = stats.computable(p)
    if v is None or (note and not note.startswith(stats.PART)):
        return f"not measured ({note or 'values not read'})"
    return "not measured (past the copy budget)"


def _events(recorder: Any, namespace: Mapping[str, Any]) -> list[EditEvent]:
    """The edit calls, spelled with the user's names; and each change said to come from
    them (`Change.by`)."""
    for edit in recorder.edits:
        if edit.refs:
            scaler, optimizer = (ref() for ref in edit.refs)
            s = _variable(namespace, scaler) or "scaler"
            o = _variable(namespace, optimizer) or "optimizer"
            if edit.what == "unscale" and edit.within_step:
                edit.text = f"`{s}.step({o})`, which unscales first (÷{1 / edit.factor:g})"
            elif edit.what == "unscale":
                edit.text = f"`{s}.unscale_({o})` (÷{1 / edit.factor:g})"
            else:
                edit.text = f"`{s}.step({o})`"
    for change, edits in recorder._attributions:
        change.by = " then ".join(e.text for e in edits)
    events = []
    for e in recorder.edits:
        optimizer = e.refs[1]() if e.refs else None
        name = (_variable(namespace, optimizer) if optimizer is not None else None) or ""
        events.append(EditEvent(e.what, e.text, e.factor, e.skipped, name))
    return events


def _modules(recorder: Any, namer: Namer) -> list[ModuleFact]:
    keys: dict[str, list[int]] = {}
    for rec in recorder.leaves:
        if rec.owner:
            keys.setdefault(rec.owner, []).append(rec.key)
    facts = []
    for name, leaf_keys in keys.items():
        modules = namer.submodules(name)
        if not modules:
            continue
        saturating = sum(isinstance(m, SATURATING) for m in modules)
        ran = modules[0] in recorder.module_calls
        facts.append(ModuleFact(name, ran, saturating, leaf_keys))
    return facts


def _nonleaf_reads(recorder: Any, namespace: Mapping[str, Any]) -> list[str]:
    """Which non-leaf `.grad` the block read, from the warnings and the source."""
    import linecache

    reads: list[str] = []
    for message, filename, lineno in recorder.warnings.shown:
        if message.startswith(NONLEAF_WARNING):
            reads += grad_reads(linecache.getline(filename, lineno))
    # A repeated warning is hidden by the filters' registry: the source still tells.
    for name in grad_reads(recorder.source or ""):
        value = namespace.get(name)
        if isinstance(value, torch.Tensor) and not value.retains_grad:
            try:
                if not value.is_leaf:
                    reads.append(name)
            except RuntimeError:  # a view whose graph cannot be rebuilt: not a plain read
                continue
    return list(dict.fromkeys(reads))
