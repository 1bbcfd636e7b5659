"""Rules over a watched block's records: what is wrong, in plain words.

Each rule reads the closed `Recorder` (rows, backward records, probes' records,
history; its namespace is still there) and yields `Finding`s, one sentence or
two naming the tensors and the likely cause. Findings are sorted most serious
first. The `kind` strings are public API (`rep.findings[i].kind`).
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import stats

SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}

NO_GRAD_ERROR = "does not require grad and does not have a grad_fn"
FREED_GRAPH_ERROR = "Trying to backward through the graph a second time"
GRAD_OFF = re.compile(r"\b(no_grad|inference_mode)\(|set_grad_enabled\(False")
SATURATING = (nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.Hardtanh, nn.Softsign)
# What makes each op's gradient non-finite, by the name PyTorch gives its node.
NONFINITE_CAUSES = {
    "Log": "`log` at 0 (its gradient is 1/x)",
    "Div": "a division by 0",
    "Sqrt": "`sqrt` at 0 (its gradient is 1/(2√x))",
    "Pow": "a power at 0 with an exponent below 1",
    "Rsqrt": "`rsqrt` at 0",
    "Reciprocal": "`1/x` at 0",
    "Acos": "`acos` at ±1",
    "Asin": "`asin` at ±1",
}


@dataclass(frozen=True)
class Finding:
    """One thing gradmagic noticed. `message` is a sentence; `tensors` are row names."""

    kind: str
    severity: str  # "error", "warning" or "info"
    message: str
    tensors: tuple[str, ...] = field(default_factory=tuple)

    def __str__(self) -> str:
        return f"[{self.severity}] {self.message}"


Rule = Callable[[Any], Iterator[Finding]]
RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def findings_for(recorder: Any) -> list[Finding]:
    """Every finding for a closed recorder, most serious first."""
    found: list[Finding] = []
    for check in RULES:
        try:
            found.extend(check(recorder))
        except Exception as exc:  # noqa: BLE001 - one broken rule must not hide the report
            found.append(
                Finding("internal", "info", f"gradmagic rule {check.__name__} failed: {exc}")
            )
    return sorted(found, key=lambda f: SEVERITY_ORDER.get(f.severity, 3))


# -- helpers ---------------------------------------------------------------------------------


def listing(names: list[str], most: int = 4) -> str:
    """`a`, `b` and 3 more."""
    quoted = [f"`{n}`" for n in names[:most]]
    if len(names) > most:
        return f"{', '.join(quoted)} and {len(names) - most} more"
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _sci(x: float) -> str:
    """A number in a sentence: `0.0041`, `3.1e-19`, `2e+05`."""
    text = f"{x:.2g}"
    return re.sub(r"e([+-])0(\d)", r"e\1\2", text)


def _public_modules(recorder: Any) -> list[tuple[str, nn.Module]]:
    namespace = recorder.namespace or {}
    return [
        (k, v)
        for k, v in list(namespace.items())
        if isinstance(v, nn.Module) and isinstance(k, str) and not k.startswith("_")
    ]


def _owners(recorder: Any) -> dict[int, tuple[str, nn.Module]]:
    """Parameter id -> (variable, module): the first module in the namespace holding it."""
    owners: dict[int, tuple[str, nn.Module]] = {}
    for key, module in _public_modules(recorder):
        for p in module.parameters():
            owners.setdefault(id(p), (key, module))
    return owners


def _optimizer_for(recorder: Any, names: list[str]) -> str | None:
    """The variable name of an optimizer that holds the leaves called `names`."""
    namespace = recorder.namespace or {}
    wanted = {
        id(rec.ref()) for rec in recorder.leaves if rec.name in names and rec.ref() is not None
    }
    for key, value in list(namespace.items()):
        if isinstance(value, torch.optim.Optimizer) and not key.startswith("_"):
            params = {id(p) for group in value.param_groups for p in group["params"]}
            if wanted & params:
                return key
    return None


def _root(record: Any) -> str | None:
    """The name of what a backward started from (`loss`), if it has one."""
    return next((r for r in record.roots if r), None)


def _call(record: Any) -> str:
    """How the user spelled a backward: `loss.backward()`."""
    if record.kind == "grad":
        return "`torch.autograd.grad(...)`"
    root = _root(record)
    return f"`{root}.backward()`" if root else "`backward()`"


def _errors(recorder: Any, text: str) -> list[Any]:
    return [r for r in recorder.records if r.error and text in r.error]


def _grad_turned_off(recorder: Any) -> str | None:
    """Why no graph was recorded, when the evidence says gradients were off."""
    if recorder.grad_mode == "inference_mode":
        return "the cell began in inference mode, which records no graph"
    if recorder.grad_mode == "no_grad":
        return "gradients were off when the cell began (`torch.set_grad_enabled(False)` earlier?)"
    for node in ast.walk(_parse(recorder.source)):
        if not isinstance(node, ast.With):
            continue
        off = [ast.unparse(i.context_expr) for i in node.items]
        off = [text for text in off if GRAD_OFF.search(text)]
        # A block that assigns a variable computes something; one that only does
        # `w -= lr * w.grad` is the usual hand-written update, no cause.
        assigns = any(isinstance(n, ast.Assign) for b in node.body for n in ast.walk(b))
        if off and assigns:
            return f"the cell computes it under `{off[0]}`, which records no graph"
    return None


def _parse(source: str | None) -> ast.Module:
    try:
        return ast.parse(source or "")
    except SyntaxError:
        return ast.Module(body=[], type_ignores=[])


def _cuts(source: str | None) -> list[tuple[str, str]]:
    """Where the cell cuts the graph, as (what it wrote, the tensor cut): `.detach()`, `.data`."""
    found = []
    for node in ast.walk(_parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            cut = node.func.attr == "detach" or (
                node.func.attr == "requires_grad_"
                and any(isinstance(a, ast.Constant) and a.value is False for a in node.args)
            )
            if cut:
                found.append((ast.unparse(node), ast.unparse(node.func.value)))
        elif isinstance(node, ast.Attribute) and node.attr == "data":
            found.append((ast.unparse(node), ast.unparse(node.value)))
    return found


# -- accumulation ----------------------------------------------------------------------------


def _left_by(recorder: Any, rows: list[Any]) -> str:
    """Who left the stale gradient: earlier watched runs, or a backward gradmagic did not see."""
    runs = max(r.runs for r in rows)
    # The history's entry before this run's one, if it counted the runs we add to.
    entries = [recorder.history.entries(r.ref()) if r.ref() is not None else [] for r in rows]
    if any(len(e) >= 2 and e[-2].runs == r.runs_before for e, r in zip(entries, rows)):
        return (
            f"this run added to the gradient left by {_plural(runs - 1, 'earlier run')} "
            f"({runs} runs now sum in `.grad`)"
        )
    return (
        "this run added to a gradient already in `.grad` from a backward outside `%%grad` "
        f"(another cell?), so {runs} runs now sum in it"
    )


@rule
def accumulated(recorder: Any) -> Iterator[Finding]:
    rows = [r for r in recorder.rows() if r.status == "accumulated"]
    stale = [r for r in rows if r.before_stale]
    # Two backwards that completed: a second one that raised added nothing.
    looped = [r for r in rows if r.accumulated_in_block and not r.before_stale and r.backwards > 1]
    if stale:
        names = [r.name for r in stale]
        opt = _optimizer_for(recorder, names)
        fix = f"call `{opt}.zero_grad()`" if opt else f"set `{names[0]}.grad = None`"
        yield Finding(
            "accumulated",
            "warning",
            f"{listing(names)} {'was' if len(names) == 1 else 'were'} not zeroed: "
            f"{_left_by(recorder, stale)}. Forgotten `zero_grad()`? To start afresh, "
            f"{fix} before `backward()`.",
            tuple(names),
        )
    if looped:
        names = [r.name for r in looped]
        count = max(r.backwards for r in looped)
        opt = _optimizer_for(recorder, names)
        fix = f"call `{opt}.zero_grad()`" if opt else f"set `{names[0]}.grad = None`"
        stepped = [s for s in recorder.optimizer_steps if s.name == opt and s.steps > 1]
        steps = f" so each `{opt}.step()` used the sum of all gradients so far;" if stepped else ""
        yield Finding(
            "accumulated",
            "warning",
            f"backward ran {count} times in this cell and {listing(names)} summed every one: "
            f"nothing zeroed the gradient in between,{steps} if each step should start afresh, "
            f"{fix} before each `backward()`.",
            tuple(names),
        )


# -- missing gradients -----------------------------------------------------------------------


def _why_none(recorder: Any, rows: list[Any]) -> list[tuple[list[Any], str]]:
    """Group `none` rows by the likeliest reason, from the evidence at hand."""
    owners = _owners(recorder)
    reached = {id(r.ref()) for r in recorder.leaves if r.backwards and r.ref() is not None}
    cuts = _cuts(recorder.source)
    cut = f"the cell uses `{cuts[0][0]}`" if cuts else "a `.detach()`, `.data` or `torch.no_grad()`"
    groups: dict[str, list[Any]] = {}
    for r in rows:
        leaf = r.ref()
        owner = owners.get(id(leaf)) if leaf is not None else None
        if owner is None:
            own = [text for text, base in cuts if base in r.names]
            reason = (
                f"it is used only through `{own[0]}`, which cuts it from the graph"
                if own
                else "it is not used in the loss that backward started from"
            )
        else:
            key, module = owner
            others = any(id(p) in reached for p in module.parameters())
            if others:
                reason = (
                    f"other parameters of `{key}` did get one, so these are not on the path from "
                    f"its forward to the loss (an unused layer, or a `.detach()` inside `forward`)"
                )
            elif module in recorder.module_calls:
                reason = (
                    f"`{key}` ran in this cell with gradients on, yet no gradient reached it, so "
                    f"the graph between its output and the loss is cut ({cut})"
                )
            else:
                reason = f"`{key}` did not take part in the loss"
        groups.setdefault(reason, []).append(r)
    return [(members, reason) for reason, members in groups.items()]


@rule
def no_grad(recorder: Any) -> Iterator[Finding]:
    rows = [r for r in recorder.rows() if r.status == "none"]
    failed = _errors(recorder, NO_GRAD_ERROR)
    explain = ""
    if failed:
        root = _root(failed[0])
        explain = (
            f' That is also why {_call(failed[0])} raised "element 0 of tensors {NO_GRAD_ERROR}": '
            f"{f'`{root}`' if root else 'its output'} has no `grad_fn`, nothing connects it to a "
            f"tensor that requires grad."
        )
    severity = "error" if failed else "warning"
    for members, reason in _why_none(recorder, rows):
        names = [r.name for r in members]
        verb = "required grad but received none"
        yield Finding(
            "no-grad", severity, f"{listing(names)} {verb}: {reason}.{explain}", tuple(names)
        )
    if failed and not rows and not _grad_turned_off(recorder):
        cuts = _cuts(recorder.source)
        likely = (
            f"the cell uses `{cuts[0][0]}`"
            if cuts
            else "made without `requires_grad=True`, or cut off by `.detach()` or `.data`"
        )
        yield Finding(
            "no-grad",
            "error",
            f'{_call(failed[0])} raised "element 0 of tensors {NO_GRAD_ERROR}": what it started '
            f"from does not depend on any tensor that requires grad ({likely}).",
        )


@rule
def grad_disabled(recorder: Any) -> Iterator[Finding]:
    failed = _errors(recorder, NO_GRAD_ERROR)
    off = _grad_turned_off(recorder) if failed else None
    if not off:
        return
    root = _root(failed[0])
    yield Finding(
        "grad-disabled",
        "error",
        f'{_call(failed[0])} raised "element 0 of tensors {NO_GRAD_ERROR}" because '
        f"{f'`{root}`' if root else 'its output'} has no `grad_fn`: {off}. Compute the loss with "
        f"gradients on; keep `torch.no_grad()` for evaluation and for changing weights by hand.",
        (root,) if root else (),
    )


# -- values ----------------------------------------------------------------------------------


def _nonfinite_counts(value: Any) -> tuple[int, int] | None:
    if isinstance(value, torch.Tensor):
        v = value.detach().float() if not value.is_complex() else value.detach().abs()
        return int(torch.isnan(v).sum()), int(torch.isinf(v).sum())
    if isinstance(value, stats.TensorSummary) and value.nan is not None:
        return value.nan, value.inf or 0
    return None


def _first_nonfinite_op(recorder: Any) -> str | None:
    for record in recorder.records:
        op = getattr(record.graph, "first_nonfinite_op", None)
        if op:
            return op
    return None


@rule
def nan_inf(recorder: Any) -> Iterator[Finding]:
    rows = [r for r in recorder.rows() if r.status == "nan/inf"]
    if not rows:
        return
    parts = []
    for r in rows[:4]:
        nan, inf = _nonfinite_counts(r.after) or (None, None)
        what = " and ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "Inf")) if n)
        parts.append(
            f"`{r.name}.grad` has {what or 'NaN or Inf'} (of {_plural(r.numel, 'element')})"
        )
    if len(rows) > 4:
        parts.append(f"{len(rows) - 4} more leaves too")
    op = _first_nonfinite_op(recorder)
    if op:
        cause = NONFINITE_CAUSES.get(re.sub(r"Backward\d*$", "", op), "look at its inputs")
        why = f"the first non-finite gradient came out of `{op}`: likely {cause}"
    else:
        why = (
            f"an operation between the loss and {'it' if len(rows) == 1 else 'them'} produced a "
            f"non-finite gradient (log or division of 0, sqrt at 0, or overflow)"
        )
    yield Finding("nan-inf", "error", f"{'; '.join(parts)}: {why}.", tuple(r.name for r in rows))


@dataclass
class _Layer:
    """A module's own parameters (`model.3`): their joint gradient norm and row names."""

    name: str
    norm: float = 0.0
    rows: list[str] = field(default_factory=list)


