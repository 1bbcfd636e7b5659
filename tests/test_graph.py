"""The autograd graph: snapshot, gradient flow, module grouping and the DOT drawing."""

from __future__ import annotations

import dataclasses
import gc
import re
import subprocess
import sys
import weakref

import pytest
import torch
from torch import nn

from gradmagic.capture.flow import FlowRecorder
from gradmagic.graph import GraphSnapshot, graph, to_digraph
from gradmagic.graph.modules import ModuleSpans
from gradmagic.graph.snapshot import snapshot


def drawn_nodes(source: str) -> list[str]:
    """Ids of the nodes a DOT source draws, the legend left out."""
    return re.findall(r"^\t([nmfr]\d+) \[", source, re.M)


def label_of(source: str, node: str) -> str:
    """A node's label as written in the DOT source (quoted or a bare word)."""
    found = re.search(rf'^\t+{node} \[label=(?:"((?:[^"\\]|\\.)*)"|(\S+))', source, re.M)
    return found.group(1) if found.group(1) is not None else found.group(2)


def keyed(*tensors: torch.Tensor):
    """A `leaf_key` for the given leaves: their position."""
    ids = {id(t): i for i, t in enumerate(tensors)}
    return lambda leaf: ids[id(leaf)]


def q_graph():
    a = torch.tensor([2.0, 3.0], requires_grad=True)
    b = torch.tensor([6.0, 4.0], requires_grad=True)
    return a, b, 3 * a**3 - b**2


def leaf_node(snap: GraphSnapshot, key: int):
    (node,) = [n for n in snap.nodes if n.kind == "leaf" and n.leaf_key == key]
    return node


# --- snapshot -------------------------------------------------------------------------------


def test_snapshot_names_the_ops_torch_emits_and_the_leaves():
    a, b, q = q_graph()
    snap, _ = snapshot([q], leaf_key=keyed(a, b), root_names=["Q"])
    ops = [n for n in snap.nodes if n.kind == "op"]
    # `3 * a**3 - b**2`: no separate node for the constant 3, which MulBackward0 saves.
    assert sorted(n.op for n in ops) == [
        "MulBackward0",
        "PowBackward0",
        "PowBackward0",
        "SubBackward0",
    ]
    assert snap.n_ops == 4
    # Only what the ops saved that is not a tensor: reading a saved tensor would unpack it
    # (the constant 3 of `3 * a**3` is a saved tensor, and so is each power's input).
    assert {n.op: dict(n.saved) for n in ops if n.op != "PowBackward0"} == {
        "SubBackward0": {"alpha": "1"},
        "MulBackward0": {},
    }
    assert sorted(tuple(sorted(n.saved)) for n in ops if n.op == "PowBackward0") == [
        (("exponent", "2"),),
        (("exponent", "3"),),
    ]
    leaves = [n for n in snap.nodes if n.kind == "leaf"]
    assert sorted((n.leaf_key, n.shape, n.dtype) for n in leaves) == [
        (0, "(2,)", "float32"),
        (1, "(2,)", "float32"),
    ]
    (root,) = snap.roots
    assert (snap.nodes[root].op, snap.nodes[root].root_name) == ("SubBackward0", "Q")
    assert {e.shape for e in snap.edges} == {"(2,)"} and len(snap.edges) == 5
    consumer = {e.src: snap.nodes[e.dst] for e in snap.edges}
    assert consumer[leaf_node(snap, 0).id].saved == (("exponent", "3"),)


def test_every_edge_has_the_shape_torch_gives_its_gradient():
    # Edges into leaves take the leaf's shape, the others the engine's input metadata:
    # both must be what torch records for the gradient along the edge.
    x = torch.randn(5, 3)
    w = torch.randn(3, 2, requires_grad=True)
    b = torch.randn(2, requires_grad=True)
    s = torch.tensor(2.0, requires_grad=True)
    loss = ((x @ w + b) * s).sum()
    snap, live = snapshot([loss], leaf_key=keyed(w, b, s))
    for e in snap.edges:
        expected = tuple(live[e.src]._input_metadata[0].shape)
        assert tuple(e.size) == expected and e.shape == str(expected)
    into_leaves = {
        snap.nodes[e.src].leaf_key: e.shape for e in snap.edges if snap.nodes[e.src].kind == "leaf"
    }
    assert into_leaves == {0: "(3, 2)", 1: "(2,)", 2: "()"}


