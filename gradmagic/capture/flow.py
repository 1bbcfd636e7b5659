"""What flowed during a backward (`FlowRecorder`), which leaves need no hook for it
(`unhooked_leaves`), and the folding of repeated graphs (`RepeatFolder`).

Node *pre*-hooks only: a pre-hook sees a node's incoming gradients and returns
None, which changes nothing. A post-hook would make the engine keep each node's
inputs alive for post-hooks, and a post-hook the user registers during the
backward would then receive gradients it otherwise does not.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from .. import _engine, stats
from ..graph.data import GraphSnapshot
from ..graph.snapshot import LiveNodes

# Flow is recorded only when the gradients of the whole backward hold at most this
# many elements: a CNN's activation gradients run to millions on every edge, and
# their norms would cost more than the rest of gradmagic.
FLOW_ELEMENTS = 1 << 20


def _flow_value(grad: torch.Tensor, values: int) -> tuple[Any, bool]:
    """What a label needs, and whether it is all finite: the values (`tolist()`) up to
    `values` elements, else `("norm", its norm)`. Formatting waits for the drawing."""
    v, _ = stats.computable(grad)
    if v is None:
        return None, True
    if _engine.is_zero_tensor(v):
        v = torch.zeros(v.shape, dtype=v.dtype)
    if v.numel() <= values:
        listed = v.tolist()
        return listed, stats.finite_numbers(stats.flat_list(listed))
    (norm,) = stats.norms([v])
    return ("norm", norm), norm is not None and math.isfinite(norm)


class FlowRecorder:
    """While active, note the gradients each node of a small graph receives.

    Hooks every node of `snap` (graphs of at most `budget` ops whose gradients
    hold at most `FLOW_ELEMENTS` elements in all) and notes into `snap.flow_in`
    the values of gradients of at most `values` elements, else the norm. Nodes
    that received a non-finite gradient go into `snap.flow_nonfinite`, in the
    order the engine ran them. Hooks are removed on exit, also on an exception.
    """

    def __init__(
        self,
        snap: GraphSnapshot,
        live_nodes: LiveNodes,
        *,
        budget: int = 150,
        values: int = 16,
        errors: list[str] | None = None,
        from_readings: set[int] | frozenset[int] = frozenset(),
    ) -> None:
        self.snap = snap
        self.budget = budget
        self.values = values
        self.errors = errors if errors is not None else []
        # Leaf nodes not hooked: what they receive is read from their `.grad` (`derive`).
        self.from_readings = from_readings
        self.active = False
        self._live: LiveNodes | None = live_nodes
        self._handles: list[Any] = []
        # node -> the inputs its edges arrive at; None for a root: whatever it is handed
        self._ports: dict[int, tuple[int, ...] | None] = {}

    def __enter__(self) -> FlowRecorder:
        live, self._live = self._live, None  # hooks need the nodes once; never keep them
        snap = self.snap
        if not live or snap.n_ops > self.budget or snap.flow_elements > FLOW_ELEMENTS:
            return self
        ports: dict[int, set[int]] = {}
        for e in snap.edges:
            ports.setdefault(e.src, set()).add(e.port)
        self._ports = {
            nid: tuple(sorted(p)) for nid, p in ports.items() if nid not in self.from_readings
        }
        for nid in snap.roots:  # what the backward starts from: its `gradient=`
            self._ports.setdefault(nid, None)
        self.active = True
        record = self._record
        try:
            for nid in self._ports:
                self._handles.append(live[nid].register_prehook(functools.partial(record, nid)))
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

    def derive(self, nid: int, value: Any) -> None:
        """What leaf node `nid` received, from its `.grad` right after the backward: the
        same tensor when the gradient was empty before it (see `unhooked_leaves`)."""
        if not self.active or value is None:
            return
        if isinstance(value, torch.Tensor):
            label, finite = _flow_value(value, self.values)
        else:
            norm = value.norm
            label, finite = ("norm", norm), norm is None or math.isfinite(norm)
            if norm is None:
                return
        self.snap.flow_in[(nid, 0)] = label
        self.snap.flow_order.append(nid)
        if not finite:
            self.snap.flow_nonfinite.append(nid)

    def _record(self, nid: int, grad_outputs: tuple) -> None:
        try:
            snap, finite = self.snap, True
            snap.flow_order.append(nid)
            with _engine.quiet():
                ports = self._ports[nid]
                for port in range(len(grad_outputs)) if ports is None else ports:
                    grad = grad_outputs[port] if port < len(grad_outputs) else None
                    if grad is None:
                        continue
                    value, ok = _flow_value(grad, self.values)
                    finite = finite and ok
                    if value is not None:
                        snap.flow_in[(nid, port)] = value
            if not finite:
                snap.flow_nonfinite.append(nid)
        except Exception as exc:  # noqa: BLE001 - a drawing detail must never break a backward
            self.errors.append(f"flow: {type(exc).__name__}: {exc}")
        return None


def unhooked_leaves(snap: GraphSnapshot, found: list[tuple[torch.Tensor, Any]]) -> dict[int, Any]:
    """Leaf nodes whose flow label is their `.grad` after the backward, no hook needed:
    an empty gradient before it (so `.grad` becomes exactly what arrived), one edge in,
    and nothing that changes `.grad` after accumulating (a Python post-accumulate
    hook; DDP and FSDP do it from C++, so never under torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return {}
    fan_in: dict[int, int] = {}
    for e in snap.edges:
        fan_in[e.src] = fan_in.get(e.src, 0) + 1
    tracks = {track.record.key: (leaf, track) for leaf, track in found}
    out = {}
    for n in snap.nodes:
        if n.kind != "leaf" or fan_in.get(n.id) != 1 or n.leaf_key not in tracks:
            continue
        leaf, track = tracks[n.leaf_key]
        if getattr(leaf, "_post_accumulate_grad_hooks", None):
            continue
        if track.last is None or stats.is_zero(track.last):
            out[n.id] = track
    return out


class RepeatFolder:
    """Folds the graph of a backward that repeats one recorded earlier in the block: a
    training loop keeps one snapshot per structure, not one per step. The block's first
    graph is keyed (hashed) only if a second backward comes, so a one-step cell never
    hashes its graph. A repeat whose gradients went non-finite is kept, for the op that
    made them."""

    def __init__(self) -> None:
        self._firsts: dict[tuple[str, str], Any] = {}
        self._unkeyed: Any = None
        self._retained = False

    def fold(self, record: Any) -> None:
        snap = record.graph
        if snap is None:
            return
        self._retained = self._retained or record.retain_graph
        if not self._firsts and self._unkeyed is None:
            self._unkeyed = record
            return
        if self._unkeyed is not None:
            first, self._unkeyed = self._unkeyed, None
            self._firsts[(first.kind, first.graph.structure)] = first.graph
        key = (record.kind, snap.structure)
        first = self._firsts.setdefault(key, snap)
        if first is snap:
            return
        if snap.flow_nonfinite:
            snap.repeat_of = first
        else:
            snap.fold(first, keep_signature=self._retained)
