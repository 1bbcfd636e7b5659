"""The one module that touches private PyTorch API.

Every Python entry into the autograd engine (`Tensor.backward`,
`torch.autograd.backward`, `torch.autograd.grad`) ends in
`_engine_run_backward`, bound under two names: gradmagic wraps both while a
recorder is active and restores both afterwards. The rest reads autograd nodes
without unpacking a saved tensor, runs gradmagic's own tensor work out of the
user's dispatch modes (`quiet`), and names the few private functions whose calls
change `.grad` (`EDIT_POINTS`). `tests/test_engine.py` fails loudly when a torch
upgrade moves any of this.
"""

from __future__ import annotations

import functools
import os
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd
import torch.autograd.graph
from torch.utils._python_dispatch import _pop_mode, _push_mode

from ._patch import Patch

# `torch.autograd` imports the entry point from `torch.autograd.graph`, and
# `backward()`/`grad()` look it up in `torch.autograd`'s globals: both are wrapped.
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
    # The `gradient=` / `grad_outputs=` argument as the user passed it (None when
    # PyTorch made the implicit ones for a scalar), and the torch function the
    # user's code called to get here (`Tensor.backward`, `gradcheck`).
    user_gradient: Any = None
    via: str = ""

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


def caller_context(call: EngineCall, frame: Any) -> None:
    """Fill `user_gradient` and `via` from the torch frames between the user and the engine."""
    backward, grad = torch.autograd.backward.__code__, torch.autograd.grad.__code__
    while frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
        code = frame.f_code
        if call.user_gradient is None and code in (backward, grad):
            call.user_gradient = frame.f_locals.get(
                "grad_tensors" if code is backward else "grad_outputs"
            )
        call.via = getattr(code, "co_qualname", code.co_name)
        frame = frame.f_back


def user_frame(frame: Any) -> Any:
    """The first frame outside torch, going out from `frame` (the code that called backward)."""
    while frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
        frame = frame.f_back
    return frame


def skip_reason(call: EngineCall) -> str | None:
    """Why gradmagic must leave a call alone, or None to record it.

    "" for calls that are not the user's to see (compile tracing, fake tensors);
    a sentence for calls it cannot observe without changing them.
    """
    if torch.compiler.is_compiling():
        return ""
    fake = _fake_tensor_type()
    functorch = torch._C._functorch
    for t in (*call.outputs, *call.grad_outputs):
        if not isinstance(t, torch.Tensor):
            continue
        if fake is not None and isinstance(t, fake):
            return ""
        if functorch.is_legacy_batchedtensor(t):
            return "made by a batched `torch.autograd.grad` (`is_grads_batched=True`)"
        if functorch.is_functorch_wrapped_tensor(t) or functorch.is_batchedtensor(t):
            return "inside a torch.func transform"
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "inside a torch.func transform"
    return None


def _fake_tensor_type() -> type | None:
    # Not imported here: importing it costs and warns. No FakeTensor exists until it is.
    module = sys.modules.get("torch._subclasses.fake_tensor")
    return getattr(module, "FakeTensor", None)


def in_backward() -> bool:
    """Whether this thread runs inside a backward (a reentrant checkpoint's own backward)."""
    return torch._C._current_autograd_node() is not None


# --- FSDP2: the parameters a backward reaches are temporaries ------------------------------------


@dataclass(frozen=True, slots=True)
class ShardedParam:
    """One FSDP2 parameter: the sharded parameter the user's module holds (a DTensor, which
    the optimizer steps and whose `.grad` FSDP fills), and whether FSDP reduces gradients
    into it at the end of each backward (`set_requires_gradient_sync(False)` keeps them on
    the unsharded parameter instead)."""

    sharded: torch.Tensor
    reduces: bool


def fsdp_unsharded() -> dict[int, ShardedParam]:
    """id(unsharded parameter) -> its `ShardedParam`, for every live `fully_shard` module.

    FSDP2 all-gathers each sharded parameter into a temporary unsharded one before the
    forward (`FSDPParam._unsharded_param`); the graph's `AccumulateGrad` nodes hold those,
    and FSDP moves their gradients, reduce-scattered, to `FSDPParam.sharded_param.grad`
    in a callback at the end of the backward. torch keeps every composable state in
    `torch.distributed._composable_state._module_state_mapping`. Empty when
    torch.distributed is not in use.
    """
    composable = sys.modules.get("torch.distributed._composable_state")
    mapping = getattr(composable, "_module_state_mapping", None)
    if not mapping:
        return {}
    out: dict[int, ShardedParam] = {}
    seen: set[int] = set()
    for ref in list(mapping.values()):
        state = ref() if callable(ref) else None
        if state is None or id(state) in seen:
            continue
        seen.add(id(state))
        for group in getattr(state, "_fsdp_param_groups", None) or ():
            reduces = bool(getattr(group, "reduce_grads", True))
            for param in getattr(group, "fsdp_params", ()):
                unsharded = param.__dict__.get("_unsharded_param")  # set at the 1st all-gather
                sharded = getattr(param, "sharded_param", None)
                if isinstance(unsharded, torch.Tensor) and isinstance(sharded, torch.Tensor):
                    out[id(unsharded)] = ShardedParam(sharded, reduces)
    return out


