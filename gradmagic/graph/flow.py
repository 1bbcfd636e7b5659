"""`FlowRecorder`: the gradient that flowed along each edge of a small graph."""

from __future__ import annotations

import cmath
import functools
import math
from typing import Any

import torch

from .snapshot import GraphSnapshot, LiveNodes


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
