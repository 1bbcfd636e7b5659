"""`check=True`: the custom `autograd.Function`s a block's graphs ran, checked with
`torch.autograd.gradcheck` when the block ends.

The check never touches the user's tensors or random state: its inputs are fresh
float64 tensors of the recorded shapes, drawn under a forked RNG with a fixed seed,
and it runs with no recorder active and the user's dispatch modes popped. What it
can reproduce is only the tensors: a forward that takes other arguments, or a tensor
that did not require grad (its shape is not in the graph), is said not checked, and why.
"""

from __future__ import annotations

import inspect
import re
import sys
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.gradcheck import GradcheckError, gradcheck

from .. import _engine
from ..records import CustomCheck

# Inputs and outputs up to this many elements get a full Jacobian, element by element, to
# say where the backward disagrees; larger ones are checked with gradcheck's fast mode (one
# random direction). Past MOST_ELEMENTS a failing check would cost minutes (gradcheck then
# rebuilds the full Jacobians to show them): such Functions are not checked.
FULL_ELEMENTS = 64
MOST_ELEMENTS = 4096
_FAST = re.compile(r"with respect to input (\d+),\s*numerical:\s*(\S+)\s*analytical:\s*(\S+)")
LOW, HIGH = 0.2, 1.0  # inputs drawn uniformly in [LOW, HIGH): away from 0, where abs and relu bend
SEED = 0


@dataclass(frozen=True)
class CustomFunctionCall:
    """One custom Function node: its class and, per tensor input, (shape, device) or None
    for an input that did not require grad; `leaf_keys` the leaf rows fed straight in."""

    cls: type
    inputs: tuple[tuple[tuple[int, ...], str] | None, ...]
    leaf_keys: tuple[int | None, ...]


def custom_functions(
    live: dict[int, Any], leaf_key: Callable[[torch.Tensor], int | None] | None = None
) -> list[CustomFunctionCall]:
    """The custom Function nodes among a snapshot's live nodes (read before the engine
    runs: metadata only, no saved tensor)."""
    found = []
    for node in live.values():
        cls = _engine.custom_function_class(node)
        if cls is None:
            continue
        inputs: list[tuple[tuple[int, ...], str] | None] = []
        keys: list[int | None] = []
        for child, port in _engine.next_functions(node):
            if child is None:
                inputs.append(None)
                keys.append(None)
                continue
            sizes, devices = _engine.input_sizes(child), _engine.input_devices(child)
            try:
                inputs.append((tuple(int(d) for d in sizes[port]), devices[port]))
            except Exception:  # noqa: BLE001 - nested or symbolic: not reproducible
                inputs.append(None)
            key = None
            if leaf_key is not None and _engine.is_accumulate_grad(child):
                key = leaf_key(child.variable)
            keys.append(key)
        found.append(CustomFunctionCall(cls, tuple(inputs), tuple(keys)))
    return found


def function_name(cls: type) -> str:
    """`Outer.Square` as written; a class defined in a function is called by its own name."""
    name = getattr(cls, "__qualname__", None) or getattr(cls, "__name__", "Function")
    return name.rpartition("<locals>.")[2]