def _row_norms(rows: list[Any]) -> dict[int, float]:
    """Finite gradient norms by row key: summaries carry theirs, copies in one batched call."""
    copies = [r for r in rows if isinstance(r.after, torch.Tensor)]
    norms = dict(zip([r.key for r in copies], stats.norms([r.after for r in copies])))
    norms.update({r.key: r.after.norm for r in rows if isinstance(r.after, stats.TensorSummary)})
    return {key: n for key, n in norms.items() if math.isfinite(n)}


def _models(
    recorder: Any, rows: list[Any], norms: dict[int, float]
) -> list[tuple[nn.Module, list[_Layer]]]:
    """Each model in the namespace with its layers in model order (those with a gradient)."""
    unclaimed = {id(r.ref()): r for r in rows if r.key in norms and r.ref() is not None}
    models = []
    for key, module in _public_modules(recorder):
        layers: dict[str, _Layer] = {}
        for path, p in module.named_parameters(prefix=key):
            row = unclaimed.pop(id(p), None)  # a shared module counts in the first model only
            if row is not None:
                name = path.rpartition(".")[0] or key
                layer = layers.setdefault(name, _Layer(name))
                layer.norm = math.hypot(layer.norm, norms[row.key])
                layer.rows.append(row.name)
        nonzero = [layer for layer in layers.values() if layer.norm > 0]
        if len(nonzero) >= 2:
            models.append((module, nonzero))
    return models


