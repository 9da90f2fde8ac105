"""Probe overhead: time per training step with probes every N steps, as a ratio to the unprobed
gradlab loop, measured interleaved in one process.

The loop timed is gradlab's own (:class:`gradlab.training.Trainer`: on-device batches and
augmentation, forward, backward, snapshot, one host copy per logged step, optimizer step), with
the logged rows handed to the same background writer (Parquet + TensorBoard) a run uses. Modes
run in blocks of ``--block`` steps, round-robin, so drift in machine speed hits every mode alike;
the ratio is the median block time of a mode over the median block time of the unprobed loop.

    python benchmarks/probe_overhead.py                  # resnet56, batch 128, every 1 / 10
    python benchmarks/probe_overhead.py --quick          # fewer rounds
    python benchmarks/probe_overhead.py --models resnet20 resnet56 resnet110 plain56 --every 1 10 100
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gradlab.config import TrainConfig
from gradlab.dashboard import Dashboard
from gradlab.data import batches, load_dataset
from gradlab.runs import MetricWriter
from gradlab.training import Trainer, _Sink, resolve_device


def measure(model: str, batch: int, everies: list[int], rounds: int, block: int,
            device: torch.device, tensorboard: bool) -> dict[str, float]:
    cfg = TrainConfig(model=model, dataset="synthetic", batch_size=batch, steps=10**6)
    data = load_dataset("synthetic", synthetic_size=max(4 * batch, 1024)).to(device)
    tr = Trainer(cfg, data, device, probe=True)
    it = batches(data.train_size, batch, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        writer = MetricWriter(Path(tmp) / "metrics")
        dash = Dashboard(Path(tmp) / "tb", {"name": model, "config": cfg.to_dict()}) \
            if tensorboard else None
        sink = _Sink(writer, dash)
        step = 0

        def run_block(every: int | None) -> float:
            nonlocal step
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(block):
                logged = every is not None and i % every == 0
                _, cols, _ = tr.step(next(it), 0.01, logged)
                if cols is not None:
                    sink.put(step, cols)
                step += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - t0) / block

        modes: list[int | None] = [None, *everies]
        for m in modes:  # warm-up: allocator, oneDNN primitives, first-pass probe setup
            run_block(m)
        times: dict[int | None, list[float]] = {m: [] for m in modes}
        for _ in range(rounds):
            for m in modes:
                if m is None:
                    tr.probe.detach()  # the unprobed loop: no hooks on the model at all
                else:
                    tr.probe.attach()
                times[m].append(run_block(m))
        sink.flush()
        sink.close()
        if dash is not None:
            dash.close()
    base = statistics.median(times[None])
    out = {"unprobed_ms": base * 1e3}
    for m in everies:
        out[f"every_{m}"] = statistics.median(times[m]) / base
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet56"])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--every", nargs="+", type=int, default=[1, 10])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--block", type=int, default=None,
                    help="steps per timed block (default: the largest --every)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-tensorboard", action="store_true")
    ap.add_argument("--quick", action="store_true", help="3 rounds (a rough figure in minutes)")
    a = ap.parse_args()
    device = resolve_device(a.device)
    rounds = 3 if a.quick else a.rounds
    block = a.block or max(a.every)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {a.batch_size}, {rounds} rounds of {block}-step blocks, "
          f"TensorBoard {'off' if a.no_tensorboard else 'on'}")
    head = f"{'model':<11}{'unprobed ms/step':>18}" + "".join(f"{'every ' + str(e):>12}"
                                                              for e in a.every)
    print(head)
    for model in a.models:
        r = measure(model, a.batch_size, a.every, rounds, block, device, not a.no_tensorboard)
        print(f"{model:<11}{r['unprobed_ms']:>18.1f}" + "".join(f"{r[f'every_{e}']:>12.4f}"
                                                                 for e in a.every), flush=True)


if __name__ == "__main__":
    main()
