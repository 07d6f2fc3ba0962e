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


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One torch intra-op thread for the whole suite: on 2 shared cores an OpenMP team waiting on a busy core makes
    small models many times slower, and results do not depend on the count (the detector pins its own)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
