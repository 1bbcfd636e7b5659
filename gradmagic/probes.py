"""Probes that watch a block beside the engine wrapper: optimizer steps, warnings, grad mode.

Importing this module appends their factories to `capture.EXTRA_PROBES`. Each
probe is a context manager that undoes in `__exit__` everything it installed,
and has a `finish(recorder)` that turns what it saw into plain records on the
recorder once names are known: `recorder.optimizer_steps`,
`recorder.nonleaf_grad_reads` and `recorder.grad_mode`. After the block no
probe holds a user's tensor beyond small copies.
"""

from __future__ import annotations

import ast
import linecache
import re
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from . import capture, stats
from .naming import Namer

# Hyperparameters worth showing beside an optimizer's name, when set.
HYPERPARAMETERS = ("lr", "momentum", "betas", "weight_decay")
# Elements of large parameters copied to measure how far a step moved them (`‖Δ‖`).
# Past this budget (256 KiB of float32; 4 MiB with copies=True) only norms are kept:
# copying a large model before every step costs its size in fresh memory, and
# touching fresh pages is slow (a 4 MiB copy took up to 70 ms on a small VM).
DELTA_BUDGET = 1 << 16
DELTA_BUDGET_COPIES = 1 << 20  # with `copies=True` (`--copies`)
NONLEAF_WARNING = "The .grad attribute of a Tensor that is not a leaf Tensor"


@dataclass
class ParamStep:
    """One parameter across an optimizer's steps in a block.

    `before` is its value before the first step, `after` after the last, each a
    copy (small tensors) or a `TensorSummary`; `grad` is `.grad` at the last
    step; `change` is `after - before` (small) or the norm of that difference.
    A large parameter past the copy budget has no `before` or `change`.

    `after` and `change` are read when the report is built (`complete_steps`), not
    when the block ends: a training loop of watched steps that builds no report
    never pays for them. A parameter that changed in between (its `_version`
    moved) shows `CHANGED_SINCE` instead.
    """

    name: str
    shape: tuple[int, ...]
    grad: Any
    before: Any
    after: Any
    change: Any
    steps: int
    ref: Any = field(default=None, repr=False)  # weak, until the report reads it
    # (the probe's record of it, its `_version` when the block ended), until then
    pending: Any = field(default=None, repr=False)


CHANGED_SINCE = "changed after the block ended"


@dataclass
class OptimizerSteps:
    """What one optimizer's `step()` calls did in the block."""

    name: str  # the variable holding it, else its class name
    kind: str  # `SGD`, `Adam`, ...
    hyperparameters: dict[str, Any]
    steps: int
    params: list[ParamStep]
    budget: int = DELTA_BUDGET  # elements of large parameters copied to measure ‖Δ‖

    @property
    def title(self) -> str:
        """`opt = SGD(lr=0.001)`."""
        hyper = ", ".join(f"{k}={v}" for k, v in self.hyperparameters.items())
        call = f"{self.kind}({hyper})"
        return call if self.name == self.kind else f"{self.name} = {call}"


@dataclass(slots=True)
class _LiveParam:
    ref: Any
    before: Any
    first_copy: torch.Tensor | None  # transient, for `‖Δ‖` of a large parameter
    grad: Any = None
    steps: int = 0


@dataclass(slots=True)
class _LiveOptimizer:
    ref: Any
    kind: str
    hyperparameters: dict[str, Any]
    steps: int = 0
    params: dict[int, _LiveParam] = field(default_factory=dict)
    stepping: list[_LiveParam] = field(default_factory=list)


