"""Training throughput: gradlab's step against a plain hand-written PyTorch loop, images/s.

gradlab's loop is :class:`gradlab.training.Trainer` on its default fast path (on CPU:
channels_last, foreach SGD, the data set held as tensors on the device, one batched crop+flip
per step), timed without a probe and with the probe logging every 10 steps (rows handed to the
same background Parquet + TensorBoard writer a run uses, drained inside the timed block).

The hand-written loop is the way popular reference implementations train CIFAR ResNets
(kuangliu/pytorch-cifar, akamaster/pytorch_resnet_cifar10): NCHW float32, a
``torch.utils.data.DataLoader`` over a map-style Dataset whose ``__getitem__`` augments one
sample at a time (4-pixel zero pad, random 32x32 crop, random horizontal flip; torch ops, since
torchvision is not a dependency), ``shuffle=True``, ``optimizer.zero_grad()``, default
``torch.optim.SGD`` (momentum 0.9, weight decay 1e-4), ``loss.item()`` for the running loss.
It is, if anything, flattered: the images are already normalized float tensors, so the
per-sample ``ToTensor``/``Normalize`` of the reference pipelines is not paid. It runs with
``num_workers=0`` and ``num_workers=2`` (persistent workers, so epoch restarts do not re-fork);
on a 2-core CPU the workers compete with the two compute threads, so both are shown.

Same model (``gradlab.create_model``), batch, data (synthetic CIFAR-shaped tensors) and device
for all. Modes run in blocks of ``--block`` steps, round-robin in one process, so drift in
machine speed hits every mode alike; images/s is batch / median seconds per step over blocks.

``--variants`` times gradlab's step with one fast-path piece changed at a time (channels_last
off, foreach off, bf16 autocast forced on or off, 1 or 2 threads, augmentation off, or
per-sample DataLoader augmentation feeding the same step), relative to the default fast path.

    python benchmarks/throughput.py                        # resnet56 and resnet20, batch 128
    python benchmarks/throughput.py --quick                # resnet20, 3 rounds of 3-step blocks
    python benchmarks/throughput.py --variants             # what each fast-path piece pays
    python benchmarks/throughput.py --models resnet110 --rounds 10 --block 20
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from gradlab import create_model
from gradlab.config import TrainConfig
from gradlab.dashboard import Dashboard
from gradlab.data import Dataset, batches, load_dataset
from gradlab.runs import MetricWriter
from gradlab.training import Trainer, _Sink, resolve_device


# -- the hand-written reference loop -------------------------------------------------------------
class PerSampleCIFAR(torch.utils.data.Dataset):
    """Map-style Dataset of (C, H, W) tensors with the reference per-sample augmentation."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, pad: int = 4, augment: bool = True):
        self.x, self.y, self.pad, self.augment = x, y, pad, augment

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.x[i]
        if self.augment:
            # transforms.RandomCrop(32, padding=4) + RandomHorizontalFlip(), in torch ops.
            h, w = img.shape[1:]
            p = F.pad(img, (self.pad, self.pad, self.pad, self.pad))
            top = int(torch.randint(0, 2 * self.pad + 1, ()))
            left = int(torch.randint(0, 2 * self.pad + 1, ()))
            img = p[:, top:top + h, left:left + w]
            if torch.rand(()) < 0.5:
                img = img.flip(-1)
            img = img.contiguous()
        return img, self.y[i]


def endless(loader: torch.utils.data.DataLoader) -> Iterator:
    """Batches forever, a new epoch (a new shuffle) whenever the loader is exhausted."""
    while True:
        yield from loader


