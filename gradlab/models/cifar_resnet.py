"""The CIFAR ResNet and its plain twin (He et al. 2015, section 4.2).

A 3x3 conv with 16 filters, then three stages of n basic blocks with 16, 32 and 64 filters (stride 2
at the first block of stages 2 and 3), global average pooling and a linear classifier: 6n+2 layers
with weights. The residual block computes ``ReLU(F(x) + shortcut(x))`` with
``F = conv-BN-ReLU-conv-BN``; the plain block is the same without the shortcut.

Every elementwise op is its own out-of-place module (``ResidualAdd``, separate ``nn.ReLU``s) so
forward hooks see the true values: F(x) and shortcut(x) before they are summed, BN outputs before
the ReLU.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle

from gradlab.models.registry import register_family

__all__ = ["ResidualAdd", "ShortcutA", "GlobalAvgPool", "BasicBlock", "CifarResNet"]

PAPER_DEPTHS = (20, 32, 44, 56, 110)


class ResidualAdd(nn.Module):
    """``residual + shortcut``, as a module so hooks see both operands (F(x), shortcut(x)).

    Any user model that routes its residual sum through this module gets gradlab's block metrics.
    """

    def forward(self, residual: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        return residual + shortcut


# Two ops whose ATen backward returns an NCHW gradient whatever the input's layout: slicing
# (slice_backward writes into new zeros) and adaptive average pooling. Under channels_last the
# gradient then meets channels_last ones (the sum at the block's input, ReLU's backward) and every
# op after it takes ATen's slow path for mixed layouts: on this project's CPU, resnet56 at batch
# 128 lost 5-20 ms a step to the three such blocks. These give the input's own layout back (the
# same values: a copy of the gradient, and its share of the pooled one).
def _layout(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a channels_last-contiguous (and not NCHW-contiguous) x, else NCHW:
    the layout of x's gradient."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class _SubsamplePad(torch.autograd.Function):
    """``pad(x[:, :, ::stride, ::stride])`` with `extra` zero channels after x's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, stride: int, extra: int) -> torch.Tensor:
        ctx.geometry = (x.shape, _layout(x), x.dtype, stride)
        return F.pad(x[:, :, ::stride, ::stride], (0, 0, 0, 0, 0, extra))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        shape, layout, dtype, stride = ctx.geometry
        gx = torch.empty(shape, dtype=dtype, device=g.device, memory_format=layout).zero_()
        gx[:, :, ::stride, ::stride] = g[:, : shape[1]]
        return gx, None, None


class _GlobalAvgPool(torch.autograd.Function):
    """``adaptive_avg_pool2d(x, 1)`` flattened to (N, C)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.geometry = (x.shape, _layout(x), x.dtype)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        shape, layout, dtype = ctx.geometry
        gx = torch.empty(shape, dtype=dtype, device=g.device, memory_format=layout)
        gx.copy_((g / (shape[2] * shape[3]))[:, :, None, None].expand(shape))
        return gx


class ShortcutA(nn.Module):
    """Option A: parameter-free shortcut; subsample spatially and zero-pad the new channels."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra = planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pad channels at the end: the first in_planes channels carry x, the rest are zero.
        return _SubsamplePad.apply(x, self.stride, self.extra)


