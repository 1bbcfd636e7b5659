"""The autograd graph of one backward as plain data: `snapshot()` and its records.

Private autograd API (`_sequence_nr`, `_input_metadata`, `_saved_*`, the
sequence counter) is read only through the small guarded helpers here: a torch
upgrade that moves one loses a detail of the drawing, never the drawing.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from ..stats import dtype_name, flat_list

LiveNodes = dict[int, Any]
"""Node id -> autograd Node: only to hook the nodes while the backward runs, then dropped."""

_MAX_SAVED_LINES = 4  # saved values shown per op; the rest is counted


# --- data -----------------------------------------------------------------------------------


class Edge(NamedTuple):
    """`src` fed `dst` in the forward pass; the gradient flows back along the edge."""

    src: int
    dst: int
    slot: int  # index of `src` in `dst.next_functions`
    size: tuple[int, ...] | None  # shape of the gradient along the edge; None: unknown

    @property
    def shape(self) -> str:
        """The gradient's shape as text, `(2, 3)` (formatted when drawn, not in the walk)."""
        return "" if self.size is None else _shape_text(self.size)


@dataclass(slots=True)
class GraphNode:
    """One autograd node: an op (`MulBackward0`) or a leaf tensor (its `AccumulateGrad`)."""

    id: int
    kind: str  # "op" or "leaf"
    op: str = ""  # the name PyTorch gives the node
    seq: int | None = None  # autograd sequence number: creation order in the forward
    # What the op saved, as read before the backward: numbers, int tuples, shapes
    # (`torch.Size`), text. `saved` formats them when the node is drawn.
    saved_values: tuple[tuple[str, Any], ...] = ()
    leaf_key: int | None = None
    shape: str = ""
    dtype: str = ""
    root_name: str | None = None
    is_root: bool = False
    is_input: bool = False  # named in `inputs=` of the backward
    module: int | None = None  # innermost `GraphSnapshot.modules` call holding it

    @property
    def saved(self) -> tuple[tuple[str, str], ...]:
        """What the op saved, as text: `(("self", "(2, 3)"), ("exponent", "3"))`."""
        pairs = ((name, _saved_text(value)) for name, value in self.saved_values)
        return tuple((name, text) for name, text in pairs if text is not None)


@dataclass
class ModuleCall:
    """One call of an `nn.Module` during the forward pass."""

    name: str  # dotted name ("encoder.layers.3"); "" when unknown
    cls: str
    parent: int | None
    depth: int  # 0 for the outermost call