class OptimizerStepProbe:
    """Records each parameter before an optimizer's first step and after its last.

    Uses torch's global step hooks, so any optimizer stepping in the block is
    seen without the user registering anything.
    """

    def __init__(self, recorder: Any) -> None:
        self.options = recorder.options
        self._naming = recorder.created_names
        self._thread = threading.get_ident()
        self._recorded_grad = recorder.recorded_grad
        self._live: dict[int, _LiveOptimizer] = {}
        self._handles: list[Any] = []
        self._copied = 0
        self.budget = DELTA_BUDGET_COPIES if recorder.options.copies else DELTA_BUDGET

    def __enter__(self) -> OptimizerStepProbe:
        self._thread = threading.get_ident()
        self._handles = [
            register_optimizer_step_pre_hook(self._before_step),
            register_optimizer_step_post_hook(self._after_step),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._naming.release(self)

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # The naming hook is off for the whole step: an optimizer is library code,
        # and a profile hook slows every line of it.
        if threading.get_ident() == self._thread:
            self._naming.hold(self)
        self._note_step(optimizer)

    def _note_step(self, optimizer: Any) -> None:
        live = self._live.get(id(optimizer))
        if live is None or live.ref() is not optimizer:
            group = optimizer.param_groups[0] if optimizer.param_groups else {}
            hyper = {k: group[k] for k in HYPERPARAMETERS if group.get(k) not in (None, 0, False)}
            live = _LiveOptimizer(weakref.ref(optimizer), type(optimizer).__name__, hyper)
            self._live[id(optimizer)] = live
        # Parameters without a gradient are skipped by step(): frozen ones stay out.
        stepping = [
            p for group in optimizer.param_groups for p in group["params"] if p.grad is not None
        ]
        params = live.params
        fresh = [p for p in stepping if id(p) not in params]
        if fresh:
            # A large parameter is copied before the step only to measure how far the step
            # moves it, within the copy budget: a pass over a whole model per step, in
            # fresh memory, is what watching must not cost.
            limit, small, large = self.options.values, [], []
            for p in fresh:
                n = p.numel()
                if n <= limit:
                    small.append(p)
                elif self._copied + n <= self.budget:
                    large.append(p)
                    self._copied += n
            copies = stats.exact_copies(small + large)
            for p in fresh:
                params[id(p)] = _LiveParam(weakref.ref(p), None, None)
            for p, copy in zip(small, copies):
                params[id(p)].before = copy
            for p, copy in zip(large, copies[len(small) :]):
                params[id(p)].first_copy = copy
        live.stepping = [params[id(p)] for p in stepping]
        # The backward already measured these gradients: measure only the others.
        recorded = self._recorded_grad
        grads = [recorded(p) for p in stepping]
        unknown = [p.grad for p, g in zip(stepping, grads) if g is None]
        measured = iter(self._values(unknown) if unknown else ())
        for item, grad in zip(live.stepping, grads):
            item.grad = grad if grad is not None else next(measured)

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # A step that raised never gets here: the hold then ends with the block.
        if threading.get_ident() == self._thread:
            self._naming.release(self)
        # Counted here, not before: a step that raised moved nothing.
        live = self._live.get(id(optimizer))
        if live is None:
            return
        live.steps += 1
        for item in live.stepping:
            item.steps += 1

    def _exact(self, t: torch.Tensor) -> bool:
        # `--copies` is for gradients: parameters are copied exactly only when
        # small, or every step would copy the whole model twice.
        return t.numel() <= self.options.values

    def _values(self, tensors: list[torch.Tensor]) -> list[Any]:
        """Exact copies of small tensors; for large ones only a batched norm.

        Steps run in training loops: one pass per large tensor, not the eight
        of full statistics.
        """
        large = [t for t in tensors if not self._exact(t)]
        summaries = iter(stats.norm_summary(t, n) for t, n in zip(large, stats.norms(large)))
        copies = iter(stats.exact_copies([t for t in tensors if self._exact(t)]))
        return [next(copies) if self._exact(t) else next(summaries) for t in tensors]

    def finish(self, recorder: Any) -> None:
        """Name what stepped; what the steps did is read by `complete_steps`."""
        namer = recorder.namer or Namer(recorder.namespace)
        row_names = {id(r.ref()): r.name for r in recorder.leaves if r.ref() is not None}
        for live in self._live.values():
            optimizer = live.ref()
            items = [(item, item.ref()) for item in live.params.values()]
            items = [(item, p) for item, p in items if p is not None]
            params = []
            for i, (item, p) in enumerate(items):
                name = row_names.get(id(p)) or namer.name(p) or f"param #{i} of {live.kind}"
                step = ParamStep(
                    name, tuple(p.shape), item.grad, item.before, None, None, item.steps
                )
                step.ref, step.pending = weakref.ref(p), (item, p._version)
                params.append(step)
            recorder.optimizer_steps.append(
                OptimizerSteps(
                    _variable_name(recorder.namespace, optimizer) or live.kind,
                    live.kind,
                    live.hyperparameters,
                    live.steps,
                    params,
                    self.budget,
                )
            )
        self._live = {}


def complete_steps(steps: list[OptimizerSteps]) -> None:
    """Values after the last step and how far the steps moved each parameter.

    Small parameters: exact values and their change. Large ones within the copy
    budget: norms after, before and of the change, in one batched pass; past the
    budget, the norm after. Drops every reference the steps held.
    """
    current: list[tuple[ParamStep, _LiveParam, torch.Tensor]] = []
    for step in steps:
        for param in step.params:
            t = param.ref() if param.ref is not None else None
            pending, param.ref, param.pending = param.pending, None, None
            if t is None or pending is None:
                continue
            item, version = pending
            if t._version == version:
                current.append((param, item, t))
                continue
            param.after = CHANGED_SINCE
            if item.first_copy is not None:
                (norm,) = stats.norms([item.first_copy])
                param.before = stats.norm_summary(item.first_copy, norm)
    small = [
        (param, t)
        for param, item, t in current
        if isinstance(item.before, torch.Tensor) and item.before.shape == t.shape
    ]
    moved = [
        (param, item.first_copy, t)
        for param, item, t in current
        if item.first_copy is not None and item.first_copy.shape == t.shape
    ]
    measured = {id(param) for param, _ in small} | {id(param) for param, _, _ in moved}
    rest = [(param, t) for param, _, t in current if id(param) not in measured]
    copies = stats.exact_copies([t for _, t in small])
    tensors = [t for _, _, t in moved]
    befores = [first for _, first, _ in moved]
    # One batched subtraction for every change, small and large.
    diffs = stats.differences(copies + tensors, [param.before for param, _ in small] + befores)
    for (param, _), after, change in zip(small, copies, diffs):
        param.after, param.change = after, change
    found = stats.norms(tensors + befores + diffs[len(small) :] + [t for _, t in rest])
    n = len(moved)
    for k, (param, first, t) in enumerate(moved):
        param.after = stats.norm_summary(t, found[k])
        param.before = stats.norm_summary(first, found[n + k])
        param.change = found[2 * n + k]
    for (param, t), norm in zip(rest, found[3 * n :]):
        param.after = stats.norm_summary(t, norm)


def _variable_name(namespace: Any, obj: Any) -> str | None:
    for key, value in list((namespace or {}).items()):
        if value is obj and isinstance(key, str) and not key.startswith("_"):
            return key
    return None


COMPILE_HOOKS_WARNING = "Using `torch.compile(module)` when there are global hooks on modules"


def _about_our_module_hooks(text: str) -> bool:
    """torch.compile's warning about global module hooks, when the only ones are gradmagic's.

    The user did not register them and would not see it without gradmagic; the hooks
    do nothing while Dynamo traces.
    """
    if not text.startswith(COMPILE_HOOKS_WARNING):
        return False
    from torch.nn.modules import module as module_hooks

    hooks = [
        *module_hooks._global_forward_hooks.values(),
        *module_hooks._global_forward_pre_hooks.values(),
    ]
    return all(getattr(h, "__module__", "").startswith("gradmagic.") for h in hooks)


class WarningProbe:
    """Sees every warning shown during the block and passes it on unchanged.

    Wraps `warnings._showwarnmsg`, which both the Python and the C warning
    machinery call only after the filters chose to show a warning, so what
    the user sees (and what filters, `catch_warnings` or IPython do) is the
    same as without gradmagic.
    """

    def __init__(self, recorder: Any) -> None:
        self.shown: list[tuple[str, str, int]] = []  # (message, filename, lineno)
        self._original: Any = None
        self._active = False

    def _show(self, message: Any) -> Any:
        if self._active:
            if _about_our_module_hooks(str(message.message)):
                return None
            self.shown.append((str(message.message), message.filename, message.lineno))
        return self._original(message)

    def __enter__(self) -> WarningProbe:
        self._original = warnings._showwarnmsg  # type: ignore[attr-defined]
        warnings._showwarnmsg = self._show  # type: ignore[attr-defined]
        self._active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self._active = False
        # If someone wrapped ours meanwhile, leave the chain intact: ours just passes on.
        if warnings._showwarnmsg == self._show:  # type: ignore[attr-defined]
            warnings._showwarnmsg = self._original  # type: ignore[attr-defined]

    def finish(self, recorder: Any) -> None:
        """Which non-leaf `.grad` the block read, from the warnings and the source."""
        reads: list[str] = []
        for message, filename, lineno in self.shown:
            if message.startswith(NONLEAF_WARNING):
                reads += grad_reads(linecache.getline(filename, lineno).strip())
        # A repeated warning is hidden by the filters' registry: the source still tells.
        namespace = recorder.namespace or {}
        for name in grad_reads(recorder.source or ""):
            value = namespace.get(name)
            if isinstance(value, torch.Tensor) and value.grad_fn and not value.retains_grad:
                reads.append(name)
        recorder.nonleaf_grad_reads = list(dict.fromkeys(reads))


def grad_reads(code: str) -> list[str]:
    """The expressions whose `.grad` the code reads: `y.grad` -> `y`."""
    if ".grad" not in code:
        return []
    try:
        tree = ast.parse(code)
    except SyntaxError:
        # A lone line such as `if y.grad is None:` does not parse by itself.
        return re.findall(r"([A-Za-z_][\w.]*)\.grad\b", code)
    return [
        ast.unparse(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr == "grad"
        and isinstance(node.ctx, ast.Load)
    ]


class GradModeProbe:
    """Whether gradients were recorded when the block began (an earlier
    `torch.set_grad_enabled(False)` or inference mode makes every backward fail)."""

    def __init__(self, recorder: Any) -> None:
        self.recorder = recorder

    def __enter__(self) -> GradModeProbe:
        if torch.is_inference_mode_enabled():
            self.recorder.grad_mode = "inference_mode"
        elif not torch.is_grad_enabled():
            self.recorder.grad_mode = "no_grad"
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


capture.EXTRA_PROBES.extend([OptimizerStepProbe, WarningProbe, GradModeProbe])
