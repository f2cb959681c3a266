"""Fixtures of the editor tests that need the embedded default model and its world's data."""

import pytest


@pytest.fixture(scope="module")
def default_world(tmp_path_factory):
    """The default world's records and images, and its trained model."""
    from simulator.stream import ImageRoot, load_records
    from simulator.world.default import load_world_model
    from simulator.world.export import write_world
    from simulator.world.graph import WorldConfig

    out = write_world(WorldConfig(), tmp_path_factory.mktemp("world"), progress=False)
    root = ImageRoot(out / "images")
    train, evals = (load_records(out / f"{split}.jsonl", images=root) for split in ("train", "eval"))
    return load_world_model(WorldConfig(), progress=False), root, train, evals
