"""Probes stay correct under ``torch.compile`` (hooks attached before compiling).

Compiling takes tens of seconds on a 2-core CPU, so this uses the smallest member of the
family (resnet8) and one batch.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import gradlab
from gradlab.probing import Probe


@pytest.mark.slow
def test_compiled_model_gives_the_eager_measurements() -> None:
    torch.manual_seed(0)
    eager = gradlab.create_model("resnet8", num_classes=10, in_channels=1)
    compiled_src = copy.deepcopy(eager)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))

    with Probe(eager) as p:
        F.cross_entropy(eager(x), y).backward()
        want = p.collect().set_index(["layer", "metric"]).value

    # Attached first, then compiled: the graph keeps the hooks, also while disabled.
    with Probe(compiled_src, keep_hooks=True) as p:
        model = torch.compile(compiled_src)
        F.cross_entropy(model(x), y).backward()
        got = p.collect().set_index(["layer", "metric"]).value
        p.enabled = False  # a disabled step through the compiled model records nothing
        F.cross_entropy(model(x), y).backward()
        assert p.snapshot().metrics.count("residual_ratio") == 0

    assert sorted(got.index) == sorted(want.index)
    torch.testing.assert_close(torch.tensor(got.loc[want.index].values),
                               torch.tensor(want.values), rtol=1e-4, atol=1e-6)
