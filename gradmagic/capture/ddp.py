"""torch.distributed as a block sees it: this process's rank, and what each
`DistributedDataParallel` that ran did to the gradients (`DDPFact`).

Everything here is read from attributes DDP keeps (its process group, the flag
`no_sync()` sets, its communication hook); nothing calls a collective.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import _engine
from ..records import DDPFact

# What the communication hooks torch ships do with the gradients, by (module, name).
_HOOKS = "torch.distributed.algorithms.ddp_comm_hooks."
_FP16 = (
    "casts them to float16, divides them by {n}, sums them over the ranks and casts back: "
    "the mean, rounded to float16"
)
KNOWN_HOOKS = {
    (_HOOKS + "default_hooks", "allreduce_hook"): (
        "divides them by {n} and sums them over the ranks: their mean, as without a hook"
    ),
    (_HOOKS + "default_hooks", "fp16_compress_hook"): _FP16,
    (_HOOKS + "default_hooks", "bf16_compress_hook"): _FP16.replace("float16", "bfloat16"),
    (_HOOKS + "debugging_hooks", "noop_hook"): "sends nothing: each rank keeps its own gradient",
    (_HOOKS + "powerSGD_hook", "powerSGD_hook"): (
        "all-reduces a low-rank approximation of them (PowerSGD): the mean, approximated"
    ),
    (_HOOKS + "powerSGD_hook", "batched_powerSGD_hook"): (
        "all-reduces a low-rank approximation of them (PowerSGD): the mean, approximated"
    ),
}
# The C++ hooks `_register_builtin_comm_hook` installs, by the name DDP's logger keeps.
BUILTIN_ALLREDUCE = "BuiltinCommHookType.ALLREDUCE"  # what DDP does without a hook
KNOWN_BUILTIN = {"BuiltinCommHookType.FP16_COMPRESS": _FP16}


def rank_and_world() -> tuple[int | None, int]:
    """This process's rank and the world size, when torch.distributed is initialised;
    (None, 1) otherwise."""
    try:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # noqa: BLE001 - a half-torn-down process group: not distributed
        pass
    return None, 1


def is_main_process() -> bool:
    """Whether this process prints what gradmagic prints on its own: rank 0, or any
    process outside torch.distributed."""
    rank, world = rank_and_world()
    return rank is None or world <= 1 or rank == 0


def _world_size(ddp: Any) -> int:
    try:
        return int(ddp.process_group.size())
    except Exception:  # noqa: BLE001 - no group object: the default group's size
        return rank_and_world()[1]


def _hook(ddp: Any, world: int) -> tuple[str, str]:
    name, fn = _engine.ddp_comm_hook(ddp)
    if not name:
        return "", ""
    if name == BUILTIN_ALLREDUCE:
        return "", ""  # DDP's own all-reduce: nothing to name
    if fn is None:
        known = KNOWN_BUILTIN.get(name, "")
    else:
        while isinstance(fn, functools.partial):
            fn = fn.func
        key = (getattr(fn, "__module__", ""), getattr(fn, "__qualname__", ""))
        known = KNOWN_HOOKS.get(key, "")
    return name, known.format(n=world)


def reduced_parameters(ddp: Any) -> list[torch.Tensor]:
    """The parameters DDP's reducer all-reduces, chosen as DDP chooses them:
    `{module path}.{name}` not in `parameters_to_ignore`. (A parameter of the wrapped
    model itself is then `.scale`, so asking DDP to ignore `scale` leaves it reduced.)"""
    ignore = set(getattr(ddp, "parameters_to_ignore", ()) or ())
    inner = getattr(ddp, "module", None)
    if not isinstance(inner, torch.nn.Module):
        return []
    found = {
        id(p): p
        for module_name, module in inner.named_modules()
        for name, p in module.named_parameters(recurse=False)
        if p.requires_grad and f"{module_name}.{name}" not in ignore
    }
    return list(found.values())


def writes_unreached(ddp: Any) -> bool:
    """Whether DDP's backward may write `.grad` of parameters this rank's graph did not
    reach: with `find_unused_parameters` (or a static graph) a parameter another rank
    used gets the all-reduced gradient here too."""
    return bool(
        getattr(ddp, "find_unused_parameters", False) or getattr(ddp, "static_graph", False)
    )


def ddp_facts(recorder: Any, namer: Any) -> list[DDPFact]:
    """One `DDPFact` per DDP module that ran a forward with gradients on in the block, and
    per DDP module of the namespace whose forward ran before it and whose parameters a
    backward of the block reached (its flag `require_forward_param_sync` says whether
    that forward ran under `no_sync()`)."""
    keys = {id(r.ref()): r.key for r in recorder.leaves if r.ref() is not None}
    reached = {id(r.ref()) for r in recorder.leaves if r.backwards and r.ref() is not None}
    ran = recorder.module_calls.ddp_modules()
    seen = {id(ddp) for ddp, _, _ in ran}
    earlier = []
    for name in namer.module_parameters():
        for module in namer.submodules(name):
            if isinstance(module, DDP) and id(module) not in seen:
                seen.add(id(module))
                if any(id(p) in reached for p in module.parameters()):
                    synced = bool(getattr(module, "require_forward_param_sync", True))
                    earlier.append((module, int(synced), int(not synced)))
    facts = []
    for ddp, synced, unsynced in ran + earlier:
        world = _world_size(ddp)
        hook, known = _hook(ddp, world)
        synced_keys, ignored_keys = [], []
        reduced = {id(p) for p in reduced_parameters(ddp)}
        inner = getattr(ddp, "module", None)
        if isinstance(inner, torch.nn.Module):
            for p in inner.parameters():
                key = keys.get(id(p))
                if key is not None and p.requires_grad:
                    (synced_keys if id(p) in reduced else ignored_keys).append(key)
        facts.append(
            DDPFact(
                name=namer.module_name(ddp) or "",
                world_size=world,
                synced=synced,
                unsynced=unsynced,
                hook=hook,
                hook_known=known,
                leaf_keys=synced_keys,
                ignored_keys=ignored_keys,
                forward_before=id(ddp) not in {id(m) for m, _, _ in ran},
            )
        )
    return facts
