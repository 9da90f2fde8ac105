"""Probe: every metric against a brute-force reference, and the probe's hygiene.

References are computed on an unprobed twin of the model (a deep copy): our own forward hooks
capture the responses, ``torch.autograd.grad`` gives the gradient reaching them, the parameters'
``.grad`` after an ordinary ``backward()`` gives the gradient norms, and a manual pass through each
block's submodules in float64 gives F(x), shortcut(x) and H(x) for the block metrics.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import per_sample_norm
from torch.nn.modules.batchnorm import _BatchNorm

from gradlab import Probe, create_model
from gradlab.data import load_dataset
from gradlab.models import BasicBlock, ResidualAdd
from gradlab.probing import PendingFrame

HOOK_METRICS = {"response_std", "response_grad_norm", "residual_ratio", "residual_cosine",
                "identity_gap"}
LAYER_METRICS = ["grad_norm", "weight_norm", "response_std", "response_grad_norm",
                 "residual_ratio", "residual_cosine", "identity_gap"]


pytestmark = pytest.mark.usefixtures("one_thread")


# -- models under test -------------------------------------------------------------------------
CASES: dict[str, dict] = {
    "resnet20": {"name": "resnet20"},
    "plain20": {"name": "plain20"},
    "resnet20-shortcutB": {"name": "resnet20", "shortcut": "B"},
    "resnet20-channels_last": {"name": "resnet20", "channels_last": True},
    "resnet20-zero_init_residual": {"name": "resnet20", "zero_init_residual": True},
    # The cases above take gradlab's C kernels (gradlab.probing.fused), the default on CPU;
    # these take the eager ATen formulas (GPUs, torch.compile, no C compiler).
    "resnet20-eager": {"name": "resnet20", "fused": False},
    "plain20-eager": {"name": "plain20", "fused": False},
    "resnet20-shortcutB-channels_last-eager": {"name": "resnet20", "shortcut": "B",
                                               "channels_last": True, "fused": False},
}


def build(case: str) -> nn.Module:
    """The case's model on 1-channel digits, moved away from its initialization.

    At init every BN has gamma 1, beta 0 and running statistics (0, 1), which would hide a wrong
    between-channel term of response_std or the use of running statistics in eval mode.
    """
    kw = dict(CASES[case])
    name = kw.pop("name")
    cl = kw.pop("channels_last", False)
    kw.pop("fused", None)
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, num_classes=10, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                c = mod.num_features
                mod.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                mod.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                if not kw.get("zero_init_residual"):
                    mod.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    mod.bias.copy_(torch.randn(c, generator=g) * 0.3)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    return model


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("digits", seed=0)
    return data.train_x[:16].clone(), data.train_y[:16].clone()


def as_input(case: str, x: torch.Tensor) -> torch.Tensor:
    if CASES[case].get("channels_last"):
        return x.contiguous(memory_format=torch.channels_last)
    return x


# -- brute-force references --------------------------------------------------------------------
def manual_block(block: BasicBlock, x: torch.Tensor):
    """F(x), shortcut(x) (None for plain blocks) and H(x), through the submodules one by one."""
    f = block.bn2(block.conv2(block.relu1(block.bn1(block.conv1(x)))))
    if block.residual:
        s = block.shortcut(x)
        return f, s, block.relu2(f + s)
    return f, None, block.relu2(f)


def response_modules(model: nn.Module) -> list[str]:
    named = list(model.named_modules())
    last_linear = [n for n, m in named if isinstance(m, nn.Linear)][-1]
    return [n for n, m in named if isinstance(m, _BatchNorm) or n == last_linear]


@dataclass
class Measured:
    frame: pd.DataFrame
    ref: dict[tuple[str, str], float] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # forward order of every module, ours
    loss_probed: float = 0.0
    loss_ref: float = 0.0
    manual_vs_captured: float = 0.0  # max |H_manual - H_captured| over the blocks


def measure(case: str, train: bool, x: torch.Tensor, y: torch.Tensor) -> Measured:
    model = build(case)
    x = as_input(case, x)
    twin = copy.deepcopy(model)                # the ordinary, unprobed model
    manual = copy.deepcopy(model).double()     # for the manual block passes (float64)
    for mod in (model, twin, manual):
        mod.train(train)

    # 1. The probed step.
    with Probe(model, fused=CASES[case].get("fused", True)) as probe:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        frame = probe.collect()
    m = Measured(frame, loss_probed=loss.item())

    # 2. The reference step on the twin, with our own hooks.
    mods = dict(twin.named_modules())
    responses: dict[str, torch.Tensor] = {}
    block_io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name, mod in mods.items():
        handles.append(mod.register_forward_pre_hook(
            lambda mod_, args, name=name: m.order.append(name)))
    for name in response_modules(twin):
        handles.append(mods[name].register_forward_hook(
            lambda mod_, args, out, name=name: responses.__setitem__(name, out)))
    for name, mod in mods.items():
        if isinstance(mod, BasicBlock):
            handles.append(mod.register_forward_hook(
                lambda mod_, args, out, name=name: block_io.__setitem__(
                    name, (args[0].detach().clone(), out.detach().clone()))))
    try:
        loss = F.cross_entropy(twin(x), y)
        names = list(responses)
        grads = torch.autograd.grad(loss, [responses[n] for n in names], retain_graph=True)
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    m.loss_ref = loss.item()
    ref = m.ref
    for name, g in zip(names, grads, strict=True):
        ref[(name, "response_std")] = responses[name].detach().double().std().item()
        ref[(name, "response_grad_norm")] = g.double().norm().item()
    for name, mod in mods.items():
        params = list(mod.parameters(recurse=False))
        if params:
            ref[(name, "grad_norm")] = math.sqrt(sum((p.grad.double() ** 2).sum().item()
                                                     for p in params))
            ref[(name, "weight_norm")] = math.sqrt(sum((p.detach().double() ** 2).sum().item()
                                                       for p in params))
    # 3. Manual passes through each block, in float64, on the block's own input.
    worst = 0.0
    with torch.no_grad():
        for name, (xin, hout) in block_io.items():
            f, s, h = manual_block(manual.get_submodule(name), xin.double())
            worst = max(worst, (h - hout.double()).abs().max().item())
            if s is not None:
                nf, ns = per_sample_norm(f), per_sample_norm(s)
                dot = (f.double() * s.double()).flatten(1).sum(1)
                cos = torch.where(nf * ns > 0, dot / (nf * ns), torch.zeros_like(dot))
                ref[(name, "residual_ratio")] = (nf / ns).mean().item()
                ref[(name, "residual_cosine")] = cos.mean().item()
            if h.shape == xin.shape:
                ref[(name, "identity_gap")] = (per_sample_norm(h - xin.double())
                                               / per_sample_norm(xin)).mean().item()
    m.manual_vs_captured = worst
    return m


@pytest.fixture(scope="module", params=list(CASES))
def case(request) -> str:
    return request.param


@pytest.fixture(scope="module", params=["train", "eval"])
def mode(request) -> str:
    return request.param


_CACHE: dict[tuple[str, str], Measured] = {}


@pytest.fixture
def measured(case: str, mode: str, batch) -> Measured:
    key = (case, mode)
    if key not in _CACHE:
        _CACHE[key] = measure(case, mode == "train", *batch)
    return _CACHE[key]


def rows(frame: pd.DataFrame, metric: str) -> pd.Series:
    sub = frame[frame.metric == metric]
    assert not sub.layer.duplicated().any(), f"{metric}: a layer appears twice"
    return sub.set_index("layer")["value"]


# Tolerances: the probe reduces in float32, the references in float64. residual_cosine is
# compared absolutely: the probe takes <F, s> from ||F + s||^2 - ||F||^2 - ||s||^2.
TOL = {"grad_norm": (1e-5, 1e-9), "weight_norm": (1e-6, 0), "response_std": (1e-5, 1e-7),
       "response_grad_norm": (1e-5, 1e-9), "residual_ratio": (1e-5, 1e-7),
       "residual_cosine": (0, 1e-5), "identity_gap": (1e-5, 1e-7)}


# -- values against the references -------------------------------------------------------------
def test_probe_does_not_change_the_step(measured: Measured) -> None:
    assert measured.loss_probed == measured.loss_ref
    assert measured.manual_vs_captured < 1e-4  # the manual block pass is the block's forward


@pytest.mark.parametrize("metric", LAYER_METRICS)
def test_metric_matches_reference(measured: Measured, metric: str) -> None:
    got = rows(measured.frame, metric)
    want = {layer: v for (layer, met), v in measured.ref.items() if met == metric}
    assert set(got.index) == set(want), f"{metric}: layers differ"
    rel, abs_ = TOL[metric]
    bad = {layer: (got[layer], w) for layer, w in want.items()
           if not math.isclose(got[layer], w, rel_tol=rel, abs_tol=abs_)}
    assert not bad, f"{metric}: probe vs reference {bad}"
    assert np.isfinite(got.to_numpy()).all()


def test_row_counts(case: str, measured: Measured) -> None:
    counts = measured.frame.metric.value_counts().to_dict()
    model = build(case)
    blocks = [b for b in model.modules() if isinstance(b, BasicBlock)]
    with_params = [m for m in model.modules() if list(m.parameters(recurse=False))]
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    want = {"grad_norm": len(with_params), "weight_norm": len(with_params),
            "response_std": n_bn + 1, "response_grad_norm": n_bn + 1,
            "residual_ratio": sum(b.residual for b in blocks),
            "residual_cosine": sum(b.residual for b in blocks),
            "identity_gap": 7}
    assert {k: v for k, v in want.items() if v} == counts
    # the numbers for the paper's resnet20 / plain20, spelled out
    spelled = {
        "resnet20": (39, 20, 9, 7), "plain20": (39, 20, 0, 7), "resnet20-shortcutB": (43, 22, 9, 7),
        "resnet20-channels_last": (39, 20, 9, 7), "resnet20-zero_init_residual": (39, 20, 9, 7),
        "resnet20-eager": (39, 20, 9, 7), "plain20-eager": (39, 20, 0, 7),
        "resnet20-shortcutB-channels_last-eager": (43, 22, 9, 7),
    }[case]
    assert (want["grad_norm"], want["response_std"], want["residual_ratio"],
            want["identity_gap"]) == spelled


def test_columns_and_dtypes(measured: Measured) -> None:
    f = measured.frame
    assert list(f.columns) == ["layer", "depth", "metric", "value"]
    assert f.depth.dtype == np.int32 and f.value.dtype == np.float64
    assert set(f.metric) <= set(LAYER_METRICS)
    assert (f.layer != "").all() and (f.depth >= 0).all()  # model-wide rows: none


def test_depth_is_forward_order(measured: Measured) -> None:
    f = measured.frame
    depth = f.groupby("layer").depth.agg(["min", "max"])
    assert (depth["min"] == depth["max"]).all(), "one layer, one depth"
    depth = depth["min"]
    assert depth.is_unique
    ours = [n for n in dict.fromkeys(measured.order) if n in depth.index]
    assert set(ours) == set(depth.index)
    assert list(depth.sort_values().index) == ours
    bn_like = set(f[f.metric == "response_std"].layer)  # the BNs and the final linear
    bns = [n for n in ours if n in bn_like]
    assert bns[-1] == "fc"
    assert list(depth[bns]) == sorted(depth[bns])
    # a block comes before what it contains
    for block in set(f[f.metric == "identity_gap"].layer):
        inside = [n for n in depth.index if n.startswith(block + ".")]
        assert inside and all(depth[block] < depth[n] for n in inside)


def test_zero_init_residual_values(batch) -> None:
    m = _CACHE.get(("resnet20-zero_init_residual", "train")) or \
        measure("resnet20-zero_init_residual", True, *batch)
    f = m.frame
    assert (rows(f, "residual_ratio") == 0).all()
    assert (rows(f, "residual_cosine").abs() < 1e-6).all()
    gaps = rows(f, "identity_gap")
    assert (gaps == 0).all(), "identity blocks map x >= 0 to relu(x) = x"
    std = rows(f, "response_std")
    assert all(std[f"{b}.bn2"] == 0 for b in rows(f, "residual_ratio").index)


# -- hygiene -----------------------------------------------------------------------------------
def hooks_left(model: nn.Module) -> list[str]:
    left = []
    for name, mod in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks", "_forward_hooks_with_kwargs",
                     "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
                     "_load_state_dict_pre_hooks"):
            if getattr(mod, attr, None):
                left.append(f"{name or '<root>'}.{attr}")
        if getattr(mod, "_block_hooks", None):
            left.append(f"{name or '<root>'}._block_hooks")
    for name, p in model.named_parameters():
        for attr in ("_backward_hooks", "_post_accumulate_grad_hooks"):
            if getattr(p, attr, None):
                left.append(f"{name}.{attr}")
    return left


def global_hooks() -> int:
    from torch.nn.modules import module as mm

    return sum(len(getattr(mm, a)) for a in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                             "_global_backward_hooks",
                                             "_global_backward_pre_hooks"))


def hook_count(model: nn.Module) -> int:
    return sum(len(getattr(m, a, ())) for m in model.modules()
               for a in ("_forward_hooks", "_forward_pre_hooks", "_block_hooks"))


def by_row(frame: pd.DataFrame) -> pd.DataFrame:
    """A probe's rows in (layer, metric) order, to compare frames whose row order may differ."""
    return frame.sort_values(["layer", "metric"]).reset_index(drop=True)


