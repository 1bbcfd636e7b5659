"""NaN and Inf, and gradients that vanish or explode, read on the values put to use."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import stats
from ..graph.data import flow_text
from ..records import BlockRecord, LeafRecord, rows
from ._base import Finding, listing, plural, rule, sci, used_value

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


def _nonfinite_counts(value: Any) -> tuple[int, int] | None:
    if isinstance(value, torch.Tensor):
        v, _ = stats.computable(value)
        if v is None:
            return None
        v = v.abs() if v.is_complex() else v.float()
        return int(torch.isnan(v).sum()), int(torch.isinf(v).sum())
    if isinstance(value, stats.TensorSummary) and value.nan is not None:
        return value.nan, value.inf or 0
    return None


def _first_nonfinite_op(block: BlockRecord) -> Any:
    """The graph node whose backward first produced a NaN or Inf gradient."""
    for record in block.backwards:
        snap = record.graph
        nid = snap.first_nonfinite_node if snap is not None else None
        if nid is not None:
            return snap.nodes[nid]
    return None


def _forward_origin(block: BlockRecord) -> tuple[Any, ...] | None:
    """The first op whose forward output a variable held non-finite as the backward began."""
    for record in block.backwards:
        origin = record.graph.forward_origin if record.graph is not None else None
        if origin is not None:
            return origin
    return None


def at_line(node: Any) -> str:
    """` at line 3: `q = torch.log(p)`` for a node whose line is known, else ""."""
    if not node.line:
        return ""
    return f" at {node.line}: `{node.code}`" if node.code else f" at {node.line}"


def forward_origin_text(origin: tuple[Any, ...], block: BlockRecord) -> str:
    """`the forward value was already -inf at line 2: `q = torch.log(p)` with `p` = [0., 1.]
    (...)`."""
    made, variable, what, inputs = origin
    where = at_line(made) or f" in `{made.op}`"
    names = {r.key: r.name for r in block.leaves}
    given = [f"`{names[key]}` = {flow_text(value)}" for key, value in inputs if names.get(key)]
    with_ = f" with {' and '.join(given)}" if given else ""
    return (
        f"the forward value was already {what}{where}{with_} (`{variable}` held {what} when "
        f"backward ran)"
    )


def backward_text(node: Any, made: Any, general: bool = False) -> str:
    """Which op's backward first sent a NaN or Inf, where, and what likely did it."""
    cause = NONFINITE_CAUSES.get(re.sub(r"Backward\d*$", "", node.op))
    where = " there" if made is not None and node.id == made.id else at_line(node)
    text = f"the first non-finite gradient came out of `{node.op}`{where}"
    if cause:
        return f"{text}: likely {cause}"
    if general:
        return f"{text}: look at its inputs (a forward value that is already NaN or Inf gives one)"
    return text


@rule
def nan_inf(block: BlockRecord) -> Iterator[Finding]:
    bad = [r for r in rows(block) if r.status == "nan/inf"]
    if not bad:
        return
    parts = []
    for r in bad[:4]:
        nan, inf = _nonfinite_counts(r.after) or (None, None)
        what = " and ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "Inf")) if n)
        value = r.after
        if isinstance(value, stats.TensorSummary) and value.part:  # counted in this rank's part
            of = f"of the {plural(value.numel, 'element')} of {value.note.partition(' (')[0]}"
        else:
            of = f"of {plural(r.numel, 'element')}"
        parts.append(f"`{r.name}.grad` has {what or 'NaN or Inf'} ({of})")
    if len(bad) > 4:
        parts.append(f"{len(bad) - 4} more leaves too")
    node = _first_nonfinite_op(block)
    origin = _forward_origin(block)
    if origin is not None and (node is None or (origin[0].seq or 0) <= (node.seq or 0)):
        # A variable held the op's output non-finite, and that op ran in the forward no later
        # than the one whose backward first sent NaN/Inf: the forward value is where it began.
        why = forward_origin_text(origin, block)
        if node is not None:
            why += f"; {backward_text(node, origin[0])}"
    elif node is not None:
        why = backward_text(node, None, general=True)
    else:
        why = (
            f"an operation between the loss and {'it' if len(bad) == 1 else 'them'} produced a "
            f"non-finite gradient (log or division of 0, sqrt at 0, or overflow)"
        )
    severity, guarded = "error", ""
    skipped = [e for e in block.events if e.what == "scaler_step" and e.skipped]
    if skipped and not any(r.stepped for r in bad):
        # A GradScaler saw them and skipped the step: the parameters were kept safe.
        severity = "warning"
        guarded = f" {skipped[-1].text} skipped the step that would have used them."
    yield Finding(
        "nan-inf", severity, f"{'; '.join(parts)}: {why}.{guarded}", tuple(r.name for r in bad)
    )


