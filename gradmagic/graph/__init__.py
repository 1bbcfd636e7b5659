"""The autograd graph of a backward: plain data (`data.py`) and its graphviz drawing
(`draw.py`). `graph()` draws the graph behind any tensor::

    >>> y = (w * x).sum()
    >>> gradmagic.graph(y, {"w": w, "x": x})        # a graphviz.Digraph

Nothing here imports graphviz, IPython or pandas until a drawing is asked for.
"""

from __future__ import annotations

from typing import Any

from .data import Edge, GraphNode, GraphSnapshot, ModuleCall
from .modules import ModuleSpans
from .snapshot import snapshot  # the function: it replaces the submodule's name here

__all__ = [
    "Edge",
    "GraphNode",
    "GraphSnapshot",
    "ModuleCall",
    "ModuleSpans",
    "graph",
    "snapshot",
    "to_digraph",
]


def __getattr__(name: str) -> Any:
    # The drawing loads on first use: capture imports the data and the walk alone.
    if name in ("graph", "to_digraph"):
        from . import draw

        return getattr(draw, name)
    raise AttributeError(name)