def step(model: nn.Module, x, y) -> torch.Tensor:
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss


@pytest.mark.parametrize("case", ["resnet20", "plain20", "resnet20-shortcutB"])
def test_no_hooks_left_after_exit(case: str, batch) -> None:
    model = build(case)
    before = global_hooks()
    assert not hooks_left(model)
    with Probe(model) as probe:
        assert hook_count(model) > 0
        step(model, *batch)
        probe.collect()
        step(model, *batch)  # second pass: after the order hooks have been dropped
        probe.collect()
    assert not hooks_left(model)
    assert global_hooks() == before


@pytest.mark.parametrize("first_pass", [True, False], ids=["first-pass", "later-pass"])
def test_no_hooks_left_after_an_exception_mid_forward(first_pass: bool, batch) -> None:
    model = build("resnet20")
    probe = Probe(model)
    if not first_pass:
        with probe:
            step(model, *batch)
            probe.collect()

    def boom(*args):
        raise RuntimeError("boom")

    conv = model.layer2[1].conv2
    conv.forward = boom  # the step raises halfway through the network
    with pytest.raises(RuntimeError, match="boom"):
        with probe:
            step(model, *batch)
    del conv.forward
    assert not hooks_left(model)
    # the probe (and a new one) still work afterwards, with the full set of rows
    model.zero_grad(set_to_none=True)
    for p in (probe, Probe(model)):
        with p:
            step(model, *batch)
            frame = p.collect()
        assert (frame.metric == "residual_ratio").sum() == 9
        assert (frame.metric == "response_std").sum() == 20
        assert not hooks_left(model)


