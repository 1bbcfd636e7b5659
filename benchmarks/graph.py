"""Graph drawing cost: gradmagic against torchviz. `python benchmarks/graph.py [--quick]`.

On the benchmark's own ResNet-18 (b) and transformer LM (c) from `models.py`, and a
20,000-op chain, times (median of a few runs; the forward pass is not timed, and a
small batch gives the same graph as a large one):

- gradmagic: `snapshot` (the walk a watched backward makes), then `ModuleSpans.assign`
  + `to_digraph` (collapsed by module to the default budget of 60 nodes), then
  `render_svg` with the system `dot`; the WebAssembly renderer's time, warm, beside it;
- torchviz: `make_dot(loss, params)` + `.pipe(format="svg")`, the whole graph.

Prints a markdown table; a torchviz failure (RecursionError on the chain) is shown as
what happened. `--json PATH` also writes the rows for `run.py`'s targets.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (HERE, ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)

import models  # noqa: E402

from gradmagic.graph import ModuleSpans, snapshot, to_digraph  # noqa: E402
from gradmagic.render import render_svg  # noqa: E402

CHAIN_OPS = 20_000
MAX_NODES = 60  # gradmagic's default node budget


@dataclass
class GraphRow:
    name: str
    key: str  # "resnet", "transformer", "chain"
    ops: int
    snapshot_s: float
    draw_s: float  # assign modules + collapse + DOT
    render_s: float  # system dot
    wasm_s: float | None  # the WebAssembly renderer, warm (None: not installed)
    nodes: int  # nodes gradmagic drew
    torchviz_s: float | None  # make_dot + render; None when it failed
    torchviz_nodes: int | None
    torchviz_error: str | None

    @property
    def ours_s(self) -> float:
        return self.snapshot_s + self.draw_s + self.render_s

    @property
    def ratio(self) -> float | None:
        return None if self.torchviz_s is None else self.ours_s / self.torchviz_s


def workloads(
    chain_ops: int, tiny: bool = False
) -> list[tuple[str, str, nn.Module | None, Callable[[], Any]]]:
    resnet = models.make_resnet(**(models.TINY["resnet"] if tiny else {"batch": 2, "image": 64}))
    lm = models.make_transformer(
        **(models.TINY["transformer"] if tiny else {"batch": 2, "seq": 16})
    )
    x0 = torch.ones(8, requires_grad=True)

    def chain() -> torch.Tensor:
        y = x0
        for _ in range(chain_ops):
            y = y * 1.0001
        return y.sum()

    def loss_of(w: models.Workload) -> Callable[[], torch.Tensor]:
        return lambda: w.loss_fn(w.model(w.inputs), w.targets)

    return [
        ("ResNet-18 (b)", "resnet", resnet.model, loss_of(resnet)),
        ("transformer LM (c)", "transformer", lm.model, loss_of(lm)),
        (f"{chain_ops:,}-op chain", "chain", None, chain),
    ]


def _median(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def measure(
    name: str,
    key: str,
    model: nn.Module | None,
    forward: Callable[[], torch.Tensor],
    repeats: int,
    wasm: bool,
) -> GraphRow:
    with ModuleSpans() as spans:
        loss = forward()
    params = dict(model.named_parameters(prefix="model")) if model is not None else {}
    by_id = {id(p): n for n, p in params.items()}
    modules = (
        {id(m): n for n, m in model.named_modules(prefix="model")} if model is not None else {}
    )
    keys: dict[int, int] = {}

    def leaf_key(t: torch.Tensor) -> int:
        return keys.setdefault(id(t), len(keys))

    snap_s, (snap, _) = _median(lambda: snapshot([loss], leaf_key=leaf_key), repeats)
    leaf_names = {k: by_id.get(i, f"leaf {k}") for i, k in keys.items()}

    def draw() -> str:
        spans.assign(snap, module_name=lambda m: modules.get(id(m)))
        return to_digraph(snap, leaf_names=leaf_names, max_nodes=MAX_NODES).source

    draw_s, source = _median(draw, repeats)
    render_s, result = _median(lambda: render_svg(source, engine="dot"), repeats)
    if result.error:
        raise SystemExit(f"graph.py needs graphviz's `dot` on PATH: {result.error}")
    wasm_s = None
    if wasm and render_svg(source, engine="wasm").error is None:  # the first compiles
        wasm_s, _ = _median(lambda: render_svg(source, engine="wasm"), repeats)
    nodes = len(re.findall(r"^\t[nmf]\d+ \[", source, re.M))
    tv_s, tv_nodes, tv_error = _torchviz(loss, model, repeats)
    return GraphRow(
        name, key, snap.n_ops, snap_s, draw_s, render_s, wasm_s, nodes, tv_s, tv_nodes, tv_error
    )


def _torchviz(
    loss: torch.Tensor, model: nn.Module | None, repeats: int
) -> tuple[float | None, int | None, str | None]:
    try:
        from torchviz import make_dot
    except ImportError:
        return None, None, "not installed (`pip install -r benchmarks/requirements.txt`)"
    params = dict(model.named_parameters()) if model is not None else None

    def draw() -> int:
        dot = make_dot(loss, params=params)
        dot.pipe(format="svg")
        return sum(1 for line in dot.body if re.match(r"\s*\d+ \[", line))

    try:
        seconds, nodes = _median(draw, repeats)
    except (RecursionError, RuntimeError) as exc:
        return None, None, f"{type(exc).__name__} ({_reason(exc)})"
    return seconds, nodes, None


def _reason(exc: BaseException) -> str:
    return "its recursive walk" if isinstance(exc, RecursionError) else str(exc)[:60]


def markdown(rows: list[GraphRow], repeats: int) -> str:
    lines = [
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, median of {repeats}; gradmagic draws "
        f"at most {MAX_NODES} nodes, folding the rest by module; torchviz draws every node.",
        "",
        "| graph | ops | snapshot | draw | render (dot) | gradmagic total | nodes | "
        "render (wasm, warm) | torchviz | nodes | gradmagic / torchviz |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        wasm = "—" if r.wasm_s is None else _ms(r.wasm_s)
        tv = r.torchviz_error if r.torchviz_s is None else _ms(r.torchviz_s)
        ratio = "n/a" if r.ratio is None else f"{r.ratio:.2f}"
        lines.append(
            f"| {r.name} | {r.ops:,} | {_ms(r.snapshot_s)} | {_ms(r.draw_s)} | {_ms(r.render_s)} "
            f"| {_ms(r.ours_s)} | {r.nodes} | {wasm} | {tv} | {r.torchviz_nodes or ''} | {ratio} |"
        )
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms" if seconds < 0.1 else f"{seconds * 1e3:,.0f} ms"


def main(argv: list[str] | None = None) -> list[GraphRow]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run each, 2,000-op chain")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    parser.add_argument("--no-wasm", action="store_true", help="skip the WebAssembly renderer")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny models
    args = parser.parse_args(argv)
    repeats, chain_ops = (1, 2_000) if args.quick or args.smoke else (5, CHAIN_OPS)
    if args.smoke:
        chain_ops = 200
    render_svg("digraph { warm }", engine="dot")  # page in `dot` once, for both sides
    rows = []
    for name, key, model, forward in workloads(chain_ops, tiny=args.smoke):
        rows.append(measure(name, key, model, forward, repeats, wasm=not args.no_wasm))
    print(markdown(rows, repeats), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump([{**asdict(r), "ours_s": r.ours_s, "ratio": r.ratio} for r in rows], fh)
    return rows


if __name__ == "__main__":
    main()
