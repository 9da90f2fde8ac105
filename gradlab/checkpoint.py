"""Checkpoints: everything a resumed run needs to continue exactly as if never stopped.

Saved: model and optimizer state, the step, the augmentation generator's state and the global
torch RNG states, the config, and the names of the metric parts written up to this step (parts
written after it are repeated by a resumed run, so resume removes them). Written to a temporary
file and renamed; loaded with ``weights_only=True`` so a checkpoint cannot run code.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gradlab.runs import RunError, fsync_dir

__all__ = ["save", "load", "restore", "trim_parts", "FORMAT"]

FORMAT = 1


def save(path: Path, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
         step: int, parts: list[str], cfg) -> None:
    """Atomically write ``path`` with the state after ``step`` optimizer steps."""
    state = {
        "format": FORMAT,
        "step": int(step),
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "generator": gen.get_state(),
        # (No GPU generator state: gradlab draws no random numbers on a GPU (weights are
        # initialized on the CPU, data order and augmentation come from CPU generators), and
        # saving it would start CUDA in a CPU run and tie the file to the number of GPUs.)
        "torch_rng": torch.get_rng_state(),
        "parts": list(parts),
        "config": cfg.to_dict(),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint safely; a damaged or foreign file is a :class:`RunError`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError,
            ValueError, AttributeError, KeyError, IndexError, TypeError, struct.error) as e:
        # The weights-only unpickler meets damaged bytes with whatever its parser hits first:
        # b"hello" -> KeyError, b"(." -> IndexError, b"J" -> struct.error.
        msg = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # torch bolds part of its text
        if "WeightsUnpickler error:" in msg:
            # torch's advice (load with weights_only=False) is the one thing not to do here.
            why = msg.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0]
            why = why.split(". ")[0].rstrip(".")
            raise RunError(f"{path}: corrupt or unsafe checkpoint, refused by the weights-only "
                           f"loader ({why[:120]})") from None
        first = f"{type(e).__name__}: {msg.splitlines()[0]}" if msg else type(e).__name__
        raise RunError(f"{path}: corrupt or unreadable checkpoint ({first[:120]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise RunError(f"{path}: not a gradlab checkpoint of format {FORMAT}")
    # What resuming reads before restore(): checked here, so a damaged entry is one clear error.
    step, parts = state.get("step"), state.get("parts")
    if type(step) is not int or step < 0:
        raise RunError(f"{path}: damaged checkpoint (step {step!r} is not a step count)")
    if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
        raise RunError(f"{path}: damaged checkpoint (its list of metric parts is {parts!r:.60})")
    return state


def check_parts(path: Path, state: dict[str, Any], metrics_dir: Path) -> None:
    """Refuse (``RunError``) a checkpoint ``path`` whose list of metric parts names one that
    ``metrics_dir`` does not hold: resuming would set aside every part it does not name."""
    absent = [p for p in state["parts"] if not (metrics_dir / p).is_file()]
    if absent:
        raise RunError(f"{path}: damaged checkpoint (it covers metric parts that {metrics_dir} "
                       f"does not hold: {', '.join(absent[:3])})")


def restore(state: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer,
            gen: torch.Generator) -> int:
    """Load ``state`` into the live objects; returns the step to continue from."""
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        # (A "cuda_rng" entry of an older checkpoint is ignored: see save.)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise RunError(f"checkpoint does not match this run ({str(e).splitlines()[0][:120]})"
                       ) from None
    return int(state["step"])


def trim_parts(metrics_dir: Path, keep: list[str]) -> list[Path]:
    """Move aside the parts written after the checkpoint (a resumed run writes them again).

    They go to ``metrics/.superseded/`` rather than being deleted: nothing measured is lost, and
    readers of ``metrics/`` no longer see the rows twice.
    """
    keep_set = set(keep)
    moved = []
    for p in sorted(metrics_dir.glob("part-*.parquet")):
        if p.name not in keep_set:
            dest = metrics_dir / ".superseded"
            dest.mkdir(exist_ok=True)
            target = dest / p.name
            n = 1
            while target.exists():
                target = dest / f"{p.stem}.{n}{p.suffix}"
                n += 1
            os.replace(p, target)
            moved.append(target)
    return moved
