"""Random CIFAR-shaped tensors for throughput benchmarks and smoke tests.

The labels are random, so nothing is learnable: use it to time the training loop and the probe
overhead at CIFAR-10's exact shapes without needing the 170 MB download.
"""

from __future__ import annotations

import torch

from gradlab.data.dataset import DataError, Dataset, channel_stats, normalize

__all__ = ["load_synthetic"]

_CHANNELS, _SIZE, _CLASSES = 3, 32, 10


def load_synthetic(size: int = 2048, seed: int = 0) -> Dataset:
    """Generate ``size`` train and ``size // 4`` test images, reproducibly from ``seed``.

    Pixels are standard normal and then normalized with the train split's statistics like every
    other data set, so the tensors obey the same contract (train mean 0, std 1 per channel).

    Args:
        size: Number of training samples; at least 4 so the test split is not empty.
        seed: Seeds a private ``torch.Generator`` (the global RNG is left alone).

    Raises:
        DataError: If ``size`` is below 4.
    """
    if size < 4:
        raise DataError(f"synthetic_size must be at least 4 (got {size})")
    g = torch.Generator().manual_seed(seed)
    shape = (_CHANNELS, _SIZE, _SIZE)
    train_x = torch.randn((size, *shape), generator=g)
    train_y = torch.randint(0, _CLASSES, (size,), generator=g)
    test_x = torch.randn((size // 4, *shape), generator=g)
    test_y = torch.randint(0, _CLASSES, (size // 4,), generator=g)
    mean, std = channel_stats(train_x)
    return Dataset(
        name="synthetic",
        train_x=normalize(train_x, mean, std),
        train_y=train_y,
        test_x=normalize(test_x, mean, std),
        test_y=test_y,
        channels=_CHANNELS,
        num_classes=_CLASSES,
        image_size=_SIZE,
        pad=4,
        flip=True,
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
        classes=tuple(f"class{i}" for i in range(_CLASSES)),
    )
