"""The model registry and the CIFAR ResNet / plain family (He et al. 2015, section 4.2)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradlab
from gradlab.models import (
    BasicBlock,
    CifarResNet,
    GlobalAvgPool,
    ModelError,
    ResidualAdd,
    ShortcutA,
    create_model,
    list_models,
    model_info,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_layers(model: nn.Module) -> list[str]:
    """Conv and linear layers on the main path (shortcut projections are not counted as depth)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and ".shortcut" not in n]


# -- registry ----------------------------------------------------------------------------------
def test_list_models_has_the_paper_depths_in_natural_order() -> None:
    names = list_models()
    for fam in ("resnet", "plain"):
        listed = [n for n in names if n.startswith(fam)]
        assert listed == [f"{fam}{d}" for d in (20, 32, 44, 56, 110)]
    assert gradlab.list_models() == names


# Table 6 of He et al. (2015): #params of the CIFAR-10 ResNets.
@pytest.mark.parametrize(("name", "paper"), [
    pytest.param(n, p, id=n) for n, p in
    [("resnet20", 0.27e6), ("resnet32", 0.46e6), ("resnet44", 0.66e6), ("resnet56", 0.85e6),
     ("resnet110", 1.7e6)]
])
def test_parameter_counts_match_table_6(name: str, paper: float) -> None:
    got = n_params(create_model(name))
    assert abs(got - paper) / paper < 0.03, f"{name}: {got} parameters, paper {paper:.0f}"


@pytest.mark.parametrize("depth", [20, 26, 32, 56, 110])
def test_depth_counts_weight_layers(depth: int) -> None:
    for fam in ("resnet", "plain"):
        m = create_model(f"{fam}{depth}")
        assert len(weight_layers(m)) == depth, fam
        n = (depth - 2) // 6
        assert sum(isinstance(b, BasicBlock) for b in m.modules()) == 3 * n
        assert [len(s) for s in (m.layer1, m.layer2, m.layer3)] == [n, n, n]


def test_plain_is_resnet_without_shortcuts() -> None:
    res, pl = create_model("resnet20"), create_model("plain20")
    # Option A shortcuts have no parameters: the same parameter tensors, name for name.
    assert {k: v.shape for k, v in res.state_dict().items()} == \
        {k: v.shape for k, v in pl.state_dict().items()}
    assert n_params(res) == n_params(pl)
    assert weight_layers(res) == weight_layers(pl)
    assert not any(isinstance(m, (ResidualAdd, ShortcutA)) for m in pl.modules())
    assert not any(hasattr(b, "shortcut") for b in pl.modules() if isinstance(b, BasicBlock))
    assert all(b.residual for b in res.modules() if isinstance(b, BasicBlock))
    assert sum(isinstance(m, ResidualAdd) for m in res.modules()) == 9
    # plain ignores a shortcut request instead of failing
    assert n_params(create_model("plain20", shortcut="B")) == n_params(pl)


def test_model_info() -> None:
    assert model_info("resnet26") == gradlab.models.ModelInfo("resnet26", "resnet", 26, True)
    assert model_info("plain44").residual is False


def test_any_6n_plus_2_depth_builds_and_runs() -> None:
    m = create_model("resnet26")
    assert isinstance(m, CifarResNet) and m.depth == 26
    assert "resnet26" not in list_models()  # works without being listed
    out = m(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 10)


