"""scikit-learn's bundled handwritten digits: real images that need no download.

1,797 grey 8 x 8 images with pixel values 0..16 (UCI "optdigits" test set), 10 classes. Small
enough that a ResNet-56 trains on it in minutes on a CPU, which makes it the offline default for
probe suites.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits as _sklearn_load_digits
from sklearn.model_selection import train_test_split

from gradlab.data.dataset import Dataset, channel_stats, normalize

__all__ = ["load_digits"]

TEST_FRACTION = 0.2
# Pixel values in sklearn's digits run 0..16 (counts of set pixels in 4x4 blocks of 32x32 scans).
_MAX_PIXEL = 16.0


def load_digits(seed: int = 0) -> Dataset:
    """Load digits with a stratified 80/20 train/test split fixed by ``seed``.

    Stratified so every class keeps its share in both splits (the test split is only ~360
    images, so an unlucky split would skew per-class accuracy). Pixels are scaled to [0, 1],
    then normalized with the train split's mean and std.

    Args:
        seed: ``random_state`` for ``train_test_split``; the same seed gives the same split.

    Returns:
        A 1-channel, 8 x 8, 10-class ``Dataset`` with crop padding 1 and no flips.
    """
    bunch = _sklearn_load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).div_(_MAX_PIXEL).unsqueeze(1)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        range(len(labels)), test_size=TEST_FRACTION, stratify=bunch.target, random_state=seed
    )
    train_idx = torch.as_tensor(train_idx, dtype=torch.int64)
    test_idx = torch.as_tensor(test_idx, dtype=torch.int64)
    mean, std = channel_stats(images[train_idx])
    return Dataset(
        name="digits",
        train_x=normalize(images[train_idx], mean, std),
        train_y=labels[train_idx],
        test_x=normalize(images[test_idx], mean, std),
        test_y=labels[test_idx],
        channels=1,
        num_classes=10,
        image_size=8,
        pad=1,
        flip=False,
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
        classes=tuple(str(int(c)) for c in bunch.target_names),
    )