# --- compiled regions -----------------------------------------------------------------------------


def compiled_callables(namespace: Any) -> list[tuple[str, str]]:
    """(variable, what it compiled) for each `torch.compile` result in a namespace: a
    compiled module (`OptimizedModule`, its `_orig_mod`) or a compiled function."""
    found = []
    for key, value in list(namespace.items()):
        if not isinstance(key, str) or key.startswith("_"):
            continue
        try:
            if isinstance(value, torch.nn.Module):
                inner = value._modules.get("_orig_mod")  # registered as a submodule
                if type(value).__name__ == "OptimizedModule" and inner is not None:
                    found.append((key, f"a compiled `{type(inner).__name__}`"))
                continue
            # Only functions: their `__dict__` is read without running anyone's `__getattr__`.
            inner = (
                value.__dict__.get("_torchdynamo_orig_callable") if _is_function(value) else None
            )
            if inner is not None:
                name = getattr(inner, "__qualname__", None) or type(inner).__name__
                found.append((key, f"the compiled function `{name}`"))
        except Exception:  # noqa: BLE001 - an object whose attributes raise: not ours to name
            continue
    return found


def _is_function(value: Any) -> bool:
    return isinstance(value, types.FunctionType)


# --- gradmagic's own tensor work --------------------------------------------------------------


class quiet:  # noqa: N801 - used as `with quiet():`, like a function
    """Run gradmagic's tensor work where the user cannot see it.

    Grad mode off; no `__torch_function__` of the user's modes or subclasses;
    the user's `TorchDispatchMode`s (a logging mode, a checkpoint's recompute
    mode) popped for the duration and pushed back as they were. A class, not a
    generator: it runs in every hook.
    """

    __slots__ = ("_grad", "_function", "_modes", "_profiled")

    def __enter__(self) -> None:
        self._grad = torch.is_grad_enabled()
        if self._grad:
            torch._C._set_grad_enabled(False)
        # A running profiler records every op through RecordFunction: gradmagic's are not
        # the user's. (torch offers no getter: it is on unless someone turned it off.)
        self._profiled = torch._C._autograd._profiler_enabled()
        if self._profiled:
            torch._C._autograd._enable_record_function(False)
        # Off for modes and subclasses alike: even `t.shape` of a subclass that overrides
        # __torch_function__ would run the user's code.
        self._function = torch._C.DisableTorchFunction()
        self._function.__enter__()
        self._modes: list[Any] = []
        n = torch._C._len_torch_dispatch_stack()
        pre = torch._ops._len_torch_dispatch_stack_pre_dispatch()
        if pre or n:
            self._modes = [torch._ops._pop_mode_from_pre_dispatch() for _ in range(pre)]
            self._modes += [_pop_mode() for _ in range(n)]

    def __exit__(self, *exc: object) -> None:
        # Python-key modes back first (popped last), then the pre-dispatch ones.
        for mode in reversed(self._modes):
            _push_mode(mode)
        self._function.__exit__(None, None, None)
        if self._profiled:
            torch._C._autograd._enable_record_function(True)
        if self._grad:
            torch._C._set_grad_enabled(True)


class without_saved_tensor_hooks:  # noqa: N801 - used as `with ...:`, like a function
    """Take the user's default saved-tensor hooks (`saved_tensors_hooks` contexts) off
    while gradmagic runs autograd of its own (`gradcheck` on copies), and put them back
    as they were: the user's pack and unpack hooks never see gradmagic's tensors."""

    __slots__ = ("_hooks",)

    def __enter__(self) -> None:
        autograd = torch._C._autograd
        self._hooks: list[tuple[Any, Any]] = []
        while (top := autograd._top_saved_tensors_default_hooks(False)) is not None:
            self._hooks.append(top)
            autograd._pop_saved_tensors_default_hooks()

    def __exit__(self, *exc: object) -> None:
        for pack, unpack in reversed(self._hooks):
            torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)


def is_named_leaf(value: torch.Tensor) -> bool:
    """Whether a tensor is a leaf that requires grad, read without touching `.grad_fn`.

    `.grad_fn` raises for a view made under `no_grad` and modified in place, and
    wraps the node in a Python object that makes freeing a deep graph recurse.
    """
    return value.requires_grad and not value._is_view() and value.is_leaf


def reads_grad_quietly(t: torch.Tensor) -> bool:
    """Whether `t.grad` can be read without PyTorch's "not a leaf" warning."""
    return t.is_leaf or t.retains_grad


