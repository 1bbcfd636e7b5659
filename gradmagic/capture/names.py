"""Give tensors and modules the names the user knows them by.

Order of preference, per DESIGN.md: a variable that is the tensor;
`var.dotted.path` from every `nn.Module`'s `named_parameters()` (tied weights
keep every name); optimizers' param groups; items of lists, tuples and dicts;
locals of the frames that called backward. `fallback_name` covers the rest.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import _engine
from .._engine import module_tree
from .._weak import WeakIdMap
from ..source import parse_source
from .holds import HeldHook

MAX_CONTAINER_ITEMS = 256


def _public(name: str) -> bool:
    # IPython keeps `_`, `__`, `_5`, `_i5`, `In`, `Out` in the namespace.
    return not name.startswith("_") and name not in ("In", "Out")


class Namer:
    """Names for the tensors and modules reachable from a namespace.

    Build it when the names are needed: it maps object ids, which are only
    meaningful while the objects are alive.

    >>> w = torch.zeros(2, requires_grad=True)
    >>> Namer({"w": w}).name(w)
    'w'
    """

    def __init__(self, namespace: Mapping[str, Any] | None = None) -> None:
        self._tensors: dict[int, list[str]] = {}
        self._modules: dict[int, str] = {}
        self._rank: dict[int, int] = {}
        self._order: dict[int, int] = {}
        self._module_params: dict[str, list[int]] = {}  # module variable -> its parameters' ids
        self._trees: dict[
            str, list[nn.Module]
        ] = {}  # module variable -> its modules (while scanning)
        # Scanned at the first lookup: a block with nothing to name costs nothing.
        self._pending = namespace or None

    def rebind(self, namespace: Mapping[str, Any]) -> None:
        """If no lookup has scanned the namespace yet, scan `namespace` instead (a weak
        view of it, so that a namer kept for later holds no tensor alive)."""
        if self._pending is not None:
            self._pending = namespace

    def _scanned(self) -> Namer:
        namespace, self._pending = self._pending, None
        if namespace is not None:
            self._scan(namespace)
        return self

    # -- building ------------------------------------------------------------
    def _add(self, obj: Any, name: str, rank: int) -> None:
        names = self._tensors.setdefault(id(obj), [])
        self._order.setdefault(id(obj), len(self._order))
        if name in names:
            return
        if rank < self._rank.get(id(obj), 99):
            self._rank[id(obj)] = rank
            names.insert(0, name)
        else:
            names.append(name)

    def _add_module(self, module: nn.Module, prefix: str) -> list[int]:
        modules, params = module_tree(module, prefix)
        wrappers = [name for name, sub in modules if is_ddp_wrapper(sub)]
        if wrappers:
            modules = [(unwrapped_name(name, wrappers), sub) for name, sub in modules]
            params = [(unwrapped_name(name, wrappers), p) for name, p in params]
        self._trees[prefix] = [sub for _, sub in modules]
        for name, sub in modules:
            self._modules.setdefault(id(sub), name)
        for name, param in params:
            self._add(param, name, 1)
        return [id(param) for _, param in params]

    def _scan(self, namespace: Mapping[str, Any]) -> None:
        items = [(k, v) for k, v in list(namespace.items()) if isinstance(k, str) and _public(k)]
        # A variable outranks a module path: `w = model.fc.weight` is first `w`.
        for key, value in items:
            if isinstance(value, torch.Tensor):
                self._add(value, key, 0)
        for key, value in items:
            if isinstance(value, nn.Module):
                self._module_params[key] = self._add_module(value, key)
        for key, value in items:
            if isinstance(value, torch.optim.Optimizer):
                for gi, group in enumerate(value.param_groups):
                    for pi, param in enumerate(group.get("params", ())):
                        self._add(param, f"{key}.param_groups[{gi}]['params'][{pi}]", 2)
            elif isinstance(value, (list, tuple, dict)):
                self._scan_container(key, value)

    def _scan_container(self, key: str, value: Any) -> None:
        if isinstance(value, dict):
            pairs: Iterable[tuple[Any, Any]] = list(value.items())[:MAX_CONTAINER_ITEMS]
            entries = [(f"{key}[{k!r}]", v) for k, v in pairs if isinstance(k, (str, int))]
        else:
            entries = [(f"{key}[{i}]", v) for i, v in enumerate(value[:MAX_CONTAINER_ITEMS])]
        for name, item in entries:
            if isinstance(item, torch.Tensor):
                self._add(item, name, 3)
            elif isinstance(item, nn.Module):
                self._add_module(item, name)

    # -- looking up ----------------------------------------------------------
    def names(self, obj: Any) -> list[str]:
        """Every name of a tensor, best first (tied weights have several)."""
        return list(self._scanned()._tensors.get(id(obj), ()))

    def name(self, obj: Any) -> str | None:
        names = self._scanned()._tensors.get(id(obj))
        return names[0] if names else None

    def order(self, obj: Any) -> int | None:
        """Where the tensor first appears in the namespace: rows follow it."""
        return self._scanned()._order.get(id(obj))

    def module_parameters(self) -> dict[str, list[int]]:
        """The ids of the parameters of every module the namespace holds, by its name."""
        return self._scanned()._module_params

    def submodules(self, name: str) -> list[nn.Module]:
        """The modules inside the module the variable `name` holds (held until `forget()`)."""
        return self._scanned()._trees.get(name, [])

    def forget(self) -> None:
        """Drop the module references: a namer kept for later holds ids and names only."""
        self._trees = {}

    def module_name(self, module: nn.Module) -> str | None:
        return self._scanned()._modules.get(id(module))

    def modules(self) -> dict[int, str]:
        return dict(self._scanned()._modules)


def is_ddp_wrapper(module: nn.Module) -> bool:
    """A `DistributedDataParallel` whose only child is the model it wraps, as `module`, and
    which holds no parameter of its own: its `module.` can leave its parameters' names
    without two parameters ending up with one name."""
    return (
        isinstance(module, DDP)
        and [name for name, _ in module.named_children()] == ["module"]
        and next(module.parameters(recurse=False), None) is None
    )


def unwrapped_name(name: str, wrappers: list[str]) -> str:
    """`model.module.fc1.weight` -> `model.fc1.weight` for each DDP wrapper at a path in
    `wrappers` (the paths as `named_modules` spells them, innermost handled first)."""
    for path in sorted(wrappers, key=len, reverse=True):
        inner = f"{path}.module" if path else "module"
        if name == inner:
            name = path
        elif name.startswith(inner + "."):
            name = (f"{path}." if path else "") + name[len(inner) + 1 :]
    return name


def fallback_name(position: int, consumer: str | None) -> str:
    """The name of a leaf nobody named: where it sits in the graph."""
    if consumer:
        return f"leaf #{position} of {consumer}"
    return f"leaf #{position}"


def unique(names: Iterable[str]) -> list[str]:
    """Make names unique for a table index: `w`, `w (2)`, `w (3)`."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        count = seen.get(name, 0) + 1
        seen[name] = count
        out.append(name if count == 1 else f"{name} ({count})")
    return out


