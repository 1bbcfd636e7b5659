"""Observing without touching: the engine wrapper, the probes and the readings of a
watched block. Produces a `records.BlockRecord`; imports neither findings nor the report.

`_engine.py` is the only module that touches private PyTorch API.
"""

from .recorder import Recorder
from .watch import watch

__all__ = ["Recorder", "watch"]