def test_sequence_numbers_follow_the_forward():
    a, b, q = q_graph()
    snap, _ = snapshot([q], leaf_key=keyed(a, b))
    by_seq = sorted((n.seq, n.op) for n in snap.nodes if n.kind == "op")
    steps = [op for _, op in by_seq]
    assert steps == ["PowBackward0", "MulBackward0", "PowBackward0", "SubBackward0"]
    assert by_seq[-1][0] - by_seq[0][0] == 3


def test_snapshot_keeps_no_tensor_and_no_node_alive():
    a = torch.randn(3, requires_grad=True)
    h = a.exp()  # ExpBackward0 saves its result: an activation
    loss = (h * a).sum()
    refs = [weakref.ref(t) for t in (a, h, loss)]
    snap, live = snapshot([loss], leaf_key=lambda t: 0)
    assert len(live) == 4  # SumBackward0, MulBackward0, ExpBackward0, AccumulateGrad
    del a, h, loss, live
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
    assert snap.n_ops == 3
    kinds, todo = set(), [snap]
    while todo:  # every value the snapshot holds, all the way down
        obj = todo.pop()
        kinds.add(type(obj).__name__)
        if isinstance(obj, (list, tuple, set)):
            todo.extend(obj)
        elif isinstance(obj, dict):
            todo.extend([*obj.keys(), *obj.values()])
        elif dataclasses.is_dataclass(obj):
            todo.extend(getattr(obj, f.name) for f in dataclasses.fields(obj))
    # Shapes stay `torch.Size` (a tuple of ints) until drawn.
    assert kinds == {
        *("GraphSnapshot", "GraphNode", "Edge", "list", "tuple", "dict", "Size"),
        *("str", "int", "bool", "NoneType"),
    }


def test_same_graph_same_signature_rebuilt_graph_same_structure():
    a, b, q = q_graph()
    first, _ = snapshot([q], leaf_key=keyed(a, b))
    q.backward(torch.ones(2), retain_graph=True)
    again, _ = snapshot([q], leaf_key=keyed(a, b))
    rebuilt, _ = snapshot([3 * a**3 - b**2], leaf_key=keyed(a, b))
    assert first == again and hash(first) == hash(again)
    assert first.signature == again.signature != rebuilt.signature
    assert first.structure == rebuilt.structure
    assert first != rebuilt


def test_roots_can_be_leaves_and_gradient_edges():
    a = torch.ones(2, requires_grad=True)
    h = a * 2
    snap, _ = snapshot([a, torch.autograd.graph.get_gradient_edge(h)], leaf_key=lambda t: 7)
    roots = [snap.nodes[r] for r in snap.roots]
    assert [(n.kind, n.op, n.leaf_key) for n in roots] == [
        ("leaf", "", 7),
        ("op", "MulBackward0", None),
    ]


def test_inputs_are_marked_and_drawn():
    a, b, q = q_graph()
    snap, _ = snapshot([q], leaf_key=keyed(a, b), inputs=[a])
    assert [n.leaf_key for n in snap.nodes if n.is_input] == [0]
    source = to_digraph(snap, leaf_names={0: "a", 1: "b"}).source
    node = f"n{leaf_node(snap, 0).id}"
    assert label_of(source, node) == r"a\n(2,) float32\n(inputs=)"
    assert re.search(rf"^\t{node} \[.*peripheries=2", source, re.M)


def test_custom_function_nodes_keep_their_class_name():
    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    x = torch.ones(2, 3, requires_grad=True)
    snap, _ = snapshot([Double.apply(x).sum()], leaf_key=lambda t: 0)
    ops = {n.op: dict(n.saved) for n in snap.nodes if n.kind == "op"}
    # Counted, not read: `saved_tensors` unpacks (and may clear them, or recompute).
    assert ops["DoubleBackward"] == {"saved": "1 tensor"}


@pytest.mark.slow
def test_a_100000_op_chain_snapshots_and_folds_within_budget():
    x = torch.ones(3, requires_grad=True)
    y = x
    for _ in range(100_000):
        y = y * 1.0001
    snap, live = snapshot([y], leaf_key=lambda t: 0, root_names=["y"])
    del live
    assert snap.n_ops == 100_000 and len(snap.edges) == 100_000
    source = to_digraph(snap, leaf_names={0: "x"}).source
    nodes = drawn_nodes(source)
    # 60 nodes: 6 for folding, 27 nearest the root, 27 nearest the leaf (x and 26 ops).
    assert len(nodes) == 55 and nodes.count("f0") == 1
    assert label_of(source, "f0") == "… 99,947 ops folded …"
    assert 'label="x\\n(3,) float32"' in source and 'label="y\\nMulBackward0' in source
    small = to_digraph(snap, leaf_names={0: "x"}, max_nodes=5).source
    assert len(drawn_nodes(small)) == 5
    x_ref = weakref.ref(x)
    del x, y
    gc.collect()  # frees what the anchors held, one stretch at a time
    assert x_ref() is None


