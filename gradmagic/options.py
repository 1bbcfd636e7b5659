"""What a watched block records and shows. The magic's flags map one to one onto these."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .stats import DEFAULT_VALUES


@dataclass
class Options:
    values: int = DEFAULT_VALUES  # keep exact values of gradients with at most this many elements
    copies: bool = False  # keep exact copies of every gradient
    only: re.Pattern[str] | None = None  # show only leaves whose name matches
    graph: bool = True
    max_nodes: int = 60
    depth: int | None = None
    flow_budget: int = 150
    # Findings' thresholds on gradient norms, and the gradient-flow chart (None: automatic).
    vanish: float = 1e-8
    explode: float = 1e4
    ratio: float = 1e4
    plot: bool | None = None
    # The cross-rank consistency check, and how long it waits for the other ranks.
    check_ranks: bool = False
    rank_timeout: float = 60.0
    # The backward step by step (small graphs), and gradcheck on custom autograd Functions.
    steps: bool = False
    check: bool = False
    # Source lines of the graph's ops: None on up to a budget of ops, True always, False off.
    lines: bool | None = None

    def __post_init__(self) -> None:
        timeout = self.rank_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"rank_timeout must be a number of seconds above 0, not {timeout!r}.")
        if self.steps and not self.graph:
            raise ValueError("steps=True shows the graph's ops: it needs graph=True.")
        if self.lines not in (None, True, False):
            raise ValueError(
                f"lines must be True (always), False (never) or None (up to a budget of ops), "
                f"not {self.lines!r}."
            )
        if isinstance(self.values, bool) or not isinstance(self.values, int) or self.values < 0:
            raise ValueError(f"values must be a whole number >= 0, not {self.values!r}.")
        if isinstance(self.only, str):
            try:
                self.only = re.compile(self.only)
            except re.error as exc:
                raise ValueError(
                    f"only={self.only!r} is not a valid regular expression: {exc}."
                ) from None
