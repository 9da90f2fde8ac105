"""Fused reductions of bf16 activations on CPU, compiled once with TorchInductor.

Why: a residual block's measurements need per-sample sums of squares of F, of the shortcut s,
of their product, and of h - x. Eagerly that is seven passes over activation-sized tensors
(three norms, a subtraction that writes a fourth tensor, its norm), and under bf16 autocast
every one of them first makes a float32 copy: ATen's CPU reductions convert bf16 slowly. On a
2-core CPU that is about 3.3 ms per 32x32 block of resnet56 at batch 128, against 0.6 ms for the
fused kernels here: ``pair_sums`` reads f and s once, and for gradlab's own blocks
(``relu(F(x) + x)``) ``block_sums`` gets identity_gap from that same pass; ``gap_sums`` reads h
and x once for other blocks. All accumulate in float32. The dot product <F, s> is summed
directly, so the cosine does not come from a difference of squares. (A gradient's norm is one
pass either way; the compiled call's overhead made it no faster, so gradients stay eager.)

When: on CPU, for bf16/fp16 tensors of at least :data:`FUSE_MIN_NUMEL` elements (CIFAR-sized
activations under the CPU's bf16 autocast). Not for float32, where ATen's own norms are as fast
as these kernels (0.8 against 0.95 ms per block), nor on GPUs, where reductions are cheap and
asynchronous already, nor while the model itself is traced by ``torch.compile`` (Inductor fuses
the eager formulas into the model's graph then). The kernels compile on first use (about 15 s
with a cold cache, 3 s warm, for a whole run) with dynamic shapes, so one compile serves every
stage of the network. If compilation fails (no C++
compiler, say) a warning is issued once and the eager formulas are used from then on.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import torch

__all__ = ["FUSE_MIN_NUMEL", "Kernels", "kernels"]

#: Low-precision tensors with at least this many elements take the fused path
#: (128 x 16 x 16 x 16: every stage of a CIFAR ResNet at batch 128; never 8x8 digits).
FUSE_MIN_NUMEL = 1 << 19

_LOW = (torch.bfloat16, torch.float16)


def _sample_dims(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, t.ndim))


def pair_sums(f: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per sample ``[||f||^2, ||s||^2, <f, s>]`` in float32, shape (3, N)."""
    f, s = f.float(), s.float()
    dims = _sample_dims(f)
    return torch.stack(((f * f).sum(dims), (s * s).sum(dims), (f * s).sum(dims)))


def gap_sums(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per sample ``[||h - x||^2, ||x||^2]`` in float32, shape (2, N); h - x is never stored."""
    h, x = h.float(), x.float()
    d = h - x
    dims = _sample_dims(h)
    return torch.stack(((d * d).sum(dims), (x * x).sum(dims)))


def block_sums(f: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """:func:`pair_sums` plus per-sample ``||relu(f + s) - s||^2``, shape (4, N).

    For a block whose output is ``relu(f + s)`` with an identity shortcut (``s`` is the block's
    input x), the last row is ``||h - x||^2``: identity_gap from the same single pass over f and
    s, without reading h again. relu(f + s) - s equals max(f, -s).
    """
    f, s = f.float(), s.float()
    d = torch.maximum(f, -s)
    dims = _sample_dims(f)
    return torch.stack(((f * f).sum(dims), (s * s).sum(dims), (f * s).sum(dims),
                        (d * d).sum(dims)))


_EAGER: dict[str, Callable[..., torch.Tensor]] = {
    "pair_sums": pair_sums, "block_sums": block_sums, "gap_sums": gap_sums}


class Kernels:
    """The compiled reductions, built on first use; eager from the first failure on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._compiled: dict[str, Callable] = {}
        self.failed: str | None = None

    def usable(self, t: torch.Tensor, force: bool = False) -> bool:
        """Whether ``t`` should be reduced by a fused kernel (``force``: any dtype and size)."""
        if self.failed is not None or t.device.type != "cpu" or torch.compiler.is_compiling():
            return False
        return force or (t.dtype in _LOW and t.numel() >= FUSE_MIN_NUMEL)

    def __call__(self, name: str, *tensors: torch.Tensor) -> torch.Tensor:
        fn = _EAGER[name]
        if self.failed is None:
            try:
                with self._lock:
                    compiled = self._compiled.get(name)
                    if compiled is None:
                        compiled = self._compiled[name] = torch.compile(fn, dynamic=True)
                with torch.no_grad(), torch.autocast("cpu", enabled=False):
                    return compiled(*tensors)
            except Exception as e:  # noqa: BLE001 - any compiler failure means: eager from now on
                self.failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
                warnings.warn(f"gradlab: fused probe reductions unavailable ({self.failed}); "
                              "using the eager formulas", RuntimeWarning, stacklevel=2)
        with torch.no_grad():
            return fn(*tensors)


#: Process-wide kernels: compiled code is shared by every probe (it holds no model state).
kernels = Kernels()
