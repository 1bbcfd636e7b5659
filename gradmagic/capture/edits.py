"""Wrappers around the calls that change `.grad` between backwards (`_engine.EDIT_POINTS`).

Each wrapper calls the original with the same arguments and returns what it
returns; around the call it tells the innermost active recorder what happened
(the clip coefficient, the scale a GradScaler divides by, a skipped step). The
wrappers are installed while any block is watched and removed after the last.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .. import _engine, stats
from .._patch import Patch, own_attribute
from .leaves import Edit
from .recorder import ACTIVE, Recorder

_wrappers: dict[int, Any] = {}  # id(original) -> its wrapper, made once


def _recorder() -> Recorder | None:
    recorder = ACTIVE[-1] if ACTIVE else None
    if recorder is None or recorder.closed or torch.compiler.is_compiling():
        return None
    if threading.get_ident() != recorder._thread:
        return None
    return recorder


def _ids(tensors: Any) -> frozenset[int] | None:
    """ids of the tensors a call was given, when that can be read without consuming an
    iterator (a generator of parameters is the user's to consume)."""
    if isinstance(tensors, torch.Tensor):
        return frozenset((id(tensors),))
    if isinstance(tensors, (list, tuple)):
        return frozenset(id(t) for t in tensors if isinstance(t, torch.Tensor))
    return None


def _optimizer_ids(optimizer: Any) -> frozenset[int] | None:
    try:
        return frozenset(id(p) for g in optimizer.param_groups for p in g["params"])
    except Exception:  # noqa: BLE001 - not an optimizer as torch.optim makes them
        return None


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return kwargs[name] if name in kwargs else args[index] if len(args) > index else None


# Each `_note_*` runs after the original returned and tells the recorder what it did.


def _note_clip_norm(recorder: Recorder, args: tuple, kwargs: dict, result: Any) -> None:
    params = _arg(args, kwargs, 0, "parameters")
    max_norm = float(_arg(args, kwargs, 1, "max_norm"))
    total = _arg(args, kwargs, 2, "total_norm")
    with _engine.quiet():
        total = _number(total) if isinstance(total, torch.Tensor) else None
    factor = min(1.0, max_norm / (total + 1e-6)) if total is not None else None
    edit = Edit(0, "clip_norm", factor, _ids(params))
    said = f" (total norm {total:.4g})" if total is not None else ""
    edit.text = f"`clip_grad_norm_(max_norm={max_norm:g})`{said}"
    recorder.on_edit(edit)


def _number(t: torch.Tensor) -> float | None:
    """A 0-dim tensor's number; None for a DTensor that does not hold it whole here (a
    sharded or partial norm: reading it would run a collective)."""
    v, note = stats.computable(t)
    return float(v) if v is not None and not note and v.numel() == 1 else None


def _note_clip_value(recorder: Recorder, args: tuple, kwargs: dict, result: Any) -> None:
    params = _arg(args, kwargs, 0, "parameters")
    value = float(_arg(args, kwargs, 1, "clip_value"))
    edit = Edit(0, "clip_value", None, _ids(params))
    edit.text = f"`clip_grad_value_(clip_value={value:g})`"
    recorder.on_edit(edit)


def _note_scale(recorder: Recorder, args: tuple, kwargs: dict, result: Any) -> None:
    scale = _engine.scaler_scale(args[0])
    if scale is not None:
        recorder.on_scaled(result, scale)


def _note_unscale(recorder: Recorder, args: tuple, kwargs: dict, result: Any) -> None:
    scaler, optimizer = args[0], _arg(args, kwargs, 1, "optimizer")
    scale = _engine.scaler_scale(scaler)
    if scale is None:
        return
    edit = Edit(0, "unscale", 1.0 / scale, _optimizer_ids(optimizer))
    edit.refs = (weakref.ref(scaler), weakref.ref(optimizer))
    edit.within_step = recorder.scaler_stepping > 0
    edit.text = f"`GradScaler.unscale_` (÷{scale:g})"
    recorder.on_edit(edit)


def _note_scaler_step(recorder: Recorder, args: tuple, kwargs: dict, result: Any) -> None:
    scaler, optimizer = args[0], _arg(args, kwargs, 1, "optimizer")
    found = _engine.scaler_found_inf(scaler, optimizer)
    if found is None:
        return
    edit = Edit(0, "scaler_step", None, _optimizer_ids(optimizer), skipped=found)
    edit.refs = (weakref.ref(scaler), weakref.ref(optimizer))
    edit.text = "`GradScaler.step`"
    recorder.on_edit(edit)


_NOTES: dict[str, Callable[[Recorder, tuple, dict, Any], None]] = {
    "clip_norm": _note_clip_norm,
    "clip_value": _note_clip_value,
    "scale": _note_scale,
    "unscale": _note_unscale,
    "scaler_step": _note_scaler_step,
}


def _wrap(original: Any, what: str) -> Any:
    note = _NOTES[what]

    stepping = what == "scaler_step"

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        recorder = _recorder()
        if recorder is not None and stepping:
            recorder.scaler_stepping += 1  # an unscale inside is `step`'s own
            try:
                result = original(*args, **kwargs)
            finally:
                recorder.scaler_stepping -= 1
        else:
            result = original(*args, **kwargs)
        if recorder is not None:
            recorder.guard(note, recorder, args, kwargs, result)
        return result

    wrapper.__gradmagic__ = True  # type: ignore[attr-defined]
    return wrapper


_EDITS = Patch()


def _wrapper(original: Any, what: str) -> Any:
    wrapper = _wrappers.get(id(original))
    if wrapper is None or wrapper.__wrapped__ is not original:
        wrapper = _wrappers[id(original)] = _wrap(original, what)
    return wrapper


def install() -> None:
    """Wrap every edit point (reference counted, like the engine wrapper)."""
    _EDITS.apply(
        lambda: [
            (owner, attr, _wrapper(own_attribute(owner, attr), what))
            for owner, attr, what in _engine.EDIT_POINTS
        ]
    )


def uninstall() -> None:
    _EDITS.undo()
