"""`simulate probe`: the run's own probe rounds on a 2-second schedule, into Pushgateway and MLflow."""

import contextlib
import json
import shutil
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from simulator.cli import main
from simulator.config import RunConfig
from simulator.run import simulate
from tests.services import SIMULATE, get, one_thread_env, pushgateway, wait_until  # noqa: F401  (fixture)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def run_state(small_world, small_model, tmp_path_factory):
    """A finished sequential ft-llm run of 12 edits (its folder: config.json, checkpoint/, pool.jsonl)."""
    out = tmp_path_factory.mktemp("probed") / "run"
    simulate(RunConfig(stream=str(small_world / "eval.jsonl"), model=str(small_model), method="ft-llm", gap=[1],
                       probe_every=4, limit=12, retention_sample=4, reference_size=4, seed=3, out=out), progress=False)
    return out


@pytest.mark.slow
def test_two_scheduled_rounds_reach_both_exporters_and_sigterm_stops_cleanly(run_state, pushgateway,  # noqa: F811
                                                                              tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "probes"
    run_rounds = rows(run_state / "rounds.jsonl")
    process = subprocess.Popen(
        [SIMULATE, "probe", "--state", str(run_state), "--every", "2s", "--out", str(out),
         "--pushgateway", pushgateway, "--mlflow-uri", uri, "--mlflow-experiment", "probes"],
        env=one_thread_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: len(rows(out / "rounds.jsonl")) >= 2, 180, "two probe rounds", process)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr

    probe_rounds = rows(out / "rounds.jsonl")
    assert len(probe_rounds) in (2, 3)  # SIGTERM may land while a third round runs: it finishes first
    first, second = probe_rounds[:2]
    # The run's own state, restored: the same weights as at its end, the same fixed sample each round.
    assert first["edits_applied"] == 12 and first["weight_change_norm"] == pytest.approx(
        run_rounds[-1]["weight_change_norm"]) and first["weight_change_norm"] > 0
    for key in ("retention", "retention_sample", "ref_ppl_ratio", "forgetting"):
        assert first[key] == second[key], key
    assert rows(run_state / "rounds.jsonl") == run_rounds  # the run's own rounds are left alone
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == len(probe_rounds) and summary["stopped"] == "stopped"
    with sqlite3.connect(out / "jobs.sqlite") as db:
        assert db.execute("select id from apscheduler_jobs").fetchall() == [("probe",)]

    labels = {"job": "editwatch-probe", "instance": str(out.resolve()), "run": "run-probe", "method": "ft-llm",
              "model": Path(json.loads((run_state / "config.json").read_text())["model"]).name}  # short label
    pushed = {(s.name, s.labels.get("metric")): s for f in text_string_to_metric_families(
        get(f"{pushgateway}/metrics").decode()) for s in f.samples if s.labels.get("job") == "editwatch-probe"}
    rounds_total = pushed["editwatch_probe_rounds_total", None]
    assert rounds_total.value == len(probe_rounds) and rounds_total.labels == labels
    assert pushed["editwatch_probe_norm", "weight_change_norm"].value == pytest.approx(first["weight_change_norm"])
    assert pushed["editwatch_progress_interval_seconds", None].value == 2  # the stall alert waits for twice that

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("probes").experiment_id])
    assert run.data.tags["editwatch.kind"] == "probe" and run.data.params["every"] == "2s"
    history = sorted(client.get_metric_history(run.info.run_id, "retention"), key=lambda m: m.timestamp)
    assert [m.value for m in history] == [r["retention"] for r in probe_rounds]
    assert [m.step for m in history] == [12] * len(probe_rounds)
    # Two separate rounds, logged in order (the interval itself is tested in tests/monitor/test_schedule.py).
    assert history[0].timestamp < history[1].timestamp


def test_a_folder_without_a_run_is_named(tmp_path, capsys):
    assert main(["probe", "--state", str(tmp_path), "--every", "2s"]) == 2
    assert "holds no run" in capsys.readouterr().err


def test_a_bad_interval_is_named(run_state, capsys):
    assert main(["probe", "--state", str(run_state), "--every", "2 minutes"]) == 2
    assert "invalid interval '2 minutes'" in capsys.readouterr().err


def serac_run(world, model, out, edits):
    """A finished sequential SERAC run of `edits` edits, checkpointed every 2: its memory is in a journal beside the
    checkpoint (`memory-journal/`)."""
    simulate(RunConfig(stream=str(world / "eval.jsonl"), model=str(model), method="serac", gap=[1], probe_every=4,
                       checkpoint_every=2, limit=edits, retention_sample=4, reference_size=4, seed=3, out=out),
             progress=False)
    return out