def test_no_hooks_left_after_an_exception_in_backward(batch) -> None:
    model = build("resnet20")
    x, y = batch

    def fail(grad):
        raise RuntimeError("backward boom")

    with pytest.raises(RuntimeError, match="backward boom"):
        with Probe(model):
            out = model(x)
            out.register_hook(fail)
            F.cross_entropy(out, y).backward()
    assert not hooks_left(model)


@pytest.mark.parametrize("case", ["resnet20", "plain20", "resnet20-shortcutB",
                                  "resnet20-shortcutB-channels_last-eager"])
def test_block_hooks_record_what_forward_hooks_record(case, batch, monkeypatch) -> None:
    """gradlab's blocks are measured by one block hook each; forward hooks on bn1, bn2, the add
    and the block (the path any other model takes) record the same rows, to the bit."""
    import gradlab.probing.probe as probe_module

    def frame(observe: bool) -> tuple[pd.DataFrame, int]:
        model = build(case)
        x = as_input(case, batch[0])
        with monkeypatch.context() as m:
            if not observe:  # forward hooks everywhere, as in any other model
                m.setattr(probe_module, "_BLOCK_HOOKS", False)
            with Probe(model, fused=CASES[case].get("fused")) as probe:
                blocks = sum(len(b._block_hooks) for b in model.modules()
                             if isinstance(b, BasicBlock))
                step(model, x, batch[1])
                return probe.collect(), blocks

    observed, blocks = frame(True)
    hooked, none = frame(False)
    assert blocks == 9 and none == 0
    assert set(observed.metric) >= {"response_std", "response_grad_norm", "identity_gap"}
    # (the rows' order may differ: a block hook records bn1 after the block's shortcut ran)
    pd.testing.assert_frame_equal(by_row(observed), by_row(hooked))


@pytest.mark.parametrize("amp, channels_last, aten_shortcut", [
    (False, False, False), (True, True, False), (True, False, False), (True, True, True)],
    ids=["float32", "bf16-channels_last", "bf16", "bf16-channels_last-aten-shortcut"])
