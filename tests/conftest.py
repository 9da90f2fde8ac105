"""Fixtures shared by the test modules (plain helper functions live in tests/helpers.py)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module (request with ``pytest.mark.usefixtures``).

    Tiny tensors: OpenMP threads cost far more than they save on a busy 2-core machine.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
