"""Why a leaf's gradient is what it is: `report.why("w")` and `%grad why w`.

Read from the block's records only: the graph of the backward that reached the leaf
(with the line that created each op and, on small graphs, the gradient each op
received), the cuts the block's code makes (`source.cuts`), and the optimizer steps.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

import torch

from .. import stats
from ..graph.data import GraphNode, GraphSnapshot, flow_text
from ..records import BackwardRecord, BlockRecord, LeafRecord, rows
from ..source import cuts
from .missing import _reason
from .numerics import (
    _first_nonfinite_op,
    _forward_origin,
    at_line,
    backward_text,
    forward_origin_text,
)

# What an op that received a gradient and passed on zeros did, by the name of its node.
ZEROING = {
    "Relu": "a ReLU passes a gradient only where its input was positive, and it was positive "
    "at none of the elements that received one (a dead ReLU)",
    "Threshold": "a ReLU passes a gradient only where its input was above its threshold, and "
    "it was at none of the elements that received one (a dead ReLU)",
    "MseLoss": "the prediction equals its target wherever a gradient arrived: the squared "
    "error is at its minimum, where its slope is 0",
    "L1Loss": "the prediction equals its target wherever a gradient arrived (`sign` at 0 is 0)",
    "Mul": "the other factor is 0 wherever a gradient arrived (a mask?)",
    "Sign": "`sign` has a gradient of 0 everywhere",
    "Round": "`round` has a gradient of 0 everywhere",
    "Floor": "`floor` has a gradient of 0 everywhere",
    "Ceil": "`ceil` has a gradient of 0 everywhere",
    "Trunc": "`trunc` has a gradient of 0 everywhere",
    "MaskedFill": "the mask covers every element that received a gradient",
    "Where": "the condition sends every element that received a gradient to the other branch",
    "Clamp": "every element was outside the clamp's range, where its slope is 0",
    "Hardtanh": "every element was outside (-1, 1), where its slope is 0",
}


class UnknownName(LookupError):
    """`why` was asked about a name the report has no row for."""


def _is_zero(value: Any) -> bool | None:
    """Whether a recorded value is all zero; None when it cannot be said."""
    if isinstance(value, torch.Tensor):
        v, _ = stats.computable(value)
        return None if v is None else bool((v == 0).all())
    if isinstance(value, stats.TensorSummary):
        return None if value.norm is None else value.norm == 0
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "norm":
        return None if value[1] is None else value[1] == 0
    if isinstance(value, (list, int, float)):
        numbers = stats.flat_list(value)
        return all(n == 0 for n in numbers) if numbers else None
    return None


def find_row(block: BlockRecord, name: str) -> LeafRecord:
    for r in rows(block):
        if r.name == name:
            return r
    for r in rows(block):
        if name in r.names:
            return r
    names = ", ".join(f"`{r.name}`" for r in rows(block)) or "none"
    raise UnknownName(
        f"`{name}` is not a leaf of the last report (its leaves: {names}); "
        f"`why` explains the gradient of a leaf the report has a row for."
    )


def _graph_of(block: BlockRecord, key: int) -> tuple[BackwardRecord, GraphSnapshot, int] | None:
    """The last backward whose graph reached the leaf, its graph and the leaf's node."""
    for record in reversed(block.backwards):
        snap = record.graph
        while snap is not None and snap.folded and snap.repeat_of is not None:
            snap = snap.repeat_of
        if snap is None:
            continue
        for node in snap.nodes:
            if node.kind == "leaf" and node.leaf_key == key:
                return record, snap, node.id
    return None


def _path(snap: GraphSnapshot, leaf: int) -> list[int]:
    """The shortest path from a root down to `leaf`, as node ids, root first."""
    up: dict[int, list[int]] = {}
    for e in snap.edges:
        up.setdefault(e.src, []).append(e.dst)
    came: dict[int, int | None] = {leaf: None}
    queue = deque([leaf])
    while queue:
        nid = queue.popleft()
        if snap.nodes[nid].is_root:
            path = [nid]
            while came[path[-1]] is not None:
                path.append(came[path[-1]])  # type: ignore[arg-type]
            return path
        for parent in up.get(nid, ()):
            if parent not in came:
                came[parent] = nid
                queue.append(parent)
    return [leaf]