def test_logged_blocks_add_and_relu_in_one_measuring_pass_and_train_the_same(
        amp: bool, channels_last: bool, aten_shortcut: bool, batch, monkeypatch) -> None:
    """On a logged CPU step each residual block computes relu(F + s) with the kernel that also
    measures it (AddReLU), and ReLU's gradient with the one that measures bn2's gradient (and
    relu1's gradient with the one that measures bn1's, ReLU):
    the loss, every parameter's gradient and the block outputs are those of an unprobed twin to
    the bit; where the gradient arrives in another layout than the output (under channels_last,
    below a shortcut computed by ATen's slicing, whose gradient is NCHW) ATen computes it and
    the Python hook measures it; response_grad_norm is autograd's either way."""
    import gradlab.probing.fused as fused_module
    from gradlab.models import ShortcutA

    if aten_shortcut:
        monkeypatch.setattr(ShortcutA, "forward", lambda self, x: F.pad(
            x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, 0, self.extra)))

    aten_grads = []
    threshold_backward = fused_module._threshold_backward

    def counted(*args):
        aten_grads.append(args[0].shape)
        return threshold_backward(*args)

    monkeypatch.setattr(fused_module, "_threshold_backward", counted)
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1).train()
    x, y = batch
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(
            memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    outs: list[torch.Tensor] = []
    for b in blocks:
        b.register_forward_hook(lambda m, a, o: outs.append(o))
    twin_outs: list[torch.Tensor] = []
    for b in twin.modules():
        if isinstance(b, BasicBlock):
            b.register_forward_hook(lambda m, a, o: twin_outs.append(o))
    with Probe(model) as probe, torch.autocast("cpu", torch.bfloat16, enabled=amp):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        frame = probe.collect()
    with torch.autocast("cpu", torch.bfloat16, enabled=amp):
        twin_bn2 = {}
        for n, b in twin.named_modules():
            if isinstance(b, BasicBlock):
                for bn in ("bn1", "bn2"):
                    b.get_submodule(bn).register_forward_hook(
                        lambda m, a, o, n=f"{n}.{bn}": twin_bn2.__setitem__(n, o))
        twin_loss = F.cross_entropy(twin(x), y)
        names = list(twin_bn2)
        grads_y2 = dict(zip(names, torch.autograd.grad(
            twin_loss, [twin_bn2[n] for n in names], retain_graph=True), strict=True))
        twin_loss.backward()
    assert all(type(o.grad_fn).__name__ == "AddReLUBackward" for o in outs)
    assert len(outs) == len(twin_outs) == 9
    assert torch.equal(loss, twin_loss)
    for o, t in zip(outs, twin_outs, strict=True):
        assert torch.equal(o, t) and o.stride() == t.stride()
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), n
    # (the last block of stages 1 and 2, below the next stage's first shortcut)
    assert len(aten_grads) == (2 if aten_shortcut else 0)
    got = rows(frame, "response_grad_norm")
    assert len(grads_y2) == 18
    for n, g in grads_y2.items():  # (bn1's: measured as relu1's gradient is computed)
        assert math.isclose(got[n], g.double().norm().item(), rel_tol=1e-5), n


def test_fused_blocks_under_double_backward_and_called_twice(batch) -> None:
    """create_graph=True: ReLU's gradient is ATen's (differentiable), measured by the Python
    hook, and second derivatives are those of an unprobed twin. A block called twice in one
    forward reports its last call's bn2 gradient (backward reaches the first call later)."""
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1).train()
    twin = copy.deepcopy(model)
    x, y = batch
    with Probe(model) as probe:
        loss = F.cross_entropy(model(x), y)
        params = list(model.parameters())
        grads = torch.autograd.grad(loss, params, create_graph=True)
        penalty = sum(g.pow(2).sum() for g in grads)
        penalty.backward()
        frame = probe.collect()
    twin_loss = F.cross_entropy(twin(x), y)
    twin_params = list(twin.parameters())
    twin_grads = torch.autograd.grad(twin_loss, twin_params, create_graph=True)
    sum(g.pow(2).sum() for g in twin_grads).backward()
    for p, q in zip(params, twin_params, strict=True):
        assert torch.equal(p.grad, q.grad)
    assert rows(frame, "response_grad_norm").notna().all()

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, 16, 3, padding=1)
            self.block = BasicBlock(16, 16)
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            return self.head(self.block(self.block(self.stem(x))).mean((2, 3)))

    torch.manual_seed(0)
    model = Twice().train()
    twin = copy.deepcopy(model)
    outs: list[torch.Tensor] = []
    model.block.register_forward_hook(lambda m, a, o: outs.append(o))
    with Probe(model) as probe:
        F.cross_entropy(model(x), y).backward()
        frame = probe.collect()
    assert [type(o.grad_fn).__name__ for o in outs] == ["AddReLUBackward"] * 2
    for bn in ("bn1", "bn2"):
        twin_seen: list[torch.Tensor] = []
        h = twin.block.get_submodule(bn).register_forward_hook(
            lambda m, a, o, seen=twin_seen: seen.append(o))
        loss = F.cross_entropy(twin(x), y)
        h.remove()
        first, last = torch.autograd.grad(loss, twin_seen)
        assert not math.isclose(first.norm().item(), last.norm().item(), rel_tol=1e-3)
        assert math.isclose(rows(frame, "response_grad_norm")[f"block.{bn}"],
                            last.double().norm().item(), rel_tol=1e-5), bn


def test_response_std_from_running_variances_where_no_invstd_was_saved(batch,
                                                                       monkeypatch) -> None:
    """response_std takes BatchNorm's saved 1/sqrt(v + eps) where its node kept one (all of
    them on CPU) and the change of the running variance elsewhere (cuDNN's node, say): with
    none saved, or every other one, the values agree with those from invstd."""
    import gradlab.probing.probe as probe_module

    def stds(saves) -> pd.Series:
        model = build("resnet20")
        with monkeypatch.context() as m:
            if saves is not None:
                m.setattr(probe_module, "_INVSTD_NODES", {})
                m.setattr(probe_module, "_saves_invstd", saves)
            with Probe(model) as probe:
                step(model, *batch)
                f = probe.collect()
        return f[f.metric == "response_std"].set_index("layer").value

    calls = []

    def every_other(node) -> bool:
        calls.append(1)
        return type(node).__name__ == "NativeBatchNormBackward0" and len(calls) % 2 == 0

    exact = stds(None)
    assert len(exact) == 20 and (exact > 0).all()
    for saves in (lambda node: False, every_other):
        got = stds(saves)
        pd.testing.assert_series_equal(got.sort_index(), exact.sort_index(), rtol=1e-3)
    assert len(calls) == 19  # every BatchNorm asked, none cached

    # A forward after one where every BatchNorm saved its invstd reads no running variances; a
    # BatchNorm that then saves none is measured by a pass over its output, and the forward
    # after that reads them again.
    model = build("resnet20")
    with Probe(model) as probe:
        reads = []
        real_reads = probe._running_vars
        monkeypatch.setattr(probe, "_running_vars", lambda: reads.append(1) or real_reads())
        got = []
        none = lambda node: False  # noqa: E731
        for saves in (None, None, none, "eval", none, None, None):
            with monkeypatch.context() as m:
                if callable(saves):
                    m.setattr(probe_module, "_INVSTD_NODES", {})
                    m.setattr(probe_module, "_saves_invstd", saves)
                reads.append(0)
                model.train(saves != "eval")  # (a forward in eval mode changes nothing here)
                step(model, *batch)
                f = probe.collect()
            if saves != "eval":
                got.append(f[f.metric == "response_std"].set_index("layer").value.sort_index())
    # (forward by forward: the running variances read at its start and end, or not)
    assert "".join(map(str, reads)).split("0")[1:] == ["11", "", "", "1", "11", "11", ""]
    for g in got:
        pd.testing.assert_series_equal(g, exact.sort_index(), rtol=1e-3)