@dataclass(eq=False)
class GraphSnapshot:
    """The graph of one backward as plain data: no tensor, no autograd node.

    Snapshots compare equal when they are of the same autograd graph (a
    `retain_graph=True` repeat): `signature` includes the sequence numbers.
    `structure` leaves them out, so a loop that rebuilds the same graph each
    step gives equal `structure` and different `signature`. A snapshot that
    repeats one recorded before (`repeat_of`) can be `fold`ed: a loop keeps one
    snapshot per structure, not one per step.
    """

    nodes: list[GraphNode]
    edges: list[Edge]
    roots: list[int]
    n_ops: int
    # (src, dst, slot) -> the gradient along the edge: `tolist()` values or ("norm", float)
    flow_values: dict[tuple[int, int, int], Any] = field(default_factory=dict)
    flow_nonfinite_nodes: list[int] = field(default_factory=list)  # in execution order
    modules: list[ModuleCall] = field(default_factory=list)
    repeat_of: GraphSnapshot | None = field(default=None, repr=False)  # same structure, earlier
    folded: bool = False  # nodes, edges and flow dropped: drawn from `repeat_of`
    _edge_flow: dict[tuple[int, int, int], str] | None = field(default=None, repr=False)

    @property
    def edge_flow(self) -> dict[tuple[int, int, int], str]:
        """Edge labels of the gradient flow, `[36., 81.]` or `‖g‖=13.4`: formatted
        when first read, not inside the backward."""
        if self._edge_flow is None or len(self._edge_flow) != len(self.flow_values):
            self._edge_flow = {key: flow_text(v) for key, v in self.flow_values.items()}
        return self._edge_flow

    @functools.cached_property
    def flow_elements(self) -> int:
        """Elements of all the gradients the backward passes along the edges."""
        return sum(math.prod(e.size) for e in self.edges if e.size is not None)

    @functools.cached_property
    def signature(self) -> str:
        """The same for snapshots of the same autograd graph (sequence numbers included)."""
        return self._digest(with_seq=True)

    @functools.cached_property
    def structure(self) -> str:
        """The same for graphs of the same shape over the same leaves (a loop that rebuilds
        its graph), whatever their roots are called."""
        return self._digest(with_seq=False)

    def _digest(self, with_seq: bool) -> str:
        # Hashed when first asked (by the report, or by a block's second backward, before
        # roots are named: the names of the roots are left out).
        digest = hashlib.blake2b(digest_size=16)
        for n in self.nodes:
            seq = f"{n.seq}" if with_seq else ""
            digest.update(
                f"{n.kind}|{n.op}|{n.leaf_key}|{n.shape}|{n.is_root}|{n.is_input};{seq}".encode()
            )
        digest.update(";".join(f"{e.src},{e.dst},{e.slot}" for e in self.edges).encode())
        return digest.hexdigest()

    def fold(self, first: GraphSnapshot, keep_signature: bool) -> None:
        """Make this snapshot a repeat of `first`: drop its nodes, edges and flow, keep
        `n_ops` and (with `keep_signature`, to tell a `retain_graph` repeat) its signature."""
        if keep_signature:
            self.signature  # noqa: B018 - computed and cached while the nodes are here
        else:
            self.__dict__["signature"] = f"folded {id(self)}"  # equal to no other snapshot
        self.repeat_of, self.folded = first, True
        self.nodes, self.edges, self.roots = [], [], []
        self.flow_values, self._edge_flow = {}, None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GraphSnapshot) and other.signature == self.signature

    def __hash__(self) -> int:
        return hash(self.signature)

    @property
    def first_nonfinite_op(self) -> str | None:
        """The first op whose backward produced a NaN or Inf gradient, e.g. `LogBackward0`."""
        if not self.flow_nonfinite_nodes:
            return None
        return self.nodes[self.flow_nonfinite_nodes[0]].op

    def module_path(self, node_id: int) -> list[ModuleCall]:
        """The module calls holding a node, innermost first."""
        path, call = [], self.nodes[node_id].module
        while call is not None:
            path.append(self.modules[call])
            call = self.modules[call].parent
        return path


# --- private autograd API, each read guarded ------------------------------------------------


def _op_name(node: Any) -> str:
    try:
        return node.name().removeprefix("torch::autograd::")
    except Exception:  # noqa: BLE001 - a node type without name(): its class says enough
        return type(node).__name__


def _sequence_nr(node: Any) -> int | None:
    try:
        return int(node._sequence_nr())
    except Exception:  # noqa: BLE001
        return None


def _input_sizes(node: Any) -> list[Any]:
    """Shapes of the gradients a node receives (`torch.Size`), without unpacking saved
    tensors; an empty list where torch cannot say."""
    try:
        return [meta.shape for meta in node._input_metadata]
    except Exception:  # noqa: BLE001 - nested tensors and older torch: edges go unlabelled
        return []


def _next_functions(node: Any) -> tuple:
    try:
        return node.next_functions
    except Exception:  # noqa: BLE001
        return ()


_SAVED_NOISE = ("_sym_strides", "_sym_storage_offset", "_sym_numel", "_sym_sizes_opt")


@functools.cache
def _saved_attributes(node_type: type) -> tuple[tuple[str, str, str | None], ...]:
    """(name, attribute, fallback) for what a node type saved.

    Generated backward nodes expose it as `_saved_<argument>` properties;
    strides are noise in a drawing. A tensor with a `_sym_sizes` twin is read
    through the twin (its shape, without unpacking the tensor), the tensor
    itself being the fallback; the twin also outlives a backward.
    """
    names = {
        name
        for name in dir(node_type)
        if name.startswith("_saved_") and not name.endswith(_SAVED_NOISE)
    }
    plan = []
    for attr in sorted(names):
        name = attr.removeprefix("_saved_")
        if name.endswith("_sym_sizes"):
            tensor = attr.removesuffix("_sym_sizes")
            plan.append(
                (name.removesuffix("_sym_sizes"), attr, tensor if tensor in names else None)
            )
        elif attr + "_sym_sizes" not in names:
            plan.append((name, attr, None))
    return tuple(plan)


