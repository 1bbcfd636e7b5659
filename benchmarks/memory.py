"""Memory: what gradmagic holds after a cell, peak RSS, and that nothing leaks.

* `held_by` walks everything reachable (through `gc.get_referents`) from the
  recorder, its report and the run history, and sums the bytes of the tensor
  storages it finds, split into storages of the user's own tensors (parameters,
  `.grad`s: held but not copied) and copies made by gradmagic.
* `peak_rss` runs a few training steps of one model in a fresh process (so
  that `ru_maxrss` belongs to that variant alone).
* `leak_check` runs a `%%grad` cell 100 times in an in-process IPython shell,
  drops the user's variables and checks that weak references to every
  parameter, gradient and activation are dead.

Run as a script, `python benchmarks/memory.py rss MODEL VARIANT` prints one
JSON line; `run.py` calls it that way.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
import subprocess
import sys
import time
import types
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import models  # noqa: E402

SMALL = 16  # elements: gradmagic's default `values`


# --- bytes held ------------------------------------------------------------------


@dataclass
class Held:
    """Tensors reachable from gradmagic's objects."""

    copies_bytes: int = 0  # storages that are not the user's: gradmagic's copies
    copies_count: int = 0
    small_count: int = 0  # copies with at most SMALL elements
    large_bytes: int = 0  # bytes in copies with more than SMALL elements
    user_refs: int = 0  # strong references to the user's own tensors (params, grads)
    user_bytes: int = 0
    largest: list[tuple[int, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        s = t.untyped_storage()
        return (s.data_ptr(), s.nbytes())
    except Exception:  # noqa: BLE001 - meta, sparse, wrapper subclasses
        return None


def user_storages(*modules: torch.nn.Module, extra: tuple[torch.Tensor, ...] = ()) -> set:
    """Storage keys of the user's parameters, their gradients and `extra` tensors."""
    keys = set()
    tensors = list(extra)
    for m in modules:
        for p in m.parameters():
            tensors.append(p)
            if p.grad is not None:
                tensors.append(p.grad)
        for b in m.buffers():
            tensors.append(b)
    for t in tensors:
        k = _storage_key(t)
        if k is not None:
            keys.add(k)
    return keys


def held_by(roots: list[Any], user: set, limit: int = 2_000_000) -> Held:
    """Sum tensor storages reachable from `roots`; stop at modules, classes, module dicts."""
    stop = {id(m.__dict__) for m in list(sys.modules.values()) if m is not None}
    seen: set[int] = set()
    stack = list(roots)
    held = Held()
    counted: set[tuple[int, int]] = set()
    visited = 0
    while stack and visited < limit:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        visited += 1
        if isinstance(obj, (types.ModuleType, type, types.FrameType)) or id(obj) in stop:
            continue
        if isinstance(obj, torch.Tensor):
            key = _storage_key(obj)
            if key is None or key in counted:
                continue
            counted.add(key)
            if key in user:
                held.user_refs += 1
                held.user_bytes += key[1]
            else:
                held.copies_count += 1
                held.copies_bytes += key[1]
                if obj.numel() <= SMALL:
                    held.small_count += 1
                else:
                    held.large_bytes += key[1]
                held.largest.append((key[1], f"{tuple(obj.shape)} {obj.dtype}"))
            continue
        stack.extend(gc.get_referents(obj))
    held.largest = sorted(held.largest, reverse=True)[:3]
    return held


def held_after_runs(
    workload: models.Workload, runs: int, **watch_kwargs: Any
) -> list[dict[str, Any]]:
    """Run `runs` watched steps with one history (like the magic's) and measure after each.

    Returns one dict per run: bytes held by the last report + recorder alone,
    and by everything (report, recorder, history of all runs).
    """
    import gradmagic
    from gradmagic.history import History

    history = History()
    out = []
    ns = workload.namespace()
    for run in range(1, runs + 1):
        with gradmagic.watch(ns, history=history, **watch_kwargs) as rec:
            workload.step()
        report = rec.report()
        user = user_storages(workload.model, extra=(workload.inputs, workload.targets))
        cell = held_by([report, rec], user)
        total = held_by([report, rec, history], user)
        out.append({"run": run, "cell": cell.as_dict(), "total": total.as_dict()})
        del report, rec
    return out


def grad_bytes(workload: models.Workload) -> int:
    return sum(
        p.grad.numel() * p.grad.element_size()
        for p in workload.model.parameters()
        if p.grad is not None
    )


# --- peak RSS --------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """This process's peak RSS (VmHWM). Not `ru_maxrss`: Linux carries that across exec,
    so a child started by a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_here(
    model: str, variant: str, steps: int, sizes: dict[str, Any] | None, graph: bool = True
) -> dict:
    """In this process: build, `steps` steps under `variant`, report peak RSS (bytes)."""
    workload = models.BUILDERS[model](**(sizes or {}))
    after_build = _rss_bytes()
    kwargs = _variant_kwargs(variant, graph)
    keep: list[Any] = []
    if kwargs is None:
        for _ in range(steps):
            workload.step()
    else:
        import gradmagic
        from gradmagic.history import History

        history = History()
        ns = workload.namespace()
        for _ in range(steps):
            with gradmagic.watch(ns, history=history, **kwargs) as rec:
                workload.step()
            keep[:] = [rec.report(), history]  # what a notebook keeps: the last report
    gc.collect()
    return {
        "model": model,
        "variant": variant,
        "steps": steps,
        "param_bytes": workload.param_bytes,
        "rss_after_build": after_build,
        "rss_end": _rss_bytes(),
        "peak_rss": _peak_rss_bytes(),
    }


def _variant_kwargs(variant: str, graph: bool) -> dict[str, Any] | None:
    return {
        "plain": None,
        "default": {"graph": graph},
        "copies": {"graph": graph, "copies": True},
    }[variant]


def peak_rss(
    model: str, variant: str, steps: int = 3, sizes: dict | None = None, graph: bool = True
) -> dict:
    """`peak_rss_here` in a fresh interpreter, so each variant has its own peak."""
    cmd = [sys.executable, os.path.abspath(__file__), "rss", model, variant, str(steps)]
    cmd += [json.dumps(sizes or {}), "graph" if graph else "nograph"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- leaks -----------------------------------------------------------------------

LEAK_SETUP = """
import weakref, torch
from torch import nn
from torch.nn import functional as F
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
refs = [weakref.ref(p) for p in model.parameters()]
"""

LEAK_CELL = """opt.zero_grad()
x = torch.randn(4, 4)
h = model[0](x)
a = model[1](h)
out = model[2](a)
loss = F.mse_loss(out, torch.zeros(4, 1))
loss.backward()
refs += [weakref.ref(t) for t in (x, h, a, out, loss)]
refs += [weakref.ref(p.grad) for p in model.parameters()]
opt.step()
"""


def _holders(tensors: list[Any], rec: Any) -> list[str]:
    """A short path from a gradmagic object to each live tensor, else its referrers' types."""
    out = []
    for t in tensors:
        path = _path_to(rec, t) if rec is not None else None
        if path:
            out.append(path)
            continue
        kinds = {type(o).__name__ for o in gc.get_referrers(t)} - {"list", "frame"}
        out.append("referrers: " + ", ".join(sorted(kinds)))
    return out


def _path_to(root: Any, target: Any, max_depth: int = 6) -> str | None:
    """Breadth-first `attr.attr[key]` path from `root` to `target` (None if not found)."""
    from collections import deque

    queue = deque([(root, type(root).__name__)])
    seen = {id(root)}
    while queue:
        obj, path = queue.popleft()
        if path.count(".") + path.count("[") >= max_depth:
            continue
        if isinstance(obj, dict):
            children = [(v, f"{path}[{k!r}]") for k, v in list(obj.items())[:10_000]]
        elif isinstance(obj, (list, tuple)):
            children = [(v, f"{path}[{i}]") for i, v in enumerate(obj[:10_000])]
        elif hasattr(obj, "__dict__") and not isinstance(obj, (type, types.ModuleType)):
            children = [(v, f"{path}.{k}") for k, v in vars(obj).items()]
        else:
            continue
        for child, child_path in children:
            if child is target:
                return child_path
            if id(child) not in seen and not isinstance(child, torch.Tensor):
                seen.add(id(child))
                queue.append((child, child_path))
    return None


@contextlib.contextmanager
def _young_gc() -> Any:
    """Freeze what exists now, so `gc.collect()` only scans what the check creates
    (a full collection walks all of torch._dynamo: ~0.3 s each)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def leak_check(shell: Any, runs: int = 100, flags: str = "-q -o rep") -> dict[str, Any]:
    """Run `%%grad FLAGS` `runs` times, drop the user's variables, count live tensors."""
    with _young_gc():
        return _leak_check(shell, runs, flags)


def _leak_check(shell: Any, runs: int, flags: str) -> dict[str, Any]:
    shell.run_cell(LEAK_SETUP)
    t0 = time.perf_counter()
    for _ in range(runs):
        result = shell.run_cell(f"%%grad {flags}\n{LEAK_CELL}")
        if not result.success:
            raise RuntimeError(f"leak cell failed: {result.error_in_exec!r}")
    elapsed = time.perf_counter() - t0
    refs = shell.user_ns["refs"]
    n_refs = len(refs)
    for name in ("model", "opt", "x", "h", "a", "out", "loss", "rep", "refs"):
        shell.user_ns.pop(name, None)
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    holders = _holders(alive[:3], None)
    n_alive = len(alive)
    del alive
    return {
        "runs": runs,
        "flags": flags,
        "weakrefs": n_refs,
        "alive": n_alive,
        "holders": holders,
        "ms_per_run": 1000 * elapsed / runs,
    }


def _watch_loop(runs: int, report: bool, copies: bool, refs: list[Any]) -> Any:
    """A script's training loop under `with gradmagic.watch() as rec:` (caller's namespace).

    Returns the last recorder, as a script would still hold it in `rec`.
    """
    from torch import nn
    from torch.nn import functional as F

    import gradmagic
    from gradmagic.history import History

    history = History()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    refs += [weakref.ref(p) for p in model.parameters()]
    for _ in range(max(runs, 1)):
        with gradmagic.watch(history=history, copies=copies) as rec:
            opt.zero_grad()
            x = torch.randn(4, 4)
            h = model[0](x)
            out = model[2](model[1](h))
            loss = F.mse_loss(out, torch.zeros(4, 1))
            loss.backward()
            opt.step()
        refs += [weakref.ref(t) for t in (x, h, out, loss)]
        refs += [weakref.ref(p.grad) for p in model.parameters()]
        if report:
            rec.report()
    return rec  # model, opt, x, h, out, loss: dropped as this frame returns


def leak_check_watch(runs: int = 100, report: bool = True, copies: bool = False) -> dict:
    """`watch()` in a script: the user keeps the last `rec` and drops everything else."""
    with _young_gc():
        return _leak_check_watch(runs, report, copies)


def _leak_check_watch(runs: int, report: bool, copies: bool) -> dict:
    refs: list[Any] = []
    rec = _watch_loop(runs, report, copies, refs)
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    holders = _holders(alive[:3], rec)
    n_alive = len(alive)
    del rec, alive
    gc.collect()
    after_rec = sum(r() is not None for r in refs)
    flags = "watch()" + (", copies=True" if copies else "")
    flags += ", rec.report() called" if report else ", no report()"
    return {
        "runs": runs,
        "flags": flags + ", last `rec` kept",
        "weakrefs": len(refs),
        "alive": n_alive,
        "alive_after_rec_dropped": after_rec,
        "holders": holders,
        "ms_per_run": float("nan"),
    }


def main(argv: list[str]) -> None:
    if len(argv) >= 4 and argv[0] == "rss":
        graph = len(argv) < 6 or argv[5] == "graph"
        sizes = json.loads(argv[4]) if len(argv) > 4 else None
        print(json.dumps(peak_rss_here(argv[1], argv[2], int(argv[3]), sizes, graph)))
        return
    raise SystemExit(
        "usage: memory.py rss MODEL {plain,default,copies} STEPS [SIZES_JSON] [graph|nograph]"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
