"""Probes that watch a block beside the engine wrapper: optimizer steps, warnings, grad mode.

Each is a context manager that undoes in `__exit__` everything it installed.
After the block no probe holds a user's tensor beyond small copies.
"""

from __future__ import annotations

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

from .. import _engine, stats

# Hyperparameters worth showing beside an optimizer's name, when set.
HYPERPARAMETERS = ("lr", "momentum", "betas", "weight_decay")
# Elements of large parameters copied to measure how far the steps moved them (`‖Δ‖`).
# Past this budget (256 KiB of float32; 4 MiB with copies=True) only norms are kept:
# copying a large model before every step costs its size in fresh memory.
DELTA_BUDGET = 1 << 16
DELTA_BUDGET_COPIES = 1 << 20
NONLEAF_WARNING = "The .grad attribute of a Tensor that is not a leaf Tensor"


@dataclass(slots=True)
class LiveParam:
    ref: Any
    before: Any  # a copy of a small parameter before its first step
    first_copy: torch.Tensor | None  # transient, for `‖Δ‖` of a large parameter
    grad: Any = None  # the value its last step used
    steps: int = 0
    part: str = ""  # a DTensor's: the copies hold this process's part ("this rank's shard")
    version: int = -1  # its `_version` after its last step


@dataclass(slots=True)
class LiveOptimizer:
    ref: Any
    kind: str
    hyperparameters: dict[str, Any]
    steps: int = 0
    params: dict[int, LiveParam] = field(default_factory=dict)
    stepping: list[tuple[LiveParam, Any]] = field(default_factory=list)
    closure: bool = False  # the step in progress was given a closure


class OptimizerStepProbe:
    """Reads every gradient an optimizer step uses, and each parameter before its first step.

    Uses torch's global step hooks, so any optimizer stepping in the block is seen
    without the user registering anything.
    """

    def __init__(self, recorder: Any) -> None:
        self.recorder = recorder
        self.live: dict[int, LiveOptimizer] = {}
        self._handles: list[Any] = []
        self._copied = 0
        self.budget = DELTA_BUDGET_COPIES if recorder.options.copies else DELTA_BUDGET

    def __enter__(self) -> OptimizerStepProbe:
        self._handles = [
            register_optimizer_step_pre_hook(self._before_step),
            register_optimizer_step_post_hook(self._after_step),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.recorder.holds.release(self)

    def _mine(self) -> bool:
        recorder = self.recorder
        return not recorder.closed and threading.get_ident() == recorder._thread

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._mine() or torch.compiler.is_compiling():
            return
        # The naming hook is off for the whole step: an optimizer is library code.
        self.recorder.holds.hold(self)
        # A closure (LBFGS) computes the gradients inside the step: they are read when
        # the step returns, as the step left them.
        # `args` is what step() was given, the optimizer first.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        with _engine.quiet():
            self.recorder.guard(self._note_step, optimizer, not callable(closure))

    def _live(self, optimizer: Any) -> LiveOptimizer:
        live = self.live.get(id(optimizer))
        if live is None or live.ref() is not optimizer:
            group = optimizer.param_groups[0] if optimizer.param_groups else {}
            hyper = {k: group[k] for k in HYPERPARAMETERS if group.get(k) not in (None, 0, False)}
            live = LiveOptimizer(weakref.ref(optimizer), type(optimizer).__name__, hyper)
            self.live[id(optimizer)] = live
        return live

    def _note_step(self, optimizer: Any, read_now: bool) -> None:
        live = self._live(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        # Parameters without a gradient are skipped by step(): frozen ones stay out. With
        # a closure, any that requires grad may get one inside the step.
        if read_now:
            stepping = [p for p in params if p.grad is not None]
        else:
            stepping = [p for p in params if p.requires_grad]
        fresh = [p for p in stepping if id(p) not in live.params]
        if fresh:
            self._copy_before(live, fresh)
        live.stepping = []
        if read_now:
            self._read_step(live, stepping, "before the optimizer step")
        else:
            live.closure = True

    def _read_step(self, live: LiveOptimizer, stepping: list[torch.Tensor], when: str) -> None:
        """Read the gradients a step uses, as one reading for all of them."""
        recorder = self.recorder
        values = recorder.read([p.grad for p in stepping], copies=False)
        clock = recorder.tick()
        for p, value in zip(stepping, values):
            track = recorder.track(p)
            track.at_step(value, clock, recorder.edits_since(track.last_clock), when)
            item = live.params[id(p)]
            item.grad = track.record.used
            live.stepping.append((item, p))

    def _copy_before(self, live: LiveOptimizer, fresh: list[torch.Tensor]) -> None:
        """Copies of parameters before their first step: small ones whole, large ones
        within the copy budget, to measure how far the steps moved them."""
        limit, small, large = self.recorder.options.values, [], []
        parts: dict[int, str] = {}
        for p in fresh:
            v, note = stats.computable(p)
            if v is None or (note and not note.startswith(stats.PART)):
                continue
            if note:
                parts[id(p)] = note  # a shard is measured by norms, and said to be one
            n = v.numel()
            if n <= limit and not note:
                small.append(p)
            elif self._copied + n <= self.budget:
                large.append(p)
                self._copied += n
        copies = stats.exact_copies(small + large)
        for p in fresh:
            live.params[id(p)] = LiveParam(weakref.ref(p), None, None, part=parts.get(id(p), ""))
        for p, copy in zip(small, copies):
            live.params[id(p)].before = copy
        for p, copy in zip(large, copies[len(small) :]):
            live.params[id(p)].first_copy = copy

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._mine() or torch.compiler.is_compiling():
            return
        self.recorder.holds.release(self)
        # Counted here, not before: a step that raised moved nothing.
        live = self.live.get(id(optimizer))
        if live is None:
            return
        if live.closure:
            live.closure = False
            params = [p for group in optimizer.param_groups for p in group["params"]]
            stepping = [p for p in params if p.grad is not None and id(p) in live.params]
            with _engine.quiet():
                when = "when the step returned (its closure computed the gradients)"
                self.recorder.guard(self._read_step, live, stepping, when)
        live.steps += 1
        for item, p in live.stepping:
            item.steps += 1
            item.version = p._version
        live.stepping = []


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
    machinery call only after the filters chose to show a warning, so what the
    user sees (and what filters, `catch_warnings` or IPython do) is the same as
    without gradmagic.
    """

    def __init__(self, errors: list[str]) -> None:
        self.shown: list[tuple[str, str, int]] = []  # (message, filename, lineno)
        self._errors = errors
        self._original: Any = None
        self._active = False

    def _show(self, message: Any) -> Any:
        if self._active:
            try:
                text = str(message.message)
                if _about_our_module_hooks(text):
                    return None
                self.shown.append((text, message.filename, message.lineno))
            except Exception as exc:  # noqa: BLE001
                self._errors.append(f"warning probe: {type(exc).__name__}: {exc}")
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


class GradModeProbe:
    """Whether gradients were recorded when the block began (an earlier
    `torch.set_grad_enabled(False)` or inference mode makes every backward fail)."""

    def __init__(self) -> None:
        self.mode = "enabled"

    def __enter__(self) -> GradModeProbe:
        if torch.is_inference_mode_enabled():
            self.mode = "inference_mode"
        elif not torch.is_grad_enabled():
            self.mode = "no_grad"
        return self

    def __exit__(self, *exc: Any) -> None:
        return None
