"""Per-leaf memory across cell runs, held through weak references only.

A leaf's history remembers what its `.grad` held when the last watched run
ended, by content, and how many runs had added to it. If the next run finds the
same content, nobody zeroed it in between: this run adds to it. Nothing here
keeps a user's tensor alive.
"""

from __future__ import annotations

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
    trajectory: Any = None  # ‖.grad‖ after each backward of the run (a loop), compacted


@dataclass(slots=True)
class LeafHistory:
    runs: int = 0  # cell runs that had added to `end`
    end: Any = None  # the value `.grad` held when the last watched run ended
    entries: deque = field(default_factory=lambda: deque(maxlen=MAX_ENTRIES))


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

    def record(self, leaf: torch.Tensor, entry: RunEntry, end: Any) -> None:
        """Remember what this run did and what `.grad` held when it ended."""
        item = self._leaves.get(leaf)
        if item is None:
            item = self._leaves[leaf] = LeafHistory()
        item.runs = entry.runs
        item.end = end
        item.entries.append(entry)

    def entries(self, leaf: torch.Tensor) -> list[RunEntry]:
        item = self._leaves.get(leaf)
        return list(item.entries) if item is not None else []

    def reset(self) -> None:
        self._leaves = WeakIdMap()
        self.cell_runs = 0


default_history = History()