def _saved_values(node: Any) -> tuple[tuple[str, Any], ...]:
    """What a node saved, read now (a backward frees it) and formatted when drawn."""
    found: dict[str, Any] = {}
    for name, attr, fallback in _saved_attributes(type(node)):
        try:
            value = getattr(node, attr)
        except Exception:  # noqa: BLE001 - freed by a backward without retain_graph
            continue
        if attr.endswith("_sym_sizes"):
            if value is None and fallback is not None:
                try:
                    value = _saved_raw(getattr(node, fallback))
                except Exception:  # noqa: BLE001 - freed
                    continue
            else:
                value = _size(value or ())  # `x_sym_sizes`: shown as x's shape
        else:
            value = _saved_raw(value)
        if value is not None and name not in found:
            found[name] = value
    if isinstance(node, torch.autograd.function.BackwardCFunction):
        try:
            tensors = node.saved_tensors  # custom autograd.Function: ctx.save_for_backward
        except Exception:  # noqa: BLE001 - freed
            tensors = ()
        if tensors:
            found["saved"] = _saved_text(list(tensors)) or ""
    return tuple(found.items())


def _size(dims: Any) -> Any:
    """Sizes as a `torch.Size` (drawn as a shape); text when they are symbolic."""
    try:
        return torch.Size(dims)
    except Exception:  # noqa: BLE001 - symbolic sizes: their text
        return _shape_text(dims)


def _saved_raw(value: Any) -> Any:
    """A saved value as plain data that holds no tensor: numbers, int tuples and text
    as they are, a tensor as its shape (or its number, when 0-dim on the CPU)."""
    if value is None or type(value) in (int, float, bool, str):
        return value
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and value.device.type == "cpu":
            return value.item()  # `3 * x` saves 3 as a 0-dim tensor
        return value.shape
    if type(value) in (tuple, list) and all(type(v) is int for v in value):
        return value
    return _saved_text(value)


def _sequence_counter() -> Callable[[], int] | None:
    # The next autograd sequence number of this thread: ops created between two reads
    # belong to the module call that ran in between.
    fn = getattr(torch._C._autograd, "_get_sequence_nr", None)
    return fn if callable(fn) else None


class _gc_paused:  # noqa: N801 - used as `with _gc_paused():`, like a function
    """Pause the cyclic garbage collector while building large acyclic structures.

    A 100,000-op graph allocates a few objects per node, and each full collection
    rescans all of them: the walk runs 3x slower with the collector on. A class, not a
    generator-based context manager: it runs on every watched backward, where the
    generator's setup cost more than the pause itself.
    """

    __slots__ = ("_was_enabled",)

    def __enter__(self) -> None:
        self._was_enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        if self._was_enabled:
            gc.enable()


# --- formatting -----------------------------------------------------------------------------


def _shape_text(shape: Iterable[Any]) -> str:
    if type(shape) is torch.Size:
        return str(tuple(shape))  # `(4, 8)`, `(4,)`, `()`
    dims = [str(int(d)) if isinstance(d, int) else str(d) for d in shape]
    return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"


def _number_text(value: float | int | bool) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 2**63:
        value -= 2**64  # negative dims come back as unsigned 64-bit: `dim: (-1, -2)`
    return str(value)


def _saved_text(value: Any) -> str | None:
    if value is None:
        return None
    if type(value) is torch.Size:
        return _shape_text(value)
    if type(value) in (tuple, list) and all(type(v) is int for v in value):
        # Sizes, strides, dims, the most common case: `(1, 1)`, `[0, 2]`.
        if any(v >= 2**63 for v in value):
            value = type(value)(v - 2**64 if v >= 2**63 else v for v in value)
        text = str(value)
        return text if len(text) <= 40 else text[:38] + "…" + text[-1]
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and value.device.type == "cpu":
            return _number_text(value.item())  # `3 * x` saves 3 as a 0-dim tensor
        return _shape_text(value.shape)
    if isinstance(value, (bool, int, float, torch.SymInt, torch.SymFloat)):
        return _number_text(value)
    if isinstance(value, (tuple, list)):
        parts = [_saved_text(v) or "None" for v in value]
        if isinstance(value, list) or any(isinstance(v, torch.Tensor) for v in value):
            text = f"[{', '.join(parts)}]"  # several tensors: their shapes
        else:
            text = _shape_text(parts)  # sizes, dims: `(0, 2)`
        return text if len(text) <= 40 else text[:38] + "…" + text[-1]
    if isinstance(value, (str, torch.dtype, torch.device, torch.layout)):
        return str(value)
    return None


