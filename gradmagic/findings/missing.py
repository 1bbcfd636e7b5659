"""Leaves that required grad and received none, and backwards with no graph at all."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator

from ..records import BlockRecord, LeafRecord, rows
from ..source import Cut, cuts, grad_off_blocks, parse_source
from ._base import Finding, call, errors, listing, root, rule

NO_GRAD_ERROR = "does not require grad and does not have a grad_fn"


def _grad_turned_off(block: BlockRecord) -> str | None:
    """Why no graph was recorded, when the evidence says gradients were off."""
    if block.grad_mode == "inference_mode":
        return "the cell began in inference mode, which records no graph"
    if block.grad_mode == "no_grad":
        return "gradients were off when the cell began (`torch.set_grad_enabled(False)` earlier?)"
    off = grad_off_blocks(block.source)
    if off:
        return f"the cell computes it under `{off[0]}`, which records no graph"
    return None


def _cut_text(found: list[Cut]) -> str:
    return (
        f"the cell uses `{found[0].code}`"
        if found
        else "a `.detach()`, `.data` or `torch.no_grad()`"
    )


CUT_WORDS = {
    "detach": "`.detach()` returns a tensor without a graph",
    "data": "`.data` is the tensor without its graph",
    "requires_grad_": "`requires_grad_(False)` stops autograd from tracking it",
    "integer cast": "an integer tensor carries no gradient",
}


def leaf_variable(name: str) -> str:
    return re.split(r"[.\[ ]", name, maxsplit=1)[0]


def _derived(source: str | None, start: str) -> set[str]:
    """The variables the code computes from `start`, directly or through others."""
    parsed = parse_source(source or "")
    derived = {start}
    if parsed is None:
        return derived
    for node in ast.walk(parsed.tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and node.value:
            reads = {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)}
            if reads & derived:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    derived |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return derived


def cut_for(block: BlockRecord, r: LeafRecord) -> tuple[Cut, str] | None:
    """The cut of the code that the leaf's value goes through, and what it holds of it."""
    found = cuts(block.source)
    names = {r.name, *r.names}
    for cut in found:
        if cut.tensor in names:
            return cut, cut.tensor
    variables = {leaf_variable(n) for n in names}
    for variable in variables:
        derived = _derived(block.source, variable)
        for cut in found:
            hit = cut.names & derived
            if hit:
                return cut, variable if variable in hit else sorted(hit)[0]
    return None


def cut_text(cut: Cut, via: str, leaf: str) -> str:
    if cut.kind == "no_grad":
        lines = f"line {cut.line}" if cut.end <= cut.line else f"lines {cut.line}-{cut.end}"
        return (
            f"the path from the loss to it is cut by a `{cut.code.removeprefix('with ')[:-1]}` "
            f"block at {lines}: what it computes there from `{leaf}` has no graph"
        )
    words = CUT_WORDS.get(cut.kind, "")
    through = f" (`{via}` is computed from `{leaf}`)" if via != leaf else ""
    return f"the path from the loss to it is cut at line {cut.line}: `{cut.code}`{through}: {words}"


def _reason(block: BlockRecord, r: LeafRecord, found: list[Cut]) -> str:
    """Why this leaf got no gradient, saying no more than the records show."""
    module = next((m for m in block.modules if m.name == r.owner), None)
    if module is not None:
        by_key = {rec.key: rec for rec in block.leaves}
        reached = [k for k in module.leaf_keys if by_key[k].backwards]
        if reached:
            return (
                f"other parameters of `{module.name}` did get one, so these are not on the path "
                f"from its forward to the loss (an unused layer, or a `.detach()` inside "
                f"`forward`)"
            )
        if module.ran:
            return (
                f"`{module.name}` ran in this cell with gradients on, yet no gradient reached it, "
                f"so the graph between its output and the loss is cut ({_cut_text(found)})"
            )
        return f"`{module.name}` did not run in this cell, and no gradient path reaches it"
    own = [c for c in found if c.tensor in r.names]
    if own:
        return f"the cell uses `{own[0].code}`, which cuts it from the graph"
    hit = cut_for(block, r)
    if hit is not None:
        return cut_text(hit[0], hit[1], leaf_variable(r.name))
    if found:
        return (
            f"no gradient path from the loss reaches it: the cell cuts the graph with "
            f"`{found[0].code}` (line {found[0].line})"
        )
    return (
        "no gradient path from the loss reaches it: it is not used in the loss that backward "
        "started from, or the path to it was cut before this cell"
    )


@rule
def no_grad(block: BlockRecord) -> Iterator[Finding]:
    none = [r for r in rows(block) if r.status == "none"]
    failed = errors(block, NO_GRAD_ERROR)
    explain = ""
    if failed:
        name = root(failed[0])
        explain = (
            f' That is also why {call(failed[0])} raised "element 0 of tensors {NO_GRAD_ERROR}": '
            f"{f'`{name}`' if name else 'its output'} has no `grad_fn`, nothing connects it to a "
            f"tensor that requires grad."
        )
    severity = "error" if failed else "warning"
    found = [c for c in cuts(block.source) if c.kind != "integer cast"]
    groups: dict[str, list[LeafRecord]] = {}
    for r in none:
        groups.setdefault(_reason(block, r, found), []).append(r)
    for reason, members in groups.items():
        names = [r.name for r in members]
        yield Finding(
            "no-grad",
            severity,
            f"{listing(names)} required grad but received none: {reason}.{explain}",
            tuple(names),
        )
    if failed and not none and not _grad_turned_off(block):
        likely = (
            _cut_text(found)
            if found
            else "made without `requires_grad=True`, or cut off by `.detach()` or `.data`"
        )
        yield Finding(
            "no-grad",
            "error",
            f'{call(failed[0])} raised "element 0 of tensors {NO_GRAD_ERROR}": what it started '
            f"from does not depend on any tensor that requires grad ({likely}).",
        )


@rule
def grad_disabled(block: BlockRecord) -> Iterator[Finding]:
    failed = errors(block, NO_GRAD_ERROR)
    off = _grad_turned_off(block) if failed else None
    if not off:
        return
    name = root(failed[0])
    yield Finding(
        "grad-disabled",
        "error",
        f'{call(failed[0])} raised "element 0 of tensors {NO_GRAD_ERROR}" because '
        f"{f'`{name}`' if name else 'its output'} has no `grad_fn`: {off}. Compute the loss with "
        f"gradients on; keep `torch.no_grad()` for evaluation and for changing weights by hand.",
        (name,) if name else (),
    )