class GlobalAvgPool(nn.Module):
    """Global average pooling to (N, C); its gradient keeps the input's memory layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GlobalAvgPool.apply(x)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; ``residual=False`` gives the plain block of the same shape."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, *, residual: bool = True,
                 shortcut: str = "A"):
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if residual:
            if stride == 1 and in_planes == planes:
                self.shortcut: nn.Module = nn.Identity()
            elif shortcut == "A":
                self.shortcut = ShortcutA(in_planes, planes, stride)
            elif shortcut == "B":
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                )
            else:
                raise ValueError(f"shortcut must be 'A' or 'B', not {shortcut!r}")
            self.add = ResidualAdd()
        self.relu2 = nn.ReLU()

    # Block hooks (register_block_hook) and their (sum_relu, relu1) callables; class-level empty
    # defaults until the first one.
    _block_hooks: OrderedDict | tuple = ()
    _fused_ops: OrderedDict | tuple = ()

    def register_block_hook(self, hook: Callable[..., None], *,
                            sum_relu: Callable[..., torch.Tensor | None] | None = None,
                            relu1: Callable[..., torch.Tensor | None] | None = None
                            ) -> RemovableHandle:
        """Call ``hook(block, x, y1, y2, shortcut, total, out)`` after each forward, with the
        block's input, its two BN responses (before the ReLU / the addition), the shortcut and
        the sum that ``add`` computed (both None in a plain block) and its output. One call
        gives everything that forward hooks on bn1, bn2, add and the block would see one by
        one, for a fraction of their cost: the probe measures gradlab's blocks this way. The
        hook must not modify the tensors; ``handle.remove()`` removes it.

        Optional replacements for the block's own ops, each returning the op's result or None
        to leave it to the modules (the probe uses them to measure gradients as they are
        computed), used only while this hook is the block's only one, and only for stock,
        hook-free modules (no module or global hooks on the op's modules, none that sees the
        output of the BatchNorm before it; ReLUs not in place), since nothing else may see what
        they skip or use the response they take:

        - ``sum_relu(block, y2, shortcut)`` computes ``relu2(add(y2, shortcut))`` in a residual
          block; the hook then gets ``total=None`` (the sum is never stored);
        - ``relu1(block, y1)`` computes ``relu1(y1)``.
        """
        if not isinstance(self._block_hooks, OrderedDict):
            self._block_hooks = OrderedDict()
        ops = (sum_relu, relu1) if sum_relu is not None or relu1 is not None else None
        if ops is not None and not isinstance(self._fused_ops, OrderedDict):
            self._fused_ops = OrderedDict()  # (weakly referenced by the handles, as hooks)
        handle = RemovableHandle(self._block_hooks,
                                 extra_dict=self._fused_ops if ops is not None else None)
        self._block_hooks[handle.id] = hook
        if ops is not None:
            self._fused_ops[handle.id] = ops
        return handle

    #: Compute relu2(add(F, s)) in one pass of gradlab's C kernel, and both ReLUs' gradients in
    #: one pass each, where it applies (CPU, stock hook-free modules, not traced): ATen's values
    #: and gradients to the bit, and faster than ATen's add and ReLU (two passes, the sum
    #: stored) and threshold_backward. Set by gradlab's training loop on CPU; off by default, so
    #: a model built by hand computes with ATen alone.
    fused_relu: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._block_hooks:
            return self._forward_hooked(x)
        y1 = self.bn1(self.conv1(x))
        r = None
        if self.fused_relu and _plain_relu(self.relu1) and not _global_module_hooks():
            r = _fused().relu(y1)
        out = self.bn2(self.conv2(self.relu1(y1) if r is None else r))
        if self.residual:
            s = self.shortcut(x)
            if self.fused_relu and self._plain_add_relu():
                fused = _fused().add_relu(out, s)
                if fused is not None:
                    return fused
            out = self.add(out, s)
        return self.relu2(out)

    def _forward_hooked(self, x: torch.Tensor) -> torch.Tensor:
        # The same ops in the same order, keeping the intermediates for the hooks (the plain
        # forward lets each go as soon as the next op has read it).
        hooks = tuple(self._block_hooks.values())
        ops = self._fused_ops.get(next(iter(self._block_hooks))) if (
            len(hooks) == 1 and self._fused_ops) else None
        if ops is not None and _global_module_hooks():
            ops = None
        y1 = self.bn1(self.conv1(x))
        r = None
        if ops is not None and ops[1] is not None and _plain_relu(self.relu1) and _sees_no_output(
                self.bn1):  # (a hook on bn1 could hand y1 to something else too)
            r = ops[1](self, y1)
        if r is None:
            r = self.relu1(y1)
        y2 = self.bn2(self.conv2(r))
        s = t = out = None
        if self.residual:
            s = self.shortcut(x)
            if ops is not None and ops[0] is not None and self._plain_add_relu() and (
                    _sees_no_output(self.bn2)):
                out = ops[0](self, y2, s)
            if out is None:
                out = self.relu2(t := self.add(y2, s))
        else:
            out = self.relu2(y2)
        for hook in hooks:
            hook(self, x, y1, y2, s, t, out)
        return out

    def _plain_add_relu(self) -> bool:
        """Whether relu2(add(y2, s)) is exactly relu(y2 + s) with nothing else seeing the sum:
        stock modules, the ReLU not in place, no module or global hooks."""
        return (type(self.add) is ResidualAdd and _hook_free(self.add)
                and _plain_relu(self.relu2) and not _global_module_hooks())


def _hook_free(module: nn.Module) -> bool:
    """No forward, forward-pre or backward hooks of the module's own."""
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _sees_no_output(module: nn.Module) -> bool:
    """No hook of the module's own that sees its output (forward-pre hooks see only inputs)."""
    return not (module._forward_hooks or module._backward_hooks or module._backward_pre_hooks)


def _plain_relu(relu: nn.Module) -> bool:
    """A stock, non-in-place nn.ReLU without module hooks."""
    return type(relu) is nn.ReLU and not relu.inplace and _hook_free(relu)


def _fused():
    """gradlab.probing.fused (imported on first use: the probing package imports this module)."""
    from gradlab.probing import fused

    return fused


def _global_module_hooks() -> bool:
    """Whether any global module hook is registered (``nn.modules.module.register_module_*``)."""
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks
                or m._global_backward_hooks or m._global_backward_pre_hooks)


class CifarResNet(nn.Module):
    """The 6n+2 CIFAR network; ``residual=False`` gives the paper's plain baseline."""

    def __init__(self, depth: int, *, residual: bool = True, shortcut: str = "A",
                 num_classes: int = 10, in_channels: int = 3, zero_init_residual: bool = False):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', not {shortcut!r}")
        n = (depth - 2) // 6
        self.depth, self.residual, self.shortcut_type = depth, residual, shortcut
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        planes, layers = 16, []
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(planes, width, stride, residual=residual,
                                         shortcut=shortcut))
                planes = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = GlobalAvgPool()
        self.fc = nn.Linear(64, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out" if isinstance(m, nn.Conv2d)
                                        else "fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Goyal et al. 2017: gamma = 0 in each block's last BN makes F(x) = 0 at init, so every
            # residual block starts as the identity. A plain block has no residual branch: there
            # it would zero the signal (relu(0) = 0, and no gradient gets through), so a plain net
            # ignores the option and a suite can set it for plain and residual nets alike.
            for m in self.modules():
                if isinstance(m, BasicBlock) and m.residual:
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x))


@register_family("resnet", PAPER_DEPTHS, residual=True)
def resnet(depth: int, **kwargs) -> CifarResNet:
    """Residual CIFAR network of ``depth`` = 6n+2 layers (option A shortcuts by default)."""
    return CifarResNet(depth, residual=True, **kwargs)


@register_family("plain", PAPER_DEPTHS, residual=False)
def plain(depth: int, **kwargs) -> CifarResNet:
    """Plain CIFAR network: the residual network's layers without shortcuts."""
    kwargs.pop("shortcut", None)
    return CifarResNet(depth, residual=False, **kwargs)
