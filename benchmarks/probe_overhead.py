"""Probe overhead: time per training step with probes every N steps, as a ratio to the unprobed
gradlab loop, measured interleaved in one process.

The loop timed is gradlab's own (:class:`gradlab.training.Trainer`: on-device batches and
augmentation, forward, backward, snapshot, one host copy per logged step, optimizer step), with
the logged rows handed to the same background writer (Parquet + TensorBoard) a run uses.

Design. Machine speed on a shared VM drifts by 10-20% within minutes, far more than the effect
measured, so the modes (unprobed, every N1, every N2, ...) are interleaved one *step* at a time:
a round is one step of each mode, the rounds cycling through every order of the modes (so each
mode follows each other equally often), and neighbouring steps of different modes run under the
same conditions. Rounds are grouped in windows of max(N) rounds; in each window a mode
"every N" logs exactly max(N)/N of its steps, as in a real run (so each N must divide max(N)).
Per window and mode the ratio is (sum of the mode's step times) / (sum of the unprobed step
times); the estimate is the median over windows with a 95% bootstrap interval, and the pooled
ratio (all steps of the mode over all unprobed steps) is printed beside it. The same windows also
give the cost in milliseconds per logged step (median and interval over windows): a ratio
shrinks on a slower machine for the same cost, this figure does not (though hook and kernel
times themselves differ between machines).

Fairness details: unprobed steps run with every probe hook removed (checked, not assumed), and
so do the unlogged steps of the probed modes (a disabled probe holds no hooks); before each
probed step the hooks are put back as that mode's previous step left them (registered after a
logged step), so registering and removing them is timed exactly where a run pays it; each mode
keeps its own step counter; and a logged step waits, inside its timed region, until the background
writer has consumed its rows (Parquet rows buffered, TensorBoard events serialized), so writer
work is charged to the step that caused it instead of spilling into a neighbour on a machine
with few cores.

    python benchmarks/probe_overhead.py                  # resnet56, batch 128, every 1 / 10
    python benchmarks/probe_overhead.py --quick          # fewer windows
    python benchmarks/probe_overhead.py --amp auto off   # also float32 where auto picks bf16
    python benchmarks/probe_overhead.py --models resnet20 resnet56 resnet110 plain56 \
        --every 1 10 100
"""

from __future__ import annotations

import argparse
import itertools
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
        n += len(getattr(m, "_backward_pre_hooks", {})) + len(getattr(m, "_block_hooks", ()))
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


