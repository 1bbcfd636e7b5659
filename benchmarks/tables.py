"""The benchmark's results as markdown, and the targets they are judged on.

`run.py` measures and fills a `Results`; `render_markdown` writes
`benchmarks/results.md` from it, ending with the target table from `checks`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from timing import PHASES


@dataclass
class Results:
    """Everything one run of `run.py` measured (sections not run stay empty)."""

    label: str  # "full", "quick" or "smoke"
    info: dict[str, str]
    speed: tuple[dict[str, float], dict[str, float]]  # speed_reference() at start and end
    graph: bool  # watched runs drew graphs (the default)
    started: float
    loads: tuple[str, str]
    steps: dict[str, Any] = field(default_factory=dict)  # key -> run.StepResult
    loop: Any = None  # run.LoopResult
    cells: list[Any] = field(default_factory=list)  # run.CellResult
    graph_text: str = "(not run)"
    graph_rows: list[dict[str, Any]] = field(default_factory=list)  # graph.py's rows
    mem: Any = None  # run.MemoryResult


@dataclass
class Check:
    target: str
    measured: str
    ok: bool | None  # None: not measured
    context: bool = False  # a number beside a target, not a target itself


def checks(r: Results) -> list[Check]:
    """The issue's targets, each with what was measured and whether it holds."""
    out = []
    for key, label in (("resnet", "ResNet-18"), ("transformer", "27M transformer")):
        if key in r.steps:
            d = r.steps[key].variants["default"]
            out.append(
                Check(
                    f"{label}: whole cell path (capture, report, HTML, text) ≤ 1.10×",
                    _ratio_ci(d),
                    d.ratio <= 1.10,
                )
            )
            c = r.steps[key].capture["default"]
            out.append(Check(f"{label}: capture alone ≤ 1.05×", _ratio_ci(c), c.ratio <= 1.05))
    if "many" in r.steps:
        s = r.steps["many"]
        total = sum(s.report_parts.values())
        out.append(
            Check(
                "2,000 parameter tensors: report + HTML + text < 300 ms",
                " + ".join(_ms(s.report_parts[k]) for k in ("report", "html", "text"))
                + f" = {_ms(total)}",
                total < 0.3,
            )
        )
        out.append(
            Check(
                "2,000 parameter tensors: HTML < 500 KB",
                f"{s.html_bytes / 1000:.0f} KB",
                s.html_bytes < 500_000,
            )
        )
    if "mlp" in r.steps:
        # One step per block, as a one-step cell: the tiny model shows the fixed costs.
        d = r.steps["mlp"].capture["default"]
        out.append(
            Check(
                "(a) capture ≤ +1 ms per step (one step per block)",
                _ms_ci(d.extra_s, d.extra_ci),
                d.extra_s <= 1e-3,
            )
        )
    if r.loop is not None:
        lp = r.loop
        out.append(
            Check(
                f"(a) beside it: per backward in a {lp.steps}-step loop (block edges paid once)",
                _ms_ci(lp.extra_per_step_s, lp.extra_ci),
                lp.extra_per_step_s <= 1e-3,
                context=True,
            )
        )
    for c in r.cells:
        if c.name.startswith("seed"):
            out.append(
                Check(
                    "seed-sized `%%grad` cell with its report (HTML and text) < 30 ms, warm",
                    f"{c.grad_ms:.1f} ms",
                    c.grad_ms < 30,
                )
            )
    if "transformer" in r.steps:
        c = r.steps["transformer"].variants["copies"]
        out.append(
            Check("27M transformer: copies=True, whole cell ≤ 1.3×", _ratio_ci(c), c.ratio <= 1.3)
        )
    for row in r.graph_rows:
        if row["key"] == "transformer":
            ratio = row["ratio"]
            missing = "not installed" in (row["torchviz_error"] or "")
            out.append(
                Check(
                    "transformer graph: snapshot + collapsed render faster than torchviz",
                    f"{_ms(row['ours_s'])} vs {_ms(row['torchviz_s'])} ({ratio:.2f}×)"
                    if ratio is not None
                    else f"torchviz: {row['torchviz_error']}",
                    None if missing else ratio is not None and ratio < 1,
                )
            )
        if row["key"] == "chain":
            out.append(
                Check(
                    f"{row['ops'] - 1:,}-op chain drawn within the node budget in < 2 s",
                    f"{_ms(row['ours_s'])}, {row['nodes']} nodes"
                    + (f"; torchviz: {row['torchviz_error']}" if row["torchviz_error"] else ""),
                    row["ours_s"] < 2.0 and row["nodes"] <= 60,
                )
            )
    if r.mem is not None:
        out += _memory_checks(r.mem)
    return out


def _memory_checks(mem: Any) -> list[Check]:
    out = []
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


