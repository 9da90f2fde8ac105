"""Metric names and the formulas behind them, computed on the device without host syncs.

Every function here returns 0-d (or 1-d) tensors on the input's device and never calls
``Tensor.item``: the probe stacks the results and copies them to the host once per logged step.

Formulas (N samples, per-sample vectors flattened over C, H, W; ``EPS`` guards zero norms):

* ``response_std``       std(o) over all N*C*H*W elements (unbiased, as ``torch.std``). For a
  BatchNorm in training mode it is computed exactly from what BN itself computed, without reading
  the output again: per channel the output has mean beta_c and biased variance
  gamma_c^2 * v_c / (v_c + eps), v_c the batch variance, recovered from the running-variance
  update (see :func:`bn_response_std`); other modules use ``torch.std``.
* ``response_grad_norm`` ||dL/do||_2 over the whole batch: the gradient that reaches that depth.
* ``residual_ratio``     mean_i ||F(x_i)|| / (||shortcut(x_i)|| + EPS).
* ``residual_cosine``    mean_i <F(x_i), s(x_i)> / (||F(x_i)|| ||s(x_i)|| + EPS), with the dot
  product taken from the norms of the sum the block already computed:
  <F, s> = (||F + s||^2 - ||F||^2 - ||s||^2) / 2 (no extra product tensor is allocated).
* ``identity_gap``       mean_i ||H(x_i) - x_i|| / (||x_i|| + EPS), for blocks whose output shape
  equals their input shape (H is the block's output, after the final ReLU).
* ``grad_norm``          sqrt(sum over the module's own parameters of ||grad||^2).
* ``weight_norm``        sqrt(sum over the module's own parameters of ||w||^2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-12

LAYER_METRICS = ("grad_norm", "weight_norm", "response_std", "response_grad_norm")
BLOCK_METRICS = ("residual_ratio", "residual_cosine", "identity_gap")
SCALAR_METRICS = ("loss", "accuracy", "lr", "test_loss", "test_accuracy", "images_per_s")
ALL_METRICS = LAYER_METRICS + BLOCK_METRICS + SCALAR_METRICS


def _f32(t: torch.Tensor) -> torch.Tensor:
    # Low-precision activations (bf16 under autocast) are reduced in float32.
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def sample_norms(t: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norms (over every dim but the first), in float32."""
    return _sample_norms(t)


def _sample_norms(t: torch.Tensor) -> torch.Tensor:
    # Reduce over every dim but the batch without flattening: flatten() would copy a
    # channels_last tensor, a reduction over dims reads it in place.
    return torch.linalg.vector_norm(_f32(t), dim=tuple(range(1, t.ndim)))


def response_std(out: torch.Tensor) -> torch.Tensor:
    """Unbiased std of a response over the batch and all positions (He et al. 2015, Fig. 7)."""
    return torch.std(_f32(out))


@dataclass(frozen=True)
class BNConstants:
    """Per-channel constants of many BatchNorms side by side, for :func:`bn_response_stds`."""

    segment: torch.Tensor  # int64, the BatchNorm index of each channel
    momentum: torch.Tensor  # per channel
    count: torch.Tensor  # per channel: elements per channel in the batch
    eps: torch.Tensor  # per channel
    channels: torch.Tensor  # per BatchNorm: C
    unbias: torch.Tensor  # per BatchNorm: count / (C * count - 1)
    select: torch.Tensor | None  # these BatchNorms' channels in the running variances given

    @staticmethod
    def build(layout: tuple[tuple[int, int, float, float, torch.device], ...],
              select: list[int] | None = None) -> BNConstants:
        """From ``(C, count, momentum, eps, device)`` per BatchNorm (one host copy, once);
        ``select``: their channels' positions in the concatenated running variances that
        :func:`bn_response_stds` will get, when those hold more BatchNorms."""
        dev = layout[0][4]
        sizes = [c for c, *_ in layout]

        def per_channel(vals, dtype=torch.float32):
            return torch.tensor([v for v, c in zip(vals, sizes, strict=True)
                                 for _ in range(c)], dtype=dtype, device=dev)

        return BNConstants(
            segment=per_channel(range(len(layout)), torch.int64),
            momentum=per_channel([m for _, _, m, _, _ in layout]),
            count=per_channel([n for _, n, _, _, _ in layout]),
            eps=per_channel([e for _, _, _, e, _ in layout]),
            channels=torch.tensor(sizes, dtype=torch.float32, device=dev),
            unbias=torch.tensor([n / (c * n - 1) for c, n, *_ in layout], dtype=torch.float32,
                                device=dev),
            select=None if select is None else torch.tensor(select, dtype=torch.int64,
                                                            device=dev))


