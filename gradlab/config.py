"""Training configuration: a frozen dataclass saved into run.json and loaded back exactly."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TrainConfig", "ConfigError", "stored_dir"]


def stored_dir(path: str) -> str:
    """A folder (``data_dir``) as a run stores it: absolute, ``~`` expanded, links resolved, so
    that it names the same folder to a resume started anywhere."""
    return str(Path(path).expanduser().resolve())


# Step counters (steps, every, ...) are int64 in the metrics table and in checkpoints.
_MAX_STEP = 2**63 - 1
# The sampler seeds epoch e of seed s with s * 1_000_003 + e (gradlab.data.sampling), which keeps
# every (seed, epoch) distinct only below a million epochs; no real run comes near.
_MAX_EPOCHS = 1_000_000
# torch stores a device index in an int8: "cuda:128" silently becomes device -128.
_MAX_DEVICE_INDEX = 127
_CUDA_INDEX = re.compile(r"cuda:(0|[1-9][0-9]{0,2})")
# The command-line option of a field, for messages that a user of `gradlab probe` can act on.
_OPTION = {"steps": "--steps", "epochs": "--epochs", "batch_size": "--batch-size",
           "lr": "--lr", "warmup_lr": "--warmup-lr", "warmup_steps": "--warmup-steps",
           "every": "--every", "eval_every": "--eval-every",
           "checkpoint_every": "--checkpoint-every"}


class ConfigError(ValueError):
    """An invalid option value; ``str(e)`` is one line for the CLI."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (He et al. 2015, sec. 4.2 defaults).

    ``steps`` wins over ``epochs``; with neither, the run trains 600 steps. The learning rate is
    ``lr`` divided by 10 at each fraction of training in ``milestones`` (the paper's 32k/48k of
    64k iterations = 0.5, 0.75). During the first ``warmup_steps`` it is ``warmup_lr`` instead
    (the paper's 0.01 warm-up for ResNet-110, held constant, then the full rate).
    """

    model: str = "resnet56"
    dataset: str = "digits"
    data_dir: str | None = None
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: tuple[float, ...] = (0.5, 0.75)
    lr_decay: float = 0.1
    warmup_steps: int = 0
    warmup_lr: float = 0.01
    every: int = 10
    eval_every: int | None = None
    checkpoint_every: int | None = None
    seed: int = 0
    device: str = "auto"
    shortcut: str = "A"
    zero_init_residual: bool = False
    amp: str = "auto"
    channels_last: str = "auto"
    compile: bool = False
    augment: bool = True
    nonfinite: str = "stop"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.milestones, list):  # JSON and TOML have no tuples; frozen means tuple
            object.__setattr__(self, "milestones", tuple(self.milestones))

    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` naming the first bad value; returns self.

        Types are checked first (a hand-edited run.json can hold anything JSON can), so the
        range checks below never meet a string or a list; then every number must be finite and
        in its range, so nothing invalid reaches the data loaders, torch or the schedule.
        """
        self._check_types()

        def bad(msg: str) -> None:
            raise ConfigError(msg)

        for name in ("epochs", "lr", "warmup_lr", "lr_decay", "momentum", "weight_decay"):
            value = getattr(self, name)
            if value is not None and not _finite(value):
                bad(f"{_OPTION.get(name, name)} must be a finite number, got {_show(value)}")
        for name in ("steps", "batch_size", "every", "eval_every", "checkpoint_every",
                     "warmup_steps"):
            value = getattr(self, name)
            if value is not None and value > _MAX_STEP:  # step counters are int64 on disk
                bad(f"{_OPTION[name]} must be at most 2**63 - 1, got {_show(value)}")
        if self.steps is not None and self.steps <= 0:
            bad(f"--steps must be positive, got {_show(self.steps)}")
        if self.epochs is not None and not 0 < self.epochs <= _MAX_EPOCHS:
            bad(f"--epochs must be in (0, {_MAX_EPOCHS:,}], got {_show(self.epochs)}")
        if self.batch_size <= 0:
            bad(f"--batch-size must be positive, got {_show(self.batch_size)}")
        if not self.lr > 0:
            bad(f"--lr must be positive, got {_show(self.lr)}")
        if not self.warmup_lr > 0:  # replaces lr for the first warmup_steps steps (lr_at)
            bad(f"--warmup-lr must be positive, got {_show(self.warmup_lr)}")
        if not 0 < self.lr_decay <= 1:  # lr is multiplied by it at each milestone (lr_at)
            bad(f"lr_decay must be in (0, 1], got {_show(self.lr_decay)}")
        if self.every <= 0:
            bad(f"--every must be positive, got {_show(self.every)}")
        if self.eval_every is not None and self.eval_every <= 0:
            bad(f"--eval-every must be positive, got {_show(self.eval_every)}")
        if self.checkpoint_every is not None and self.checkpoint_every <= 0:
            bad(f"--checkpoint-every must be positive, got {_show(self.checkpoint_every)}")
        if self.warmup_steps < 0:
            bad(f"--warmup-steps must be >= 0, got {_show(self.warmup_steps)}")
        if not 0 <= self.momentum < 1:
            bad(f"momentum must be in [0, 1), got {_show(self.momentum)}")
        if self.weight_decay < 0:
            bad(f"weight decay must be >= 0, got {_show(self.weight_decay)}")
        if any(not (_finite(m) and 0 < m < 1) for m in self.milestones):
            bad(f"milestones are fractions of training in (0, 1), "
                f"got {_show(list(self.milestones))}")
        if not 0 <= self.seed < 2**32:
            bad(f"--seed must be in [0, 2**32), got {_show(self.seed)}")
        if self.data_dir is not None and "\x00" in self.data_dir:
            bad(f"--data-dir must not contain a NUL character, got {self.data_dir!r}")
        if self.shortcut not in ("A", "B"):
            bad(f"--shortcut must be A or B, got {self.shortcut!r}")
        if self.amp not in ("auto", "bf16", "off"):
            bad(f"--amp must be auto, bf16 or off, got {self.amp!r}")
        if self.channels_last not in ("auto", "on", "off"):
            bad(f"--channels-last must be auto, on or off, got {self.channels_last!r}")
        index = _CUDA_INDEX.fullmatch(self.device)
        if self.device not in ("auto", "cpu", "cuda", "mps") and not (
                index and int(index[1]) <= _MAX_DEVICE_INDEX):
            bad(f"--device must be auto, cpu, cuda, cuda:N (N from 0 to {_MAX_DEVICE_INDEX}) "
                f"or mps, got {_show(self.device)}")
        if self.nonfinite not in ("stop", "skip"):
            bad(f"--on-nonfinite must be stop or skip, got {self.nonfinite!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys and values of the wrong type are refused.

        Ranges are left to :meth:`validate`, so a config of another version still loads.

        Raises:
            ConfigError: naming the first unknown key or the first field of the wrong type
                (a hand-edited or damaged run.json), never TypeError or ValueError.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a table of fields, got {_show(d)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        cfg = cls(**d)
        cfg._check_types()
        return cfg

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (not validated: call :meth:`validate`)."""
        return dataclasses.replace(self, **changes)

    def _check_types(self) -> None:
        """Raise :class:`ConfigError` naming the first field whose value has the wrong type.

        The annotations are the specification: ints are ints (not bools), floats accept ints,
        ``tuple[float, ...]`` is a tuple of numbers, strings are strings.
        """
        hints = _hints()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _matches(value, hints[f.name]):
                shown = list(value) if isinstance(value, tuple) else value
                raise ConfigError(f"{f.name} must be {_describe(hints[f.name])}, "
                                  f"got {_show(shown)}")


@functools.cache
def _hints() -> dict[str, Any]:
    """TrainConfig's field annotations as types (they are strings under ``annotations``)."""
    return typing.get_type_hints(TrainConfig)


def _union_args(hint: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return None


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the annotated type, JSON-wise (bool is not an int)."""
    options = _union_args(hint)
    if options is not None:
        return any(_matches(value, h) for h in options)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:  # tuple[X, ...]
        return isinstance(value, tuple) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1])
                                               for k, v in value.items())
    raise TypeError(f"TrainConfig has a field of type {hint}: teach _matches about it")


def _describe(hint: Any) -> str:
    """``int | None`` -> "an integer or null" (the words of a run.json or a suite)."""
    options = _union_args(hint)
    if options is not None:
        return " or ".join(_describe(h) for h in options)
    origin = typing.get_origin(hint)
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0]).split(' ', 1)[1]}s"
    if origin is dict:
        return "a table with string keys"
    return {type(None): "null", bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}.get(hint, str(hint))


def _show(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: one short line whatever the value."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _finite(value: float) -> bool:
    """Whether a number is finite as a float (an int too large for a float is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
