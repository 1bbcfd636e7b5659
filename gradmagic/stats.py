"""The content of a gradient at one moment: a value, its norm, its statistics.

A gradient read by gradmagic is a *value*: None (no `.grad`), an exact copy
(tensors of at most `values` elements, or every tensor with `copies=True`), or
a `TensorSummary` (large tensors: the norm when read, full statistics when
asked). Two readings are compared by content (`same`), never by identity or
`_version`: copies bit for bit, summaries by their norm to `SAME_NORM`. Norms are
summed in float64 over blocks of 1M elements (BLAS's dot within a block), so a
large float32 gradient's norm is right to about 2e-6, and a non-zero gradient
never has norm 0 (tiny ones are taken again in float64). Tensors whose values
cannot be read (meta, fake, tensor subclasses that dispatch in Python) are
summaries with `norm=None` and a note.

Callers run these functions inside `capture._engine.quiet()`, out of the
user's dispatch modes.
"""

from __future__ import annotations

import cmath
import functools
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_VALUES = 16
_BLOCK = 1 << 20  # elements per block of a norm: BLAS's float32 dot within, float64 across
# Two norms of one content can differ in their last bits (BLAS rounds by memory alignment):
# summaries closer than this, relative, hold the same content.
SAME_NORM = 1e-6
_BY_LIST_UNTIL = 64  # elements: up to here, numbers read with `tolist()` beat a kernel
# How a note starts when only this process's part of a distributed tensor was read.
PART = "this rank's"


@dataclass(frozen=True)
class TensorSummary:
    """What was read of one tensor too large to copy: its norm and range (and how many
    NaN and Inf it held, when it held some). `str()` gives the one-line summary.

    `norm is None` means its values were not read (`note` says why: "no values
    (meta)", "not measured (...)"); `min`/`max` are None where only the norm was
    read (a complex tensor, a parameter measured around an optimizer step).
    """

    shape: tuple[int, ...] | None
    dtype: str
    numel: int
    norm: float | None
    min: float | None = None
    max: float | None = None
    nan: int | None = None
    inf: int | None = None
    note: str = ""

    @property
    def readable(self) -> bool:
        return self.norm is not None

    @property
    def nonfinite(self) -> bool:
        if self.nan is not None or self.inf is not None:
            return bool(self.nan or self.inf)
        return self.norm is not None and not math.isfinite(self.norm)

    @property
    def is_zero(self) -> bool:
        return self.norm == 0.0

    @property
    def part(self) -> bool:
        """Whether the values read are one rank's part of a distributed tensor (a DTensor's
        shard): then `shape` and `numel` are that part's, and so are the statistics."""
        return self.note.startswith(PART)

    def text(self, symbol: str = "g") -> str:
        """`NaN! 3 ‖g‖=nan x∈[-0.2, 0.3]`: NaN/Inf first, the norm named `‖symbol‖`; a
        DTensor's shard says so first: `this rank's shard (32 of 64 elements): ‖g‖=7.3`."""
        if self.norm is None:
            return self.note
        parts = [f"{self.note}:"] if self.part else []
        if self.nan:
            parts.append(f"NaN! {self.nan:,}")
        if self.inf:
            parts.append(f"Inf! {self.inf:,}")
        if self.nan is None and not math.isfinite(self.norm):
            parts.append("NaN/Inf!")
        parts.append(f"‖{symbol}‖={_num(self.norm)}")
        if self.min is not None and self.max is not None:
            parts.append(f"x∈[{_num(self.min)}, {_num(self.max)}]")
        if self.note and not self.part:
            parts.append(f"({self.note})")
        return " ".join(parts)

    def __str__(self) -> str:
        return f"n={self.numel:,} {self.text()}"


def _num(x: float | None) -> str:
    if x is None:
        return "?"
    if x == 0:
        return "0"
    if math.isnan(x) or math.isinf(x):
        return str(x)
    if 1e-3 <= abs(x) < 1e4:
        return f"{x:.4g}"
    return f"{x:.2e}"


# --- which values can be read ---------------------------------------------------------------


def _plain_class(cls: type) -> bool:
    # A subclass that dispatches in Python (a wrapper subclass) would run its own code
    # on every op gradmagic makes; one that only overrides __torch_function__ is plain
    # once that is off (`quiet`).
    return getattr(cls, "__torch_dispatch__", None) is torch.Tensor.__torch_dispatch__