def _op(node: GraphNode) -> str:
    return f"`{node.op}` ({node.line})" if node.line else f"`{node.op}`"


def _path_text(snap: GraphSnapshot, path: list[int], leaf_name: str) -> str:
    first = snap.nodes[path[0]]
    start = f"`{first.root_name}`" if first.root_name else "the root"
    ops = [_op(snap.nodes[nid]) for nid in path if snap.nodes[nid].kind == "op"]
    if len(ops) > 8:
        ops = [*ops[:4], f"{len(ops) - 6} more ops", *ops[-2:]]
    return " → ".join([start, *ops, f"`{leaf_name}`"])


def _received(snap: GraphSnapshot, nid: int) -> Any:
    ports = [v for (n, _), v in snap.flow_in.items() if n == nid]
    if not ports:
        return None
    return ports[0] if len(ports) == 1 else ("several", ports)


def _zeroing(snap: GraphSnapshot, path: list[int]) -> str:
    """Which op of the path received a nonzero gradient and passed on zeros."""
    if not snap.flow_in:
        return (
            f"the gradients along this graph's edges were not recorded (they are on graphs of "
            f"up to 150 ops; this one has {snap.n_ops}), so which op made it zero is not known"
        )
    fan_in: dict[tuple[int, int], int] = {}
    for e in snap.edges:
        fan_in[(e.src, e.port)] = fan_in.get((e.src, e.port), 0) + 1
    root = snap.nodes[path[0]]
    got = snap.flow_in.get((path[0], 0))
    if got is not None and _is_zero(got):
        return (
            f"the backward started from a gradient of zeros at `{root.root_name or root.op}` "
            f"(the `gradient=` argument)"
        )
    for upper, lower in zip(path, path[1:]):
        before = _received(snap, upper)
        edge = next((e for e in snap.edges if e.src == lower and e.dst == upper), None)
        after = snap.flow_in.get((lower, edge.port)) if edge is not None else None
        if before is None or after is None or isinstance(before, tuple) and before[0] == "several":
            continue
        if _is_zero(before) is False and _is_zero(after):
            node = snap.nodes[upper]
            where = at_line(node)
            if fan_in.get((lower, edge.port), 1) > 1:
                return (
                    f"the gradients arriving at `{snap.nodes[lower].op}` from several ops "
                    f"sum to zero"
                )
            cause = ZEROING.get(re.sub(r"Backward\d*$", "", node.op))
            said = f"`{node.op}`{where} received {flow_text(before)} and passed on zeros"
            return f"{said}: {cause}" if cause else said
    return "no op along the path received a nonzero gradient and passed on zeros"


def explain(block: BlockRecord, name: str) -> list[str]:
    """Sentences that explain the gradient of the leaf `name` in this block."""
    r = find_row(block, name)
    shown = f"`{r.name}`"
    if r.status == "none":
        found = [c for c in cuts(block.source) if c.kind != "integer cast"]
        reason = _reason(block, r, found)  # the finding's own words
        return [f"{shown} required grad but received none: {reason}."]
    found = _graph_of(block, r.key)
    out = []
    if found is None:
        out.append(f"No recorded graph reaches {shown} (the graph was not recorded).")
    else:
        record, snap, leaf = found
        path = _path(snap, leaf)
        out.append(f"`{r.name}.grad` came from {_path_text(snap, path, r.name)}.")
        if r.status == "nan/inf":
            origin = _forward_origin(block)
            node = _first_nonfinite_op(block)
            if origin is not None and (node is None or (origin[0].seq or 0) <= (node.seq or 0)):
                out.append(f"It holds NaN or Inf: {forward_origin_text(origin, block)}.")
            elif node is not None:
                out.append(f"It holds NaN or Inf: {backward_text(node, None, general=True)}.")
        elif _is_zero(r.after):
            out.append(f"It is all zero: {_zeroing(snap, path)}.")
    if r.backwards and block.steps and not r.optimizer:
        stepped = ", ".join(f"`{s.name}`" for s in block.steps)
        out.append(
            f"It got a gradient, but no optimizer holds it: the steps of {stepped} "
            f"did not update it (add it to the optimizer's parameters)."
        )
    return out
