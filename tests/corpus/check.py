"""Does each `%%grad` report say only what is so? Checked in the kernel against `truth`.

`truth_check(namespace, record)` is an `extra_checks` callable (see `probe.py`): after a
target cell it reads the report `%%grad -q -o _gm_rep` stored and the truth recorder's
record of the same cell, and returns {"checked": how many values and findings it
compared, "mismatches": what the report got wrong, "kinds": the finding kinds}. It
returns None in the plain run (there is no report).

What it holds the report to:
- every row's `before` is `.grad` before the cell's first backward that reached the leaf,
  `after` after the last one, `end` when the cell ended, and `used` what the last
  optimizer step used (when a step came after the last backward), all by content: exact
  copies bit for bit, summaries by shape and norm (to 3e-6 of the float64 norm);
- statuses agree with what happened (`none`: no gradient arrived; `nan/inf`: the gradient
  holds one; `accumulated`: some backward added to a gradient already there);
- the optimizer-step table's gradient, before and after values and step counts;
- each finding's claim holds for the tensors it names; a finding of a kind this check
  cannot verify is itself a mismatch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

REPORT = "_gm_rep"
NORM_TOLERANCE = 3e-6


def _norm(t: torch.Tensor) -> float:
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    return float(t.to(torch.complex128 if t.is_complex() else torch.float64).abs().norm())


def _nonfinite(t: torch.Tensor | None) -> bool:
    if t is None:
        return False
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    return t.numel() > 0 and not bool(torch.isfinite(t).all())


def _empty(t: torch.Tensor | None) -> bool:
    if t is None:
        return True
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    return t.numel() > 0 and not bool(t.any())


def agree(shown: Any, truth: torch.Tensor | None) -> str | None:
    """None when the report's value is the true one; else what differs."""
    from gradmagic import stats

    if shown is None or truth is None:
        return None if shown is None and truth is None else f"{_say(shown)} vs true {_say(truth)}"
    if isinstance(shown, torch.Tensor):
        a, b = shown.detach(), truth.detach()
        if a.layout != torch.strided:
            a = a.to_dense()
        if b.layout != torch.strided:
            b = b.to_dense()
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{_say(shown)} vs true {_say(truth)}"
        same = (a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b
        return None if bool(same.all()) else f"{_say(shown)} vs true {_say(truth)}"
    if isinstance(shown, stats.TensorSummary):
        if shown.shape is not None and tuple(shown.shape) != tuple(truth.shape):
            return f"shape {shown.shape} vs true {tuple(truth.shape)}"
        if shown.norm is None:
            return None if shown.note else "a summary with no norm and no note"
        true = _norm(truth)
        if math.isnan(true) or math.isinf(true):
            return None if not math.isfinite(shown.norm) or shown.nonfinite else "finite norm"
        if abs(shown.norm - true) > NORM_TOLERANCE * true + 1e-30:
            return f"norm {shown.norm!r} vs true {true!r}"
        if shown.min is not None and truth.numel() and not truth.is_complex():
            lo, hi = (float(x) for x in torch.aminmax(truth.detach().reshape(-1).double()))
            if (shown.min, shown.max) != (lo, hi):
                return f"range [{shown.min!r}, {shown.max!r}] vs true [{lo!r}, {hi!r}]"
        return None
    return f"a value of type {type(shown).__name__}"


def _near(after: torch.Tensor, added: torch.Tensor, start: torch.Tensor | None) -> bool:
    """Whether `after - added` is `start` (None: zeros), to float rounding."""
    if added.layout != torch.strided or after.layout != torch.strided:
        return True  # sparse: not checked
    base = (after - added).double()
    begin = torch.zeros_like(base) if start is None else start.detach().double()
    if begin.shape != base.shape:
        return False
    scale = float(after.double().abs().max()) if after.numel() else 0.0
    tolerance = 4 * torch.finfo(after.dtype).eps * scale
    return bool(((base - begin).abs() <= tolerance).all())


def _say(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)} norm {_norm(value):.6g}"
    return str(value)


