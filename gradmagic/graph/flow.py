"""`FlowRecorder`: the gradient that flowed along each edge of a small graph."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from .. import stats
from .snapshot import GraphSnapshot, LiveNodes

# Flow is recorded only when the gradients of the whole backward hold at most this
# many elements: a CNN's activation gradients run to millions on every edge, and
# their norms would cost more than the rest of gradmagic.
FLOW_ELEMENTS = 1 << 20


def _flow_value(grad: torch.Tensor, values: int) -> tuple[Any, bool]:
    """What the label of a gradient needs, and whether it is all finite: its values
    (`tolist()`) up to `values` elements, else `("norm", its norm)`. Formatting waits for the
    drawing: this runs inside the backward, once per edge, so it makes as few torch
    calls as it can (one `tolist()`, or one norm)."""
    if grad.is_meta:
        return None, True
    g = grad
    if g.layout != torch.strided:
        g = g.detach().coalesce().values() if g.is_sparse else g.detach().to_dense()
    if g.numel() <= values:
        listed = g.tolist()  # records nothing, even under create_graph
        return listed, stats.finite_numbers(stats.flat_list(listed))
    (norm,) = stats.norms([g])  # records nothing, even under create_graph
    # A non-finite norm can be overflow of finite values: only then look closer.
    return ("norm", norm), math.isfinite(norm) or not stats.has_nonfinite(g)


# --- gradient flow --------------------------------------------------------------------------


class FlowRecorder:
    """While active, note the gradient that flows along each edge of a small graph.

    Hooks the op nodes of `snap` (graphs of at most `budget` ops whose gradients
    hold at most `FLOW_ELEMENTS` elements in all) and notes into
    `snap.flow_values` the values of gradients of at most `values` elements,
    else the norm; `snap.edge_flow` formats them as labels when read. Nodes whose gradients came out non-finite go into
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
                value, ok = _flow_value(grad, self.values)
                finite = finite and ok
                if slot in sources and value is not None:
                    self.snap.flow_values[(sources[slot], nid, slot)] = value
            if not finite:
                self.snap.flow_nonfinite_nodes.append(nid)
        except Exception:  # noqa: BLE001 - a drawing detail must never break a backward
            pass
        return None
