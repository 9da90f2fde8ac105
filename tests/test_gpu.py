"""GPU fast path: no host synchronization on unlogged steps, exactly one per logged step.

Runs only where CUDA is available (CI has no GPU); ``torch.cuda.set_sync_debug_mode("warn")``
makes every synchronizing CUDA call emit a warning, which the test counts per step.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from gradlab.config import TrainConfig
from gradlab.data import batches, load_dataset
from gradlab.training import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _sync_warnings(fn) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


@pytest.mark.parametrize("model", ["resnet20", "plain20"])
def test_one_host_sync_per_logged_step(model: str) -> None:
    device = torch.device("cuda")
    cfg = TrainConfig(model=model, dataset="synthetic", batch_size=32, steps=100)
    data = load_dataset("synthetic", synthetic_size=256).to(device)
    tr = Trainer(cfg, data, device, probe=True)
    it = batches(data.train_size, 32, seed=0)
    for step in range(3):  # warm-up: first pass learns the forward order, allocator settles
        tr.step(next(it), 0.1, logged=step == 0)
    torch.cuda.synchronize()
    unlogged = _sync_warnings(lambda: [tr.step(next(it), 0.1, logged=False) for _ in range(3)])
    torch.cuda.synchronize()
    logged = _sync_warnings(lambda: tr.step(next(it), 0.1, logged=True))
    assert unlogged == 0
    assert logged == 1


def test_bf16_channels_last_metrics_are_finite() -> None:
    device = torch.device("cuda")
    cfg = TrainConfig(model="resnet20", dataset="synthetic", batch_size=32, steps=10, amp="bf16",
                      channels_last="on")
    data = load_dataset("synthetic", synthetic_size=256).to(device)
    tr = Trainer(cfg, data, device, probe=True)
    _, cols, bad = tr.step(next(batches(data.train_size, 32, seed=0)), 0.1, logged=True)
    assert not bad and cols is not None
    assert {"residual_ratio", "response_std", "grad_norm"} <= set(cols["metric"])


def test_non_finite_unlogged_step_is_skipped_on_the_device_without_a_sync() -> None:
    device = torch.device("cuda")
    cfg = TrainConfig(model="resnet20", dataset="synthetic", batch_size=32, steps=100)
    data = load_dataset("synthetic", synthetic_size=256).to(device)
    tr = Trainer(cfg, data, device, probe=True)
    assert tr._guard
    it = batches(data.train_size, 32, seed=0)
    tr.step(next(it), 0.1, logged=True)
    poison = {"on": False}
    tr.model.fc.weight.register_hook(
        lambda g: torch.full_like(g, float("nan")) if poison["on"] else g)
    tr.step(next(it), 0.1, logged=False)
    before = [p.detach().clone() for p in tr._params]
    poison["on"] = True
    torch.cuda.synchronize()
    syncs = _sync_warnings(lambda: tr.step(next(it), 0.1, logged=False))
    poison["on"] = False
    assert syncs == 0
    assert all(torch.equal(a, p) for a, p in zip(before, tr._params, strict=True))
    _, cols, bad = tr.step(next(it), 0.1, logged=True)
    assert tr.late_bad == [1] and not bad