def test_a_block_with_an_inplace_relu_keeps_the_forward_hooks(batch) -> None:
    """An in-place ReLU would change bn1's output (or the sum) before the block hook ran: such a
    block is measured by forward hooks, with the values of the same block without it."""
    def frame(inplace: bool) -> tuple[pd.DataFrame, int]:
        model = build("resnet20")
        if inplace:
            model.layer1[1].relu1 = nn.ReLU(inplace=True)
            model.layer2[0].relu2 = nn.ReLU(inplace=True)
        with Probe(model) as probe:
            blocks = sum(len(b._block_hooks) for b in model.modules()
                         if isinstance(b, BasicBlock))
            step(model, *batch)
            return probe.collect(), blocks

    (plain, nine), (inplace, seven) = frame(False), frame(True)
    assert (nine, seven) == (9, 7)
    pd.testing.assert_frame_equal(by_row(inplace), by_row(plain), rtol=1e-6)


def test_a_users_hook_on_a_response_shares_the_probes_hook_dict(batch) -> None:
    """The probe's gradient hook sits in the response's own hook dict: a user's register_hook
    on that tensor afterwards adds to it (both run, once each), and detach() removes only the
    probe's."""
    model = build("resnet20")
    x, y = batch
    seen = []
    with Probe(model) as probe:
        out = model(x)  # the final Linear's output: a response
        out.register_hook(lambda g: seen.append(g.detach().clone()))
        F.cross_entropy(out, y).backward()
        f = probe.collect()
    assert len(seen) == 1
    fc = f[(f.layer == "fc") & (f.metric == "response_grad_norm")].value
    assert len(fc) == 1 and fc.item() == pytest.approx(seen[0].norm().item(), rel=1e-5)

    probe = Probe(model)
    probe.attach()
    out = model(x)
    out.register_hook(lambda g: seen.append(g))
    probe.detach()  # before backward: the probe's gradient hooks go, the user's stays
    assert not hooks_left(model)
    F.cross_entropy(out, y).backward()
    assert len(seen) == 2 and not probe._cols and not probe._store


def test_nested_probes(batch) -> None:
    model = build("resnet20")
    with Probe(model) as outer:
        step(model, *batch)
        first = outer.collect()
        model.zero_grad(set_to_none=True)
        alone = hook_count(model)
        with Probe(model) as inner:
            assert hook_count(model) > alone
            step(model, *batch)
            a, b = inner.collect(), outer.collect()
        assert hook_count(model) == alone  # the inner probe removed only its own hooks
        model.zero_grad(set_to_none=True)
        step(model, *batch)
        c = outer.collect()
    assert not hooks_left(model)
    pd.testing.assert_frame_equal(a, b)
    assert set(a.metric) == set(LAYER_METRICS)
    for f in (first, c):
        assert f.metric.value_counts().to_dict() == a.metric.value_counts().to_dict()


def test_disabled_probe_records_nothing(batch) -> None:
    model = build("resnet20")
    with Probe(model, enabled=False) as probe:
        step(model, *batch)
        frame = probe.collect()
        # hooks record nothing; only the parameter norms read at collect() remain
        assert not set(frame.metric) & HOOK_METRICS
        assert set(frame.metric) <= {"grad_norm", "weight_norm"}
        probe.enabled = True
        model.zero_grad(set_to_none=True)
        step(model, *batch)
        assert set(probe.collect().metric) == set(LAYER_METRICS)
    assert not hooks_left(model)


def test_nothing_recorded_under_no_grad(batch) -> None:
    model = build("resnet20")
    x, y = batch
    with Probe(model) as probe:
        with torch.no_grad():
            model(x)
        assert not set(probe.collect().metric) & HOOK_METRICS
        # an evaluation pass between backward and collect() leaves the step's values alone
        model.eval()
        with torch.no_grad():
            model(torch.randn_like(x))
        model.train()
        ref = copy.deepcopy(model)
        step(model, x, y)
        model.eval()
        with torch.no_grad():
            model(torch.randn_like(x) * 3)
        model.train()
        got = probe.collect()
        with Probe(ref) as p2:
            step(ref, x, y)
            want = p2.collect()
    pd.testing.assert_frame_equal(got, want)


def test_probe_works_on_any_module_and_user_residual_blocks() -> None:
    class MyBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)
            self.add = ResidualAdd()

        def forward(self, x):
            return self.add(self.lin(x), x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), MyBlock(), nn.Linear(6, 3))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    with Probe(model) as probe:
        step(model, x, y)
        f = probe.collect()
    assert set(f[f.metric == "residual_ratio"].layer) == {"2"}
    assert set(f[f.metric == "response_std"].layer) == {"1", "3"}  # the BN and the last Linear
    assert set(f[f.metric == "identity_gap"].layer) == {"2"}
    with torch.no_grad():
        h = model[1](model[0](x))
        fx = model[2].lin(h)
        want = (fx.norm(dim=1) / h.norm(dim=1)).mean().item()
        gap = ((fx + h - h).norm(dim=1) / h.norm(dim=1)).mean().item()
    assert math.isclose(rows(f, "residual_ratio")["2"], want, rel_tol=1e-5)
    assert math.isclose(rows(f, "identity_gap")["2"], gap, rel_tol=1e-5)
    assert not hooks_left(model)


