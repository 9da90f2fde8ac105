"""gradlab's C kernels: each sum against float64, the layout guard, the build and its fallback,
and the probe's use of them under bf16 autocast.

test_probe.py checks every metric of whole probed models (kernels on, and off) against float64
references; here the kernels are checked one by one, and on the bf16 tensors real blocks compute.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import per_sample_norm

from gradlab import Probe, create_model
from gradlab.data import load_dataset
from gradlab.models import BasicBlock, ResidualAdd
from gradlab.probing import fused
from gradlab.probing.fused import KERNELS, Kernels, SumTable, dense_per_sample, kernels

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(name: str, a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The kernel's sums in float64, from the formulas, shape (K, N)."""
    a = a.double().reshape(a.shape[0], -1) if a.ndim > 1 else a.double().reshape(1, -1)
    if b is not None:
        b = b.double().reshape(a.shape)
    if name == "sq":
        return (a * a).sum(1)[None]
    if name == "pair":
        d = torch.maximum(a, -b)
        return torch.stack([(a * a).sum(1), (b * b).sum(1), (a * b).sum(1), (d * d).sum(1)])
    if name == "gap":
        d = a - b
        return torch.stack([(d * d).sum(1), (b * b).sum(1)])
    h, d = b.clamp(min=0), a - b.clamp(max=0)
    return torch.stack([(a * a).sum(1), (a * b).sum(1), (h * h).sum(1), (d * d).sum(1)])


# Per-sample sizes: whole SIMD iterations (1024), a tail of scalars only (10, 33, 37, 147), of
# one 2-vector step and scalars (1061 = 1024 + 32 + 5), several chunks with both tails (3065).
SHAPES = [(6, 16, 8, 8), (5, 3, 7, 7), (3, 10), (4, 1, 1, 33), (37,), (3, 1061), (2, 5, 613)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_sums_match_float64(name: str, shape: tuple, dtype: torch.dtype) -> None:
    """Every kernel and element type, sizes with and without a SIMD tail, NCHW and NHWC."""
    g = torch.Generator().manual_seed(len(shape) * 31 + shape[0])
    a = (torch.randn(shape, generator=g) * 3).to(dtype)
    b = (torch.randn(shape, generator=g) * 2).to(dtype)
    layouts = [lambda t: t]
    if len(shape) == 4:
        layouts.append(lambda t: t.contiguous(memory_format=torch.channels_last))
    for lay in layouts:
        a_, b_ = lay(a), lay(b)
        args = (a_,) if name == "sq" else (a_, b_)
        assert kernels.usable(*args)
        got = kernels(name, *args)
        want = reference(name, a_, None if name == "sq" else b_)
        assert got.dtype == torch.float64 and got.shape == want.shape
        # Products in float32 (exact for bf16), chunk sums of at most 32 terms in float32:
        # a few 1e-7 relative at worst; the scale is each row's sum of squares.
        scale = want.abs().amax(dim=1, keepdim=True) + 1e-30
        assert ((got - want).abs() / scale).max().item() < 2e-6


def test_large_sums_keep_float64_accuracy() -> None:
    """A sum over 2^22 elements: float32 running sums would be off by about 1e-4 here; the
    kernels' chunks in float64 keep it near 1e-7 (what <F, s> from a difference of sums needs)."""
    x = torch.full((2, 1 << 22), 1.0 + 2.0 ** -12)
    got = kernels("sq", x)[0]
    want = float((1 << 22) * (1.0 + 2.0 ** -12) ** 2)
    assert (got / want - 1).abs().max().item() < 1e-7


def test_results_do_not_depend_on_the_thread_count() -> None:
    g = torch.Generator().manual_seed(3)
    f = torch.randn(64, 16, 16, 16, generator=g).bfloat16()
    t = torch.randn(64, 16, 16, 16, generator=g).bfloat16()
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels("addrelu", f, t)
        torch.set_num_threads(2)
        two = kernels("addrelu", f, t)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, two)  # each sample is summed by one thread, in a fixed order


def test_layouts_the_kernels_cannot_read_are_refused() -> None:
    x = torch.randn(4, 8, 6, 6)
    assert dense_per_sample(x) and dense_per_sample(x.to(memory_format=torch.channels_last))
    bad = {
        "strided": x[:, ::2],
        "transposed": x.transpose(2, 3),
        "float64": x.double(),
        "float16": x.half(),
        "empty": x[:0],
        "0-d": x.sum(),
        "meta": torch.empty(4, 8, device="meta"),
    }
    table = SumTable()
    for why, t in bad.items():
        assert not dense_per_sample(t), why
        assert not kernels.usable(t), why
        assert table.run("sq", t) is None and table.used == 0, why
        assert table.sq(t) is None and table.used == 0, why  # the probe's paths
        assert table.run2("pair", t, t) is None and table.used == 0, why
        with pytest.raises(ValueError, match="dense per sample"):
            kernels("sq", t)  # checked on every call: raw memory is never read on assumption
    nhwc = x.to(memory_format=torch.channels_last)
    assert not kernels.usable(x, nhwc)  # same shape, other strides: elements would not pair
    assert not kernels.usable(x, x.bfloat16())
    assert not kernels.usable(x, x[:2])
    assert table.run("pair", x, nhwc) is None and table.used == 0
    meta = torch.empty_like(x, device="meta")
    for other in (nhwc, x.bfloat16(), x[:2], torch._neg_view(x), meta):
        assert table.run2("pair", x, other) is None and table.used == 0
    assert table.run2("pair", torch._neg_view(x), x) is None and table.used == 0
    with pytest.raises(ValueError):
        kernels("pair", x, nhwc)
    with pytest.raises(ValueError):
        kernels("pair", x)  # wrong arity
    with pytest.raises(ValueError):
        kernels("nope", x)


