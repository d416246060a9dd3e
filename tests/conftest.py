"""Shared fixtures (the helpers themselves are in tests/helpers.py)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import TinyNet, make_tiny


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny() -> TinyNet:
    return make_tiny()