def test_layer_norms_follow_parameters_replaced_removed_or_registered_twice() -> None:
    """The probe caches which parameters it reads (keyed by identity); a parameter replaced,
    removed, added or registered under a second name between steps is read as it is now, once
    per module."""

    class Twice(nn.Module):  # one parameter under two names: counted once, as parameters() does
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 6) / 3)
            self.v = self.w

        def forward(self, x):
            return x @ self.w.T

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), Twice(), nn.Linear(6, 3))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))

    def check(frame: pd.DataFrame) -> None:
        g, w = rows(frame, "grad_norm"), rows(frame, "weight_norm")
        for name, mod in model.named_children():
            ps = list(mod.parameters(recurse=False))
            want_w = math.sqrt(sum(p.double().square().sum().item() for p in ps))
            want_g = math.sqrt(sum(p.grad.double().square().sum().item() for p in ps
                                   if p.grad is not None))
            assert math.isclose(w[name], want_w, rel_tol=1e-6), name
            assert math.isclose(g[name], want_g, rel_tol=1e-5, abs_tol=1e-12), name

    with Probe(model) as probe:
        for change in ("none", "replace", "remove", "twice", "unused", "none"):
            if change == "replace":
                model[0].weight = nn.Parameter(torch.randn(6, 4))
            elif change == "remove":
                model[2].bias = None
            elif change == "twice":
                model[0].again = model[0].weight
            elif change == "unused":  # no gradient: its module's grad_norm leaves it out
                model[2].extra = nn.Parameter(torch.ones(5))
            model.zero_grad(set_to_none=True)
            step(model, x, y)
            check(probe.collect())


def test_a_probe_on_one_block_measures_its_bn2() -> None:
    """bn2's response is recorded by the add's hook in gradlab's blocks, also when the probe is
    attached to the block itself (the root module)."""
    torch.manual_seed(0)
    block = BasicBlock(4, 4).train()
    x = torch.randn(8, 4, 6, 6, requires_grad=True)
    with torch.no_grad():
        want = block.bn2(block.conv2(block.relu1(block.bn1(block.conv1(x))))).double().std()
    block.bn2.reset_running_stats()
    block.bn1.reset_running_stats()
    with Probe(block) as probe:
        out = block(x)
        g, = torch.autograd.grad(out.square().sum(), [x], retain_graph=False)
        frame = probe.collect()
    std = rows(frame, "response_std")
    assert set(std.index) == {"bn1", "bn2"}
    assert math.isclose(std["bn2"], want.item(), rel_tol=1e-5)
    assert set(rows(frame, "response_grad_norm").index) == {"bn1", "bn2"}


# -- host transfers ----------------------------------------------------------------------------
HOST_METHODS = ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__",
                "__index__", "__array__", "to")


def _to_host(args, kwargs) -> bool:
    for a in (*args, kwargs.get("device")):
        if isinstance(a, (str, torch.device)):
            try:
                return torch.device(a).type == "cpu"
            except RuntimeError:
                continue
        if isinstance(a, torch.Tensor):
            return a.device.type == "cpu"
    return False


@contextlib.contextmanager
def count_host_calls():
    """Count Python-level calls that copy a tensor to the host or read its value there."""
    counts: collections.Counter = collections.Counter()
    with pytest.MonkeyPatch.context() as mp:
        for name in HOST_METHODS:
            orig = getattr(torch.Tensor, name)

            def wrapper(self, *a, __orig=orig, __name=name, **k):
                if __name != "to" or _to_host(a, k):
                    counts[__name] += 1
                return __orig(self, *a, **k)

            mp.setattr(torch.Tensor, name, wrapper)
        yield counts


@pytest.mark.parametrize("first", [True, False], ids=["first-step", "later-step"])
def test_no_host_transfer_until_to_host(first: bool, batch) -> None:
    model = build("resnet20").train()
    x, y = batch
    with Probe(model) as probe:
        if not first:
            step(model, x, y)
            probe.snapshot()
            model.zero_grad(set_to_none=True)
        with count_host_calls() as counts:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            pending = probe.snapshot().extend({"loss": loss.detach()})
        # .to(device) of a tensor already on the (cpu) device is not counted as a transfer
        counts.pop("to", None)
        assert sum(counts.values()) == 0, dict(counts)
        with count_host_calls() as counts:
            cols = pending.to_host()
        assert counts == {"to": 1, "numpy": 1}, dict(counts)
    assert isinstance(pending, PendingFrame) and cols["value"].dtype == np.float64
    assert len(cols["value"]) == len(pending.layers) == 39 * 2 + 20 * 2 + 9 * 2 + 7 + 1


def test_probed_step_runs_on_the_meta_device() -> None:
    """On "meta" tensors have no data: any host read inside hooks or snapshot would raise."""
    model = create_model("resnet20", shortcut="B").to("meta")
    x = torch.randn(8, 3, 8, 8, device="meta")
    y = torch.zeros(8, dtype=torch.long, device="meta")
    with Probe(model) as probe:
        for _ in range(2):
            F.cross_entropy(model(x), y).backward()
            pending = probe.snapshot()
    assert pending.values.device.type == "meta"
    assert len(pending.metrics) == 43 * 2 + 22 * 2 + 9 * 2 + 7


