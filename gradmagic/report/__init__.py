"""`GradReport` and its views: HTML, text, the DataFrame, the gradient-flow chart.

Reads records and findings; never decides anything from a live tensor.
"""

from .history import HistoryView
from .model import GradGraph, GradReport, LeafRow

__all__ = ["GradGraph", "GradReport", "HistoryView", "LeafRow"]