def measure(model: str, batch: int, everies: list[int], windows: int,
            device: torch.device, tensorboard: bool, amp: str = "auto") -> dict:
    cfg = TrainConfig(model=model, dataset="synthetic", batch_size=batch, steps=10**6, amp=amp)
    data = load_dataset("synthetic", synthetic_size=max(4 * batch, 1024)).to(device)
    tr = Trainer(cfg, data, device, probe=True)
    it = batches(data.train_size, batch, seed=0)
    span = max(everies)
    if any(span % e for e in everies):  # a window must hold a whole number of each one's cycles
        raise ValueError(f"each --every must divide the largest ({span}): {everies}")
    with tempfile.TemporaryDirectory() as tmp:
        writer = MetricWriter(Path(tmp) / "metrics")
        dash = Dashboard(Path(tmp) / "tb", {"name": model, "config": cfg.to_dict()}) \
            if tensorboard else None
        sink = _Sink(writer, dash)
        step = 0
        modes: list[int | None] = [None, *everies]
        count = dict.fromkeys(modes, 0)  # per-mode step counters: exactly 1 in N steps logged

        def run_step(every: int | None) -> float:
            nonlocal step
            if every is None:
                tr.probe.detach()  # the unprobed loop: no hooks on the model at all
                if hook_count(tr.model):
                    raise RuntimeError("hooks left on the model of the unprobed loop")
            else:
                # Hooks as a run of this mode would have them now: registered if its previous
                # step was logged (a run keeps them across consecutive logged steps).
                tr.probe.attach()
                tr.probe.enabled = count[every] % every == 1 % every
            logged = every is not None and count[every] % every == 0
            count[every] += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            _, cols, _ = tr.step(next(it), 0.01, logged)
            if cols is not None:
                sink.put(step, cols)
                drain(sink, dash)
            if device.type == "cuda":
                torch.cuda.synchronize()
            step += 1
            return time.perf_counter() - t0

        for _ in range(2):  # warm-up: allocator, oneDNN primitives, first-pass probe setup
            for m in modes:
                run_step(m)
        for m in everies:
            count[m] = 0
        # Rounds cycle through every order of the modes, so each mode follows each other mode
        # equally often: a step right after a logged one (caches, allocator, writer) may run
        # slower, and a fixed or rotating order would charge that to some modes more than others.
        orders = list(itertools.permutations(modes))
        times: dict[int | None, list[list[float]]] = {m: [] for m in modes}
        for w in range(windows):
            for m in modes:
                times[m].append([])
            for r in range(span):
                for m in orders[(w * span + r) % len(orders)]:
                    times[m][-1].append(run_step(m))
        sink.flush()
        sink.close()
        if dash is not None:
            dash.close()
    base = [sum(t) for t in times[None]]
    out = {"unprobed_ms": statistics.median(t for ts in times[None] for t in ts) * 1e3,
           "bf16": tr.amp}
    for m in everies:
        ratios = [sum(t) / b for t, b in zip(times[m], base, strict=True)]
        out[f"every_{m}"] = statistics.median(ratios)
        out[f"every_{m}_ci"] = _median_ci(ratios)
        out[f"every_{m}_pooled"] = sum(map(sum, times[m])) / sum(base)
        # The same windows as an absolute cost: extra milliseconds per logged step (a window
        # logs span / m of the mode's steps), which unlike the ratio does not shrink on a slower
        # machine for the same cost.
        extra = [(sum(t) - b) * 1e3 * m / span for t, b in zip(times[m], base, strict=True)]
        out[f"every_{m}_ms"] = statistics.median(extra)
        out[f"every_{m}_ms_ci"] = _median_ci(extra)
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
    ap.add_argument("--windows", type=int, default=10,
                    help="windows of max(--every) rounds (one step of every mode per round)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-tensorboard", action="store_true")
    ap.add_argument("--amp", nargs="+", default=["auto"], choices=["auto", "bf16", "off"],
                    help="precision(s) to measure (auto: gradlab's default for the device; "
                         "bf16 on CPUs with native bf16)")
    ap.add_argument("--quick", action="store_true", help="3 windows (a rough figure in minutes)")
    a = ap.parse_args()
    if any(max(a.every) % e for e in a.every):
        ap.error(f"each --every must divide the largest ({max(a.every)})")
    device = resolve_device(a.device)
    windows = 3 if a.quick else a.windows
    span = max(a.every)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {a.batch_size}, {windows} windows of {span} rounds (one step per mode), "
          f"TensorBoard {'off' if a.no_tensorboard else 'on'}")
    print("ratio = median over windows of (mode's time / unprobed time) [95% bootstrap CI]; "
          "pooled = all its steps / all unprobed steps; +ms = median over windows of the extra "
          "time per logged step [95% bootstrap CI]")
    head = f"{'model':<11}{'precision':<11}{'unprobed ms/step':>18}" + "".join(
        f"{'every ' + str(e) + ': ratio [CI] pooled, +ms [CI]':>61}" for e in a.every)
    print(head)
    for model in a.models:
        for amp in a.amp:
            r = measure(model, a.batch_size, a.every, windows, device, not a.no_tensorboard, amp)
            cells = "".join(f"{r[f'every_{e}']:>14.4f} [{r[f'every_{e}_ci'][0]:.4f}, "
                            f"{r[f'every_{e}_ci'][1]:.4f}] {r[f'every_{e}_pooled']:.4f}, "
                            f"{r[f'every_{e}_ms']:+.1f} [{r[f'every_{e}_ms_ci'][0]:+.1f}, "
                            f"{r[f'every_{e}_ms_ci'][1]:+.1f}]"
                            for e in a.every)
            prec = "bf16" if r["bf16"] else "float32"
            print(f"{model:<11}{prec:<11}{r['unprobed_ms']:>18.1f}{cells}", flush=True)


if __name__ == "__main__":
    main()
