"""Fixtures for every test; the helpers the tests import are in helpers.py."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
