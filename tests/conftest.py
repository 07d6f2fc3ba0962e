"""Shared pytest fixtures: a seeded generator, one torch thread, and the tiny fitted class several modules
use."""

import os

# Nothing in the test suite may reach a model hub (set before anything imports transformers).
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from detector.fitted import FittedClass, ScanAnalysis  # noqa: E402
from detector.fitting import fit_class  # noqa: E402
from tests.tiny import TINY_FIT, part_scans  # noqa: E402


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh seeded generator per test, so tests are deterministic and independent of order."""
    return np.random.default_rng(12345)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One torch intra-op thread for the whole suite: on 2 shared cores an OpenMP team waiting on a busy core
    makes
    small models many times slower, and results do not depend on the count (the detector pins its own)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# A tiny fit of the bracket, one test scan and its analysis (the verifier and pipeline tests use them;
# module-scoped, so
# each module fits once; a module that defines its own fixture of the same name uses its own).
@pytest.fixture(scope="module")
def fitted() -> FittedClass:
    return fit_class(part_scans(3, 2500, seed=0), TINY_FIT)


@pytest.fixture(scope="module")
def scan() -> np.ndarray:
    return part_scans(1, 3000, seed=50)[0]


@pytest.fixture(scope="module")
def analysis(fitted: FittedClass, scan: np.ndarray) -> ScanAnalysis:
    return fitted.analyse(scan)


# a tiny Point-MAE trained 3 steps on two spheres, and its exported graph (tests/test_pointmae*.py)
@pytest.fixture(scope="module")
def trained():
    from detector.pointmae_train import train_pointmae
    from tests.tiny import SPHERE_BACKBONE, sphere

    return train_pointmae(
        [sphere(2000, 0), sphere(2000, 1)], SPHERE_BACKBONE, steps=3, seed=0, batch_size=2, scale=5.0
    )


@pytest.fixture(scope="module")
def exported(trained):
    from detector.pointmae_runtime import onnx_backbone

    return onnx_backbone(trained)