class _Leaf:
    """One leaf's true history in the cell, from the truth record's events.

    A step's gradient is `.grad` when the step began, or when it returned for a step
    whose closure ran backwards inside it (LBFGS): the closure computes the gradient.
    """

    def __init__(self, events: list[tuple[Any, ...]], closures: set[int]) -> None:
        events = [
            (*e[:2], e[5], *e[3:5]) if e[0] == "step" and e[1] in closures else e for e in events
        ]
        self.befores = [e[2] for e in events if e[0] in ("backward_before", "grad_before")]
        self.added_befores = [e[2] for e in events if e[0] == "backward_before"]
        afters = [(i, e[2]) for i, e in enumerate(events) if e[0] == "backward_after"]
        self.afters = [v for _, v in afters]
        last = afters[-1][0] if afters else -1
        self.steps = [e for e in events if e[0] == "step"]
        late = [e for i, e in enumerate(events) if e[0] == "step" and i > last]
        self.used = late[-1][2] if late else None
        self.stepped = bool(late)
        ends = [e[1] for e in events if e[0] == "end"]
        self.end = ends[-1] if ends else None
        self.ended = bool(ends)
        # Backwards between consecutive steps, and whether any added to a stale gradient.
        self.cycles, count = [], 0
        for e in events:
            if e[0] == "backward_after":
                count += 1
            elif e[0] == "step":
                self.cycles.append(count)
                count = 0


def truth_check(namespace: Mapping[str, Any], record: Any) -> dict[str, Any] | None:
    report = namespace.get(REPORT)
    if report is None or record is None or getattr(report, "block", None) is None:
        return None
    checker = _Check(report, record)
    checker.rows()
    checker.steps()
    checker.findings()
    return {
        "checked": checker.checked,
        "mismatches": checker.mismatches,
        "kinds": sorted({f.kind for f in report.findings}),
    }


