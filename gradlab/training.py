"""The training loop: SGD with the paper's schedule, probes attached, a run directory written.

Per step the loop does no host work beyond Python bookkeeping: data stay on the training
device, batches are indexed and augmented there, and the only host synchronization is the copy
of one logged step's measurements (:meth:`PendingFrame.to_host`). Writing Parquet and TensorBoard
happens on a background thread from values already on the host.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gradlab.config import ConfigError, TrainConfig, stored_dir
from gradlab.data import Dataset, augment, batches, load_dataset, steps_per_epoch, to_device
from gradlab.models import BasicBlock, create_model, model_info
from gradlab.probing import PendingFrame, Probe
from gradlab.probing.fused import kernels as _kernels
from gradlab.runs import (
    MetricWriter,
    RunDir,
    RunError,
    RunLock,
    git_commit,
    read_metrics,
    versions,
)

__all__ = ["train", "TrainResult", "resolve_device", "lr_at", "total_steps", "NonFiniteError",
           "nonfinite"]

DEFAULT_STEPS = 600


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient (the run is marked failed)."""


@dataclass
class TrainResult:
    """What a finished (or stopped) run produced."""

    run_dir: Path
    status: str
    steps: int          # optimizer steps done when the run ended (== planned when completed)
    final: dict[str, float]
    seconds: float
    failure: dict[str, Any] | None = None
    signal: int | None = None   # the signal that interrupted it, if any


# -- devices and schedules -----------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (try --device auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s), numbered from 0")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None)
                                  and torch.backends.mps.is_available()):
        raise ConfigError("--device mps: MPS is not available (try --device auto)")
    return dev


#: Smallest image side for which bf16 autocast pays on a CPU with native bf16 arithmetic.
CPU_BF16_MIN_SIDE = 32


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX), where oneDNN's bf16
    convolutions beat float32; elsewhere bf16 is emulated and slower."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(getattr(cpu, c)() for c in checks if hasattr(cpu, c))
    except Exception:  # noqa: BLE001 - a missing or failing capability query means: no
        return False


def fast_path(cfg: TrainConfig, device: torch.device, image_side: int | None = None
              ) -> tuple[bool, bool]:
    """(bf16 autocast, channels_last) for this device: the fastest correct choice by default.

    bf16 autocast (float32 master weights, loss and BN statistics) pays on CUDA GPUs that
    support it, and on CPUs with native bf16 arithmetic for images of at least
    :data:`CPU_BF16_MIN_SIDE` pixels a side: resnet56 at batch 128 on 32x32 inputs runs 1.3x
    faster on a 2-core AVX512-BF16 CPU (481 against 627 ms per step), while on 8x8 digits the
    conversions cost more than the smaller convolutions save (95 against 80 ms), so ``auto``
    keeps float32 there. ``image_side``: the smaller side of the data set's images (unknown:
    no bf16 on CPU). channels_last pays on CUDA (tensor cores) and on CPU (oneDNN's NHWC
    kernels: about 1.35x for resnet56 on a 2-core CPU); MPS gains nothing.
    """
    if cfg.amp == "bf16":
        amp = True
    elif cfg.amp == "off":
        amp = False
    elif device.type == "cuda":
        # Native bf16 (Ampere, compute capability 8.0, and later) on the chosen GPU itself:
        # is_bf16_supported() also says yes where bf16 is emulated (T4, V100), without bf16
        # convolution kernels, and asks the current device, not this one.
        amp = torch.cuda.get_device_capability(device) >= (8, 0)
    else:
        amp = (device.type == "cpu" and image_side is not None
               and image_side >= CPU_BF16_MIN_SIDE and cpu_native_bf16())
    if cfg.channels_last == "auto":
        cl = device.type in ("cuda", "cpu")
    else:
        cl = cfg.channels_last == "on"
    return amp, cl