def test_build_is_cached_per_cpu_and_failure_falls_back_once(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GRADLAB_CACHE_DIR", str(tmp_path))
    k = Kernels()
    assert k.load(required=True)
    libs = sorted(tmp_path.glob("probe-kernels-*.so"))
    assert len(libs) == 1
    # A second process (a new Kernels) loads the cached library without running the compiler.
    real_run = fused.subprocess.run
    monkeypatch.setattr(fused.subprocess, "run", lambda *a, **kw: pytest.fail("recompiled"))
    assert Kernels().load(required=True)
    # Another CPU (another -march=native) gets a library of its own.
    monkeypatch.setattr(fused.subprocess, "run", real_run)
    monkeypatch.setattr(fused, "_cpu_identity", lambda: "another cpu")
    assert Kernels().load(required=True)
    assert len(list(tmp_path.glob("probe-kernels-*.so"))) == 2

    # A compiler without OpenMP or -march=native: the baseline build, same sums.
    monkeypatch.setenv("GRADLAB_CACHE_DIR", str(tmp_path / "plain"))
    monkeypatch.setattr(fused, "_FLAG_SETS", (("-O3", "-fno-openmp"), ("-O3",)))
    plain = Kernels()
    assert plain.load(required=True)
    monkeypatch.setattr(fused, "kernels", plain)
    x = torch.randn(8, 5, 7, 7).bfloat16()
    table = SumTable()
    col = table.run("addrelu", x, x * 2)
    col2 = table.run2("addrelu", x, x * 2)  # the probe's path: the same sums
    sums = table.filled()
    for c in (col, col2):
        torch.testing.assert_close(sums[:, c: c + 4].T, reference("addrelu", x, x * 2),
                                   rtol=2e-6, atol=0)

    # No compiler: one warning, then the eager formulas; fused=True refuses to attach.
    monkeypatch.setenv("GRADLAB_CACHE_DIR", str(tmp_path / "other"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    broken = Kernels()
    monkeypatch.setattr(fused, "kernels", broken)
    import gradlab.probing.probe as probe_mod
    monkeypatch.setattr(probe_mod, "_kernels", broken)
    f = torch.randn(3, 4, 5, 5)
    with pytest.warns(RuntimeWarning, match="C kernels unavailable.*non-finite"):
        assert not broken.usable(f)
    assert broken.failed is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        assert not broken.usable(f)
    model = create_model("resnet20", in_channels=1, num_classes=10)
    with pytest.raises(RuntimeError, match="unavailable"):
        Probe(model, fused=True).attach()
    x = torch.randn(4, 1, 8, 8)
    with Probe(model) as probe:  # default: eager formulas, same metrics
        F.cross_entropy(model(x), torch.arange(4)).backward()
        frame = probe.collect()
    assert {"residual_ratio", "identity_gap", "response_grad_norm"} <= set(frame.metric)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("digits", seed=0)
    return data.train_x[:32].clone(), data.train_y[:32].clone()


def captured_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **probe_kw):
    """A probed bf16 step; our own hooks capture (F, s, t) of every add, (x, h) of every block
    and the gradient reaching every BatchNorm output."""
    adds, blocks, grads, handles = {}, {}, {}, []
    for n, m in model.named_modules():
        if isinstance(m, ResidualAdd):
            handles.append(m.register_forward_hook(
                lambda mod, args, out, n=n: adds.__setitem__(n.rpartition(".")[0],
                                                             (*args, out))))
        if isinstance(m, BasicBlock):
            handles.append(m.register_forward_hook(
                lambda mod, args, out, n=n: blocks.__setitem__(n, (args[0], out))))
        if isinstance(m, nn.BatchNorm2d):
            def keep(mod, args, out, n=n):
                out.register_hook(lambda g, n=n: grads.__setitem__(n, g))
            handles.append(m.register_forward_hook(keep))
    try:
        with Probe(model, **probe_kw) as probe:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            F.cross_entropy(out.float(), y).backward()
            frame = probe.collect()
    finally:
        for h in handles:
            h.remove()
    return frame.set_index(["layer", "metric"])["value"], adds, blocks, grads


@pytest.mark.parametrize("name", ["resnet20", "plain20"])
def test_bf16_metrics_match_float64_reference(name: str, batch) -> None:
    """The probe reduces the bf16 tensors the blocks really computed; the reference reduces the
    same tensors, captured by hooks of our own, in float64."""
    x, y = batch
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, num_classes=10)
    model = model.to(memory_format=torch.channels_last).train()
    x = x.contiguous(memory_format=torch.channels_last)
    got, adds, blocks, grads = captured_run(model, x, y, fused=True)
    checked = 0
    for block, (f, s, t) in adds.items():
        assert f.dtype == torch.bfloat16 and t.dtype == torch.bfloat16
        nf, ns = per_sample_norm(f), per_sample_norm(s)
        dot = (f.double() * s.double()).flatten(1).sum(1)
        assert math.isclose(got[(block, "residual_ratio")], (nf / ns).mean().item(),
                            rel_tol=1e-5)
        # <F, s> = <F, t> - ||F||^2 with t = F + s rounded to bf16 by the model: |t_i - (F_i +
        # s_i)| <= 2^-8 |t_i|, so per sample the cosine is off by at most
        # 2^-8 sum_i |F_i t_i| / (||F|| ||s||) (a bound; typical errors are far smaller).
        ft = (f.double() * t.double()).abs().flatten(1).sum(1)
        bound = (2.0 ** -8 * ft / (nf * ns)).mean().item()
        want = (dot / (nf * ns)).mean().item()
        assert abs(got[(block, "residual_cosine")] - want) <= bound
        assert abs(got[(block, "residual_cosine")] - want) < 5e-4
        checked += 2
    for block, (xin, h) in blocks.items():
        if h.shape == xin.shape:
            want = (per_sample_norm(h.double() - xin.double()) / per_sample_norm(xin)).mean()
            # Residual blocks take h - x = F - min(t, 0), off h - x by t's bf16 rounding
            # (2^-9 |t| per element): a relative 1e-4 or so.
            rel = 5e-4 if name.startswith("resnet") else 1e-5
            assert math.isclose(got[(block, "identity_gap")], want.item(), rel_tol=rel)
            checked += 1
    for bn, g in grads.items():
        assert g.dtype == torch.bfloat16
        assert math.isclose(got[(bn, "response_grad_norm")], g.double().norm().item(),
                            rel_tol=1e-6)
        checked += 1
    assert checked == (25 + 19 if name == "resnet20" else 7 + 19)


def test_block_inputs_come_from_the_previous_pass_and_in_place_edits_are_seen(batch,
                                                                             monkeypatch) -> None:
    """||x||^2 of a block is taken from the previous block's pass (no pass over x) only while
    x is that very output, unmodified: an in-place edit between blocks forces a fresh pass.
    (Forward metrics only: autograd itself refuses a backward through that edit.)"""
    calls = []
    real_sq, real_run2 = fused.SumTable.sq, fused.SumTable.run2  # the probe's two entries

    def sq(self, t):
        col = real_sq(self, t)
        if col is not None:  # a pass was made (by the extension or by ctypes)
            calls.append("sq")
        return col

    def run2(self, name, a, b):
        col = real_run2(self, name, a, b)
        if col is not None:
            calls.append(name)
        return col

    real_run_out = fused.SumTable.run_out  # (ReLU's gradient measured as it is computed)

    def run_out(self, name, a, b, dst):
        col = real_run_out(self, name, a, b, dst)
        if col is not None:
            calls.append(name)
        return col

    monkeypatch.setattr(fused.SumTable, "sq", sq)
    monkeypatch.setattr(fused.SumTable, "run2", run2)
    monkeypatch.setattr(fused.SumTable, "run_out", run_out)
    fused.kernels.load()
    real_grad_sq = fused.kernels.grad_sq
    if real_grad_sq is not None:  # the gradient hooks, in C where the extension exists
        def grad_sq(*args):
            calls.append("grad")
            return real_grad_sq(*args)
        monkeypatch.setattr(fused.kernels, "grad_sq", grad_sq)
    x, y = batch
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1, num_classes=10).train()
    got, *_ = captured_run(model, x, y, fused=True)
    # 9 blocks, one addrelu pass each; a pass over s only for the first block of each stage
    # (the stem's output, then two option-A shortcuts); the gradients of 19 BatchNorms and of
    # the final Linear, each by the C hook (or by "sq" without the extension). (captured_run's
    # own hooks on the adds and the BatchNorms keep the blocks from the passes that measure as
    # they compute: relugrad, addrelu_out.)
    grads = calls.count("grad") if real_grad_sq is not None else calls.count("sq") - 3
    assert calls.count("addrelu") == 9 and calls.count("sq") == 3 + 20 - grads and grads == 20
    assert "relugrad" not in calls and "addrelu_out" not in calls

    class Scaled(nn.Module):
        """Two gradlab blocks with an in-place scaling of the first one's output between."""

        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = BasicBlock(4, 4), BasicBlock(4, 4)

        def forward(self, x):
            h = self.a(x)
            h.mul_(3.0)
            return self.b(h)

    torch.manual_seed(1)
    net = Scaled().train()
    inp = torch.randn(8, 4, 6, 6)
    captured = {}
    handle = net.b.add.register_forward_hook(
        lambda m, args, out: captured.__setitem__("fs", args))
    with Probe(net, fused=True) as probe:
        net(inp)
        frame = probe.collect().set_index(["layer", "metric"])["value"]
    handle.remove()
    f, s = captured["fs"]
    want = (per_sample_norm(f) / per_sample_norm(s)).mean().item()
    assert math.isclose(frame[("b", "residual_ratio")], want, rel_tol=1e-6)