# --- markdown -------------------------------------------------------------------------------


def render_markdown(r: Results) -> str:
    L: list[str] = []
    quick = " --quick" if r.label == "quick" else ""
    L += [
        "# gradmagic benchmarks",
        "",
        f"Generated by `python benchmarks/run.py{quick}` ({r.label} mode) in "
        f"{time.time() - r.started:.0f} s. Load average at start / end: {r.loads[0]} / "
        f"{r.loads[1]} (other processes on the machine make timings noisier).",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in r.info.items()),
        f"| speed, start → end | `sum(range(1000))` {_us(r.speed[0]['python'])} → "
        f"{_us(r.speed[1]['python'])}; a 4×4 tensor add {_us(r.speed[0]['torch_op'])} → "
        f"{_us(r.speed[1]['torch_op'])} |",
        "",
    ]
    if not r.graph:
        L += [
            "**Run with `--no-graph`: every watched run used `graph=False` "
            "(`%%grad -G`), not the default.**",
            "",
        ]
    if r.steps:
        L += _steps_section(r)
    if r.loop is not None:
        L += _loop_section(r.loop)
    if r.cells:
        L += _cells_section(r.cells)
    L += ["## 2. Graph", ""]
    if "|---" in r.graph_text:  # graph.py prints markdown: let it render
        L.append(r.graph_text)
    else:
        L += ["```", r.graph_text, "```"]
    L.append("")
    if r.mem is not None:
        L += _memory_section(r.mem)
    L += ["## Targets", "", "| target | measured | |", "|---|---|---|"]
    for ch in checks(r):
        mark = "n/a" if ch.ok is None else ("PASS" if ch.ok else "**FAIL**")
        if ch.context:
            mark = "(context: " + ("≤ 1 ms" if ch.ok else "over 1 ms") + ")"
        L.append(f"| {ch.target} | {ch.measured} | {mark} |")
    L.append("")
    return "\n".join(L)


