"""Shared fixtures: tiny models live in tests/tiny_models.py."""

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


@pytest.fixture
def image():
    """A 20x24 noise image."""
    return random_image(0)
