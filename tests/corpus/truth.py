"""An independent record of what happened to every leaf's `.grad` in a cell.

An IPython extension (`%load_ext tests.corpus.truth`) that knows nothing of
gradmagic. While a cell runs it wraps `torch.Tensor.backward`,
`torch.autograd.backward` and `torch.autograd.grad`, and registers global
optimizer step hooks; when the cell ends it puts everything back. For each
leaf a backward reached (or an optimizer stepped) it keeps, in order:

    ("backward_before", k, value)   .grad when engine call k began
    ("backward_after", k, value)    .grad when engine call k returned (or raised)
    ("grad_before", k, value)       the same for a torch.autograd.grad call
    ("grad_after", k, value)
    ("step", s, grad, param_before, param_after, grad_after)   optimizer step s
    ("end", value)                  .grad when the cell ended

where every value is a clone (or None). `last_cell` holds the record of the
last cell that ran; `to_json()` turns it into plain JSON (see `CellRecord.to_json`).

Nothing here may change what PyTorch computes: arguments reach torch as the
caller gave them (generators are turned into tuples, which torch does itself),
values are read from detached clones, saved tensors are never unpacked, and the
recorder's own work runs with any profile function switched off so that tools
watching the user's frames (gradmagic names leaves that way) do not see it.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import sys
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# A cell whose code starts with this line is the runner's own: it is not recorded.
HIDDEN_CELL_MARKER = "# corpus-hidden-cell"
FORMAT = "gradmagic-corpus-truth/1"
# In `to_json()`, tensors with more elements than this keep a digest, not their values.
JSON_MAX_VALUES = 4096

last_cell: CellRecord | None = None
_recorder: Recorder | None = None


# --- records ------------------------------------------------------------------------


@dataclass
class Call:
    """One call into the autograd engine made from Python during the cell."""

    index: int
    api: str  # "Tensor.backward", "torch.autograd.backward" or "torch.autograd.grad"
    parent: int | None  # the call this one ran inside (a reentrant checkpoint's backward)
    depth: int
    during_step: int | None  # the optimizer step it ran inside (an LBFGS closure)
    retain_graph: bool | None
    create_graph: bool
    gradient: list[Any] | None  # clones of `gradient=` / `grad_outputs=` as given
    inputs: list[int | None] | None  # leaf keys of `inputs=` (None: not a leaf)
    own_leaves: list[int] = field(default_factory=list)  # found from this call's roots
    leaves: list[int] = field(default_factory=list)  # own ones, then those of nested calls
    results: list[Any] | None = None  # clones of what torch.autograd.grad returned
    result_keys: list[str] | None = None  # their keys when `inputs` was a dict
    error: str | None = None
    finished: bool = False

    @property
    def kind(self) -> str:
        return "grad" if self.api == "torch.autograd.grad" else "backward"


@dataclass
class Step:
    """One optimizer step (`step()` of any torch optimizer) made during the cell."""

    index: int
    optimizer: str
    optimizer_id: int
    params: list[int] = field(default_factory=list)
    calls_during: list[int] = field(default_factory=list)
    completed: bool = False


@dataclass
class Leaf:
    key: int  # order of first appearance in the cell
    ref: Any  # weakref.ref to the tensor
    id: int
    shape: tuple[int, ...]
    dtype: str
    names: list[str] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)
    alive_at_end: bool = True


@dataclass
class CellRecord:
    """What one cell did to `.grad`: its engine calls, optimizer steps and leaves."""

    execution_count: int | None
    calls: list[Call] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    leaves: dict[int, Leaf] = field(default_factory=dict)  # by key
    internal_errors: list[str] = field(default_factory=list)
    _by_id: dict[int, int] = field(default_factory=dict, repr=False)

    def leaf_for(self, tensor: torch.Tensor) -> Leaf | None:
        """The record of this tensor, if the cell recorded it (and it is still alive)."""
        key = self._by_id.get(id(tensor))
        if key is None:
            return None
        leaf = self.leaves[key]
        return leaf if leaf.ref() is tensor else None

    def named(self, name: str) -> Leaf | None:
        """The leaf recorded under `name` (as in `names`), if any."""
        return next((leaf for leaf in self.leaves.values() if name in leaf.names), None)

    def _leaf(self, tensor: torch.Tensor) -> Leaf:
        leaf = self.leaf_for(tensor)
        if leaf is None:
            key = len(self.leaves)
            leaf = Leaf(
                key,
                weakref.ref(tensor),
                id(tensor),
                tuple(tensor.shape),
                str(tensor.dtype).removeprefix("torch."),
            )
            self.leaves[key] = leaf
            self._by_id[id(tensor)] = key
        return leaf

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (no NaN literals), for another process to read.

        {"format": FORMAT, "execution_count": int|null,
         "calls": [{"index", "api", "kind", "parent", "depth", "during_step", "retain_graph",
                    "create_graph", "gradient": [V]|null, "inputs": [key|null]|null,
                    "own_leaves": [key], "leaves": [key], "results": [V]|null,
                    "result_keys": [str]|null, "error": str|null, "finished": bool}],
         "steps": [{"index", "optimizer", "optimizer_id", "params": [key],
                    "calls_during": [k], "completed": bool}],
         "leaves": [{"key", "id", "names": [str], "shape": [int], "dtype", "alive_at_end",
                     "events": [["backward_before", k, V], ["backward_after", k, V],
                                ["grad_before", k, V], ["grad_after", k, V],
                                ["step", s, V_grad, V_param_before, V_param_after,
                                 V_grad_after],
                                ["end", V]]}],
         "internal_errors": [str]}

        V is null (no gradient) or {"dtype", "shape", "sha256" (of the raw bytes),
        "values": nested lists or null past JSON_MAX_VALUES elements, "sum", "norm",
        "nonfinite" (count)}; a float that is not finite is written "nan", "inf" or "-inf".
        """
        return {
            "format": FORMAT,
            "execution_count": self.execution_count,
            "calls": [
                {
                    "index": c.index,
                    "api": c.api,
                    "kind": c.kind,
                    "parent": c.parent,
                    "depth": c.depth,
                    "during_step": c.during_step,
                    "retain_graph": c.retain_graph,
                    "create_graph": c.create_graph,
                    "gradient": _json_list(c.gradient),
                    "inputs": c.inputs,
                    "own_leaves": c.own_leaves,
                    "leaves": c.leaves,
                    "results": _json_list(c.results),
                    "result_keys": c.result_keys,
                    "error": c.error,
                    "finished": c.finished,
                }
                for c in self.calls
            ],
            "steps": [
                {
                    "index": s.index,
                    "optimizer": s.optimizer,
                    "optimizer_id": s.optimizer_id,
                    "params": s.params,
                    "calls_during": s.calls_during,
                    "completed": s.completed,
                }
                for s in self.steps
            ],
            "leaves": [
                {
                    "key": leaf.key,
                    "id": leaf.id,
                    "names": leaf.names,
                    "shape": list(leaf.shape),
                    "dtype": leaf.dtype,
                    "alive_at_end": leaf.alive_at_end,
                    "events": [
                        [e[0], *(x if isinstance(x, int) else encode(x) for x in e[1:])]
                        for e in leaf.events
                    ],
                }
                for leaf in self.leaves.values()
            ],
            "internal_errors": list(self.internal_errors),
        }