def total_steps(cfg: TrainConfig, train_size: int) -> int:
    """Steps of the run: ``steps``, else ``epochs`` x steps per epoch, else the default."""
    if cfg.steps is not None:
        return cfg.steps
    if cfg.epochs is not None:
        return max(1, math.ceil(cfg.epochs * steps_per_epoch(train_size, cfg.batch_size)))
    return DEFAULT_STEPS


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Learning rate of ``step``: warm-up, then ``lr`` divided at each milestone."""
    if step < cfg.warmup_steps:
        return cfg.warmup_lr
    lr = cfg.lr
    for m in cfg.milestones:
        if step >= int(m * total):
            lr *= cfg.lr_decay
    return lr


# -- writer thread --------------------------------------------------------------------------------
class _Sink:
    """Background thread that writes host-side rows to Parquet and TensorBoard.

    A failure is surfaced on the training thread at its next call (:class:`RunError`: the run
    fails), and the writer keeps doing what it still can until then: after a TensorBoard
    failure it writes no more events but every Parquet row it was handed; a failed Parquet part
    keeps its rows buffered, and every later flush, the run's last one included, tries again to
    write them. A flush request is always answered, so the training thread never waits on a
    writer that has failed.
    """

    def __init__(self, writer: MetricWriter, dashboard, flush_seconds: float = 30.0):
        self.writer, self.dashboard = writer, dashboard
        self.flush_seconds = flush_seconds
        self._q: queue.Queue = queue.Queue()
        self._error: BaseException | None = None  # Parquet
        self._tb_error: BaseException | None = None  # TensorBoard (then no more events)
        self._last_flush = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="gradlab-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                kind, payload = item
                if kind == "rows":
                    step, cols = payload
                    self.writer.add(step, cols)  # (an append to a list: kept, also after errors)
                    if self.dashboard is not None and self._tb_error is None:
                        try:
                            self.dashboard.log(step, cols)
                        except BaseException as e:  # noqa: BLE001 - surfaced by _check
                            self._tb_error = e
                    if time.monotonic() - self._last_flush > self.flush_seconds:
                        self._flush()
                elif kind == "flush":
                    self._flush()
            except BaseException as e:  # noqa: BLE001 - surfaced on the training thread
                self._error = self._error or e
            finally:
                if item is not None and item[0] == "flush":
                    item[1].set()
                self._q.task_done()

    def _flush(self) -> None:
        self._last_flush = time.monotonic()
        try:
            self.writer.flush()  # (a failed part keeps its rows for the next try)
        except BaseException as e:  # noqa: BLE001 - surfaced by _check
            self._error = self._error or e
        if self.dashboard is not None and self._tb_error is None:
            try:
                self.dashboard.flush()
            except BaseException as e:  # noqa: BLE001 - surfaced by _check
                self._tb_error = e

    def _check(self) -> None:
        if self._error is not None:
            raise RunError(f"writing metrics failed: {self._error}")
        if self._tb_error is not None:
            raise RunError(f"writing TensorBoard events failed: {self._tb_error}")

    def put(self, step: int, cols: dict[str, np.ndarray]) -> None:
        self._check()
        self._q.put(("rows", (step, cols)))

    def flush(self) -> None:
        """Block until every queued row is written as a whole part."""
        done = threading.Event()
        self._q.put(("flush", done))
        done.wait()
        self._check()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()


# -- the loop -------------------------------------------------------------------------------------
def _evaluate(model: nn.Module, data: Dataset, batch_size: int, amp: bool, cl: bool,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Test loss and accuracy as device tensors (no host sync here)."""
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    n = data.test_x.shape[0]
    with torch.no_grad(), _autocast(device, amp):
        for i in range(0, n, max(batch_size, 256)):
            x = data.test_x[i:i + max(batch_size, 256)]
            y = data.test_y[i:i + max(batch_size, 256)]
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            out = model(x).float()
            total_loss += F.cross_entropy(out, y, reduction="sum")
            correct += (out.argmax(1) == y).sum()
    model.train(was_training)
    return total_loss / n, correct / n


def _autocast(device: torch.device, amp: bool):
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _bad_values(cols: dict[str, np.ndarray]) -> np.ndarray:
    """Which logged values fail the step (see :func:`nonfinite`, the same rule): inf or NaN, or
    a gradient norm whose square is past float32's range."""
    vals = cols["value"]
    with np.errstate(invalid="ignore"):
        big = (vals > _GRAD_NORM_MAX) & (cols["metric"] == "grad_norm")
    return ~np.isfinite(vals) | big


def _first_nonfinite(cols: dict[str, np.ndarray]) -> str | None:
    """The layer that went non-finite first: the earliest non-finite output in forward order,
    else the deepest non-finite gradient (backward runs from the last layer to the first).

    ``depth`` orders modules by when their forward starts, but a block's output (residual_ratio,
    identity_gap) exists only after its own layers' outputs; so outputs are ordered by when
    their forward ends: a module ranks just after its last submodule.
    """
    metrics, layers, depths = cols["metric"], cols["layer"], cols["depth"]
    bad = _bad_values(cols) & (depths >= 0)
    fwd = bad & np.isin(metrics, ["response_std", "residual_ratio", "identity_gap"])
    if fwd.any():
        depth_of = dict(zip(layers[depths >= 0], depths[depths >= 0], strict=True))

        def ends(name: str) -> tuple[int, int]:
            inner = [d for n, d in depth_of.items() if n == name or n.startswith(name + ".")]
            return max(inner), -name.count(".")

        return str(min({str(n) for n in layers[fwd]}, key=ends))
    bwd = bad & np.isin(metrics, ["response_grad_norm", "grad_norm"])
    if bwd.any():
        i = np.flatnonzero(bwd)[np.argmax(depths[bwd])]
        return str(layers[i])
    return None


