"""A small synthetic world on disk and an untrained world-vocabulary LLaVA saved beside it."""

import pytest

from simulator.world.export import write_world
from simulator.world.graph import WorldConfig, build_world
from simulator.world.model import ModelConfig, build_model

SMALL_WORLD = WorldConfig(entities=16, seed=2)  # 40 eval records, 24 train records
TINY_MODEL = ModelConfig(vision_hidden=16, vision_layers=1, hidden=32, layers=2, heads=2)


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """Folder with train.jsonl, eval.jsonl, images/ and world.json of SMALL_WORLD."""
    return write_world(SMALL_WORLD, tmp_path_factory.mktemp("world") / "w", progress=False)


@pytest.fixture(scope="session")
def small_model(tmp_path_factory):
    """Folder of an untrained LLaVA over SMALL_WORLD's vocabulary, loadable with `--model`."""
    folder = tmp_path_factory.mktemp("model") / "m"
    build_model(build_world(SMALL_WORLD), TINY_MODEL, seed=0).save(folder)
    return folder
