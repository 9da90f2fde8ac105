"""Which samples each training step sees: seeded, resumable, drop-last mini-batches.

Batch indices are a pure function of (seed, step), so a run resumed from a checkpoint at step k
sees exactly the batches the uninterrupted run would have seen, and two runs with the same seed
see the same data in the same order whatever device they train on.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from gradlab.data.dataset import DataError

__all__ = ["batches", "epoch_permutation", "steps_per_epoch"]

# Spreads (seed, epoch) pairs over generator seeds so that seed s, epoch e+1 never collides with
# seed s+1, epoch e (as seed + epoch would) for any run shorter than a million epochs.
_EPOCH_STRIDE = 1_000_003


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches per epoch, ``n // batch_size`` (the incomplete last batch is dropped).

    Dropping it keeps every step's batch the same size, so per-step statistics (gradient norms,
    BatchNorm batch statistics) are comparable across steps.

    Raises:
        DataError: If ``batch_size`` is not positive or exceeds ``n`` (an epoch would have no
            steps and training would never start).
    """
    if batch_size <= 0:
        raise DataError(f"batch size must be positive, got {batch_size}")
    if batch_size > n:
        raise DataError(f"batch size {batch_size} is larger than the {n} training samples")
    return n // batch_size


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of ``epoch``: an int64 CPU permutation of ``range(n)``."""
    g = torch.Generator().manual_seed(seed * _EPOCH_STRIDE + epoch)
    return torch.randperm(n, generator=g)


def batches(n: int, batch_size: int, seed: int, start_step: int = 0) -> Iterator[torch.Tensor]:
    """Yield index tensors (int64, CPU, length ``batch_size``) for steps start_step, ... forever.

    Epoch e uses ``epoch_permutation(n, seed, e)``, cut into consecutive slices of
    ``batch_size``; the remainder is dropped. Starting at ``start_step`` jumps straight to epoch
    ``start_step // steps_per_epoch`` and the right slice in it, so resuming costs one
    permutation, not a replay of the skipped steps.

    Args:
        n: Number of training samples.
        batch_size: Samples per step, ``1 <= batch_size <= n``.
        seed: Run seed.
        start_step: Global step of the first batch yielded (0-based).

    Raises:
        DataError: For a batch size that does not fit (see ``steps_per_epoch``); raised on the
            call, not at the first ``next``.
        ValueError: If ``start_step`` is negative.
    """
    spe = steps_per_epoch(n, batch_size)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    return _batches(n, batch_size, seed, spe, start_step)


def _batches(
    n: int, batch_size: int, seed: int, spe: int, start_step: int
) -> Iterator[torch.Tensor]:
    """The generator behind ``batches``, split out so argument errors surface on the call."""
    epoch, offset = divmod(start_step, spe)
    while True:
        perm = epoch_permutation(n, seed, epoch)
        for i in range(offset, spe):
            yield perm[i * batch_size : (i + 1) * batch_size]
        epoch, offset = epoch + 1, 0
