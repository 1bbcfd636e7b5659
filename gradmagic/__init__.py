"""gradmagic: make PyTorch autograd visible.

In IPython or Jupyter::

    %load_ext gradmagic

    %%grad
    loss = criterion(model(x), y)
    loss.backward()

In a script, `gradmagic.watch()` records the same and `rec.report()` gives the
report. Importing gradmagic does not import IPython.
"""

from __future__ import annotations

import sys
from typing import Any

from .capture import Recorder, watch
from .capture.recorder import REPORT_BUILDER
from .findings import Finding
from .graph.draw import graph
from .report import GradReport

__version__ = "0.1.0"
__all__ = ["Finding", "GradReport", "Recorder", "graph", "watch", "__version__"]

# The capture layer builds no report itself: `rec.report()` calls the report layer's builder.
if not REPORT_BUILDER:
    REPORT_BUILDER.append(GradReport.from_block)

_loaded: dict[int, Any] = {}


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext gradmagic`: register `%%grad` and `%grad`."""
    from .magic import load

    if id(ipython) not in _loaded:
        _loaded[id(ipython)] = load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """`%unload_ext gradmagic`: remove the magics and anything still patched."""
    from .magic import unload

    _loaded.pop(id(ipython), None)
    unload(ipython)


# GRADMAGIC=1 (see _autorun.py): a watcher put off while this package imported torch.
if "gradmagic._autorun" in sys.modules:
    sys.modules["gradmagic._autorun"].start_if_pending()
