"""Seeded, resumable, drop-last index batches."""

from __future__ import annotations

from itertools import islice

import pytest
import torch

from gradlab.data import DataError, batches, epoch_permutation, sampling, steps_per_epoch


def _take(it, k: int) -> list[torch.Tensor]:
    return list(islice(it, k))


def test_steps_per_epoch() -> None:
    assert steps_per_epoch(10, 3) == 3
    assert steps_per_epoch(12, 3) == 4
    assert steps_per_epoch(5, 5) == 1
    with pytest.raises(DataError, match="larger"):
        steps_per_epoch(4, 5)
    with pytest.raises(DataError, match="positive"):
        steps_per_epoch(4, 0)


def test_errors_surface_on_the_call() -> None:
    with pytest.raises(DataError):
        batches(4, 5, seed=0)
    with pytest.raises(ValueError, match="start_step"):
        batches(10, 2, seed=0, start_step=-1)


def test_batches_follow_the_documented_permutation() -> None:
    n, bs, seed = 10, 3, 7
    got = _take(batches(n, bs, seed), 6)
    for epoch in range(2):
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g)
        assert torch.equal(epoch_permutation(n, seed, epoch), perm)
        for i in range(3):
            assert torch.equal(got[epoch * 3 + i], perm[i * bs : (i + 1) * bs])


def test_drop_last_and_each_epoch_a_permutation() -> None:
    n, bs = 23, 5
    spe = steps_per_epoch(n, bs)
    got = _take(batches(n, bs, seed=1), 4 * spe)
    assert all(b.shape == (bs,) and b.dtype == torch.int64 and b.device.type == "cpu" for b in got)
    for e in range(4):
        epoch = torch.cat(got[e * spe : (e + 1) * spe])
        assert epoch.unique().numel() == spe * bs  # no repeats within an epoch
        assert epoch.min() >= 0 and epoch.max() < n
    first, second = torch.cat(got[:spe]), torch.cat(got[spe : 2 * spe])
    assert not torch.equal(first, second)  # reshuffled every epoch


@pytest.mark.parametrize("start", [0, 1, 3, 4, 5, 9, 17])
def test_resume_equals_uninterrupted(start: int) -> None:
    n, bs, seed = 19, 4, 3  # 4 steps per epoch
    full = _take(batches(n, bs, seed), start + 9)
    resumed = _take(batches(n, bs, seed, start_step=start), 9)
    assert all(torch.equal(a, b) for a, b in zip(full[start:], resumed, strict=True))


def test_resume_far_ahead_does_not_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = sampling.epoch_permutation

    def counting(n: int, seed: int, epoch: int) -> torch.Tensor:
        calls.append(epoch)
        return original(n, seed, epoch)

    monkeypatch.setattr(sampling, "epoch_permutation", counting)
    it = batches(1000, 10, seed=0, start_step=100 * 1_000 + 42)
    first = next(it)
    assert calls == [1000]
    assert torch.equal(first, original(1000, 0, 1000)[420:430])


def test_seeds_differ() -> None:
    a = torch.cat(_take(batches(50, 10, seed=0), 5))
    b = torch.cat(_take(batches(50, 10, seed=1), 5))
    assert not torch.equal(a, b)