@pytest.fixture(scope="module")
def serac_state(small_world, small_model, tmp_path_factory):
    return serac_run(small_world, small_model, tmp_path_factory.mktemp("journaled") / "run", 8)


def probed_copy(state, tmp_path, replay):
    """A copy of the run `state` whose journal reads go through `replay(read_journal, folder, position)`, and the
    first round of a probe job on it."""
    import editors.edit_memory
    from simulator.probing import ProbeJob

    run = tmp_path / "run"
    shutil.copytree(state, run)
    read = editors.edit_memory.read_journal
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(editors.edit_memory, "read_journal", lambda *args: replay(read, run, *args))
        config = RunConfig.model_validate_json((run / "config.json").read_text())
        return ProbeJob(run, tmp_path / "probes", config, 0, []).round()


def as_read(read, run, *args):
    """`probed_copy`'s replay that leaves the journal alone."""
    return read(*args)


def untimed(row):
    """A round's row without its wall-clock figures."""
    return {key: value for key, value in row.items() if "seconds" not in key}


def test_a_run_that_checkpoints_while_its_memory_loads_is_probed_at_the_checkpoint_read(serac_state, tmp_path):
    """A large memory loads slower than its run checkpoints: here the run replaces its checkpoint during every
    replay of the journal, and the job probes the checkpoint it read rather than give up after five tries."""
    from memory.files import current_folder, write_atomically

    replays = []

    def while_the_run_checkpoints(read, run, folder, position, *args):
        checkpoint = run / "checkpoint"
        write_atomically(checkpoint, lambda tmp: shutil.copytree(current_folder(checkpoint), tmp))
        replays.append(position)
        return read(folder, position, *args)

    row = probed_copy(serac_state, tmp_path, while_the_run_checkpoints)
    # Loaded on start, then again in the round: the checkpoint had changed since.
    assert len(replays) == 2
    alone = probed_copy(serac_state, tmp_path / "alone", as_read)
    assert row["memory_size"] == 8 and row["retrieval_recall_at_1"] > 0
    assert untimed(row) == untimed(alone)


def test_a_journal_generation_deleted_while_it_loads_is_read_again_from_the_newer_checkpoint(serac_state,
                                                                                            tmp_path):
    """The run compacts its journal into a new generation, checkpoints and deletes the old one while the job
    replays it: the job reads the new checkpoint and probes the same memory."""
    from memory import MemoryJournal
    from memory.files import current_folder, write_atomically

    generations = []

    def compacted_under_it(read, run, folder, position, *args):
        generations.append(position.generation)
        if len(generations) > 1:
            return read(folder, position, *args)
        memory, payloads = read(folder, position, *args)
        journal = MemoryJournal(folder)
        newer = journal.write(memory, None, lambda: payloads)  # changes unknown: a new snapshot

        def pointed_at_it(tmp):
            shutil.copytree(current_folder(run / "checkpoint"), tmp)
            state = json.loads((tmp / "editor" / "state.json").read_text())
            state["meta"]["memory"]["journal"] = newer.model_dump()
            (tmp / "editor" / "state.json").write_text(json.dumps(state))

        write_atomically(run / "checkpoint", pointed_at_it)
        journal.commit()
        return read(folder, position, *args)

    row = probed_copy(serac_state, tmp_path, compacted_under_it)
    first = generations[0]
    assert generations == [first, first + 1]
    assert sorted(p.name for p in (tmp_path / "run" / "memory-journal").glob("[ls]*")) == [
        f"log-{first + 1}.bin", f"snapshot-{first + 1}"]
    alone = probed_copy(serac_state, tmp_path / "alone", as_read)
    assert row["memory_size"] == 8 and row["retrieval_recall_at_1"] > 0
    assert untimed(row) == untimed(alone)


def test_a_checkpoint_replaced_while_its_folder_is_read_is_read_again_whole(serac_state, small_world, small_model,
                                                                           tmp_path, monkeypatch):
    """Another run's checkpoint (6 edits) takes the place of this one (8 edits) between the reads of its progress and
    its editor state: the job reads again, and probes one checkpoint, not one's progress with the other's memory."""
    from editors import EditorState
    from memory.files import write_atomically
    from simulator.probing import ProbeJob

    earlier = serac_run(small_world, small_model, tmp_path / "earlier", 6)
    load = EditorState.load
    swaps = []

    def swapped_first(folder):
        if not swaps and folder.parent.name == "checkpoint":  # a run's, not the trained editor's in the cache
            run = folder.parent.parent
            write_atomically(run / "checkpoint", lambda tmp: shutil.copytree(earlier / "checkpoint", tmp))
            shutil.rmtree(run / "memory-journal")
            shutil.copytree(earlier / "memory-journal", run / "memory-journal")
            shutil.copy(earlier / "pool.jsonl", run / "pool.jsonl")
            swaps.append(run)
        return load(folder)

    restore = ProbeJob._restore
    restored = []

    def recorded(job, checkpoint):
        restored.append((checkpoint.progress["applied"], len(checkpoint.editor.meta["memory"]["ids"])))
        restore(job, checkpoint)

    monkeypatch.setattr(EditorState, "load", swapped_first)
    monkeypatch.setattr(ProbeJob, "_restore", recorded)
    row = probed_copy(serac_state, tmp_path, as_read)
    assert swaps == [tmp_path / "run"]
    assert restored == [(6, 6)]  # the swapped checkpoint, read again whole on start, and unchanged at the round
    assert row["edits_applied"] == row["memory_size"] == 6


