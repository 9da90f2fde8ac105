"""One entry point, ``load_dataset``, that maps a data set name to its loader."""

from __future__ import annotations

import difflib
from pathlib import Path

from gradlab.data.cifar10 import load_cifar10
from gradlab.data.dataset import DataError, Dataset
from gradlab.data.digits import load_digits
from gradlab.data.synthetic import load_synthetic

__all__ = ["DATASETS", "load_dataset"]

DATASETS: tuple[str, ...] = ("digits", "cifar10", "synthetic")


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    seed: int = 0,
    download: bool = True,
    synthetic_size: int = 2048,
) -> Dataset:
    """Load a data set by name, normalized, on the CPU (move it with ``Dataset.to``).

    Args:
        name: One of ``DATASETS`` (case-insensitive).
        data_dir: Only for cifar10: where the files are or go (default: ``$GRADLAB_DATA`` or
            ``~/.cache/gradlab/cifar10``). digits ships with scikit-learn and synthetic is
            generated, so they ignore it.
        seed: The digits train/test split and the synthetic tensors; cifar10 has a fixed
            official split and ignores it.
        download: Only for cifar10: whether missing files may be downloaded.
        synthetic_size: Train samples of the synthetic set (test gets a quarter).

    Raises:
        DataError: Unknown name, or the loader's own data errors (one line each).
    """
    key = name.strip().lower()
    if key == "digits":
        return load_digits(seed=seed)
    if key == "cifar10":
        return load_cifar10(data_dir, download=download)
    if key == "synthetic":
        return load_synthetic(size=synthetic_size, seed=seed)
    close = difflib.get_close_matches(key, DATASETS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise DataError(f"unknown data set {name!r}{hint}; choose one of: {', '.join(DATASETS)}")
