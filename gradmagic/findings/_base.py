"""The `Finding` record, the rule registry and the phrasing helpers every family uses."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..records import BackwardRecord, BlockRecord, LeafRecord

SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


@dataclass(frozen=True)
class Finding:
    """One thing gradmagic noticed. `message` is a sentence; `tensors` are row names."""

    kind: str
    severity: str  # "error", "warning" or "info"
    message: str
    tensors: tuple[str, ...] = field(default_factory=tuple)

    def __str__(self) -> str:
        return f"[{self.severity}] {self.message}"


Rule = Callable[[BlockRecord], Iterator[Finding]]
RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def listing(names: list[str], most: int = 4) -> str:
    """`a`, `b` and 3 more."""
    quoted = [f"`{n}`" for n in names[:most]]
    if len(names) > most:
        return f"{', '.join(quoted)} and {len(names) - most} more"
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def sci(x: float) -> str:
    """A number in a sentence: `0.0041`, `3.1e-19`, `2e+05`."""
    text = f"{x:.2g}"
    return re.sub(r"e([+-])0(\d)", r"e\1\2", text)


def root(record: BackwardRecord) -> str | None:
    """The name of what a backward started from (`loss`), if it has one."""
    return next((r for r in record.roots if r), None)


def call(record: BackwardRecord) -> str:
    """How the user spelled a backward: `loss.backward()`."""
    if record.kind == "grad":
        return "`torch.autograd.grad(...)`"
    name = root(record)
    return f"`{name}.backward()`" if name else "`backward()`"


def errors(block: BlockRecord, text: str) -> list[BackwardRecord]:
    return [r for r in block.backwards if r.error and text in r.error]


def optimizer_of(rows: list[LeafRecord]) -> str | None:
    """The variable name of an optimizer holding these leaves."""
    return next((r.optimizer for r in rows if r.optimizer), None)


def fix(rows: list[LeafRecord]) -> str:
    """How to start a gradient afresh, in the user's names."""
    opt = optimizer_of(rows)
    return f"call `{opt}.zero_grad()`" if opt else f"set `{rows[0].name}.grad = None`"


def used_value(rec: LeafRecord) -> Any:
    """The gradient as it was put to use: what the last optimizer step used, else the
    last non-empty value after the last backward (after a clip or an unscale)."""
    if rec.stepped:
        return rec.used
    value = rec.after
    for change in rec.later:
        if change.what in ("set to None", "zeroed"):
            break
        value = change.after
    return value
