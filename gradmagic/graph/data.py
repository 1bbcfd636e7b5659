"""The autograd graph of one backward as plain data: no tensor, no autograd node.

`graph.snapshot` fills a `GraphSnapshot` before the engine runs; `capture.flow`
adds what each node received during the backward; `graph.draw` draws it.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from ..stats import flat_list

# How PyTorch names the backward node of a region torch.compile compiled (AOTAutograd's
# `CompiledFunction`): one node for every op inside, which gradmagic does not see.
COMPILED_OP = "CompiledFunction"


def is_compiled_op(op: str) -> bool:
    return op.startswith(COMPILED_OP)


class Edge(NamedTuple):
    """`src` fed `dst` in the forward pass; the gradient flows back along the edge."""

    src: int
    dst: int
    slot: int  # index of `src` in `dst.next_functions`
    size: tuple[int, ...] | None  # shape of the gradient along the edge; None: unknown
    port: int = 0  # which input of `src` the gradient arrives at (`input_nr`)

    @property
    def shape(self) -> str:
        """The gradient's shape as text, `(2, 3)` (formatted when drawn, not in the walk)."""
        return "" if self.size is None else shape_text(self.size)


@dataclass(slots=True)
class GraphNode:
    """One autograd node: an op (`MulBackward0`) or a leaf tensor (its `AccumulateGrad`)."""

    id: int
    kind: str  # "op" or "leaf"
    op: str = ""  # the name PyTorch gives the node
    seq: int | None = None  # autograd sequence number: creation order in the forward
    # What the op saved that is not a tensor (numbers, dims, sizes), read before the backward.
    saved_values: tuple[tuple[str, Any], ...] = ()
    leaf_key: int | None = None
    shape: str = ""
    dtype: str = ""
    root_name: str | None = None
    is_root: bool = False
    is_input: bool = False  # named in `inputs=` of the backward
    module: int | None = None  # innermost `GraphSnapshot.modules` call holding it
    function: str = ""  # a custom autograd.Function's name (`steps=True` graphs only)
    line: str = ""  # the user's line that created it in the forward: `line 3`, `util.py:14`
    code: str = ""  # that line's code, stripped

    @property
    def saved(self) -> tuple[tuple[str, str], ...]:
        """What the op saved, as text: `(("self", "(2, 3)"), ("exponent", "3"))`."""
        pairs = ((name, saved_text(value)) for name, value in self.saved_values)
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
    """The graph of one backward.

    Snapshots compare equal when they are of the same autograd graph (a
    `retain_graph=True` repeat): `signature` includes the sequence numbers.
    `structure` leaves them out, so a loop that rebuilds the same graph each
    step gives equal `structure` and different `signature`. A snapshot that
    repeats one recorded before (`repeat_of`) can be `fold`ed: a loop keeps one
    snapshot per structure, not one per step.

    `flow_in[(node, port)]` is the gradient a node received at one of its inputs
    during the backward (`tolist()` values, or `("norm", x)`), as the engine
    handed it over: the sum over every edge into that input.
    """

    nodes: list[GraphNode]
    edges: list[Edge]
    roots: list[int]
    n_ops: int
    flow_in: dict[tuple[int, int], Any] = field(default_factory=dict)
    flow_order: list[int] = field(default_factory=list)  # nodes in the order the engine ran them
    flow_nonfinite: list[int] = field(default_factory=list)  # received NaN/Inf, in that order
    modules: list[ModuleCall] = field(default_factory=list)
    # node id -> (a variable holding its output, "-inf", "NaN and inf"...): outputs the user's
    # namespace held, found non-finite as the backward began.
    forward_nonfinite: dict[int, tuple[str, str]] = field(default_factory=dict)
    # node id -> (leaf key, `tolist()` value) of the small leaves it took as inputs, read
    # as the backward began (for the nodes of `forward_nonfinite`).
    forward_inputs: dict[int, list[tuple[int, Any]]] = field(default_factory=dict)
    repeat_of: GraphSnapshot | None = field(default=None, repr=False)  # same structure, earlier
    folded: bool = False  # nodes, edges and flow dropped: drawn from `repeat_of`

    @property
    def edge_flow(self) -> dict[tuple[int, int, int], str]:
        """Edge labels of the gradient flow, `[36., 81.]` or `‖g‖=13.4`, for the edges that
        alone feed their input (where several edges meet, only their sum is known)."""
        if not self.flow_in:
            return {}
        fan_in: dict[tuple[int, int], int] = {}
        for e in self.edges:
            fan_in[(e.src, e.port)] = fan_in.get((e.src, e.port), 0) + 1
        labels = {}
        for e in self.edges:
            value = self.flow_in.get((e.src, e.port))
            if value is not None and fan_in[(e.src, e.port)] == 1:
                labels[(e.src, e.dst, e.slot)] = flow_text(value)
        return labels

    def received(self, node_id: int) -> list[str]:
        """What a node received, per input, where several edges meet there: `Σ [36., 81.]`."""
        ports = sorted(port for nid, port in self.flow_in if nid == node_id)
        return [flow_text(self.flow_in[(node_id, port)]) for port in ports]

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
        self.__dict__["structure"] = first.structure
        if keep_signature:
            self.signature  # noqa: B018 - computed and cached while the nodes are here
        else:
            self.__dict__["signature"] = f"folded {id(self)}"  # equal to no other snapshot
        self.repeat_of, self.folded = first, True
        self.nodes, self.edges, self.roots = [], [], []
        self.flow_in, self.flow_order, self.flow_nonfinite = {}, [], []

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GraphSnapshot) and other.signature == self.signature

    def __hash__(self) -> int:
        return hash(self.signature)

    @property
    def first_nonfinite_op(self) -> str | None:
        """The op whose backward first produced a NaN or Inf gradient, e.g. `LogBackward0`:
        it received finite gradients and sent a non-finite one on."""
        nid = self.first_nonfinite_node
        return None if nid is None else self.nodes[nid].op

    @property
    def first_nonfinite_node(self) -> int | None:
        """The id of the node `first_nonfinite_op` names."""
        if not self.flow_nonfinite:
            return None
        bad = set(self.flow_nonfinite)
        first = self.flow_nonfinite[0]
        senders = [e.dst for e in self.edges if e.src == first and e.dst not in bad]
        if not senders:
            return None  # it was handed over non-finite from the start (the `gradient=`)
        ran = {nid: k for k, nid in enumerate(self.flow_order)}
        return min(senders, key=lambda nid: ran.get(nid, 0))

    @property
    def forward_origin(self) -> tuple[GraphNode, str, str, list[tuple[int, Any]]] | None:
        """The earliest op (by creation) whose output was non-finite in the forward, with
        the variable that held it, what it held and its small leaf inputs' values; None
        when the namespace held none."""
        if not self.forward_nonfinite:
            return None
        nid = min(self.forward_nonfinite, key=lambda k: self.nodes[k].seq or 0)
        variable, what = self.forward_nonfinite[nid]
        return self.nodes[nid], variable, what, self.forward_inputs.get(nid, [])

    def chain(self, call: int | None) -> list[int]:
        """Module calls from the outermost down to `call`."""
        chain = []
        while call is not None:
            chain.append(call)
            call = self.modules[call].parent
        return chain[::-1]

    def module_path(self, node_id: int) -> list[ModuleCall]:
        """The module calls holding a node, innermost first."""
        path, call = [], self.nodes[node_id].module
        while call is not None:
            path.append(self.modules[call])
            call = self.modules[call].parent
        return path


