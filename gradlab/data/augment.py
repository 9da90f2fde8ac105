"""Batched data augmentation that runs where the batch lives (CPU, CUDA or MPS).

The standard CIFAR recipe (He et al. 2015, sec. 4.2): pad 4 pixels with zeros, take a random
32 x 32 crop, flip horizontally with probability 1/2. Done here for the whole batch with one
gather, so it costs one kernel on the GPU instead of a Python loop over samples or DataLoader
workers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["augment", "to_device"]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small host tensor to ``device`` without a host synchronization.

    A copy from pageable memory to a CUDA device makes the host wait for the stream (CUDA
    synchronizes before staging it); from pinned memory the copy is truly asynchronous.
    ``pin_memory`` draws on torch's caching host allocator, so small per-step copies stay cheap.
    """
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def augment(
    x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop after zero padding, and random horizontal flip, per sample, on x's device.

    The random numbers are drawn on the CPU from ``generator`` and then moved to ``x.device``,
    so a given seed gives the same augmented batch on every device (device RNGs differ). Draw
    order: row offsets, then column offsets (only if ``pad > 0``), then flips (only if ``flip``).

    Crop and flip are one index computation: output pixel (i, j) of sample n reads padded pixel
    (oy[n] + i, ox[n] + j), or (oy[n] + i, ox[n] + W - 1 - j) when sample n is flipped, which is
    the same as cropping first and then mirroring the crop.

    Args:
        x: (N, C, H, W) batch, any dtype, on any device.
        pad: Zero padding on each side before cropping; offsets are uniform in [0, 2 pad].
        flip: Mirror each sample left-right with probability 1/2.
        generator: A CPU ``torch.Generator``; None uses torch's global CPU generator.

    Returns:
        A new (N, C, H, W) tensor with x's dtype and device, or ``x`` itself when
        ``pad == 0`` and not ``flip`` (nothing to do, so no copy).
    """
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if pad == 0 and not flip:
        return x
    n, _, h, w = x.shape
    if pad > 0:
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        x = F.pad(x, (pad, pad, pad, pad))
    else:
        oy = ox = torch.zeros(n, dtype=torch.int64)
    cols = torch.arange(w)
    if flip:
        flipped = torch.randint(0, 2, (n,), generator=generator).bool()
        col_idx = ox[:, None] + torch.where(flipped[:, None], w - 1 - cols, cols)
    else:
        col_idx = ox[:, None] + cols
    row_idx = oy[:, None] + torch.arange(h)
    # Index arithmetic happens on the CPU (N x (H + W) integers); only the indices move.
    device = x.device
    row_idx = to_device(row_idx, device)
    col_idx = to_device(col_idx, device)
    batch_idx = torch.arange(n, device=device)
    # Advanced indexing with (N,1,1,1), (N,1,H,1), (N,1,1,W) broadcasts to (N, C, H, W): the
    # channel dimension is sliced, the others gathered.
    return x[
        batch_idx[:, None, None, None],
        torch.arange(x.shape[1], device=device)[None, :, None, None],
        row_idx[:, None, :, None],
        col_idx[:, None, None, :],
    ]
