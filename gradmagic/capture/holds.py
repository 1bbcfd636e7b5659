"""Process-wide hooks (`sys.setprofile`, `sys.settrace`) that holds switch off and back on.

The naming hook and the line trace are off inside `nn.Module` calls and optimizer
steps (library code, which runs slower under either) and around gradmagic's own
work. Holds nest: a hook comes back when the last hold is released, and only if a
hold removed it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any


class HeldHook(ABC):
    """Mixin for a hook installed with `_set_hook(self._hook_function())`; the class sets
    `_get_hook`/`_set_hook` (e.g. `sys.getprofile`/`sys.setprofile`) and keeps
    `_installed` true while its hook is meant to run."""

    _get_hook: Callable[[], Any]
    _set_hook: Callable[[Any], None]
    _installed: bool

    @abstractmethod
    def _hook_function(self) -> Any:
        """The function this hook installs (compared with what is installed now)."""

    def _reset_holds(self) -> None:
        self._holds: set[object] = set()
        self._held_off = False  # this hook was removed by a hold, to come back on release

    def hold(self, key: object) -> None:
        """Off until `release(key)`."""
        if key in self._holds:
            return
        self._holds.add(key)
        if len(self._holds) == 1 and self._installed and self._get_hook() == self._hook_function():
            self._set_hook(None)
            self._held_off = True

    def release(self, key: object) -> None:
        if key not in self._holds:
            return
        self._holds.discard(key)
        if not self._holds and self._held_off:
            self._held_off = False
            if self._installed and self._get_hook() is None:
                self._set_hook(self._hook_function())


class Holds:
    """Hold several hooks off together (the naming hook and the line trace)."""

    def __init__(self, *hooks: HeldHook) -> None:
        self.hooks = hooks

    def hold(self, key: object) -> None:
        for hook in self.hooks:
            hook.hold(key)

    def release(self, key: object) -> None:
        for hook in self.hooks:
            hook.release(key)
