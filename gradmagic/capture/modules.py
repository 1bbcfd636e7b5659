"""`ModuleCalls`: the block's module hooks, which note the modules that ran and feed the
graph's `ModuleSpans`."""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..graph.modules import ModuleSpans, install_module_hooks


class ModuleCalls:
    """The block's one pair of global `nn.Module` hooks.

    Notes which modules ran a forward with grad enabled (weakly held), feeds
    module calls to `spans` (a `ModuleSpans`, when a graph is drawn) and holds the
    `naming` hook off inside module calls: library code, where it would only cost
    time. Both hooks return at once under torch.compile tracing (Dynamo never meets
    their untraceable calls) and on other threads.
    """

    def __init__(self, naming: Any, spans: ModuleSpans | None, errors: list[str]) -> None:
        # id(module) -> weak reference, for modules called with grad enabled. An entry
        # whose module died is simply never matched again.
        self._called: dict[int, weakref.ref] = {}
        # id(DDP) -> [weak reference, forwards that will all-reduce, forwards under no_sync()]
        self.ddp_calls: dict[int, list[Any]] = {}
        # DDP modules whose synchronised forward ran since the last backward began.
        self.ddp_pending: list[weakref.ref] = []
        self._handles: list[Any] = []
        self._open: list[nn.Module] = []  # calls in progress, outermost first
        self._spans = spans
        self._naming = naming
        self._errors = errors
        self._thread = threading.get_ident()

    def _enter(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling() or threading.get_ident() != self._thread:
            return
        try:
            if not self._open:
                self._naming.hold(self)
            self._open.append(module)
            if self._spans is not None:
                self._spans.enter(module)
        except Exception as exc:  # noqa: BLE001 - never into the user's forward
            self._errors.append(f"module hook: {type(exc).__name__}: {exc}")

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling() or threading.get_ident() != self._thread:
            return
        try:
            if torch.is_grad_enabled():
                if module not in self:
                    self._called[id(module)] = weakref.ref(module)
                if isinstance(module, DDP):
                    self._note_ddp(module)
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
        except Exception as exc:  # noqa: BLE001
            self._errors.append(f"module hook: {type(exc).__name__}: {exc}")
        # None: a forward hook that returns something replaces the output

    def _note_ddp(self, module: nn.Module) -> None:
        """A DDP forward with gradients on: whether its backward will all-reduce, read
        from the flag `no_sync()` sets (as DDP's own forward read it)."""
        entry = self.ddp_calls.get(id(module))
        if entry is None or entry[0]() is not module:
            entry = self.ddp_calls[id(module)] = [weakref.ref(module), 0, 0]
        synced = bool(getattr(module, "require_backward_grad_sync", True))
        entry[1 if synced else 2] += 1
        if synced and all(ref() is not module for ref in self.ddp_pending):
            self.ddp_pending.append(weakref.ref(module))

    def take_ddp_pending(self) -> list[nn.Module]:
        """The DDP modules whose synchronised forward a backward starting now reduces."""
        pending, self.ddp_pending = self.ddp_pending, []
        return [m for m in (ref() for ref in pending) if m is not None]

    def ddp_modules(self) -> list[tuple[nn.Module, int, int]]:
        """The DDP modules that ran a forward with gradients on, alive, with their counts
        of synchronised and `no_sync()` forwards."""
        out = []
        for ref, synced, unsynced in self.ddp_calls.values():
            module = ref()
            if module is not None:
                out.append((module, synced, unsynced))
        return out

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
