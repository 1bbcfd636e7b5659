"""The one module that touches private PyTorch API.

Every Python entry into the autograd engine (`Tensor.backward`,
`torch.autograd.backward`, `torch.autograd.grad`) ends in
`_engine_run_backward`, bound under two names. gradmagic wraps both while a
recorder is active and restores both afterwards. `tests/test_engine.py` fails
loudly when a torch upgrade moves any of this.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd
import torch.autograd.graph

# Modules that hold a reference to the engine entry point. `torch.autograd`
# imports it from `torch.autograd.graph`, and `backward()`/`grad()` look it up
# in `torch.autograd`'s globals, so both must be wrapped.
ENGINE_HOLDERS = (torch.autograd.graph, torch.autograd)
ENGINE_ATTR = "_engine_run_backward"

_TORCH_DIR = os.path.dirname(torch.__file__)


@dataclass
class EngineCall:
    """One call into the autograd engine, with its arguments normalised."""

    outputs: tuple[Any, ...]
    grad_outputs: tuple[Any, ...]
    retain_graph: bool
    create_graph: bool
    inputs: tuple[Any, ...]
    accumulate_grad: bool
    # The `gradient=` / `grad_outputs=` argument exactly as the user passed it
    # (None when PyTorch made the implicit ones for a scalar).
    user_gradient: Any = None

    @property
    def kind(self) -> str:
        return "backward" if self.accumulate_grad else "grad"


def parse_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> EngineCall:
    """Normalise the arguments of `_engine_run_backward(t_outputs, *args, **kwargs)`.

    Positional order in torch 2.13: outputs, grad_outputs, keep_graph,
    create_graph, inputs, allow_unreachable; `accumulate_grad` by keyword.
    """
    names = ("outputs", "grad_outputs", "retain_graph", "create_graph", "inputs")
    values = dict(zip(names, args))
    for name in names:
        if name in kwargs:
            values[name] = kwargs[name]
    return EngineCall(
        outputs=tuple(values.get("outputs") or ()),
        grad_outputs=tuple(values.get("grad_outputs") or ()),
        retain_graph=bool(values.get("retain_graph")),
        create_graph=bool(values.get("create_graph")),
        inputs=tuple(values.get("inputs") or ()),
        accumulate_grad=bool(kwargs.get("accumulate_grad", True)),
    )


def _user_gradient_from(frame: Any) -> Any:
    """The gradient argument as given to `torch.autograd.backward`/`grad`."""
    code = frame.f_code
    if code is torch.autograd.backward.__code__:
        return frame.f_locals.get("grad_tensors")
    if code is torch.autograd.grad.__code__:
        return frame.f_locals.get("grad_outputs")
    return None


def caller_context(call: EngineCall, frame: Any) -> None:
    """Fill `user_gradient` from the torch frames between the user and the engine."""
    while frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
        if call.user_gradient is None:
            call.user_gradient = _user_gradient_from(frame)
        frame = frame.f_back


def should_skip(call: EngineCall) -> bool:
    """Calls gradmagic must leave alone: compile tracing, functorch, fake tensors."""
    if torch.compiler.is_compiling():
        return True
    fake = _fake_tensor_type()
    for t in call.outputs:
        if not isinstance(t, torch.Tensor):
            continue
        if isinstance(t, fake) or torch._C._functorch.is_functorch_wrapped_tensor(t):
            return True
    return False


@functools.cache
def _fake_tensor_type() -> type:
    # Imported on first use, once: the module is large, and a `from ... import` in the
    # function body would cost a few microseconds on every backward.
    from torch._subclasses.fake_tensor import FakeTensor

    return FakeTensor


# --- installing the wrapper -------------------------------------------------

# handler(original, args, kwargs, caller_frame) -> whatever the engine returns
Handler = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any], Any], Any]

_lock = threading.Lock()
_originals: dict[int, Any] = {}
_installs = 0


def original_engine() -> Any:
    """The unwrapped engine function (for tests and restoration checks)."""
    return _originals.get(id(torch.autograd.graph), torch.autograd.graph._engine_run_backward)


def _make_wrapper(original: Any, handler: Handler) -> Any:
    def _engine_run_backward(t_outputs: Any, *args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        return handler(original, (t_outputs, *args), kwargs, sys._getframe(1))

    _engine_run_backward.__wrapped__ = original  # type: ignore[attr-defined]
    _engine_run_backward.__gradmagic__ = True  # type: ignore[attr-defined]
    return _engine_run_backward


def install(handler: Handler) -> None:
    """Wrap the engine entry point under both names (reference counted)."""
    global _installs
    with _lock:
        _installs += 1
        if _installs > 1:
            return
        original = torch.autograd.graph._engine_run_backward
        wrapper = _make_wrapper(original, handler)
        for holder in ENGINE_HOLDERS:
            _originals[id(holder)] = getattr(holder, ENGINE_ATTR)
            setattr(holder, ENGINE_ATTR, wrapper)


def uninstall() -> None:
    """Undo one `install`; the last one puts the original functions back."""
    global _installs
    with _lock:
        if _installs == 0:
            return
        _installs -= 1
        if _installs:
            return
        for holder in ENGINE_HOLDERS:
            setattr(holder, ENGINE_ATTR, _originals.pop(id(holder)))


def is_patched() -> bool:
    return any(getattr(getattr(h, ENGINE_ATTR), "__gradmagic__", False) for h in ENGINE_HOLDERS)


# --- walking a module tree ----------------------------------------------------


def module_tree(
    module: torch.nn.Module, prefix: str = ""
) -> tuple[list[tuple[str, torch.nn.Module]], list[tuple[str, torch.Tensor]]]:
    """`named_modules(prefix, remove_duplicate=False)` and
    `named_parameters(prefix, remove_duplicate=False)` of `module`, read in one walk.

    Reads `_modules` and `_parameters`, which is what those methods do, at a
    fraction of their cost (they are generators over generators): a watched block
    names every module's parameters when it closes. A tree holding a class that
    overrides either method is read through the methods themselves.
    """
    modules: list[tuple[str, torch.nn.Module]] = []
    params: list[tuple[str, torch.Tensor]] = []
    try:
        _walk_modules(module, prefix, modules, params)
    except _Overridden:
        modules = list(module.named_modules(prefix=prefix, remove_duplicate=False))
        params = list(module.named_parameters(prefix=prefix, remove_duplicate=False))
    return modules, params


class _Overridden(Exception):
    pass


_PLAIN_WALK: dict[type, bool] = {}


def _plain_walk(cls: type) -> bool:
    plain = _PLAIN_WALK.get(cls)
    if plain is None:
        base = torch.nn.Module
        plain = _PLAIN_WALK[cls] = (
            cls.named_modules is base.named_modules
            and cls.named_parameters is base.named_parameters
            and cls._named_members is base._named_members
        )
    return plain


def _walk_modules(
    module: torch.nn.Module,
    prefix: str,
    modules: list[tuple[str, torch.nn.Module]],
    params: list[tuple[str, torch.Tensor]],
) -> None:
    if not _plain_walk(type(module)):
        raise _Overridden
    modules.append((prefix, module))
    dot = prefix + "." if prefix else ""
    for name, param in module._parameters.items():
        if param is not None:
            params.append((dot + name, param))
    for name, sub in module._modules.items():
        if sub is not None:
            _walk_modules(sub, dot + name, modules, params)
