"""Rules over a watched block's records: what is wrong, in plain words.

Each rule reads the `Recorder` (rows, backward records, history) and yields
`Finding`s. Findings are sorted most serious first. The `kind` strings are
public API (`rep.findings[i].kind`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import stats

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


Rule = Callable[[Any], Iterator[Finding]]
RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def findings_for(recorder: Any) -> list[Finding]:
    """Every finding for a closed recorder, most serious first."""
    found: list[Finding] = []
    for check in RULES:
        try:
            found.extend(check(recorder))
        except Exception as exc:  # noqa: BLE001 - one broken rule must not hide the report
            found.append(
                Finding("internal", "info", f"gradmagic rule {check.__name__} failed: {exc}")
            )
    return sorted(found, key=lambda f: SEVERITY_ORDER.get(f.severity, 3))


def listing(names: list[str], most: int = 4) -> str:
    """`a`, `b` and 3 more."""
    shown = ", ".join(f"`{n}`" for n in names[:most])
    return shown if len(names) <= most else f"{shown} and {len(names) - most} more"


def _optimizer_for(recorder: Any, names: list[str]) -> str | None:
    """The variable name of an optimizer that holds the leaves called `names`."""
    namespace = recorder.namespace or {}
    wanted = {
        id(rec.ref()) for rec in recorder.leaves if rec.name in names and rec.ref() is not None
    }
    for key, value in namespace.items():
        if isinstance(value, torch.optim.Optimizer) and not key.startswith("_"):
            params = {id(p) for group in value.param_groups for p in group["params"]}
            if wanted & params:
                return key
    return None


@rule
def accumulated(recorder: Any) -> Iterator[Finding]:
    rows = [r for r in recorder.rows() if r.status == "accumulated"]
    stale = [r for r in rows if r.before_stale]
    looped = [r for r in rows if r.accumulated_in_block and not r.before_stale]
    if stale:
        names = [r.name for r in stale]
        runs = max(r.runs for r in stale)
        opt = _optimizer_for(recorder, names)
        fix = f"call `{opt}.zero_grad()`" if opt else f"set `{names[0]}.grad = None`"
        earlier = runs - 1
        yield Finding(
            "accumulated",
            "warning",
            f"{listing(names)} {'was' if len(names) == 1 else 'were'} not zeroed: this run added "
            f"to the gradient left by {earlier} earlier run{'s' if earlier != 1 else ''} "
            f"({runs} runs now sum in `.grad`). Forgotten `zero_grad()`? To start afresh, "
            f"{fix} before `backward()`.",
            tuple(names),
        )
    if looped:
        names = [r.name for r in looped]
        count = max(r.backwards for r in looped)
        opt = _optimizer_for(recorder, names)
        fix = f"`{opt}.zero_grad()`" if opt else "`.grad = None`"
        yield Finding(
            "accumulated",
            "warning",
            f"backward ran {count} times in this cell and {listing(names)} summed every one: "
            f"nothing zeroed the gradient in between. If each step should start afresh, "
            f"call {fix} before each `backward()`.",
            tuple(names),
        )


@rule
def no_grad(recorder: Any) -> Iterator[Finding]:
    rows = [r for r in recorder.rows() if r.status == "none"]
    if not rows:
        return
    names = [r.name for r in rows]
    yield Finding(
        "no-grad",
        "warning",
        f"{listing(names)} required grad but received none: "
        f"{'it was' if len(names) == 1 else 'they were'} not used in the loss, or the graph to "
        f"{'it' if len(names) == 1 else 'them'} is cut (a `detach()`, `.data`, "
        f"`torch.no_grad()`, or `requires_grad_(False)`).",
        tuple(names),
    )


def _nonfinite_counts(value: Any) -> tuple[int, int] | None:
    if isinstance(value, torch.Tensor):
        v = value.detach().float() if not value.is_complex() else value.detach().abs()
        return int(torch.isnan(v).sum()), int(torch.isinf(v).sum())
    if isinstance(value, stats.TensorSummary) and value.nan is not None:
        return value.nan, value.inf or 0
    return None


@rule
def nan_inf(recorder: Any) -> Iterator[Finding]:
    for r in recorder.rows():
        if r.status != "nan/inf":
            continue
        counts = _nonfinite_counts(r.after)
        if counts:
            nan, inf = counts
            what = " and ".join(
                part for part in (f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else "") if part
            )
        else:
            what = "NaN or Inf"
        yield Finding(
            "nan-inf",
            "error",
            f"`{r.name}.grad` has {what} (of {r.numel} elements): an operation on the way from "
            f"the loss produced a non-finite gradient (log or division of 0, sqrt at 0, overflow).",
            (r.name,),
        )


@rule
def autograd_grad(recorder: Any) -> Iterator[Finding]:
    for record in recorder.records:
        if record.kind != "grad":
            continue
        inputs = [n for n in (record.inputs or []) if n]
        shown = []
        for name, value in zip(inputs, record.results or []):
            shown.append(f"d/d`{name}` = {stats.format_value(value)}")
        results = "; ".join(shown) if shown else "its results"
        yield Finding(
            "autograd-grad",
            "info",
            f"`torch.autograd.grad` was called: it returned {results}. Its results are returned, "
            f"not stored in `.grad`, so `.grad` was not touched.",
            tuple(inputs),
        )


@rule
def custom_gradient(recorder: Any) -> Iterator[Finding]:
    for record in recorder.records:
        if record.kind != "backward" or record.gradient is None:
            continue
        vector = ", ".join(stats.format_value(g) for g in record.gradient)
        roots = [r for r in record.roots if r]
        root = roots[0] if roots else "output"
        yield Finding(
            "custom-gradient",
            "info",
            f"backward was given `gradient=v` with v = `{vector}`: each leaf received the "
            f"vector-Jacobian product `vᵀ·∂{root}/∂leaf`, the gradient of `(v * {root}).sum()`, "
            f"not a gradient of `{root}` itself.",
            tuple(roots),
        )


@rule
def no_backward(recorder: Any) -> Iterator[Finding]:
    if not recorder.records:
        yield Finding(
            "no-backward",
            "info",
            "No backward ran in this cell: nothing reached the autograd engine.",
        )