@functools.cache
def _library_dirs() -> tuple[str, ...]:
    import os
    import sysconfig

    dirs = {os.path.dirname(torch.__file__), os.path.dirname(__file__)}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            dirs.add(path)
    return tuple(sorted(dirs))


def _is_library_file(filename: str | None) -> bool:
    return bool(filename) and (
        filename.startswith(_library_dirs()) or filename.startswith("<frozen")  # type: ignore[union-attr]
    )


_PLAIN = (torch.Tensor, nn.Module, torch.optim.Optimizer, types.ModuleType, str, bytes, int, float)
_PLAIN += (complex, bool, list, tuple, dict, set, frozenset, type(None), torch.dtype, torch.device)


def _is_user_code(value: Any) -> bool:
    """Whether calling `value` can run the user's own Python code outside a module's
    forward or an optimizer's step (where the naming hook is held off anyway)."""
    if isinstance(value, _PLAIN):
        return False
    if isinstance(value, functools.partial):
        return _is_user_code(value.func)
    if isinstance(value, types.MethodType):
        value = value.__func__
    if isinstance(value, types.FunctionType):
        return not _is_library_file(value.__code__.co_filename)
    if isinstance(value, (types.BuiltinFunctionType, types.BuiltinMethodType)):
        return False
    cls = value if isinstance(value, type) else type(value)
    if issubclass(cls, (nn.Module, torch.optim.Optimizer, torch.Tensor)):
        return False  # a module's own forward, an optimizer's step: held off
    module = sys.modules.get(getattr(cls, "__module__", "") or "")
    return not _is_library_file(getattr(module, "__file__", None))


