"""The compiled fused reductions: values under bf16 autocast, when they are used, and fallback.

test_probe.py checks every metric with the fused kernels forced on in float32 against float64
references; here the kernels reduce real bf16 activations, as they do on a CPU with native bf16.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gradlab import Probe, create_model
from gradlab.data import load_dataset
from gradlab.models import BasicBlock, ResidualAdd
from gradlab.probing import fused
from gradlab.probing.fused import FUSE_MIN_NUMEL, Kernels, kernels

pytestmark = pytest.mark.usefixtures("one_thread")


def per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.double().flatten(1).norm(dim=1)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("digits", seed=0)
    return data.train_x[:32].clone(), data.train_y[:32].clone()


@pytest.mark.parametrize("name", ["resnet20", "plain20"])
def test_bf16_block_metrics_match_float64_reference(name: str, batch) -> None:
    """The probe reduces the bf16 tensors the block really computed; the reference reduces the
    same tensors, captured by hooks of our own, in float64."""
    x, y = batch
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, num_classes=10)
    model = model.to(memory_format=torch.channels_last).train()
    x = x.contiguous(memory_format=torch.channels_last)
    adds, blocks, handles = {}, {}, []
    for n, m in model.named_modules():
        if isinstance(m, ResidualAdd):
            handles.append(m.register_forward_hook(
                lambda mod, args, out, n=n: adds.__setitem__(n.rpartition(".")[0], args)))
        if isinstance(m, BasicBlock):
            handles.append(m.register_forward_hook(
                lambda mod, args, out, n=n: blocks.__setitem__(n, (args[0], out))))
    try:
        with Probe(model, fused=True) as probe:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            F.cross_entropy(out.float(), y).backward()
            frame = probe.collect()
    finally:
        for h in handles:
            h.remove()
    assert kernels.failed is None, kernels.failed
    got = frame.set_index(["layer", "metric"])["value"]
    checked = 0
    for block, (f, s) in adds.items():
        assert f.dtype == torch.bfloat16
        nf, ns = per_sample_norm(f), per_sample_norm(s)
        dot = (f.double() * s.double()).flatten(1).sum(1)
        assert math.isclose(got[(block, "residual_ratio")], (nf / ns).mean().item(),
                            rel_tol=1e-5)
        assert math.isclose(got[(block, "residual_cosine")],
                            (dot / (nf * ns)).mean().item(), abs_tol=1e-5)
        checked += 2
    for block, (xin, h) in blocks.items():
        if h.shape == xin.shape:
            want = (per_sample_norm(h.double() - xin.double()) / per_sample_norm(xin)).mean()
            # Residual blocks take h = relu(f + s) from the add's own pass, in float32, before
            # the block rounds its output to bf16 (2^-9 per element): a relative 1e-4 apart.
            rel = 2e-4 if name.startswith("resnet") else 1e-5
            assert math.isclose(got[(block, "identity_gap")], want.item(), rel_tol=rel)
            checked += 1
    assert checked == (25 if name == "resnet20" else 7)


def test_auto_fuses_large_low_precision_cpu_tensors_only() -> None:
    model = nn.Linear(2, 2)
    auto, never, always = Probe(model), Probe(model, fused=False), Probe(model, fused=True)
    big = torch.empty(FUSE_MIN_NUMEL, dtype=torch.bfloat16)
    assert auto._fuse(big) and always._fuse(big) and not never._fuse(big)
    assert not auto._fuse(big.float())  # float32: ATen's own norms are as fast
    assert not auto._fuse(big[: FUSE_MIN_NUMEL // 2])  # small: not worth a compile
    assert always._fuse(torch.empty(4))
    meta = torch.empty(FUSE_MIN_NUMEL, dtype=torch.bfloat16, device="meta")
    assert not always._fuse(meta)  # CPU only


def test_compile_failure_falls_back_to_eager_once(monkeypatch) -> None:
    k = Kernels()

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(fused.torch, "compile", broken)
    f, s = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    with pytest.warns(RuntimeWarning, match="no C.. compiler"):
        got = k("pair_sums", f, s)
    assert k.failed is not None and not k.usable(f, force=True)
    torch.testing.assert_close(got, fused.pair_sums(f, s))


def test_kernels_agree_with_eager_formulas() -> None:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(8, 16, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
    s = torch.randn(8, 16, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
    h = torch.relu(f + s)
    torch.testing.assert_close(kernels("pair_sums", f, s), fused.pair_sums(f, s))
    torch.testing.assert_close(kernels("gap_sums", h, s), fused.gap_sums(h, s))
    bs = kernels("block_sums", f, s)
    torch.testing.assert_close(bs[:3], fused.pair_sums(f, s))
    torch.testing.assert_close(bs[3], fused.gap_sums(h, s)[0])  # relu(f + s) - s == max(f, -s)
    assert kernels.failed is None, kernels.failed
