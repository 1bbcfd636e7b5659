"""Gradient norms per backward in loops: exact values, bounded memory, the sparklines."""

from __future__ import annotations

import math
import re

import torch

import gradmagic
from gradmagic.history import History
from gradmagic.report.history import HistoryView
from gradmagic.trajectory import MAX_POINTS, Trajectory, sparkline

BLOCKS = "▁▂▃▄▅▆▇█"


def _halving_sgd(steps: int, history: History | None = None):
    """loss = w²/2 with SGD(lr=0.5): the gradient is w, and each step halves w, so the
    norm right after backward k (from 0) is 3 · 2^-k, exactly in float32."""
    w = torch.tensor([3.0], requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.5)
    with gradmagic.watch(history=history) as rec:
        for _ in range(steps):
            opt.zero_grad()
            loss = (w**2).sum() / 2
            loss.backward()
            opt.step()
    return w, rec.report()


def test_norms_after_each_backward_follow_the_closed_form():
    w, rep = _halving_sgd(10)
    assert rep.table.loc["w", "norms"] == [3.0 * 2.0**-k for k in range(10)]
    # A vanishing gradient, 512× over 10 backwards: a log scale, one character each.
    spark = sparkline(rep["w"].trajectory)
    assert spark.scale == "log"
    assert (spark.low, spark.high) == (3.0 * 2.0**-9, 3.0)
    assert spark.text == "█▇▆▆▅▄▃▃▂▁"


def test_text_and_html_show_the_sparkline_beside_the_row():
    _, rep = _halving_sgd(10)
    text = repr(rep)
    header = next(line for line in text.splitlines() if line.strip().startswith("name"))
    assert header.rstrip().endswith("‖g‖ after each backward")
    row = next(line for line in text.splitlines() if line.strip().startswith("w "))
    assert row.rstrip().endswith("█▇▆▆▅▄▃▃▂▁ log")
    assert (
        "  ‖g‖ after each backward: the norm read right after each backward that reached it; "
        "one character per backward; log scale (marked `log`) where a row's norms span more than "
        "a decade (▁ its smallest, █ its largest), else linear from 0 to its largest; · zero, "
        "! NaN/Inf"
    ) in text.splitlines()
    page = rep._repr_html_()
    cell = re.search(r'<td class="gm-trend"[^>]*><span title="([^"]*)"[^>]*>([^<]*)</span>', page)
    assert cell.group(2) == "█▇▆▆▅▄▃▃▂▁"
    assert '▂▁</span> <span style="color: #4b5563;">log</span></td>' in page
    assert cell.group(1) == (
        "10 backwards: first 3, last 0.005859. ‖g‖ right after each backward, one character "
        "per backward; log scale: ▁ = 0.005859, █ = 3; · zero, ! NaN/Inf"
    )
    assert "<svg" not in page and "<script" not in page and "<style" not in page


def test_a_single_backward_has_no_trend_column():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    with gradmagic.watch() as rec:
        (100 * x).sum().backward()
    rep = rec.report()
    assert rep.table.loc["x", "norms"] == [math.hypot(100.0, 100.0)]
    assert "‖g‖ after each backward" not in repr(rep)
    assert "gm-trend" not in rep._repr_html_()


def test_an_exploding_loop_of_500_steps_is_increasing_on_a_log_scale():
    w = torch.tensor([1.0], requires_grad=True)
    with gradmagic.watch() as rec:
        for k in range(500):
            w.grad = None
            ((k + 1) * w).sum().backward()  # the gradient is k + 1
    rep = rec.report()
    assert rep.table.loc["w", "norms"] == [float(k + 1) for k in range(500)]
    spark = sparkline(rep["w"].trajectory, width=24)
    assert spark.scale == "log" and spark.per_char == 500 / 24
    levels = [BLOCKS.index(c) for c in spark.text]
    assert len(levels) == 24 and levels == sorted(levels)
    assert levels[0] == 0 and levels[-1] == 7
    # Each character is the largest norm of the backwards it covers: the last is 500.
    assert spark.high == 500.0 and spark.low == 21.0  # backwards 0..20 in the first column


def test_memory_is_bounded_past_max_points_and_keeps_min_and_max_per_bucket():
    t = Trajectory()
    for k in range(1, 5001):
        t.add(float(k))
    assert t.count == 5000 and t.first == 1.0 and t.last == 5000.0
    assert len(t.norms()) <= MAX_POINTS
    assert t.width == 16  # 5000 backwards in at most 512 buckets of doubling width
    for start, lo, hi in t.buckets():
        assert lo == start + 1 and hi == min(start + t.width, 5000)
    # A spike inside a bucket survives the merging.
    spiky = Trajectory()
    for k in range(3000):
        spiky.add(1e6 if k == 1234 else 1.0)
    assert max(spiky.norms()) == 1e6 and min(spiky.norms()) == 1.0
    assert sparkline(spiky).text.count("█") == 1


def test_zero_and_nan_norms_have_their_own_characters():
    t = Trajectory()
    for v in (1.0, 0.0, math.nan, 2.0):
        t.add(v)
    assert sparkline(t).text == "▄·!█"  # linear from 0: 1 of 2 is the fourth block
    t.add(None)  # a gradient whose values cannot be read is not counted
    assert t.count == 4 and t.missing == 1


def test_history_shows_each_runs_sparkline():
    history = History()
    w, _ = _halving_sgd(4, history)
    view = HistoryView("w", history.entries(w))
    text = repr(view)
    assert text.splitlines()[1].rstrip().endswith("‖g‖ after each backward")
    assert text.splitlines()[2].rstrip().endswith("█▄▂▁")  # 8× over 4 backwards: linear
    page = view._repr_html_()
    assert '<td class="gm-trend"' in page and ">█▄▂▁</span>" in page
    assert "<svg" not in page and "<style" not in page


def test_names_in_the_tooltip_are_escaped_and_the_trajectory_holds_no_tensor():
    w, rep = _halving_sgd(3)
    traj = rep["w"].trajectory
    assert all(isinstance(v, float) for v in traj.norms())
    assert not any(isinstance(getattr(traj, s, None), torch.Tensor) for s in Trajectory.__slots__)


def test_grad_history_magic_shows_a_sparkline_per_cell_run(ip):
    ip.run("w = torch.tensor([3.0], requires_grad=True)\nopt = torch.optim.SGD([w], lr=0.5)")
    cell = (
        "%%grad -q\n"
        "for _ in range(4):\n"
        "    opt.zero_grad()\n"
        "    ((w ** 2).sum() / 2).backward()\n"
        "    opt.step()\n"
    )
    ip.run(cell)
    ip.run(cell)  # w went on halving: 3/16, 3/32, ...
    text = repr(ip.run("%grad history w"))
    rows = text.splitlines()[2:4]
    assert [r.split()[0] for r in rows] == ["1", "2"]
    assert all(r.rstrip().endswith("█▄▂▁") for r in rows)  # each run: 8× down, linear
