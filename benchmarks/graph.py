"""Graph drawing cost: gradmagic against torchviz. `python benchmarks/graph.py [--quick]`.

For a ResNet-18-style CNN, a 6-layer `nn.TransformerEncoder` and a 20,000-op chain,
times (median of a few runs, forward pass not included):

- gradmagic: `snapshot` + `ModuleSpans.assign` + `to_digraph` (default budget of 60
  nodes, collapsed by module) + `render_svg` with the system `dot`;
- torchviz: `make_dot(loss, params)` + `.pipe(format="svg")`, the whole graph.

Prints a markdown table; a torchviz failure (RecursionError on the chain) is shown as
what happened.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gradmagic.graph import ModuleSpans, snapshot, to_digraph  # noqa: E402
from gradmagic.render import render_svg  # noqa: E402


class Block(nn.Module):
    """ResNet basic block: two 3x3 convolutions and a skip connection."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.down is None else self.down(x)
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + skip)


def resnet18(width: int = 16) -> nn.Module:
    """ResNet-18 layout (2, 2, 2, 2 blocks); a narrow width: the graph is what counts."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 7, 2, 3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = width
    for stage in range(4):
        cout = width * 2**stage
        layers.append(nn.Sequential(Block(cin, cout, 1 if stage == 0 else 2), Block(cout, cout, 1)))
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


def workloads(chain_ops: int) -> list[tuple[str, nn.Module | None, Callable[[], torch.Tensor]]]:
    torch.manual_seed(0)
    cnn = resnet18()
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 6, enable_nested_tensor=False)
    x0 = torch.ones(8, requires_grad=True)

    def chain() -> torch.Tensor:
        y = x0
        for _ in range(chain_ops):
            y = y * 1.0001
        return y.sum()

    return [
        ("ResNet-18 CNN", cnn, lambda: cnn(torch.randn(2, 3, 64, 64)).pow(2).mean()),
        ("6-layer TransformerEncoder", encoder, lambda: encoder(torch.randn(2, 16, 64)).mean()),
        (f"{chain_ops:,}-op chain", None, chain),
    ]


def gradmagic_svg(loss: torch.Tensor, model: nn.Module | None, spans: ModuleSpans) -> int:
    names = dict(model.named_parameters()) if model is not None else {}
    by_id = {id(p): n for n, p in names.items()}
    keys: dict[int, int] = {}
    snap, live = snapshot([loss], leaf_key=lambda t: keys.setdefault(id(t), len(keys)))
    del live
    if model is not None:
        modules = {id(m): n or "model" for n, m in model.named_modules()}
        spans.assign(snap, module_name=lambda m: modules.get(id(m)))
    leaf_names = {k: by_id.get(i, f"leaf {k}") for i, k in keys.items()}
    source = to_digraph(snap, leaf_names=leaf_names).source
    result = render_svg(source, engine="dot")
    if result.error:
        raise RuntimeError(result.error)
    return len(re.findall(r"^\t[nmf]\d+ \[", source, re.M))


def torchviz_svg(loss: torch.Tensor, model: nn.Module | None) -> int:
    from torchviz import make_dot

    params = dict(model.named_parameters()) if model is not None else None
    dot = make_dot(loss, params=params)
    dot.pipe(format="svg")
    return sum(1 for line in dot.body if re.match(r"\s*\d+ \[", line))


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float | None, Any]:
    """Median seconds over `repeats` runs and the last result; the exception if one raised."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        try:
            result = fn()
        except (RecursionError, RuntimeError) as exc:
            return None, type(exc).__name__
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run each, 2,000-op chain")
    args = parser.parse_args()
    repeats, chain_ops = (1, 2_000) if args.quick else (5, 20_000)
    render_svg("digraph { warm }", engine="dot")  # page in `dot` once, for both sides
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, median of {repeats}\n")
    print("| graph | ops | gradmagic | nodes drawn | torchviz | nodes drawn | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, model, forward in workloads(chain_ops):
        with ModuleSpans() as spans:
            loss = forward()
        ops = snapshot([loss], leaf_key=lambda t: 0)[0].n_ops
        ours, our_nodes = timed(functools.partial(gradmagic_svg, loss, model, spans), repeats)
        theirs, their_nodes = timed(functools.partial(torchviz_svg, loss, model), repeats)
        if theirs is None:  # torchviz raised: say what
            theirs_text, their_nodes, ratio = f"{their_nodes} (recursive walk)", "", "n/a"
        else:
            theirs_text, ratio = f"{theirs * 1e3:,.0f} ms", f"{ours / theirs:.2f}"
        print(
            f"| {name} | {ops:,} | {ours * 1e3:,.0f} ms | {our_nodes} | {theirs_text} "
            f"| {their_nodes} | {ratio} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