# --- formatting -----------------------------------------------------------------------------


def shape_text(shape: Iterable[Any]) -> str:
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


def saved_text(value: Any) -> str | None:
    """A saved value as drawn: numbers, dims, shapes (`torch.Size`), text."""
    if value is None:
        return None
    if type(value) is torch.Size:
        return shape_text(value)
    if type(value) in (tuple, list) and all(type(v) is int for v in value):
        if any(v >= 2**63 for v in value):
            value = type(value)(v - 2**64 if v >= 2**63 else v for v in value)
        text = str(value)
        return text if len(text) <= 40 else text[:38] + "…" + text[-1]
    if isinstance(value, (bool, int, float, torch.SymInt, torch.SymFloat)):
        return _number_text(value)
    if isinstance(value, (tuple, list)):
        text = shape_text([saved_text(v) or "None" for v in value])
        return text if len(text) <= 40 else text[:38] + "…" + text[-1]
    if isinstance(value, (str, torch.dtype, torch.device, torch.layout)):
        return str(value)
    return None


EDGE_NUMBERS = 4  # numbers an edge label shows; a larger gradient shows its norm


def flow_text(value: Any) -> str:
    """A flow label: `("norm", 13.4)` as `‖g‖=13.4`, `tolist()` output in PyTorch's
    style (`repr(tensor)` costs about 0.2 ms a call)."""
    if isinstance(value, tuple):
        return f"‖g‖={value[1]:.3g}"
    numbers = flat_list(value)
    if len(numbers) > EDGE_NUMBERS:  # a label stays short: the norm of the rest
        if all(isinstance(v, (int, float)) for v in numbers):
            return f"‖g‖={math.sqrt(math.fsum(float(v) ** 2 for v in numbers)):.3g}"
        return f"{len(numbers)} values"
    floats = [v for v in numbers if isinstance(v, float) and math.isfinite(v)]
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
