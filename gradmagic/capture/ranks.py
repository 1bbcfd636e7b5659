"""The cross-rank consistency check of `watch(check_ranks=True)`.

When a block ends, each rank fingerprints every parameter's `.grad` (the sum of
its bit patterns as integers, and its norm), the ranks exchange the fingerprints,
and the report names the parameters whose gradients differ and on which ranks.

It is a collective: every rank must run the same watched blocks with the check
on, in the same order. It runs on a gloo process group of its own, created once
(every rank creates it together, at the first check) with the timeout asked for,
so it never waits longer than that, never touches the groups the user's code
communicates on, and works beside an NCCL default group. A check that cannot run
(no process group, one rank, a timeout, a failure) says why instead of raising.
Reading the gradients changes nothing, and nothing here draws a random number.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

import torch
from torch import nn

from .. import _engine
from ..records import RankCheck, RankGradient
from .ddp import rank_and_world

# timeout in seconds -> (the default process group it was made in, the check's gloo group).
_GROUPS: dict[float, tuple[Any, Any]] = {}
_INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _fingerprint(grad: torch.Tensor | None) -> RankGradient | str:
    """A gradient's fingerprint, or why it has none."""
    if grad is None:
        return RankGradient(None, "", 0, 0.0)
    if type(grad) is not torch.Tensor:
        return f"a {type(grad).__name__}, which may hold a different part on each rank"
    if grad.layout != torch.strided:
        return "a sparse gradient"
    if grad.device.type == "meta":
        return "on the meta device (no values)"
    flat = grad.detach().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    ints = flat.view(_INTS[flat.element_size()])
    # Integer sums wrap around and do not depend on the order of the additions.
    checksum = int(ints.to(torch.int64).sum().item())
    norm = float(torch.linalg.vector_norm(flat.to(torch.float64)).item()) if flat.numel() else 0.0
    return RankGradient(tuple(grad.shape), str(grad.dtype).removeprefix("torch."), checksum, norm)


def _parameters(recorder: Any) -> list[tuple[str, torch.Tensor]]:
    """The rows that are parameters: an `nn.Parameter`, or a tensor an optimizer holds.
    Other leaves (an input that requires grad) may differ by design on each rank."""
    out = []
    for rec in sorted(recorder.block.leaves, key=lambda r: r.order):  # all, whatever `only`
        if rec.internal or not (rec.backwards or rec.grad_calls or rec.expected):
            continue
        leaf = rec.ref()
        if leaf is not None and (isinstance(leaf, nn.Parameter) or rec.optimizer):
            out.append((rec.name, leaf))
    return out


def fingerprints(recorder: Any) -> tuple[dict[str, RankGradient], dict[str, str]]:
    """This rank's fingerprint of each parameter's `.grad`, and those it could not take."""
    mine: dict[str, RankGradient] = {}
    skipped: dict[str, str] = {}
    with _engine.quiet():
        for name, leaf in _parameters(recorder):
            try:
                value = _fingerprint(leaf.grad)
            except Exception as exc:  # noqa: BLE001 - one odd gradient must not stop the check
                value = f"it could not be read ({type(exc).__name__})"
            if isinstance(value, str):
                skipped[name] = value
            else:
                mine[name] = value
    return mine, skipped


def _group(timeout: float) -> Any:
    """The check's own gloo group, created together by every rank at the first check."""
    dist = torch.distributed
    default = dist.group.WORLD
    cached = _GROUPS.get(timeout)
    if cached is not None and cached[0] is default:
        return cached[1]
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
    _GROUPS[timeout] = (default, group)
    return group


def _first_sentence(exc: BaseException) -> str:
    """The gist of a collective's error: its first sentence, without gloo's `[file:line]`."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip())
    text = re.split(r"(?<=[^.]{8})\. ", text.splitlines()[0] if text else "", maxsplit=1)[0]
    return text.rstrip(".")[:160] or type(exc).__name__


def check_ranks(recorder: Any, timeout: float) -> RankCheck:
    """Gather every rank's fingerprints of the block's parameters' gradients."""
    rank, world = rank_and_world()
    if rank is None:
        return RankCheck(error="torch.distributed is not initialised, so there is no other rank")
    if world <= 1:
        return RankCheck(world_size=world, error="the world size is 1, so there is no other rank")
    mine, skipped = fingerprints(recorder)
    dist = torch.distributed
    gathered: list[Any] = [None] * world
    try:
        # Out of the user's dispatch modes and the profiler's sight, like every tensor
        # operation of gradmagic's: the gather packs the fingerprints into tensors.
        with _engine.quiet():
            dist.all_gather_object(gathered, (mine, skipped), group=_group(timeout))
    except Exception as exc:  # noqa: BLE001 - said in the report, never raised
        _GROUPS.pop(timeout, None)  # a group whose collective failed is not used again
        text = _first_sentence(exc)
        timed_out = "timeout" in text.lower() or "timed out" in text.lower()
        if timed_out:
            error = (
                f"the other ranks did not join it within {timeout:g} s (every rank must run "
                "this block with the check on)"
            )
        else:
            error = (
                f"gathering the fingerprints failed ({text}): a rank stopped, or did not run "
                "this block with the check on"
            )
        return RankCheck(world_size=world, error=error, timed_out=timed_out)
    check = RankCheck(world_size=world)
    for their, their_skipped in gathered:
        check.grads.append(their)
        for name, why in their_skipped.items():
            check.skipped.setdefault(name, why)
    return check
