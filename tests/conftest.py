"""Shared fixtures: tiny models live in tests/tiny_models.py."""

import pytest

from tests.tiny_models import random_image


@pytest.fixture
def image():
    """A 20x24 noise image."""
    return random_image(0)
