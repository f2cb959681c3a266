"""Resume is the same run for every registered method: a run that dies after a checkpoint and is resumed ends
exactly as the uninterrupted run (summary, rounds, pool, quarantine, memory counters), whatever the caches of the
process held; timings aside."""

import json
import os
from contextlib import contextmanager

import pytest
import torch
import yaml

from editors.registry import METHODS
from monitor.sink import Sink
from simulator.config import RunConfig
from simulator.run import simulate
from tests import zygote
from tests.services import SIMULATE

# The cheapest settings each learner trains with; every other method runs with its defaults.
QUICK = {"mend": {"epochs": 1}, "ke": {"epochs": 1}}
EDITS, DIE_AT = 9, 7  # checkpoints every 3 edits: the run dies past its second checkpoint


class Killed(Exception):
    """The process died here (what SIGKILL does to an in-process run: nothing after this point is written)."""


class DieAt(Sink):
    """Kills the run right after its `at`-th edit, between its checkpoints."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_edit(self, applied: bool, seconds: float, step: int) -> None:
        if step == self.at:
            raise Killed


def untimed(value):
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if "seconds" not in k and "per_second" not in k}
    return [untimed(item) for item in value] if isinstance(value, list) else value


def outputs(folder):
    rows = {name: [untimed(json.loads(line)) for line in (folder / name).read_text().splitlines()]
            for name in ("rounds.jsonl", "pool.jsonl") if (folder / name).exists()}
    return {**rows, "summary": {k: v for k, v in untimed(json.loads((folder / "summary.json").read_text())).items()
                                if k != "run"}}


@contextmanager
def torch_threads(count):
    """`count` torch threads in this process for the block."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """One torch thread here and in the resumed process: cheap on a busy machine. The caches earlier runs of this
    process warmed (text embeddings, scores, images) stay: the uninterrupted and the killed run share them, the
    resumed process starts with none, and none of that may show in what is measured."""
    with torch_threads(1):
        yield


def killed_and_resumed(method, small_world, small_model, tmp_path, threads):
    """The outputs of a run, and of the same run killed past a checkpoint and resumed in a new process."""
    stream = tmp_path / "stream.jsonl"
    stream.write_text("".join((small_world / "eval.jsonl").read_text().splitlines(keepends=True)[:EDITS]))

    def config(out, **extra):
        return RunConfig(stream=str(stream), images=small_world / "images", train=small_world / "train.jsonl",
                         model=str(small_model), method=method, method_config=QUICK.get(method, {}), gap=[1, 2],
                         probe_every=2, checkpoint_every=3, retention_sample=3, reference_size=2, no_mlflow=True,
                         seed=3, out=out, **extra)

    simulate(config(tmp_path / "whole"), progress=False)
    with pytest.raises(Killed):
        simulate(config(tmp_path / "run"), [DieAt(DIE_AT)], progress=False)
    assert not (tmp_path / "run" / "summary.json").exists()
    # Resumed in a new process, as after a real kill: every cache (embeddings, images, scores) starts cold. The
    # zygote it is forked from has only imported modules, never run.
    scenario = tmp_path / "resume.yaml"
    scenario.write_text(yaml.safe_dump(config(tmp_path / "run", resume=True).model_dump(mode="json")))
    done = zygote.run([SIMULATE, "--config", str(scenario)], env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                      capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return outputs(tmp_path / "whole"), outputs(tmp_path / "run")


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_outputs(method, small_world, small_model,
                                                                              tmp_path):
    whole, resumed = killed_and_resumed(method, small_world, small_model, tmp_path, threads=1)
    assert resumed == whole
    assert whole["summary"]["edits_applied"] == EDITS


@pytest.mark.slow
def test_ike_killed_and_resumed_with_two_threads_ends_as_the_uninterrupted_run(small_world, small_model, tmp_path):
    """Issue 11: IKE after a resume differed in its last bits with more than one thread. Its text embeddings depended
    on the batch a text was embedded in, and the resumed process embeds in other batches than the run it continues
    (whose cache was warm); `memory.TextEmbedder` now pads each text to a length of its own."""
    with torch_threads(2):
        whole, resumed = killed_and_resumed("ike", small_world, small_model, tmp_path, threads=2)
    assert resumed["summary"] == whole["summary"]
    assert resumed == whole and whole["summary"]["edits_applied"] == EDITS


@pytest.mark.usefixtures("one_thread")
def test_the_mlflow_history_of_a_resumed_run_has_one_value_per_step(small_world, small_model, tmp_path):
    """The rounds between the last checkpoint and the kill are replayed by the resumed run, but logged once."""
    from mlflow import MlflowClient

    from monitor.exporters import build_sinks

    stream = tmp_path / "stream.jsonl"
    stream.write_text("".join((small_world / "eval.jsonl").read_text().splitlines(keepends=True)[:EDITS]))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def run(out, name, dies=None, **extra):
        config = RunConfig(stream=str(stream), images=small_world / "images", model=str(small_model), method="ft-llm",
                           gap=[1], probe_every=2, checkpoint_every=3, retention_sample=3, reference_size=2, seed=3,
                           mlflow_uri=uri, mlflow_experiment="resume", run_name=name, out=out, **extra)
        sinks = build_sinks(config)
        try:
            simulate(config, [*sinks, *([DieAt(dies)] if dies else [])], progress=False)
        finally:
            for sink in sinks:
                sink.close()

    run(tmp_path / "whole", "whole")
    with pytest.raises(Killed):
        run(tmp_path / "run", "resumed", dies=9)  # inside edit 9: after the round at 8, past the checkpoint at 6
    run(tmp_path / "run", "resumed", resume=True)
    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("resume").experiment_id])}
    for key in ("retention", "gap_1/reliability", "ref_ppl_ratio"):
        whole = [(m.step, m.value) for m in client.get_metric_history(runs["whole"].info.run_id, key)]
        resumed = [(m.step, m.value) for m in client.get_metric_history(runs["resumed"].info.run_id, key)]
        assert sorted(resumed) == sorted(whole), key  # one value per step, the same values
        assert len({step for step, _ in resumed}) == len(resumed)
