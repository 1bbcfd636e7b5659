"""Full statistics of large gradients (range, mean, std, zeros, NaN/Inf counts), taken
when a report is built: capture reads only norms of large gradients."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..stats import (
    TensorSummary,
    computable,
    dtype_name,
    flat_real,
    norm_from_squares,
    norm_summary,
    numel_of,
    shape_of,
    sum_of_squares,
)


def summaries(tensors: Sequence[torch.Tensor]) -> list[TensorSummary]:
    """Full statistics of many tensors: norm, mean, std, range, NaN/Inf counts and the
    share of zeros, with one host sync per device (NaN/Inf take a masked second pass)."""
    rows: list[TensorSummary | None] = [None] * len(tensors)
    todo: dict[torch.device, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for i, t in enumerate(tensors):
        v, note = computable(t)
        if v is None:
            rows[i] = norm_summary(t, None, f"no values ({note})")
        elif v.numel() == 0:
            rows[i] = norm_summary(t, 0.0, note or "empty")
        else:
            flat = flat_real(v)
            lo, hi = torch.aminmax(flat)
            std = flat.std() if flat.numel() > 1 else flat.new_zeros(())
            nonzero = torch.count_nonzero(flat).to(flat.dtype)
            parts = [x.double() for x in (flat.sum(), std, lo, hi, nonzero)]
            stack = torch.stack([sum_of_squares(flat), *parts])
            todo.setdefault(flat.device, []).append((i, flat, stack))
    for items in todo.values():
        table = torch.stack([s for _, _, s in items]).tolist()
        for (i, flat, _), (squares, total, std, lo, hi, nonzero) in zip(items, table):
            t, n = tensors[i], flat.numel()
            note = computable(t)[1]
            if not all(map(math.isfinite, (squares, total, lo, hi))):
                rows[i] = _masked_summary(t, flat, note)
                continue
            rows[i] = TensorSummary(
                shape_of(t),
                dtype_name(t.dtype),
                numel_of(t),
                norm_from_squares(flat, squares),
                mean=total / n,
                std=std,
                min=lo,
                max=hi,
                nan=0,
                inf=0,
                zero_fraction=(n - nonzero) / n,
                note=note,
            )
    return rows  # type: ignore[return-value]


def _masked_summary(t: torch.Tensor, flat: torch.Tensor, note: str) -> TensorSummary:
    """Statistics of a tensor holding NaN or Inf: counts them, leaves them out of the rest."""
    finite = torch.isfinite(flat)
    nan = int(torch.isnan(flat).sum())
    inf = int((~finite).sum()) - nan
    clean = flat[finite]
    n = flat.numel()
    stats = [float(clean.mean()), float(clean.std()) if clean.numel() > 1 else 0.0]
    lo_hi = [float(clean.min()), float(clean.max())] if clean.numel() else [math.nan] * 2
    zeros = int((flat == 0).sum()) / n
    norm = float(torch.linalg.vector_norm(flat, dtype=torch.float64))
    mean, std = stats if clean.numel() else (math.nan, math.nan)
    return TensorSummary(
        shape_of(t),
        dtype_name(t.dtype),
        numel_of(t),
        norm,
        mean=mean,
        std=std,
        min=lo_hi[0],
        max=lo_hi[1],
        nan=nan,
        inf=inf,
        zero_fraction=zeros,
        note=note,
    )
