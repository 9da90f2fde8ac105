"""The ``Probe`` context manager: hooks that measure a model while it trains.

Forward hooks reduce each response to a few numbers on the device as it is computed; tensor hooks
on the same responses reduce the gradient that reaches them during backward; parameter and
gradient norms are read in one ``_foreach_norm`` when the step is snapshotted, after backward and
before the optimizer step. Nothing is copied to the host until :meth:`PendingFrame.to_host`, once
per logged step.
"""

from __future__ import annotations

import functools
import operator
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from gradlab.models.cifar_resnet import BasicBlock, ResidualAdd
from gradlab.probing import metrics as M
from gradlab.probing.fused import AddReLU, ReLU, SumTable
from gradlab.probing.fused import kernels as _kernels

__all__ = ["Probe", "PendingFrame"]

_numel = torch.Tensor.numel
_grad_enabled = torch.is_grad_enabled
_momentum, _eps, _device = (operator.attrgetter(a) for a in ("momentum", "eps", "device"))


@dataclass
class PendingFrame:
    """One logged step's measurements, still on the device.

    ``values[i]`` belongs to ``layers[i]`` / ``depths[i]`` / ``metrics[i]``.
    """

    values: torch.Tensor
    layers: list[str]
    depths: list[int]
    metrics: list[str]

    def extend(self, named: dict[str, torch.Tensor | float], layer: str = "",
               depth: int = -1) -> PendingFrame:
        """Append model-wide scalars (loss, accuracy, ...) so they travel in the same copy."""
        if not named:
            return self
        dev = self.values.device
        extra = torch.stack([torch.as_tensor(v, dtype=torch.float32).to(dev).reshape(())
                             for v in named.values()])
        return PendingFrame(torch.cat((self.values, extra.to(self.values.dtype))),
                            self.layers + [layer] * len(named),
                            self.depths + [depth] * len(named),
                            self.metrics + list(named))

    def to_host(self) -> dict[str, np.ndarray]:
        """Copy to the host (the one synchronization of a logged step) as column arrays."""
        values = self.values.detach().to("cpu", torch.float64).numpy()  # sync: once per step
        return {
            "layer": np.asarray(self.layers, dtype=object),
            "depth": np.asarray(self.depths, dtype=np.int32),
            "metric": np.asarray(self.metrics, dtype=object),
            "value": values,
        }

    def to_frame(self) -> pd.DataFrame:
        """The long table ``layer, depth, metric, value`` (copies to the host)."""
        return pd.DataFrame(self.to_host())


def _exact_bn(module: nn.Module) -> bool:
    # Only the stock BatchNorm classes update running_var by the formula bn_response_stds inverts.
    return type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) and \
        module.track_running_stats


_INVSTD_NODES: dict[type, bool] = {}


def _saves_invstd(node) -> bool:
    """Whether an autograd node is BatchNorm's native one, whose ``_saved_result2`` is the batch's
    1/sqrt(v + eps) per channel (by node class, looked up once per class)."""
    kind = _INVSTD_NODES.get(type(node))
    if kind is None:
        kind = _INVSTD_NODES[type(node)] = type(node).__name__ == "NativeBatchNormBackward0"
    return kind


# Whether gradlab's blocks are measured by block hooks (False: forward hooks on bn1, bn2, the
# add and the block, as in any other model; the same rows, for tests and benchmarks to compare).
_BLOCK_HOOKS = True

# The key of the probe's gradient hook in a response's hook dict (Tensor._backward_hooks), where
# Tensor.register_hook's handles use positive ints.
_HOOK = "gradlab.probe"
_HOOK_DICT_NODES: dict[type, bool] = {}


def _hook_dicts(node) -> bool:
    """Whether an autograd node takes a tensor's hook dict (``_register_hook_dict``), by class."""
    kind = _HOOK_DICT_NODES.get(type(node))
    if kind is None:
        kind = _HOOK_DICT_NODES[type(node)] = hasattr(node, "_register_hook_dict")
    return kind


def _child(name: str, child: str) -> str:
    return f"{name}.{child}" if name else child


def _remove_grad_hook(handle) -> None:
    """Remove a gradient hook: a hook dict of the probe's own, or a RemovableHandle."""
    if type(handle) is OrderedDict:
        handle.pop(_HOOK, None)
    else:
        handle.remove()


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


class _GradRecord:
    """Where the backward of :class:`~gradlab.probing.fused.AddReLU` (or of
    :class:`~gradlab.probing.fused.ReLU`) records ReLU's gradient, which is that reaching the
    block's bn2 (or bn1) response, while it is the response's latest call: a gradient hook of the
    probe in all but name, removed (by the probe, as a handle) when the response is called
    again."""

    __slots__ = ("sums", "cols", "store", "key", "fallback", "live")

    def __init__(self, sums: SumTable, cols: dict, store: dict, key: tuple, fallback):
        self.sums, self.cols, self.store, self.key = sums, cols, store, key
        self.fallback = fallback  # the response's Python gradient hook
        self.live = True

    def remove(self) -> None:
        self.live = False

    def measure(self, g: torch.Tensor, out: torch.Tensor, gi: torch.Tensor) -> bool:
        """gi = ReLU's gradient from g and the ReLU's output, with its per-sample ||gi||^2 into
        the step's table (kernel ``relugrad``); False with nothing written where it does not
        apply."""
        col = self.sums.run_out("relugrad", g, out, gi)
        if col is None:
            return False
        self.cols[self.key] = (col,)
        if self.store:
            self.store.pop(self.key, None)
        return True