@rule
def vanishing_exploding(recorder: Any) -> Iterator[Finding]:
    options = recorder.options
    rows = [r for r in recorder.rows() if r.status in ("new", "accumulated")]
    norms = _row_norms(rows)
    covered: set[str] = set()
    for module, layers in _models(recorder, rows, norms):
        low = min(layers, key=lambda layer: layer.norm)
        high = max(layers, key=lambda layer: layer.norm)
        if high.norm / low.norm <= options.ratio:
            continue
        covered.update(name for layer in layers for name in layer.rows)
        both = f"(‖g‖ {_sci(low.norm)} vs {_sci(high.norm)})"
        if layers.index(low) < layers.index(high):
            saturating = sum(isinstance(m, SATURATING) for m in module.modules())
            through = (
                f"through {_plural(saturating, 'saturating activation')} "
                f"(a sigmoid scales gradients by at most 0.25)"
                if saturating
                else "through many layers"
            )
            yield Finding(
                "vanishing",
                "warning",
                f"`{low.name}` gradients are {_sci(low.norm / high.norm)} of `{high.name}`'s "
                f"{both}: they vanish on the way back {through}; try ReLU-family activations, "
                f"normalisation or residual connections.",
                tuple(low.rows + high.rows),
            )
        else:
            yield Finding(
                "exploding",
                "warning",
                f"`{high.name}` gradients are {_sci(high.norm / low.norm)} times `{low.name}`'s "
                f"{both}: they grow on the way back; try gradient clipping "
                f"(`torch.nn.utils.clip_grad_norm_`), a smaller initialisation or normalisation.",
                tuple(high.rows + low.rows),
            )
    small, large = [], []
    for r in rows:
        n = norms.get(r.key)
        if r.name in covered or n is None:
            continue
        if 0 < n < options.vanish:
            small.append((r.name, n))
        elif n > options.explode:
            large.append((r.name, n))
    if small:
        yield Finding(
            "vanishing",
            "warning",
            f"{listing([n for n, _ in small])} got gradients of norm "
            f"{', '.join(_sci(n) for _, n in small[:4])}, below {_sci(options.vanish)}: too small "
            f"to move {'it' if len(small) == 1 else 'them'} (saturated activations, a tiny loss "
            f"scale, or a long chain of small factors).",
            tuple(n for n, _ in small),
        )
    if large:
        yield Finding(
            "exploding",
            "warning",
            f"{listing([n for n, _ in large])} got gradients of norm "
            f"{', '.join(_sci(n) for _, n in large[:4])}, above {_sci(options.explode)}: one step "
            f"could throw {'it' if len(large) == 1 else 'them'} far (clip with "
            f"`torch.nn.utils.clip_grad_norm_`, lower the learning rate, or check the loss scale).",
            tuple(n for n, _ in large),
        )


