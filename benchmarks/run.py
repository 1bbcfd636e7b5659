"""gradmagic benchmarks: `python benchmarks/run.py [--quick]`.

Prints a table and writes `benchmarks/results.md`:

1. Overhead per training step (forward + backward + optimizer step), plain vs
   inside `gradmagic.watch()` (default options) vs `watch(copies=True)`, on a
   tiny MLP, a ResNet-18 and a ~27M-parameter transformer LM. Each watched
   variant runs interleaved with plain steps of its own (A B, B A, ...); each
   watched step is compared with the plain step of the same round, and the
   table gives medians.
2. The whole `%%grad` cell path in an in-process IPython shell, with the
   report's HTML, against the same cell run plainly.
3. `benchmarks/graph.py` (snapshot + render vs torchviz), when it exists.
4. Memory (`memory.py`): bytes gradmagic holds after a cell, peak RSS, and a
   100-run leak check.

`--profile mlp|resnet|transformer` prints a cProfile of watched steps instead.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib.util
import io
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
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

RESULTS = os.path.join(HERE, "results.md")

# Step sizes chosen so that a step takes 0.2-1.5 s on the 2-core benchmark machine.
FULL_SIZES: dict[str, dict[str, Any]] = {
    "mlp": {},
    "resnet": {"batch": 16, "image": 128},
    "transformer": {"batch": 8, "seq": 64},
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


FULL = Config(
    FULL_SIZES,
    warmup=2,
    # Steps on a small VM vary by ±5-10% each (memory returned to the OS and faulted
    # back every step): enough rounds to resolve a 1% difference in the median.
    rounds={"mlp": 1000, "resnet": 61, "transformer": 31},
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
    rounds={"mlp": 50, "resnet": 3, "transformer": 3},
    cell_rounds=10,
    held_runs=2,
    leak_runs=100,
    rss=False,
    run_graph=True,
    label="quick",
)
SMOKE = Config(
    models.TINY,
    warmup=0,
    rounds={"mlp": 1, "resnet": 1, "transformer": 1},
    cell_rounds=2,
    held_runs=2,
    leak_runs=3,
    rss=False,
    run_graph=False,
    label="smoke",
)


# --- importing gradmagic ------------------------------------------------------


# --- timing -------------------------------------------------------------------


def interleaved(
    fns: dict[str, Callable[[], Any]],
    rounds: int,
    warmup: int,
    cpu: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Wall seconds per call of each function, run in alternating order every round.

    `cpu`, when given, receives the process CPU seconds of each call: less
    sensitive than wall time to other processes competing for the cores.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
            if cpu is not None:
                cpu.setdefault(name, []).append(time.process_time() - c0)
    return times


@dataclass
class Compared:
    """One variant against the baseline of the same rounds."""

    name: str
    median_s: float
    ratio: float  # median of per-round ratios
    extra_s: float  # median of per-round differences
    samples: int


def compare(times: dict[str, list[float]], base: str) -> dict[str, Compared]:
    out = {}
    for name, ts in times.items():
        pairs = list(zip(ts, times[base]))
        out[name] = Compared(
            name,
            statistics.median(ts),
            statistics.median(t / b for t, b in pairs),
            statistics.median(t - b for t, b in pairs),
            len(ts),
        )
    return out


PHASES = ("enter", "forward", "backward", "optimizer", "exit")


def phased_step(w: models.Workload, into: dict[str, list[float]], watch: Any = None) -> Any:
    """One training step, timing each phase (`enter`/`exit`: the watch block's edges).

    Returns what the watch block yielded (the recorder), or None for a plain step.
    """
    clock = time.perf_counter
    t0 = clock()
    block = watch() if watch is not None else contextlib.nullcontext()
    entered = block.__enter__()
    t1 = clock()
    try:
        w.opt.zero_grad()
        loss = w.loss_fn(w.model(w.inputs), w.targets)
        t2 = clock()
        loss.backward()
        t3 = clock()
        w.opt.step()
        t4 = clock()
    finally:
        block.__exit__(None, None, None)
    t5 = clock()
    for name, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
        into.setdefault(name, []).append(dt)
    return entered


@dataclass
class StepResult:
    key: str
    workload: str
    description: str
    params: int
    variants: dict[str, Compared]
    cpu: dict[str, Compared] = field(default_factory=dict)  # the same in process CPU time
    # variant -> phase -> median extra seconds against plain (paired by round)
    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    plain_phases: dict[str, float] = field(default_factory=dict)
    internal_errors: list[str] = field(default_factory=list)
    report_s: float = float("nan")  # rec.report() after a default watched step
    html_s: float = float("nan")  # report._repr_html_()


def bench_step(key: str, cfg: Config, graph: bool) -> StepResult:
    import gradmagic
    from gradmagic.history import History

    w = models.BUILDERS[key](**cfg.sizes[key])
    ns = w.namespace()
    histories = {"default": History(), "copies": History()}
    errors: list[str] = []
    # Phase times per variant; plain steps are kept per pairing ("plain/default").
    phases: dict[str, dict[str, list[float]]] = {}

    def variant(name: str, into: str, **kwargs: Any) -> Callable[[], None]:
        def block() -> Any:
            return gradmagic.watch(ns, history=histories[name], graph=graph, **kwargs)

        def run() -> None:
            rec = phased_step(w, phases.setdefault(into, {}), block if name != "plain" else None)
            if rec is not None:
                errors.extend(rec.internal_errors)

        return run

    n = cfg.rounds[key]
    variants, cpu_variants = {}, {}
    extra, plain = {}, {}
    # Each watched variant runs against plain steps of its own (A B, B A, ...): what one
    # variant does to the allocator (copies=True copies every gradient) never lands in
    # the other's rounds.
    for name, kwargs in (("default", {}), ("copies", {"copies": True})):
        fns = {"plain": variant("plain", f"plain/{name}"), name: variant(name, name, **kwargs)}
        cpu: dict[str, list[float]] = {}
        times = interleaved(fns, n, cfg.warmup, cpu)
        variants[name] = compare(times, "plain")[name]
        cpu_variants[name] = compare(cpu, "plain")[name]
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
    result = StepResult(
        key,
        w.name,
        w.description,
        w.n_params,
        variants,
        cpu_variants,
        extra,
        plain,
        sorted(set(errors)),
    )
    # What a `%%grad` user waits for after the cell: the report and its HTML (graph drawn).
    report_times, html_times = [], []
    for _ in range(2):
        with gradmagic.watch(ns, history=histories["default"], graph=graph) as rec:
            w.step()
        t0 = time.perf_counter()
        report = rec.report()
        t1 = time.perf_counter()
        report._repr_html_()
        report_times.append(t1 - t0)
        html_times.append(time.perf_counter() - t1)
        del rec, report
    result.report_s, result.html_s = min(report_times), min(html_times)
    return result


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
    grad_ms: float  # run_cell("%%grad -q -o rep ...") + rep._repr_html_()
    cell_ms: float  # the run_cell part alone
    html_ms: float  # rep._repr_html_() alone
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


def bench_graph(cfg: Config) -> str:
    path = os.path.join(HERE, "graph.py")
    if not os.path.exists(path):
        return "`benchmarks/graph.py` is missing: no graph benchmark yet."
    if not cfg.run_graph:
        return "`benchmarks/graph.py` exists (not run in this mode)."
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    cmd = [sys.executable, path]
    if cfg.label == "quick" and "--quick" in text:
        cmd.append("--quick")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return "`benchmarks/graph.py` ran past 240 s and was stopped."
    body = (done.stdout or "").strip()
    if done.returncode:
        body += f"\n\n(exit {done.returncode})\n" + (done.stderr or "").strip()[-3000:]
    return body or "(graph.py printed nothing)"


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


# --- profile ---------------------------------------------------------------------


def profile(key: str, cfg: Config, graph: bool, steps: int, copies: bool) -> str:
    """cProfile of watched steps: gradmagic's functions by cumulative time, then all by own time."""
    import gradmagic
    from gradmagic.history import History

    w = models.BUILDERS[key](**cfg.sizes[key])
    ns, history = w.namespace(), History()

    def watched() -> None:
        with gradmagic.watch(ns, history=history, graph=graph, copies=copies):
            w.step()

    for _ in range(2):
        watched()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        watched()
    prof.disable()
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf).sort_stats("cumulative")
    st.print_stats("gradmagic", 30)
    st.sort_stats("tottime").print_stats(25)
    return buf.getvalue()


