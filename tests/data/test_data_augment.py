"""Batched crop + flip, checked against a brute-force search over crops of the padded input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradlab.data import augment


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _explain(out: torch.Tensor, x: torch.Tensor, pad: int) -> list[tuple[int, int, bool]]:
    """For each sample, every (dy, dx, flipped) whose crop of the padded input equals it."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad))
    found = []
    for n in range(x.shape[0]):
        matches = [
            (dy, dx, fl)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for fl in (False, True)
            if torch.equal(
                out[n],
                padded[n, :, dy : dy + h, dx : dx + w].flip(-1)
                if fl
                else padded[n, :, dy : dy + h, dx : dx + w],
            )
        ]
        assert len(matches) == 1, f"sample {n}: {len(matches)} explanations"
        found.append(matches[0])
    return found


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.uint8])
def test_shape_dtype_device(dtype: torch.dtype) -> None:
    x = (torch.rand(6, 3, 10, 10, generator=_gen(0)) * 200).to(dtype)
    out = augment(x, 2, True, _gen(1))
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert out.is_contiguous()


def test_nothing_to_do_returns_input() -> None:
    x = torch.randn(4, 3, 8, 8)
    assert augment(x, 0, False, _gen(0)) is x


def test_negative_pad_rejected() -> None:
    with pytest.raises(ValueError, match="pad"):
        augment(torch.randn(1, 1, 4, 4), -1, False)


@pytest.mark.parametrize(("pad", "flip"), [(4, True), (1, False), (0, True), (3, True)])
def test_each_sample_is_a_crop_of_the_padded_input(pad: int, flip: bool) -> None:
    x = torch.randn(12, 3, 9, 7, generator=_gen(2))  # non-square catches swapped axes
    out = augment(x, pad, flip, _gen(3))
    found = _explain(out, x, pad)
    if not flip:
        assert not any(fl for _, _, fl in found)


def test_offsets_cover_the_whole_range() -> None:
    pad = 2
    x = torch.randn(200, 1, 6, 6, generator=_gen(4))
    found = _explain(augment(x, pad, True, _gen(5)), x, pad)
    assert {dy for dy, _, _ in found} == set(range(2 * pad + 1))
    assert {dx for _, dx, _ in found} == set(range(2 * pad + 1))


def test_flip_happens_about_half_the_time() -> None:
    x = torch.randn(4000, 1, 4, 4, generator=_gen(6))
    out = augment(x, 0, True, _gen(7))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert torch.all(flipped ^ kept)
    assert 0.46 < flipped.float().mean().item() < 0.54


def test_deterministic_by_generator_seed() -> None:
    x = torch.randn(32, 3, 8, 8, generator=_gen(8))
    a = augment(x, 4, True, _gen(9))
    assert torch.equal(a, augment(x, 4, True, _gen(9)))
    assert not torch.equal(a, augment(x, 4, True, _gen(10)))


def test_default_generator_uses_global_cpu_rng() -> None:
    x = torch.randn(32, 3, 8, 8, generator=_gen(11))
    torch.manual_seed(5)
    a = augment(x, 4, True)
    torch.manual_seed(5)
    assert torch.equal(a, augment(x, 4, True))


def test_input_is_not_modified() -> None:
    x = torch.randn(8, 3, 8, 8, generator=_gen(12))
    before = x.clone()
    augment(x, 2, True, _gen(13))
    assert torch.equal(x, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_result_on_cuda_as_on_cpu() -> None:
    x = torch.randn(64, 3, 32, 32, generator=_gen(14))
    on_cpu = augment(x, 4, True, _gen(15))
    on_gpu = augment(x.cuda(), 4, True, _gen(15))
    assert on_gpu.is_cuda
    assert torch.equal(on_gpu.cpu(), on_cpu)