def flow_text(value: Any) -> str:
    """A flow label: `("norm", 13.4)` as `‖g‖=13.4`, `tolist()` output in PyTorch's
    style (`repr(tensor)` costs about 0.2 ms a call)."""
    if isinstance(value, tuple):
        return f"‖g‖={value[1]:.3g}"
    floats = [v for v in flat_list(value) if isinstance(v, float) and math.isfinite(v)]
    if floats and all(v.is_integer() for v in floats) and max(map(abs, floats)) < 1e8:
        fmt = "{:.0f}."
    elif floats and all(1e-4 <= abs(v) < 1e4 for v in floats if v):
        fmt = "{:.4f}"
    else:
        fmt = "{:.4e}"

    def one(v: Any) -> str:
        if isinstance(v, list):
            return "[" + ", ".join([one(x) for x in v]) + "]"
        if isinstance(v, float):
            return fmt.format(v) if math.isfinite(v) else str(v)
        return str(v)

    return one(value)


# --- snapshot -------------------------------------------------------------------------------


def _start_node(root: Any) -> Any:
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
    """The iterative walk behind `snapshot()`: an explicit stack, never recursion."""

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
        self.input_leaves = {
            id(t) for t in inputs if isinstance(t, torch.Tensor) and t.grad_fn is None
        }
        self.input_nodes = {  # non-leaf inputs: their grad_fn is marked
            id(_start_node(t)) for t in inputs if id(t) not in self.input_leaves
        }

    def add_root(self, root: Any, name: str | None) -> None:
        node = _start_node(root)
        if node is None:
            return
        nid = self.intern(node)
        record = self.nodes[nid]
        if not record.is_root:
            record.is_root = True
            self.roots.append(nid)
        if name:
            record.root_name = f"{record.root_name}, {name}" if record.root_name else name

    def intern(self, node: Any) -> int:
        nid = self.ids.get(id(node))
        if nid is None:
            nid = self._add(node)
        return nid

    def _add(self, node: Any) -> int:
        nid = len(self.nodes)
        self.ids[id(node)] = nid
        self.live[nid] = node
        if type(node).__name__ == "AccumulateGrad":
            # A leaf: nothing to walk below it, and the gradient it gets has its shape.
            leaf = node.variable
            self.nodes.append(self._leaf_node(nid, leaf))
            self.in_sizes.append(() if self.light or leaf.is_nested else (leaf.shape,))
            return nid
        self.nodes.append(
            GraphNode(
                nid,
                "op",
                _op_name(node),
                _sequence_nr(node),
                () if self.light else _saved_values(node),
                is_input=id(node) in self.input_nodes,
            )
        )
        self.in_sizes.append(() if self.light else _input_sizes(node))
        self.stack.append(nid)
        return nid

    def _leaf_node(self, nid: int, leaf: torch.Tensor) -> GraphNode:
        return GraphNode(
            nid,
            "leaf",
            leaf_key=self.leaf_key(leaf),
            shape=_shape_text(leaf.shape),
            dtype=dtype_name(leaf.dtype),
            is_input=id(leaf) in self.input_leaves,
        )

    def run(self) -> None:
        # The hot loop of every watched backward: names bound once, known nodes looked
        # up without a call.
        stack, live, ids, in_sizes = self.stack, self.live, self.ids, self.in_sizes
        add, edge = self._add, self.edges.append
        while stack:
            nid = stack.pop()
            for slot, (child, input_nr) in enumerate(_next_functions(live[nid])):
                if child is None:  # an input that does not require grad
                    continue
                cid = ids.get(id(child))
                if cid is None:
                    cid = add(child)
                sizes = in_sizes[cid]
                edge(Edge(cid, nid, slot, sizes[input_nr] if input_nr < len(sizes) else None))

    def finish(self) -> GraphSnapshot:
        return GraphSnapshot(
            nodes=self.nodes,
            edges=self.edges,
            roots=self.roots,
            n_ops=sum(n.kind == "op" for n in self.nodes),
        )


# --- torch 2.13: freeing a deep graph after walking it --------------------------------------
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
    values, no edge shapes): the cheap walk gradmagic uses to find the leaves when
    no graph is drawn. Returns the snapshot, plain data, and the live autograd
    nodes by node id, which the caller drops once the backward ran.
    """
    if _anchors:
        _release_anchors()
    walk = _Walk(leaf_key, inputs or (), light)
    names = list(root_names or [])
    with _gc_paused():
        for i, root in enumerate(roots):
            walk.add_root(root, names[i] if i < len(names) else None)
        walk.run()
        if len(walk.nodes) > _ANCHOR_STEP:
            _anchors.extend(walk.live[i] for i in _anchor_ids(len(walk.nodes), walk.edges))
        return walk.finish(), walk.live