_VIEWS = ("View", "Reshape", "Expand", "Squeeze", "Unsqueeze", "Permute", "Transpose", "TBackward")


def _feeds_batchnorm(snap: Any, into: dict[int, list[int]], nid: int, hops: int = 4) -> bool:
    """Whether every use of node `nid` reaches a BatchNorm, through view ops only."""
    nexts = into.get(nid, [])
    if not nexts or hops == 0:
        return False
    for dst in nexts:
        op = snap.nodes[dst].op
        if "BatchNorm" in op:
            continue
        if not (any(v in op for v in _VIEWS) and _feeds_batchnorm(snap, into, dst, hops - 1)):
            return False
    return True


def _before_batchnorm(block: BlockRecord) -> set[int]:
    """Keys of the leaves every use of which feeds a BatchNorm (through view ops): a bias
    there is cancelled by the batch mean, and its gradient is zero up to rounding."""
    keys: set[int] = set()
    for record in block.backwards:
        snap = record.graph
        if snap is None or snap.folded:
            continue
        into: dict[int, list[int]] = {}
        for e in snap.edges:
            into.setdefault(e.src, []).append(e.dst)
        for n in snap.nodes:
            if n.kind == "leaf" and n.leaf_key is not None:
                users = into.get(n.id, [])
                if users and all(_feeds_batchnorm(snap, into, u) for u in users):
                    keys.add(n.leaf_key)
    return keys


@dataclass
class _Layer:
    """A module's own parameters (`model.3`): their joint gradient norm and row names."""

    name: str
    norm: float = 0.0
    rows: list[str] = field(default_factory=list)


def _loss_scale(block: BlockRecord) -> float | None:
    """The GradScaler scale still in the gradients: backwards of a scaled loss and no
    unscale after them."""
    scales = {r.loss_scale for r in block.backwards if r.kind == "backward" and r.error is None}
    if len(scales) != 1 or None in scales:
        return None
    if any(e.what == "unscale" for e in block.events):
        return None
    return scales.pop()


def _norms(rows_: list[LeafRecord], scale: float | None) -> dict[int, float]:
    """Finite norms of the gradients as put to use, by row key (a loss scale divided out)."""
    out = {}
    for r in rows_:
        value = used_value(r)
        if isinstance(value, torch.Tensor):
            norm = stats.norm_of(value)
        elif isinstance(value, stats.TensorSummary) and value.part:
            norm = None  # one rank's shard: no norm of the whole gradient to compare
        else:
            norm = value.norm if isinstance(value, stats.TensorSummary) else None
        if norm is not None and math.isfinite(norm):
            out[r.key] = norm / scale if scale else norm
    return out


