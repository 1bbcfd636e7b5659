"""The text of each cell the report shows, shared by the HTML and the text views."""

from __future__ import annotations

import re
from typing import Any

import torch

from .. import stats
from ..records import Change

VALUE_WIDTH = 36  # characters of a value shown in a table cell; the full text is a click away
_KWARGS = re.compile(r",\s*(dtype|device|layout|requires_grad|grad_fn|size)=.*$", re.S)


def shape_text(shape: tuple[int, ...] | None) -> str:
    if shape is None:
        return "?"
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def value_text(value: Any, symbol: str = "g") -> str:
    """A value in a table: a small tensor's numbers as PyTorch prints them, without the
    `tensor(...)` around them (shape and dtype have their own columns); a summary in one
    line, lovely-tensors style, its norm named `‖symbol‖`."""
    if isinstance(value, torch.Tensor) and stats.numel_of(value) > stats.PRINT_LIMIT:
        return stats.summary_of(value).text(symbol)
    if isinstance(value, torch.Tensor):
        text = stats.format_value(value)
        if text.startswith("tensor(") and text.endswith(")"):
            text = _KWARGS.sub("", text[len("tensor(") : -1])
        return text
    if isinstance(value, stats.TensorSummary):
        return value.text(symbol)
    return stats.format_value(value)


def added_text(row: Any) -> str:
    """What this run added: nothing for rows no backward reached."""
    if row.status in ("unchanged", "none"):
        return "—"
    if not row.added_known:
        return "unknown (changed between backwards)"
    if row.added is row.after and row.after is not None and stats.is_empty(row.before):
        return "= after"  # the whole gradient is new: no need to print it twice
    return value_text(row.added)


def then_text(change: Change) -> str:
    """A change after the last backward: `scaled ×0.0079 by `clip_grad_norm_(...)`: ...`."""
    factor = f" ×{change.factor:.4g}" if change.what == "scaled" and change.factor else ""
    by = f" by {change.by}" if change.by else ""
    if change.what == "set to None":
        return f"set to None{by}"
    return f"{change.what}{factor}{by}: {value_text(change.after)}"


def change_text(change: Any) -> str:
    """An optimizer step's change: the exact difference, or the norm of a large one."""
    if isinstance(change, float):
        return f"‖Δ‖={change:.4g}"
    return "—" if change is None else value_text(change, "Δ")


def step_texts(param: Any) -> tuple[str, str, str, str]:
    """A row of the optimizer-step table: the gradient the last step used, the parameter
    before the first step and at the end (their norms are `‖p‖`), and the change."""
    return (
        value_text(param.grad),
        value_text(param.before, "p"),
        value_text(param.after, "p"),
        change_text(param.change),
    )


def step_problem(param: Any) -> bool:
    """A parameter the step table shows first: its gradient held NaN/Inf, or it did not move."""
    return stats.nonfinite(param.grad) or (
        isinstance(param.change, torch.Tensor) and not bool(param.change.any())
    )