DEEP_CHAIN = """
import gc, sys, torch
def build():
    y = torch.ones(3, requires_grad=True)
    for _ in range(100_000):
        y = y * 1.0001
    return y
y = build()
{walk}
del y
gc.collect()
print("freed")
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("walk", "survives"),
    [
        ("from gradmagic.graph import snapshot; snapshot([y], leaf_key=lambda t: 0)", True),
        ("n = y.grad_fn\nwhile n.next_functions: n = n.next_functions[0][0]\ndel n", False),
    ],
    ids=["snapshot", "plain-walk"],
)
def test_freeing_a_deep_graph_walked_from_python(walk, survives):
    # torch 2.13: a node's Python wrapper lives as long as the node, and freeing the graph
    # frees the wrappers by recursion in C. If plain-walk starts passing, torch fixed it and
    # the anchors in gradmagic/graph/snapshot.py can go.
    script = DEEP_CHAIN.format(walk=walk)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert (done.returncode == 0 and done.stdout == "freed\n") is survives, done.stderr[-500:]


# --- gradient flow --------------------------------------------------------------------------


def test_flow_labels_the_gradient_along_each_edge():
    a, b, q = q_graph()
    snap, live = snapshot([q], leaf_key=keyed(a, b))
    with FlowRecorder(snap, live):
        q.backward(gradient=torch.tensor([1.0, 1.0]))
    assert (a.grad.tolist(), b.grad.tolist()) == ([36.0, 81.0], [-12.0, -8.0])
    into = {snap.nodes[src].leaf_key: label for (src, _, _), label in snap.edge_flow.items()}
    assert into[0] == "[36., 81.]"  # 9 a**2
    assert into[1] == "[-12., -8.]"  # -2 b
    assert len(snap.edge_flow) == 5 and snap.flow_nonfinite == []
    source = to_digraph(snap, leaf_names={0: "a", 1: "b"}).source
    assert '[label="(2,)\\n[36., 81.]"]' in source


def test_flow_changes_no_gradient_bit():
    torch.manual_seed(0)
    w = torch.randn(5, 4, requires_grad=True)
    x = torch.randn(3, 5)

    def grad_of_w(record: bool) -> torch.Tensor:
        w.grad = None
        loss = torch.tanh(x @ w).pow(3).sum() / 7
        snap, live = snapshot([loss], leaf_key=lambda t: 0)
        with FlowRecorder(snap, live, budget=150 if record else 0):
            loss.backward()
        assert bool(snap.edge_flow) is record
        return w.grad

    plain, recorded = grad_of_w(False), grad_of_w(True)
    assert torch.equal(plain.view(torch.int32), recorded.view(torch.int32))


def test_flow_hooks_are_removed_on_exit_and_on_interrupt():
    a, b, q = q_graph()
    snap, live = snapshot([q], leaf_key=keyed(a, b))
    recorder = FlowRecorder(snap, live)
    del live
    with pytest.raises(KeyboardInterrupt), recorder:
        q.backward(torch.ones(2), retain_graph=True)
        raise KeyboardInterrupt
    assert len(snap.edge_flow) == 5
    snap.flow_in.clear()
    ref = weakref.ref(recorder)
    del recorder
    gc.collect()
    assert ref() is None  # no node holds a hook that holds the recorder
    q.backward(torch.ones(2))
    assert snap.edge_flow == {}
    assert a.grad.tolist() == [72.0, 162.0]  # two backwards, nothing else


def test_flow_labels_large_gradients_by_norm_and_notes_nonfinite_ops():
    x = torch.tensor([0.0] + [1.0] * 19, requires_grad=True)
    loss = (x.log() * 3).sum()
    snap, live = snapshot([loss], leaf_key=lambda t: 0)
    with FlowRecorder(snap, live, values=16):
        loss.backward()
    assert snap.first_nonfinite_op == "LogBackward0"
    # What received a non-finite gradient: the leaf x, from LogBackward0 (1/x at 0).
    assert [snap.nodes[i].kind for i in snap.flow_nonfinite] == ["leaf"]
    (into_x,) = [label for (src, _, _), label in snap.edge_flow.items() if src == 3]
    assert into_x == "‖g‖=inf"
    mul = [label for (src, dst, _), label in snap.edge_flow.items() if src == 2]
    assert mul == [f"‖g‖={3 * 20**0.5:.3g}"] == ["‖g‖=13.4"]


def test_flow_stays_off_above_its_budget():
    x = torch.ones(2, requires_grad=True)
    y = x
    for _ in range(10):
        y = y * 2
    snap, live = snapshot([y.sum()], leaf_key=lambda t: 0)
    with FlowRecorder(snap, live, budget=5):
        y.sum().backward()
    assert snap.edge_flow == {}


# --- modules --------------------------------------------------------------------------------


def global_module_hooks() -> int:
    m = nn.modules.module
    return len(m._global_forward_hooks) + len(m._global_forward_pre_hooks)


def transformer_snapshot(layers: int = 6):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    hooks_before = global_module_hooks()
    with ModuleSpans() as spans:
        assert global_module_hooks() == hooks_before + 2
        loss = enc(torch.randn(2, 5, 32)).pow(2).mean()
    assert global_module_hooks() == hooks_before
    params = {id(p): n for n, p in enc.named_parameters(prefix="enc")}
    keys = {}

    def leaf_key(t):
        return keys.setdefault(params[id(t)], len(keys))

    snap, _ = snapshot([loss], leaf_key=leaf_key, root_names=["loss"])
    modules = {id(m): n for n, m in enc.named_modules(prefix="enc")}
    spans.assign(snap, module_name=lambda m: modules.get(id(m)))
    return enc, snap, {k: n for n, k in keys.items()}, spans


def test_transformer_collapses_by_module_within_budget():
    enc, snap, names, _ = transformer_snapshot()
    assert len(snap.nodes) > 60 and len(snap.modules) == 1 + 6 * 9
    source = to_digraph(snap, leaf_names=names).source
    nodes = drawn_nodes(source)
    assert len(nodes) <= 60
    labels = [label_of(source, n) for n in nodes]
    assert labels[0] == "loss\\nMeanBackward0\\nself: (2, 5, 32)"
    # Six identical layers in a row: the first is drawn module by module (its input needs
    # no gradient), the other five are one node with a count.
    run = "enc.layers.1 … enc.layers.5: TransformerEncoderLayer ×5\\n320 ops, 60 params"
    assert labels.count(run) == 1
    assert "enc.layers.0.self_attn (MultiheadAttention): 45 ops, 4 params" in labels
    assert not any(label.startswith("enc.layers.2") for label in labels)
    for name in names.values():
        folded = name.split(".")[2] in "12345"
        assert folded or any(name.startswith(label.split(" (")[0] + ".") for label in labels)
    [edge] = [e for e in re.findall(r"(\w+) -> (\w+)", source) if label_of(source, e[0]) == run]
    assert label_of(source, edge[1]) == "PowBackward0\\nexponent: 2"  # layers.5 fed the loss


def test_depth_collapses_modules_that_deep():
    enc, snap, names, _ = transformer_snapshot(layers=2)
    source = to_digraph(snap, leaf_names=names, depth=2).source
    labels = [label_of(source, n) for n in drawn_nodes(source)]
    assert len(labels) == 24
    # Linear: TBackward0, AddmmBackward0 and two views around it.
    assert "enc.layers.1.linear1 (Linear): 4 ops, 2 params" in labels
    assert "enc.layers.1.self_attn (MultiheadAttention): 48 ops, 4 params" in labels
    whole = to_digraph(snap, leaf_names=names, depth=0).source
    assert [label_of(whole, n) for n in drawn_nodes(whole)][1:] == [
        "PowBackward0\\nexponent: 2",
        f"enc (TransformerEncoder): {snap.n_ops - 2} ops, 24 params",
    ]


def test_module_path_is_innermost_first_and_modules_are_not_kept_alive():
    enc, snap, names, spans = transformer_snapshot(layers=2)
    key = {n: k for k, n in names.items()}["enc.layers.1.linear1.weight"]
    path = snap.module_path(leaf_node(snap, key).id)
    assert [(c.name, c.cls, c.depth) for c in path] == [
        ("enc.layers.1.linear1", "Linear", 2),
        ("enc.layers.1", "TransformerEncoderLayer", 1),
        ("enc", "TransformerEncoder", 0),
    ]
    ref = weakref.ref(enc)
    del enc
    gc.collect()
    assert ref() is None


def test_module_hooks_go_in_pairs_or_not_at_all(monkeypatch):
    from gradmagic.capture.modules import ModuleCalls
    from gradmagic.capture.names import CreatedLeafNames

    def refuse(*args, **kwargs):
        raise RuntimeError("no more hooks")

    monkeypatch.setattr(nn.modules.module, "register_module_forward_hook", refuse)
    hooks_before = global_module_hooks()
    for probe in (ModuleSpans(), ModuleCalls(CreatedLeafNames(enabled=False), None, [])):
        with pytest.raises(RuntimeError, match="no more hooks"):
            probe.__enter__()
        assert global_module_hooks() == hooks_before  # the pre-hook came off again


def test_module_spans_close_when_a_forward_raises():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = nn.Sequential(nn.Linear(2, 2), Boom())
    hooks_before = global_module_hooks()
    with pytest.raises(RuntimeError, match="boom"), ModuleSpans():
        model(torch.ones(1, 2))
    assert global_module_hooks() == hooks_before


def test_snapshots_of_a_loop_are_assigned_in_one_pass_as_one_by_one():
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.Tanh(), nn.Linear(3, 1)))
    losses = []
    with ModuleSpans() as spans:
        for _ in range(3):
            losses.append(model(torch.ones(4, 2)).sum())
            torch.ones(1, requires_grad=True).exp()  # an op between the calls, in no module
    together = [snapshot([loss], leaf_key=lambda t: 0)[0] for loss in losses]
    alone = [snapshot([loss], leaf_key=lambda t: 0)[0] for loss in losses]
    spans.assign(together)
    for snap in alone:
        spans.assign(snap)
    for a, b in zip(together, alone):
        assert a.modules == b.modules
        assert [n.module for n in a.nodes] == [n.module for n in b.nodes]
        assert [(c.name, c.depth) for c in a.modules] == [
            ("", 0),
            ("0", 1),
            ("1", 1),
            ("1.0", 2),
            ("1.1", 2),
        ]
        ops = sorted(
            (a.modules[n.module].name if n.module is not None else "-", n.op)
            for n in a.nodes
            if n.kind == "op"
        )
        assert ops == [
            ("-", "SumBackward0"),
            ("0", "AddmmBackward0"),
            ("0", "TBackward0"),
            ("1.0", "TanhBackward0"),
            ("1.1", "AddmmBackward0"),
            ("1.1", "TBackward0"),
        ], ops
    spans.assign([])  # nothing to assign: no error


def test_unnamed_modules_are_named_from_their_parent():
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    with ModuleSpans() as spans:
        loss = model(torch.ones(4, 2)).sum()
    snap, _ = snapshot([loss], leaf_key=lambda t: 0)
    spans.assign(snap)
    assert [(c.name, c.cls) for c in snap.modules] == [
        ("", "Sequential"),
        ("0", "Linear"),
        ("1", "Tanh"),
        ("2", "Linear"),
    ]


# --- drawing --------------------------------------------------------------------------------


def test_drawing_colours_status_roots_and_repeat():
    a, b, q = q_graph()
    snap, _ = snapshot([q], leaf_key=keyed(a, b), root_names=["Q"])
    source = to_digraph(
        snap, leaf_names={0: "a", 1: "b"}, leaf_status={0: "nan/inf", 1: "accumulated"}, repeat=3
    ).source
    a_node, b_node = f"n{leaf_node(snap, 0).id}", f"n{leaf_node(snap, 1).id}"
    assert re.search(rf'^\t{a_node} \[label="a\\n\(2,\) float32\\nnan/inf" color=red', source, re.M)
    assert re.search(rf"^\t{b_node} \[.*color=orange", source, re.M)
    assert re.search(
        r'^\tn0 \[label="Q\\nSubBackward0\\nalpha: 1" fillcolor=darkolivegreen1', source, re.M
    )
    assert '\tlabel="ran 3× in this cell"' in source
    legend = source[source.index("cluster_legend") :]
    assert [label_of(legend, n) for n in re.findall(r"^\t\t(legend\d+) ", legend, re.M)] == [
        "leaf tensor",
        "root",
        "backward op",
        "NaN/Inf gradient",
        "accumulated gradient",
    ]


def test_drawing_is_deterministic():
    sources = set()
    for _ in range(2):
        enc, snap, names, _ = transformer_snapshot(layers=2)
        sources.add(to_digraph(snap, leaf_names=names).source)
        sources.add(to_digraph(snap, leaf_names=names).source)
    assert len(sources) == 1


def test_user_text_cannot_break_out_of_a_label():
    a, b, q = q_graph()
    snap, _ = snapshot([q], leaf_key=keyed(a, b), root_names=['<b>"x"{y}\n\\N'])
    source = to_digraph(snap, leaf_names={0: 'a"]; evil [label="x', 1: "\\"}).source
    assert '\tn0 [label="<b>\\"x\\"{y}\\n\\\\N\\nSubBackward0' in source
    assert 'label="a\\"]; evil [label=\\"x\\n' in source
    assert f'\tn{leaf_node(snap, 1).id} [label="\\\\\\n(2,) float32"' in source
    assert "evil [" not in source.replace('\\"]; evil [', "")


# --- graph() --------------------------------------------------------------------------------


def test_graph_of_a_list_names_leaves_and_roots():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    anon = torch.tensor([3.0, 4.0], requires_grad=True)
    y1, y2 = w * anon, (w + 1).sum()
    source = graph([y1, y2], {"w": w, "y1": y1}).source
    assert [label_of(source, n) for n in drawn_nodes(source)] == [
        "y1\\nMulBackward0",
        "root\\nSumBackward0\\nself: (2,)",
        "AddBackward0\\nalpha: 1",
        "w\\n(2,) float32",
        "leaf #2 of MulBackward0\\n(2,) float32",
    ]


def test_graph_of_a_dict_with_a_module_after_backward_freed_the_graph():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    out = model(torch.ones(4, 3)).pow(2)
    outputs = {"loss": out.sum(), "mean": out.mean()}
    outputs["loss"].backward()  # frees PowBackward0's saved input
    source = graph(outputs, {"model": model}).source
    labels = [label_of(source, n) for n in drawn_nodes(source)]
    assert labels[:4] == [
        "loss\\nSumBackward0\\nself: (4, 2)",
        "mean\\nMeanBackward0\\nself: (4, 2)",
        "PowBackward0\\nexponent: 2",  # its saved `self` was freed: left out
        "ReluBackward0",  # its saved `result` too
    ]
    # Freed as well, but `mat1_sym_sizes` outlives them: the shapes stay.
    assert "AddmmBackward0\\nalpha: 1\\nbeta: 1\\nmat1: (4, 3)\\nmat2: (3, 2)" in labels
    assert {"model.0.weight\\n(2, 3) float32", "model.0.bias\\n(2,) float32"} <= set(labels)


def test_graph_refuses_tensors_without_autograd():
    with pytest.raises(ValueError, match="needs a tensor with a grad_fn"):
        graph(torch.ones(2))


def test_graph_groups_by_module_with_spans():
    model = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(30)])
    with ModuleSpans() as spans:
        out = model(torch.ones(2, 4)).sum()
    source = graph(out, {"net": model}, spans=spans, max_nodes=40).source
    labels = [label_of(source, n) for n in drawn_nodes(source)]
    assert len(labels) <= 40
    # net.0 drawn as its parts, the 29 identical blocks after it one node with a count.
    assert (
        "net.0.0 (Linear): 2 ops, 2 params" in labels
        and "net.0.1 (Tanh): 1 ops, 0 params" in labels
    )
    assert "net.1 … net.29: Sequential ×29\\n87 ops, 58 params" in labels
    assert not any(label.startswith("net.2") for label in labels)


def test_repeated_patterns_fold_and_small_graphs_do_not():
    net = nn.Sequential(*[m for _ in range(20) for m in (nn.Linear(8, 8), nn.ReLU())])
    with ModuleSpans() as spans:
        out = net(torch.ones(2, 8)).sum()
    source = graph(out, {"net": net}, spans=spans).source
    labels = [label_of(source, n) for n in drawn_nodes(source)]
    assert "net.2 … net.39: (Linear, ReLU) ×19\\n57 ops, 38 params" in labels
    assert "net.0 (Linear): 2 ops, 2 params" in labels and "net.1 (ReLU): 1 ops, 0 params" in labels
    # Two identical layers are no run; a graph within the budget is drawn op by op.
    small = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(8, 8), nn.ReLU())])
    with ModuleSpans() as spans:
        out = small(torch.ones(2, 8)).sum()
    source = graph(out, {"small": small}, spans=spans).source
    assert "×" not in source and source.count("AddmmBackward0") == 3


def test_graph_module_imports_no_graphviz_ipython_or_pandas():
    code = (
        "import sys\n"
        "import gradmagic.graph\n"
        "print(sorted(m for m in ('graphviz', 'IPython', 'pandas') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
