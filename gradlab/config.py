"""Training configuration: a frozen dataclass saved into run.json and loaded back exactly."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainConfig", "ConfigError"]


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

    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` naming the first bad value; returns self."""
        def bad(msg: str) -> None:
            raise ConfigError(msg)

        if self.steps is not None and self.steps <= 0:
            bad(f"--steps must be positive, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            bad(f"--epochs must be positive, got {self.epochs}")
        if self.batch_size <= 0:
            bad(f"--batch-size must be positive, got {self.batch_size}")
        if not self.lr > 0:
            bad(f"--lr must be positive, got {self.lr}")
        if self.every <= 0:
            bad(f"--every must be positive, got {self.every}")
        if self.eval_every is not None and self.eval_every <= 0:
            bad(f"--eval-every must be positive, got {self.eval_every}")
        if self.checkpoint_every is not None and self.checkpoint_every <= 0:
            bad(f"--checkpoint-every must be positive, got {self.checkpoint_every}")
        if self.warmup_steps < 0:
            bad(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.momentum < 1:
            bad(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            bad(f"weight decay must be >= 0, got {self.weight_decay}")
        if any(not 0 < m < 1 for m in self.milestones):
            bad(f"milestones are fractions of training in (0, 1), got {list(self.milestones)}")
        if self.shortcut not in ("A", "B"):
            bad(f"--shortcut must be A or B, got {self.shortcut!r}")
        if self.amp not in ("auto", "bf16", "off"):
            bad(f"--amp must be auto, bf16 or off, got {self.amp!r}")
        if self.channels_last not in ("auto", "on", "off"):
            bad(f"--channels-last must be auto, on or off, got {self.channels_last!r}")
        known = ("auto", "cpu", "cuda", "mps")
        if self.device not in known and not self.device.startswith("cuda:"):
            bad(f"--device must be auto, cpu, cuda or mps, got {self.device!r}")
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
        """Inverse of :meth:`to_dict`; unknown keys are refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        d = dict(d)
        if "milestones" in d:
            d["milestones"] = tuple(d["milestones"])
        return cls(**d)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)