def bn_response_stds(bns: list, before: torch.Tensor | None, after: torch.Tensor | None,
                     k: BNConstants, invstd: torch.Tensor | None = None) -> torch.Tensor:
    """response_std of many BatchNorms in training mode (float ``momentum``), exactly, from
    what each computed, in one set of ops (about 20 for a whole network).

    BN updates ``running_var <- (1 - m) running_var + m * v * count / (count - 1)`` with v the
    biased batch variance of each channel, so v follows from the running variance before and
    after the forward (``before``/``after``: concatenated C-vectors). Per channel c (``count``
    elements each) the output has mean beta_c and sum of squared deviations
    count * gamma_c^2 * v_c / (v_c + eps); the total adds count * (beta_c - mean(beta))^2.
    v enters only through v / (v + eps). Recovered from the running variances (float32), v carries
    an absolute error of about 6e-8 * after / m, which matters for a channel whose batch
    variance is far below its running variance (v / (v + eps) is then off by up to that error
    over eps: a 2% error in a response_std was seen). So ``invstd`` (C-vector, NaN where
    unknown), the 1/sqrt(v + eps) that BatchNorm itself computed and saved for backward, gives
    v / (v + eps) = 1 - eps * invstd^2 wherever it is known, with an absolute error of about
    1e-7; where every channel's is known (no NaN), ``before`` and ``after`` may be None. gamma
    and beta are read from the modules (unchanged until the optimizer step); per-BatchNorm sums
    go by ``index_add`` over the channel-to-BatchNorm ``segment`` index.
    """
    with torch.no_grad():  # read through the dicts: no Module.__getattr__ call per BatchNorm
        gamma = torch.cat([w if (w := bn._parameters.get("weight")) is not None
                           else torch.ones_like(bn._buffers["running_var"])
                           for bn in bns]).float()
        beta = torch.cat([b if (b := bn._parameters.get("bias")) is not None
                          else torch.zeros_like(bn._buffers["running_var"])
                          for bn in bns]).float()
    n_bn = k.channels.numel()
    beta_mean = torch.zeros(n_bn, device=beta.device).index_add_(0, k.segment, beta) / k.channels
    if invstd is not None and invstd.numel() != gamma.numel():
        raise ValueError(f"invstd holds {invstd.numel()} channels, the BatchNorms "
                         f"{gamma.numel()}")
    if before is None or after is None:  # every channel's invstd known (no NaN)
        if invstd is None:
            raise ValueError("without running variances, invstd is needed")
        frac = (1 - k.eps * invstd.float().square()).clamp_min(0)
    else:
        if k.select is not None:
            before, after = before.index_select(0, k.select), after.index_select(0, k.select)
        before, after = before.float(), after.float()
        var = ((after - (1 - k.momentum) * before) / k.momentum * ((k.count - 1) / k.count))
        var = var.clamp_min(0)
        frac = var / (var + k.eps)
        if invstd is not None:
            inv = invstd.float()
            frac = torch.where(torch.isnan(inv), frac, (1 - k.eps * inv.square()).clamp_min(0))
    within = gamma.square() * frac
    between = (beta - beta_mean[k.segment]).square()
    total = torch.zeros(n_bn, device=beta.device).index_add_(0, k.segment, within + between)
    return torch.sqrt(total * k.unbias)


