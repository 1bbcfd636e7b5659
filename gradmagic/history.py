"""Per-leaf memory across cell runs, held through weak references only.

A leaf's history remembers which gradient tensor the last watched run left in
`.grad` and its `_version`. Accumulation without `create_graph` happens in
place, so if the next run finds the same tensor at the same version, nobody
zeroed it: this run adds to it. Nothing here keeps a user's tensor alive.
"""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from ._weak import WeakIdMap

MAX_ENTRIES = 50


@dataclass(slots=True)
class RunEntry:
    """What one watched cell run did to one leaf's gradient."""

    run: int
    before: Any
    after: Any
    added: Any
    status: str
    runs: int


@dataclass(slots=True)
class LeafHistory:
    runs: int = 0
    grad_ref: weakref.ref | None = None
    grad_version: int = -1
    entries: deque = field(default_factory=lambda: deque(maxlen=MAX_ENTRIES))

    def left_this_grad(self, grad: torch.Tensor | None) -> bool:
        """True if `grad` is exactly what the last watched run left, untouched since."""
        if grad is None or self.grad_ref is None:
            return False
        return self.grad_ref() is grad and grad._version == self.grad_version


class History:
    """Run counts and per-run entries for every leaf gradmagic has seen."""

    def __init__(self) -> None:
        self._leaves = WeakIdMap()
        self.cell_runs = 0

    def __len__(self) -> int:
        return len(self._leaves)

    def get(self, leaf: torch.Tensor) -> LeafHistory | None:
        return self._leaves.get(leaf)

    def new_run(self) -> int:
        self.cell_runs += 1
        return self.cell_runs

    def record(self, leaf: torch.Tensor, entry: RunEntry) -> None:
        """Remember the gradient `leaf` holds now, and what this run did."""
        item = self._leaves.get(leaf)
        if item is None:
            item = self._leaves[leaf] = LeafHistory()
        grad = leaf.grad
        item.runs = entry.runs
        item.grad_ref = weakref.ref(grad) if grad is not None else None
        item.grad_version = grad._version if grad is not None else -1
        item.entries.append(entry)

    def entries(self, leaf: torch.Tensor) -> list[RunEntry]:
        item = self._leaves.get(leaf)
        return list(item.entries) if item is not None else []

    def reset(self) -> None:
        self._leaves = WeakIdMap()
        self.cell_runs = 0


default_history = History()
