"""The backward, step by step: what each op of a small graph received, its local
derivative, and what it sent to each input, in the order the engine ran them.

Read from a snapshot's flow (`flow_in`, `flow_order`, recorded by node pre-hooks) and
the non-tensor values the ops saved (exponents, alphas, sizes): no saved tensor is
read. Where a derivative needs one (the other factor of a product, `x` in `1/x`),
the words say what it is and the numbers are read from what flowed: what an op sent
along an edge divided by what it received, element by element. That is what the
engine did, not a derivative computed anew.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..stats import flat_list
from .data import GraphSnapshot, flow_text

_SUPERSCRIPT = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")


@dataclass
class Sent:
    """What one op sent along one edge."""

    to: str  # the input it went to: an op's name or a leaf's
    value: str  # "" where it cannot be told apart from what other edges sent there
    local: str  # the local derivative along this edge, in numbers ("" unknown)
    read: bool = False  # `local` was read from the numbers (sent ÷ received)
    shared: int = 1  # edges whose gradients the input received summed
    missing: str = ""  # why `value` is empty


@dataclass
class BackwardStep:
    """One op as the engine ran it."""

    number: int  # 1 for the first op the engine ran
    op: str  # `PowBackward0`, or `AccumulateGrad` for a leaf
    received: str
    derivative: str  # the local derivative in words ("" for ops not described)
    sent: list[Sent] = field(default_factory=list)
    leaf: str = ""  # for AccumulateGrad: the leaf's name


@dataclass
class ChainRule:
    """A leaf's gradient as the product of the local derivatives along its path."""

    leaf: str
    text: str  # `a.grad = [36., 81.] = [1., 1.] · 1 · [3., 3.] · [12., 27.]`
    factors: list[tuple[str, str]] = field(default_factory=list)  # (op, factor)


@dataclass
class BackwardSteps:
    """The steps of one backward's graph, and the chain rule for each leaf."""

    steps: list[BackwardStep]
    chains: list[ChainRule]
    repeat: int = 1  # backwards that ran this graph in the block: the numbers are the first's


def _number(x: float) -> str:
    if float(x).is_integer() and abs(x) < 1e8:
        return f"{int(x)}"
    return f"{x:.6g}"


def _power(exponent: Any) -> str:
    """`3·a²` for exponent 3: the derivative of a**exponent."""
    try:
        e = float(exponent)
    except (TypeError, ValueError):
        return "exponent·a^(exponent−1)"
    if e == 0:
        return "0"
    if e == 1:
        return "1"
    if e == 2:
        return "2·a"
    lower = e - 1
    if lower.is_integer():
        return f"{_number(e)}·a{_number(lower).translate(_SUPERSCRIPT)}"
    return f"{_number(e)}·a^{_number(lower)}"


def _saved(node: Any) -> dict[str, Any]:
    return dict(node.saved_values)


def _numel(size: Any) -> int | None:
    try:
        return math.prod(int(d) for d in size)
    except (TypeError, ValueError):
        return None


