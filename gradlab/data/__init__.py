"""Data for gradlab: digits (offline default), CIFAR-10 (verified download), synthetic.

Every data set loads whole into tensors (``Dataset``), normalized per channel with train-split
statistics; training draws index batches from ``batches`` and augments them on its own device
with ``augment``.

Example:
    >>> data = load_dataset("digits", seed=0).to("cpu")
    >>> for step, idx in zip(range(2), batches(data.train_size, 128, seed=0)):
    ...     x = augment(data.train_x[idx], data.pad, data.flip)
"""

from gradlab.data.augment import augment, to_device
from gradlab.data.dataset import DataError, Dataset, channel_stats, normalize
from gradlab.data.loading import DATASETS, load_dataset
from gradlab.data.sampling import batches, epoch_permutation, steps_per_epoch

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "augment",
    "batches",
    "channel_stats",
    "epoch_permutation",
    "load_dataset",
    "normalize",
    "steps_per_epoch",
    "to_device",
]