# Functions timed by `--breakdown` ("module:Qualified.name"); missing ones are skipped.
# Not the per-event hooks (the naming profile hook, module hooks): a timer around a
# function called tens of thousands of times a step would measure mostly itself; their
# cost shows in the step benchmark as the difference from the sum of the rest.
BREAKDOWN_TARGETS = (
    "gradmagic.capture:Recorder.__init__",
    "gradmagic.capture:Recorder.handle",
    "gradmagic.capture:Recorder._begin",
    "gradmagic.capture:Recorder._end",
    "gradmagic.capture:Recorder.close",
    "gradmagic.capture:Recorder._finish",
    "gradmagic.capture:Recorder._add_expected",
    "gradmagic.capture:Recorder._check_finite_copies",
    "gradmagic.capture:Recorder._name_leaves",
    "gradmagic.capture:Recorder._register",
    "gradmagic.capture:WeakNamespace.__init__",
    "gradmagic.capture:ModuleCalls.__enter__",
    "gradmagic.capture:ModuleCalls.__exit__",
    "gradmagic.diagnostics:findings_for",
    "gradmagic.probes:OptimizerStepProbe._before_step",
    "gradmagic.probes:OptimizerStepProbe._after_step",
    "gradmagic.probes:OptimizerStepProbe.finish",
    "gradmagic.probes:WarningProbe.finish",
    "gradmagic.graph:snapshot",
    "gradmagic.graph:FlowRecorder.__enter__",
    "gradmagic.graph:FlowRecorder.__exit__",
    "gradmagic.graph:ModuleSpans.assign",
    "gradmagic.naming:Namer._scan",
    "gradmagic.naming:may_run_user_code",
    "gradmagic.stats:summaries",
    "gradmagic.stats:norms",
    "gradmagic.stats:exact_copies",
    "gradmagic.history:History.record",
    "gradmagic._engine:install",
    "gradmagic._engine:uninstall",
    "gradmagic._engine:caller_context",
)


