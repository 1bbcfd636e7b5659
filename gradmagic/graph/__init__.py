"""The autograd graph of a backward, as plain data and as a graphviz drawing.

`snapshot()` walks `grad_fn.next_functions` before the engine runs and keeps
names, shapes and sequence numbers only; `FlowRecorder` adds what flowed along
each edge; `ModuleSpans` tells which module call created each op; `to_digraph()`
draws it, collapsing modules and folding long stretches to stay within a node
budget. `graph()` does all of it in one call, for any tensor::

    >>> y = (w * x).sum()
    >>> gradmagic.graph(y, {"w": w, "x": x})        # a graphviz.Digraph

Nothing here imports graphviz, IPython or pandas until a drawing is asked for.
"""

from .draw import graph, to_digraph
from .flow import FLOW_ELEMENTS, FlowRecorder
from .modules import ModuleSpans
from .snapshot import Edge, GraphNode, GraphSnapshot, LiveNodes, ModuleCall, snapshot

__all__ = [
    "FLOW_ELEMENTS",
    "Edge",
    "FlowRecorder",
    "GraphNode",
    "GraphSnapshot",
    "LiveNodes",
    "ModuleCall",
    "ModuleSpans",
    "graph",
    "snapshot",
    "to_digraph",
]