def to_json() -> dict[str, Any] | None:
    """The last cell's record as JSON, or None before any cell was recorded."""
    return None if last_cell is None else last_cell.to_json()


# --- JSON encoding of values --------------------------------------------------------------


def _number(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def _nested(values: Any) -> Any:
    if isinstance(values, list):
        return [_nested(v) for v in values]
    if isinstance(values, complex):
        return [_number(values.real), _number(values.imag)]
    return _number(values)


def raw_bytes(t: torch.Tensor) -> bytes:
    """The tensor's elements as bytes, in row-major order."""
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def encode(value: Any) -> Any:
    """A tensor as JSON (see `CellRecord.to_json`); None stays None."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        return {"repr": repr(value)}
    t = value.detach()
    out: dict[str, Any] = {
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": list(t.shape),
        "sha256": hashlib.sha256(raw_bytes(t)).hexdigest(),
        "values": None,
    }
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.numel() <= JSON_MAX_VALUES:
        out["values"] = _nested(t.cpu().tolist())
    if t.is_floating_point() or t.is_complex():
        wide = t.to(torch.complex128 if t.is_complex() else torch.float64)
        out["sum"] = _nested(wide.sum().item())
        out["norm"] = _number(wide.abs().pow(2).sum().sqrt().item())
        out["nonfinite"] = int((~torch.isfinite(wide)).sum().item())
    return out


def _json_list(values: list[Any] | None) -> list[Any] | None:
    return None if values is None else [encode(v) for v in values]


# --- reading without being seen -----------------------------------------------------------


def _quiet(fn: Callable[..., Any], *args: Any) -> Any:
    """Run fn(*args) with the profile function off: the recorder's frames hold tensors
    in their locals, which a tool naming tensors from the user's frames must not see."""
    profile = sys.getprofile()
    if profile is not None:
        sys.setprofile(None)
    try:
        return fn(*args)
    finally:
        if profile is not None:
            sys.setprofile(profile)


def _grad_clone(t: torch.Tensor) -> torch.Tensor | None:
    g = t.grad
    return None if g is None else g.detach().clone()


def _clone(t: Any) -> Any:
    return t.detach().clone() if isinstance(t, torch.Tensor) else None


def _tensors(value: Any) -> list[Any]:
    """The tensors of an argument that may be one tensor, a sequence or a dict."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return list(value.values())
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]  # a GradientEdge


def _has_grad_slot(t: Any) -> bool:
    # `.grad` of a non-leaf is read only when it keeps one: reading it otherwise warns.
    return isinstance(t, torch.Tensor) and t.requires_grad and (t.is_leaf or t.retains_grad)


def graph_leaves(roots: list[Any]) -> list[torch.Tensor]:
    """The leaves whose `.grad` a backward from `roots` accumulates into, in walk order.

    An iterative walk of `grad_fn.next_functions` that stops at `AccumulateGrad`
    nodes (`node.variable` is the leaf); saved tensors are never unpacked.
    """
    found: list[torch.Tensor] = []
    seen_leaves: set[int] = set()
    seen_nodes: dict[int, Any] = {}  # the nodes themselves keep their ids unique
    stack: list[Any] = []
    for root in roots:
        if not isinstance(root, torch.Tensor):
            continue
        if root.grad_fn is None:
            if root.requires_grad and id(root) not in seen_leaves:
                seen_leaves.add(id(root))
                found.append(root)
        else:
            stack.append(root.grad_fn)
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen_nodes:
            continue
        seen_nodes[id(node)] = node
        variable = (
            getattr(node, "variable", None) if type(node).__name__ == "AccumulateGrad" else None
        )
        if isinstance(variable, torch.Tensor):
            if id(variable) not in seen_leaves:
                seen_leaves.add(id(variable))
                found.append(variable)
            continue
        for child, _ in reversed(getattr(node, "next_functions", ())):
            if child is not None and id(child) not in seen_nodes:
                stack.append(child)
    return found


# --- the wrappers -------------------------------------------------------------------------

# Arguments that torch accepts as any iterable and turns into a tuple itself.
_SEQUENCE_ARGS = {
    "Tensor.backward": ("inputs",),
    "torch.autograd.backward": ("tensors", "grad_tensors", "grad_variables", "inputs"),
    "torch.autograd.grad": ("outputs", "inputs", "grad_outputs"),
}


def _materialise(value: Any) -> Any:
    if value is None or isinstance(value, (torch.Tensor, list, tuple, Mapping)):
        return value
    if isinstance(value, Iterator) or (hasattr(value, "__iter__") and not hasattr(value, "node")):
        return tuple(value)
    return value


class _Api:
    """Stands in for `torch.autograd.backward` / `grad` while a cell runs.

    Every attribute it does not define comes from the original function, `__code__`
    included, so code that recognises torch's own frames by their code objects
    still does.
    """

    def __init__(self, api: str, original: Callable[..., Any]) -> None:
        self._api = api
        self._original = original
        self.__wrapped__ = original
        functools.update_wrapper(self, original)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        recorder = _recorder
        if recorder is None or not recorder.active:
            return self._original(*args, **kwargs)
        return recorder.run(self._api, self._original, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        if name == "_original":  # not set yet (a copy made without __init__)
            raise AttributeError(name)
        return getattr(self._original, name)


def _make_tensor_backward(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def backward(*args: Any, **kwargs: Any) -> Any:
        recorder = _recorder
        if recorder is None or not recorder.active:
            return original(*args, **kwargs)
        return recorder.run("Tensor.backward", original, args, kwargs)

    return backward


@dataclass
class _Active:
    call: Call
    covered: dict[int, None]  # leaf keys, in order


class Recorder:
    """Installs the wrappers and hooks around each cell and builds its `CellRecord`."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.active = False
        self.record: CellRecord | None = None
        self._originals: dict[str, Any] = {}
        self._signatures: dict[str, inspect.Signature] = {}
        self._hooks: list[Any] = []
        self._stack: list[_Active] = []
        self._delegating = False  # Tensor.backward is about to call torch.autograd.backward
        self._open_steps: list[tuple[Step, dict[int, tuple[Any, Any, Any]]]] = []

    # -- cell events ---------------------------------------------------------------------
    def pre_run_cell(self, info: Any) -> None:
        raw = getattr(info, "raw_cell", "") or ""
        if raw.lstrip().startswith(HIDDEN_CELL_MARKER):
            return
        self._uninstall()  # a cell whose post_run_cell never came
        self.record = CellRecord(getattr(self.shell, "execution_count", None))
        self._stack, self._open_steps, self._delegating = [], [], False
        self._install()

    def post_run_cell(self, result: Any) -> None:
        global last_cell
        if self.record is None:
            return
        record, self.record = self.record, None
        try:
            self._uninstall()
        finally:
            _quiet(self._finish, record)
            last_cell = record

    # -- installing ----------------------------------------------------------------------
    def _install(self) -> None:
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        self._originals = {
            "Tensor.backward": torch.Tensor.backward,
            "torch.autograd.backward": torch.autograd.backward,
            "torch.autograd.grad": torch.autograd.grad,
        }
        for api, original in self._originals.items():
            if api not in self._signatures:
                self._signatures[api] = inspect.signature(original)
        torch.Tensor.backward = _make_tensor_backward(self._originals["Tensor.backward"])
        torch.autograd.backward = _Api(
            "torch.autograd.backward", self._originals["torch.autograd.backward"]
        )
        torch.autograd.grad = _Api("torch.autograd.grad", self._originals["torch.autograd.grad"])
        self._hooks = [
            register_optimizer_step_pre_hook(self._step_pre),
            register_optimizer_step_post_hook(self._step_post),
        ]
        self.active = True

    def _uninstall(self) -> None:
        self.active = False
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self._originals:
            torch.Tensor.backward = self._originals["Tensor.backward"]
            torch.autograd.backward = self._originals["torch.autograd.backward"]
            torch.autograd.grad = self._originals["torch.autograd.grad"]
            self._originals = {}

    def restore(self) -> None:
        self.record = None
        self._uninstall()

    # -- engine calls --------------------------------------------------------------------
    def run(self, api: str, original: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """Call `original` as the user did, recording .grad around it. Holds no tensor
        in its own locals (a profile hook would see them): only tuples and records."""
        if api == "torch.autograd.backward" and self._delegating:
            # Tensor.backward handing over to torch.autograd.backward: one user call.
            self._delegating = False
            return original(*args, **kwargs)
        args, kwargs = _quiet(self._normalise, api, args, kwargs)
        active = _quiet(self._begin, api, args, kwargs)
        self._delegating = api == "Tensor.backward"
        try:
            result = original(*args, **kwargs)
        except BaseException as exc:
            self._delegating = False
            _quiet(self._end, active, None, exc)
            raise
        self._delegating = False
        _quiet(self._end, active, result, None)
        return result

    def _normalise(self, api: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Turn iterator arguments into tuples (torch does the same), so that reading
        them here does not leave torch an exhausted generator."""
        try:
            bound = self._signatures[api].bind(*args, **kwargs)
        except TypeError:
            return args, kwargs  # torch raises the TypeError itself
        changed = False
        for name in _SEQUENCE_ARGS[api]:
            if name in bound.arguments:
                value = bound.arguments[name]
                new = _materialise(value)
                if new is not value:
                    bound.arguments[name] = new
                    changed = True
        return (tuple(bound.args), dict(bound.kwargs)) if changed else (args, kwargs)

    def _begin(self, api: str, args: tuple, kwargs: dict) -> _Active | None:
        record = self.record
        if record is None:
            return None
        try:
            try:
                arguments = self._signatures[api].bind(*args, **kwargs).arguments
            except TypeError:
                arguments = {}
            if api == "Tensor.backward":
                roots = [arguments.get("self")]
                gradient = arguments.get("gradient")
            elif api == "torch.autograd.backward":
                roots = _tensors(arguments.get("tensors"))
                gradient = arguments.get("grad_tensors", arguments.get("grad_variables"))
            else:
                roots = _tensors(arguments.get("outputs"))
                gradient = arguments.get("grad_outputs")
            inputs_arg = arguments.get("inputs")
            inputs = _tensors(inputs_arg) if inputs_arg is not None else None
            if api == "torch.autograd.grad":
                own = [t for t in inputs or [] if _has_grad_slot(t)]
            elif inputs is not None:
                own = [t for t in inputs if _has_grad_slot(t)]
            else:
                own = graph_leaves(roots)
            parent = self._stack[-1].call.index if self._stack else None
            call = Call(
                index=len(record.calls),
                api=api,
                parent=parent,
                depth=len(self._stack),
                during_step=self._open_steps[-1][0].index if self._open_steps else None,
                retain_graph=arguments.get("retain_graph"),
                create_graph=bool(arguments.get("create_graph", False)),
                gradient=None if gradient is None else [_clone(g) for g in _tensors(gradient)],
                inputs=None
                if inputs is None
                else [record._leaf(t).key if _has_grad_slot(t) else None for t in inputs],
            )
            record.calls.append(call)
            if self._open_steps:
                self._open_steps[-1][0].calls_during.append(call.index)
            label = f"{call.kind}_before"
            new = _Active(call, {})
            for t in own:
                leaf = record._leaf(t)
                call.own_leaves.append(leaf.key)
                value = _grad_clone(t)
                # A leaf that only a nested backward reaches (a reentrant checkpoint's
                # parameters) also belongs to every call it runs inside.
                for outer in self._stack:
                    if leaf.key not in outer.covered:
                        outer.covered[leaf.key] = None
                        leaf.events.append((f"{outer.call.kind}_before", outer.call.index, value))
                new.covered[leaf.key] = None
                leaf.events.append((label, call.index, value))
            self._stack.append(new)
            return new
        except Exception as exc:  # noqa: BLE001 - never break the user's backward
            record.internal_errors.append(f"begin {api}: {type(exc).__name__}: {exc}")
            return None

    def _end(self, active: _Active | None, result: Any, error: BaseException | None) -> None:
        record = self.record
        if active is None or record is None:
            return
        try:
            if self._stack and self._stack[-1] is active:
                self._stack.pop()
            elif active in self._stack:
                self._stack.remove(active)
            call = active.call
            call.leaves = list(active.covered)
            call.finished = error is None
            if error is not None:
                call.error = f"{type(error).__name__}: {error}".strip()
            if call.kind == "grad" and result is not None:
                if isinstance(result, Mapping):
                    call.result_keys = [str(k) for k in result]
                    call.results = [_clone(v) for v in result.values()]
                else:
                    call.results = [_clone(v) for v in result]
            label = f"{call.kind}_after"
            for key in active.covered:
                leaf = record.leaves[key]
                t = leaf.ref()
                leaf.events.append((label, call.index, None if t is None else _grad_clone(t)))
        except Exception as exc:  # noqa: BLE001
            record.internal_errors.append(f"end: {type(exc).__name__}: {exc}")

    # -- optimizer steps ----------------------------------------------------------------
    def _step_pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        _quiet(self._step_begin, optimizer)

    def _step_post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        _quiet(self._step_end, optimizer)

    def _step_begin(self, optimizer: Any) -> None:
        record = self.record
        if record is None:
            return
        try:
            step = Step(len(record.steps), type(optimizer).__name__, id(optimizer))
            record.steps.append(step)
            before: dict[int, tuple[Any, Any, Any]] = {}
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if isinstance(p, torch.Tensor) and id(p) not in before:
                        before[id(p)] = (weakref.ref(p), _grad_clone(p), _clone(p))
            self._open_steps.append((step, before))
        except Exception as exc:  # noqa: BLE001
            record.internal_errors.append(f"step begin: {type(exc).__name__}: {exc}")

    def _step_end(self, optimizer: Any) -> None:
        record = self.record
        if record is None:
            return
        try:
            for i in range(len(self._open_steps) - 1, -1, -1):
                if self._open_steps[i][0].optimizer_id == id(optimizer):
                    step, before = self._open_steps.pop(i)
                    break
            else:
                return
            step.completed = True
            self._close_step(record, step, before)
        except Exception as exc:  # noqa: BLE001
            record.internal_errors.append(f"step end: {type(exc).__name__}: {exc}")

    def _close_step(self, record: CellRecord, step: Step, before: dict[int, Any]) -> None:
        for ref, grad, param in before.values():
            p = ref()
            if p is None:
                continue
            # Parameters without a gradient before or after are ones step() skips.
            if grad is None and p.grad is None:
                continue
            leaf = record._leaf(p)
            step.params.append(leaf.key)
            after = _clone(p) if step.completed else None
            # As the step left it: a closure (LBFGS) computes the gradient inside the step.
            leaf.events.append(("step", step.index, grad, param, after, _grad_clone(p)))

    # -- the end of the cell --------------------------------------------------------------
    def _finish(self, record: CellRecord) -> None:
        try:
            while self._open_steps:  # a step that raised
                step, before = self._open_steps.pop()
                self._close_step(record, step, before)
            self._stack = []
            names = namespace_names(self.shell.user_ns, record)
            for leaf in record.leaves.values():
                t = leaf.ref()
                leaf.alive_at_end = t is not None
                leaf.events.append(("end", None if t is None else _grad_clone(t)))
                leaf.names = names.get(leaf.key, [])
        except Exception as exc:  # noqa: BLE001
            record.internal_errors.append(f"finish: {type(exc).__name__}: {exc}")


# --- names -----------------------------------------------------------------------------

_SKIP_NAMES = {"In", "Out", "exit", "quit", "get_ipython"}


def _module_names(prefix: str, module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, p in module.named_parameters(remove_duplicate=False):
        yield f"{prefix}.{name}", p


def _names_of(name: str, value: Any, depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, nn.Module):
        yield from _module_names(name, value)
    elif isinstance(value, torch.optim.Optimizer):
        for gi, group in enumerate(value.param_groups):
            for pi, p in enumerate(group["params"]):
                yield f"{name}.param_groups[{gi}]['params'][{pi}]", p
    elif depth >= 2:
        return
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value[:1000]):
            yield from _names_of(f"{name}[{i}]", item, depth + 1)
    elif isinstance(value, dict):
        for key, item in list(value.items())[:1000]:
            if isinstance(key, (str, int)):
                yield from _names_of(f"{name}[{key!r}]", item, depth + 1)
    elif type(value).__module__ == "__main__" and hasattr(value, "__dict__"):
        for attr, item in vars(value).items():
            yield from _names_of(f"{name}.{attr}", item, depth + 1)


def namespace_names(namespace: Mapping[str, Any], record: CellRecord) -> dict[int, list[str]]:
    """Leaf key -> the names under which the user's namespace reaches that tensor."""
    out: dict[int, list[str]] = {}
    for name, value in list(namespace.items()):
        if name.startswith("_") or name in _SKIP_NAMES:
            continue
        for path, t in _names_of(name, value):
            leaf = record.leaf_for(t)
            if leaf is not None and path not in out.setdefault(leaf.key, []):
                out[leaf.key].append(path)
    return out


# --- the extension ------------------------------------------------------------------------


def load_ipython_extension(ip: Any) -> None:
    global _recorder
    if _recorder is not None:
        return
    _recorder = Recorder(ip)
    ip.events.register("pre_run_cell", _recorder.pre_run_cell)
    ip.events.register("post_run_cell", _recorder.post_run_cell)


def unload_ipython_extension(ip: Any) -> None:
    global _recorder, last_cell
    if _recorder is None:
        return
    ip.events.unregister("pre_run_cell", _recorder.pre_run_cell)
    ip.events.unregister("post_run_cell", _recorder.post_run_cell)
    _recorder.restore()
    _recorder, last_cell = None, None
