"""gradmagic must not break, leak or be fooled: restoration, bad input, hostile names, size."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from IPython.core.error import UsageError
from torch import nn

import gradmagic
from gradmagic import _engine, report


def _restored() -> bool:
    original = _engine.original_engine()
    global_hooks = nn.modules.module._global_forward_hooks
    return (
        torch.autograd.graph._engine_run_backward is original
        and torch.autograd._engine_run_backward is original
        and not _engine.is_patched()
        and len(global_hooks) == 0
        and len(nn.modules.module._global_forward_pre_hooks) == 0
    )


@pytest.mark.parametrize(
    "cell",
    [
        "raise RuntimeError('before')\n(x * 2).sum().backward()",
        "y = x * 2\ny.register_hook(lambda g: 1 / 0)\ny.sum().backward()",
        "(x * 2).sum().backward()\nraise RuntimeError('after')",
    ],
    ids=["before", "during", "after"],
)
def test_a_cell_that_raises_anywhere_restores_everything(ip, cell):
    ip.run("x = torch.ones(2, requires_grad=True)")
    result = ip.run_raw("%%grad -q\n" + cell + "\n")
    assert result.error_in_exec is not None
    assert _restored()
    ip.run("%%grad -q -o rep\n(x * 4).sum().backward()\n")
    assert ip.ns["rep"].table.loc["x", "after"].tolist() in ([4.0, 4.0], [6.0, 6.0])


def test_nested_grad_cells(ip):
    ip.run("x = torch.ones(2, requires_grad=True)\nw = torch.ones(2, requires_grad=True)")
    ip.run(
        "%%grad -q -o outer\n"
        "(x * 2).sum().backward()\n"
        "get_ipython().run_cell_magic('grad', '-q -o inner', '(w * 3).sum().backward()')\n"
    )
    assert _restored()
    assert list(ip.ns["inner"].table.index) == ["w"]
    assert torch.equal(ip.ns["inner"].table.loc["w", "after"], torch.tensor([3.0, 3.0]))
    assert torch.equal(ip.ns["outer"].table.loc["x", "after"], torch.tensor([2.0, 2.0]))
    ip.run("%%grad -q -o rep\n(x * 2).sum().backward()\n")
    assert ip.ns["rep"].table.loc["x", "status"] == "accumulated"


def test_unload_while_nothing_is_watched_leaves_torch_untouched(ip):
    ip.run("%unload_ext gradmagic")
    try:
        assert _restored()
        with pytest.raises(UsageError):
            ip.shell.run_cell_magic("grad", "", "pass")
    finally:
        ip.run("%load_ext gradmagic")


# Options are parsed by IPython's argument parser, then ours: any string must give
# either a report or a UsageError, never a traceback from gradmagic.
option_words = st.sampled_from(
    [
        "-o",
        "rep",
        "-q",
        "--values",
        "--copies",
        "--only",
        "-G",
        "--graph-only",
        "--max-nodes",
        "--depth",
        "--plot",
        "--no-plot",
        "-1",
        "0",
        "3",
        "abc",
        "(",
        "'x'",
        "--",
        "-",
        "--nope",
    ]
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(option_words, max_size=5) | st.text(max_size=20))
def test_any_option_string_is_a_report_or_a_usage_error(ip, words):
    line = words if isinstance(words, str) else " ".join(words)
    ip.ns["x"] = torch.ones(2, requires_grad=True)
    try:
        ip.shell.run_cell_magic("grad", line + " -q", "(x * 2).sum().backward()\n")
    except UsageError as exc:
        assert str(exc).strip()
    assert _restored()


HOSTILE = [
    "<img src=x onerror=alert(1)>",
    "<script>alert(1)</script>",
    "quote\"and'apostrophe",
    "{brace}|pipe<angle>",
    "back\\slash\\",
    "new\nline",
    "x" * 2000,
]


def test_hostile_names_are_escaped_in_html_text_and_svg(images):
    heads = nn.ModuleDict({key: nn.Linear(2, 1) for key in HOSTILE})
    ns = {"heads": heads, HOSTILE[0]: torch.ones(2, requires_grad=True)}
    with gradmagic.watch(ns) as rec:
        x = torch.randn(3, 2)
        total = sum(head(x).sum() for head in heads.values()) + (ns[HOSTILE[0]] * 2).sum()
        total.backward()
    rep = rec.report()
    names = set(rep.table.index)
    assert f"heads.{HOSTILE[1]}.weight" in names and HOSTILE[0] in names
    html = rep._repr_html_()
    for bad in ("<img src=x", "<script>", "onerror=alert(1)>"):
        assert bad not in html
    # Names carry line-break opportunities (<wbr>) between their escaped parts.
    text = html.replace("<wbr>", "")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "quote&quot;and&#x27;apostrophe" in text
    # The SVG parsed as XML: no broken markup.
    import xml.etree.ElementTree as ET

    assert "<svg" not in html  # graph and chart are images
    svgs = images(html, "gradmagic-graph")
    assert len(svgs) == 1
    for svg in svgs:
        tree = ET.fromstring(svg)
        tags = {el.tag.split("}")[-1] for el in tree.iter()}
        assert not tags & {"script", "img", "foreignObject"}
    assert "heads.&lt;script&gt;alert(1)&lt;/script&gt;.weight" in svgs[0]
    # In DOT the names sit inside quoted strings, quotes and backslashes escaped.
    source = rep.graph.source
    assert 'quote\\"and' in source and "back\\\\slash" in source
    text = repr(rep)
    assert "heads.<script>" in text  # text is plain: shown as is, clipped
    assert "\nline" not in text.replace("\n  ", "")  # newlines inside names do not break rows


def test_ten_thousand_parameter_tensors_stay_bounded():
    model = nn.ModuleList([nn.Linear(2, 2) for _ in range(5000)])
    x = torch.randn(3, 2)
    with gradmagic.watch({"model": model}) as rec:
        sum(m(x).sum() for m in model).backward()
    rep = rec.report()
    html = rep._repr_html_()
    assert len(rep.table) == 10_000
    assert html.count("<tr id=") == report.model.MAX_SHOWN_ROWS
    assert "9,800 more rows not shown" in html


def test_a_gradient_with_100_million_elements_is_summarised():
    w = torch.zeros(100_000_000, requires_grad=True)
    with gradmagic.watch({"w": w}) as rec:
        (w * 2).sum().backward()
    row = rec.report().table.loc["w"]
    summary = row["after"]
    assert summary.numel == 100_000_000
    assert summary.min == summary.max == 2.0
    assert abs(summary.norm - 2.0 * 10_000) < 1e-2
    del w, rec, row, summary
    gc.collect()


def test_a_report_holds_only_what_it_shows():
    model = nn.Linear(100, 100)
    with gradmagic.watch({"model": model}) as rec:
        model(torch.randn(4, 100)).sum().backward()
    rep = rec.report()
    ref = weakref.ref(model.weight)
    grad_ref = weakref.ref(model.weight.grad)
    del model, rec
    gc.collect()
    assert ref() is None and grad_ref() is None
    assert rep.table.loc["model.weight", "after"].numel == 10_000


def test_a_watched_block_leaves_no_cyclic_garbage():
    """Reference counting alone frees a block's recorder: left in reference cycles, every
    watched training step would feed the cyclic collector (0.4 ms a pass on a small VM)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 4)
    ns = {"model": model, "opt": opt, "x": x}
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            with gradmagic.watch(ns, source="opt.zero_grad()\nmodel(x).sum().backward()\n"):
                opt.zero_grad()
                model(x).sum().backward()
                opt.step()
        gc.collect()
        ours = [o for o in gc.garbage if type(o).__module__.startswith("gradmagic")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert ours == []


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@cuda
def test_cuda_summaries_stay_on_the_device_with_one_sync_per_backward():
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).cuda()
    x = torch.randn(32, 64, device="cuda")
    with gradmagic.watch({"model": model}) as rec:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model(x).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    table = rec.report().table
    assert table.loc["model.0.weight", "device"] == "cuda:0"
    assert (
        abs(table.loc["model.0.weight", "after"].norm - model[0].weight.grad.norm().item()) < 1e-3
    )


