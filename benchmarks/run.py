"""gradmagic benchmarks: `python benchmarks/run.py [--quick]`.

Prints progress and the target table, and writes `benchmarks/results.md`:

1. The whole `%%grad` cell path per training step (forward + backward +
   optimizer step inside `gradmagic.watch()`, then the report, its HTML and its
   text), default options and `copies=True`, against the plain step, on a tiny
   MLP, a ResNet-18, a ~27M-parameter transformer LM and a model of 2,000
   parameter tensors. Each watched variant runs interleaved with plain steps of
   its own (A B, B A, ...); each is compared with the plain step of the same
   round, and the table gives medians with 95% bootstrap intervals, for the whole
   path and for the capture alone. Then a 100-step loop of the MLP in one block
   (the cost per backward, the report after it, the memory the recorder holds),
   and `%%grad` cells in an in-process IPython shell.
2. `graph.py`: snapshot, drawing and rendering against torchviz.
3. Memory (`memory.py`): bytes gradmagic holds after a cell, peak RSS, and a
   100-run leak check.

`--profile KEY` prints a cProfile of watched steps instead, `--breakdown KEY` the
milliseconds per step in each of gradmagic's functions (`profiling.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (HERE, ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)

import memory  # noqa: E402
import models  # noqa: E402
from profiling import breakdown, profile  # noqa: E402
from tables import Results, render_markdown  # noqa: E402
from tables import _ms as ms  # noqa: E402
from timing import PHASES, Compared, compare, interleaved, phased_step  # noqa: E402

RESULTS = os.path.join(HERE, "results.md")

# Step sizes chosen so that a step takes 0.2-1.5 s on the 2-core benchmark machine.
FULL_SIZES: dict[str, dict[str, Any]] = {
    "mlp": {},
    "resnet": {"batch": 16, "image": 128},
    "transformer": {"batch": 8, "seq": 64},
    "many": {},
}


@dataclass
class Config:
    sizes: dict[str, dict[str, Any]]
    warmup: int  # rounds before timing
    rounds: dict[str, int]  # timed rounds per model
    cell_rounds: int
    held_runs: int
    leak_runs: int
    rss: bool  # peak RSS in subprocesses
    run_graph: bool
    label: str
    loop_steps: int = 100  # steps of the tiny MLP in one watched block
    loop_rounds: int = 15


FULL = Config(
    FULL_SIZES,
    warmup=2,
    # Steps on a small VM vary by ±5-10% each (memory returned to the OS and faulted
    # back every step): the default variant gets enough rounds for a 95% interval of
    # about ±2% on the median ratio; copies=True, whose target is looser, half as many.
    rounds={"mlp": 1000, "resnet": 81, "transformer": 61, "many": 41},
    cell_rounds=60,
    held_runs=3,
    leak_runs=100,
    rss=True,
    run_graph=True,
    label="full",
)
QUICK = Config(
    FULL_SIZES,
    warmup=1,
    rounds={"mlp": 50, "resnet": 3, "transformer": 3, "many": 3},
    cell_rounds=10,
    held_runs=2,
    leak_runs=100,
    rss=False,
    run_graph=True,
    label="quick",
    loop_rounds=3,
)
SMOKE = Config(
    models.TINY,
    warmup=0,
    rounds={"mlp": 5, "resnet": 1, "transformer": 1, "many": 1},
    cell_rounds=2,
    held_runs=2,
    leak_runs=3,
    rss=False,
    run_graph=True,
    label="smoke",
    loop_steps=3,
    loop_rounds=1,
)


@dataclass
class StepResult:
    key: str
    workload: str
    description: str
    params: int
    variants: dict[str, Compared]  # the whole cell path: block, report, HTML, text
    cpu: dict[str, Compared] = field(default_factory=dict)  # the same in process CPU time
    capture: dict[str, Compared] = field(default_factory=dict)  # the block alone
    # variant -> phase -> median extra seconds against plain (paired by round)
    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    plain_phases: dict[str, float] = field(default_factory=dict)
    internal_errors: list[str] = field(default_factory=list)
    # default variant: median seconds of `rec.report()`, `_repr_html_()`, `repr()`
    report_parts: dict[str, float] = field(default_factory=dict)
    html_bytes: int = 0


def bench_step(key: str, cfg: Config, graph: bool) -> StepResult:
    import gradmagic
    from gradmagic.history import History

    w = models.BUILDERS[key](**cfg.sizes[key])
    ns = w.namespace()
    histories = {"default": History(), "copies": History()}
    errors: list[str] = []
    # Phase times per variant; plain steps are kept per pairing ("plain/default").
    phases: dict[str, dict[str, list[float]]] = {}
    parts: dict[str, list[float]] = {"report": [], "html": [], "text": []}
    html_bytes = [0]

    def variant(name: str, into: str, **kwargs: Any) -> Callable[[], None]:
        def block() -> Any:
            return gradmagic.watch(ns, history=histories[name], graph=graph, **kwargs)

        def run() -> None:
            timing = phases.setdefault(into, {})
            rec = phased_step(w, timing, block if name != "plain" else None)
            t0 = time.perf_counter()
            if rec is not None:
                # What a `%%grad` user waits for after the block: the report, as HTML
                # (a notebook) and as text (IPython shows both formats of a result).
                errors.extend(rec.internal_errors)
                report = rec.report()
                t1 = time.perf_counter()
                html = report._repr_html_()
                t2 = time.perf_counter()
                repr(report)
                t3 = time.perf_counter()
                if name == "default":
                    for part, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
                        parts[part].append(dt)
                    html_bytes[0] = len(html.encode("utf-8"))
                del report, html
            timing.setdefault("report", []).append(time.perf_counter() - t0)

        return run

    rounds = {"default": cfg.rounds[key], "copies": max(1, cfg.rounds[key] // 2)}
    variants, cpu_variants, capture = {}, {}, {}
    extra, plain = {}, {}
    # Each watched variant runs against plain steps of its own (A B, B A, ...): what one
    # variant does to the allocator (copies=True copies every gradient) never lands in
    # the other's rounds.
    for name, kwargs in (("default", {}), ("copies", {"copies": True})):
        fns = {"plain": variant("plain", f"plain/{name}"), name: variant(name, name, **kwargs)}
        cpu: dict[str, list[float]] = {}
        n = rounds[name]
        times = interleaved(fns, n, cfg.warmup, cpu)
        variants[name] = compare(times, "plain")[name]
        cpu_variants[name] = compare(cpu, "plain")[name]
        reports = phases[name]["report"][-n:]
        blocks = {"plain": times["plain"], name: [t - r for t, r in zip(times[name], reports)]}
        capture[name] = compare(blocks, "plain")[name]
        if name == "default":
            variants["plain"] = compare(times, "plain")["plain"]
            cpu_variants["plain"] = compare(cpu, "plain")["plain"]
        base = phases[f"plain/{name}"]
        extra[name] = {
            ph: statistics.median(a - b for a, b in zip(phases[name][ph][-n:], base[ph][-n:]))
            for ph in PHASES
        }
        if name == "default":
            plain = {ph: statistics.median(base[ph][-n:]) for ph in PHASES}
    n = rounds["default"]
    return StepResult(
        key,
        w.name,
        w.description,
        w.n_params,
        variants,
        cpu_variants,
        capture,
        extra,
        plain,
        sorted(set(errors)),
        {part: statistics.median(ts[-n:]) for part, ts in parts.items()},
        html_bytes[0],
    )


# --- a training loop inside one watched block ------------------------------------


@dataclass
class LoopResult:
    """K steps of the tiny MLP in one `watch()` block: the cost per step, and the report."""

    steps: int
    rounds: int
    plain_step_s: float
    extra_per_step_s: float
    extra_ci: tuple[float, float]
    report_s: float  # rec.report() after the loop
    html_s: float  # its _repr_html_()
    held_bytes: int  # Python memory the recorder holds after the loop (tracemalloc)
    graphs: int  # distinct graphs the report draws


def bench_loop(cfg: Config, graph: bool) -> LoopResult:
    """The cost a watched backward adds when a cell trains for many steps: the block's
    edges (recorder, names, statuses) are paid once, every step pays the rest."""
    import gradmagic
    from gradmagic.history import History

    w = models.make_mlp()
    ns, history, k = w.namespace(), History(), cfg.loop_steps

    def plain() -> None:
        for _ in range(k):
            w.step()

    def watched() -> Any:
        with gradmagic.watch(ns, history=history, graph=graph) as rec:
            for _ in range(k):
                w.step()
        return rec

    times = interleaved({"plain": plain, "watched": watched}, cfg.loop_rounds, min(cfg.warmup, 1))
    c = compare(times, "plain")["watched"]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        rec = watched()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    t0 = time.perf_counter()
    report = rec.report()
    t1 = time.perf_counter()
    report._repr_html_()
    t2 = time.perf_counter()
    return LoopResult(
        k,
        len(times["plain"]),
        statistics.median(times["plain"]) / k,
        c.extra_s / k,
        (c.extra_ci[0] / k, c.extra_ci[1] / k),
        t1 - t0,
        t2 - t1,
        held,
        len(report.graphs),
    )


# --- the %%grad cell in IPython ---------------------------------------------------

CELL_SETUPS = {
    "tiny MLP cell": (
        "import torch\nfrom torch import nn\nfrom torch.nn import functional as F\n"
        "torch.manual_seed(0)\n"
        "model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "x, y = torch.randn(4, 4), torch.randn(4, 1)\n",
        "opt.zero_grad()\nloss = F.mse_loss(model(x), y)\nloss.backward()\nopt.step()\n",
    ),
    "seed cell (calc_loss, no zero_grad)": (
        "import torch\ntorch.manual_seed(0)\n"
        "def calc_preds(params, inputs):\n    return (inputs * params).sum(axis=1)\n"
        "def calc_loss(params, inputs, targets):\n"
        "    return torch.abs(calc_preds(params, inputs) - targets).mean()\n"
        "inputs, targets = torch.rand(1000, 10), torch.rand(1000)\n"
        "params = torch.rand(10, requires_grad=True)\n",
        "loss = calc_loss(params, inputs, targets)\nloss.backward()\n",
    ),
}


@dataclass
class CellResult:
    name: str
    plain_ms: float
    grad_ms: float  # run_cell("%%grad -q -o rep ...") + rep._repr_html_() + repr(rep)
    cell_ms: float  # the run_cell part alone
    html_ms: float  # rep._repr_html_() and repr(rep)
    ratio: float
    samples: int
    html_bytes: int


def ipython_shell() -> Any:
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext gradmagic")
    return shell


def _run(shell: Any, code: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        result = shell.run_cell(code)
    if not result.success:
        raise RuntimeError(f"cell failed: {result.error_before_exec or result.error_in_exec!r}")


def bench_cells(shell: Any, cfg: Config, graph: bool) -> list[CellResult]:
    flags = "-q -o rep" + ("" if graph else " -G")
    out = []
    for name, (setup, cell) in CELL_SETUPS.items():
        _run(shell, "%grad reset")
        _run(shell, setup)
        parts: dict[str, list[float]] = {"cell": [], "html": []}
        html_len = [0]

        def grad(
            cell: str = cell, parts: dict[str, list[float]] = parts, html_len: list[int] = html_len
        ) -> None:
            t0 = time.perf_counter()
            _run(shell, f"%%grad {flags}\n{cell}")
            t1 = time.perf_counter()
            html = shell.user_ns["rep"]._repr_html_()
            repr(shell.user_ns["rep"])
            t2 = time.perf_counter()
            parts["cell"].append(t1 - t0)
            parts["html"].append(t2 - t1)
            html_len[0] = len(html)

        times = interleaved(
            {"plain": lambda cell=cell: _run(shell, cell), "grad": grad},
            cfg.cell_rounds,
            cfg.warmup,
        )
        c = compare(times, "plain")
        n = len(times["grad"])
        out.append(
            CellResult(
                name,
                1000 * c["plain"].median_s,
                1000 * c["grad"].median_s,
                1000 * statistics.median(parts["cell"][-n:]),
                1000 * statistics.median(parts["html"][-n:]),
                c["grad"].ratio,
                n,
                html_len[0],
            )
        )
    return out


# --- graph ----------------------------------------------------------------------


def bench_graph(cfg: Config) -> tuple[str, list[dict[str, Any]]]:
    """`benchmarks/graph.py` in its own process: its markdown, and its rows for the targets."""
    if not cfg.run_graph:
        return "(graph benchmark not run in this mode)", []
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "graph.json")
        cmd = [sys.executable, os.path.join(HERE, "graph.py"), "--json", out]
        if cfg.label in ("quick", "smoke"):
            cmd.append(f"--{cfg.label}")
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return "`benchmarks/graph.py` ran past 600 s and was stopped.", []
        rows = []
        if os.path.exists(out):
            with open(out, encoding="utf-8") as fh:
                rows = json.load(fh)
    body = (done.stdout or "").strip()
    if done.returncode:
        body += f"\n\n(exit {done.returncode})\n" + (done.stderr or "").strip()[-3000:]
    return body or "(graph.py printed nothing)", rows


# --- memory ---------------------------------------------------------------------


@dataclass
class MemoryResult:
    held: dict[str, dict[str, Any]]  # model -> variant -> per-run measurements
    grad_bytes: dict[str, int]
    param_bytes: dict[str, int]
    rss: dict[str, dict[str, dict[str, Any]]]  # model -> variant -> peak
    leaks: list[dict[str, Any]]


def bench_memory(shell: Any, cfg: Config, graph: bool) -> MemoryResult:
    held: dict[str, dict[str, Any]] = {}
    grads: dict[str, int] = {}
    params: dict[str, int] = {}
    rss: dict[str, dict[str, Any]] = {}
    for key in ("resnet", "transformer"):
        held[key] = {}
        for variant, kwargs in (("default", {}), ("copies", {"copies": True})):
            w = models.BUILDERS[key](**cfg.sizes[key])
            held[key][variant] = memory.held_after_runs(w, cfg.held_runs, graph=graph, **kwargs)
            grads[key], params[key] = memory.grad_bytes(w), w.param_bytes
            del w
        if cfg.rss:
            rss[key] = {
                v: memory.peak_rss(key, v, steps=3, sizes=cfg.sizes[key], graph=graph)
                for v in ("plain", "default", "copies")
            }
    leaks = []
    base = "-q -o rep" + ("" if graph else " -G")
    for flags in (base, base + " --copies"):
        _run(shell, "%grad reset")
        leaks.append(memory.leak_check(shell, cfg.leak_runs, flags))
    for report in (True, False):
        leaks.append(memory.leak_check_watch(cfg.leak_runs, report=report))
    return MemoryResult(held, grads, params, rss, leaks)


# --- the machine ----------------------------------------------------------------


def speed_reference() -> dict[str, float]:
    """Seconds this machine takes for two fixed jobs, to compare runs across machines
    (and within a run: a shared VM drifts). Best of 5."""
    x = torch.ones(4, 4)
    return {
        "python": min(timeit.repeat("sum(range(1000))", number=2000, repeat=5)) / 2000,
        "torch_op": min(timeit.repeat(lambda: x + x, number=5000, repeat=5)) / 5000,
    }


def machine() -> dict[str, str]:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _load() -> str:
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Few rounds, no RSS subprocesses.")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=RESULTS, help="Where to write the markdown.")
    parser.add_argument(
        "--only",
        nargs="*",
        choices=["steps", "loop", "cells", "graph", "memory"],
        help="Sections to run.",
    )
    parser.add_argument("--models", nargs="*", choices=list(models.BUILDERS), default=None)
    parser.add_argument("--no-graph", action="store_true", help="Watch with graph=False.")
    parser.add_argument("--profile", choices=list(models.BUILDERS), help="cProfile watched steps.")
    parser.add_argument(
        "--breakdown", choices=list(models.BUILDERS), help="Time gradmagic's functions per step."
    )
    parser.add_argument("--copies", action="store_true", help="With --profile/--breakdown.")
    parser.add_argument("--steps", type=int, default=5, help="With --profile/--breakdown.")
    args = parser.parse_args(argv)

    cfg = SMOKE if args.smoke else QUICK if args.quick else FULL
    graph = not args.no_graph
    return _main(args, cfg, graph)


def _main(args: argparse.Namespace, cfg: Config, graph: bool) -> str:
    if args.profile or args.breakdown:
        fn = profile if args.profile else breakdown
        key = args.profile or args.breakdown
        text = fn(key, cfg.sizes[key], graph, args.steps, args.copies)
        print(text)
        return text

    started, load0, speed0 = time.time(), _load(), speed_reference()
    sections = set(args.only or ("steps", "loop", "cells", "graph", "memory"))
    keys = args.models or list(models.BUILDERS)
    info = machine()
    print(" · ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    if not graph:
        print("graph=False for every watched run (--no-graph)")

    steps: dict[str, StepResult] = {}
    if "steps" in sections:
        for key in keys:
            t0 = time.time()
            steps[key] = r = bench_step(key, cfg, graph)
            d, c = r.variants["default"], r.variants["copies"]
            print(
                f"{r.workload:>16}: plain {ms(r.variants['plain'].median_s)}, whole cell "
                f"{d.ratio:.3f}× ({ms(d.extra_s, True)}; capture {r.capture['default'].ratio:.3f}×"
                f"), copies {c.ratio:.3f}× ({ms(c.extra_s, True)})  [{time.time() - t0:.0f} s]",
                flush=True,
            )
    loop = bench_loop(cfg, graph) if "loop" in sections else None
    if loop is not None:
        print(
            f"{loop.steps}-step loop in one block: {ms(loop.extra_per_step_s, True)} per "
            f"backward; report {ms(loop.report_s)} + HTML {ms(loop.html_s)}",
            flush=True,
        )
    shell = ipython_shell() if {"cells", "memory"} & sections else None
    cells: list[CellResult] = []
    if "cells" in sections:
        cells = bench_cells(shell, cfg, graph)
        for c in cells:
            print(
                f"{c.name:>36}: plain {c.plain_ms:.2f} ms, %%grad+HTML {c.grad_ms:.2f} ms "
                f"(cell {c.cell_ms:.2f} + HTML {c.html_ms:.2f})",
                flush=True,
            )
    graph_text, graph_rows = bench_graph(cfg) if "graph" in sections else ("(not run)", [])
    if "graph" in sections:
        print(graph_text, flush=True)
    mem = bench_memory(shell, cfg, graph) if "memory" in sections else None
    results = Results(
        cfg.label,
        info,
        (speed0, speed_reference()),
        graph,
        started,
        (load0, _load()),
        steps,
        loop,
        cells,
        graph_text,
        graph_rows,
        mem,
    )
    text = render_markdown(results)
    if not args.smoke:
        print()
        print(text[text.index("## Targets") :] if "## Targets" in text else text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
    return text


if __name__ == "__main__":
    main()