def nonfinite(loss: torch.Tensor, params: list[torch.Tensor]) -> bool:
    """Whether ``loss`` is inf or NaN, or a parameter's gradient holds inf or NaN or has a
    sum of squares past float32's range (an L2 norm above about 1.8e19, whose float32
    computation overflows: a gradient that large is as good as diverged). A logged step applies
    the same rule to its ``grad_norm`` rows.

    One C pass over every gradient where the probe's kernels take them (CPU, one float dtype):
    squares summed in float32 lanes, chunk totals in float64. A lane's partial sum is at most the
    total, so it overflows only where the total is past the limit anyway. Otherwise
    :func:`nonfinite_flag` (one ``_foreach_norm``), read here. This runs on every unlogged CPU
    step, so it is kept to a few calls.
    """
    if not math.isfinite(float(loss.detach())):  # sync: CPU only
        return True
    grads = [g for p in params if (g := p.grad) is not None]
    if not grads:
        return False
    sq = _kernels.sq_list(grads) if loss.is_cpu else None
    if sq is None:
        return bool(nonfinite_flag(loss, params))  # sync: the failure path's, or CPU
    return not float(sq.max()) <= _F32_MAX  # (NaN fails the comparison)


_F32_MAX = torch.finfo(torch.float32).max
_GRAD_NORM_MAX = math.sqrt(_F32_MAX)
_FLAG = "_nonfinite_step_"  # rows that carry flags to the host with a logged step's values