# -- probed and unprobed training --------------------------------------------------------------
def test_probed_and_unprobed_training_end_bit_identical(tmp_path) -> None:
    from gradlab.config import TrainConfig
    from gradlab.runs import load_run
    from gradlab.training import train

    cfg = TrainConfig(model="resnet20", dataset="digits", steps=8, every=1, batch_size=16,
                      eval_every=4, checkpoint_every=8, seed=3, device="cpu")
    train(cfg, tmp_path, "probed", probe=True, dashboard=False)
    train(cfg, tmp_path, "unprobed", probe=False, dashboard=False)
    a = torch.load(tmp_path / "probed/checkpoints/last.pt", weights_only=True)
    b = torch.load(tmp_path / "unprobed/checkpoints/last.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ma, mb = load_run(tmp_path / "probed").metrics, load_run(tmp_path / "unprobed").metrics
    assert set(ma.metric) >= HOOK_METRICS and not set(mb.metric) & HOOK_METRICS
    key = ["step", "metric"]
    la = ma[ma.metric.isin(["loss", "accuracy", "test_loss"])].sort_values(key)
    lb = mb[mb.metric.isin(["loss", "accuracy", "test_loss"])].sort_values(key)
    assert len(la) == 8 * 2 + 2
    assert la.value.tolist() == lb.value.tolist()


@pytest.mark.parametrize("bn_kwargs", [
    pytest.param({}, id="default"),
    pytest.param({"momentum": None}, id="cumulative-average"),
    pytest.param({"momentum": 0.5}, id="momentum-0.5"),
    pytest.param({"affine": False}, id="no-affine"),
    pytest.param({"track_running_stats": False}, id="no-running-stats"),
    pytest.param({"eps": 0.1}, id="large-eps"),
])
def test_bn_response_std_over_several_steps(bn_kwargs: dict) -> None:
    """The running-variance inversion holds for every BN setting, step after step."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4, **bn_kwargs)
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    model = nn.Sequential(nn.Conv2d(2, 4, 3), bn, nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    seen = []
    handle = bn.register_forward_hook(lambda m, a, o: seen.append(o.detach().double().std()))
    try:
        with Probe(model) as probe:
            for i in range(3):
                x = torch.randn(5, 2, 8, 8) * (i + 1) + i
                step(model, x, torch.zeros(5, dtype=torch.long))
                got = rows(probe.collect(), "response_std")["1"]
                assert math.isclose(got, seen[-1].item(), rel_tol=1e-5), (i, got, seen[-1])
    finally:
        handle.remove()


def test_bn_response_std_is_of_the_recorded_forward(batch) -> None:
    """response_std of BatchNorms is finished in collect(); a forward in between that is not
    recorded (no_grad, train mode: BN statistics still move) must not change it."""
    model = build("resnet20").train()
    x, y = batch
    captured: dict[str, torch.Tensor] = {}
    handle = model.bn1.register_forward_hook(
        lambda mod, args, out: captured.setdefault("out", out.detach().clone()))
    with Probe(model) as probe:
        F.cross_entropy(model(x), y).backward()
        handle.remove()
        with torch.no_grad():
            model(x.flip(0) * 2)
        frame = probe.collect()
    got = frame[(frame.layer == "bn1") & (frame.metric == "response_std")].value.item()
    assert math.isclose(got, captured["out"].double().std().item(), rel_tol=1e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["kernels", "eager"])
@pytest.mark.parametrize("first_batch", [16, 8], ids=["same-batch", "other-batch"])
def test_a_later_recorded_forward_replaces_an_earlier_one(fused: bool, first_batch: int,
                                                          batch) -> None:
    """Two recorded forwards before one collect(): the values are the second's, one row per
    (layer, metric). With another batch size first, the kernels' table of sums holds that size,
    so the second forward's values are computed eagerly instead, and still agree."""
    x, y = batch
    model = build("resnet20").train()
    twin = copy.deepcopy(model)
    with Probe(model, fused=fused) as probe:
        model(torch.randn(first_batch, *x.shape[1:]) * 2)  # recorded, never backpropagated
        step(model, x, y)
        got = probe.collect()
    with Probe(twin, fused=fused) as probe:
        step(twin, x, y)
        want = probe.collect()
    assert not got.duplicated(["layer", "metric"]).any()
    got, want = (f.set_index(["layer", "metric"])["value"].sort_index() for f in (got, want))
    pd.testing.assert_index_equal(got.index, want.index)
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-5, atol=1e-7)


def test_a_disabled_probe_holds_no_hooks_unless_told_to_keep_them(batch) -> None:
    """Unlogged steps take PyTorch's hook-free path; keep_hooks (torch.compile) keeps them."""
    x, y = batch
    model = build("resnet20").train()
    bare = hook_count(model)
    with Probe(model, enabled=False) as probe:
        step(model, x, y)
        probe.snapshot()  # the forward order is known now: its hooks are gone too
        assert hook_count(model) == bare
        probe.enabled = True
        assert hook_count(model) > bare
        model.zero_grad(set_to_none=True)
        step(model, x, y)
        probe.enabled = False  # values recorded before disabling wait for the snapshot
        assert hook_count(model) == bare
        assert set(probe.collect().metric) == set(LAYER_METRICS)
    with Probe(model, enabled=False, keep_hooks=True) as probe:
        step(model, x, y)
        probe.snapshot()
        kept = hook_count(model)
        assert kept > bare
        probe.enabled = True
        probe.enabled = False
        assert hook_count(model) == kept
    assert not hooks_left(model)


def test_bn_response_std_when_batchnorms_run_twice_not_at_all_or_on_their_own() -> None:
    """The C-vector formula needs each BatchNorm to run once per recorded forward of the model;
    a BatchNorm called twice, or called outside a forward of the model, is measured on its
    output instead, and one that does not run is left out."""

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.shared, self.once, self.unused = (nn.BatchNorm2d(4) for _ in range(3))
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            h = self.shared(self.conv(x))
            h = self.once(torch.relu(h))
            h = self.shared(h * 0.5 + 1)  # the same BatchNorm again
            return self.head(h.mean((2, 3)))

    torch.manual_seed(0)
    model = Odd().train()
    with torch.no_grad():
        for bn in (model.shared, model.once):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    seen: dict[str, torch.Tensor] = {}
    handles = [getattr(model, n).register_forward_hook(
        lambda m, a, o, n=n: seen.__setitem__(n, o.detach().double().std()))
        for n in ("shared", "once")]
    x = torch.randn(6, 2, 5, 5)
    with Probe(model) as probe:
        for _ in range(2):
            step(model, x, torch.zeros(6, dtype=torch.long))
            got = rows(probe.collect(), "response_std")
            assert set(got.index) == {"shared", "once", "head"}  # "unused" never ran
            for n in ("shared", "once"):  # "shared": its second call
                assert math.isclose(got[n], seen[n].item(), rel_tol=1e-5), n
        alone = torch.randn(6, 4, 5, 5) * 3
        model.once(alone)  # a BatchNorm on its own, not within a forward of the model
        got = rows(probe.collect(), "response_std")
        assert math.isclose(got["once"], seen["once"].item(), rel_tol=1e-5)
    for h in handles:
        h.remove()


