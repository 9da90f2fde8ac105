"""The in-memory data set every loader returns, and the per-channel normalization they share.

All three data sets are small enough to live on the training device whole (CIFAR-10 train is
50,000 x 3 x 32 x 32 float32 = 614 MB), so a ``Dataset`` is just tensors plus the facts the
training loop needs (shape, class count, how to augment). Keeping it tensors, not a
``torch.utils.data.Dataset``, lets batching and augmentation run on the device with no workers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

__all__ = ["DataError", "Dataset", "channel_stats", "normalize"]

# A channel whose train std falls below this is constant; dividing by it would blow the inputs
# up to inf/nan, so such a channel is divided by 1 instead (it maps to all zeros).
_MIN_STD = 1e-8


class DataError(ValueError):
    """Bad data input: missing or corrupt files, an unknown data set, or offline without data.

    ``str(e)`` is one line that says what is wrong and, where it helps, what to do, so the CLI
    can print it as is (exit code 2) without a traceback. It subclasses ``ValueError`` so code
    that already treats bad arguments as ``ValueError`` keeps working.
    """


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split held as tensors, already normalized, plus how to augment it.

    ``eq=False`` because field-wise ``==`` on tensors is ambiguous; two data sets compare by
    identity. Frozen so a run cannot change the data under a probe by accident; use
    ``dataclasses.replace`` (or ``to``) to derive a new one.

    Attributes:
        name: One of ``gradlab.data.DATASETS``.
        train_x: float32 (N, C, H, W), normalized per channel with the train split's statistics.
        train_y: int64 (N,) class indices in ``[0, num_classes)``.
        test_x: float32 (M, C, H, W), normalized with the *train* statistics (no test leakage).
        test_y: int64 (M,).
        channels: C.
        num_classes: Number of classes.
        image_size: H (== W).
        pad: Zero padding before the random crop used by ``augment`` (0: no crop).
        flip: Whether ``augment`` flips images horizontally at random (off for digits, where a
            mirrored digit is a different or invalid glyph).
        mean: Per-channel train mean, in the [0, 1] pixel scale, that was subtracted.
        std: Per-channel train std (population, ``correction=0``) that was divided by.
        classes: Class names, index-aligned with the labels (empty when unknown).
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    channels: int
    num_classes: int
    image_size: int
    pad: int
    flip: bool
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    classes: tuple[str, ...] = ()

    @property
    def train_size(self) -> int:
        """Number of training samples."""
        return int(self.train_y.shape[0])

    @property
    def test_size(self) -> int:
        """Number of test samples."""
        return int(self.test_y.shape[0])

    @property
    def device(self) -> torch.device:
        """Device the tensors live on."""
        return self.train_x.device

    def to(self, device: torch.device | str) -> Dataset:
        """Return a copy with every tensor on ``device`` (``self`` is left as it was).

        Copies to a CUDA device are issued with ``non_blocking=True`` so the four transfers can
        overlap; later kernels on the same stream are ordered after them, and CUDA stages a copy
        from pageable memory before the call returns, so the source may be freed at once. Every
        other copy blocks: one to the CPU could be read before it lands, and a non-blocking
        copy to MPS can read its source after the caller has freed it (pytorch#139550).
        """
        device = torch.device(device)
        non_blocking = device.type == "cuda"

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return dataclasses.replace(
            self,
            train_x=move(self.train_x),
            train_y=move(self.train_y),
            test_x=move(self.test_x),
            test_y=move(self.test_y),
        )


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and population std of an (N, C, H, W) tensor, in float64.

    Accumulated in float64 so the statistics do not depend on summation order or lose digits
    over millions of pixels; a constant channel gets std 1 (see ``_MIN_STD``).

    Returns:
        ``(mean, std)``, each a float64 tensor of shape (C,) on ``x``'s device.
    """
    std, mean = torch.std_mean(x.double(), dim=(0, 2, 3), correction=0)
    return mean, torch.where(std < _MIN_STD, torch.ones_like(std), std)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Return float32 ``(x - mean) / std`` with (C,) statistics broadcast over N, H and W."""
    shape = (1, -1, 1, 1)
    mean32 = mean.to(device=x.device, dtype=torch.float32).view(shape)
    std32 = std.to(device=x.device, dtype=torch.float32).view(shape)
    return (x.float() - mean32) / std32