def nonfinite_flag(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """:func:`nonfinite`'s rule on the device, without a synchronization: a float32 0-d tensor,
    1 where the loss is inf or NaN or a gradient's ``_foreach_norm`` is inf, NaN or above
    sqrt(float32 max) (its sum of squares past float32's range: a float32 or bf16 norm comes back
    inf then, a float64 one finite but above the bound), else 0. The form the fused optimizers
    take as ``found_inf``."""
    bad = ~torch.isfinite(loss.detach().float())
    grads = [g for p in params if (g := p.grad) is not None]
    if grads:
        norms = torch.stack(torch._foreach_norm(grads)).float()
        bad = bad | ~(norms <= _GRAD_NORM_MAX).all()  # (NaN fails the comparison)
    return bad.float()


def _cat_flags(flags: list[torch.Tensor]) -> torch.Tensor:
    """Flags kept one per step (0-d) or folded (1-d), as one 1-d tensor in step order."""
    return torch.cat([f.reshape(-1) for f in flags])


def _with_flags(pending: PendingFrame, flags: torch.Tensor) -> PendingFrame:
    """``pending`` with a 1-d tensor of flags appended as rows (see :func:`_take_flags`)."""
    k, values = flags.numel(), pending.values
    return PendingFrame(torch.cat((values, flags.to(values.device, values.dtype))),
                        pending.layers + [""] * k, pending.depths + [-1] * k,
                        pending.metrics + [f"{_FLAG}{i}" for i in range(k)])


def _take_flags(cols: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Split the flag rows (see :func:`nonfinite_flag`) off a logged step's host columns."""
    metric = cols["metric"]
    is_flag = np.array([str(m).startswith(_FLAG) for m in metric], dtype=bool)
    flags = cols["value"][is_flag] != 0  # (NaN counts as set)
    return flags, {k: v[~is_flag] for k, v in cols.items()}


class Trainer:
    """One model, optimizer and data set on a device, and the training step that gradlab runs.

    Shared by :func:`train` and the benchmarks, so what the benchmarks time is the real loop.
    The probe (when wanted) is attached here, before any ``torch.compile``, and records only on
    logged steps.
    """

    def __init__(self, cfg: TrainConfig, data: Dataset, device: torch.device, *,
                 probe: bool = True):
        info = model_info(cfg.model)
        self.cfg, self.data, self.device = cfg, data, device
        self.amp, self.cl = fast_path(cfg, device, image_side=data.image_size)
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model, num_classes=data.num_classes, in_channels=data.channels,
                             **({"shortcut": cfg.shortcut} if info.residual else {}),
                             zero_init_residual=cfg.zero_init_residual).to(device)
        if self.cl:
            model = model.to(memory_format=torch.channels_last)
        # On CPU each block's residual sum and ReLU take one pass of gradlab's kernel, and the
        # ReLUs' gradients one each (the same values; see BasicBlock.fused_relu).
        # (the kernels that write tensors come with the extension module; a compiled graph
        # traces ATen's ops instead)
        self.fused_relu = device.type == "cpu" and not cfg.compile and _kernels.writes()
        for m in model.modules():
            if isinstance(m, BasicBlock):
                m.fused_relu = self.fused_relu
        self.model = model
        # The multi-tensor (foreach) update is the fast path on CPU; fused kernels on CUDA.
        fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
        self.opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay, **fused)
        # What the optimizer updates, listed once: model.parameters() walks every module, a
        # third of the unlogged step's check.
        self._params = [p for g in self.opt.param_groups for p in g["params"]]
        self.gen = torch.Generator().manual_seed(cfg.seed)  # augmentation draws, on CPU
        # Unlogged steps run without hooks, except under torch.compile, whose graph is traced
        # with the hooks attached and must keep them.
        self.probe = Probe(model, enabled=False, keep_hooks=cfg.compile) if probe else None
        if self.probe is not None:
            self.probe.attach()  # before compiling, so the compiled graph keeps the hooks
        self.forward = torch.compile(model) if cfg.compile else model
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        # BatchNorm running statistics: a training forward updates them before anything can be
        # checked, so a step that is skipped (--on-nonfinite skip) puts them back, and so does
        # diagnose()'s extra forward. (The tensors themselves: loading a checkpoint copies into
        # them in place.)
        self._bn_state = [b for m in model.modules()
                          if isinstance(m, nn.modules.batchnorm._BatchNorm)
                          for b in m.buffers(recurse=False)]
        self._keep_bn = cfg.nonfinite == "skip"
        self._buffers_ready = False
        # On a GPU an unlogged step is checked without waiting for the device: the test runs
        # there, the fused optimizer takes its outcome as ``found_inf`` and skips the whole
        # update on the device when it is set, and the outcomes wait for the next logged step's
        # one synchronization, which reports them in ``late_bad``.
        self._guard = device.type == "cuda" and bool(self.opt.defaults.get("fused"))
        self._unchecked: list[torch.Tensor] = []  # a flag per unlogged step since the last logged
        #: At a logged step: the unlogged steps before it that were non-finite (their updates
        #: were skipped on the device), as offsets: 1 is the step just before.
        self.late_bad: list[int] = []

    def step(self, idx: torch.Tensor, lr: float, logged: bool, *, check: bool | None = None
             ) -> tuple[torch.Tensor, dict[str, np.ndarray] | None, bool]:
        """Forward, backward, measure (on logged steps) and update.

        Returns the loss (a device tensor), the logged step's host columns (None otherwise) and
        whether the loss or a measurement was non-finite, in which case the update is NOT applied
        and the caller decides. ``check`` tests the loss and every gradient on every step on the
        host (the default on CPU, where it is free). On a CUDA GPU an unlogged step is tested on
        the device instead: a non-finite one has its update skipped there, and is reported by
        the next logged step (:attr:`late_bad`), whose synchronization reads the outcome.
        """
        data, dev = self.data, self.device
        self.late_bad = []  # (this step's report only)
        if check is None:
            check = dev.type == "cpu"
        idx = to_device(idx, dev)
        x, y = data.train_x[idx], data.train_y[idx]
        if self.cfg.augment:
            x = augment(x, data.pad, data.flip, self.gen)
        if self.cl:
            x = x.contiguous(memory_format=torch.channels_last)
        self._last = (x, y)
        saved = self._save_bn() if self._keep_bn else None
        for g in self.opt.param_groups:
            g["lr"] = lr
        if self.probe is not None:
            self.probe.enabled = logged
        with _autocast(dev, self.amp):
            out = self.forward(x)
            loss = F.cross_entropy(out.float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        cols = None
        if logged:
            acc = (out.detach().argmax(1) == y).float().mean()
            scal = {"loss": loss.detach(), "accuracy": acc}
            pending = (self.probe.snapshot() if self.probe is not None
                       else PendingFrame(torch.zeros(0, device=dev), [], [], []))
            flags = list(self._unchecked)
            n = sum(f.numel() for f in flags)
            if self._guard and self.probe is None:  # no gradient norms among the rows
                flags.append(nonfinite_flag(loss, self._params))
            if flags:  # (travel in the same copy; taken out of the rows below)
                pending = _with_flags(pending, _cat_flags(flags))
            cols = pending.extend(scal).to_host()  # sync: the one per logged step
            if flags:
                seen, cols = _take_flags(cols)
                self.late_bad = [n - i for i in range(n) if seen[i]]
                own = bool(seen[n]) if len(seen) > n else False
            else:
                own = False
            self._unchecked = []
            bad = own or bool(_bad_values(cols).any())
            if self.probe is None and check:  # no gradient norms among the rows
                bad = bad or nonfinite(loss, self._params)
        elif check:
            # A gradient can go non-finite while the loss is finite (an overflow in one layer's
            # backward); applying it would poison the weights and blame a later step.
            bad = nonfinite(loss, self._params)
        elif self._guard and not self._momentum_ready():
            bad = nonfinite(loss, self._params)  # (sync: only until the first applied update)
        elif self._guard:
            flag = nonfinite_flag(loss, self._params)
            self._unchecked.append(flag)
            if len(self._unchecked) >= 256:  # (a run that logs rarely: one tensor, not many)
                self._unchecked = [_cat_flags(self._unchecked)]
            self.opt.found_inf = flag  # (read by the fused update: skipped where it is 1)
            try:
                self.opt.step()
            finally:
                self.opt.found_inf = None
            if saved is not None:
                self._load_bn(saved, where=flag)
            return loss, cols, False
        else:
            bad = False
        if not bad:
            self.opt.step()
        elif saved is not None:
            self._load_bn(saved)
        return loss, cols, bad

    @property
    def pending(self) -> bool:
        """(GPU) Whether unlogged steps' device-side checks wait to be read."""
        return bool(self._unchecked)

    def settle(self) -> list[int]:
        """(GPU) Read the device-side checks of the unlogged steps since the last read: the
        non-finite ones (their updates were skipped), as offsets back from the last step run
        (0: that step). One synchronization: for an evaluation, a checkpoint or a stop, which
        must not go ahead of a failure."""
        if not self._unchecked:
            return []
        flags = _cat_flags(self._unchecked).cpu().numpy()  # sync: rare
        self._unchecked = []
        n = len(flags)
        return [n - 1 - i for i in range(n) if flags[i] != 0]

    def _momentum_ready(self) -> bool:
        """Whether the optimizer may be handed ``found_inf``: torch's fused SGD allocates its
        momentum buffers uninitialized on the first update and leaves them so when that update
        is skipped, so the guard waits until every buffer exists (one applied update)."""
        if self.cfg.momentum == 0 or self._buffers_ready:
            return True
        state = self.opt.state
        self._buffers_ready = all(state.get(p, {}).get("momentum_buffer") is not None
                                  for p in self._params)
        return self._buffers_ready

    def _save_bn(self) -> list[torch.Tensor]:
        return [b.clone() for b in self._bn_state]

    def _load_bn(self, saved: list[torch.Tensor], where: torch.Tensor | None = None) -> None:
        """Put back the saved BatchNorm statistics (only where the 0-d ``where`` is non-zero,
        decided on the device)."""
        with torch.no_grad():
            if where is None:
                for b, v in zip(self._bn_state, saved, strict=True):
                    b.copy_(v)
            else:
                keep = where.bool()
                for b, v in zip(self._bn_state, saved, strict=True):
                    b.copy_(torch.where(keep, v, b))

    def diagnose(self) -> dict[str, np.ndarray] | None:
        """Measure the last batch again with the probe on (weights are unchanged: the failed
        step was not applied) to find which layer went non-finite."""
        if self.probe is None or self._last is None:
            return None
        x, y = self._last
        saved = self._save_bn()  # (a measurement: it leaves the running statistics as they were)
        self.probe.enabled = True
        try:
            self.opt.zero_grad(set_to_none=True)
            with _autocast(self.device, self.amp):
                loss = F.cross_entropy(self.forward(x).float(), y)
            loss.backward()
            cols = self.probe.snapshot().extend({"loss": loss.detach()}).to_host()  # sync: failure
        finally:
            self.opt.zero_grad(set_to_none=True)
            self.probe.enabled = False
            self._load_bn(saved)
        return cols


def run_info(cfg: TrainConfig, data: Dataset, model: nn.Module, device: torch.device,
             steps: int, amp: bool, cl: bool) -> dict[str, Any]:
    """The run.json fields that describe what is being trained."""
    info = model_info(cfg.model)
    return {
        "config": cfg.to_dict(),
        "model": {"name": cfg.model, "family": info.family, "depth": info.depth,
                  "residual": info.residual, "shortcut": cfg.shortcut if info.residual else None,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "data": {"name": data.name, "train_size": data.train_size, "test_size": data.test_size,
                 "channels": data.channels, "num_classes": data.num_classes,
                 "image_size": data.image_size},
        "device": str(device), "seed": cfg.seed, "total_steps": steps,
        "fast_path": {"bf16_autocast": amp, "channels_last": cl, "compile": cfg.compile,
                      "fused_relu": any(getattr(m, "fused_relu", False)
                                        for m in model.modules()),
                      "threads": torch.get_num_threads()},
        "versions": versions(), "git_commit": git_commit(), "failure": None,
    }


def train(cfg: TrainConfig, out: str | Path = "runs", name: str | None = None, *,
          resume: bool = False, force: bool = False, progress: bool = False,
          dashboard: bool = True, on_model: Callable[[nn.Module], None] | None = None,
          probe: bool = True, stop: list[int] | None = None) -> TrainResult:
    """Train ``cfg.model`` with probes attached and write a run directory.

    Args:
        cfg: the run's configuration (validated here).
        out: parent folder of run directories.
        name: run directory name (default: ``{model}-{dataset}-s{seed}``).
        resume: continue the run directory from its last checkpoint.
        force: replace an existing run directory of the same name.
        progress: show a rich progress bar.
        dashboard: write TensorBoard event files.
        on_model: called with the model before training (tests inject faults this way).
        probe: attach the probe (False trains the same way without measuring, for comparisons).
        stop: a list that a caller's own handler (see :func:`stop_on_signals`) appends signals
            to; one already there, or one added during the run, stops it at the next step
            boundary as SIGINT/SIGTERM do (a suite shares one list over all its runs).
    """
    # The run directory is locked (RunLock) from before anything in it is read for --resume, or
    # before an existing one is replaced, until training ends.
    lock = RunLock()
    try:
        return _train(lock, cfg, out, name, resume=resume, force=force, progress=progress,
                      dashboard=dashboard, on_model=on_model, probe=probe,
                      stop=[] if stop is None else stop)
    finally:
        lock.release()


def _train(lock: RunLock, cfg: TrainConfig, out: str | Path, name: str | None, *,
           resume: bool, force: bool, progress: bool, dashboard: bool,
           on_model: Callable[[nn.Module], None] | None, probe: bool,
           stop: list[int]) -> TrainResult:
    from gradlab import checkpoint as ckpt

    cfg.validate()
    name = name or f"{cfg.model}-{cfg.dataset}-s{cfg.seed}"
    _check_name(name)
    path = Path(out) / name
    model_info(cfg.model)  # unknown model / bad depth: fail before touching the disk
    device = resolve_device(cfg.device)
    if resume:
        lock.acquire(path)
        rd = RunDir.open(path)
        if not isinstance(rd.info.get("config"), dict):
            raise RunError(f"{path}/run.json has no config to resume from")
        # The run continues with the configuration it was started with, not today's options.
        try:
            cfg = TrainConfig.from_dict(rd.info["config"]).validate()
        except (ConfigError, TypeError, ValueError) as e:  # a hand-edited or damaged run.json
            raise RunError(f"{path}/run.json: config cannot be resumed "
                           f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})"
                           ) from None
        skipped_before = rd.info.get("skipped_steps", [])
        if not isinstance(skipped_before, list) or not all(
                type(s) is int for s in skipped_before):
            raise RunError(f"{path}/run.json: skipped_steps is not a list of steps")
        last = rd.checkpoint_dir / "last.pt"
        state = ckpt.load(last) if last.exists() else None
        if state is not None and state.get("config") != rd.info["config"]:
            raise RunError(f"{last} was written by another run (its config differs from "
                           f"{path}/run.json)")
        if rd.info.get("status") == "completed":
            # Nothing left to train: the run stays exactly as it is (metrics, final values,
            # finish time, event files), with or without its checkpoint, and its data is not
            # even loaded.
            done = state["step"] if state is not None else rd.info.get("total_steps")
            return TrainResult(rd.path, "completed", done if type(done) is int else 0,
                               _previous_final(rd), 0.0, None, None)
        if state is not None:  # what resuming would move aside must exist: checked first
            ckpt.check_parts(last, state, rd.metrics_dir)
    elif path.exists() and any(path.iterdir()) and not force:
        raise RunError(f"run directory {path} already exists; use --resume to continue it or "
                       "--force to start it again")
    elif cfg.data_dir is not None:
        # Stored absolute: a relative folder would mean another one to a resume started
        # elsewhere.
        cfg = cfg.replace(data_dir=stored_dir(cfg.data_dir))
    data = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed).to(device)
    # Everything the options can get wrong is found here, before a run directory is created or
    # (with --force) an old one replaced.
    steps_per_epoch(data.train_size, cfg.batch_size)
    steps = total_steps(cfg, data.train_size)
    if cfg.every > steps:
        raise ConfigError(f"--every {cfg.every} is larger than the run ({steps} steps)")
    if resume and state is not None and state["step"] > steps:
        raise RunError(f"{last}: damaged checkpoint (step {state['step']} is past the run's "
                       f"{steps} steps)")
    tr = Trainer(cfg, data, device, probe=probe)  # resolves the fast path once: tr.amp, tr.cl
    model, opt, gen, prb = tr.model, tr.opt, tr.gen, tr.probe
    start = 0
    if resume:
        if state is not None:
            start = ckpt.restore(state, model, opt, gen)
            ckpt.trim_parts(rd.metrics_dir, state["parts"])
        else:
            # Resumed before its first checkpoint: it starts over, and every part it wrote would
            # be repeated, so all are set aside (metrics/.superseded/), none deleted.
            ckpt.trim_parts(rd.metrics_dir, [])
        rd.save(status="running", finished=None, resumed_at=start)
    else:
        lock.acquire(path)  # (with --force: not while another process writes the old one)
        rd = RunDir.create(path, run_info(cfg, data, model, device, steps, tr.amp, tr.cl),
                           force=force)
        lock.acquire(rd.path)
    # From here the run directory says "running": whatever stops the setup below (Ctrl-C before
    # the run's own signal handler is in place, a dashboard that cannot be written) is recorded.
    dash = sink = None
    try:
        if on_model is not None:
            on_model(model)

        writer = MetricWriter(rd.metrics_dir)
        if dashboard:
            from gradlab.dashboard import Dashboard

            dash = Dashboard(rd.tb_dir, rd.info, resumed_at=start if resume else None)
            if resume and start > 0:
                # The restart marker drops what earlier event files hold from step `start` on; the
                # evaluation the first session made there (before its checkpoint) is not made
                # again, so it is written again from the Parquet parts the checkpoint kept.
                again = _rows_at(rd.path, start)
                if again is not None:
                    dash.log(start, again)
        sink = _Sink(writer, dash)
        ckpt_every = cfg.checkpoint_every or max(cfg.every, min(1000, steps // 4 or 1))
        eval_every = cfg.eval_every or max(1, steps // 10)
        # A resumed run keeps its last final values until new ones are measured.
        final: dict[str, float] = _previous_final(rd) if resume else {}
        failure: dict[str, Any] | None = None
        status = "completed"
        t_start = time.perf_counter()
        done = start
        bar = _Progress(progress, steps, start, name)
        previous = _install_signal_handlers(stop)  # (last: nothing after it can fail)
    except BaseException as e:
        if sink is not None:
            sink.close()
        if dash is not None:
            with contextlib.suppress(Exception):
                dash.close({}, status="interrupted" if isinstance(e, KeyboardInterrupt)
                           else "failed")
        interrupted = isinstance(e, KeyboardInterrupt)
        rd.mark("interrupted" if interrupted else "failed",
                failure=None if interrupted else {"reason": f"{type(e).__name__}: {e}",
                                                  "step": None, "layer": None})
        raise
    try:
        with contextlib.ExitStack() as stack:
            if prb is not None:
                stack.callback(prb.detach)
            model.train()
            it = batches(data.train_size, cfg.batch_size, cfg.seed, start_step=start)
            mark_t, mark_step = time.perf_counter(), start
            # A resumed run repeats the steps after its checkpoint, skipped ones included.
            skipped: list[int] = [s for s in rd.info.get("skipped_steps", []) if s < start]
            if skipped != rd.info.get("skipped_steps", []):  # steps past the checkpoint: redone
                rd.save(skipped_steps=skipped)
            for step in range(start, steps):
                if stop:
                    # Stopped between steps: save this point too, so that --resume repeats
                    # nothing and no written row is set aside.
                    status = "interrupted"
                    _checkpoint(sink, rd, tr, step)
                    break
                logged = step % cfg.every == 0 or step == steps - 1
                lr = lr_at(cfg, step, steps)
                loss, cols, bad = tr.step(next(it), lr, logged)
                # (GPU) unlogged steps whose check, made on the device, is read now: at a logged
                # step's synchronization, or before an evaluation, a checkpoint or a stop, none
                # of which may go ahead of a failure. Their updates were skipped on the device.
                late = [step - o for o in tr.late_bad]
                nxt = step + 1
                if tr.pending and (stop or nxt % eval_every == 0 or nxt % ckpt_every == 0
                                   or nxt == steps):
                    late += [step - o for o in tr.settle()]
                if late:
                    late.sort()
                    if cfg.nonfinite != "skip":
                        if cols is not None:
                            sink.put(step, cols)
                        failure = {"reason": f"non-finite loss or gradient at step {late[0]} "
                                             "(an unlogged step: its update was not applied)",
                                   "step": late[0], "layer": None}
                        status = "failed"
                        break
                    skipped = sorted(set(skipped) | set(late))
                    rd.save(skipped_steps=skipped)
                if bad:
                    if cols is None:  # find the layer: measure this same batch once more
                        cols = tr.diagnose()
                    layer = _first_nonfinite(cols) if cols is not None else None
                    if cols is not None:
                        sink.put(step, cols)
                    if cfg.nonfinite != "skip":
                        what = "gradient" if math.isfinite(float(loss.detach())) else "loss"
                        where = f", first at layer {layer}" if layer else ""
                        failure = {"reason": f"non-finite {what} at step {step}{where}",
                                   "step": step, "layer": layer}
                        status = "failed"
                        break
                    # Skipped: no update, but the step still counts (schedule, data order,
                    # evaluation and checkpoints stay where an unskipped run has them).
                    opt.zero_grad(set_to_none=True)
                    skipped.append(step)
                    rd.save(skipped_steps=skipped)
                    bar.advance(step + 1)
                elif cols is not None:
                    now = time.perf_counter()
                    ips = (step - mark_step) * cfg.batch_size / (now - mark_t) if step > mark_step \
                        else float("nan")
                    mark_t, mark_step = now, step
                    cols = _append(cols, {"lr": lr, "images_per_s": ips})
                    sink.put(step, cols)
                    final.update(_final_scalars(cols))
                    bar.update(step + 1, final.get("loss"), final.get("accuracy"), ips)
                else:
                    bar.advance(step + 1)
                done = step + 1
                t_aside = time.perf_counter()  # evaluation and checkpoints are not training
                if done % eval_every == 0 or done == steps:
                    tl, ta = _evaluate(model, data, cfg.batch_size, tr.amp, tr.cl, device)
                    ev = torch.stack((tl, ta)).cpu().numpy()  # sync: evaluation steps only
                    sink.put(done, _rows({"test_loss": ev[0], "test_accuracy": ev[1]}))
                    final.update(test_loss=float(ev[0]), test_accuracy=float(ev[1]))
                if done % ckpt_every == 0 or done == steps:
                    _checkpoint(sink, rd, tr, done)
                mark_t += time.perf_counter() - t_aside
    except BaseException as e:
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        failure = failure or {"reason": f"{type(e).__name__}: {e}", "step": None, "layer": None}
        _finish(sink, rd, dash, status, failure, final, bar, previous)
        raise
    _finish(sink, rd, dash, status, failure, final, bar, previous)
    if status == "failed" and failure is not None:
        raise NonFiniteError(failure["reason"])
    return TrainResult(rd.path, status, done, final, time.perf_counter() - t_start, failure,
                       stop[0] if stop else None)


def _checkpoint(sink: _Sink, rd: RunDir, tr: Trainer, step: int) -> None:
    """Write every buffered row as a whole part, then checkpoint naming the parts it covers."""
    from gradlab import checkpoint as ckpt

    sink.flush()
    parts = [p.name for p in sorted(rd.metrics_dir.glob("part-*.parquet"))]
    rd.checkpoint_dir.mkdir(parents=True, exist_ok=True)  # (a user may have removed it)
    ckpt.save(rd.checkpoint_dir / "last.pt", tr.model, tr.opt, tr.gen, step, parts, tr.cfg)


def _finish(sink: _Sink, rd: RunDir, dash, status: str, failure, final, bar, previous) -> None:
    """Write what is buffered, close the writers and record the outcome in run.json: each step
    is tried whatever an earlier one raised (a run never stays marked running), and the first
    error is raised at the end; a run that completed but whose last rows could not be written
    is marked failed."""
    errors: list[BaseException] = []
    try:
        try:
            bar.close()
        except BaseException as e:  # noqa: BLE001 - raised below, after run.json is updated
            errors.append(e)
        try:
            sink.flush()
        except BaseException as e:  # noqa: BLE001 - raised below, after run.json is updated
            errors.append(e)
        sink.close()
        if dash is not None:
            try:
                dash.close(final, status=status)
            except BaseException as e:  # noqa: BLE001 - as above
                errors.append(e)
        if errors and status == "completed":
            status = "failed"
            failure = {"reason": f"{type(errors[0]).__name__}: {errors[0]}", "step": None,
                       "layer": None}
        rd.mark(status, failure=failure, final=final)
    finally:
        _restore_signal_handlers(previous)
    if errors:
        raise errors[0]


def _rows_at(run_dir: Path, step: int) -> dict[str, np.ndarray] | None:
    """The rows a run's Parquet parts hold at ``step``, as host columns (None: none)."""
    df = read_metrics(run_dir, steps=[step])
    if df.empty:
        return None
    return {"layer": df["layer"].to_numpy(dtype=object), "depth": df["depth"].to_numpy(),
            "metric": df["metric"].to_numpy(dtype=object), "value": df["value"].to_numpy()}


def _previous_final(rd: RunDir) -> dict[str, float]:
    """The final values run.json holds (a damaged entry counts as none)."""
    final = rd.info.get("final")
    return {k: v for k, v in final.items() if isinstance(v, (int, float))} \
        if isinstance(final, dict) else {}


def _final_scalars(cols: dict[str, np.ndarray]) -> dict[str, float]:
    out = {}
    for m in ("loss", "accuracy"):
        v = cols["value"][cols["metric"] == m]
        if len(v):
            out[m] = float(v[0])
    rr = cols["value"][cols["metric"] == "residual_ratio"]
    if len(rr):
        out["residual_ratio_mean"] = float(rr.mean())
    return out


def _rows(named: dict[str, float]) -> dict[str, np.ndarray]:
    n = len(named)
    return {"layer": np.array([""] * n, dtype=object), "depth": np.full(n, -1, dtype=np.int32),
            "metric": np.array(list(named), dtype=object),
            "value": np.array([float(v) for v in named.values()], dtype=np.float64)}


def _append(cols: dict[str, np.ndarray], named: dict[str, float]) -> dict[str, np.ndarray]:
    extra = _rows(named)
    return {k: np.concatenate((cols[k], extra[k])) for k in cols}


def _check_name(name: str) -> None:
    """Run names are one path component: no separators, no '..', nothing hidden."""
    if (not name or name in (".", "..") or name.startswith(".") or "/" in name or "\\" in name
            or os.sep in name or "\x00" in name):
        raise ConfigError(f"--name {name!r} must be a plain directory name (no '/', '..' or "
                          "leading '.')")


def _install_signal_handlers(flag: list[int]):
    """SIGTERM and SIGINT (Ctrl-C) stop the loop at the next step boundary; the run is flushed,
    checkpointed and marked interrupted. A second SIGINT raises KeyboardInterrupt at once."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        if signum == signal.SIGINT and signal.SIGINT in flag:
            raise KeyboardInterrupt
        flag.append(signum)

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    except (ValueError, OSError):
        _restore_signal_handlers(previous)
        return None
    return previous


def _restore_signal_handlers(previous) -> None:
    if previous and threading.current_thread() is threading.main_thread():
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def stop_on_signals(flag: list[int]):
    """While inside: SIGTERM and SIGINT are appended to ``flag`` instead of ending the process
    (a second SIGINT raises KeyboardInterrupt), for a caller that checks ``flag`` at points
    where it can stop cleanly, as a suite does between runs. Outside the main thread: nothing
    is installed."""
    previous = _install_signal_handlers(flag)
    try:
        yield flag
    finally:
        _restore_signal_handlers(previous)


class _Progress:
    """A rich progress bar with loss, accuracy and images/s; silent when disabled."""

    def __init__(self, enabled: bool, total: int, start: int, name: str):
        self._p = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._p = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                           MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                           TextColumn("{task.fields[stats]}"), transient=False)
        self._p.start()
        self._task = self._p.add_task(name, total=total, completed=start, stats="")

    def update(self, done: int, loss, acc, ips) -> None:
        if self._p is not None:
            stats = f"loss {loss:.3f}  acc {acc:.3f}" + (f"  {ips:.0f} img/s"
                                                         if ips == ips else "")
            self._p.update(self._task, completed=done, stats=stats)

    def advance(self, done: int) -> None:
        if self._p is not None:
            self._p.update(self._task, completed=done)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