def test_sums_are_written_into_a_table_that_grows_and_keeps_its_columns() -> None:
    table = SumTable()
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(4, 3, 5, 5, generator=g) for _ in range(40)]
    cols = []
    for x in xs:  # 40 x 2 columns: past the first allocation of 64
        col = table.take(4, 2)
        kernels("gap", x, x * 0.5, out=table.columns(col, 2))
        cols.append(col)
    assert table.take(3, 1) is None  # another batch size within a step: refused
    filled = table.filled()
    assert filled.shape == (4, 80)
    for x, col in zip(xs, cols, strict=True):
        torch.testing.assert_close(filled[:, col: col + 2].T, reference("gap", x, x * 0.5))
    assert table.take(3, 1) == 0  # a new step may have another batch size
    bad = {"float32": torch.empty(4, 2), "shape": torch.empty(4, 3, dtype=torch.float64),
           "column stride": torch.empty(2, 4, dtype=torch.float64).T}
    for out in bad.values():
        with pytest.raises(ValueError, match="unit column stride"):
            kernels("gap", xs[0], xs[1], out=out)


def test_sq_list_matches_float64_and_refuses_what_it_cannot_read() -> None:
    g = torch.Generator().manual_seed(7)
    ts = [torch.randn(s, generator=g) for s in [(16, 3, 3, 3), (16,), (1,), (10, 64), (33,)]]
    ts.append(torch.randn(8, 4, 3, 3, generator=g).contiguous(memory_format=torch.channels_last))
    for dtype in (torch.float32, torch.bfloat16):
        xs = [t.to(dtype) for t in ts]
        got = kernels.sq_list(xs)
        want = torch.stack([t.double().square().sum() for t in xs])
        torch.testing.assert_close(got, want, rtol=2e-6, atol=0)
    assert kernels.sq_list([ts[0], ts[1].bfloat16()]) is None  # one dtype per call
    assert kernels.sq_list([ts[0], ts[0][:, ::2]]) is None  # not dense
    assert kernels.sq_list([]) is None
    # Any tensor whose elements fill one block of memory is read, whatever its shape; one that
    # does not, or whose stored values are not its values, makes the whole call refuse.
    odd = [torch.tensor(3.0), torch.empty(0, 4), torch.randn(2, 3, 4, 5, 6, generator=g)
           .contiguous(memory_format=torch.channels_last_3d), torch.randn(5, 7, generator=g).t()
           .contiguous()]
    got = kernels.sq_list(odd)
    torch.testing.assert_close(got, torch.stack([t.double().square().sum() for t in odd]),
                               rtol=2e-6, atol=0)
    for bad in (ts[3].t(), torch._neg_view(ts[0]), torch.empty(3, device="meta"),
                ts[0].transpose(1, 3)):
        assert kernels.sq_list([ts[1], bad]) is None