@cuda
def test_cuda_gradients_are_bit_identical():
    def step(watching):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1)).cuda()
        x = torch.randn(8, 16, device="cuda")
        if watching:
            with gradmagic.watch({"model": model}):
                model(x).sum().backward()
        else:
            model(x).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(step(False), step(True)))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


@pytest.mark.slow
def test_two_hundred_runs_of_a_training_cell_keep_memory_flat(ip):
    ip.run(
        "from torch import nn\nimport weakref\n"
        "model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.01)\n"
        "x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))\n"
        "acts = []\n"
    )
    cell = (
        "%%grad -q\nopt.zero_grad()\nh = model(x)\nacts.append(weakref.ref(h))\n"
        "loss = nn.functional.cross_entropy(h, y)\nloss.backward()\nopt.step()\n"
    )
    for _ in range(20):  # warm up allocator and caches
        ip.run(cell)
    gc.collect()
    start = _rss_bytes()
    for _ in range(200):
        ip.run(cell)
    gc.collect()
    grown = _rss_bytes() - start
    assert grown < 16 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 200 runs"
    refs = [weakref.ref(p) for p in ip.ns["model"].parameters()]
    ip.run("del model, opt, h, loss, x, y")
    gc.collect()
    assert [r for r in refs if r() is not None] == []
    # Every activation but the last one the namespace held is gone.
    assert sum(ref() is not None for ref in ip.ns["acts"]) == 0


@pytest.mark.slow
def test_a_100000_op_graph_under_watch_is_reported_with_its_graph_folded(images):
    x = torch.ones(3, requires_grad=True)
    with gradmagic.watch({"x": x}) as rec:
        y = x
        for _ in range(100_000):
            y = y * 1.0
        y.sum().backward()
    rep = rec.report()
    html = rep._repr_html_()
    assert torch.equal(rep.table.loc["x", "after"], torch.ones(3))
    assert "ops folded" in rep.graph.source
    [svg] = images(html, "gradmagic-graph")
    assert "ops folded" in svg
    del y
    gc.collect()
