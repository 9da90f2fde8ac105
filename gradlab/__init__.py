"""gradlab: measure gradient and signal flow in deep plain and residual networks as they train.

The public API (``create_model``, ``list_models``, ``register_model``, ``Probe``, ``load_run``)
is imported lazily, so that reading run directories (reports) does not import torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "create_model": "gradlab.models",
    "list_models": "gradlab.models",
    "register_model": "gradlab.models",
    "Probe": "gradlab.probing",
    "load_run": "gradlab.runs",
}

__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'gradlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