@pytest.mark.parametrize(("name", "hints"), [
    ("resnet21", ["resnet20", "resnet26"]),
    ("plain2", ["plain8"]),
    ("resnet9", ["resnet8", "resnet14"]),
    ("resnt20", ["resnet20"]),
    ("plian56", ["plain56"]),
    ("vgg16", []),
    ("", []),
])
def test_bad_names_are_refused_with_one_line_and_close_names(name: str, hints: list[str]) -> None:
    with pytest.raises(ModelError) as e:
        create_model(name)
    msg = str(e.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    for h in hints:
        assert h in msg, msg
    assert isinstance(e.value, ValueError)  # callers that catch ValueError keep working
    with pytest.raises(ModelError):
        model_info(name)


def test_bad_shortcut_is_refused() -> None:
    with pytest.raises(ValueError, match="shortcut"):
        create_model("resnet20", shortcut="C")


# -- shortcuts ---------------------------------------------------------------------------------
def test_option_a_shortcut_is_subsample_and_zero_pad() -> None:
    torch.manual_seed(0)
    sc = ShortcutA(16, 32, 2)
    assert n_params(sc) == 0 and not list(sc.buffers())
    x = torch.randn(3, 16, 8, 8)
    got = sc(x)
    want = torch.zeros(3, 32, 4, 4)
    for c in range(16):
        for i in range(4):
            for j in range(4):
                want[:, c, i, j] = x[:, c, 2 * i, 2 * j]
    assert torch.equal(got, want)


def test_option_a_in_the_network() -> None:
    m = create_model("resnet20")
    for name in ("layer2.0", "layer3.0"):
        block = m.get_submodule(name)
        assert isinstance(block.shortcut, ShortcutA)
    for name, block in m.named_modules():
        if isinstance(block, BasicBlock) and name not in ("layer2.0", "layer3.0"):
            assert isinstance(block.shortcut, nn.Identity), name
    assert not [n for n, _ in m.named_parameters() if "shortcut" in n]


def test_option_b_adds_a_1x1_projection_with_bn() -> None:
    a, b = create_model("resnet20"), create_model("resnet20", shortcut="B")
    for name, (cin, cout) in (("layer2.0", (16, 32)), ("layer3.0", (32, 64))):
        sc = b.get_submodule(name).shortcut
        assert isinstance(sc, nn.Sequential) and len(sc) == 2
        conv, bn = sc
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and conv.bias is None
        assert (conv.in_channels, conv.out_channels, bn.num_features) == (cin, cout, cout)
    extra = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert n_params(b) - n_params(a) == extra
    # identity shortcuts stay identities
    assert isinstance(b.layer1[0].shortcut, nn.Identity)
    assert isinstance(b.layer2[1].shortcut, nn.Identity)


# -- no in-place operations --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet20", "plain20"])
def test_no_inplace_relu(name: str) -> None:
    relus = [m for m in create_model(name).modules() if isinstance(m, nn.ReLU)]
    assert relus and all(not r.inplace for r in relus)


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("name", ["resnet20", "plain20"])
def test_hooks_see_values_that_nothing_overwrites(name: str, shortcut: str) -> None:
    """Every tensor a hook sees (inputs and outputs of every module) keeps its value to the end."""
    torch.manual_seed(0)
    model = create_model(name, shortcut=shortcut).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        plain_out = model(x)
    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def pre(mod, args, n):
        seen.extend((f"{n} in", a, a.clone()) for a in args if isinstance(a, torch.Tensor))

    def post(mod, args, out, n):
        seen.append((f"{n} out", out, out.clone()))

    handles = []
    for n, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(lambda m, a, n=n: pre(m, a, n)))
        handles.append(mod.register_forward_hook(lambda m, a, o, n=n: post(m, a, o, n)))
    try:
        with torch.no_grad():
            hooked_out = model(x)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(hooked_out, plain_out)
    assert len(seen) > 100
    for what, ref, snapshot in seen:
        assert torch.equal(ref, snapshot), f"{what} was modified in place"


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("name", ["resnet20", "plain20"])
def test_block_hooks_see_what_forward_hooks_on_the_submodules_see(name: str,
                                                                  shortcut: str) -> None:
    """register_block_hook: one call per block forward with the block's input, bn1's and bn2's
    outputs, the shortcut and the sum (None in a plain block) and the output, the very tensors
    that forward hooks on those modules receive; removable; the output is unchanged."""
    torch.manual_seed(0)
    model = create_model(name, shortcut=shortcut).train()
    x = torch.randn(4, 3, 8, 8)
    blocks = {n: b for n, b in model.named_modules() if isinstance(b, BasicBlock)}
    seen: dict[str, dict[str, torch.Tensor]] = {n: {} for n in blocks}
    calls: dict[str, list] = {n: [] for n in blocks}
    handles = []
    for n, b in blocks.items():
        mods = {"bn1": b.bn1, "bn2": b.bn2, "block": b}
        if b.residual:
            mods["add"] = b.add
        for what, mod in mods.items():
            handles.append(mod.register_forward_hook(
                lambda m, a, o, n=n, what=what: seen[n].update(
                    {what: o, f"{what} args": a})))
        handles.append(b.register_block_hook(lambda *a, n=n: calls[n].append(a)))
    torch.manual_seed(1)
    out = model(x)
    for n, b in blocks.items():
        assert len(calls[n]) == 1
        block, xin, y1, y2, s, t, h = calls[n][0]
        ref = seen[n]
        assert block is b and xin is ref["block args"][0] and h is ref["block"]
        assert y1 is ref["bn1"] and y2 is ref["bn2"]
        if b.residual:
            assert y2 is ref["add args"][0] and s is ref["add args"][1] and t is ref["add"]
        else:
            assert s is None and t is None
    for hd in handles:
        hd.remove()
    assert not any(b._block_hooks for b in blocks.values())
    torch.manual_seed(1)
    assert torch.equal(model(x), out)
    assert all(len(c) == 1 for c in calls.values())  # removed: not called again