@pytest.mark.parametrize("fused_on", [True, False], ids=["kernels", "eager"])
def test_parameter_norms_count_a_missing_gradient_as_zero(fused_on: bool) -> None:
    torch.manual_seed(0)
    model = create_model("resnet8", in_channels=1, num_classes=10)
    model.layer1[0].conv1.weight.requires_grad_(False)  # frozen: its .grad stays None
    with Probe(model, fused=fused_on) as probe:
        F.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.arange(4)).backward()
        frame = probe.collect().set_index(["layer", "metric"])["value"]
    assert frame[("layer1.0.conv1", "grad_norm")] == 0.0
    w = model.layer1[0].conv1.weight.double().norm().item()
    assert math.isclose(frame[("layer1.0.conv1", "weight_norm")], w, rel_tol=1e-6)
    bn = model.layer1[0].bn1
    want = torch.cat([bn.weight.grad, bn.bias.grad]).double().norm().item()
    assert math.isclose(frame[("layer1.0.bn1", "grad_norm")], want, rel_tol=1e-6)


@pytest.mark.parametrize("ratio", [1.0, 0.01, 0.001])
def test_bf16_cosine_stays_accurate_when_the_residual_is_small(ratio: float) -> None:
    """Near-identity blocks (||F|| << ||s||, as early in a zero-initialized run): the cosine from
    <F, t> - ||F||^2 carries t's bf16 rounding only through <F, dt>, never ||t||^2."""
    g = torch.Generator().manual_seed(11)
    s = torch.randn(16, 16, 16, 16, generator=g).relu()
    noise = torch.randn(16, 16, 16, 16, generator=g)
    f = (0.3 * s / s.norm() + noise / noise.norm()) * s.norm() * ratio  # cosine about 0.3-0.5
    f, s = f.bfloat16(), s.bfloat16()
    t = f + s  # rounded to bf16, as the model's sum is
    ff, ft = kernels("addrelu", f, t)[:2]
    fd, sd = f.double().flatten(1), s.double().flatten(1)
    want = ((fd * sd).sum(1) / (fd.norm(dim=1) * sd.norm(dim=1)))
    got = (ft - ff) / (ff.sqrt() * sd.norm(dim=1))
    bound = 2.0 ** -8 * (fd * t.double().flatten(1)).abs().sum(1) / (fd.norm(dim=1) *
                                                                     sd.norm(dim=1))
    assert ((got - want).abs() <= bound).all()
    assert (got - want).abs().mean().item() < (2e-3 if ratio >= 0.01 else 1e-2)


