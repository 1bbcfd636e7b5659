"""`WeakIdMap`: values keyed by object identity, holding the objects weakly.

The same contract as `torch.utils.weak.WeakIdKeyDictionary` for the few calls
gradmagic makes, at a fraction of the cost: a lookup is one dict access and a
weak-reference call, with no reference object built per lookup. It runs on hot
paths: once per module call, per leaf of every backward, and per tensor a user
frame holds when it returns.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

_MISSING = object()


class WeakIdMap:
    """`map[obj] = value` by `id(obj)`; the entry goes when `obj` is collected.

    >>> import torch
    >>> m = WeakIdMap()
    >>> t = torch.zeros(1)
    >>> m[t] = "t"
    >>> m.get(t), t in m, len(m)
    ('t', True, 1)
    >>> del t
    >>> len(m)
    0
    """

    __slots__ = ("_data", "_drop", "__weakref__")

    def __init__(self) -> None:
        # id(obj) -> (weak reference to obj, value)
        self._data: dict[int, tuple[weakref.KeyedRef, Any]] = {}
        # One callback for every entry, holding the map weakly (a map that is gone has
        # nothing to clean); each reference carries its key, as in WeakValueDictionary.
        self_ref = weakref.ref(self)

        def drop(ref: weakref.KeyedRef) -> None:
            owner = self_ref()
            if owner is not None:
                item = owner._data.get(ref.key)
                if item is not None and item[0] is ref:
                    del owner._data[ref.key]

        self._drop = drop

    def get(self, obj: Any, default: Any = None) -> Any:
        item = self._data.get(id(obj))
        if item is None or item[0]() is not obj:
            return default
        return item[1]

    def __getitem__(self, obj: Any) -> Any:
        value = self.get(obj, _MISSING)
        if value is _MISSING:
            raise KeyError(obj)
        return value

    def __setitem__(self, obj: Any, value: Any) -> None:
        key = id(obj)
        item = self._data.get(key)
        if item is not None and item[0]() is obj:
            self._data[key] = (item[0], value)
            return
        self._data[key] = (weakref.KeyedRef(obj, self._drop, key), value)

    def __contains__(self, obj: Any) -> bool:
        return self.get(obj, _MISSING) is not _MISSING

    def __len__(self) -> int:
        return len(self._data)

    def values(self) -> Iterator[Any]:
        return (value for ref, value in list(self._data.values()) if ref() is not None)
