"""What the runner's hidden cell runs in the kernel after each target cell.

`emit(cell, repeat)` prints one line: `LINE_PREFIX` and a JSON object with the
truth recorder's record of the cell, a fingerprint of every tensor the user's
namespace reaches, and the results of `extra_checks`.

A later checker plugs in by appending to `extra_checks` in the kernel (the
runner's `extra_setup` code can do it): each callable gets the namespace and
`truth.last_cell` and returns something JSON-serialisable, reported under its
`__name__` in the line's "extra" object. The list is empty here.
"""

from __future__ import annotations

import hashlib
import json
import sys
import traceback
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from . import truth

LINE_PREFIX = "@@corpus-probe@@ "
HIDDEN_CELL_MARKER = truth.HIDDEN_CELL_MARKER

extra_checks: list[Callable[[Mapping[str, Any], Any], Any]] = []

_SKIP_NAMES = {"In", "Out", "exit", "quit", "get_ipython"}
_MAX_DEPTH = 3
# Keyed by id(optimizer): the keys differ from run to run.
_SKIP_ATTRS = {"_per_optimizer_states"}
_CONTAINERS = (torch.Tensor, nn.Module, torch.optim.Optimizer, list, tuple, Mapping)
_MAX_ITEMS = 1000


def hidden_cell(cell: int, repeat: int) -> str:
    """The code of the hidden cell the runner runs after a target cell."""
    return (
        f"{HIDDEN_CELL_MARKER}\n"
        f"__import__('tests.corpus.probe', fromlist=['emit']).emit({cell}, {repeat})\n"
    )


def tensor_fingerprint(t: torch.Tensor) -> dict[str, Any]:
    """sha256 of the raw bytes, dtype, shape, and how autograd sees the tensor."""
    out: dict[str, Any] = {
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": list(t.shape),
        "requires_grad": t.requires_grad,
        "grad_fn": None if t.grad_fn is None else type(t.grad_fn).__name__,
    }
    try:
        out["sha256"] = hashlib.sha256(truth.raw_bytes(t)).hexdigest()
    except Exception as exc:  # noqa: BLE001 - a tensor kind without plain bytes
        out["sha256"] = f"unreadable: {type(exc).__name__}"
    return out


def _scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str, type(None))) or (
        isinstance(value, (list, tuple))
        and len(value) <= 64
        and all(isinstance(v, (bool, int, float, str, type(None))) for v in value)
    )


def _tensor_entries(name: str, t: torch.Tensor) -> Iterator[tuple[str, Any]]:
    yield name, tensor_fingerprint(t)
    if t.requires_grad and (t.is_leaf or t.retains_grad):
        g = t.grad
        yield f"{name}.grad", None if g is None else tensor_fingerprint(g)


def _module_entries(name: str, module: nn.Module) -> Iterator[tuple[str, Any]]:
    for pname, p in module.named_parameters(remove_duplicate=False):
        yield from _tensor_entries(f"{name}.{pname}", p)
    for bname, b in module.named_buffers(remove_duplicate=False):
        yield f"{name}.{bname}", tensor_fingerprint(b)
    yield f"{name}.<training>", {"repr": repr(module.training)}


def _optimizer_entries(name: str, opt: torch.optim.Optimizer) -> Iterator[tuple[str, Any]]:
    index: dict[int, int] = {}
    for gi, group in enumerate(opt.param_groups):
        for p in group["params"]:
            index.setdefault(id(p), len(index))
        for key, value in group.items():
            if key != "params" and _scalar(value):
                yield f"{name}.param_groups[{gi}][{key!r}]", {"repr": repr(value)}
    for p, state in list(opt.state.items()):
        where = f"{name}.state[{index.get(id(p), '?')}]"
        items = state.items() if isinstance(state, Mapping) else [("", state)]
        for key, value in items:
            yield from _value_entries(f"{where}[{key!r}]", value, _MAX_DEPTH - 1)


def _value_entries(name: str, value: Any, depth: int) -> Iterator[tuple[str, Any]]:
    if isinstance(value, torch.Tensor):
        yield from _tensor_entries(name, value)
    elif isinstance(value, nn.Module):
        yield from _module_entries(name, value)
    elif isinstance(value, torch.optim.Optimizer):
        yield from _optimizer_entries(name, value)
    elif depth <= 0:
        return
    elif isinstance(value, (list, tuple)):
        if any(isinstance(v, (torch.Tensor, nn.Module)) for v in value[:_MAX_ITEMS]):
            for i, item in enumerate(value[:_MAX_ITEMS]):
                yield from _value_entries(f"{name}[{i}]", item, depth - 1)
    elif isinstance(value, Mapping):
        for key, item in list(value.items())[:_MAX_ITEMS]:
            if isinstance(key, (str, int)):
                yield from _value_entries(f"{name}[{key!r}]", item, depth - 1)
    elif _stateful(value):
        for attr, item in list(vars(value).items()):
            if attr in _SKIP_ATTRS:
                continue
            if isinstance(item, _CONTAINERS):
                yield from _value_entries(f"{name}.{attr}", item, depth - 1)
            elif _scalar(item):
                yield f"{name}.{attr}", {"repr": repr(item)}