def test_a_block_hooks_replacements_are_used_only_where_nothing_else_sees_them() -> None:
    """register_block_hook(..., sum_relu=f): f(block, y2, shortcut) computes relu2(add(y2, s))
    (its result is the block's output, the hook then gets total=None) while it belongs to the
    block's only hook and add and relu2 are stock, hook-free modules; None from f, another
    block hook, a hook on add or relu2, a global module hook or an in-place ReLU: the modules.
    relu1=g: g(block, y1) computes relu1(y1) under the same rules."""
    torch.manual_seed(0)
    model = create_model("resnet20").train()
    block = model.layer2[1]
    x = torch.randn(2, 32, 8, 8)
    want = block(x)
    fused: list = []

    def sum_relu(b, y2, s):
        fused.append(b)
        return torch.relu(y2 + s)

    seen: list = []
    handle = block.register_block_hook(lambda *a: seen.append(a), sum_relu=sum_relu)

    def run() -> tuple[bool, object]:
        fused.clear()
        seen.clear()
        out = block(x)
        assert torch.equal(out, want) and len(seen) == 1 and seen[0][-1] is out
        return bool(fused), seen[0][5]

    assert run() == (True, None)
    other = block.register_block_hook(lambda *a: None)
    used, total = run()
    assert not used and torch.equal(total, seen[0][3] + seen[0][4])
    other.remove()
    for mod in (block.add, block.relu2, block.bn2):  # (a hook on bn2 could pass y2 on)
        for register in (mod.register_forward_hook, mod.register_forward_pre_hook):
            if mod is block.bn2 and register == mod.register_forward_pre_hook:
                continue  # (sees only bn2's input)
            h = register(lambda *a: None)
            assert not run()[0]
            h.remove()
        h = mod.register_full_backward_hook(lambda *a: None)
        assert not run()[0]
        h.remove()
    h = nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert not run()[0]
    finally:
        h.remove()
    block.relu2.inplace = True
    assert not run()[0]
    block.relu2.inplace = False
    assert run()[0]
    handle.remove()
    assert not block._block_hooks and not block._fused_ops
    # relu1: the same rules (its own module's hooks, in place).
    relus: list = []

    def relu1(b, y1):
        relus.append(b)
        return torch.relu(y1)

    handle = block.register_block_hook(lambda *a: seen.append(a), relu1=relu1)
    assert run() == (False, seen[0][5]) and len(relus) == 1 and seen[0][5] is not None
    for blocked in ("hook", "inplace", "bn1 hook"):
        relus.clear()
        h = {"hook": block.relu1, "bn1 hook": block.bn1}.get(blocked)
        h = h.register_forward_hook(lambda *a: None) if h is not None else None
        block.relu1.inplace = blocked == "inplace"
        run()
        assert relus == [], blocked
        block.relu1.inplace = False
        if h is not None:
            h.remove()
    other = block.register_block_hook(lambda *a: None)
    relus.clear()
    block(x)
    assert relus == []
    other.remove()
    handle.remove()
    # A sum_relu that declines: the modules compute it.
    handle = block.register_block_hook(lambda *a: seen.append(a), sum_relu=lambda *a: None)
    seen.clear()
    assert torch.equal(block(x), want) and seen[0][5] is not None
    handle.remove()
    # A plain block has no sum: its sum_relu is never called.
    plain = create_model("plain20").layer1[0]
    plain.register_block_hook(lambda *a: None, sum_relu=sum_relu)
    fused.clear()
    plain(torch.randn(2, 16, 8, 8))
    assert fused == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_shortcut_a_and_pooling_give_atens_values_and_keep_the_input_layout(
        dtype: torch.dtype, channels_last: bool) -> None:
    """ShortcutA and GlobalAvgPool compute ATen's slicing + padding and adaptive average pooling
    with ATen's gradients, to the bit, but hand the gradient back in the input's own layout
    (ATen's are NCHW, which sends a channels_last network's backward down slow mixed-layout
    paths); first and second derivatives pass gradcheck in float64."""
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 4, 8, 8), (2, 3, 7, 5)]:
        x = torch.randn(shape, generator=g).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        cases = [(ShortcutA(shape[1], 2 * shape[1], 2),
                  lambda t, c=shape[1]: F.pad(t[:, :, ::2, ::2], (0, 0, 0, 0, 0, c))),
                 (GlobalAvgPool(), lambda t: torch.flatten(F.adaptive_avg_pool2d(t, 1), 1))]
        for module, aten in cases:
            ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
            out, want = module(ours), aten(ref)
            assert torch.equal(out, want) and out.stride() == want.stride()
            w = torch.randn(out.shape, generator=g).to(dtype)
            (out * w).sum().backward()
            (want * w).sum().backward()
            assert torch.equal(ours.grad, ref.grad), type(module).__name__
            assert ours.grad.stride() == x.stride(), type(module).__name__
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    for module in (ShortcutA(3, 6, 2), GlobalAvgPool()):
        assert torch.autograd.gradcheck(module, (x,))
        assert torch.autograd.gradgradcheck(module, (x,))
    # Inputs that are not dense (expanded, sliced): ATen's gradient, NCHW as ATen's.
    base = torch.randn(2, 3, 1, 5)
    for inp in (base.expand(2, 3, 5, 5), torch.randn(2, 3, 5, 10)[..., ::2]):
        for module, aten in ((ShortcutA(3, 6, 2), lambda t: F.pad(t[:, :, ::2, ::2],
                                                                  (0, 0, 0, 0, 0, 3))),
                             (GlobalAvgPool(), lambda t: torch.flatten(
                                 F.adaptive_avg_pool2d(t, 1), 1))):
            ours, ref = inp.detach().requires_grad_(), inp.detach().requires_grad_()
            module(ours).pow(2).sum().backward()
            aten(ref).pow(2).sum().backward()
            assert torch.equal(ours.grad, ref.grad) and ours.grad.is_contiguous()


