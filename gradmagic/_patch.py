"""`Patch`: attributes replaced while watched blocks run, and put back after the last."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class Patch:
    """Attributes replaced while at least one block is watched and put back after the last
    (reference counted: nested blocks share one replacement)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved: list[tuple[Any, str, Any]] = []

    def apply(self, replacements: Callable[[], list[tuple[Any, str, Any]]]) -> None:
        """Count one user; the first replaces each (owner, attribute) with the new value."""
        with self._lock:
            self._users += 1
            if self._users > 1:
                return
            for owner, attr, new in replacements():
                self._saved.append((owner, attr, own_attribute(owner, attr)))
                setattr(owner, attr, new)

    def undo(self) -> None:
        """Count one user off; the last puts every original back."""
        with self._lock:
            if self._users == 0:
                return
            self._users -= 1
            if self._users:
                return
            while self._saved:
                owner, attr, original = self._saved.pop()
                setattr(owner, attr, original)

    def original(self, owner: Any, attr: str) -> Any:
        for o, a, original in self._saved:
            if o is owner and a == attr:
                return original
        return own_attribute(owner, attr)


def own_attribute(owner: Any, attr: str) -> Any:
    """An attribute as set on `owner`: from a class's own dict, a function, not a bound or
    inherited one."""
    return owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