# -- how the engine was called ---------------------------------------------------------------


def _shown(value: Any) -> str:
    if isinstance(value, stats.TensorSummary):
        return f"shape {value.shape}: {value}"
    return stats.format_value(value)


@rule
def autograd_grad(recorder: Any) -> Iterator[Finding]:
    for record in recorder.records:
        if record.kind != "grad":
            continue
        pairs = list(zip(record.inputs or [], record.results or []))
        shown = [f"d/d`{name}` = {_shown(value)}" for name, value in pairs if name]
        results = "; ".join(shown) if shown else "its results"
        yield Finding(
            "autograd-grad",
            "info",
            f"`torch.autograd.grad` was called: it returned {results}. Its results are returned, "
            f"not stored in `.grad`, so `.grad` was not touched.",
            tuple(name for name, _ in pairs if name),
        )


@rule
def custom_gradient(recorder: Any) -> Iterator[Finding]:
    for record in recorder.records:
        if record.kind != "backward" or record.gradient is None:
            continue
        vector = ", ".join(stats.format_value(g) for g in record.gradient)
        root = _root(record) or "output"
        yield Finding(
            "custom-gradient",
            "info",
            f"backward was given `gradient=v` with v = `{vector}`: each leaf received the "
            f"vector-Jacobian product `vᵀ·∂{root}/∂leaf`, the gradient of `(v * {root}).sum()`, "
            f"not a gradient of `{root}` itself.",
            (root,) if _root(record) else (),
        )


