"""The benchmark code paths on tiny sizes, so that `benchmarks/run.py` cannot rot.

Runs every section of `run.py` (steps with phase timing, the `%%grad` cell path,
graph presence, memory accounting and the leak checks) on models of a few
thousand parameters; the numbers are meaningless, the shapes of the results are
what is checked.
"""

from __future__ import annotations

import os
import re
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="module")
def run():
    sys.path.insert(0, BENCH)
    try:
        import run as module
    finally:
        sys.path.remove(BENCH)
    return module


def test_models_build_at_full_and_tiny_sizes(run):
    import models
    import torch

    # The full-size parameter counts the issue asks for (on `meta`: no memory, no init).
    with torch.device("meta"):
        assert sum(p.numel() for p in models.ResNet().parameters()) == 11_689_512
        n = sum(p.numel() for p in models.TransformerLM().parameters())
    assert 25_000_000 <= n <= 30_000_000
    for key, sizes in models.TINY.items():
        w = models.BUILDERS[key](**sizes)
        loss = w.step()
        assert loss.ndim == 0 and all(p.grad is not None for p in w.model.parameters())


def test_smoke_run_writes_every_section(run, tmp_path):
    out = tmp_path / "results.md"
    text = run.main(["--smoke", "--out", str(out)])
    assert out.read_text(encoding="utf-8") == text
    for heading in ("## 1. The whole cell path", "## 2. Graph", "## 3. Memory", "## Targets"):
        assert heading in text
    for workload in ("tiny MLP", "ResNet-18", "Transformer LM", "2,000 tensors"):
        assert f"| {workload} |" in text
    for target in (
        "ResNet-18: whole cell path (capture, report, HTML, text) ≤ 1.10×",
        "27M transformer: whole cell path (capture, report, HTML, text) ≤ 1.10×",
        "2,000 parameter tensors: report + HTML + text < 300 ms",
        "2,000 parameter tensors: HTML < 500 KB",
        "seed-sized `%%grad` cell with its report (HTML and text) < 30 ms, warm",
    ):
        assert f"| {target} |" in text
    assert "tiny MLP cell" in text and "seed cell" in text
    assert "### A training loop in one cell" in text
    # Ratios come with their bootstrap interval.
    assert re.search(r"\| [\d.,]+× \[[\d.,]+, [\d.,]+\] \|", text)
    # graph.py ran on the tiny models and its rows reached the targets.
    for graph in ("ResNet-18 (b)", "transformer LM (c)", "200-op chain"):
        assert f"| {graph} |" in text
    assert "transformer graph: snapshot + collapsed render faster than torchviz" in text
    assert "200-op chain drawn within the node budget in < 2 s" in text
    # The default mode keeps no large gradient copy; copies=True keeps at least one.
    assert "default holds no large gradient copies | 0 B in large tensors" in text
    assert "| `-q -o rep` |" in text


def test_held_bytes_counts_copies_not_user_tensors(run):
    import memory
    import torch

    w = torch.nn.Linear(10, 10)
    w(torch.randn(2, 10)).sum().backward()
    user = memory.user_storages(w)
    copy = w.weight.grad.clone()
    held = memory.held_by([{"a": [copy, w.weight.grad], "b": (copy,)}], user)
    assert held.copies_count == 1 and held.copies_bytes == 400
    assert held.user_refs == 1 and held.user_bytes == 400
    assert held.large_bytes == 400 and held.small_count == 0


def test_timed_functions_restores_what_it_wraps(run):
    import profiling

    from gradmagic import stats

    original = stats.norms
    with profiling.timed_functions(("gradmagic.stats:norms", "gradmagic.nope:missing")) as totals:
        assert stats.norms is not original
        import torch

        stats.norms([torch.ones(3)])
    assert stats.norms is original
    assert totals["gradmagic.stats:norms"][1] == 1


def test_graph_benchmark_says_when_torchviz_is_missing(run, monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import graph

    monkeypatch.setitem(sys.modules, "torchviz", None)  # import torchviz raises ImportError
    seconds, nodes, error = graph._torchviz(None, None, repeats=1)
    assert (seconds, nodes) == (None, None)
    assert error.startswith("not installed")