# --- autograd nodes, read without unpacking a saved tensor ------------------------------------


def op_name(node: Any) -> str:
    try:
        return node.name().removeprefix("torch::autograd::")
    except Exception:  # noqa: BLE001 - a node type without name(): its class says enough
        return type(node).__name__


def sequence_nr(node: Any) -> int | None:
    try:
        return int(node._sequence_nr())
    except Exception:  # noqa: BLE001
        return None


def input_sizes(node: Any) -> list[Any]:
    """Shapes of the gradients a node receives (`torch.Size`), from its metadata; an
    empty list where torch cannot say (nested tensors)."""
    try:
        return [meta.shape for meta in node._input_metadata]
    except Exception:  # noqa: BLE001 - nested tensors and older torch: edges go unlabelled
        return []


def input_devices(node: Any) -> list[str]:
    """Devices of the gradients a node receives, from its metadata ([] where unknown)."""
    try:
        return [str(meta.device) for meta in node._input_metadata]
    except Exception:  # noqa: BLE001 - nested tensors and older torch
        return []


def is_zero_tensor(t: torch.Tensor) -> bool:
    """Whether `t` is one of autograd's efficient zero tensors (the gradient `sgn` and
    `sign` send): all zeros with no storage, which `tolist()` refuses."""
    try:
        return bool(t._is_zerotensor())
    except Exception:  # noqa: BLE001 - subclasses and older torch
        return False


def custom_function_class(node: Any) -> type | None:
    """The `autograd.Function` subclass behind a custom Function's backward node."""
    return getattr(type(node), "_forward_cls", None)


def next_functions(node: Any) -> tuple:
    try:
        return node.next_functions
    except Exception:  # noqa: BLE001
        return ()


def is_accumulate_grad(node: Any) -> bool:
    return type(node).__name__ == "AccumulateGrad"


_SAVED_NOISE = ("_sym_strides", "_sym_storage_offset", "_sym_numel", "_sym_sizes_opt")


@functools.cache
def _saved_plan(node_type: type) -> tuple[tuple[str, str], ...]:
    """(name, attribute) of what a node type saved that is not a tensor.

    A saved tensor has a `_raw_saved_<name>` twin: reading `_saved_<name>` would
    unpack it, running unpack hooks and making checkpointing recompute. Its
    `_saved_<name>_sym_sizes`, when torch keeps one, is plain data: its shape.
    """
    names = set(dir(node_type))
    plan = []
    for attr in sorted(names):
        if not attr.startswith("_saved_") or attr.endswith(_SAVED_NOISE):
            continue
        name = attr.removeprefix("_saved_")
        if "_raw_saved_" + name in names:
            continue
        plan.append((name.removesuffix("_sym_sizes"), attr))
    return tuple(plan)


def saved_values(node: Any) -> tuple[tuple[str, Any], ...]:
    """What a node saved that is not a tensor (numbers, dims, sizes), read before the
    backward frees it; a custom Function's saved tensors are only counted."""
    found: dict[str, Any] = {}
    for name, attr in _saved_plan(type(node)):
        try:
            value = getattr(node, attr)
        except Exception:  # noqa: BLE001 - freed by a backward without retain_graph
            continue
        if attr.endswith("_sym_sizes"):
            value = _size(value or ())
        if value is not None and name not in found:
            found[name] = value
    if isinstance(node, torch.autograd.function.BackwardCFunction):
        try:
            count = len(node._raw_saved_tensors)  # the count only: nothing is unpacked
        except Exception:  # noqa: BLE001 - freed
            count = 0
        if count:
            found["saved"] = f"{count} tensor{'s' if count > 1 else ''}"
    return tuple(found.items())


def _size(dims: Any) -> Any:
    try:
        return torch.Size(dims)
    except Exception:  # noqa: BLE001 - symbolic sizes: their text
        return tuple(str(d) for d in dims)


def sequence_counter() -> Callable[[], int] | None:
    """The next autograd sequence number of this thread: ops created between two reads
    belong to the module call that ran in between."""
    fn = getattr(torch._C._autograd, "_get_sequence_nr", None)
    return fn if callable(fn) else None


# --- functions that change `.grad` between backwards ------------------------------------------

# (owner, attribute, what): wrapped while a recorder is active, so a change of `.grad`
# can be said to come from them. `_clip_grads_with_norm_` is looked up in its module at
# each `clip_grad_norm_` call, however the user imported that.
EDIT_POINTS: tuple[tuple[Any, str, str], ...] = (
    (torch.nn.utils.clip_grad, "_clip_grads_with_norm_", "clip_norm"),
    (torch.nn.utils.clip_grad, "clip_grad_value_", "clip_value"),
    (torch.nn.utils, "clip_grad_value_", "clip_value"),
    (torch.amp.grad_scaler.GradScaler, "scale", "scale"),
    (torch.amp.grad_scaler.GradScaler, "unscale_", "unscale"),
    (torch.amp.grad_scaler.GradScaler, "step", "scaler_step"),
)


