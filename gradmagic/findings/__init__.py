"""Rules over a block's records: what is wrong, in plain words.

Each rule reads a `records.BlockRecord` and nothing else, and yields `Finding`s:
one sentence or two naming the tensors and the likely cause. One module per
family: accumulation, missing gradients, numerics, how the engine was called,
optimizer steps. Findings are sorted most serious first; identical ones are
said once, with a count. The `kind` strings are public API (`rep.findings[i].kind`).
"""

from __future__ import annotations

from ..records import BlockRecord
from . import (  # noqa: F401 - they register
    accumulation,
    custom,
    distributed,
    missing,
    numerics,
    optimizer,
    usage,
)
from ._base import RULES, SEVERITY_ORDER, Finding

__all__ = ["Finding", "findings_for"]


def findings_for(block: BlockRecord) -> list[Finding]:
    """Every finding for a block, most serious first, each said once."""
    found: list[Finding] = []
    for check in RULES:
        try:
            found.extend(check(block))
        except Exception as exc:  # noqa: BLE001 - one broken rule must not hide the report
            block.internal_errors.append(f"rule {check.__name__}: {type(exc).__name__}: {exc}")
    counted: dict[tuple[str, str, str], list[Finding]] = {}
    for f in found:
        counted.setdefault((f.kind, f.severity, f.message), []).append(f)
    merged = []
    for (kind, severity, message), same in counted.items():
        if len(same) == 1:
            merged.append(same[0])
        else:
            names = tuple(dict.fromkeys(n for f in same for n in f.tensors))
            merged.append(Finding(kind, severity, f"{message} (×{len(same)})", names))
    return sorted(merged, key=lambda f: SEVERITY_ORDER.get(f.severity, 3))
