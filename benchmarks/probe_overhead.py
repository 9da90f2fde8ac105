"""Probe overhead: time per training step with probes every N steps, as a ratio to the unprobed
gradlab loop, measured interleaved in one process.

The loop timed is gradlab's own (:class:`gradlab.training.Trainer`: on-device batches and
augmentation, forward, backward, snapshot, one host copy per logged step, optimizer step), with
the logged rows handed to the same background writer (Parquet + TensorBoard) a run uses. Modes
run in blocks of ``--block`` steps, round-robin, so drift in machine speed hits every mode alike;
the ratio is the median block time of a mode over the median block time of the unprobed loop.

Fairness details: the unprobed blocks run with every probe hook removed (checked before each
block, not assumed); each mode keeps its own step counter, so "every N" logs exactly 1 in N of
its steps whatever ``--block`` is; and each probed block waits, inside its timed region, until
the background writer has consumed what the block produced (Parquet rows buffered, TensorBoard
events serialized), so writer work is charged to the mode that caused it instead of spilling
into the next (often unprobed) block on a machine with few cores.

    python benchmarks/probe_overhead.py                  # resnet56, batch 128, every 1 / 10
    python benchmarks/probe_overhead.py --quick          # fewer rounds
    python benchmarks/probe_overhead.py --amp auto off   # also float32 where auto picks bf16
    python benchmarks/probe_overhead.py --models resnet20 resnet56 resnet110 plain56 \
        --every 1 10 100
"""

from __future__ import annotations

import argparse
import random
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


def hook_count(model: torch.nn.Module) -> int:
    """Hooks of any kind left on the model's modules and parameters (0 for the unprobed loop)."""
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        n += len(getattr(m, "_backward_pre_hooks", {}))
    for p in model.parameters():
        n += len(p._backward_hooks or {}) + len(getattr(p, "_post_accumulate_grad_hooks",
                                                        None) or {})
    return n


def drain(sink: _Sink, dash: Dashboard | None) -> None:
    """Wait until the writer thread (and the event writer behind it) has done the queued work.

    Private attributes on purpose: a benchmark must charge the writer's CPU time to the block
    that queued it, and the public ``flush`` would also write a Parquet part every block.
    """
    sink._q.join()
    if dash is not None:
        dash._writer.flush()


def measure(model: str, batch: int, everies: list[int], rounds: int, block: int,
            device: torch.device, tensorboard: bool, amp: str = "auto") -> dict[str, float]:
    cfg = TrainConfig(model=model, dataset="synthetic", batch_size=batch, steps=10**6, amp=amp)
    data = load_dataset("synthetic", synthetic_size=max(4 * batch, 1024)).to(device)
    tr = Trainer(cfg, data, device, probe=True)
    it = batches(data.train_size, batch, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        writer = MetricWriter(Path(tmp) / "metrics")
        dash = Dashboard(Path(tmp) / "tb", {"name": model, "config": cfg.to_dict()}) \
            if tensorboard else None
        sink = _Sink(writer, dash)
        step = 0
        modes: list[int | None] = [None, *everies]
        count = dict.fromkeys(modes, 0)  # per-mode step counters: exactly 1 in N steps logged

        def run_block(every: int | None) -> float:
            nonlocal step
            if every is None:
                tr.probe.detach()  # the unprobed loop: no hooks on the model at all
                if hook_count(tr.model):
                    raise RuntimeError("hooks left on the model of the unprobed loop")
            else:
                tr.probe.attach()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(block):
                logged = every is not None and count[every] % every == 0
                count[every] += 1
                _, cols, _ = tr.step(next(it), 0.01, logged)
                if cols is not None:
                    sink.put(step, cols)
                step += 1
            if every is not None:
                drain(sink, dash)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - t0) / block

        for m in modes:  # warm-up: allocator, oneDNN primitives, first-pass probe setup
            run_block(m)
        # Block times on a shared machine drift by several percent within a minute, so each
        # probed block is paired with an unprobed block right beside it (order alternating,
        # ABBA) and the ratio is taken per pair; the median over pairs is the estimate.
        ratios: dict[int, list[float]] = {m: [] for m in everies}
        base_times: list[float] = []
        for r in range(rounds):
            for m in everies:
                if r % 2 == 0:
                    t_base, t_probed = run_block(None), run_block(m)
                else:
                    t_probed, t_base = run_block(m), run_block(None)
                ratios[m].append(t_probed / t_base)
                base_times.append(t_base)
        sink.flush()
        sink.close()
        if dash is not None:
            dash.close()
    out = {"unprobed_ms": statistics.median(base_times) * 1e3, "bf16": tr.amp}
    for m in everies:
        out[f"every_{m}"] = statistics.median(ratios[m])
        out[f"every_{m}_ci"] = _median_ci(ratios[m])
    return out


def _median_ci(xs: list[float], reps: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of the median (percentile method, fixed seed)."""
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(reps))
    return meds[int(0.025 * reps)], meds[int(0.975 * reps) - 1]


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
    ap.add_argument("--amp", nargs="+", default=["auto"], choices=["auto", "bf16", "off"],
                    help="precision(s) to measure (auto: gradlab's default for the device; "
                         "bf16 on CPUs with native bf16)")
    ap.add_argument("--quick", action="store_true", help="3 rounds (a rough figure in minutes)")
    a = ap.parse_args()
    device = resolve_device(a.device)
    rounds = 3 if a.quick else a.rounds
    block = a.block or max(a.every)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {a.batch_size}, {rounds} rounds of {block}-step blocks, "
          f"TensorBoard {'off' if a.no_tensorboard else 'on'}")
    head = f"{'model':<11}{'precision':<11}{'unprobed ms/step':>18}" + "".join(
        f"{'every ' + str(e) + ' [95% CI of the median]':>36}" for e in a.every)
    print(head)
    for model in a.models:
        for amp in a.amp:
            r = measure(model, a.batch_size, a.every, rounds, block, device,
                        not a.no_tensorboard, amp)
            cells = "".join(f"{r[f'every_{e}']:>14.4f} [{r[f'every_{e}_ci'][0]:.4f}, "
                            f"{r[f'every_{e}_ci'][1]:.4f}]" for e in a.every)
            prec = "bf16" if r["bf16"] else "float32"
            print(f"{model:<11}{prec:<11}{r['unprobed_ms']:>18.1f}{cells}", flush=True)


if __name__ == "__main__":
    main()
