"""Optimizer steps: what they did, steps a GradScaler skipped, and gradients changed
between backward and step."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .. import stats
from ..records import BlockRecord, LeafRecord, rows
from ._base import Finding, listing, plural, rule, sci


@rule
def optimizer_step(block: BlockRecord) -> Iterator[Finding]:
    for step in block.steps:
        # Only the tiniest tensors fit in a sentence; the step table holds the rest.
        tiny = [
            p for p in step.params if isinstance(p.after, torch.Tensor) and p.after.numel() <= 4
        ]
        # Parameters that moved first: a bias whose gradient was 0 says little.
        tiny.sort(key=lambda p: not (isinstance(p.change, torch.Tensor) and bool(p.change.any())))
        moved = "; ".join(
            f"`{p.name}`: {stats.format_value(p.before)} → {stats.format_value(p.after)}"
            for p in tiny[:2]
        )
        detail = f": {moved}" if moved else ""
        count = "once" if step.steps == 1 else f"{step.steps} times"
        yield Finding(
            "optimizer-step",
            "info",
            f"`{step.title}` stepped {count}, updating {plural(len(step.params), 'tensor')}"
            f"{detail} (the optimizer-step table shows every one).",
            tuple(p.name for p in step.params),
        )


@rule
def skipped_steps(block: BlockRecord) -> Iterator[Finding]:
    skipped = [e for e in block.events if e.what == "scaler_step" and e.skipped]
    if not skipped:
        return
    taken = len([e for e in block.events if e.what == "scaler_step" and not e.skipped])
    text = skipped[0].text
    yield Finding(
        "skipped-step",
        "warning",
        f"{text} skipped {plural(len(skipped), 'optimizer step')} (of {len(skipped) + taken}): "
        f"the unscaled gradients held NaN or Inf, so the parameters did not move. With a "
        f"GradScaler this is expected while it finds its scale (`scaler.update()` lowers it); "
        f"every step skipped means the gradients overflow whatever the scale.",
    )


def _changed_rows(block: BlockRecord) -> dict[tuple[str, str], list[LeafRecord]]:
    """Rows whose gradient changed after the last backward and before it was put to use, by
    what changed it."""
    groups: dict[tuple[str, str], list[LeafRecord]] = {}
    for r in rows(block):
        for change in r.later:
            if change.what in ("set to None", "zeroed"):
                break
            groups.setdefault((change.what, change.by), []).append(r)
    return groups


@rule
def changed_after_backward(block: BlockRecord) -> Iterator[Finding]:
    for (what, by), members in _changed_rows(block).items():
        names = [r.name for r in members]
        used = (
            "the optimizer step used the changed values"
            if any(r.stepped for r in members)
            else "the table's `then` line shows the values after it"
        )
        factors = {c.factor for r in members for c in r.later if c.by == by and c.factor}
        scale = f" by {sci(factors.pop())}" if what == "scaled" and len(factors) == 1 else ""
        if by:
            scale = "" if "÷" in by else scale  # an unscale says its factor already
            yield Finding(
                "changed-after-backward",
                "info",
                f"after backward, {by} {'scaled' if what == 'scaled' else 'changed'} the "
                f"gradients of {listing(names)}{scale}: {used}.",
                tuple(names),
            )
        else:
            yield Finding(
                "changed-after-backward",
                "info",
                f"after backward, the gradients of {listing(names)} were {what}{scale} by code "
                f"that is not a PyTorch gradient function (a write such as `p.grad.data.mul_()` "
                f"or `p.grad /= k`): {used}.",
                tuple(names),
            )
