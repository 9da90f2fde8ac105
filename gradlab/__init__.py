"""gradlab: measure gradient and signal flow in deep plain and residual networks as they train."""

from gradlab.models import create_model, list_models, register_model
from gradlab.probing import Probe

__version__ = "0.1.0"

__all__ = ["create_model", "list_models", "register_model", "Probe", "load_run", "__version__"]


def __getattr__(name: str):
    # load_run pulls in pandas/pyarrow; import it lazily so `import gradlab` stays light.
    if name == "load_run":
        from gradlab.runs import load_run

        return load_run
    raise AttributeError(f"module 'gradlab' has no attribute {name!r}")