def derivative_words(op: str, saved: dict[str, Any], slot: int, n: int | None) -> str:
    """The local derivative of an op with respect to its input `slot`, in words.

    `n` is the number of elements of that input, where known.
    """
    alpha = saved.get("alpha", 1)
    if op == "PowBackward0":
        return _power(saved.get("exponent"))
    if op == "PowBackward1":
        return ("b·a^(b−1)", "a^b·ln(a)")[min(slot, 1)]
    if op == "MulBackward0":
        return "the other factor"
    if op == "MulBackward1":
        return _number(saved["other"]) if "other" in saved else "the number multiplied by"
    if op in ("AddBackward0", "AddBackward1"):
        return "1" if slot == 0 or alpha == 1 else f"α = {_number(alpha)}"
    if op == "SubBackward0":
        return "1" if slot == 0 else f"−{_number(alpha)}"
    if op == "SubBackward1":
        return "1"
    if op == "SumBackward0":
        return "1 for every element (the gradient is copied to the input's shape)"
    if op == "MeanBackward0":
        count = _numel(saved["self"]) if "self" in saved else n
        return f"1/N, N = {count}" if count else "1/N"
    if op == "AbsBackward0":
        return "sign(x)"
    if op in ("SgnBackward0", "SignBackward0"):
        return "0 (the sign is flat everywhere but at 0)"
    if op == "MseLossBackward0":
        reduction = saved.get("reduction", 1)
        sign = "" if slot == 0 else "−"
        if reduction == 1:
            return f"{sign}2·(x − y)/N" + (f", N = {n}" if n else "")
        return f"{sign}2·(x − y)"
    if op == "DivBackward0":
        return ("1/b", "−a/b²")[min(slot, 1)]
    if op == "DivBackward1":
        return f"1/{_number(saved['other'])}" if "other" in saved else "1/the divisor"
    if op == "ExpBackward0":
        return "exp(x), the op's own output"
    if op == "LogBackward0":
        return "1/x"
    if op == "ReluBackward0":
        return "1 where the output is > 0, else 0"
    if op == "NegBackward0":
        return "−1"
    if op == "MvBackward0":
        return ("the gradient ⊗ the vector", "the matrixᵀ · the gradient")[min(slot, 1)]
    if op == "MmBackward0":
        return ("the gradient · bᵀ", "aᵀ · the gradient")[min(slot, 1)]
    if op in ("ViewBackward0", "ReshapeAliasBackward0", "UnsqueezeBackward0", "SqueezeBackward0"):
        return "1 (the gradient is reshaped back)"
    if op == "ExpandBackward0":
        return "1, summed over the expanded dimensions"
    if op in ("TBackward0", "TransposeBackward0", "PermuteBackward0"):
        return "1 (the gradient is transposed back)"
    return ""


def _exact_factor(op: str, saved: dict[str, Any], slot: int) -> str | None:
    """The local derivative as a number, where the op's non-tensor values give it."""
    alpha = saved.get("alpha", 1)
    if op in ("AddBackward0", "AddBackward1"):
        return "1" if slot == 0 else _number(alpha)
    if op == "SubBackward0":
        return "1" if slot == 0 else _number(-alpha)
    if op in ("SubBackward1", "SumBackward0"):
        return "1"
    if op == "NegBackward0":
        return "-1"
    if op == "MeanBackward0" and "self" in saved:
        count = _numel(saved["self"])
        return f"1/{count}" if count else None
    if op == "MulBackward1" and "other" in saved:
        return _number(saved["other"])
    if op == "DivBackward1" and "other" in saved:
        return f"1/{_number(saved['other'])}"
    return None


def _numbers(value: Any) -> list[float] | None:
    if value is None or isinstance(value, tuple):
        return None
    flat = flat_list(value)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
        return None
    return [float(v) for v in flat]


def _ratio(received: Any, sent: Any) -> str:
    """sent ÷ received, element by element, where the shapes allow it and nothing is 0."""
    r, s = _numbers(received), _numbers(sent)
    if not r or not s or any(v == 0 or not math.isfinite(v) for v in r):
        return ""
    if len(r) == len(s):
        ratios = [b / a for a, b in zip(r, s)]
    elif len(r) == 1:
        ratios = [b / r[0] for b in s]
    else:
        return ""
    if not all(math.isfinite(v) for v in ratios):
        return ""
    if len(ratios) > 1 and len(set(ratios)) == 1:
        ratios = ratios[:1]  # the same factor for every element
    return flow_text(ratios[0] if len(ratios) == 1 else ratios)


