"""Fixtures for the report tests: synthetic suites with planted truth (see synthetic_runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from synthetic_runs import OPPOSITE, make_suite


@pytest.fixture(scope="session")
def supported_suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 runs (plain20/56, resnet20/56 x 3 seeds) where every claim is planted true."""
    return make_suite(tmp_path_factory.mktemp("supported"))


@pytest.fixture(scope="session")
def opposite_suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 runs where the opposite of every claim is planted."""
    return make_suite(tmp_path_factory.mktemp("opposite"), truth=OPPOSITE)
