"""How the engine was called: `torch.autograd.grad`, `gradient=`, `retain_graph`,
reading `.grad` of a non-leaf, backwards that failed, calls left unobserved."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .. import stats
from ..records import BlockRecord, rows
from ._base import Finding, call, listing, root, rule

FREED_GRAPH_ERROR = "Trying to backward through the graph a second time"
NO_GRAD_ERROR = "does not require grad and does not have a grad_fn"
TRANSFORM = "inside a torch.func transform"  # how capture says why it left a call alone


def _shown(value: Any) -> str:
    if isinstance(value, stats.TensorSummary):
        return f"shape {value.shape}: {value}"
    return stats.format_value(value)


MAX_SEPARATE_GRAD_CALLS = 4  # more (gradcheck makes dozens) are said in one finding


@rule
def autograd_grad(block: BlockRecord) -> Iterator[Finding]:
    calls = [r for r in block.backwards if r.kind == "grad" and r.error is None]
    if len(calls) > MAX_SEPARATE_GRAD_CALLS:
        names = tuple(dict.fromkeys(n for r in calls for n in (r.inputs or []) if n))
        vias = sorted({r.via.rpartition(".")[2] for r in calls if r.via} - {"grad"})
        by = f" (by {listing(vias)})" if vias else ""
        yield Finding(
            "autograd-grad",
            "info",
            f"`torch.autograd.grad` was called {len(calls)} times{by}. Its results are "
            f"returned, not stored in `.grad`, so `.grad` was not touched.",
            names,
        )
        return
    for record in calls:
        pairs = list(zip(record.inputs or [], record.results or []))
        shown = [f"d/d`{name}` = {_shown(value)}" for name, value in pairs if name]
        results = "; ".join(shown) if shown else "its results"
        yield Finding(
            "autograd-grad",
            "info",
            f"`torch.autograd.grad` was called: it returned {results}. Its results are returned, "
            f"not stored in `.grad`, so `.grad` was not touched.",
            tuple(name for name, _ in pairs if name),
        )


@rule
def custom_gradient(block: BlockRecord) -> Iterator[Finding]:
    for record in block.backwards:
        if record.kind != "backward" or record.gradient is None or record.error is not None:
            continue
        vector = ", ".join(stats.format_value(g) for g in record.gradient)
        name = root(record) or "output"
        yield Finding(
            "custom-gradient",
            "info",
            f"backward was given `gradient=v` with v = `{vector}`: each leaf received the "
            f"vector-Jacobian product `vᵀ·∂{name}/∂leaf`, the gradient of `(v * {name}).sum()`, "
            f"not a gradient of `{name}` itself.",
            (name,) if root(record) else (),
        )


@rule
def nonleaf_grad(block: BlockRecord) -> Iterator[Finding]:
    leaves = [r.name for r in rows(block) if r.status in ("new", "accumulated")]
    instead = f", or read a leaf's instead ({listing(leaves)})" if leaves else ""
    for name in block.nonleaf_grad_reads:
        yield Finding(
            "nonleaf-grad",
            "warning",
            f"`{name}.grad` was read, but `{name}` is not a leaf (it was computed from other "
            f"tensors): PyTorch keeps `.grad` only for leaves, so it returned None. Call "
            f"`{name}.retain_grad()` before `backward()` to keep it{instead}.",
            (name,),
        )


@rule
def double_backward(block: BlockRecord) -> Iterator[Finding]:
    for i, record in enumerate(block.backwards):
        if not (record.error and FREED_GRAPH_ERROR in record.error):
            continue
        earlier = [r for r in block.backwards[:i] if r.kind == "backward" and not r.error]
        where = (
            f"the earlier {call(earlier[-1])} in this cell freed it"
            if earlier
            else "a backward before this cell freed it"
        )
        yield Finding(
            "double-backward",
            "error",
            f"{call(record)} went through a graph a second time, but backward frees the graph's "
            f"saved tensors as it goes: {where}. Pass `retain_graph=True` to the first backward "
            f"only if two passes are meant (or add the losses and call backward once); otherwise "
            f"recompute the forward before each backward.",
            tuple(r for r in record.roots if r),
        )


@rule
def failed_backward(block: BlockRecord) -> Iterator[Finding]:
    """A backward that raised for another reason: say so, and claim nothing about leaves."""
    for record in block.backwards:
        error = record.error
        if not error or FREED_GRAPH_ERROR in error or NO_GRAD_ERROR in error:
            continue
        first = error.splitlines()[0]
        yield Finding(
            "failed-backward",
            "error",
            f"{call(record)} raised `{first[:300]}`. The table shows what each gradient held "
            f"afterwards; a backward that raises may have added to some gradients before it "
            f"stopped.",
            tuple(r for r in record.roots if r),
        )


@rule
def retain_graph(block: BlockRecord) -> Iterator[Finding]:
    kept = [r for r in block.backwards if r.retain_graph and r.kind == "backward" and not r.error]
    if not kept:
        return
    again = len([r for r in block.backwards if r.graph is not None and r.graph == kept[0].graph])
    yield Finding(
        "retain-graph",
        "info",
        f"{call(kept[0])} used `retain_graph=True`: the graph and its saved tensors stay in memory "
        f"until nothing refers to them, and each backward through it adds to `.grad` again"
        f"{f' (it ran {again} times here)' if again > 1 else ''}.",
        tuple(r for r in kept[0].roots if r),
    )


def _transforms_text(block: BlockRecord) -> str:
    return (
        f"The cell uses {listing(block.transforms)}: torch.func transforms are not observed by "
        f"gradmagic. The gradients a transform returns are ordinary tensors, not `.grad`, so "
        f"they have no rows here."
    )


@rule
def transforms(block: BlockRecord) -> Iterator[Finding]:
    if block.transforms:
        yield Finding("func-transform", "info", _transforms_text(block))


@rule
def no_backward(block: BlockRecord) -> Iterator[Finding]:
    if block.backwards or block.steps or block.transforms:
        return
    if block.unobserved:
        yield Finding(
            "not-observed",
            "info",
            f"{'; '.join(block.unobserved)}: gradmagic sees the autograd engine, and calls "
            f"made inside a transform are the transform's own.",
        )
        return
    yield Finding(
        "no-backward",
        "info",
        "No backward ran in this cell: nothing reached the autograd engine.",
    )


@rule
def unobserved(block: BlockRecord) -> Iterator[Finding]:
    # Calls inside the transforms the code uses are said by `transforms`.
    said = [u for u in block.unobserved if not (block.transforms and TRANSFORM in u)]
    if said and (block.backwards or block.steps or block.transforms):
        yield Finding(
            "not-observed",
            "info",
            f"{'; '.join(said)} (gradmagic leaves calls inside a transform alone).",
        )


@rule
def compiled_region(block: BlockRecord) -> Iterator[Finding]:
    if not block.compiled_ops:
        return
    ops = "one op" if block.compiled_ops == 1 else f"{block.compiled_ops} ops"
    if block.compiled:
        who = " and ".join(f"`{name}` ({what})" for name, what in block.compiled)
        its = "its" if len(block.compiled) == 1 else "their"
        head = f"{who} ran compiled by `torch.compile`: {its} backward is"
    else:
        head = "Part of the forward ran compiled by `torch.compile`: its backward is"
    yield Finding(
        "compiled-region",
        "info",
        f"{head} {ops} in the graph (`CompiledFunctionBackward`), whose inside is opaque to "
        f"gradmagic: the ops in it and the gradients between them are not shown. The leaves' "
        f"`.grad` are observed as usual.",
        tuple(name for name, _ in block.compiled),
    )
