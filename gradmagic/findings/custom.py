"""Custom `autograd.Function`s checked with `torch.autograd.gradcheck` (`check=True`)."""

from __future__ import annotations

from collections.abc import Iterator

from ..records import BlockRecord, CustomCheck
from ._base import Finding, rule

INPUTS = "float64 inputs drawn uniformly in [0.2, 1)"


def _shapes(check: CustomCheck) -> str:
    texts = ["?" if s is None else str(tuple(s)) for s in check.shapes]
    return ", ".join(texts)


def _input(block: BlockRecord, check: CustomCheck, i: int) -> str:
    key = check.leaf_keys[i] if i < len(check.leaf_keys) else None
    name = block.leaves[key].name if key is not None and key < len(block.leaves) else ""
    return f"input {i} (`{name}`)" if name else f"input {i}"


def _number(x: float | None) -> str:
    return "?" if x is None else f"{x:.6g}"


@rule
def custom_functions(block: BlockRecord) -> Iterator[Finding]:
    for check in block.custom_checks or []:
        fn = f"`{check.function}`"
        if check.status == "ok":
            mode = " (fast mode)" if check.fast else ""
            yield Finding(
                "custom-function-ok",
                "info",
                f"{fn}'s backward agrees with finite differences: `gradcheck`{mode} passed on "
                f"{INPUTS}, of shapes {_shapes(check)}.",
            )
        elif check.status == "not checked":
            yield Finding(
                "custom-function-unchecked",
                "info",
                f"{fn} was not checked with `gradcheck`: {check.reason}.",
            )
        elif check.input is not None and check.fast:
            yield Finding(
                "custom-function-gradient",
                "error",
                f"{fn}'s backward disagrees with finite differences for "
                f"{_input(block, check, check.input)}: along a random direction the backward "
                f"gives {_number(check.analytical)}, finite differences give "
                f"{_number(check.numerical)}, a difference of {_number(check.gap)} "
                f"(`gradcheck`'s fast mode on {INPUTS}, of shapes {_shapes(check)}).",
            )
        elif check.input is not None:
            where = f"element {list(check.element)}" if check.element else "its only element"
            yield Finding(
                "custom-function-gradient",
                "error",
                f"{fn}'s backward disagrees with finite differences for "
                f"{_input(block, check, check.input)}, at {where} (output element "
                f"{check.output_element}): the backward gives {_number(check.analytical)}, "
                f"finite differences give {_number(check.numerical)}, a difference of "
                f"{_number(check.gap)} (`gradcheck` on {INPUTS}, of shapes {_shapes(check)}).",
            )
        else:
            yield Finding(
                "custom-function-gradient",
                "error",
                f"{fn}'s backward failed `gradcheck` on {INPUTS}, of shapes {_shapes(check)}: "
                f"{check.detail}.",
            )
