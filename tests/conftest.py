"""Shared pytest fixtures. Kept small on purpose: each test module owns its own helpers."""

import os

import numpy as np
import pytest

# Nothing in the test suite may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh seeded generator per test, so tests are deterministic and independent of order."""
    return np.random.default_rng(12345)