def test_a_restarted_probe_job_numbers_its_rounds_on(run_state, tmp_path):
    from simulator.probing import ProbeJob

    config = RunConfig.model_validate_json((run_state / "config.json").read_text())
    for _ in range(2):  # a job, then the same job restarted into the same folder
        ProbeJob(run_state, tmp_path / "probes", config, 0, []).round()
    assert [row["round"] for row in rows(tmp_path / "probes" / "rounds.jsonl")] == [1, 2]


@contextlib.contextmanager
def deadline(seconds):
    """Fail, rather than hang, if the block runs longer than `seconds` (a job that never stops)."""
    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_rounds_counts_the_rounds_of_this_process_when_a_job_is_restarted(run_state, tmp_path):
    # A restarted job numbers its rounds on from the last; --rounds 2 stopped it after one round when two came before.
    out = tmp_path / "probes"
    for rounds in ("2", "2"):
        with deadline(120):
            assert main(["probe", "--state", str(run_state), "--every", "1s", "--rounds", rounds, "--out", str(out),
                         "--no-mlflow"]) == 0
    assert [row["round"] for row in rows(out / "rounds.jsonl")] == [1, 2, 3, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 4 and summary["stopped"] == "rounds"


def test_a_failing_round_stops_the_job_with_its_reason(run_state, tmp_path, capsys, monkeypatch):
    # APScheduler logs a job's exception and keeps the schedule: the job never ended and never said it failed.
    from simulator.probing import ProbeJob

    def broken(self):
        raise FileNotFoundError("images/c1-0.png")

    monkeypatch.setattr(ProbeJob, "round", broken)
    out = tmp_path / "probes"
    with deadline(120):
        assert main(["probe", "--state", str(run_state), "--every", "1s", "--rounds", "2", "--out", str(out),
                     "--no-mlflow"]) == 2
    error = capsys.readouterr().err
    assert "probe job stopped after 0 rounds: FileNotFoundError: images/c1-0.png" in error
    assert not (out / "summary.json").exists()


def test_a_second_job_in_the_folder_or_another_runs_job_there_is_refused(run_state, tmp_path, capsys):
    from memory.files import locked

    out = tmp_path / "probes"
    with locked(out), deadline(120):  # a job of this folder is running
        assert main(["probe", "--state", str(run_state), "--every", "1s", "--out", str(out), "--no-mlflow"]) == 2
    assert f"{out} is in use by another process" in capsys.readouterr().err
    (out / "config.json").write_text("{")  # a job killed while writing it, before writes were atomic
    assert main(["probe", "--state", str(run_state), "--every", "1s", "--out", str(out), "--no-mlflow"]) == 2
    assert f"{out / 'config.json'} cannot be read" in capsys.readouterr().err
    (out / "config.json").write_text(json.dumps({"state": "/runs/other", "seed": 3}))
    with deadline(120):
        assert main(["probe", "--state", str(run_state), "--every", "1s", "--out", str(out), "--no-mlflow"]) == 2
    assert (f"{out} holds the probe job of /runs/other with seed 3; give another --out to probe "
            f"{run_state.resolve()} with seed 3") in capsys.readouterr().err


def test_a_run_given_relative_paths_is_probed_from_its_folder_or_refused_in_one_line(run_state, tmp_path,
                                                                                   monkeypatch):
    # Resolved from another folder, the stream was not found: the images hint named a flag probe does not have,
    # and the default model fell back to the embedded one without the world's manifest.
    from simulator.probing import ProbeError, ProbeJob

    config = RunConfig.model_validate_json((run_state / "config.json").read_text())
    stream = Path(config.stream)
    relative = config.model_copy(update={"stream": f"{stream.parent.name}/{stream.name}", "images": None})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ProbeError, match=f"the run's --stream {relative.stream} cannot be found from {tmp_path}"):
        ProbeJob(run_state, tmp_path / "probes", relative, 0, [])
    monkeypatch.chdir(stream.parent.parent)  # where the run ran
    assert ProbeJob(run_state, tmp_path / "probes", relative, 0, []).round()["edits_applied"] == 12