class HandWritten:
    """The reference loop: DataLoader, NCHW float32 model, default SGD."""

    def __init__(self, model_name: str, data: Dataset, batch: int, device: torch.device,
                 workers: int, seed: int = 0):
        torch.manual_seed(seed)
        self.device = device
        self.model = create_model(model_name, num_classes=data.num_classes,
                                  in_channels=data.channels).to(device)
        self.model.train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9,
                                   weight_decay=1e-4)
        ds = PerSampleCIFAR(data.train_x.cpu(), data.train_y.cpu(), data.pad)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
            persistent_workers=workers > 0, pin_memory=device.type == "cuda")
        self.it = endless(loader)
        self.running_loss = 0.0

    def step(self) -> None:
        x, y = next(self.it)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        out = self.model(x)
        loss = F.cross_entropy(out, y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.running_loss += loss.item()  # as the reference loops do, for their progress line


# -- gradlab's loop ------------------------------------------------------------------------------
class GradlabLoop:
    """gradlab's Trainer.step with its index stream, optionally probed every N steps."""

    def __init__(self, cfg: TrainConfig, data: Dataset, device: torch.device, *,
                 probe_every: int | None = None, tmp: Path | None = None,
                 foreach: bool | None = None, threads: int | None = None,
                 loader_workers: int | None = None):
        self.tr = Trainer(cfg, data, device, probe=probe_every is not None)
        if foreach is not None:  # the foreach toggle of --variants: same hyper-parameters
            self.tr.opt = torch.optim.SGD(self.tr.model.parameters(), lr=cfg.lr,
                                          momentum=cfg.momentum,
                                          weight_decay=cfg.weight_decay, foreach=foreach)
        self.every, self.threads = probe_every, threads
        self.it = batches(data.train_size, cfg.batch_size, seed=cfg.seed)
        self.count = 0
        self.sink = self.dash = None
        self.loader = None
        if loader_workers is not None:
            # Per-sample host augmentation (the reference DataLoader) feeding the same step:
            # the step then indexes a one-batch "data set" with cfg.augment off.
            self.loader = endless(torch.utils.data.DataLoader(
                PerSampleCIFAR(data.train_x.cpu(), data.train_y.cpu(), data.pad),
                batch_size=cfg.batch_size, shuffle=True, num_workers=loader_workers,
                drop_last=True, persistent_workers=loader_workers > 0))
            self.arange = torch.arange(cfg.batch_size)
        if probe_every is not None:
            assert tmp is not None
            writer = MetricWriter(tmp / "metrics")
            self.dash = Dashboard(tmp / "tb", {"name": cfg.model, "config": cfg.to_dict()})
            self.sink = _Sink(writer, self.dash)

    def step(self) -> None:
        logged = self.every is not None and self.count % self.every == 0
        if self.loader is not None:
            x, y = next(self.loader)
            self.tr.data = dataclasses.replace(self.tr.data, train_x=x.to(self.tr.device),
                                               train_y=y.to(self.tr.device))
            idx = self.arange
        else:
            idx = next(self.it)
        _, cols, _ = self.tr.step(idx, 0.01, logged)
        if cols is not None:
            self.sink.put(self.count, cols)
        self.count += 1

    def end_block(self) -> None:
        """Charge the writer's queued work to this block (see probe_overhead.drain)."""
        if self.sink is not None:
            self.sink._q.join()
            self.dash._writer.flush()

    def close(self) -> None:
        if self.sink is not None:
            self.sink.flush()
            self.sink.close()
            self.dash.close()


# -- timing --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Mode:
    name: str
    step: Callable[[], None]
    end_block: Callable[[], None] = lambda: None
    threads: int | None = None


def interleave(modes: list[Mode], rounds: int, block: int, device: torch.device
               ) -> dict[str, float]:
    """Median seconds per step of each mode over ``rounds`` round-robin blocks (after one
    warm-up block each)."""
    default_threads = torch.get_num_threads()

    def run_block(m: Mode) -> float:
        torch.set_num_threads(m.threads or default_threads)
        try:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(block):
                m.step()
            m.end_block()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - t0) / block
        finally:
            torch.set_num_threads(default_threads)

    for m in modes:  # warm-up: allocator, oneDNN primitives, DataLoader workers, probe setup
        run_block(m)
    times: dict[str, list[float]] = {m.name: [] for m in modes}
    for _ in range(rounds):
        for m in modes:
            times[m.name].append(run_block(m))
    return {k: statistics.median(v) for k, v in times.items()}


def synthetic(batch: int, train_size: int, device: torch.device) -> Dataset:
    return load_dataset("synthetic", synthetic_size=max(train_size, 2 * batch)).to(device)


def compare(model: str, batch: int, rounds: int, block: int, device: torch.device,
            train_size: int = 5120, workers: tuple[int, ...] = (0, 2)) -> dict[str, float]:
    """Images/s of gradlab (no probe, probe every 10, and float32: bf16 autocast off, for a
    same-precision comparison where the fast path uses bf16) and the hand-written loop(s).

    Returns ``{mode name: images/s}`` in table order.
    """
    data = synthetic(batch, train_size, device)
    cfg = TrainConfig(model=model, dataset="synthetic", batch_size=batch, steps=10**6,
                      lr=0.01, device=str(device))
    with tempfile.TemporaryDirectory() as tmp:
        plain = GradlabLoop(cfg, data, device)
        probed = GradlabLoop(cfg, data, device, probe_every=10, tmp=Path(tmp))
        fp32 = GradlabLoop(cfg.replace(amp="off"), data, device)
        modes = [Mode("gradlab", plain.step),
                 Mode("gradlab every 10", probed.step, probed.end_block),
                 Mode("gradlab float32", fp32.step)]
        hands = {w: HandWritten(model, data, batch, device, w) for w in workers}
        modes += [Mode(f"hand-written w{w}", h.step) for w, h in hands.items()]
        try:
            sec = interleave(modes, rounds, block, device)
        finally:
            probed.close()
    return {k: batch / v for k, v in sec.items()}


