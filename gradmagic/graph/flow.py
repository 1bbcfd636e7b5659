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
    n = g.numel()
    if n <= values:
        listed = g.tolist()  # records nothing, even under create_graph
        return listed, stats.finite_numbers(stats.flat_list(listed))
    norm = stats.small_norm(g)  # a small CPU gradient: finite if it has a norm here
    if norm is not None:
        return ("norm", norm), True
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
        self._targets: dict[int, list[tuple[int, int]]] = {}  # dst -> [(slot, src)]

    def __enter__(self) -> FlowRecorder:
        live, self._live = self._live, None  # hooks need the nodes once; never keep them
        if not live or self.snap.n_ops > self.budget or self.snap.flow_elements > FLOW_ELEMENTS:
            return self
        targets = self._targets
        for e in self.snap.edges:
            if e.dst in targets:
                targets[e.dst].append((e.slot, e.src))
            else:
                targets[e.dst] = [(e.slot, e.src)]
        record = self._record
        try:
            # Only ops with an edge to draw: a node whose inputs need no gradient has none.
            for nid in targets:
                self._handles.append(live[nid].register_hook(functools.partial(record, nid)))
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
        # grad_inputs[slot] is what this node sends along edge `slot` of its next_functions.
        try:
            flow_values, values, finite = self.snap.flow_values, self.values, True
            for slot, src in self._targets[nid]:
                grad = grad_inputs[slot] if slot < len(grad_inputs) else None
                if grad is None:
                    continue
                value, ok = _flow_value(grad, values)
                finite = finite and ok
                if value is not None:
                    flow_values[(src, nid, slot)] = value
            if not finite:
                self.snap.flow_nonfinite_nodes.append(nid)
        except Exception:  # noqa: BLE001 - a drawing detail must never break a backward
            pass
        return None
