"""`ModuleCalls`: the block's module hooks, which note the modules that ran and feed the
graph's `ModuleSpans`."""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch import nn

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
        except Exception as exc:  # noqa: BLE001
            self._errors.append(f"module hook: {type(exc).__name__}: {exc}")
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