class _Check:
    def __init__(self, report: Any, record: Any) -> None:
        self.report, self.record = report, record
        self.checked = 0
        self.mismatches: list[str] = []
        self.by_name: dict[str, tuple[Any, _Leaf | None]] = {}
        self.closures = {s.index for s in record.steps if s.calls_during}

    def expect(self, where: str, shown: Any, truth: torch.Tensor | None) -> None:
        self.checked += 1
        problem = agree(shown, truth)
        if problem:
            self.mismatches.append(f"{where}: {problem}")

    def claim(self, ok: bool, what: str) -> None:
        self.checked += 1
        if not ok:
            self.mismatches.append(what)

    def rows(self) -> None:
        for row in self.report.rows:
            tensor = row.tensor()
            if tensor is None:
                continue
            leaf = self.record.leaf_for(tensor)
            history = _Leaf(leaf.events, self.closures) if leaf is not None else None
            self.by_name[row.name] = (row, history)
            where = f"row {row.name!r}"
            if row.status == "none":
                got = history is not None and any(v is not None for v in history.afters)
                self.claim(not got, f"{where}: status none, but a gradient arrived")
                continue
            if history is None or not history.befores:
                self.mismatches.append(f"{where}: no backward reached it in the true record")
                continue
            self.expect(f"{where} before", row.before, history.befores[0])
            if history.afters:
                self.expect(f"{where} after", row.after, history.afters[-1])
            if history.ended and row.end_read:
                self.expect(f"{where} end", row.end, history.end)
            self.claim(
                row.stepped == history.stepped,
                f"{where}: stepped={row.stepped} but a step after the last backward: "
                f"{history.stepped}",
            )
            if row.stepped and history.stepped:
                self.expect(f"{where} used by the step", row.used, history.used)
            if row.status == "nan/inf":
                self.claim(_nonfinite(history.afters[-1]), f"{where}: nan/inf, but finite")
            if row.status == "accumulated":
                stale = [v for v in history.added_befores if not _empty(v)]
                self.claim(
                    bool(stale) or not _empty(row.before),
                    f"{where}: accumulated, but every backward started from an empty gradient",
                )
            if isinstance(row.added, torch.Tensor) and isinstance(row.after, torch.Tensor):
                # `added` is `after - start`, rounded: start is a value held before a backward.
                self.claim(
                    any(_near(row.after, row.added, v) for v in [*history.befores, None]),
                    f"{where}: after - added is no value the gradient held before a backward",
                )

    def steps(self) -> None:
        for opt in self.report.steps:
            for param in opt.params:
                tensor = param.tensor()
                leaf = self.record.leaf_for(tensor) if tensor is not None else None
                if leaf is None:
                    continue
                steps = _Leaf(leaf.events, self.closures).steps
                where = f"step table {param.name!r}"
                self.claim(
                    len(steps) == param.steps, f"{where}: {param.steps} steps vs {len(steps)}"
                )
                if steps:
                    self.expect(f"{where} grad", param.grad, steps[-1][2])
                    if param.before is not None:  # past the copy budget: not measured
                        self.expect(f"{where} before", param.before, steps[0][3])
                if getattr(param.after, "norm", 0.0) is not None:  # None: not measured
                    self.expect(f"{where} after", param.after, tensor.detach())

    def _histories(self, finding: Any) -> list[tuple[Any, _Leaf | None]]:
        return [self.by_name[n] for n in finding.tensors if n in self.by_name]

    def findings(self) -> None:
        calls = self.record.calls
        for f in self.report.findings:
            named = self._histories(f)
            what = f"finding {f.kind}: {f.message[:160]}"
            if f.kind == "accumulated":
                self.claim(
                    all(
                        h is not None
                        and (any(not _empty(v) for v in h.added_befores) or not _empty(r.before))
                        for r, h in named
                    ),
                    f"{what}: a named gradient never had a backward add to it",
                )
            elif f.kind == "gradient-accumulation":
                self.claim(
                    all(h is not None and max(h.cycles, default=0) > 1 for _, h in named),
                    f"{what}: no step used the sum of several backwards",
                )
            elif f.kind == "no-grad":
                self.claim(
                    all(h is None or all(v is None for v in h.afters) for _, h in named),
                    f"{what}: a named leaf did receive a gradient",
                )
            elif f.kind == "nan-inf":
                self.claim(
                    all(h is not None and h.afters and _nonfinite(h.afters[-1]) for _, h in named),
                    f"{what}: a named gradient is finite",
                )
            elif f.kind in ("vanishing", "exploding", "before-batchnorm"):
                self._norm_finding(f, named, what)
            elif f.kind == "changed-after-backward":
                self.claim(
                    all(h is not None and h.afters and self._changed_later(h) for _, h in named),
                    f"{what}: a named gradient did not change after its last backward",
                )
            elif f.kind == "optimizer-step":
                self.claim(bool(self.record.steps), f"{what}: no optimizer step ran")
            elif f.kind == "autograd-grad":
                self.claim(any(c.kind == "grad" for c in calls), f"{what}: no grad call")
            elif f.kind == "custom-gradient":
                self.claim(
                    any(c.kind == "backward" and c.gradient for c in calls),
                    f"{what}: no backward was given a gradient",
                )
            elif f.kind == "retain-graph":
                self.claim(any(c.retain_graph for c in calls), f"{what}: no retain_graph")
            elif f.kind in ("double-backward", "failed-backward", "grad-disabled"):
                self.claim(any(c.error for c in calls), f"{what}: no backward raised")
            elif f.kind == "no-backward":
                self.claim(not calls and not self.record.steps, f"{what}: a backward ran")
            elif f.kind in ("skipped-step", "nonleaf-grad", "not-observed"):
                self.checked += 1  # said from gradmagic's own records of the call
            else:
                self.mismatches.append(f"{what}: no check for this kind")

    @staticmethod
    def _changed_later(h: _Leaf) -> bool:
        last = h.afters[-1]
        later = [s[2] for s in h.steps] + ([h.end] if h.ended else [])
        return any(agree(last, v) is not None for v in later if v is not None)

    def _norm_finding(self, f: Any, named: list, what: str) -> None:
        """Each named gradient, as put to use, is finite and as small or as large as said."""
        options = self.report.block.options
        scaled = "GradScaler" in f.message
        for row, h in named:
            value = h.used if h is not None and h.stepped else (h.end if h is not None else None)
            if value is None or _empty(value):
                value = h.afters[-1] if h is not None and h.afters else None
            if value is None:
                self.mismatches.append(f"{what}: {row.name} has no gradient")
                continue
            norm = _norm(value)
            self.checked += 1
            if scaled or " of `" in f.message or " times `" in f.message:
                continue  # a layer comparison, or norms with a loss scale divided out
            if f.kind in ("vanishing", "before-batchnorm") and not norm < options.vanish:
                self.mismatches.append(f"{what}: {row.name} norm {norm:.3g} is not that small")
            if f.kind == "exploding" and not norm > options.explode:
                self.mismatches.append(f"{what}: {row.name} norm {norm:.3g} is not that large")