def may_run_user_code(namespace: Mapping[str, Any] | None, source: str | None) -> bool:
    """Whether a block can create leaves inside the user's own functions, which the
    naming hook exists to see: a function, class or object of the user's that the
    code names (every one in the namespace when the code is not known), or a
    function defined in the code itself. Without them, a block of modules,
    optimizers and tensors runs with no profile hook at all.
    """
    if namespace is None:
        return True
    if source is None:
        names: Iterable[str] = [k for k in list(namespace) if isinstance(k, str)]
    else:
        parsed = parse_source(source)
        if parsed is None or parsed.defines:
            return True
        names = parsed.names
    return any(_is_user_code(namespace.get(name)) for name in names if _public(name))


_SUSPENDABLE = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


class CreatedLeafNames(HeldHook):
    """Names of tensors created inside the user's functions, taken as they return.

    A weight made inside a helper (`def model(x): w = torch.tensor(2., requires_grad=True)`)
    has no name left by the time backward runs: the helper's frame is gone. A
    profile hook sees the user's frames return (library frames are skipped
    after one lookup per code object) and remembers local names of leaves
    that require grad. When another profiler is installed (cProfile, `%prun`),
    it stays alone and this naming is skipped. It is held off inside
    `nn.Module` calls and optimizer steps (see `hold`), so a leaf created
    inside a module's `forward` is not named this way; and it is not installed
    at all for a block that calls none of the user's own code
    (`may_run_user_code`).
    """

    _get_hook = staticmethod(sys.getprofile)
    _set_hook = staticmethod(sys.setprofile)

    def __init__(
        self, on_name: Any = None, enabled: bool = True, errors: list[str] | None = None
    ) -> None:
        # Called as on_name(tensor, name) when a name is found: the tensor may be
        # gone by the time anyone asks (a weight made and used inside a helper).
        self.on_name = on_name
        self.errors = errors
        self.names = WeakIdMap()
        self._wanted = WeakIdMap()
        self._user_code: dict[Any, bool] = {}
        self._installed = False
        self.enabled = enabled  # False: never installed (see `may_run_user_code`)
        self._reset_holds()

    def _is_user(self, code: Any) -> bool:
        user = self._user_code.get(code)
        if user is None:
            user = self._user_code[code] = not _is_library_file(code.co_filename)
        return user

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if event != "return" or not self._is_user(frame.f_code):
            return
        # Module-level frames: their locals are the namespace the Namer reads.
        # Generator frames live on after a yield, and would keep the locals
        # snapshot that reading `f_locals` leaves on them in CPython 3.11.
        if frame.f_code.co_flags & _SUSPENDABLE:
            return
        local_vars = frame.f_locals
        if local_vars is frame.f_globals:
            return
        try:
            for key, value in local_vars.items():
                if not isinstance(value, torch.Tensor) or value in self.names:
                    continue
                # Never `.grad_fn`: it raises for some views, and wraps nodes in Python.
                if value in self._wanted or _engine.is_named_leaf(value):
                    self.names[value] = key
                    if self.on_name is not None:
                        self.on_name(value, key)
        except Exception as exc:  # noqa: BLE001 - never into the user's code
            if self.errors is not None:
                self.errors.append(f"naming hook: {type(exc).__name__}: {exc}")

    def _hook_function(self) -> Any:
        # A profile hook puts the interpreter in tracing mode: every bytecode and C call
        # of a model's forward runs slower under it, while the names it looks for are
        # the user's own variables; holds keep it off in library code.
        return self._profile

    def want(self, tensor: torch.Tensor) -> None:
        """Also name this tensor (a backward's root, such as `loss`) if a frame holds it."""
        self._wanted[tensor] = True

    def get(self, tensor: torch.Tensor) -> str | None:
        return self.names.get(tensor)

    def __enter__(self) -> CreatedLeafNames:
        if self.enabled and sys.getprofile() is None:
            sys.setprofile(self._profile)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed and sys.getprofile() == self._profile:
            sys.setprofile(None)
        self._installed = False
        self._reset_holds()
