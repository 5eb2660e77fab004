"""Fixtures for the engine tests (the tiny models and the embedded one live in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run torch on one thread for the test. The tiny models' matmuls gain nothing from a
    second thread, and on a busy 2-core machine OpenMP's spin-waiting made them 10-40x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