def test_tensors_without_memory_and_wrong_arity_are_refused() -> None:
    zero = torch._efficientzerotensor(2, 16)
    assert not dense_per_sample(zero) and kernels.sq_list([zero]) is None
    with pytest.raises(ValueError):
        kernels("sq", zero)
    table = SumTable()
    x = torch.randn(2, 16)
    assert table.sq(zero) is None and table.run2("pair", x, zero) is None
    assert table.run("pair", x) is None and table.run("sq", x, x) is None and table.used == 0
    assert not kernels.usable()


def _columns(run, name: str, a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor | None:
    """Kernel ``name`` through one entry (the extension's ``run`` or ctypes) into a fresh table."""
    n = a.shape[0] if a.ndim > 1 else 1
    table = torch.full((n, 8), float("nan"), dtype=torch.float64)
    if run is None:
        return kernels(name, a, *(() if b is None else (b,)))
    dl = torch.utils.dlpack.to_dlpack
    col = run(list(KERNELS).index(name), dl(a), None if b is None else dl(b), table.data_ptr(),
              n, 8, 3, 1)
    if col < 0:
        assert table.isnan().all()  # refused: nothing written
        return None
    assert col == 3 and table[:, :3].isnan().all() and table[:, 3 + KERNELS[name]:].isnan().all()
    return table[:, 3: 3 + KERNELS[name]].T


@pytest.mark.skipif(not fused._python_flags(), reason="no Python headers: ctypes only")
def test_extension_entry_matches_ctypes_and_checks_layouts_itself() -> None:
    """Where Python's headers exist the library is also an extension module, and the probe's
    hot path takes DLPack capsules to it: same sums as the ctypes path, to the bit, and every
    layout the kernels cannot read is refused in C (-1, nothing written)."""
    assert kernels.load(required=True) and kernels.fast is not None
    run = kernels.fast
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        for shape in SHAPES:
            a, b = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
            for name in KERNELS:
                other = None if name == "sq" else b
                want = _columns(None, name, a, other)
                assert torch.equal(_columns(run, name, a, other), want), (name, shape, dtype)
        # Any dense order of a sample's elements (the sums do not depend on it), and views
        # that start inside their storage.
        x = torch.randn(6, 5, 4, 3, generator=g).to(dtype)
        for view in (x.contiguous(memory_format=torch.channels_last),
                     x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2),
                     torch.randn(9, 5, 4, 3, generator=g).to(dtype)[3:]):
            want = reference("sq", view, None).to(torch.float64)
            torch.testing.assert_close(_columns(run, "sq", view, None), want, rtol=2e-6, atol=0)
            torch.testing.assert_close(_columns(run, "pair", view, view * 2),
                                       reference("pair", view, view * 2), rtol=2e-6, atol=0)

    x = torch.randn(4, 8, 6, 6)
    for why, t in {"strided": x[:, ::2], "transposed sample": x.transpose(0, 1),
                   "expanded": x[:, :1].expand(4, 8, 6, 6), "float64": x.double(),
                   "float16": x.half(), "int": x.int(), "empty": x[:0], "0-d": x.sum(),
                   "no memory": torch._efficientzerotensor(4, 8),
                   "overlapping": x.flatten()[:64].as_strided((4, 8, 6, 6), (8, 1, 0, 0))}.items():
        assert _columns(run, "sq", t, None) is None, why
        assert _columns(run, "pair", x, t) is None, why
    for why, other in {"strides": x.contiguous(memory_format=torch.channels_last),
                       "dtype": x.bfloat16(), "shape": x[:2]}.items():
        assert _columns(run, "gap", x, other) is None, why
    dl = torch.utils.dlpack.to_dlpack
    table = torch.full((4, 8), float("nan"), dtype=torch.float64)
    ptr = table.data_ptr()
    assert run(1, dl(x), None, ptr, 4, 8, 0, 1) == -1  # a second operand is required
    assert run(0, x, None, ptr, 4, 8, 0, 1) == -1  # not a capsule
    assert run(4, dl(x), dl(x), ptr, 4, 8, 0, 1) == -1  # no such kernel
    assert run(0, dl(x), None, ptr, 5, 8, 0, 1) == -1  # the table holds another batch size
    assert run(3, dl(x), dl(x), ptr, 4, 8, 5, 1) == -1  # four columns do not fit from col 5
    assert run(0, dl(x), None, ptr, 4, 8, -1, 1) == -1
    assert run(0, dl(x), None, 0, 4, 8, 0, 1) == -1  # no table
    assert table.isnan().all()
    with pytest.raises(TypeError):
        run(0, dl(x), None, ptr, 4, 8, 0)

    # The probe's entries take the extension where it applies, ctypes or nothing elsewhere.
    st = SumTable()
    assert st.take(4, 1) == 0
    assert st.sq(torch._neg_view(x)) == 1  # a sum of squares does not see the sign
    assert st.run2("pair", torch._neg_view(x), x) is None  # DLPack would drop the sign bit
    sums = st.filled()
    torch.testing.assert_close(sums[:, 1], reference("sq", x, None)[0], rtol=2e-6, atol=0)