VARIANTS = ("fast path", "channels_last off", "foreach off", "bf16 on", "bf16 off", "1 thread",
            "2 threads", "augment off", "DataLoader aug w0")


def variants(model: str, batch: int, rounds: int, block: int, device: torch.device,
             names: tuple[str, ...] = VARIANTS, train_size: int = 5120) -> dict[str, float]:
    """Images/s of gradlab's (unprobed) step with one fast-path piece changed at a time."""
    data = synthetic(batch, train_size, device)
    base = TrainConfig(model=model, dataset="synthetic", batch_size=batch, steps=10**6,
                       lr=0.01, device=str(device))
    build: dict[str, Callable[[], GradlabLoop]] = {
        "fast path": lambda: GradlabLoop(base, data, device),
        "channels_last off": lambda: GradlabLoop(base.replace(channels_last="off"), data,
                                                 device),
        "foreach off": lambda: GradlabLoop(base, data, device, foreach=False),
        "bf16 on": lambda: GradlabLoop(base.replace(amp="bf16"), data, device),
        "bf16 off": lambda: GradlabLoop(base.replace(amp="off"), data, device),
        "1 thread": lambda: GradlabLoop(base, data, device, threads=1),
        "2 threads": lambda: GradlabLoop(base, data, device, threads=2),
        "augment off": lambda: GradlabLoop(base.replace(augment=False), data, device),
        "DataLoader aug w0": lambda: GradlabLoop(base.replace(augment=False), data, device,
                                                 loader_workers=0),
    }
    loops = {n: build[n]() for n in names}
    modes = [Mode(n, lp.step, lp.end_block, lp.threads) for n, lp in loops.items()]
    sec = interleave(modes, rounds, block, device)
    return {k: batch / v for k, v in sec.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None,
                    help="default: resnet56 resnet20 (--quick: resnet20)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--block", type=int, default=10, help="steps per timed block")
    ap.add_argument("--train-size", type=int, default=5120,
                    help="synthetic training images (epoch length of the DataLoader)")
    ap.add_argument("--workers", nargs="+", type=int, default=[0, 2],
                    help="num_workers of the hand-written loop's DataLoader")
    ap.add_argument("--variants", action="store_true",
                    help="time gradlab's step with fast-path pieces toggled instead")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="resnet20, 3 rounds of 3-step blocks")
    a = ap.parse_args()
    device = resolve_device(a.device)
    models = a.models or (["resnet20"] if a.quick else ["resnet56", "resnet20"])
    rounds, block = (3, 3) if a.quick else (a.rounds, a.block)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {a.batch_size}, {rounds} rounds of {block}-step blocks, synthetic "
          f"{a.train_size} images; images/s (median block)")
    if a.variants:
        head = f"{'model':<11}{'variant':<20}{'images/s':>10}{'vs fast path':>14}"
        print(head)
        for model in models:
            r = variants(model, a.batch_size, rounds, block, device, train_size=a.train_size)
            for name, ips in r.items():
                print(f"{model:<11}{name:<20}{ips:>10.1f}{ips / r['fast path']:>14.3f}",
                      flush=True)
        return
    hands = [f"hand-written w{w}" for w in a.workers]
    cols = ["gradlab", "gradlab every 10", "gradlab float32", *hands]
    print(f"{'model':<11}" + "".join(f"{c:>19}" for c in cols)
          + "".join(f"{'gradlab / w' + str(w):>16}" for w in a.workers)
          + "".join(f"{'float32 / w' + str(w):>16}" for w in a.workers))
    for model in models:
        r = compare(model, a.batch_size, rounds, block, device, a.train_size, tuple(a.workers))
        print(f"{model:<11}" + "".join(f"{r[c]:>19.1f}" for c in cols)
              + "".join(f"{r['gradlab'] / r[h]:>16.3f}" for h in hands)
              + "".join(f"{r['gradlab float32'] / r[h]:>16.3f}" for h in hands), flush=True)


if __name__ == "__main__":
    main()