def _stateful(value: Any) -> bool:
    """Objects whose attributes are training state: the user's own classes, gradient
    scalers and learning-rate schedulers."""
    if isinstance(value, (types.ModuleType, types.FunctionType, type)):
        return False
    if not hasattr(value, "__dict__"):
        return False
    if type(value).__module__ == "__main__":
        return True
    from torch.amp import GradScaler
    from torch.optim.lr_scheduler import LRScheduler

    return isinstance(value, (GradScaler, LRScheduler))


def fingerprint(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """Name -> fingerprint of every tensor the namespace reaches: plain tensors, module
    parameters, buffers and their `.grad`, optimizer state, tensors in lists, dicts and
    the user's objects; plus the random number generators' states and global settings.

    A tensor's entry is {"dtype", "shape", "requires_grad", "grad_fn" (type name or
    null), "sha256" (of its raw bytes)}; `NAME.grad` holds its gradient's entry, or null;
    hyperparameters and other plain values are {"repr": ...}; "<torch rng>",
    "<python random>" and "<numpy random>" are sha256 digests; "<global state>" is a
    dict (grad mode, autocast, the engine entry point, global hook counts, ...).
    """
    out: dict[str, Any] = {}
    for name, value in list(namespace.items()):
        if name.startswith("_") or name in _SKIP_NAMES:
            continue
        for key, entry in _value_entries(name, value, _MAX_DEPTH):
            out.setdefault(key, entry)
    out["<global state>"] = global_state()
    out["<torch rng>"] = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
    rnd = sys.modules.get("random")
    if rnd is not None:
        out["<python random>"] = hashlib.sha256(repr(rnd.getstate()).encode()).hexdigest()
    np = sys.modules.get("numpy")
    if np is not None:
        state = np.random.get_state()
        out["<numpy random>"] = hashlib.sha256(repr(state[1].tolist()).encode()).hexdigest()
    return out


def global_state() -> dict[str, Any]:
    """Process-wide settings a watching tool could leave changed after a cell."""
    import torch.autograd.graph as graph
    from torch.nn.modules import module as nn_module
    from torch.optim import optimizer as optim_module

    engine = graph._engine_run_backward
    return {
        "grad_enabled": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "autocast_cpu": torch.is_autocast_enabled("cpu"),
        "default_dtype": str(torch.get_default_dtype()),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "anomaly_mode": torch.is_anomaly_enabled(),
        "profile_function": sys.getprofile() is not None,
        "engine": f"{engine.__module__}.{engine.__qualname__}",
        "engine_in_autograd": torch.autograd._engine_run_backward is engine,
        "tensor_backward": torch.Tensor.backward.__module__,
        "global_optimizer_hooks": [
            len(optim_module._global_optimizer_pre_hooks),
            len(optim_module._global_optimizer_post_hooks),
        ],
        "global_module_hooks": [
            len(nn_module._global_forward_pre_hooks),
            len(nn_module._global_forward_hooks),
            len(nn_module._global_backward_pre_hooks),
            len(nn_module._global_backward_hooks),
        ],
    }


def payload(cell: int, repeat: int, namespace: Mapping[str, Any]) -> dict[str, Any]:
    record = truth.last_cell
    extra: dict[str, Any] = {}
    for check in extra_checks:
        name = getattr(check, "__name__", repr(check))
        try:
            extra[name] = check(namespace, record)
        except Exception:  # noqa: BLE001 - reported, the other checks still run
            extra[name] = {"error": traceback.format_exc(limit=5)}
    return {
        "cell": cell,
        "repeat": repeat,
        "truth": None if record is None else record.to_json(),
        "fingerprint": fingerprint(namespace),
        "extra": extra,
    }


def emit(cell: int, repeat: int) -> None:
    """Print the probe line for the cell that just ran (in the kernel)."""
    from IPython import get_ipython

    shell = get_ipython()
    namespace = shell.user_ns if shell is not None else {}
    line = json.dumps(payload(cell, repeat, namespace), allow_nan=False, separators=(",", ":"))
    sys.stdout.write(LINE_PREFIX + line + "\n")
    sys.stdout.flush()
