"""Plain helpers shared by several test modules: the CLI, run directories, interruptions,
float64 references.

(A module, not conftest.py, so tests import these by name; ``tests`` is on ``pythonpath``.)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pandas as pd
import torch
from typer.testing import CliRunner

from gradlab.cli import app

runner = CliRunner()


def per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """Float64 L2 norm of each sample (over every dim but the first): the metrics' reference."""
    return t.double().flatten(1).norm(dim=1)


def invoke(*args):
    """Run the ``gradlab`` app in-process with every argument turned into a string."""
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *words: str) -> str:
    """Assert the CLI failed as a user error (exit 2, one stderr line naming ``words``)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gradlab: error: ") and "Traceback" not in result.output
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    return lines[0]


def snapshot(root: Path, *, mtimes: bool = False) -> dict[str, tuple | None]:
    """sha256 of every file under ``root`` (folders as None), to prove nothing changed.

    With ``mtimes`` each file's modification time is kept too, so rewriting a file with the
    same bytes also counts as a change.
    """
    return {str(p.relative_to(root)): ((hashlib.sha256(p.read_bytes()).hexdigest(),
                                        p.stat().st_mtime_ns if mtimes else None)
                                       if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def table(run_dir: Path) -> pd.DataFrame:
    """The metrics as pandas reads them, minus the wall-clock throughput, in a fixed order."""
    df = pd.read_parquet(run_dir / "metrics")
    df = df[df.metric != "images_per_s"]
    return df.sort_values(["step", "metric", "layer"]).reset_index(drop=True)


def checkpoint(run_dir: Path) -> dict:
    """The run's last checkpoint, loaded safely."""
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


def assert_same_run(a: Path, b: Path) -> None:
    """Final weights, optimizer state and metrics table of two runs are exactly equal."""
    ca, cb = checkpoint(a), checkpoint(b)
    assert ca["step"] == cb["step"]
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa)
    raw = pd.read_parquet(b / "metrics")
    assert not raw.duplicated(["step", "layer", "metric"]).any(), "rows written twice"
    pd.testing.assert_frame_equal(table(a), table(b))


class Interrupt(RuntimeError):
    """Raised by :func:`interrupt_at`: a stand-in for a run stopped from outside."""


def interrupt_at(step: int, signal_number: int | None = None):
    """An on_model callback whose hook raises at the start of training step ``step`` (or sends
    this process ``signal_number`` there, e.g. a real SIGINT)."""

    def on_model(model):
        seen = []

        def pre(mod, args):
            if mod.training and torch.is_grad_enabled():
                if len(seen) == step:
                    if signal_number is not None:
                        os.kill(os.getpid(), signal_number)
                    else:
                        raise Interrupt(f"stopped at step {step}")
                seen.append(1)

        model.register_forward_pre_hook(pre)

    return on_model


#: A suite that trains in seconds (two 6-step runs on digits); tests append [train] keys.
TINY_SUITE = """\
name = "tiny"
dataset = "digits"
models = ["resnet8", "plain8"]
seeds = [0]
steps = 6
every = 2
claims = ["degradation"]

[train]
batch_size = 16
checkpoint_every = 2
"""
