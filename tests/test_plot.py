"""The gradient-flow chart and `%grad history NAME`."""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

DEEP = (
    "from torch import nn\n"
    "model = nn.Sequential(*[nn.Linear(6, 6) for _ in range(4)], nn.Linear(6, 6))\n"
    "x = torch.randn(10, 6)\n"
)


def test_chart_is_on_from_eight_leaves_with_rms_and_max_per_leaf(ip, images):
    ip.run(DEEP)
    ip.run("%%grad -q -o rep\nmodel(x).pow(2).mean().backward()\n")
    rep, model = ip.ns["rep"], ip.ns["model"]
    names = [f"model.{i}.{kind}" for i in range(5) for kind in ("weight", "bias")]
    assert [p.name for p in rep.flow.points] == names
    for point, param in zip(rep.flow.points, model.parameters()):
        g = param.grad.double()
        rms = g.norm().item() / g.numel() ** 0.5
        assert abs(point.rms - rms) < 1e-6 * rms
        assert point.max_abs == g.abs().max().item()
        assert point.mark == ""
    [svg] = images(rep._repr_html_(), "gradmagic-flow")
    ET.fromstring(svg)  # well-formed, inline, no script
    assert "<script" not in svg
    assert "RMS" in svg and "max |grad|" in svg and "model.4.bias" in svg
    assert re.search(r"gradient flow: RMS \|grad\| from \S+ \(model\.\d\.\w+\) to", repr(rep))


def test_small_reports_have_no_chart_unless_asked(ip):
    ip.run("w = torch.tensor([1., 2.], requires_grad=True)")
    ip.run("%%grad -q -o rep\n(w * 3).sum().backward()\n")
    assert ip.ns["rep"].flow is None
    assert "gradmagic-flow" not in ip.ns["rep"]._repr_html_()
    ip.run("%%grad -q -o rep --plot\n(w * 3).sum().backward()\n")
    [point] = ip.ns["rep"].flow.points
    assert point.rms == pytest.approx(6.0) and point.max_abs == 6.0  # accumulated: 3 + 3
    ip.run(DEEP)
    ip.run("%%grad -q -o rep --no-plot\nmodel(x).sum().backward()\n")
    assert ip.ns["rep"].flow is None


def test_none_and_nan_leaves_are_marked_not_drawn(ip, images):
    ip.run(
        DEEP + "w = torch.zeros(2, requires_grad=True)\nunused = torch.ones(3, requires_grad=True)"
    )
    ip.run(
        "%%grad -q -o rep\n"
        "loss = model(x).pow(2).mean() + torch.log(w).sum()\n"
        "loss.backward()\n"
        "unused\n"
    )
    rep = ip.ns["rep"]
    marks = {p.name: p.mark for p in rep.flow.points}
    assert marks["w"] == "nan/inf" and marks["unused"] == "none"
    assert rep.table.loc["unused", "status"] == "none"
    [svg] = images(rep._repr_html_(), "gradmagic-flow")
    assert "no gradient" in svg and "NaN/Inf" in svg


def test_chart_needs_no_plotting_library():
    code = (
        "import sys, torch, gradmagic\n"
        "from torch import nn\n"
        "model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(5)])\n"
        "with gradmagic.watch({'model': model}) as rec:\n"
        "    model(torch.randn(2, 3)).sum().backward()\n"
        "html = rec.report()._repr_html_()\n"
        "print('gradmagic-flow' in html, 'matplotlib' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]


def test_chart_is_the_same_svg_each_time(ip):
    ip.run(DEEP)
    ip.run("%%grad -q -o rep\nmodel(x).sum().backward()\n")
    flow = ip.ns["rep"].flow
    first = flow.svg()
    flow._svg = None
    assert flow.svg() == first


def test_history_of_three_runs(ip):
    ip.run("x = torch.tensor([1., 2.], requires_grad=True)")
    for _ in range(3):
        ip.run("%%grad -q\n(100 * x).sum().backward()\n")
    view = ip.run("%grad history x")
    rows = [(e.run, e.before, e.after, e.added, e.status, e.runs) for e in view.entries]
    assert [r[0] for r in rows] == [1, 2, 3]
    assert rows[0][1] is None
    assert [r[1].tolist() for r in rows[1:]] == [[100.0, 100.0], [200.0, 200.0]]
    assert [r[2].tolist() for r in rows] == [[100.0, 100.0], [200.0, 200.0], [300.0, 300.0]]
    assert [r[3].tolist() for r in rows] == [[100.0, 100.0]] * 3
    assert [(r[4], r[5]) for r in rows] == [("new", 1), ("accumulated", 2), ("accumulated", 3)]
    lines = repr(view).splitlines()
    assert lines[0] == "history of x.grad"
    assert lines[1].split() == ["run", "before", "after", "added", "status", "runs"]
    assert re.split(r"\s{2,}", lines[4].strip()) == [
        "3",
        "[200., 200.]",
        "[300., 300.]",
        "[100., 100.]",
        "accumulated",
        "3",
    ]
    html = view._repr_html_()
    body = re.findall(r"<tr[^>]*>(.*?)</tr>", html)
    assert len(body) == 4  # the header and three runs
    assert re.findall(r"<td[^>]*>(.*?)</td>", body[3])[1:4] == [
        "[200., 200.]",
        "[300., 300.]",
        "[100., 100.]",
    ]
    assert 'style="background:#fff7ed;' in html.split("<tr")[3]  # run 2: accumulated
    ip.run("x.grad = None")
    ip.run("%%grad -q\n(100 * x).sum().backward()\n")
    assert [(e.status, e.runs) for e in ip.run("%grad history x").entries][-1] == ("new", 1)


def test_history_of_a_tensor_never_watched(ip):
    ip.run("z = torch.ones(2)")
    assert repr(ip.run("%grad history z")) == "gradmagic has seen no %%grad run change `z.grad`."
    assert torch.is_tensor(ip.ns["z"])
