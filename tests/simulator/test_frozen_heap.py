"""A run leaves what it set up (modules, the model, MiniLM) out of garbage collection while it goes, and hands it
back at its end; a process that froze objects itself is left as it is."""

import gc

import pytest

from editors.edit_memory import shared_text_embedder
from monitor.sink import Sink
from simulator import run as run_module
from simulator.config import RunConfig
from simulator.run import simulate


class Watch(Sink):
    """At each edit: the freeze count, and whether the model and MiniLM are left out of collection."""

    def __init__(self, held: dict) -> None:
        self.held = held
        self.seen: list[tuple[int, bool, bool]] = []

    def on_edit(self, applied: bool, seconds: float, step: int) -> None:
        self.seen.append((gc.get_freeze_count(), *collected(self.held["model"], shared_text_embedder().load())))


def collected(*objects) -> list[bool]:
    """Whether each object is in a generation the collector walks (`gc.get_objects` leaves out frozen ones)."""
    walked = {id(o) for o in gc.get_objects()}
    return [id(o) in walked for o in objects]


@pytest.fixture
def ike_run(small_world, small_model, tmp_path, monkeypatch):
    """A function that runs 2 IKE edits with a `Watch` and returns the watch and the run's model."""
    held = {}
    shared_text_embedder.cache_clear()  # so MiniLM loads in this run, whatever an earlier test of the worker did
    load = run_module.load_model
    monkeypatch.setattr(run_module, "load_model", lambda config: _keep(held, load(config)))
    watch = Watch(held)

    def run():
        config = RunConfig(stream=str(small_world / "eval.jsonl"), images=small_world / "images",
                           model=str(small_model), method="ike", gap=[1], limit=2, no_mlflow=True,
                           out=tmp_path / "run")
        simulate(config, [watch], progress=False)
        return watch, held["model"]

    return run


def _keep(held: dict, lvlm):
    held["model"] = lvlm.model
    return lvlm


def test_the_model_and_minilm_are_frozen_during_the_run_and_handed_back_after(ike_run):
    assert gc.get_freeze_count() == 0
    watch, model = ike_run()
    assert len(watch.seen) == 2
    for count, model_walked, minilm_walked in watch.seen:
        assert count > 100_000  # torch and transformers alone hold several hundred thousand objects
        assert not model_walked and not minilm_walked
    assert gc.get_freeze_count() == 0
    assert collected(model, shared_text_embedder().load()) == [True, True]


def test_a_process_that_froze_objects_itself_keeps_its_freeze(ike_run):
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        watch, model = ike_run()
        # Frozen objects freed on the way leave the count; none joins it, and none is handed back after.
        assert all(0 < count <= frozen for count, *_ in watch.seen)
        assert all(model_walked for _, model_walked, _ in watch.seen)  # loaded after the process froze: not frozen
        assert 0 < gc.get_freeze_count() <= frozen
    finally:
        gc.unfreeze()


def test_the_heap_is_handed_back_when_the_run_raises():
    with pytest.raises(KeyboardInterrupt):
        with run_module._frozen_heap():
            assert gc.get_freeze_count() > 100_000
            raise KeyboardInterrupt
    assert gc.get_freeze_count() == 0