def test_values_after_a_failed_forward_and_after_many_forwards_without_a_snapshot(batch) -> None:
    """A forward that raises leaves no state behind; forwards repeated without a snapshot keep
    the probe's memory bounded and the last one's values; a BatchNorm's momentum changed
    between steps is read afresh."""
    x, y = batch
    model = build("resnet20").train()
    twin = copy.deepcopy(model)
    boom = model.layer2[1].register_forward_hook(
        lambda m, a, o: (_ for _ in ()).throw(RuntimeError("boom")))
    with Probe(model) as probe:
        with pytest.raises(RuntimeError, match="boom"):
            model(x)
        boom.remove()
        for _ in range(40):
            model(x)  # recorded, never backpropagated: each replaces the last
        assert probe._sums.used < 600 and len(probe._bn_forwards) == 1
        step(model, x, y)
        got = probe.collect()
    with Probe(twin) as probe:
        twin(x)
        for _ in range(40):
            twin(x)
        step(twin, x, y)
        want = probe.collect()
    pd.testing.assert_frame_equal(by_row(got), by_row(want), rtol=1e-5)
    seen = {}
    handle = model.bn1.register_forward_hook(
        lambda m, a, o: seen.__setitem__("s", o.detach().double().std()))
    with Probe(model) as probe:
        for momentum in (0.1, 0.7):  # the same probe, a changed BatchNorm
            model.bn1.momentum = momentum
            model.zero_grad(set_to_none=True)
            step(model, x, y)
            assert math.isclose(rows(probe.collect(), "response_std")["bn1"], seen["s"].item(),
                                rel_tol=1e-5)
    handle.remove()


# -- unusual models ------------------------------------------------------------------------------
def test_a_residual_add_directly_under_a_model_that_is_not_a_block() -> None:
    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.add, self.head = nn.Linear(6, 6), ResidualAdd(), nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.add(self.lin(x), x))

    torch.manual_seed(0)
    model = Root()
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    with Probe(model) as probe:
        F.cross_entropy(model(x), y).backward()
        frame = probe.collect()
    # Its layers are measured; the add, whose block would be the model itself, is not.
    assert set(rows(frame, "grad_norm").index) == {"lin", "head"}
    assert math.isclose(rows(frame, "grad_norm")["lin"],
                        torch.cat([p.grad.flatten() for p in model.lin.parameters()]).norm().item(),
                        rel_tol=1e-5)
    assert "residual_ratio" not in set(frame.metric)


@pytest.mark.parametrize("momentum", [0.0, None], ids=["momentum-0", "cumulative"])
def test_batchnorm_whose_running_variance_does_not_hold_the_batch(momentum) -> None:
    # momentum 0 keeps the running variance as it was; None averages all batches so far: the
    # batch variance cannot be read back from them, so the response is measured directly.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=momentum),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).train()
    x = torch.randn(8, 3, 6, 6)
    seen = []
    model[1].register_forward_hook(lambda m, a, o: seen.append(o.detach().double()))
    with Probe(model) as probe:
        for _ in range(2):  # (the cumulative average needs more than one batch to differ)
            F.cross_entropy(model(x * (1 + len(seen))), torch.tensor([0, 1, 2] * 2 + [0, 1]))\
                .backward()
            frame = probe.collect()
    std = rows(frame, "response_std")["1"]
    assert math.isfinite(std) and math.isclose(std, seen[-1].std().item(), rel_tol=1e-5)


def test_a_module_called_twice_reports_one_call_for_both_metrics() -> None:
    # The last call's response_std and the gradient reaching that same call (backward reaches
    # the earlier call later: it must not overwrite it).
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), \
                nn.Linear(4, 3)

        def forward(self, x):
            h = self.bn(self.conv(x))
            h = self.bn(torch.relu(h) * 2.0 + 1.0)
            return self.head(h.mean((2, 3)))

    for fused in (None, False):
        torch.manual_seed(0)
        model = Twice().train()
        outs = []
        model.bn.register_forward_hook(lambda m, a, o, outs=outs: outs.append(o))
        x, y = torch.randn(6, 3, 5, 5), torch.tensor([0, 1, 2, 0, 1, 2])
        with Probe(model, fused=fused) as probe:
            logits = model(x)
            for o in outs:
                o.retain_grad()
            F.cross_entropy(logits, y).backward()
            frame = probe.collect()
        last = outs[-1]
        assert not torch.allclose(outs[0].grad.norm(), last.grad.norm())
        assert math.isclose(rows(frame, "response_grad_norm")["bn"], last.grad.norm().item(),
                            rel_tol=1e-5), fused
        assert math.isclose(rows(frame, "response_std")["bn"],
                            last.detach().double().std().item(), rel_tol=1e-5), fused


@pytest.mark.parametrize("running_var, momentum", [(1.0, 0.1), (1.0, 0.01), (50.0, 0.1)])
def test_response_std_of_a_channel_far_below_its_running_variance(running_var, momentum) -> None:
    # A constant channel and one scaled by 1e-3, under running variances of 1 or 50: read back
    # from the running variances (float32), the batch variance cancels (errors of 6e-4 to 2e-2
    # were seen); BatchNorm's own saved 1/sqrt(v + eps) gives it exactly.
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(4, momentum=momentum), nn.Flatten(),
                          nn.Linear(64, 3)).train()
    model[0].running_var.fill_(running_var)
    x = torch.randn(8, 4, 4, 4)
    x[:, 0] = 0.7
    x[:, 1] *= 1e-3
    seen = []
    model[0].register_forward_hook(lambda m, a, o: seen.append(o.detach().double()))
    with Probe(model) as probe:
        F.cross_entropy(model(x), torch.tensor([0, 1, 2] * 2 + [0, 1])).backward()
        frame = probe.collect()
    assert math.isclose(rows(frame, "response_std")["0"], seen[-1].std().item(), rel_tol=1e-6)


def test_response_std_from_running_variances_where_no_node_saved_them() -> None:
    # Nothing requires a gradient: the BatchNorm has no autograd node, and its response_std
    # comes from the running variances alone (well conditioned here).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    model.requires_grad_(False)
    seen = []
    model[1].register_forward_hook(lambda m, a, o: seen.append(o.detach().double()))
    with Probe(model) as probe:
        model(torch.randn(8, 3, 6, 6))
        frame = probe.collect()
    assert math.isclose(rows(frame, "response_std")["1"], seen[-1].std().item(), rel_tol=1e-5)
