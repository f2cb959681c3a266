"""Shared fixtures: tiny models live in tests/tiny_models.py."""

import os

import pytest

from tests.tiny_models import random_image


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Every test session gets its own EDITWATCH_CACHE: nothing leaks in from (or out to) the user's."""
    patch = pytest.MonkeyPatch()
    patch.setenv("EDITWATCH_CACHE", str(tmp_path_factory.mktemp("cache")))
    # `simulate` logs to MLflow by default: to the session's own store, never ./mlflow.db.
    patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")
    yield
    patch.undo()


def pytest_configure(config):
    """Under pytest-xdist (`-n 2`) each worker, and what it starts, computes on one thread: two workers with a
    thread per core each would fight over the cores. A test that asks for threads still sets them itself."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture
def image():
    """A 20x24 noise image."""
    return random_image(0)