class Probe:
    """Attach gradlab's measurements to any ``nn.Module``.

    Layer metrics (``grad_norm``, ``weight_norm``) apply to every module with parameters of its
    own; ``response_std`` / ``response_grad_norm`` to every BatchNorm and the last ``nn.Linear``;
    block metrics to gradlab's :class:`BasicBlock` and to the parent of any :class:`ResidualAdd`.

    Usage::

        with Probe(model) as probe:
            loss = criterion(model(x), y)
            loss.backward()
            frame = probe.collect()          # before optimizer.step()

    gradlab's own blocks are measured by one block hook each
    (:meth:`BasicBlock.register_block_hook`: the block's responses, shortcut, sum and output in
    one call), not by forward hooks on bn1, bn2, the add and the block, so a block's bn1 or bn2
    called on its own, outside the block, is not measured (a block with an in-place ReLU gets
    the forward hooks). ``response_grad_norm`` is the gradient that reaches the response before
    any hook a user registers on that tensor after the probe's forward hook ran; in gradlab's
    blocks on CPU the gradients reaching bn1 and bn2 are measured inside the backward of the
    ReLU that computes them, in the same kernel pass (see :meth:`_sum_relu`, :meth:`_relu1`).

    Between two snapshots each module's values are those of its latest call: a module called
    twice in a forward reports its last call (both its response and the gradient reaching it),
    and with several forward/backward passes before one snapshot (gradient accumulation)
    ``grad_norm`` is that of the accumulated ``.grad`` while the response and block metrics are
    the last pass's. A block holds one residual sum: a second ResidualAdd under the same parent
    replaces the first's values.

    Hooks record only while :attr:`enabled` is true and autograd is on (evaluation passes under
    ``torch.no_grad()`` are ignored); a training loop flips :attr:`enabled` on logged steps only.
    A disabled probe holds no hooks at all (module calls take PyTorch's hook-free fast path), so
    unlogged steps cost nothing; ``keep_hooks=True`` keeps them registered while disabled, for a
    model compiled with ``torch.compile`` after attaching, whose graph must keep seeing the same
    hooks. Every handle is owned by the probe and removed on exit, also after an exception.

    ``fused``: reduce CPU activations and their gradients with gradlab's C kernels
    (:mod:`gradlab.probing.fused`), one pass per tensor. ``None`` (default): wherever they apply
    (float32/bf16 CPU tensors), falling back to the eager ATen formulas with one warning if the
    kernels cannot be built; ``True``: the same, but a failed build raises ``RuntimeError`` on
    attach; ``False``: eager formulas only. The values agree to float32 rounding either way.
    """

    def __init__(self, model: nn.Module, *, enabled: bool = True, fused: bool | None = None,
                 keep_hooks: bool = False):
        self.model = model
        self._enabled = bool(enabled)
        self.fused = fused
        self.keep_hooks = keep_hooks
        self._attached = False
        self._handles: list = []
        self._hooks: list[tuple[nn.Module, object]] | None = None  # forward hooks
        # block hooks, each with its block's fused sum and ReLU (see _sum_relu) or None, and its
        # relu1 (see _relu1)
        self._observers: list[tuple[BasicBlock, object, object, object]] = []
        # bn1 responses of this forward whose gradient a _relu1 measures (name -> response)
        self._relu_measured: dict[str, torch.Tensor] = {}
        self._order_handles: list = []
        # This step's values, keyed (module, metric): eager 0-d tensors in _store; the C kernels'
        # per-sample sums as column indices into _sums (derived all at once in snapshot()).
        # A key lives in one of the two; a later forward replaces an earlier one's value.
        self._store: dict[tuple[str, str], torch.Tensor] = {}
        self._cols: dict[tuple[str, str], tuple[int, ...]] = {}
        self._sums = SumTable()
        self._sums_plan: tuple | None = None  # _settle_sums's columns, by the last step's keys
        # Per-sample shortcut norms awaiting the block's hook (eager path).
        self._shortcut_norms: dict[str, tuple[tuple, torch.Tensor]] = {}
        # BatchNorm response_std, exact from C-vectors: the BatchNorms that ran once in a
        # recorded forward of the model (name -> elements per channel, -1 if it ran twice) get
        # response_std in snapshot(), all at once, from the 1/sqrt(v + eps) their autograd node
        # saved (CPU and native CUDA kernels; name -> C-vector) or else from the change of their
        # running variance, read for all stock BatchNorms in one cat when the forward starts and
        # in another when it ends. The cats are skipped while every BatchNorm of the last
        # recorded forward saved its invstd (on CPU, always); a BatchNorm that then saves none
        # is measured by one pass over its output, and the next forward reads the variances.
        # (invstd is also the more accurate: a difference of running variances cancels badly
        # for a channel whose v is far below them.)
        self._in_forward = False
        self._bn_exact = False  # inside a recorded forward, with stock BatchNorms
        self._bn_vars = True  # whether a forward reads the running variances (see above)
        # This forward: whether a BatchNorm took the exact path, and one saved no invstd.
        self._bn_seen = self._bn_missing = False
        self._bn_start: torch.Tensor | None = None
        self._bn_run: dict[str, int] = {}
        self._bn_inv: dict[str, torch.Tensor] = {}
        self._bn_forwards: list[tuple[torch.Tensor, torch.Tensor, dict[str, int],
                                      dict[str, torch.Tensor]]] = []
        self._bn_consts: dict[tuple, M.BNConstants] = {}
        # gradlab blocks reduced by the add's fused pass: the shortcut (held from the add's hook
        # to the block's, which follows it) and the columns of ||h - s||^2, ||s||^2
        # (identity_gap) and ||h||^2 (h = relu(F + s), the output).
        self._block_sums: dict[str, tuple[torch.Tensor, int, int, int]] = {}
        # The last such output (weakly held, with its version) and the column of its ||h||^2:
        # the next block's input, whose ||x||^2 then needs no pass over x (cold by then).
        self._out_sq: tuple[weakref.ref, int, int] | None = None
        # Reusable buffers for h - x (one per activation shape); not activations themselves.
        self._scratch: dict[tuple, torch.Tensor] = {}
        named = list(model.named_modules())
        # Modules with parameters of their own (which ones are read: see _params).
        self._param_modules = [(n, m) for n, m in named
                               if any(p is not None for p in m._parameters.values())]
        # (a module's _parameters dict is its own for life: read through, not re-fetched)
        self._param_dicts = [m._parameters for _, m in self._param_modules]
        linears = [n for n, m in named if isinstance(m, nn.Linear)]
        final_linear = linears[-1] if linears else None
        self._response_modules = [(n, m) for n, m in named
                                  if isinstance(m, _BatchNorm) or n == final_linear]
        self._bn_all = [(n, m) for n, m in self._response_modules if _exact_bn(m)]
        self._bn_index = {n: i for i, (n, _) in enumerate(self._bn_all)}
        adds = [(n, m) for n, m in named if isinstance(m, ResidualAdd)]
        add_parent = {n.rpartition(".")[0]: n for n, _ in adds}
        self._blocks = [(n, m) for n, m in named
                        if isinstance(m, BasicBlock) or (n in add_parent and n)]
        # A ResidualAdd is measured as part of its block: not one whose parent is a model that
        # is not a gradlab block (the root's name "" belongs to model-wide rows there).
        blocks = {n for n, _ in self._blocks}
        self._adds = [(b, m) for b, m in ((n.rpartition(".")[0], m) for n, m in adds)
                      if b in blocks]
        # Blocks whose output is known to be relu(F + s): gradlab's own, with a stock ReLU.
        self._relu_blocks = {n for n, m in named if type(m) is BasicBlock
                             and type(getattr(m, "relu2", None)) is nn.ReLU}
        # gradlab residual blocks whose bn2 output is the add's first operand: bn2's response
        # is recorded by the add's hook (one hook call fewer per block, each costs mid-step).
        self._folded = {n: _child(n, "bn2") for n, m in named
                        if type(m) is BasicBlock and m.residual
                        and type(getattr(m, "add", None)) is ResidualAdd
                        and isinstance(getattr(m, "bn2", None), _BatchNorm)}
        self._order: list[str] | None = None
        self._depth: dict[str, int] = {}
        self._depths_of: tuple[tuple[str, ...], list[int]] = ((), [])  # the last rows' depths
        # snapshot(): the key of the parameter slots as last gathered (see _params), the slots
        # read (a module holding one parameter under two names counts it once), their modules'
        # indices, and those on the device (gradients' modules, then the parameters').
        self._param_key: tuple | None = None
        self._param_keep: list[int] = []
        self._param_owner: list[int] = []
        self._owner: torch.Tensor | None = None
        # Whether the last forward of the model was traced by torch.compile (the grad hooks
        # are then registered by Tensor.register_hook, which Dynamo supports).
        self._traced = False
        # The gradient hook of each response's latest call (until the snapshot): a module called
        # again drops its earlier call's hook, so response_grad_norm is the same call's as
        # response_std (the last one; backward reaches earlier calls later).
        self._grad_handles: dict[str, object] = {}

    # -- context management -------------------------------------------------------------------
    def __enter__(self) -> Probe:
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    @property
    def enabled(self) -> bool:
        """Whether the hooks record; setting it registers or removes them (see the class)."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        if self._attached:
            if self._enabled or self.keep_hooks:
                self._register()
            else:
                self._unregister()

    def attach(self) -> None:
        """Attach to the model (idempotent): the measuring hooks while enabled, and until the
        first snapshot the hooks that learn the forward order."""
        if self._attached:
            return
        if self.fused:
            _kernels.load(required=True)
        self._attached = True
        try:
            if self._enabled or self.keep_hooks:
                self._register()
            if not self._depth:
                self._order = []
                measured = {n: m for n, m in (self._param_modules + self._response_modules
                                              + self._blocks)}
                for name, mod in measured.items():
                    self._order_handles.append(
                        mod.register_forward_pre_hook(self._order_hook(name)))
        except BaseException:
            self.detach()
            raise

    def _register(self) -> None:
        if self._handles:
            return
        if self._hooks is None:  # built once: re-registering on each logged step allocates little
            self._build_hooks()
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._start_hook))
            for mod, hook in self._hooks:
                self._handles.append(mod.register_forward_hook(hook))
            for block, hook, sum_relu, relu1 in self._observers:
                self._handles.append(block.register_block_hook(hook, sum_relu=sum_relu,
                                                               relu1=relu1))
            # Registered last: runs after every other hook of the model, also when its forward
            # raises (then it only closes the forward).
            self._handles.append(self.model.register_forward_hook(self._end_hook,
                                                                  always_call=True))
        except BaseException:
            self._unregister()
            raise

    def _build_hooks(self) -> None:
        """The forward hooks (module, hook) and the block hooks (block, hook) to register."""
        response = {n: self._response_hook(n) for n, _ in self._response_modules}
        adds = [(b, m, self._add_hook(b, response.get(self._folded.get(b, ""))))
                for b, m in self._adds]
        add_of = {b: (m, hook) for b, m, hook in adds}
        responses = dict(self._response_modules)
        taken: set[str] = set()  # measured by a block hook: no forward hook of their own
        self._observers = []
        for name, block in self._blocks:
            # gradlab's own blocks: one block hook does what forward hooks on bn1, bn2 (or the
            # add, which records bn2), and the block would, without PyTorch's slow path for a
            # module with hooks (four module calls fewer per block, each costly mid-step).
            if not _BLOCK_HOOKS or type(block) is not BasicBlock or not all(
                    type(r) is nn.ReLU and not r.inplace
                    for r in (block.relu1, block.relu2)):
                continue  # (an in-place ReLU would change y1 or t before the block hook runs)
            bn1, bn2 = _child(name, "bn1"), _child(name, "bn2")
            if responses.get(bn1) is not block.bn1 or responses.get(bn2) is not block.bn2:
                continue
            if block.residual and (name not in self._folded
                                   or add_of.get(name, (None,))[0] is not block.add
                                   or sum(b == name for b, _ in self._adds) != 1):
                continue
            add = add_of[name][1] if block.residual else None
            self._observers.append((
                block,
                self._block_observer(name, block, response[bn1], response[bn2], add),
                self._sum_relu(name, bn2, response[bn2]) if block.residual else None,
                self._relu1(bn1, response[bn1])))
            taken |= {name, bn1, bn2}
        folded = set(self._folded.values())
        self._hooks = ([(m, response[n]) for n, m in self._response_modules
                        if n not in folded and n not in taken]
                       + [(m, hook) for b, m, hook in adds if b not in taken]
                       + [(m, self._block_hook(n)) for n, m in self._blocks if n not in taken])

    def _unregister(self) -> None:
        """Remove the measuring hooks; values recorded so far wait for the snapshot."""
        while self._handles:
            self._handles.pop().remove()
        self._reset_forward()

    def _reset_forward(self) -> None:
        """Forget what a forward left for its own later hooks (not the recorded values)."""
        self._in_forward = False
        self._bn_exact = False
        self._bn_start = None
        self._bn_run = {}
        self._bn_inv = {}
        self._shortcut_norms.clear()
        self._block_sums.clear()
        self._relu_measured.clear()
        self._out_sq = None

    def detach(self) -> None:
        """Remove every hook this probe registered and drop pending values."""
        self._attached = False
        self._remove_order_hooks()
        self._unregister()
        while self._grad_handles:  # gradient hooks of a forward not yet backpropagated
            _remove_grad_hook(self._grad_handles.popitem()[1])
        self._store.clear()
        self._cols.clear()
        self._sums.filled()
        self._bn_forwards.clear()
        self._scratch.clear()

    def _remove_order_hooks(self) -> None:
        while self._order_handles:
            self._order_handles.pop().remove()

    # -- hooks --------------------------------------------------------------------------------
    def _recording(self) -> bool:
        return self._enabled and torch.is_grad_enabled()

    def _known_sq(self, t: torch.Tensor) -> int | None:
        """Column of per-sample ||t||^2 if t is the last gradlab block's output, unchanged."""
        if self._out_sq is None:
            return None
        ref, version, col = self._out_sq
        return col if ref() is t and t._version == version else None

    def _run2(self, name: str, a: torch.Tensor, b: torch.Tensor) -> int | None:
        """Two-operand kernel ``name`` into this step's table of sums: its first column, or None
        when the kernels cannot take a and b (then the caller's eager formula is used)."""
        return None if self.fused is False else self._sums.run2(name, a, b)

    def _run_sq(self, t: torch.Tensor) -> int | None:
        """Column of per-sample ||t||^2 in this step's table of sums, or None when the kernels
        cannot take t (then the caller's eager formula is used)."""
        return None if self.fused is False else self._sums.sq(t)

    def _put(self, key: tuple[str, str], value: torch.Tensor) -> None:
        self._store[key] = value
        self._cols.pop(key, None)

    def _put_cols(self, key: tuple[str, str], cols: tuple) -> None:
        self._cols[key] = cols
        self._store.pop(key, None)

    def _order_hook(self, name: str):
        def hook(module, args):
            if name not in self._order:
                self._order.append(name)
        return hook

    def _running_vars(self) -> torch.Tensor | None:
        try:
            # (_buffers: no Module.__getattr__ call per BatchNorm; this runs twice a forward)
            return torch.cat([m._buffers["running_var"] for _, m in self._bn_all])
        except (RuntimeError, TypeError, KeyError):  # several devices, a removed buffer
            return None

    def _start_hook(self, module, args):
        # Per-forward state starts afresh, whatever an earlier (maybe failed) forward left.
        self._reset_forward()
        self._traced = torch.compiler.is_compiling()
        self._in_forward = self._recording()
        self._bn_exact = self._in_forward and bool(self._bn_all)
        self._bn_start = self._running_vars() if self._bn_exact and self._bn_vars else None
        self._bn_seen = self._bn_missing = False  # (see _end_hook)
        if self._in_forward:
            self._compact()
        return None

    def _end_hook(self, module, args, out):
        if not self._in_forward:
            return None
        self._in_forward = False
        run = {n: c for n, c in self._bn_run.items() if c > 0}
        if run and out is not None:
            inv = {n: t for n, t in self._bn_inv.items() if n in run}
            # (_bn_start None: each BatchNorm in run has its invstd, see the response hook)
            end = self._running_vars() if self._bn_start is not None else None
            if self._bn_start is None or end is not None:
                self._drop_bn(*run)  # this forward's values replace earlier ones
                self._bn_forwards.append((self._bn_start, end, run, inv))
        self._bn_start = None
        self._bn_exact = False
        if self._bn_seen:  # whether the next forward reads the running variances
            self._bn_vars = self._bn_missing
        return None

    def _drop_bn(self, *names: str) -> None:
        """Forget earlier response_std values of these BatchNorms (a later pass replaces them)."""
        store = self._store
        if store:
            for name in names:
                store.pop((name, "response_std"), None)
        if self._bn_forwards:
            for _, _, run, _ in self._bn_forwards:
                for name in names:
                    run.pop(name, None)
            self._bn_forwards = [f for f in self._bn_forwards if f[2]]

    def _compact(self) -> None:
        """Keep the table of sums bounded when forwards repeat without a snapshot (each one's
        values replace the last's): move the columns still referenced to the front."""
        live = sorted({c for cols in self._cols.values() for c in cols})
        if self._sums.used <= 2 * len(live) + 256:
            return
        where = self._sums.keep(live)
        # (in place: the hooks hold this dict)
        moved = {k: tuple(where[c] for c in cols) for k, cols in self._cols.items()}
        self._cols.clear()
        self._cols.update(moved)

    def _response_hook(self, name: str):
        key_std, key_grad = (name, "response_std"), (name, "response_grad_norm")
        exact_bn = name in self._bn_index

        sums, cols, store = self._sums, self._cols, self._store  # (dicts kept, not replaced)

        def grad_hook(g):
            # The gradient that reaches the response, from a tensor pre-hook on the autograd
            # node that made it (registered through the tensor's hook dict: see hook below).
            if g is None:
                return
            # = self._run_sq(g) and self._put_cols(...) inlined: 56 calls per resnet56
            # backward, each mid-step, where every Python call is slow. The kernels only read
            # memory: no detach() (a new tensor object) needed.
            col = None if self.fused is False else sums.sq(g)
            if col is not None:
                cols[key_grad] = (col,)
                if store:
                    store.pop(key_grad, None)
            else:
                self._put(key_grad, M.grad_norm(g.detach()))

        # For CPU responses, grad_hook's work done in C (kernels.grad_sq: no Python code runs
        # per call), grad_hook itself taking whatever the C code does not; built on the first
        # CPU response, when the kernels load. [None]: not yet.
        c_hook: list = [None]

        def hook(module, args, out, grad=True):
            # (= self._recording(), inlined: this runs mid-forward, 56 times per resnet56 step)
            # grad False: the response's gradient is measured elsewhere (see _sum_relu).
            if not (self._enabled and _grad_enabled()) or not isinstance(out, torch.Tensor):
                return None
            node = out.grad_fn  # (None when out needs no gradient)
            bn_run = self._bn_run
            exact = (exact_bn and self._bn_exact and name not in bn_run
                     and module.training and module.momentum)
            # (momentum None, a cumulative average, or 0, no update: the running variance does
            # not carry this batch's variance; the eager pass below measures it.)
            if exact:
                inv = (node._saved_result2  # read now: backward frees it
                       if node is not None and (_INVSTD_NODES.get(type(node))
                                                or _saves_invstd(node)) else None)
                self._bn_seen = True
                if inv is not None:
                    self._bn_inv[name] = inv
                else:
                    self._bn_missing = True  # the next forward reads the running variances
                    exact = self._bn_start is not None  # (this one did, or: one pass below)
            if exact:
                bn_run[name] = out.numel() // out.shape[1]  # elements per channel
            else:
                # Not inside a recorded forward of the model, a second call within one, eval
                # mode, another BatchNorm class, the final Linear, or no invstd saved in a
                # forward that read no running variances: one pass over the output.
                if name in bn_run:
                    bn_run[name] = -1
                self._drop_bn(name)
                self._put(key_std, M.response_std(out.detach()))
            if grad and out.requires_grad:
                handles = self._grad_handles
                earlier = handles.pop(name, None)
                if earlier is not None:  # called again since the last snapshot
                    _remove_grad_hook(earlier)
                # (= _grad_record's replacement of the earlier hook, inlined: 56 calls a step)
                if self._traced:  # Dynamo traces Tensor.register_hook (and a Python hook)
                    handles[name] = out.register_hook(grad_hook)
                    return None
                fn = grad_hook
                if out.is_cpu and self.fused is not False:
                    fn = c_hook[0]
                    if fn is None:
                        fn = c_hook[0] = (
                            functools.partial(_kernels.grad_sq, sums, cols, store, key_grad,
                                              grad_hook)
                            if _kernels.load() and _kernels.grad_sq is not None
                            else grad_hook)
                if (node is not None and out._backward_hooks is None
                        and type(out) is torch.Tensor and _hook_dicts(node)):
                    # What Tensor.register_hook does, without its Python-level handle: a hook
                    # dict of our own (an OrderedDict, as torch's: a later register_hook on
                    # the tensor adds to it and takes weak references to it) registered on the
                    # node by one C call. Cold, about 14 us against 50 for register_hook or
                    # Node.register_prehook, 56 times per resnet56 step. Removed by popping _HOOK.
                    # (It runs before any tensor hook added to the response later: a user's
                    # register_hook on it after this forward hook goes into this dict.)
                    hooks = OrderedDict(((_HOOK, fn),))
                    out._backward_hooks = hooks
                    node._register_hook_dict(out)
                    handles[name] = hooks
                else:
                    handles[name] = out.register_hook(fn)
            return None
        hook.grad_hook = grad_hook
        return hook

    def _add_hook(self, block: str, bn2_hook=None):
        key_res, relu_block = (block, "residual_stats"), block in self._relu_blocks
        bn2 = self.model.get_submodule(self._folded[block]) if bn2_hook is not None else None
        cols, store = self._cols, self._store  # (as in _response_hook: _put_cols inlined)

        def hook(module, args, out):
            if not (self._enabled and _grad_enabled()) or len(args) != 2:
                return None
            self._block_sums.pop(block, None)
            f, s = args
            if bn2_hook is not None:  # F is the output of the block's bn2 (see _folded)
                bn2_hook(bn2, (), f)
            if not (isinstance(f, torch.Tensor) and isinstance(s, torch.Tensor)
                    and isinstance(out, torch.Tensor)):
                return None
            t = out
            if relu_block:
                # One pass over F and t = F + s, both just computed. ||s||^2 comes from the
                # previous block's pass when s is its output (identity shortcut), else from one
                # pass over s; <F, s> = <F, t> - ||F||^2, as in the eager path: t's rounding
                # (bf16) then enters only as <F, dt>, small next to ||F|| ||s|| also when F is.
                ss = self._known_sq(s)
                if ss is None:
                    ss = self._run_sq(s)
                col = self._run2("addrelu", f, t) if ss is not None else None
                if col is not None:  # columns ||F||^2, <F, t>, ||relu t||^2, ||relu t - s||^2
                    cols[key_res] = (col, ss, col + 1)
                    if store:
                        store.pop(key_res, None)
                    # For the block's hook, which follows: identity_gap is ||relu t - s|| /
                    # ||s|| when s is the block's input itself (an identity shortcut).
                    self._block_sums[block] = (s, col + 3, ss, col + 2)
                    return None
            else:
                col = self._run2("pair", f, s)
                if col is not None:  # columns ||F||^2, ||s||^2, <F, s>, (unused)
                    self._put_cols(key_res, (col, col + 1, col + 2))
                    return None
            f, s, t = f.detach(), s.detach(), t.detach()
            ns = M.sample_norms(s)
            # The block's hook reuses these norms when its input is this very tensor (identity
            # shortcut): matched by storage address, shape and strides, plain Python ints.
            self._shortcut_norms[block] = (_tensor_key(s), ns)
            self._put(key_res, M.residual_stats(f, s, t, ns))
            return None
        return hook

    def _block_observer(self, name: str, block: BasicBlock, bn1_hook, bn2_hook, add_hook):
        """The block hook of a gradlab block: its bn1's response hook, then the add's (which
        records bn2) or, in a plain block, bn2's, then the block's, as forward hooks on each
        would run them."""
        bn1, bn2, add = block.bn1, block.bn2, getattr(block, "add", None)
        bn1_name = _child(name, "bn1")
        block_hook = self._block_hook(name)

        def hook(module, x, y1, y2, s, t, out):
            if not (self._enabled and _grad_enabled()):
                return
            # (its gradient measured by _relu1 as ReLU's gradient is computed, or by a hook)
            bn1_hook(bn1, (), y1, self._relu_measured.pop(bn1_name, None) is not y1)
            if t is not None and add_hook is not None:
                add_hook(add, (y2, s), t)
            else:  # a plain block, or the sum measured by _sum_relu (and its gradient there)
                bn2_hook(bn2, (), y2, add_hook is None)
            block_hook(module, (x,), out)
        return hook

    def _sum_relu(self, name: str, bn2: str, bn2_hook):
        """A residual gradlab block's ``sum_relu`` (see :meth:`BasicBlock.register_block_hook`):
        on a logged CPU step, relu(F + s) in one pass of the kernel ``addrelu_out`` that also
        takes the add hook's sums, and bn2's gradient measured as ReLU's gradient is computed
        (:class:`~gradlab.probing.fused.AddReLU`, by ``relugrad``). The training loop's blocks
        take the same two passes without sums on unlogged steps (``addrelu_only``,
        ``relugrad_only``), so measuring adds only the sums' arithmetic to them. None (the block
        then calls its add and relu2) wherever the kernels do not apply."""
        key_res, key_grad = (name, "residual_stats"), (bn2, "response_grad_norm")
        sums, cols, store = self._sums, self._cols, self._store
        grad_hook = bn2_hook.grad_hook

        def sum_relu(block, f, s):
            if not self._measures_in_pass(f):
                return None
            ss = self._known_sq(s)  # ||s||^2, as in the add hook
            if ss is None:
                ss = self._run_sq(s)
                if ss is None:
                    return None
            out = torch.empty_like(f)
            col = sums.run_out("addrelu_out", f, s, out)
            if col is None:
                return None
            cols[key_res] = (col, ss, col + 1)
            if store:
                store.pop(key_res, None)
            self._block_sums[name] = (s, col + 3, ss, col + 2)
            return AddReLU.apply(f, s, (out, self._grad_record(bn2, key_grad, grad_hook)))
        return sum_relu

    def _relu1(self, bn1: str, bn1_hook):
        """A gradlab block's ``relu1`` (see :meth:`BasicBlock.register_block_hook`): on a logged
        CPU step, ATen's ReLU whose backward measures bn1's gradient as it computes ReLU's
        (:class:`~gradlab.probing.fused.ReLU`, kernel ``relugrad``: ATen's gradient to the bit,
        and no pass of its own over the gradient). None (the block calls relu1) elsewhere."""
        key_grad = (bn1, "response_grad_norm")
        grad_hook = bn1_hook.grad_hook

        def relu1(block, y1):
            if not (y1.requires_grad and self._measures_in_pass(y1)):
                return None
            self._relu_measured[bn1] = y1
            return ReLU.apply(y1, self._grad_record(bn1, key_grad, grad_hook))
        return relu1

    def _measures_in_pass(self, t: torch.Tensor) -> bool:
        """Whether a block's ReLU pass (see _sum_relu, _relu1) can measure response t and its
        gradient now: a recorded CPU forward, not traced, kernels allowed and with the writing
        ones built, and no tensor hook on t that would see its gradient before the probe."""
        return (self._enabled and _grad_enabled() and self.fused is not False
                and not self._traced and t.is_cpu and not t._backward_hooks
                and _kernels.writes())

    def _grad_record(self, name: str, key: tuple, grad_hook) -> _GradRecord:
        """Where the gradient of response ``name``'s call is recorded (a ReLU pass's backward),
        replacing the hook or record of an earlier call since the last snapshot."""
        record = _GradRecord(self._sums, self._cols, self._store, key, grad_hook)
        earlier = self._grad_handles.pop(name, None)
        if earlier is not None:  # called again since the last snapshot
            _remove_grad_hook(earlier)
        self._grad_handles[name] = record
        return record

    def _block_hook(self, name: str):
        key_gap = (name, "identity_gap")

        def hook(module, args, out):
            if not (self._enabled and _grad_enabled()) or not args or not isinstance(
                    out, torch.Tensor):
                return None
            x = args[0]
            cached = self._shortcut_norms.pop(name, None)
            fused = self._block_sums.pop(name, None)
            if fused is not None:
                # out is relu(t) of the add's pass: its ||out||^2 serves the next block.
                s, dd, ss, hh = fused
                self._out_sq = (weakref.ref(out), out._version, hh)
                if s is x:
                    self._put_cols(key_gap, (dd, ss))
                    return None
            if not isinstance(x, torch.Tensor) or x.shape != out.shape:
                return None
            col = self._run2("gap", out, x)
            if col is not None:  # columns ||h - x||^2, ||x||^2
                self._put_cols(key_gap, (col, col + 1))
                return None
            h, x = out.detach(), x.detach()
            x_norms = cached[1] if cached and cached[0] == _tensor_key(x) else None
            self._put(key_gap, M.identity_gap(
                x, h, x_norms=x_norms, scratch=self._scratch_like(h)))
            return None
        return hook

    def _settle_all_bn(self) -> tuple[list[str], torch.Tensor] | None:
        """response_std of every BatchNorm recorded by the exact path (from its saved invstd or
        its running variance), vectorized."""
        forwards = [f for f in self._bn_forwards if f[2]]
        self._bn_forwards.clear()
        names: list[str] = []
        parts: list[torch.Tensor] = []
        for start, end, run, inv in forwards:
            mods = [self._bn_all[self._bn_index[n]][1] for n in run]
            # Momentum, eps, sizes and device are read every time: a user may change them
            # (by map with C callables: no Python call per BatchNorm).
            rvs = [m._buffers["running_var"] for m in mods]
            key = (tuple(run), tuple(map(_numel, rvs)), tuple(run.values()),
                   tuple(map(_momentum, mods)), tuple(map(_eps, mods)), tuple(map(_device, rvs)))
            consts = self._bn_consts.get(key)
            if consts is None:
                layout = tuple((c, n, float(m), float(e), d)
                               for c, n, m, e, d in zip(*key[1:], strict=True))
                if len(self._bn_consts) > 16:
                    self._bn_consts.clear()
                offsets = [0]
                for _, m in self._bn_all:
                    offsets.append(offsets[-1] + m.running_var.numel())
                channels = [c for n in run for c in range(offsets[self._bn_index[n]],
                                                          offsets[self._bn_index[n] + 1])]
                whole = len(run) == len(self._bn_all) and list(run) == list(self._bn_index)
                consts = self._bn_consts[key] = M.BNConstants.build(
                    layout, None if whole else channels)
            invstd = None
            if inv:  # C-vectors in run's order; NaN where a BatchNorm's node saved none
                saved = [t if (t := inv.get(n)) is not None and t.numel() == c else None
                         for n, c in zip(run, key[1], strict=True)]
                if all(t is not None for t in saved):  # every one: no running variances needed
                    start = end = None
                # (NaN: from the running variances; without them, a node's invstd of the wrong
                # size, which BatchNorm's own node never saves, gives a NaN response_std)
                invstd = torch.cat([torch.full((c,), float("nan"), device=rv.device)
                                    if t is None else t
                                    for t, c, rv in zip(saved, key[1], rvs, strict=True)])
            parts.append(M.bn_response_stds(mods, start, end, consts, invstd))
            names += list(run)
        return (names, torch.cat(parts)) if parts else None

    def _settle_sums(self) -> list[tuple[list[str], str, torch.Tensor]]:
        """Every metric whose per-sample sums the kernels wrote this step, a few vectorized ops
        per metric over the table's columns: (layers, metric, values) groups."""
        table = self._sums.filled()
        items = tuple(self._cols.items())
        self._cols.clear()
        if not items:
            return []
        plan = self._sums_plan
        if plan is None or plan[0] != items:  # (the columns normally repeat from step to step)
            plan = self._sums_plan = (items, self._plan_sums(items))
        index, grads, res, diff, gaps = plan[1]
        picked = table.index_select(1, index)  # every column read below, in one gather
        at = 0

        def take(names):
            nonlocal at
            at += len(names)
            return picked[:, at - len(names):at]

        groups: list[tuple[list[str], str, torch.Tensor]] = []
        if grads:
            groups.append((grads, "response_grad_norm", take(grads).sum(0).sqrt()))
        if res:
            ff, ss, third = take(res), take(res), take(res)
            # gradlab's relu blocks take the addrelu pass (third column <F, t>), all other
            # blocks the pair pass (third column <F, s>).
            dot = torch.where(diff, third - ff, third)  # <F, t> - ||F||^2, or <F, s>
            ratio, cosine = M.ratio_cosine(ff, ss, dot)
            groups += [(res, "residual_ratio", ratio), (res, "residual_cosine", cosine)]
        if gaps:
            groups.append((gaps, "identity_gap", M.identity_gap_sq(take(gaps), take(gaps))))
        return groups

    def _plan_sums(self, items: tuple) -> tuple:
        """For _settle_sums: the table's columns to gather (grads' ||g||^2; the blocks' ||F||^2,
        ||s||^2 and third column; the gaps' ||h - x||^2 and ||x||^2, in that order), the layers
        of each metric and which blocks' third column is <F, t>."""
        by = {m: [(k[0], c) for k, c in items if k[1] == m]
              for m in ("response_grad_norm", "residual_stats", "identity_gap")}
        columns = [c[0] for _, c in by["response_grad_norm"]]
        for metric, width in (("residual_stats", 3), ("identity_gap", 2)):
            for i in range(width):
                columns += [c[i] for _, c in by[metric]]
        res = [n for n, _ in by["residual_stats"]]
        return (torch.tensor(columns, dtype=torch.long),
                [n for n, _ in by["response_grad_norm"]], res,
                torch.tensor([n in self._relu_blocks for n in res], dtype=torch.bool),
                [n for n, _ in by["identity_gap"]])

    def _scratch_like(self, t: torch.Tensor) -> torch.Tensor:
        key = (tuple(t.shape), t.stride(), t.dtype, t.device)
        buf = self._scratch.get(key)
        if buf is None:
            buf = self._scratch[key] = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype,
                                                           device=t.device)
        return buf

    # -- results ------------------------------------------------------------------------------
    def _freeze_depths(self) -> None:
        if self._depth:
            return
        # The first pass has shown the forward order; the order hooks have done their job.
        self._remove_order_hooks()
        order = list(self._order or [])
        seen = set(order)
        for name, _ in self._param_modules + self._response_modules + self._blocks:
            if name not in seen:  # never called: after everything that was, in definition order
                order.append(name)
                seen.add(name)
        self._depth = {n: i for i, n in enumerate(order)}

    def depth(self, name: str) -> int:
        """Position of module ``name`` in forward order (known after the first probed pass)."""
        self._freeze_depths()
        return self._depth[name]

    def snapshot(self, *, grad_scale: float | torch.Tensor | None = None) -> PendingFrame:
        """Gather this step's measurements on the device and reset them for the next step.

        Call after ``backward()`` and before ``optimizer.step()``. ``grad_scale`` divides gradient
        metrics when the loss was scaled (fp16 ``GradScaler``); bf16 needs none.
        """
        self._freeze_depths()
        self._reset_forward()
        self._grad_handles.clear()  # the next step's calls are new ones
        layers: list[str] = []
        metrics: list[str] = []
        parts: list[torch.Tensor] = []
        if self._param_modules:
            params = self._params()
            n = len(self._param_modules)
            with torch.no_grad():  # (the parameters are only read: no detach needed)
                norms = self._module_norms([p.grad for p in params] + params, 2 * n)
            g, w = norms[:n], norms[n:]
            if grad_scale is not None:
                g = g / grad_scale
            names = [name for name, _ in self._param_modules]
            parts += [g.float(), w.float()]
            layers += names + names
            metrics += ["grad_norm"] * n + ["weight_norm"] * n
        bn = self._settle_all_bn()
        if bn is not None:
            parts.append(bn[1].float())
            layers += bn[0]
            metrics += ["response_std"] * len(bn[0])
        for names, metric, values in self._settle_sums():
            if metric == "response_grad_norm" and grad_scale is not None:
                values = values / grad_scale
            parts.append(values.float())
            layers += names
            metrics += [metric] * len(names)
        scalars: list[torch.Tensor] = []
        for (name, kind), value in self._store.items():
            if kind == "residual_stats":
                scalars += [value[0], value[1]]
                layers += [name, name]
                metrics += ["residual_ratio", "residual_cosine"]
            else:
                if kind == "response_grad_norm" and grad_scale is not None:
                    value = value / grad_scale
                scalars.append(value)
                layers.append(name)
                metrics.append(kind)
        self._store.clear()
        if scalars:
            parts.append(torch.stack(scalars).float())
        if parts:
            device = parts[-1].device  # eager values live on the model's device
            values = torch.cat([p.to(device) for p in parts])
        else:
            values = torch.zeros(0)
        key = tuple(layers)
        if key != self._depths_of[0]:  # the rows repeat from step to step
            self._depths_of = (key, [self._depth[n] for n in layers])
        return PendingFrame(values, layers, list(self._depths_of[1]), metrics)

    def _params(self) -> list[nn.Parameter]:
        """The measured modules' own parameters, module by module, each once per module; sets
        ``self._owner`` (their module indices, gradients then parameters) when they change."""
        dicts = self._param_dicts
        slots = [p for d in dicts for p in d.values()]
        # Identities (None included) and per-module counts fix which slots to read and their
        # modules; C calls only, and the common case repeats the last step's key.
        key = (tuple(map(id, slots)), tuple(map(len, dicts)))
        if key != self._param_key:
            keep: list[int] = []
            owner: list[int] = []
            i = 0
            for index, d in enumerate(dicts):
                seen: set[int] = set()
                for p in d.values():
                    if p is not None and id(p) not in seen:  # one under two names: once
                        seen.add(id(p))
                        keep.append(i)
                        owner.append(index)
                    i += 1
            self._param_keep, self._param_owner = keep, owner
            self._param_key = key
            self._owner = None
        params = [slots[i] for i in self._param_keep]
        device = params[0].device if params else torch.device("cpu")
        if self._owner is None or self._owner.device != device:
            where = torch.tensor(self._param_owner, dtype=torch.long, device=device)
            # The gradients' modules 0..n-1, then the parameters' n..2n-1: one call for both.
            self._owner = torch.cat((where, where + len(dicts)))
        return params

    def _module_norms(self, tensors: list[torch.Tensor | None], n: int) -> torch.Tensor:
        """Per-module L2 norms of the gradients and the parameters (``tensors``; a missing
        gradient, None, counts as zero), grouped by ``self._owner`` into ``n`` values: one C call
        on CPU, one ``_foreach_norm`` elsewhere."""
        present = [t for t in tensors if t is not None]
        sq = _kernels.sq_list(present) if self.fused is not False else None
        if sq is None:
            return M.module_norms(tensors, self._owner, n)
        if len(present) < len(tensors):
            where = torch.tensor([i for i, t in enumerate(tensors) if t is not None])
            sq = torch.zeros(len(tensors), dtype=torch.float64).index_copy_(0, where, sq)
        return torch.zeros(n, dtype=torch.float64).index_add_(0, self._owner, sq).sqrt().float()

    def collect(self, *, grad_scale: float | torch.Tensor | None = None) -> pd.DataFrame:
        """This step's measurements as a DataFrame ``layer, depth, metric, value``."""
        return self.snapshot(grad_scale=grad_scale).to_frame()