def scaler_scale(scaler: Any) -> float | None:
    """The loss scale a GradScaler multiplies by (None when disabled or not started)."""
    scale = getattr(scaler, "_scale", None)
    if not getattr(scaler, "_enabled", False) or not isinstance(scale, torch.Tensor):
        return None
    return float(scale.item())


def scaler_found_inf(scaler: Any, optimizer: Any) -> bool | None:
    """Whether the scaler's last unscale of `optimizer`'s gradients found NaN or Inf."""
    try:
        # `.get`: the states are a defaultdict, and a lookup must not add one.
        state = scaler._per_optimizer_states.get(id(optimizer))
        found = state["found_inf_per_device"] if state else None
    except Exception:  # noqa: BLE001 - another GradScaler layout
        return None
    if not found:
        return None
    return any(float(v.item()) != 0.0 for v in found.values())


# --- installing the engine wrapper -------------------------------------------------------------

# handler(original, args, kwargs, caller_frame) -> whatever the engine returns
Handler = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any], Any], Any]

_ENGINE = Patch()  # the engine entry point, under both names


def original_engine() -> Any:
    """The unwrapped engine function (for tests and restoration checks)."""
    return _ENGINE.original(torch.autograd.graph, ENGINE_ATTR)


def _make_wrapper(original: Any, handler: Handler) -> Any:
    def _engine_run_backward(t_outputs: Any, *args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        return handler(original, (t_outputs, *args), kwargs, sys._getframe(1))

    _engine_run_backward.__wrapped__ = original  # type: ignore[attr-defined]
    _engine_run_backward.__gradmagic__ = True  # type: ignore[attr-defined]
    return _engine_run_backward


def install(handler: Handler) -> None:
    """Wrap the engine entry point under both names (reference counted)."""

    def replacements() -> list[tuple[Any, str, Any]]:
        wrapper = _make_wrapper(torch.autograd.graph._engine_run_backward, handler)
        return [(holder, ENGINE_ATTR, wrapper) for holder in ENGINE_HOLDERS]

    _ENGINE.apply(replacements)


def uninstall() -> None:
    """Undo one `install`; the last one puts the original functions back."""
    _ENGINE.undo()


def is_patched() -> bool:
    """Whether any wrapper of gradmagic's is in place: the engine's or an edit point's."""
    wrapped = [getattr(h, ENGINE_ATTR) for h in ENGINE_HOLDERS]
    wrapped += [getattr(owner, attr, None) for owner, attr, _ in EDIT_POINTS]
    return any(getattr(fn, "__gradmagic__", False) for fn in wrapped)


# --- walking a module tree ----------------------------------------------------------------------


def module_tree(
    module: torch.nn.Module, prefix: str = ""
) -> tuple[list[tuple[str, torch.nn.Module]], list[tuple[str, torch.Tensor]]]:
    """`named_modules(prefix, remove_duplicate=False)` and
    `named_parameters(prefix, remove_duplicate=False)` of `module`, read in one walk.

    Reads `_modules` and `_parameters`, which is what those methods do, at a
    fraction of their cost (they are generators over generators). A tree holding
    a class that overrides either method is read through the methods themselves.
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
    stack = [(prefix, module)]
    while stack:
        prefix, module = stack.pop()
        if not _plain_walk(type(module)):
            raise _Overridden
        modules.append((prefix, module))
        dot = prefix + "." if prefix else ""
        for name, param in module._parameters.items():
            if param is not None:
                params.append((dot + name, param))
        subs = [(dot + name, sub) for name, sub in module._modules.items() if sub is not None]
        stack.extend(reversed(subs))  # depth first, in registration order


# --- DistributedDataParallel --------------------------------------------------------------------


def ddp_comm_hook(ddp: Any) -> tuple[str, Any]:
    """The communication hook a DDP module combines gradients with: its name and the
    function (None for a built-in C++ hook, known by name only); ("", None) for DDP's
    own all-reduce. Read from what `register_comm_hook` keeps (`_comm_hooks`) and from
    the name DDP's logger keeps (`_register_builtin_comm_hook` sets only that)."""
    hooks = getattr(ddp, "_comm_hooks", None) or []
    if hooks:
        hook = hooks[-1][0]
        return getattr(hook, "__qualname__", None) or type(hook).__name__, hook
    if getattr(ddp, "logger", None) is None:
        return "", None
    try:
        name = str(ddp._get_ddp_logging_data().get("comm_hook", "") or "")
    except Exception:  # noqa: BLE001 - another logger layout: no hook said
        name = ""
    return name, None
