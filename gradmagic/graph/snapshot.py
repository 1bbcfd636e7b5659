"""`snapshot()`: the graph behind a backward's roots, walked before the engine runs.

An explicit stack, never recursion (a 100,000-op chain would overflow it);
names, shapes, sequence numbers and non-tensor saved values only: no saved
tensor is unpacked (that runs the user's unpack hooks and makes checkpointing
recompute). The live nodes come back beside the snapshot, for the flow hooks,
and are dropped once the backward ran.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import _engine
from ..stats import dtype_name
from .data import Edge, GraphNode, GraphSnapshot, shape_text

LiveNodes = dict[int, Any]
"""Node id -> autograd Node: only to hook the nodes while the backward runs, then dropped."""


class gc_paused:  # noqa: N801 - used as `with gc_paused():`, like a function
    """Pause the cyclic garbage collector while building large acyclic structures.

    A 100,000-op graph allocates a few objects per node, and each full collection
    rescans all of them: the walk runs 3x slower with the collector on. A class, not a
    generator-based context manager: it runs on every watched backward.
    """

    __slots__ = ("_was_enabled",)

    def __enter__(self) -> None:
        self._was_enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        if self._was_enabled:
            gc.enable()


def start_node(root: Any) -> Any:
    """The autograd node a root (tensor or GradientEdge) starts the backward from."""
    if isinstance(root, torch.autograd.graph.GradientEdge):
        return root.node
    if not isinstance(root, torch.Tensor):
        return None
    if root.grad_fn is not None:
        return root.grad_fn
    if root.requires_grad:
        return torch.autograd.graph.get_gradient_edge(root).node  # a leaf's AccumulateGrad
    return None


class _Walk:
    def __init__(
        self, leaf_key: Callable[[torch.Tensor], int], inputs: Sequence[Any], light: bool = False
    ) -> None:
        self.leaf_key = leaf_key
        self.light = light  # structure and leaves only: no saved values, no edge shapes
        self.nodes: list[GraphNode] = []
        self.edges: list[Edge] = []
        self.live: LiveNodes = {}
        # id(autograd node) -> node id. `live` keeps every node object alive during the
        # walk, so an id() cannot be reused by another node.
        self.ids: dict[int, int] = {}
        self.in_sizes: list[Sequence[Any]] = []  # node id -> sizes of the gradients it gets
        self.stack: list[int] = []
        self.roots: list[int] = []
        tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
        self.input_leaves = {id(t) for t in tensors if t.is_leaf}
        self.input_nodes = {  # non-leaf inputs and GradientEdges: their node is marked
            id(start_node(t)) for t in inputs if id(t) not in self.input_leaves
        }

    def add_root(self, root: Any, name: str | None) -> None:
        node = start_node(root)
        if node is None:
            return
        nid = self.ids.get(id(node))
        if nid is None:
            nid = self._add(node)
        record = self.nodes[nid]
        if not record.is_root:
            record.is_root = True
            self.roots.append(nid)
        if name:
            record.root_name = f"{record.root_name}, {name}" if record.root_name else name

    def _add(self, node: Any) -> int:
        nid = len(self.nodes)
        self.ids[id(node)] = nid
        self.live[nid] = node
        if _engine.is_accumulate_grad(node):
            # A leaf: nothing to walk below it, and the gradient it gets has its shape.
            leaf = node.variable
            self.nodes.append(self._leaf_node(nid, leaf))
            self.in_sizes.append(() if self.light or leaf.is_nested else (leaf.shape,))
            return nid
        self.nodes.append(
            GraphNode(
                nid,
                "op",
                _engine.op_name(node),
                _engine.sequence_nr(node),
                () if self.light else _engine.saved_values(node),
                is_input=id(node) in self.input_nodes,
            )
        )
        self.in_sizes.append(() if self.light else _engine.input_sizes(node))
        self.stack.append(nid)
        return nid

    def _leaf_node(self, nid: int, leaf: torch.Tensor) -> GraphNode:
        shape = "nested" if leaf.is_nested else shape_text(leaf.shape)
        return GraphNode(
            nid,
            "leaf",
            leaf_key=self.leaf_key(leaf),
            shape=shape,
            dtype=dtype_name(leaf.dtype),
            is_input=id(leaf) in self.input_leaves,
        )

    def run(self) -> None:
        # The hot loop of every watched backward: names bound once, known nodes looked
        # up without a call.
        stack, live, ids, in_sizes = self.stack, self.live, self.ids, self.in_sizes
        add, edge, children = self._add, self.edges.append, _engine.next_functions
        while stack:
            nid = stack.pop()
            for slot, (child, port) in enumerate(children(live[nid])):
                if child is None:  # an input that does not require grad
                    continue
                cid = ids.get(id(child))
                if cid is None:
                    cid = add(child)
                sizes = in_sizes[cid]
                size = sizes[port] if port < len(sizes) else None
                edge(Edge(cid, nid, slot, size, port))

    def finish(self) -> GraphSnapshot:
        return GraphSnapshot(
            nodes=self.nodes,
            edges=self.edges,
            roots=self.roots,
            n_ops=sum(n.kind == "op" for n in self.nodes),
        )


# --- torch 2.13: freeing a deep graph after walking it ----------------------------------------
#
# Since torch 2.13 the Python wrapper of an autograd node lives as long as the node, and freeing
# a node frees its wrapped children by recursion in C. A graph walked from Python that is
# deeper than ~40,000 nodes crashes the process (stack overflow) when the user frees it, long
# after the walk. So on long paths every node that starts a new stretch of _ANCHOR_STEP is held
# here: freeing the graph stops at each one, and `_release_anchors` frees them root side first,
# one stretch at a time, once nothing else holds them (at the next snapshot or garbage collection).
_ANCHOR_STEP = 1000
_anchors: list[Any] = []


def _release_anchors() -> None:
    """Free the anchors nothing else holds, root side first, until none is left to free."""
    global _anchors
    released = True
    while released:
        released = False
        # One entry per node (a graph snapshotted twice is anchored twice), root side last.
        held = list({id(node): node for node in _anchors}.values())[::-1]
        _anchors = []
        while held:
            node = held.pop()
            if sys.getrefcount(node) > 2:  # more than `node` and the argument: still in use
                _anchors.append(node)
            else:
                released = True  # freed below: the graph under it down to the next anchor
            del node


def _anchor_ids(n_nodes: int, edges: list[Edge]) -> list[int]:
    """Nodes to hold so that no path of unheld nodes is longer than _ANCHOR_STEP."""
    if n_nodes <= _ANCHOR_STEP:
        return []
    children: list[list[int]] = [[] for _ in range(n_nodes)]
    pending = [0] * n_nodes
    for e in edges:
        children[e.dst].append(e.src)
        pending[e.src] += 1
    # Longest distance from a root, in topological order: it grows along every edge, so a
    # path stays in one band of _ANCHOR_STEP for at most _ANCHOR_STEP nodes.
    depth = [0] * n_nodes
    order = [u for u in range(n_nodes) if pending[u] == 0]
    for u in order:  # grows while read
        for c in children[u]:
            depth[c] = max(depth[c], depth[u] + 1)
            pending[c] -= 1
            if pending[c] == 0:
                order.append(c)
    band = [d // _ANCHOR_STEP for d in depth]
    starts = {e.src for e in edges if band[e.src] > band[e.dst]}
    return [u for u in order if u in starts]


def _release_after_collection(phase: str, info: dict) -> None:
    if phase == "stop" and _anchors:
        _release_anchors()


if _release_after_collection not in gc.callbacks:
    gc.callbacks.append(_release_after_collection)


def snapshot(
    roots: Sequence[Any],
    *,
    leaf_key: Callable[[torch.Tensor], int],
    root_names: Sequence[str | None] | None = None,
    inputs: Sequence[Any] | None = None,
    light: bool = False,
) -> tuple[GraphSnapshot, LiveNodes]:
    """Record the graph behind `roots` before the engine runs (and frees saved tensors).

    `roots` are the tensors or `GradientEdge`s handed to the engine; `leaf_key`
    gives each leaf tensor a stable key (names come later); `root_names` runs
    parallel to `roots`; `inputs` is the backward's `inputs=`, marked in the
    drawing. `light=True` records only the structure and the leaves (no saved
    values, no edge shapes). Returns the snapshot, plain data, and the live
    autograd nodes by node id, which the caller drops once the backward ran.
    """
    if _anchors:
        _release_anchors()
    walk = _Walk(leaf_key, inputs or (), light)
    names = list(root_names or [])
    with gc_paused():
        for i, root in enumerate(roots):
            walk.add_root(root, names[i] if i < len(names) else None)
        walk.run()
        if len(walk.nodes) > _ANCHOR_STEP:
            _anchors.extend(walk.live[i] for i in _anchor_ids(len(walk.nodes), walk.edges))
        return walk.finish(), walk.live