@pytest.mark.parametrize("dtype, channels_last", [(torch.float32, False), (torch.bfloat16, True),
                                                   (torch.bfloat16, False)])
def test_fused_relu_gives_atens_outputs_and_gradients(dtype, channels_last) -> None:
    """BasicBlock.fused_relu (set by the training loop on CPU): the residual sum and ReLU in
    one kernel pass, each ReLU's gradient in another; outputs, gradients and second derivatives
    are those of ATen's add and ReLU to the bit, under no_grad too; blocks whose add or relu2
    has a hook, and operands the kernel does not take, use ATen."""
    torch.manual_seed(0)
    model = create_model("resnet20").train()
    x = torch.randn(4, 3, 8, 8)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    fused = copy.deepcopy(model)
    blocks = [m for m in fused.modules() if isinstance(m, BasicBlock)]
    for b in blocks:
        b.fused_relu = True
    relus: list = []
    for b in blocks:
        b.conv2.register_forward_pre_hook(lambda m, a: relus.append(a[0]))
    outs: list = []
    for b in blocks:
        b.register_forward_hook(lambda m, a, o: outs.append(o))

    def grads(net):
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = F.cross_entropy(net(x), torch.arange(4))
        gs = torch.autograd.grad(loss, list(net.parameters()), create_graph=True)
        sum(g.pow(2).sum() for g in gs).backward()  # (double backward: ATen's op in AddReLU)
        return loss, list(gs), [p.grad for p in net.parameters()]

    want, got = grads(model), grads(fused)
    assert [type(o.grad_fn).__name__ for o in outs] == ["AddReLUBackward"] * 9
    assert [type(r.grad_fn).__name__ for r in relus] == ["ReLUBackward"] * 9
    assert torch.equal(want[0], got[0])
    for a, b in zip(want[1] + want[2], got[1] + got[2], strict=True):
        assert torch.equal(a, b)
    # First derivatives alone (the kernel computes ReLU's gradient then).
    for net in (model, fused):
        net.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
            F.cross_entropy(net(x), torch.arange(4)).backward()
    for p, q in zip(model.parameters(), fused.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    with torch.no_grad():
        outs.clear()
        assert torch.equal(model.eval()(x), fused.eval()(x))
        assert all(o.grad_fn is None for o in outs)
    # A hook on the add sees the sum: ATen's ops then.
    outs.clear()
    h = blocks[0].add.register_forward_hook(lambda *a: None)
    fused.train()(x)
    assert type(outs[0].grad_fn).__name__ == "ReluBackward0"
    assert type(outs[1].grad_fn).__name__ == "AddReLUBackward"
    h.remove()
    # Operands of different layouts: not the kernel's.
    from gradlab.probing.fused import add_relu

    f = torch.randn(2, 4, 3, 3)
    assert add_relu(f, f.contiguous(memory_format=torch.channels_last)) is None
    assert add_relu(f, f.bfloat16()) is None
    assert torch.equal(add_relu(f, f), torch.relu(f + f))


# -- initialization ----------------------------------------------------------------------------
def test_kaiming_normal_init() -> None:
    torch.manual_seed(0)
    m = create_model("resnet56")
    checked = 0
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Conv2d):
            fan_out = mod.out_channels * mod.kernel_size[0] * mod.kernel_size[1]
            want = math.sqrt(2.0 / fan_out)
            w = mod.weight.detach()
            # sampling error of a std over k values is about 1/sqrt(2k)
            tol = 4 / math.sqrt(2 * w.numel())
            assert abs(w.std().item() / want - 1) < tol, name
            assert abs(w.mean().item()) < 4 * want / math.sqrt(w.numel()), name
            assert mod.bias is None
            checked += 1
        elif isinstance(mod, nn.Linear):
            want = math.sqrt(2.0 / mod.in_features)
            tol = 4 / math.sqrt(2 * mod.weight.numel())
            assert abs(mod.weight.std().item() / want - 1) < tol
            assert torch.equal(mod.bias, torch.zeros_like(mod.bias))
        elif isinstance(mod, nn.BatchNorm2d):
            assert torch.equal(mod.weight, torch.ones_like(mod.weight))
            assert torch.equal(mod.bias, torch.zeros_like(mod.bias))
    assert checked == 55