@contextlib.contextmanager
def timed_functions(targets: tuple[str, ...]) -> Any:
    """Wrap each target with a timer; yields {target: [seconds, calls]} (inclusive times)."""
    import functools

    totals: dict[str, list[float]] = {}
    undo: list[tuple[Any, str, Any]] = []
    for target in targets:
        module_name, qualname = target.split(":")
        try:
            owner: Any = importlib.import_module(module_name)
            *path, attr = qualname.split(".")
            for part in path:
                owner = getattr(owner, part)
            original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        except (ImportError, AttributeError, KeyError):
            continue
        if not callable(original) or isinstance(original, (staticmethod, classmethod)):
            continue
        slot = totals.setdefault(target, [0.0, 0])

        def make(fn: Any, slot: list[float]) -> Any:
            @functools.wraps(fn)
            def timed(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    slot[0] += time.perf_counter() - t0
                    slot[1] += 1

            return timed

        setattr(owner, attr, make(original, slot))
        undo.append((owner, attr, original))
    try:
        yield totals
    finally:
        for owner, attr, original in reversed(undo):
            setattr(owner, attr, original)


def breakdown(key: str, cfg: Config, graph: bool, steps: int, copies: bool) -> str:
    """Milliseconds per watched step in each of gradmagic's functions (inclusive, nested)."""
    import gradmagic
    from gradmagic.history import History

    w = models.BUILDERS[key](**cfg.sizes[key])
    ns, history = w.namespace(), History()
    phases: dict[str, dict[str, list[float]]] = {"plain": {}, "watched": {}}

    def block() -> Any:
        return gradmagic.watch(ns, history=history, graph=graph, copies=copies)

    for _ in range(2):
        phased_step(w, {}, block)
        phased_step(w, {})
    with timed_functions(BREAKDOWN_TARGETS) as totals:
        for _ in range(steps):
            phased_step(w, phases["plain"])
            phased_step(w, phases["watched"], block)
    lines = [
        f"{w.name} ({w.description}), {steps} steps, graph={graph}, copies={copies}",
        "phase medians, ms (plain -> watched; the timers add a little to watched):",
    ]
    for ph in PHASES:
        p = statistics.median(phases["plain"][ph])
        q = statistics.median(phases["watched"][ph])
        lines.append(f"  {ph:>10}: {1000 * p:9.2f} -> {1000 * q:9.2f}  ({1000 * (q - p):+.2f})")
    lines.append("functions, ms per step (inclusive; nested calls count in their callers too):")
    for target, (secs, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
        if calls:
            lines.append(f"  {1000 * secs / steps:9.2f} ms  {calls / steps:8.1f} calls  {target}")
    return "\n".join(lines)


# --- report -----------------------------------------------------------------------


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


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _bytes(n: float) -> str:
    if n < 10_000:
        return f"{n:,.0f} B"
    if n < 2**20:
        return f"{n / 1024:,.1f} KiB"
    return _mib(n)


@dataclass
class Check:
    target: str
    measured: str
    ok: bool | None  # None: not measured


def checks(
    steps: dict[str, StepResult], cells: list[CellResult], mem: MemoryResult | None
) -> list[Check]:
    out = []
    for key, label in (("transformer", "(c)"), ("resnet", "(b)")):
        if key in steps:
            r = steps[key].variants["default"].ratio
            out.append(Check(f"{label} default overhead ≤ 1.05×", f"{r:.3f}×", r <= 1.05))
    if "mlp" in steps:
        extra = 1000 * steps["mlp"].variants["default"].extra_s
        out.append(Check("(a) default ≤ +1 ms per step", f"+{extra:.2f} ms", extra <= 1.0))
    for c in cells:
        if c.name.startswith("tiny"):
            out.append(
                Check("`%%grad` tiny cell + HTML < 100 ms", f"{c.grad_ms:.1f} ms", c.grad_ms < 100)
            )
    if "transformer" in steps:
        r = steps["transformer"].variants["copies"].ratio
        out.append(Check("(c) copies=True ≤ 1.3×", f"{r:.3f}×", r <= 1.3))
    if mem is not None:
        for key in mem.held:
            gb = mem.grad_bytes[key]
            d = mem.held[key]["default"][-1]["total"]
            out.append(
                Check(
                    f"{key}: default holds no large gradient copies",
                    f"{_bytes(d['large_bytes'])} in large tensors, {d['small_count']} small",
                    d["large_bytes"] == 0,
                )
            )
            c1 = mem.held[key]["copies"][0]["total"]["copies_bytes"]
            cn = mem.held[key]["copies"][-1]["total"]["copies_bytes"]
            runs = len(mem.held[key]["copies"])
            out.append(
                Check(
                    f"{key}: copies ≤ 2× gradient bytes",
                    f"{c1 / gb:.2f}× after 1 run, {cn / gb:.2f}× after {runs} runs",
                    max(c1, cn) <= 2 * gb,
                )
            )
        for leak in mem.leaks:
            out.append(
                Check(
                    f"no tensor alive after {leak['runs']} runs (`{leak['flags']}`)",
                    f"{leak['alive']} of {leak['weakrefs']} alive",
                    leak["alive"] == 0,
                )
            )
    return out


def render_markdown(
    cfg: Config,
    info: dict[str, str],
    graph: bool,
    steps: dict[str, StepResult],
    cells: list[CellResult],
    graph_text: str,
    mem: MemoryResult | None,
    started: float,
    loads: tuple[str, str],
) -> str:
    L: list[str] = []
    L.append("# gradmagic benchmarks")
    L.append("")
    L.append(
        f"Generated by `python benchmarks/run.py{' --quick' if cfg.label == 'quick' else ''}` "
        f"({cfg.label} mode) in {time.time() - started:.0f} s. Load average at start / end: "
        f"{loads[0]} / {loads[1]} (other processes on the machine make timings noisier)."
    )
    L.append("")
    L.append("| machine | |")
    L.append("|---|---|")
    for k, v in info.items():
        L.append(f"| {k} | {v} |")
    L.append("")
    if not graph:
        L.append(
            "**Run with `--no-graph`: every watched run used `graph=False` "
            "(`%%grad -G`), not the default.**"
        )
        L.append("")
    L.append("## 1. Overhead per training step (forward + backward + optimizer step)")
    L.append("")
    L.append(
        "Each watched step is a whole `with gradmagic.watch(ns):` block (what one `%%grad` "
        "cell does, report not built). Each variant runs interleaved with plain steps of "
        "its own (A B, B A, ...; *n* rounds each), so what `copies=True` does to the "
        "allocator never lands in the default's rounds; ratio and extra time are the "
        "medians of per-round ratios/differences against the plain step of the same round "
        "(wall clock); *CPU ratio* is the same in process CPU time, which other processes "
        "on the machine disturb less."
    )
    L.append("")
    L.append(
        "| workload | params | n | plain | default | ratio | extra | CPU ratio "
        "| copies=True | ratio | extra | CPU ratio |"
    )
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in steps.values():
        p, d, c = (r.variants[k] for k in ("plain", "default", "copies"))
        dc, cc = (r.cpu[k].ratio if r.cpu else float("nan") for k in ("default", "copies"))
        L.append(
            f"| {r.workload} | {r.params:,} | {p.samples} | {_ms(p.median_s)} | {_ms(d.median_s)} "
            f"| {d.ratio:.3f}× | {_ms(d.extra_s, sign=True)} | {dc:.3f}× | {_ms(c.median_s)} "
            f"| {c.ratio:.3f}× | {_ms(c.extra_s, sign=True)} | {cc:.3f}× |"
        )
    L.append("")
    L.append(
        "After a default watched step, building the report and its HTML (what a `%%grad` "
        "user waits for; best of 2): "
        + "; ".join(
            f"{r.workload}: `rec.report()` {_ms(r.report_s)}, `_repr_html_()` {_ms(r.html_s)}"
            for r in steps.values()
        )
        + "."
    )
    L.append("")
    if any(r.phases for r in steps.values()):
        L.append(
            "Where the extra time goes: median per-round extra over the plain step, by phase "
            "(*enter*/*exit*: the `watch()` block's edges; *exit* includes closing the "
            "recorder: names, summaries, diagnostics)."
        )
        L.append("")
        L.append("| workload | variant | " + " | ".join(PHASES) + " |")
        L.append("|---|---|" + "---:|" * len(PHASES))
        for r in steps.values():
            L.append(
                f"| {r.workload} | plain (absolute) | "
                + " | ".join(_ms(r.plain_phases[ph]) for ph in PHASES)
                + " |"
            )
            for name, extra in r.phases.items():
                L.append(
                    f"| {r.workload} | {name} (extra) | "
                    + " | ".join(_ms(extra[ph], sign=True) for ph in PHASES)
                    + " |"
                )
        L.append("")
    for r in steps.values():
        L.append(f"- {r.workload}: {r.description}")
        if r.internal_errors:
            L.append(f"  - gradmagic internal errors: {'; '.join(r.internal_errors)}")
    L.append("")
    if cells:
        L.append("### The `%%grad` cell path (in-process IPython shell)")
        L.append("")
        L.append(
            "`shell.run_cell('%%grad -q -o rep ...')` + `rep._repr_html_()` against "
            "`shell.run_cell(...)` of the same cell; warm, interleaved, medians."
        )
        L.append("")
        L.append(
            "| cell | n | plain | %%grad + HTML | of which run_cell | of which HTML | ratio | HTML size |"
        )
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for c in cells:
            L.append(
                f"| {c.name} | {c.samples} | {c.plain_ms:.2f} ms | {c.grad_ms:.2f} ms | "
                f"{c.cell_ms:.2f} ms | {c.html_ms:.2f} ms | {c.ratio:.1f}× | {c.html_bytes:,} B |"
            )
        L.append("")
    L.append("## 2. Graph")
    L.append("")
    if "|---" in graph_text:  # graph.py prints markdown: let it render
        L.append(graph_text)
    else:
        L.extend(["```", graph_text, "```"])
    L.append("")
    if mem is not None:
        L.append("## 3. Memory")
        L.append("")
        L.append(
            "Bytes of tensor storage reachable from gradmagic's objects after each watched "
            "run of one persistent history (as the magic keeps it): *cell* = the last "
            "report + recorder; *total* = those plus the run history. *copies* are storages "
            "that are not the user's parameters/gradients/inputs; *user refs* are strong "
            "references to the user's own tensors (none expected)."
        )
        L.append("")
        L.append(
            "| model | gradient bytes | variant | run | cell copies | total copies | "
            "total / grad bytes | small copies | user refs | largest copy |"
        )
        L.append("|---|---:|---|---:|---:|---:|---:|---:|---:|---|")
        for key, variants in mem.held.items():
            gb = mem.grad_bytes[key]
            for variant, runs in variants.items():
                for m in runs:
                    cell, tot = m["cell"], m["total"]
                    largest = tot["largest"][0][1] if tot["largest"] else "—"
                    L.append(
                        f"| {key} | {_bytes(gb)} | {variant} | {m['run']} | "
                        f"{_bytes(cell['copies_bytes'])} | {_bytes(tot['copies_bytes'])} | "
                        f"{tot['copies_bytes'] / gb:.3f} | {tot['small_count']} | "
                        f"{tot['user_refs']} | {largest} |"
                    )
        L.append("")
        if mem.rss:
            L.append(
                "Peak RSS, 3 steps in a fresh process per variant (watched steps keep the last report):"
            )
            L.append("")
            L.append(
                "| model | param bytes | variant | RSS after build | peak RSS | peak − plain | (peak − plain) / param bytes |"
            )
            L.append("|---|---:|---|---:|---:|---:|---:|")
            for key, variants in mem.rss.items():
                base = variants["plain"]["peak_rss"]
                pb = variants["plain"]["param_bytes"]
                for variant, m in variants.items():
                    d = m["peak_rss"] - base
                    L.append(
                        f"| {key} | {_mib(pb)} | {variant} | {_mib(m['rss_after_build'])} | "
                        f"{_mib(m['peak_rss'])} | {_mib(d)} | {d / pb:.2f} |"
                    )
            L.append("")
        L.append(
            "Leak check: a cell run N times (tiny MLP; weak references to every parameter, "
            "gradient and activation), then the user's variables dropped: `%%grad` in IPython "
            "(`rep` deleted too), and `with gradmagic.watch() as rec:` in a script function "
            "whose last `rec` the caller keeps:"
        )
        L.append("")
        L.append("| path | runs | weak refs | alive after drop | holders | ms per run |")
        L.append("|---|---:|---:|---:|---|---:|")
        for leak in mem.leaks:
            alive = str(leak["alive"])
            if "alive_after_rec_dropped" in leak:
                alive += f" (after `del rec`: {leak['alive_after_rec_dropped']})"
            L.append(
                f"| `{leak['flags']}` | {leak['runs']} | {leak['weakrefs']} | {alive} | "
                f"{leak['holders'] or '—'} | {_per_run(leak['ms_per_run'])} |"
            )
        L.append("")
    L.append("## Targets")
    L.append("")
    L.append("| target | measured | |")
    L.append("|---|---|---|")
    for ch in checks(steps, cells, mem):
        mark = "n/a" if ch.ok is None else ("PASS" if ch.ok else "**FAIL**")
        L.append(f"| {ch.target} | {ch.measured} | {mark} |")
    L.append("")
    return "\n".join(L)


def _per_run(ms: float) -> str:
    return "—" if ms != ms else f"{ms:.1f}"


def _ms(seconds: float, sign: bool = False) -> str:
    ms = 1000 * seconds
    text = f"{ms:+.2f}" if sign else f"{ms:.2f}"
    if abs(ms) >= 100:
        text = f"{ms:+.0f}" if sign else f"{ms:.0f}"
    return f"{text} ms"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Few rounds, no RSS subprocesses.")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=RESULTS, help="Where to write the markdown.")
    parser.add_argument(
        "--only", nargs="*", choices=["steps", "cells", "graph", "memory"], help="Sections to run."
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
        text = fn(args.profile or args.breakdown, cfg, graph, args.steps, args.copies)
        print(text)
        return text

    started, load0 = time.time(), _load()
    sections = set(args.only or ("steps", "cells", "graph", "memory"))
    keys = args.models or ["mlp", "resnet", "transformer"]
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
                f"{r.workload:>16}: plain {_ms(r.variants['plain'].median_s)}, "
                f"default {d.ratio:.3f}× ({_ms(d.extra_s, True)}), "
                f"copies {c.ratio:.3f}× ({_ms(c.extra_s, True)})  [{time.time() - t0:.0f} s]",
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
    graph_text = bench_graph(cfg) if "graph" in sections else "(not run)"
    if "graph" in sections:
        print(graph_text, flush=True)
    mem = bench_memory(shell, cfg, graph) if "memory" in sections else None
    text = render_markdown(
        cfg, info, graph, steps, cells, graph_text, mem, started, (load0, _load())
    )
    if not args.smoke:
        print()
        print(text[text.index("## Targets") :] if "## Targets" in text else text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
    return text


if __name__ == "__main__":
    main()
