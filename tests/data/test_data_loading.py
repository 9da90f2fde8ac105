"""digits, synthetic, the name dispatch and Dataset.to."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from gradlab.data import DATASETS, DataError, Dataset, load_dataset


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", seed=0)


def test_datasets_constant() -> None:
    assert DATASETS == ("digits", "cifar10", "synthetic")


def test_digits_shapes_and_dtypes(digits: Dataset) -> None:
    assert digits.name == "digits"
    assert digits.train_x.shape == (1437, 1, 8, 8) and digits.test_x.shape == (360, 1, 8, 8)
    assert digits.train_x.dtype == digits.test_x.dtype == torch.float32
    assert digits.train_y.dtype == digits.test_y.dtype == torch.int64
    assert (digits.channels, digits.num_classes, digits.image_size) == (1, 10, 8)
    assert (digits.pad, digits.flip) == (1, False)
    assert (digits.train_size, digits.test_size) == (1437, 360)
    assert digits.classes == tuple(str(i) for i in range(10))
    assert digits.train_x.is_contiguous() and digits.train_x.device.type == "cpu"


def test_digits_split_is_a_partition_of_the_real_images(digits: Dataset) -> None:
    raw = load_digits()
    images = torch.as_tensor(raw.images, dtype=torch.float64) / 16
    mean, std = digits.mean[0], digits.std[0]
    both = torch.cat([digits.train_x, digits.test_x]).double()[:, 0] * std + mean
    # Every real image appears exactly once across the two splits (images are matched as rows).
    restored = {tuple(np.round(im.numpy().ravel() * 16).astype(int)) for im in both}
    original = {tuple(np.round(im.numpy().ravel() * 16).astype(int)) for im in images}
    assert restored == original
    assert (
        torch.bincount(torch.cat([digits.train_y, digits.test_y])).tolist()
        == np.bincount(raw.target).tolist()
    )


def test_digits_split_is_stratified(digits: Dataset) -> None:
    total = torch.bincount(torch.cat([digits.train_y, digits.test_y]), minlength=10).double()
    test = torch.bincount(digits.test_y, minlength=10).double()
    assert torch.all((test - 0.2 * total).abs() <= 1)


def test_digits_normalized_with_train_stats(digits: Dataset) -> None:
    std, mean = torch.std_mean(digits.train_x.double(), correction=0)
    assert abs(mean.item()) < 1e-6 and abs(std.item() - 1) < 1e-5
    # Test split: same transform, so close to but not exactly standardized.
    assert abs(digits.test_x.mean().item()) < 0.1
    # Undoing the normalization gives pixels in [0, 1].
    restored = digits.train_x.double() * digits.std[0] + digits.mean[0]
    assert restored.min() > -1e-6 and restored.max() < 1 + 1e-6


def test_digits_deterministic_by_seed(digits: Dataset) -> None:
    again = load_dataset("digits", seed=0)
    assert torch.equal(again.train_x, digits.train_x) and torch.equal(again.test_y, digits.test_y)
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.test_y, digits.test_y)
    assert not torch.equal(other.train_x, digits.train_x)


def test_synthetic() -> None:
    data = load_dataset("synthetic", seed=3, synthetic_size=64)
    assert data.train_x.shape == (64, 3, 32, 32) and data.test_x.shape == (16, 3, 32, 32)
    assert data.train_y.dtype == torch.int64 and data.train_y.max() < 10
    assert (data.channels, data.num_classes, data.image_size) == (3, 10, 32)
    assert (data.pad, data.flip) == (4, True)
    std, mean = torch.std_mean(data.train_x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, torch.zeros(3, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(std, torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)
    same = load_dataset("synthetic", seed=3, synthetic_size=64)
    assert torch.equal(same.train_x, data.train_x) and torch.equal(same.test_y, data.test_y)
    assert not torch.equal(
        load_dataset("synthetic", seed=4, synthetic_size=64).train_x, data.train_x
    )


def test_synthetic_default_size_and_too_small() -> None:
    assert load_dataset("synthetic").train_size == 2048
    with pytest.raises(DataError, match="at least 4"):
        load_dataset("synthetic", synthetic_size=3)


def test_synthetic_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_dataset("synthetic", synthetic_size=8)
    assert torch.equal(torch.rand(3), expected)


def test_name_is_case_insensitive() -> None:
    assert load_dataset(" Digits ").name == "digits"


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(DataError) as info:
        load_dataset("cifar100")
    message = str(info.value)
    assert "\n" not in message and "digits, cifar10, synthetic" in message
    assert "did you mean 'cifar10'" in message
    assert isinstance(info.value, ValueError)


def test_to_moves_every_tensor_and_returns_a_new_dataset(digits: Dataset) -> None:
    moved = digits.to("meta")
    assert moved is not digits and digits.train_x.device.type == "cpu"
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert getattr(moved, field).device.type == "meta"
    assert moved.device.type == "meta"
    assert (moved.name, moved.mean, moved.pad) == (digits.name, digits.mean, digits.pad)
    same = digits.to(torch.device("cpu"))
    assert torch.equal(same.train_x, digits.train_x)


def test_dataset_is_frozen(digits: Dataset) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        digits.pad = 3  # type: ignore[misc]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_cuda_roundtrip(digits: Dataset) -> None:
    on_gpu = digits.to("cuda")
    assert on_gpu.train_x.is_cuda and on_gpu.test_y.is_cuda
    back = on_gpu.to("cpu")
    assert torch.equal(back.train_x, digits.train_x) and torch.equal(back.test_y, digits.test_y)