def test_init_is_seeded() -> None:
    torch.manual_seed(3)
    a = create_model("resnet20").state_dict()
    torch.manual_seed(3)
    b = create_model("resnet20").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_zero_init_residual_blocks_start_as_identity(shortcut: str, train: bool) -> None:
    torch.manual_seed(0)
    model = create_model("resnet20", shortcut=shortcut, zero_init_residual=True).train(train)
    blocks = {n: b for n, b in model.named_modules() if isinstance(b, BasicBlock)}
    assert len(blocks) == 9
    for b in blocks.values():
        assert torch.equal(b.bn2.weight, torch.zeros_like(b.bn2.weight))
    seen = {}
    handles = [b.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, (a[0], o)))
               for n, b in blocks.items()]
    try:
        with torch.no_grad():
            model(torch.randn(6, 3, 8, 8))
            for n, (x, out) in seen.items():
                sc = blocks[n].shortcut(x)  # for B in train mode: the same batch statistics
                assert torch.equal(out, F.relu(sc)), n
                if isinstance(blocks[n].shortcut, nn.Identity):
                    assert torch.equal(out, x), n  # x >= 0 after the previous ReLU
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == 9


def test_in_channels_and_num_classes() -> None:
    m = create_model("plain32", in_channels=1, num_classes=7)
    assert m.conv1.in_channels == 1 and m.fc.out_features == 7
    assert m(torch.randn(5, 1, 8, 8)).shape == (5, 7)
    with pytest.raises(RuntimeError):
        m(torch.randn(5, 3, 8, 8))


def test_outputs_do_not_depend_on_spatial_size() -> None:
    m = create_model("resnet20").eval()
    for size in (8, 16, 32):
        assert m(torch.randn(2, 3, size, size)).shape == (2, 10)


def test_zero_init_residual_leaves_plain_nets_as_they_are() -> None:
    # A plain block has no residual branch: zeroing its bn2 would zero the signal for good
    # (relu(0) = 0 passes no gradient), so plain nets ignore the option.
    torch.manual_seed(0)
    zeroed = create_model("plain20", zero_init_residual=True)
    torch.manual_seed(0)
    default = create_model("plain20")
    for (n, a), (_, b) in zip(zeroed.state_dict().items(), default.state_dict().items(),
                              strict=True):
        assert torch.equal(a, b), n
    x = torch.randn(4, 3, 8, 8)
    F.cross_entropy(zeroed(x), torch.tensor([0, 1, 2, 3])).backward()
    assert zeroed.layer1[0].conv1.weight.grad.abs().sum() > 0


def test_absurd_depths_and_upper_case_names_are_refused_at_once() -> None:
    from gradlab.models import ModelError, model_info

    with pytest.raises(ModelError, match="depth 99999998 is past the 5000 layers"):
        model_info("resnet99999998")
    assert model_info("resnet1202").depth == 1202
    with pytest.raises(ModelError, match="did you mean resnet20"):
        model_info("RESNET20")
