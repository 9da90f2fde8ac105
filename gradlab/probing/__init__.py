"""Hooks that measure gradient and signal flow: :class:`Probe` and the metric formulas."""

from gradlab.probing.metrics import ALL_METRICS, BLOCK_METRICS, LAYER_METRICS, SCALAR_METRICS
from gradlab.probing.probe import PendingFrame, Probe

__all__ = ["Probe", "PendingFrame", "ALL_METRICS", "BLOCK_METRICS", "LAYER_METRICS",
           "SCALAR_METRICS"]