def _tensor_arguments(cls: type) -> int | None:
    """How many positional arguments `forward` takes after `ctx`, optional ones included:
    an optional one the call may have set cannot be told from its default (None: *args)."""
    try:
        params = list(inspect.signature(cls.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    uses_ctx = cls.setup_context is torch.autograd.Function.setup_context
    if uses_ctx and params:
        params = params[1:]
    return sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _outputs(result: Any) -> list[torch.Tensor]:
    items = result if isinstance(result, (tuple, list)) else (result,)
    return [t for t in items if isinstance(t, torch.Tensor) and t.dtype.is_floating_point]


def _jacobians(fn: Callable[..., Any], inputs: list[torch.Tensor], i: int) -> tuple:
    """(analytical, numerical) Jacobians of every output with respect to input `i`, as
    (output elements, input elements) matrices."""
    x = inputs[i]
    outs = _outputs(fn(*inputs))
    flat = torch.cat([o.reshape(-1) for o in outs])
    rows = []
    for k in range(flat.numel()):
        (g,) = torch.autograd.grad(flat[k], x, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros(x.numel(), dtype=x.dtype) if g is None else g.reshape(-1))
    analytical = torch.stack(rows) if rows else torch.zeros(0, x.numel(), dtype=x.dtype)
    eps = 1e-6
    columns = []
    with torch.no_grad():
        for j in range(x.numel()):
            moved = [t.detach().clone() for t in inputs]
            moved[i].view(-1)[j] += eps
            up = torch.cat([o.reshape(-1) for o in _outputs(fn(*moved))])
            moved[i].view(-1)[j] -= 2 * eps
            down = torch.cat([o.reshape(-1) for o in _outputs(fn(*moved))])
            columns.append((up - down) / (2 * eps))
    numerical = torch.stack(columns, dim=1)
    return analytical, numerical


def _where(shape: tuple[int, ...], index: int) -> tuple[int, ...]:
    out = []
    for d in reversed(shape):
        out.append(index % d if d else 0)
        index = index // d if d else 0
    return tuple(reversed(out))


def _check_one(call: CustomFunctionCall) -> CustomCheck:
    name = function_name(call.cls)
    shapes = tuple(s[0] if s is not None else None for s in call.inputs)
    check = CustomCheck(function=name, shapes=shapes, leaf_keys=call.leaf_keys)
    missing = [k for k, s in enumerate(call.inputs) if s is None]
    if missing:
        check.status = "not checked"
        check.reason = (
            f"its tensor input {missing[0]} did not require grad, so the graph does not "
            "record its shape and gradmagic cannot make one like it"
        )
        return check
    wanted = _tensor_arguments(call.cls)
    if wanted is not None and wanted != len(call.inputs):
        check.status = "not checked"
        check.reason = (
            f"its forward takes {wanted} argument{'s' if wanted != 1 else ''} and the graph "
            f"holds {len(call.inputs)} tensor{'s' if len(call.inputs) != 1 else ''}: the others "
            "(numbers, flags, objects) are not recorded, so gradmagic cannot call it again"
        )
        return check
    generator = torch.Generator().manual_seed(SEED)
    inputs = []
    for shape, device in call.inputs:  # type: ignore[misc]
        x = torch.rand(shape, dtype=torch.float64, generator=generator) * (HIGH - LOW) + LOW
        inputs.append(x.to(device).requires_grad_())
    numel = sum(x.numel() for x in inputs)
    if numel > MOST_ELEMENTS:
        check.status = "not checked"
        check.reason = (
            f"its inputs hold {numel:,} elements; finite differences over more than "
            f"{MOST_ELEMENTS:,} are too slow to run as a cell ends"
        )
        return check

    def fn(*xs: torch.Tensor) -> Any:
        return call.cls.apply(*xs)

    try:
        outs = _outputs(fn(*inputs))
    except Exception as exc:  # noqa: BLE001 - the user's forward: said, not raised
        check.status = "not checked"
        check.reason = f"its forward raised on float64 inputs: {_first_line(exc)}"
        return check
    if sum(o.numel() for o in outs) > MOST_ELEMENTS:
        check.status = "not checked"
        check.reason = (
            f"its outputs hold more than {MOST_ELEMENTS:,} elements; finite differences over "
            "them are too slow to run as a cell ends"
        )
        return check
    if not outs:
        check.status = "not checked"
        check.reason = "its forward returned no floating-point tensor on float64 inputs"
        return check
    try:
        again = _outputs(fn(*inputs))
        same = len(again) == len(outs) and all(torch.equal(a, b) for a, b in zip(outs, again))
    except Exception:  # noqa: BLE001 - a forward that raises the second time differs too
        same = False
    if not same:
        check.status = "not checked"
        check.reason = (
            "its forward gave different outputs on the same inputs (does it draw random "
            "numbers?), so finite differences cannot judge its backward"
        )
        return check
    small = numel <= FULL_ELEMENTS and sum(o.numel() for o in outs) <= FULL_ELEMENTS
    check.fast = not small
    try:
        gradcheck(fn, tuple(inputs), fast_mode=not small, raise_exception=True)
        check.status = "ok"
        return check
    except GradcheckError as exc:
        check.status = "mismatch"
        check.detail = _first_line(exc).removeprefix("GradcheckError: ").rstrip(",")
        found = _FAST.search(str(exc)) if not small else None
        if found:
            try:
                check.numerical, check.analytical = float(found[2]), float(found[3])
                check.input = int(found[1])
                check.gap = abs(check.numerical - check.analytical)
            except ValueError:
                check.input = None
    except Exception as exc:  # noqa: BLE001 - the user's backward raised
        check.status = "mismatch"
        check.detail = f"its backward raised {_first_line(exc)}"
        return check
    if small:
        _locate(check, fn, inputs)
    return check


def _locate(check: CustomCheck, fn: Callable[..., Any], inputs: list[torch.Tensor]) -> None:
    """Which input disagrees most, where, and by how much."""
    worst = None
    for i, x in enumerate(inputs):
        analytical, numerical = _jacobians(fn, inputs, i)
        if analytical.numel() == 0:
            continue
        diff = (analytical - numerical).abs()
        k = int(diff.argmax())
        out_k, in_k = divmod(k, x.numel())
        gap = float(diff.reshape(-1)[k])
        if worst is None or gap > worst[0]:
            a, n = float(analytical.reshape(-1)[k]), float(numerical.reshape(-1)[k])
            worst = (gap, i, _where(tuple(x.shape), in_k), out_k, a, n)
    if worst is not None and worst[0] > 0:
        check.gap, check.input, check.element, check.output_element = worst[:4]
        check.analytical, check.numerical = worst[4], worst[5]


class _unseen_warnings:  # noqa: N801 - used as `with _unseen_warnings():`, like a function
    """Warnings given while the check runs are not shown, and leave no trace: the filters
    are not touched (changing them makes Python forget which warnings it has shown), and
    the once-per-location registries are put back as they were, so a warning the user's
    code gives later shows exactly as it would have."""

    def __enter__(self) -> None:
        self._registries = {
            name: dict(registry) for name, registry in self._each_registry() if registry
        }
        self._once = dict(warnings.onceregistry)  # type: ignore[attr-defined]
        self._show = warnings._showwarnmsg  # type: ignore[attr-defined]
        warnings._showwarnmsg = _drop  # type: ignore[attr-defined]

    def __exit__(self, *exc: object) -> None:
        warnings._showwarnmsg = self._show  # type: ignore[attr-defined]
        for name, registry in self._each_registry():
            registry.clear()
            registry.update(self._registries.get(name, {}))
        warnings.onceregistry.clear()  # type: ignore[attr-defined]
        warnings.onceregistry.update(self._once)  # type: ignore[attr-defined]

    @staticmethod
    def _each_registry() -> list[tuple[str, dict]]:
        # A module's own dictionary, never getattr: a lazy module's __getattr__ is code.
        found = []
        for name, module in list(sys.modules.items()):
            if isinstance(module, types.ModuleType):
                registry = module.__dict__.get("__warningregistry__")
                if isinstance(registry, dict):
                    found.append((name, registry))
        return found


def _drop(message: Any) -> None:
    return None


def check_functions(calls: list[CustomFunctionCall]) -> list[CustomCheck]:
    """gradcheck every distinct (Function, input shapes) among `calls`.

    Runs with no recorder active, the user's dispatch modes popped, grad mode on, the
    RNG forked (CPU and every CUDA device already initialised) and its warnings unseen
    (`_unseen_warnings`).
    """
    from .recorder import ACTIVE

    distinct = list(dict.fromkeys(calls))
    if not distinct:
        return []
    out = []
    held, ACTIVE[:] = list(ACTIVE), []
    devices = (
        list(range(torch.cuda.device_count()))
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else []
    )
    try:
        with (
            _engine.quiet(),
            _engine.without_saved_tensor_hooks(),
            torch.random.fork_rng(devices=devices),
            torch.enable_grad(),
            _unseen_warnings(),
        ):
            for call in distinct:
                started = time.perf_counter()
                check = _check_one(call)
                check.seconds = time.perf_counter() - started
                out.append(check)
    finally:
        ACTIVE[:] = held
    return out