_PARAMETER = torch.nn.Parameter
_STRIDED = torch.strided


def computable(t: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """A plain tensor holding `t`'s values (detached, no copy where possible) and a note;
    None and the reason where its values cannot be read without running user code
    or a collective."""
    cls = type(t)
    plain = (cls is torch.Tensor or cls is _PARAMETER) and t.layout is _STRIDED
    if plain and not (t.is_meta or t.is_nested):  # the common case, in every hook
        return t.detach(), ""
    if t.is_meta:
        return None, "meta"
    note = ""
    # A subclass's own __torch_function__ stays off: what comes out is a plain tensor.
    with torch._C.DisableTorchFunctionSubclass():
        if is_dtensor(t):
            t, note = _local_part(t)
        elif not _plain_class(cls):
            return None, f"{cls.__name__}: values not read"
        if t.is_nested:
            return None, "nested"
        t = t.detach()
        if t.is_sparse:
            return t.coalesce().values(), note or "sparse"
        if t.layout != torch.strided:
            return t.to_dense(), note or "sparse"
        return t, note


def is_dtensor(t: Any) -> bool:
    """A `torch.distributed.tensor.DTensor` (FSDP2's parameters and gradients), told by its
    class without importing torch.distributed."""
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def _local_part(t: torch.Tensor) -> tuple[torch.Tensor, str]:
    """What this process holds of a DTensor, and a note when that is not the whole tensor.

    A replicated DTensor holds every value here; a sharded one a shard, and a partial one
    an addend of a sum no rank has yet: the whole would need a collective, which could
    hang when not every rank reads at the same moment. The note counts what was read.
    """
    local = t.to_local()
    placements = tuple(getattr(t, "placements", ()) or ())
    if placements and all(p.is_replicate() for p in placements):
        return local, ""
    what = "partial sum" if any(p.is_partial() for p in placements) else "shard"
    whole = numel_of(t)
    if what == "shard" and shape_of(local) == shape_of(t):
        return local, ""  # the only shard (a mesh of one): the whole tensor
    if what == "shard":
        count = f"{numel_of(local):,} of {whole:,} elements"
    else:
        count = f"{numel_of(local):,} elements"
    return local, f"{PART} {what} ({count})"


def local_copies(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Exact copies of what this process holds of each tensor (a DTensor's local part)."""
    out = []
    for t in tensors:
        if is_dtensor(t):
            with torch._C.DisableTorchFunctionSubclass():
                t = t.to_local()
        out.append(t.detach().clone())
    return out


def shape_of(t: torch.Tensor) -> tuple[int, ...] | None:
    try:
        return tuple(t.shape)
    except Exception:  # noqa: BLE001 - nested tensors have no single shape
        return None


def numel_of(t: torch.Tensor) -> int:
    try:
        return t.numel()
    except Exception:  # noqa: BLE001
        return 0


# --- reading values -------------------------------------------------------------------------


def read_values(tensors: Sequence[torch.Tensor | None], keep: int, copies: bool) -> list[Any]:
    """The value of each tensor now: None, an exact copy (at most `keep` elements, or any
    with `copies`), else a norm-only `TensorSummary`. One host sync per device."""
    out: list[Any] = [None] * len(tensors)
    large: list[tuple[int, torch.Tensor, torch.Tensor, str]] = []
    for i, t in enumerate(tensors):
        if t is None:
            continue
        v, note = computable(t)
        if v is None or note not in ("", "sparse"):
            large.append((i, t, v, note))
        elif not note and (copies or v.numel() <= keep):
            out[i] = v.clone()
        elif note and (copies or numel_of(t) <= keep):
            out[i] = t.detach().clone()  # a sparse gradient stays sparse
        else:
            large.append((i, t, v, note))
    found = norms([v for _, _, v, _ in large])
    spans = ranges([v for _, _, v, _ in large])
    for (i, t, v, note), norm, span in zip(large, found, spans):
        said = f"no values ({note})" if v is None else note
        if v is not None and norm is not None and not math.isfinite(norm):
            out[i] = _nonfinite_summary(t, v, norm, said)
            continue
        lo, hi = span if span is not None else (None, None)
        of = v if note.startswith(PART) else t  # a shard's summary counts the shard
        out[i] = TensorSummary(
            shape_of(of), dtype_name(t.dtype), numel_of(of), norm, min=lo, max=hi, note=said
        )
    return out


def _nonfinite_summary(t: torch.Tensor, v: torch.Tensor, norm: float, note: str) -> TensorSummary:
    """A large value holding NaN or Inf: how many of each, and the range of the rest."""
    flat = v.reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    nan = int(torch.isnan(flat).sum())
    finite = flat[torch.isfinite(flat)]
    lo, hi = (None, None)
    if finite.numel() and not finite.is_complex():
        lo, hi = (float(x) for x in torch.aminmax(finite))
    of = v if note.startswith(PART) else t
    return TensorSummary(
        shape_of(of),
        dtype_name(t.dtype),
        numel_of(of),
        norm,
        min=lo,
        max=hi,
        nan=nan,
        inf=flat.numel() - finite.numel() - nan,
        note=note,
    )


def not_measured(t: torch.Tensor, why: str) -> TensorSummary:
    """A value gradmagic chose not to read (it would cost a pass over a large tensor)."""
    return TensorSummary(shape_of(t), dtype_name(t.dtype), numel_of(t), None, note=why)


def norm_summary(t: torch.Tensor, norm: float | None, note: str = "") -> TensorSummary:
    """A summary known only by its norm."""
    return TensorSummary(shape_of(t), dtype_name(t.dtype), numel_of(t), norm, note=note)


def exact_copies(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Exact copies; a DTensor's of what this process holds (copying a DTensor whole would
    run its dispatch, and a plain tensor is all gradmagic reads)."""
    if any(is_dtensor(t) for t in tensors):
        return local_copies(tensors)
    return [t.detach().clone() for t in tensors]


def differences(afters: Sequence[torch.Tensor], befores: Sequence[torch.Tensor]) -> list[Any]:
    """`after - before` for each pair of plain tensors, in one batched op."""
    if not afters:
        return []
    return list(torch._foreach_sub([a.detach() for a in afters], [b.detach() for b in befores]))


# --- norms ----------------------------------------------------------------------------------


def norms(tensors: Sequence[torch.Tensor | None]) -> list[float | None]:
    """Euclidean norms, summed in float64, with one host sync per device; None where a
    tensor is None (its values could not be read)."""
    out: list[float | None] = [None] * len(tensors)
    pending: dict[torch.device, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for i, v in enumerate(tensors):
        if v is None:
            continue
        if v.numel() == 0:
            out[i] = 0.0
            continue
        if v.is_cpu and v.numel() <= _BY_LIST_UNTIL and v.layout is _STRIDED:
            out[i] = _norm_of_numbers(v.reshape(-1).tolist())
            continue
        flat = flat_real(v)
        if flat.is_cpu:  # no host sync to save: each read at once
            out[i] = norm_from_squares(flat, float(sum_of_squares(flat)))
        else:
            pending.setdefault(flat.device, []).append((i, flat, sum_of_squares(flat)))
    for items in pending.values():
        sums = torch.stack([s for _, _, s in items]).tolist()
        for (i, flat, _), total in zip(items, sums):
            out[i] = norm_from_squares(flat, total)
    return out


def ranges(tensors: Sequence[torch.Tensor | None]) -> list[tuple[float, float] | None]:
    """(min, max) of each real tensor, with one host sync per device; None where a tensor
    is None, empty or complex (a range of complex numbers means nothing)."""
    out: list[tuple[float, float] | None] = [None] * len(tensors)
    pending: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for i, v in enumerate(tensors):
        if v is None or v.numel() == 0 or v.is_complex():
            continue
        if v.is_cpu and v.numel() <= _BY_LIST_UNTIL and v.layout is _STRIDED:
            numbers = v.reshape(-1).tolist()
            nan = any(x != x for x in numbers)
            out[i] = (math.nan, math.nan) if nan else (float(min(numbers)), float(max(numbers)))
            continue
        flat = v.reshape(-1)
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()
        lo, hi = torch.aminmax(flat)
        pending.setdefault(flat.device, []).append((i, torch.stack([lo, hi]).double()))
    for items in pending.values():
        for (i, _), (lo, hi) in zip(items, torch.stack([s for _, s in items]).tolist()):
            out[i] = (lo, hi)
    return out


def _norm_of_numbers(numbers: list[Any]) -> float:
    """Norm of `tolist()` numbers, NaN and Inf as torch says them (NaN wins)."""
    if numbers and isinstance(numbers[0], complex):
        numbers = [abs(v) for v in numbers]
    norm = math.hypot(*numbers)  # scaled inside: no underflow, no overflow
    if not math.isfinite(norm) and any(v != v for v in numbers):
        return math.nan
    return norm


def flat_real(v: torch.Tensor) -> torch.Tensor:
    """A 1-D float32 or float64 tensor of `v`'s magnitudes (a copy only where needed)."""
    flat = v.reshape(-1)
    if flat.is_complex():
        flat = flat.abs()
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    return flat


def sum_of_squares(flat: torch.Tensor) -> torch.Tensor:
    """The sum of squares of a flat real tensor as a 0-dim float64 tensor: a dot product
    per block of `_BLOCK` elements (memory-bound, threaded), the blocks summed in float64."""
    if flat.numel() <= _BLOCK:
        return torch.dot(flat, flat).double()
    blocks = [torch.dot(block, block) for block in flat.split(_BLOCK)]
    return torch.stack(blocks).double().sum()


def norm_from_squares(flat: torch.Tensor, total: float) -> float:
    """The norm from a sum of squares, taken again in float64 where float32 squares may
    have underflowed (tiny gradients) or overflowed (finite values above 1e19)."""
    norm = math.sqrt(total) if total >= 0 else math.nan
    if norm == 0.0:
        if bool(flat.any()):
            norm = float(torch.linalg.vector_norm(flat, dtype=torch.float64))
    elif norm < 1e-18 or (math.isinf(norm) and not bool(torch.isinf(flat).any())):
        norm = float(torch.linalg.vector_norm(flat, dtype=torch.float64))
    return norm


# --- comparing values -----------------------------------------------------------------------


def same(a: Any, b: Any) -> bool | None:
    """Whether two readings hold the same content; None when that cannot be told
    (values that were not read)."""
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype or a.layout != b.layout:
            return False
        if a.layout != torch.strided:
            a, b = a.to_dense(), b.to_dense()
        if torch.equal(a, b):
            return True
        if a.is_floating_point() or a.is_complex():  # NaN where the other has NaN too
            return bool(((a == b) | (a.isnan() & b.isnan())).all())
        return False
    if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
        # A full copy and a norm-only reading (`copies=True` copies after a backward only).
        copy, summary = (a, b) if isinstance(a, torch.Tensor) else (b, a)
        if not isinstance(summary, TensorSummary):
            return False
        v, _ = computable(copy)
        a = TensorSummary(
            shape_of(copy), "", numel_of(copy), norms([v])[0] if v is not None else None
        )
        b = summary
    if isinstance(a, TensorSummary) and isinstance(b, TensorSummary):
        if a.norm is None or b.norm is None:
            return None
        if a.shape != b.shape:
            return False
        if a.norm == b.norm or (math.isnan(a.norm) and math.isnan(b.norm)):
            return True
        return abs(a.norm - b.norm) <= SAME_NORM * max(abs(a.norm), abs(b.norm))
    return False


def _small_numbers(v: torch.Tensor) -> list[Any] | None:
    """The numbers of a small dense CPU tensor (reading them beats a kernel), else None."""
    if v.is_cpu and v.layout is _STRIDED and v.numel() <= _BY_LIST_UNTIL:
        return v.reshape(-1).tolist()
    return None


def is_zero(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        v, _ = computable(value)
        if v is None or v.numel() == 0:
            return False
        numbers = _small_numbers(v)
        return not any(numbers) if numbers is not None else not bool(v.any())
    if isinstance(value, TensorSummary):
        return value.is_zero
    return False


def is_empty(value: Any) -> bool:
    """No gradient to add to: None, or all zeros."""
    return value is None or is_zero(value)


# Exact copies (`copies=True`, `values=N`) of more elements than this are shown, and
# checked, through their summary: PyTorch's repr would elide most of the numbers and costs
# about a millisecond per hundred elements.
PRINT_LIMIT = 64
# id(copy) -> (a weak reference to it, its summary); an entry goes with its copy.
_summaries: dict[int, tuple[weakref.ref[torch.Tensor], TensorSummary]] = {}


def summary_of(copy: torch.Tensor) -> TensorSummary:
    """One of gradmagic's own exact copies (never mutated) as a summary (norm, range,
    NaN/Inf counts), computed once per copy: the report's table, text, chart and findings
    share it."""
    key = id(copy)
    held = _summaries.get(key)
    if held is not None and held[0]() is copy:
        return held[1]
    (summary,) = read_values([copy], keep=0, copies=False)
    try:
        ref = weakref.ref(copy, lambda _, key=key: _summaries.pop(key, None))
    except TypeError:  # a tensor that cannot be weakly referenced: not kept
        return summary
    _summaries[key] = (ref, summary)
    return summary


def nonfinite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        v, _ = computable(value)
        if v is None or v.numel() == 0:
            return False
        if v.numel() > PRINT_LIMIT:
            return summary_of(value).nonfinite
        numbers = _small_numbers(v)
        if numbers is not None:
            return not finite_numbers(numbers)
        return not bool(torch.isfinite(v).all())
    if isinstance(value, TensorSummary):
        return value.nonfinite
    return False


def reading_norms(values: Sequence[Any]) -> list[float | None]:
    """The norm of each reading: a summary's as it was read, a copy's from the copy (one
    host sync per device; a norm-only pass over the copy, never over the gradient)."""
    out: list[float | None] = [None] * len(values)
    copies: list[tuple[int, torch.Tensor]] = []
    for i, value in enumerate(values):
        if isinstance(value, TensorSummary):
            out[i] = value.norm
        elif isinstance(value, torch.Tensor):
            v, _ = computable(value)
            if v is not None:
                copies.append((i, v))
    for (i, _), norm in zip(copies, norms([v for _, v in copies])):
        out[i] = norm
    return out


def norm_of(value: Any) -> float | None:
    """The norm of a reading: a copy's from its numbers, a summary's as recorded."""
    if isinstance(value, TensorSummary):
        return value.norm
    if isinstance(value, torch.Tensor):
        v, _ = computable(value)
        if v is not None and v.numel() > PRINT_LIMIT:
            return summary_of(value).norm
        return norms([v])[0] if v is not None else None
    return None


# --- numbers --------------------------------------------------------------------------------


def flat_list(values: Any) -> list[Any]:
    """The numbers of a (nested) `tolist()` result."""
    flat = values if isinstance(values, list) else [values]
    while flat and isinstance(flat[0], list):
        flat = [v for row in flat for v in row]
    return flat


def finite_numbers(numbers: list[Any]) -> bool:
    """Whether every number of a flat `tolist()` is finite: their sum is, unless it
    overflowed (then each is checked)."""
    total = sum(numbers)
    if cmath.isfinite(total) if isinstance(total, complex) else math.isfinite(total):
        return True
    return all(
        cmath.isfinite(v) if isinstance(v, complex) else math.isfinite(v)
        for v in numbers
        if isinstance(v, (float, complex))
    )


@functools.cache
def dtype_name(dtype: torch.dtype) -> str:
    """`torch.float32` -> `float32`."""
    return str(dtype).replace("torch.", "")


def device_name(t: torch.Tensor) -> str:
    """`cpu`, `cuda:0`, `meta`: where a tensor lives."""
    try:
        return "cpu" if t.is_cpu else str(t.device)
    except Exception:  # noqa: BLE001 - a subclass without a device
        return "?"


def format_value(value: object) -> str:
    """One cell of the table as text: a tensor as PyTorch prints it, else str()."""
    if value is None:
        return "None"
    if isinstance(value, torch.Tensor):
        try:
            if value.device.type == "meta":
                return f"meta tensor {tuple(value.shape)}"
            text = repr(value.cpu() if value.device.type != "cpu" else value)
        except Exception:  # noqa: BLE001 - a subclass whose repr fails: say what it is
            return f"<{type(value).__name__} {shape_of(value)} {dtype_name(value.dtype)}>"
        return " ".join(text.split())
    return str(value)


def nonfinite_words(t: torch.Tensor) -> str:
    """What non-finite values a floating tensor holds: "NaN", "-inf", "NaN and inf"; ""
    when all are finite (or it is not a floating tensor). Callers hold `quiet()`."""
    if not (t.is_floating_point() or t.is_complex()):
        return ""
    v = t.detach()
    if v.is_complex():
        v = torch.view_as_real(v)
    if bool(torch.isfinite(v).all()):
        return ""
    found = []
    if bool(torch.isnan(v).any()):
        found.append("NaN")
    if bool((v == float("inf")).any()):
        found.append("inf")
    if bool((v == float("-inf")).any()):
        found.append("-inf")
    return " and ".join(found)