def backward_steps(
    snap: GraphSnapshot,
    leaf_name: Callable[[int | None], str],
    fresh: Callable[[int | None], bool] = lambda key: True,
    kind: str = "backward",
) -> BackwardSteps | None:
    """The steps of a snapshot whose flow was recorded (None where it was not).

    `leaf_name` names a leaf by its key; `fresh` says whether the leaf's `.grad` was
    empty before this backward (its chain rule reads `a.grad = ...`, else `a.grad += ...`).
    `kind` is the engine call's: a `torch.autograd.grad` call (`"grad"`) runs no
    AccumulateGrad, and what reaches its inputs is returned, not recorded here.
    """
    if not snap.flow_order or snap.folded:
        return None
    fan_in: dict[tuple[int, int], int] = {}
    out_edges: dict[int, list[Any]] = {}
    for e in snap.edges:
        fan_in[(e.src, e.port)] = fan_in.get((e.src, e.port), 0) + 1
        out_edges.setdefault(e.dst, []).append(e)

    def label(nid: int) -> str:
        node = snap.nodes[nid]
        return f"`{leaf_name(node.leaf_key)}`" if node.kind == "leaf" else node.op

    def received(nid: int) -> Any:
        ports = sorted(port for n, port in snap.flow_in if n == nid)
        if len(ports) == 1:
            return snap.flow_in[(nid, ports[0])]
        return [snap.flow_in[(nid, p)] for p in ports] if ports else None

    # (node, slot) -> (local factor text, read from the numbers)
    factors: dict[tuple[int, int], tuple[str, bool]] = {}
    steps = []
    for number, nid in enumerate(dict.fromkeys(snap.flow_order), start=1):
        node = snap.nodes[nid]
        got = received(nid)
        got_text = flow_text(got) if got is not None else ""
        if node.kind == "leaf":
            name = leaf_name(node.leaf_key)
            steps.append(
                BackwardStep(
                    number,
                    "AccumulateGrad",
                    got_text,
                    f"adds what it received to `{name}.grad`",
                    leaf=name,
                )
            )
            continue
        saved = _saved(node)
        words: dict[int, str] = {}
        sent = []
        for e in sorted(out_edges.get(nid, []), key=lambda e: e.slot):
            n = _numel(e.size) if e.size is not None else None
            phrase = derivative_words(node.op, saved, e.slot, n)
            if node.function:
                phrase = f"what `{node.function}.backward` computes (your code)"
            if phrase:
                words[e.slot] = phrase
            shared = fan_in[(e.src, e.port)]
            value = snap.flow_in.get((e.src, e.port)) if shared == 1 else None
            exact = _exact_factor(node.op, saved, e.slot)
            local, read = (exact, False) if exact is not None else (_ratio(got, value), True)
            factors[(nid, e.slot)] = (local, read and bool(local))
            missing = ""
            if value is None:
                if shared > 1:
                    missing = f"summed there with {shared - 1} more"
                elif kind == "grad" and snap.nodes[e.src].kind == "leaf":
                    missing = "returned by `torch.autograd.grad`"
                else:
                    missing = "not recorded"
            sent.append(
                Sent(
                    label(e.src),
                    flow_text(value) if value is not None else "",
                    local,
                    read and bool(local),
                    shared,
                    missing,
                )
            )
        if len(set(words.values())) > 1:
            said = "; ".join(f"input {slot}: {w}" for slot, w in words.items())
        else:
            said = next(iter(words.values()), "")
        steps.append(BackwardStep(number, node.op, got_text, said, sent))
    return BackwardSteps(steps, _chains(snap, received, factors, leaf_name, fresh))


def _chains(
    snap: GraphSnapshot,
    received: Callable[[int], Any],
    factors: dict[tuple[int, int], tuple[str, bool]],
    leaf_name: Callable[[int | None], str],
    fresh: Callable[[int | None], bool],
) -> list[ChainRule]:
    """For each leaf reached along one path: its gradient as seed × local derivatives."""
    into: dict[int, list[Any]] = {}  # node -> the edges that feed it gradients
    for e in snap.edges:
        into.setdefault(e.src, []).append(e)
    chains = []
    roots = set(snap.roots)
    for node in snap.nodes:
        if node.kind != "leaf":
            continue
        path = []  # edges from the leaf up to a root
        nid = node.id
        while nid not in roots:
            edges = into.get(nid, [])
            if len(edges) != 1:
                break
            path.append(edges[0])
            nid = edges[0].dst
        name = leaf_name(node.leaf_key)
        value = received(node.id)
        if value is None:
            continue
        sign = "=" if fresh(node.leaf_key) else "+="
        head = f"{name}.grad {sign} {flow_text(value)}"
        if nid not in roots or into.get(nid):
            count = len(into.get(node.id, []))
            how = f"{count} edges into it" if count > 1 else "more than one path"
            chains.append(ChainRule(name, f"{head}: the sum of what reached it along {how}"))
            continue
        seed = received(nid)
        parts = [("seed", flow_text(seed) if seed is not None else "?")]
        for e in reversed(path):
            op = snap.nodes[e.dst].op
            local, _ = factors.get((e.dst, e.slot), ("", False))
            words = derivative_words(op, _saved(snap.nodes[e.dst]), e.slot, None)
            parts.append((op, local or f"({op}: {words or 'its local derivative'})"))
        chains.append(ChainRule(name, f"{head} = " + " · ".join(f for _, f in parts), parts))
    return chains
