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


def bn_batch_var(bn, running_var_before: torch.Tensor, count: int) -> torch.Tensor | None:
    """Biased batch variance per channel of the batch a BatchNorm just normalized.

    BN updates ``running_var <- (1 - m) running_var + m * v * count / (count - 1)`` (unbiased v);
    solving for v needs only the C-vector saved before the forward. Cancellation in the difference
    barely matters: v enters the response only through v / (v + eps), whose relative sensitivity
    to v is eps / (v + eps). Returns None when BN did not update its statistics this way.
    """
    if bn.momentum is None:  # cumulative moving average: the weight is 1 / batches seen
        if bn.num_batches_tracked is None:
            return None
        m = 1.0 / bn.num_batches_tracked.float()  # stays on the device
    else:
        m = bn.momentum
    unbiased = (bn.running_var - (1 - m) * running_var_before) / m
    return (unbiased * ((count - 1) / count)).clamp_min(0)


def bn_response_std(bn, batch_var: torch.Tensor, count: int) -> torch.Tensor:
    """Unbiased std over all elements of BN's output, from its per-channel parameters.

    Per channel c (``count`` elements each): mean beta_c, sum of squared deviations
    count * gamma_c^2 * v_c / (v_c + eps); the total adds count * (beta_c - mean(beta))^2.
    """
    C = batch_var.numel()
    gamma = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(batch_var)
    beta = bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(batch_var)
    within = gamma.square() * (batch_var / (batch_var + bn.eps))
    between = (beta - beta.mean()).square()
    return torch.sqrt((within + between).sum() * count / (C * count - 1))


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

    ``ns``: per-sample norms of s when already known (see :func:`sample_norms`).
    """
    nf, nt = _sample_norms(f), _sample_norms(total)
    if ns is None:
        ns = _sample_norms(s)
    ratio = (nf / (ns + EPS)).mean()
    dot = (nt.square() - nf.square() - ns.square()) * 0.5
    cosine = (dot / (nf * ns + EPS)).clamp(-1.0, 1.0).mean()
    return torch.stack((ratio, cosine))


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
