"""The simulator's small world and tiny model fixtures, for the live dashboard test."""

from tests.simulator.conftest import small_model, small_world  # noqa: F401  (fixtures)
