"""`ModuleSpans`: which `nn.Module` call created each op of a graph."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import _engine
from .data import GraphSnapshot, ModuleCall


def install_module_hooks(
    pre: Callable[[nn.Module, Any], None], post: Callable[[nn.Module, Any, Any], None]
) -> list[Any]:
    """Register `pre` and `post` as global forward hooks of every `nn.Module` and return
    their handles: both or, if the second fails, neither. `post` runs also when a
    forward raises (`always_call`), so every call that starts ends."""
    hooks = nn.modules.module
    first = hooks.register_module_forward_pre_hook(pre)
    try:
        return [first, hooks.register_module_forward_hook(post, always_call=True)]
    except BaseException:
        first.remove()
        raise


@dataclass(slots=True)
class _Span:
    module: weakref.ref
    cls: str
    start: int
    end: int | None
    parent: int | None


_MAX_SPANS = 200_000


class ModuleSpans:
    """While active, record which autograd sequence numbers each module call created.

    >>> with ModuleSpans() as spans:
    ...     loss = model(x).sum()
    >>> snap, _ = snapshot([loss], leaf_key=key)
    >>> spans.assign(snap, module_name=names.get)

    Holds modules through weak references only; its own hooks (used when no
    `ModuleCalls` feeds it) are removed on exit.
    """

    def __init__(self) -> None:
        self._spans: list[_Span] = []
        self._open: list[int] = []
        self._handles: list[Any] = []
        self._counter = _engine.sequence_counter()
        self._thread = threading.get_ident()

    def __enter__(self) -> ModuleSpans:
        if self._counter is None:
            return self  # this torch has no sequence counter: nothing is grouped
        self._thread = threading.get_ident()
        self._handles = install_module_hooks(self._pre_hook, self._post_hook)
        return self

    def __exit__(self, *exc: object) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()
        self.close()

    def close(self) -> None:
        """End the calls still open (a forward interrupted by KeyboardInterrupt)."""
        if self._counter is not None:
            for i in self._open:
                self._spans[i].end = self._counter()
        self._open.clear()

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        if not torch.compiler.is_compiling() and threading.get_ident() == self._thread:
            self.enter(module)

    def _post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if not torch.compiler.is_compiling() and threading.get_ident() == self._thread:
            self.exit(module)

    def enter(self, module: nn.Module) -> None:
        """A call of `module` starts (on the recording thread, outside compilation).

        Sequence numbers count per thread: calls from other threads are not ours. A
        long training loop under one ModuleSpans stops being recorded past _MAX_SPANS
        calls.
        """
        if self._counter is None or len(self._spans) >= _MAX_SPANS:
            return
        parent = self._open[-1] if self._open else None
        span = _Span(weakref.ref(module), type(module).__name__, self._counter(), None, parent)
        self._spans.append(span)
        self._open.append(len(self._spans) - 1)

    def exit(self, module: nn.Module) -> None:
        """The call of `module` ended (returned or raised)."""
        if self._counter is None or not self._open:
            return
        end = self._counter()
        last = self._spans[self._open[-1]]
        if last.module() is module:  # the call that ends is the innermost one open
            last.end = end
            self._open.pop()
            return
        for k in range(len(self._open) - 1, -1, -1):
            if self._spans[self._open[k]].module() is module:
                for i in self._open[k:]:  # inner calls that never closed end here too
                    self._spans[i].end = end
                del self._open[k:]
                break

    def assign(
        self,
        snaps: GraphSnapshot | Sequence[GraphSnapshot],
        module_name: Callable[[nn.Module], str | None] | None = None,
    ) -> None:
        """Fill `snap.modules` and each node's innermost module call, for one
        snapshot or several (a loop's backwards: one pass over the calls for all).

        Ops belong to the innermost call whose sequence range holds theirs;
        leaves to the innermost call holding every op that consumes them.
        `module_name` names a module (`encoder`); calls it cannot name are
        named from their parent's `named_modules()`.
        """
        snaps = [snaps] if isinstance(snaps, GraphSnapshot) else list(snaps)
        if not snaps:
            return
        names = self._names(module_name)
        ops = sorted(
            (n.seq, k, n.id)
            for k, snap in enumerate(snaps)
            for n in snap.nodes
            if n.kind == "op" and n.seq is not None
        )
        owners: list[dict[int, int]] = [{} for _ in snaps]
        for (_, k, nid), span in zip(ops, _innermost(self._spans, [op[0] for op in ops])):
            if span is not None:
                owners[k][nid] = span
        for snap, owner in zip(snaps, owners):
            self._assign_one(snap, owner, names)

    def _assign_one(self, snap: GraphSnapshot, owner: dict[int, int], names: list[str]) -> None:
        used: set[int] = set()
        for span in owner.values():
            while span is not None and span not in used:
                used.add(span)
                span = self._spans[span].parent
        index = {span: i for i, span in enumerate(sorted(used))}
        snap.modules = []
        for span in sorted(used):
            s = self._spans[span]
            parent = index.get(s.parent) if s.parent is not None else None
            depth = 0 if parent is None else snap.modules[parent].depth + 1
            snap.modules.append(ModuleCall(names[span], s.cls, parent, depth))
        for nid, span in owner.items():
            snap.nodes[nid].module = index[span]
        _assign_leaves_by_consumers(snap)

    def _names(self, module_name: Callable[[nn.Module], str | None] | None) -> list[str]:
        names: list[str] = []
        inside: dict[int, dict[int, str]] = {}  # span -> id(submodule) -> relative name
        for span in self._spans:
            module = span.module()
            name = module_name(module) if module is not None and module_name else None
            if not name and module is not None and span.parent is not None:
                parent = self._spans[span.parent].module()
                if parent is not None:
                    if span.parent not in inside:
                        inside[span.parent] = {}
                        for rel, sub in parent.named_modules(remove_duplicate=False):
                            inside[span.parent].setdefault(id(sub), rel)
                    rel = inside[span.parent].get(id(module))
                    if rel:
                        prefix = names[span.parent]
                        name = f"{prefix}.{rel}" if prefix else rel
            names.append(name or "")
        return names


def _innermost(spans: list[_Span], seqs: list[int]) -> list[int | None]:
    """The innermost span holding each sequence number (`seqs` sorted), or None."""
    order = sorted(
        (i for i, s in enumerate(spans) if s.end is not None and s.end > s.start),
        key=lambda i: (spans[i].start, i),
    )
    owners: list[int | None] = []
    open_spans: list[int] = []
    k = 0
    for seq in seqs:
        while k < len(order) and spans[order[k]].start <= seq:
            open_spans.append(order[k])
            k += 1
        while open_spans and spans[open_spans[-1]].end <= seq:  # type: ignore[operator]
            open_spans.pop()
        owners.append(open_spans[-1] if open_spans else None)
    return owners


def _assign_leaves_by_consumers(snap: GraphSnapshot) -> None:
    consumers: dict[int, list[int | None]] = {}
    for e in snap.edges:
        if snap.nodes[e.src].kind == "leaf":
            consumers.setdefault(e.src, []).append(snap.nodes[e.dst].module)
    for leaf, homes in consumers.items():
        if any(h is None for h in homes):
            continue
        common = snap.chain(homes[0])
        for home in homes[1:]:
            other = snap.chain(home)
            n = 0
            while n < min(len(common), len(other)) and common[n] == other[n]:
                n += 1
            common = common[:n]
        snap.nodes[leaf].module = common[-1] if common else None