def grad_norm(grad: torch.Tensor) -> torch.Tensor:
    """L2 norm of a gradient tensor over the whole batch.

    Taken as the norm of the per-sample norms: on CPU a reduction over the inner dims runs about
    twice as fast as one over the whole tensor, and the result is the same L2 norm.
    """
    if grad.ndim < 2:
        return torch.linalg.vector_norm(_f32(grad))
    return torch.linalg.vector_norm(_sample_norms(grad))


def residual_stats(f: torch.Tensor, s: torch.Tensor, total: torch.Tensor,
                   ns: torch.Tensor | None = None) -> torch.Tensor:
    """``[residual_ratio, residual_cosine]`` of one residual sum ``total = f + s``.

    ``<f, s> = <f, total> - ||f||^2``: from the sum the block computed anyway, so s is read once
    (for its norm); total's rounding enters only as ``<f, d total>``, small next to
    ``||f|| ||s||`` even when f is (a difference of squared norms would carry ``||total||^2``).
    ``ns``: per-sample norms of s when already known (see :func:`sample_norms`).
    """
    nf = _sample_norms(f)
    if ns is None:
        ns = _sample_norms(s)
    ft = (_f32(f) * _f32(total)).sum(dim=tuple(range(1, f.ndim)))
    return torch.stack(_ratio_cosine(nf, ns, ft - nf.square()))


def ratio_cosine(ff: torch.Tensor, ss: torch.Tensor, dot: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """residual_ratio and residual_cosine from per-sample ||F||^2, ||s||^2 and <F, s>, each of
    shape (N,) or (N, B) for B blocks at once (the means are over the N samples)."""
    return _ratio_cosine(ff.sqrt(), ss.sqrt(), dot)


def _ratio_cosine(nf: torch.Tensor, ns: torch.Tensor, dot: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    ratio = (nf / (ns + EPS)).mean(0)
    cosine = (dot / (nf * ns + EPS)).clamp(-1.0, 1.0).mean(0)
    return ratio, cosine


def identity_gap(x: torch.Tensor, h: torch.Tensor, *, x_norms: torch.Tensor | None = None,
                 scratch: torch.Tensor | None = None) -> torch.Tensor:
    """mean_i ||h_i - x_i|| / ||x_i||: how far a block's map is from the identity.

    ``x_norms`` reuses per-sample norms of x computed elsewhere (the identity shortcut's), and
    ``scratch`` (same shape, strides and dtype as h) receives h - x, so no large tensor is
    allocated per step.
    """
    diff = torch.sub(h, x, out=scratch) if scratch is not None else h - x
    if x_norms is None:
        x_norms = _sample_norms(x)
    return (_sample_norms(diff) / (x_norms + EPS)).mean()


def identity_gap_sq(dd: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
    """identity_gap from per-sample ||h - x||^2 and ||x||^2, of shape (N,) or (N, B)."""
    return (dd.sqrt() / (xx.sqrt() + EPS)).mean(0)


def module_norms(tensors: list[torch.Tensor | None], owner: torch.Tensor,
                 n_modules: int) -> torch.Tensor:
    """Per-module L2 norm of many tensors at once with one ``_foreach_norm`` call.

    Args:
        tensors: one tensor per parameter (``None`` for a missing gradient counts as zero).
        owner: int64 index of the module owning each tensor, on the tensors' device.
        n_modules: number of modules.
    """
    present = [t for t in tensors if t is not None]
    device = owner.device
    if not present:
        return torch.zeros(n_modules, device=device)
    it = iter(torch._foreach_norm([_f32(t) for t in present]))
    zero = torch.zeros((), device=device)
    # A missing gradient (frozen or unused parameter) counts as zero; no host round trip.
    sq = torch.stack([zero if t is None else next(it).to(device) for t in tensors]).square()
    return torch.zeros(n_modules, device=device, dtype=sq.dtype).index_add_(0, owner, sq).sqrt()