def _steps_section(r: Results) -> list[str]:
    L = [
        "## 1. The whole cell path per training step",
        "",
        "Each watched step is what one `%%grad` cell does: a whole `with gradmagic.watch(ns):` "
        "block around forward, backward and optimizer step, then `rec.report()`, its HTML and "
        "its text (a notebook computes both). Each variant runs interleaved with plain steps of "
        "its own (A B, B A, ...; *n* rounds, half as many for `copies=True`), so what "
        "`copies=True` does to the allocator never lands in the default's rounds; ratio and "
        "extra time are the medians of per-round ratios/differences against the plain step of "
        "the same round (wall clock), with a 95% bootstrap interval; *capture* is the same for "
        "the block alone (the report's time taken out round by round); *CPU ratio* is the whole "
        "path in process CPU time, which other processes on the machine disturb less.",
        "",
        "| workload | params | n | plain | whole cell | ratio [95%] | extra | CPU ratio "
        "| capture [95%] | report · HTML · text | HTML | copies=True | ratio [95%] | extra |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in r.steps.values():
        p, d, c = (s.variants[k] for k in ("plain", "default", "copies"))
        dc = s.cpu["default"].ratio if s.cpu else math.nan
        parts = " · ".join(_ms(s.report_parts[k]) for k in ("report", "html", "text"))
        L.append(
            f"| {s.workload} | {s.params:,} | {p.samples} | {_ms(p.median_s)} | {_ms(d.median_s)} "
            f"| {_ratio_ci(d)} | {_ms(d.extra_s, sign=True)} | {dc:.3f}× "
            f"| {_ratio_ci(s.capture['default'])} | {parts} | {s.html_bytes / 1000:.0f} KB "
            f"| {_ms(c.median_s)} | {_ratio_ci(c)} | {_ms(c.extra_s, sign=True)} |"
        )
    L.append("")
    if any(s.phases for s in r.steps.values()):
        L += [
            "Where the extra time goes: median per-round extra over the plain step, by phase "
            "(*enter*/*exit*: the `watch()` block's edges; *exit* includes closing the "
            "recorder: names, statuses, history; *report*: the report, its HTML and text).",
            "",
            "| workload | variant | " + " | ".join(PHASES) + " |",
            "|---|---|" + "---:|" * len(PHASES),
        ]
        for s in r.steps.values():
            L.append(
                f"| {s.workload} | plain (absolute) | "
                + " | ".join(_ms(s.plain_phases[ph]) for ph in PHASES)
                + " |"
            )
            for name, extra in s.phases.items():
                L.append(
                    f"| {s.workload} | {name} (extra) | "
                    + " | ".join(_ms(extra[ph], sign=True) for ph in PHASES)
                    + " |"
                )
        L.append("")
    for s in r.steps.values():
        L.append(f"- {s.workload}: {s.description}")
        if s.internal_errors:
            L.append(f"  - gradmagic internal errors: {'; '.join(s.internal_errors)}")
    L.append("")
    return L


def _loop_section(lp: Any) -> list[str]:
    return [
        "### A training loop in one cell",
        "",
        f"{lp.steps} steps of the tiny MLP inside one `watch()` block against the same loop "
        f"unwatched ({lp.rounds} interleaved rounds): the block's edges are paid once, each "
        "backward pays the rest.",
        "",
        "| plain step | extra per backward [95%] | report after the loop | its HTML | "
        "graphs drawn | memory the recorder holds |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {_ms(lp.plain_step_s)} | {_ms_ci(lp.extra_per_step_s, lp.extra_ci)} | "
        f"{_ms(lp.report_s)} | {_ms(lp.html_s)} | {lp.graphs} | "
        f"{_bytes(lp.held_bytes)} ({_bytes(lp.held_bytes / lp.steps)} per step) |",
        "",
    ]


def _cells_section(cells: list[Any]) -> list[str]:
    L = [
        "### The `%%grad` cell path (in-process IPython shell)",
        "",
        "`shell.run_cell('%%grad -q -o rep ...')` + `rep._repr_html_()` + `repr(rep)` against "
        "`shell.run_cell(...)` of the same cell; warm, interleaved, medians.",
        "",
        "| cell | n | plain | %%grad + report | of which run_cell | of which HTML and text | ratio | HTML size |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        L.append(
            f"| {c.name} | {c.samples} | {c.plain_ms:.2f} ms | {c.grad_ms:.2f} ms | "
            f"{c.cell_ms:.2f} ms | {c.html_ms:.2f} ms | {c.ratio:.1f}× | {c.html_bytes:,} B |"
        )
    L.append("")
    return L


def _memory_section(mem: Any) -> list[str]:
    L = [
        "## 3. Memory",
        "",
        "Bytes of tensor storage reachable from gradmagic's objects after each watched "
        "run of one persistent history (as the magic keeps it): *cell* = the last "
        "report + recorder; *total* = those plus the run history. *copies* are storages "
        "that are not the user's parameters/gradients/inputs; *user refs* are strong "
        "references to the user's own tensors (none expected).",
        "",
        "| model | gradient bytes | variant | run | cell copies | total copies | "
        "total / grad bytes | small copies | user refs | largest copy |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
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
        L += [
            "Peak RSS, 3 steps in a fresh process per variant (watched steps keep the last report):",
            "",
            "| model | param bytes | variant | RSS after build | peak RSS | peak − plain | "
            "(peak − plain) / param bytes |",
            "|---|---:|---|---:|---:|---:|---:|",
        ]
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
    L += [
        "Leak check: a cell run N times (tiny MLP; weak references to every parameter, "
        "gradient and activation), then the user's variables dropped: `%%grad` in IPython "
        "(`rep` deleted too), and `with gradmagic.watch() as rec:` in a script function "
        "whose last `rec` the caller keeps:",
        "",
        "| path | runs | weak refs | alive after drop | holders | ms per run |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for leak in mem.leaks:
        alive = str(leak["alive"])
        if "alive_after_rec_dropped" in leak:
            alive += f" (after `del rec`: {leak['alive_after_rec_dropped']})"
        per_run = "—" if leak["ms_per_run"] != leak["ms_per_run"] else f"{leak['ms_per_run']:.1f}"
        L.append(
            f"| `{leak['flags']}` | {leak['runs']} | {leak['weakrefs']} | {alive} | "
            f"{leak['holders'] or '—'} | {per_run} |"
        )
    L.append("")
    return L


# --- numbers --------------------------------------------------------------------------------


def _ratio_ci(c: Any) -> str:
    low, high = c.ratio_ci
    if math.isnan(low):
        return f"{c.ratio:.3f}×"
    return f"{c.ratio:.3f}× [{low:.3f}, {high:.3f}]"


def _ms_ci(seconds: float, ci: tuple[float, float]) -> str:
    text = _ms(seconds, sign=True)
    if math.isnan(ci[0]):
        return text
    return f"{text} [{_ms(ci[0], sign=True)[:-3]}, {_ms(ci[1], sign=True)}]"


def _ms(seconds: float | None, sign: bool = False) -> str:
    if seconds is None:
        return "—"
    ms = 1000 * seconds
    text = f"{ms:+.2f}" if sign else f"{ms:.2f}"
    if abs(ms) >= 100:
        text = f"{ms:+.0f}" if sign else f"{ms:.0f}"
    return f"{text} ms"


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} µs"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _bytes(n: float) -> str:
    if n < 10_000:
        return f"{n:,.0f} B"
    if n < 2**20:
        return f"{n / 1024:,.1f} KiB"
    return _mib(n)