@rule
def vanishing_exploding(block: BlockRecord) -> Iterator[Finding]:
    options = block.options
    shown = [r for r in rows(block) if r.status in ("new", "accumulated")]
    scale = _loss_scale(block)
    norms = _norms(shown, scale)
    unscaled = f" (the GradScaler's ×{scale:g} divided out)" if scale else ""
    covered: set[str] = set()
    for module in block.modules:
        layers: dict[str, _Layer] = {}
        for r in sorted((r for r in shown if r.owner == module.name), key=lambda r: r.order):
            if r.key in norms and r.layer:
                layer = layers.setdefault(r.layer, _Layer(r.layer))
                layer.norm = math.hypot(layer.norm, norms[r.key])
                layer.rows.append(r.name)
        nonzero = [layer for layer in layers.values() if layer.norm > 0]
        if len(nonzero) < 2:
            continue
        low = min(nonzero, key=lambda layer: layer.norm)
        high = max(nonzero, key=lambda layer: layer.norm)
        if high.norm / low.norm <= options.ratio:
            continue
        covered.update(name for layer in nonzero for name in layer.rows)
        both = f"(‖g‖ {sci(low.norm)} vs {sci(high.norm)}{unscaled})"
        if nonzero.index(low) < nonzero.index(high):
            through = (
                f"through {plural(module.saturating, 'saturating activation')} "
                f"(a sigmoid scales gradients by at most 0.25)"
                if module.saturating
                else "through many layers"
            )
            yield Finding(
                "vanishing",
                "warning",
                f"`{low.name}` gradients are {sci(low.norm / high.norm)} of `{high.name}`'s "
                f"{both}: they vanish on the way back {through}; try ReLU-family activations, "
                f"normalisation or residual connections.",
                tuple(low.rows + high.rows),
            )
        else:
            yield Finding(
                "exploding",
                "warning",
                f"`{high.name}` gradients are {sci(high.norm / low.norm)} times `{low.name}`'s "
                f"{both}: they grow on the way back; try gradient clipping "
                f"(`torch.nn.utils.clip_grad_norm_`), a smaller initialisation or normalisation.",
                tuple(high.rows + low.rows),
            )
    small, large, cancelled = [], [], []
    tiny = any(0 < n < options.vanish for n in norms.values())
    before_batchnorm = _before_batchnorm(block) if tiny else set()
    for r in shown:
        n = norms.get(r.key)
        if r.name in covered or n is None:
            continue
        if n < options.vanish and r.key in before_batchnorm:
            cancelled.append((r.name, n))
        elif 0 < n < options.vanish:
            small.append((r.name, n))
        elif n > options.explode:
            large.append((r.name, n))
    if cancelled:
        names = [n for n, _ in cancelled]
        yield Finding(
            "before-batchnorm",
            "info",
            f"{listing(names)} feed{'s' if len(names) == 1 else ''} a BatchNorm, which "
            f"subtracts the batch mean of what {'it adds' if len(names) == 1 else 'they add'}: "
            f"the loss does not depend on {'it' if len(names) == 1 else 'them'}, so the "
            f"gradient is zero up to rounding (norm "
            f"{', '.join(sci(n) for _, n in cancelled[:4])}). A layer followed by BatchNorm "
            f"is usually built with `bias=False`.",
            tuple(names),
        )
    if small:
        yield Finding(
            "vanishing",
            "warning",
            f"{listing([n for n, _ in small])} got gradients of norm "
            f"{', '.join(sci(n) for _, n in small[:4])}{unscaled}, below {sci(options.vanish)}: "
            f"too small to move {'it' if len(small) == 1 else 'them'} (saturated activations, "
            f"a tiny loss scale, or a long chain of small factors).",
            tuple(n for n, _ in small),
        )
    if large:
        yield Finding(
            "exploding",
            "warning",
            f"{listing([n for n, _ in large])} got gradients of norm "
            f"{', '.join(sci(n) for _, n in large[:4])}{unscaled}, above {sci(options.explode)}: "
            f"one step could throw {'it' if len(large) == 1 else 'them'} far (clip with "
            f"`torch.nn.utils.clip_grad_norm_`, lower the learning rate, or check the loss scale).",
            tuple(n for n, _ in large),
        )