@rule
def nonleaf_grad(recorder: Any) -> Iterator[Finding]:
    for name in recorder.nonleaf_grad_reads:
        leaves = [r.name for r in recorder.rows() if r.status in ("new", "accumulated")]
        instead = f", or read a leaf's instead ({listing(leaves)})" if leaves else ""
        yield Finding(
            "nonleaf-grad",
            "warning",
            f"`{name}.grad` was read, but `{name}` is not a leaf (it was computed from other "
            f"tensors): PyTorch keeps `.grad` only for leaves, so it returned None. Call "
            f"`{name}.retain_grad()` before `backward()` to keep it{instead}.",
            (name,),
        )


@rule
def double_backward(recorder: Any) -> Iterator[Finding]:
    for i, record in enumerate(recorder.records):
        if not (record.error and FREED_GRAPH_ERROR in record.error):
            continue
        earlier = [r for r in recorder.records[:i] if r.kind == "backward" and not r.error]
        where = (
            f"the earlier {_call(earlier[-1])} in this cell freed it"
            if earlier
            else "a backward before this cell freed it"
        )
        yield Finding(
            "double-backward",
            "error",
            f"{_call(record)} went through a graph a second time, but backward frees the graph's "
            f"saved tensors as it goes: {where}. Pass `retain_graph=True` to the first backward "
            f"only if two passes are meant (or add the losses and call backward once); otherwise "
            f"recompute the forward before each backward.",
            tuple(r for r in record.roots if r),
        )


@rule
def retain_graph(recorder: Any) -> Iterator[Finding]:
    kept = [r for r in recorder.records if r.retain_graph and r.kind == "backward" and not r.error]
    if not kept:
        return
    again = len([r for r in recorder.records if r.graph is not None and r.graph == kept[0].graph])
    yield Finding(
        "retain-graph",
        "info",
        f"{_call(kept[0])} used `retain_graph=True`: the graph and its saved tensors stay in memory "
        f"until nothing refers to them, and each backward through it adds to `.grad` again"
        f"{f' (it ran {again} times here)' if again > 1 else ''}.",
        tuple(r for r in kept[0].roots if r),
    )


@rule
def optimizer_step(recorder: Any) -> Iterator[Finding]:
    for step in recorder.optimizer_steps:
        # Only the tiniest tensors fit in a sentence; the step table holds the rest.
        tiny = [
            p for p in step.params if isinstance(p.after, torch.Tensor) and p.after.numel() <= 4
        ]
        moved = "; ".join(
            f"`{p.name}`: {stats.format_value(p.before)} → {stats.format_value(p.after)}"
            for p in tiny[:2]
        )
        detail = f": {moved}" if moved else ""
        count = "once" if step.steps == 1 else f"{step.steps} times"
        yield Finding(
            "optimizer-step",
            "info",
            f"`{step.title}` stepped {count}, updating {_plural(len(step.params), 'tensor')}"
            f"{detail} (the optimizer-step table shows every one).",
            tuple(p.name for p in step.params),
        )


@rule
def no_backward(recorder: Any) -> Iterator[Finding]:
    if not recorder.records:
        yield Finding(
            "no-backward",
            "info",
            "No backward ran in this cell: nothing reached the autograd engine.",
        )