def _same_values(x: torch.Tensor, y: torch.Tensor) -> bool:
    """The same layout and values to the bit (any NaN matching any NaN: ATen itself writes
    different bf16 NaNs in its vector and scalar loops)."""
    if x.shape != y.shape or x.stride() != y.stride() or x.dtype != y.dtype:
        return False
    bits = torch.int16 if x.dtype == torch.bfloat16 else torch.int32
    nx, ny = x.isnan(), y.isnan()
    return torch.equal(nx, ny) and torch.equal(x.masked_fill(nx, 0).view(bits),
                                               y.masked_fill(ny, 0).view(bits))


def _with_specials(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """t with zeros of both signs, infinities, NaNs, subnormals and near-overflow values
    scattered through it (in the vector loops and the scalar tails alike)."""
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-40, -1e-40, 3e38,
                             -3e38])
    flat = t.clone().reshape(-1)
    k = max(1, flat.numel() // 8)
    where = torch.randint(0, flat.numel(), (k,), generator=g)
    flat[where] = specials[torch.randint(0, len(specials), (k,), generator=g)].to(t.dtype)
    return flat.reshape(t.shape)


@pytest.mark.skipif(not fused._python_flags(), reason="no Python headers: ctypes only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_that_write_give_atens_values_and_the_reading_kernels_sums(dtype) -> None:
    """addrelu_out writes relu(a + b) and relugrad threshold_backward(g, out, 0) exactly as
    ATen computes them (bf16 rounding of the sum, -0, NaN, infinities, subnormals; NCHW and
    channels_last; SIMD tails), and their sums are those of addrelu over (a, a + b) and of sq
    over the gradient, to the bit: a logged step computes what an unlogged one does."""
    assert kernels.load(required=True) and kernels.run_out is not None
    g = torch.Generator().manual_seed(11)
    for shape in SHAPES + [(128, 16, 32, 32)]:
        layouts = [lambda t: t]
        if len(shape) == 4:
            layouts.append(lambda t: t.contiguous(memory_format=torch.channels_last))
        for layout in layouts:
            a, b, grad = (layout(torch.randn(shape, generator=g).to(dtype)) for _ in range(3))
            table = SumTable()
            out, gi = torch.empty_like(a), torch.empty_like(grad)
            col = table.run_out("addrelu_out", a, b, out)
            ref_out = torch.relu(a + b)
            assert _same_values(out, ref_out), (shape, dtype)
            gcol = table.run_out("relugrad", grad, ref_out, gi)
            assert _same_values(gi, torch.ops.aten.threshold_backward(grad, ref_out, 0))
            # The training loop's kinds: the same values, no sums.
            out2, gi2 = torch.empty_like(a), torch.empty_like(grad)
            assert kernels.write("addrelu_only", a, b, out2) and torch.equal(out2, out)
            assert kernels.write("relugrad_only", grad, ref_out, gi2) and torch.equal(gi2, gi)
            want, gwant = table.run2("addrelu", a, a + b), table.sq(gi)
            sums = table.filled()
            assert (col, gcol, want, gwant) == (0, 4, 5, 9)
            assert torch.equal(sums[:, col:col + 4], sums[:, want:want + 4]), (shape, dtype)
            assert torch.equal(sums[:, gcol], sums[:, gwant]), (shape, dtype)
            # The special values: written as ATen writes them.
            a, b, grad = (_with_specials(t, g) for t in (a, b, grad))
            out = torch.empty_like(a)
            assert table.run_out("addrelu_out", a, b, out) == 0
            ref_out = torch.relu(a + b)
            assert _same_values(out, ref_out), (shape, dtype)
            ref_out = _with_specials(ref_out, g)  # (-0 and NaN among the outputs too)
            gi = torch.empty_like(grad)
            assert table.run_out("relugrad", grad, ref_out, gi) == 4
            assert _same_values(gi, torch.ops.aten.threshold_backward(grad, ref_out, 0))
            out2, gi2 = torch.empty_like(a), torch.empty_like(grad)
            assert kernels.write("addrelu_only", a, b, out2) and _same_values(out2, out)
            assert kernels.write("relugrad_only", grad, ref_out, gi2) and _same_values(gi2, gi)
            table.filled()


@pytest.mark.skipif(not fused._python_flags(), reason="no Python headers: ctypes only")
def test_kernels_that_write_refuse_what_they_cannot_take_and_write_nothing() -> None:
    assert kernels.load(required=True)
    x = torch.randn(4, 8, 6, 6)
    cl = x.contiguous(memory_format=torch.channels_last)
    table = SumTable()
    assert table.take(4, 1) == 0
    for why, (a, b, dst) in {
            "layouts": (x, cl, torch.empty_like(x)),
            "destination's layout": (x, x, torch.empty_like(cl)),
            "destination's dtype": (x, x, torch.empty_like(x, dtype=torch.bfloat16)),
            "dtypes": (x, x.bfloat16(), torch.empty_like(x)),
            "float64": (x.double(), x.double(), torch.empty_like(x.double())),
            "strided": (x[:, ::2], x[:, ::2], torch.empty_like(x)[:, ::2]),
            "expanded": (x[:, :1].expand(4, 8, 6, 6), x, torch.empty_like(x)),
            "negative view": (torch._neg_view(x), x, torch.empty_like(x)),
            "batch size": (x[:2], x[:2], torch.empty_like(x[:2]))}.items():
        dst_before = dst.clone()
        for name in ("addrelu_out", "relugrad"):
            assert table.run_out(name, a, b, dst) is None, (why, name)
            assert table.used == 1, why  # no column reserved
        for name in ("addrelu_only", "relugrad_only"):
            if why != "batch size":  # (no table: any batch size)
                assert not kernels.write(name, a, b, dst), (why, name)
        assert torch.equal(dst.nan_to_num(0), dst_before.nan_to_num(0)), why
    run = kernels.run_out
    dl = torch.utils.dlpack.to_dlpack
    ptr = table.table.data_ptr()
    dst = torch.empty_like(x)
    assert run(0, dl(x), dl(x), dl(dst), ptr, 4, table._cap, 1, 1) == -1  # a reading kernel
    assert run(4, dl(x), dl(x), None, ptr, 4, table._cap, 1, 1) == -1  # no destination
    assert kernels.fast(4, dl(x), dl(x), ptr, 4, table._cap, 1, 1) == -1  # not through run()
    with pytest.raises(TypeError):
        run(4, dl(x), dl(x), dl(dst), ptr, 4, table._cap, 1)
    assert table.run_out("addrelu_out", x, x, dst) == 1
    assert torch.equal(dst, torch.relu(x + x))


@pytest.mark.skipif(not fused._python_flags(), reason="no Python headers: ctypes only")
def test_gradient_hook_in_c_matches_the_python_hook_and_hands_it_the_rest(batch,
                                                                         monkeypatch) -> None:
    """kernels.grad_sq, the probe's gradient hook in C, records exactly what the Python hook
    does (the same kernel: equal to the bit), and hands every case it does not take to it."""
    assert kernels.load(required=True) and kernels.grad_sq is not None
    x, y = batch

    def grad_norms():
        torch.manual_seed(0)
        model = create_model("resnet20", in_channels=1, num_classes=10).train()
        got = captured_run(model, x, y, fused=True)[0]
        return got.xs("response_grad_norm", level="metric")

    in_c = grad_norms()
    with monkeypatch.context() as m:
        m.setattr(kernels, "grad_sq", None)  # the probe's Python hooks
        in_python = grad_norms()
    assert len(in_c) == 20 and in_c.equals(in_python)

    calls = []
    real = kernels.grad_sq
    with monkeypatch.context() as m:
        m.setattr(kernels, "grad_sq", lambda *a: calls.append(1) or real(*a))
        torch.manual_seed(0)
        model = create_model("resnet20", in_channels=1, num_classes=10).train()
        captured_run(model, x, y, fused=False)  # eager formulas only: no kernel, no C hook
        assert calls == []
        grad_norms()
        assert len(calls) == 20

    hook = kernels.grad_sq
    g = torch.Generator().manual_seed(5)
    t = torch.randn(4, 8, 6, 6, generator=g).bfloat16()
    handed = []
    key = ("layer1.0.bn1", "response_grad_norm")
    st = SumTable()
    assert st.take(4, 1) == 0
    cols, store = {}, {key: "an eager value"}
    assert hook(st, cols, store, key, handed.append, t) is None
    assert cols == {key: (1,)} and store == {} and st.used == 2 and handed == []
    torch.testing.assert_close(st.table[:, 1], reference("sq", t, None)[0].double(),
                               rtol=2e-6, atol=0)
    assert hook(st, cols, store, key, handed.append, None) is None  # no gradient: nothing
    assert handed == [] and st.used == 2 and cols == {key: (1,)}
    for why, grad in {"strided": t[:, ::2], "another batch size": t[:2],
                      "float64": t.double(), "not a tensor": [t]}.items():
        handed.clear()
        assert hook(st, cols, store, key, handed.append, grad) is None, why
        assert handed == [grad] and st.used == 2 and cols == {key: (1,)}, why

    class Broken:  # a table whose attributes cannot be read: the Python hook's checked path
        _rows, _cap, used = 4, 64, 0
    handed.clear()
    assert hook(Broken(), cols, store, key, handed.append, t) is None
    assert handed == [t] and cols == {key: (1,)}

    # A full table: the Python hook (here the probe's own entry, SumTable.sq) grows it, and the
    # next call writes into the grown table.
    full = st.used = st._cap
    store[key] = "an eager value"

    def python_hook(grad):
        cols[key] = (st.sq(grad),)
        store.pop(key, None)
    hook(st, cols, store, key, python_hook, t)
    assert cols == {key: (full,)} and st.used == full + 1 and st._cap > full and store == {}
    u = torch.randn(4, 8, 6, 6, generator=g).bfloat16()
    hook(st, cols, store, key, handed.append, u)
    assert cols == {key: (full + 1,)} and st.used == full + 2
    want = torch.stack([reference("sq", v, None)[0].double() for v in (t, u)], 1)
    torch.testing.assert_close(st.table[:, full: full + 2], want, rtol=2e-6, atol=0)

    def failing(grad):
        raise RuntimeError("from the Python hook")
    with pytest.raises(RuntimeError, match="from the Python hook"):
        hook(st, cols, store, key, failing, t[:, ::2])
    with pytest.raises(TypeError):
        hook(st, [], store, key, failing, t)  # cols must be a dict
    with pytest.raises(TypeError):
        hook(st, cols, store, key, t)


def test_library_without_python_headers_is_plain_and_gives_the_same_sums(tmp_path,
                                                                         monkeypatch) -> None:
    """Headers that do not compile (or none): the same kernels as a plain library, ctypes only."""
    monkeypatch.setenv("GRADLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fused, "_python_flags",
                        lambda: ("-DGL_PYTHON", f"-I{tmp_path / 'no-headers'}"))
    plain = Kernels()
    assert plain.load(required=True) and plain.fast is None
    monkeypatch.setattr(fused, "kernels", plain)
    x = torch.randn(5, 3, 4, 4).bfloat16()
    table = SumTable()
    cols = [table.sq(x), table.sq(x), table.run2("addrelu", x, x * 2)]
    assert cols == [0, 1, 2]
    sums = table.filled()
    torch.testing.assert_close(sums[:, 1], reference("sq", x, None)[0], rtol=2e-6, atol=0)
    torch.testing.assert_close(sums[:, 2:6].T, reference("addrelu", x, x * 2), rtol=2e-6, atol=0)


@pytest.mark.parametrize("platform", ["linux", "darwin"])
def test_extension_flags_let_macos_resolve_python_at_load_time(platform, tmp_path,
                                                              monkeypatch) -> None:
    include = tmp_path / "include"
    include.mkdir()
    (include / "Python.h").write_text("")
    monkeypatch.setattr(fused.sysconfig, "get_paths", lambda: {"include": str(include)})
    monkeypatch.setattr(fused.sys, "platform", platform)
    darwin = ("-undefined", "dynamic_lookup") if platform == "darwin" else ()
    assert fused._python_flags() == ("-DGL_PYTHON", f"-I{include}", *darwin)
    (include / "Python.h").unlink()
    assert fused._python_flags() == ()


def test_an_extension_that_builds_but_does_not_load_falls_back_to_the_plain_library(
        tmp_path, monkeypatch) -> None:
    """A -DGL_PYTHON library that links but cannot be loaded here (an undefined symbol): the
    next flag set is built, and the process keeps its kernels (ctypes only)."""
    if not fused._python_flags():
        pytest.skip("no Python headers: only plain builds are tried")
    cc = fused._compiler()
    extra = tmp_path / "extra.c"
    extra.write_text("extern void gl_not_there(void);\nvoid gl_ref(void) { gl_not_there(); }\n")
    wrapper = tmp_path / "cc"
    wrapper.write_text(f'#!/bin/sh\ncase " $* " in *" -DGL_PYTHON "*) exec {cc} "$@" {extra};;'
                       f'\nesac\nexec {cc} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("GRADLAB_CACHE_DIR", str(tmp_path / "cache"))
    k = Kernels()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unavailable" warning
        assert k.load(required=True)
    assert k.fast is None and k.failed is None
    assert len(list((tmp_path / "cache").glob("probe-kernels-*.so"))) == 1
    x = torch.randn(3, 40)
    torch.testing.assert_close(k.sq_list([x]), x.double().square().sum()[None], rtol=2e-6,
                               atol=0)
