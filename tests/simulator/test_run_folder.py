"""The run folder: one run at a time, stale temporaries removed, a finished run left alone, the reader's position kept."""

import json
import os
import shutil

import pytest

from memory.files import FolderLockedError, locked
from simulator.cli import main
from simulator.config import RunConfig
from monitor.exporters import build_sinks
from simulator.run import simulate

GOOD = 6  # records of the small world's stream, then three bad lines


@pytest.fixture
def stream(small_world, tmp_path):
    """Six good records followed by three lines that are not records."""
    lines = (small_world / "eval.jsonl").read_text().splitlines(keepends=True)[:GOOD]
    path = tmp_path / "stream.jsonl"
    path.write_text("".join(lines) + "{not json\n" + "[1, 2]\n" + '{"src": "only a question"}\n')
    return path


def config(stream, small_world, small_model, out, **extra):
    return RunConfig(stream=str(stream), images=small_world / "images", model=str(small_model), method="ft-llm",
                     gap=[1], probe_every=2, checkpoint_every=2, retention_sample=3, reference_size=2, no_mlflow=True,
                     out=out, **extra)


def contents(folder):
    """Every file of a run folder (bytes and modification time), the lock file aside."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_a_second_run_on_the_same_folder_is_refused_in_one_line(stream, small_world, small_model, tmp_path, capsys):
    out = tmp_path / "run"
    with locked(out):  # as a run in another process holds it
        with pytest.raises(FolderLockedError, match="in use by another process"):
            simulate(config(stream, small_world, small_model, out))
        argv = ["--stream", str(stream), "--images", str(small_world / "images"), "--model", str(small_model),
                "--no-mlflow", "--out", str(out), "--resume"]
        assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"simulate: error: {out} is in use by another process (a run, a " \
                                              "--resume of it, or a probe job)"
    assert not (out / "summary.json").exists()  # the refused run wrote nothing


def test_the_lock_goes_with_its_holder(tmp_path):
    """A killed run's lock is the kernel's to drop: a forked child holding it dies, the folder is free."""
    out = tmp_path / "run"
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        with locked(out):
            os.kill(os.getpid(), 9)
    os.waitpid(child, 0)
    with locked(out):
        pass


def test_resume_of_a_finished_run_changes_nothing_and_says_so(stream, small_world, small_model, tmp_path, caplog):
    out = tmp_path / "run"
    first = simulate(config(stream, small_world, small_model, out, limit=4), progress=False)
    assert first["edits_applied"] == 4 and first["stopped"] == "limit"
    before = contents(out)
    again = simulate(config(stream, small_world, small_model, out, limit=4, resume=True), progress=False)
    assert again == json.loads((out / "summary.json").read_text()) and again["edits_applied"] == 4
    assert contents(out) == before  # not one byte, not one timestamp
    assert "--resume has nothing to do" in caplog.text


def test_a_resume_that_fails_to_start_keeps_the_summary_of_the_runs_end(stream, small_world, small_model, tmp_path):
    out = tmp_path / "run"
    first = simulate(config(stream, small_world, small_model, out, limit=4), progress=False)
    moved = stream.rename(tmp_path / "elsewhere.jsonl")  # the stream is gone when --resume goes on past the limit
    with pytest.raises(FileNotFoundError):
        simulate(config(stream, small_world, small_model, out, limit=6, resume=True), progress=False)
    assert json.loads((out / "summary.json").read_text()) == first  # the run's end, still on record
    moved.rename(stream)
    simulate(config(stream, small_world, small_model, out, limit=6, resume=True), progress=False)
    assert json.loads((out / "summary.json").read_text())["edits_applied"] == 6


def test_stale_temporaries_of_a_killed_writer_are_removed(stream, small_world, small_model, tmp_path):
    out = tmp_path / "run"
    simulate(config(stream, small_world, small_model, out, limit=2), progress=False)
    stale = out / ".checkpoint.tmp-999999"  # a run killed inside a checkpoint write
    shutil.copytree(out / "checkpoint", stale)
    (out / ".summary.json.tmp-999999").write_text("{")
    simulate(config(stream, small_world, small_model, out, limit=4, resume=True), progress=False)
    assert not stale.exists() and not (out / ".summary.json.tmp-999999").exists()
    assert json.loads((out / "summary.json").read_text())["edits_applied"] == 4


def test_bad_lines_after_the_last_record_are_counted_once_across_a_resume(stream, small_world, small_model, tmp_path):
    """The checkpoint keeps the reader's position, not the last record's (a kill after the final checkpoint)."""
    out = tmp_path / "run"
    whole = simulate(config(stream, small_world, small_model, out), progress=False)
    assert (whole["edits_read"], whole["quarantined"]) == (GOOD, 3)
    quarantine = (out / "quarantine.jsonl").read_text()
    (out / "summary.json").unlink()  # killed after the final checkpoint, before the summary
    resumed = simulate(config(stream, small_world, small_model, out, resume=True), progress=False)
    assert (resumed["edits_read"], resumed["quarantined"]) == (GOOD, 3)
    assert (out / "quarantine.jsonl").read_text() == quarantine  # one entry per bad field, none twice
    assert sorted({json.loads(line)["line"] for line in quarantine.splitlines()}) == [7, 8, 9]
    assert {k: v for k, v in resumed.items() if k != "last_round"} == \
        {k: v for k, v in whole.items() if k != "last_round"}


def test_a_resume_at_the_limit_applies_no_further_edit(stream, small_world, small_model, tmp_path):
    """`--resume` of a run that reached its --limit but lost its summary: the limit holds."""
    out = tmp_path / "run"
    simulate(config(stream, small_world, small_model, out, limit=3), progress=False)
    (out / "summary.json").unlink()
    resumed = simulate(config(stream, small_world, small_model, out, limit=3, resume=True), progress=False)
    assert resumed["edits_applied"] == 3 and len((out / "pool.jsonl").read_text().splitlines()) == 3


def test_a_full_disk_stops_the_run_in_one_line_and_the_last_checkpoint_resumes(stream, small_world, small_model,
                                                                               tmp_path, monkeypatch, capsys):
    import errno

    import simulator.outputs
    from simulator.run import RunError

    whole = simulate(config(stream, small_world, small_model, tmp_path / "whole"), progress=False)
    out = tmp_path / "run"
    real, calls = simulator.outputs.append_jsonl, []

    def filling(path, row):
        calls.append(path)
        if len(calls) > 7:  # the disk fills after a few lines, past the first checkpoint
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, row)

    monkeypatch.setattr(simulator.outputs, "append_jsonl", filling)
    with pytest.raises(RunError, match=r"No space left on device .*the last checkpoint is kept, --resume continues"):
        simulate(config(stream, small_world, small_model, out), progress=False)
    monkeypatch.setattr(simulator.outputs, "append_jsonl", real)  # space freed
    resumed = simulate(config(stream, small_world, small_model, out, resume=True), progress=False)
    assert {k: v for k, v in resumed.items() if k not in ("last_round", "run")} == \
        {k: v for k, v in whole.items() if k not in ("last_round", "run")}


def test_a_stream_folder_and_an_out_file_are_one_line_errors(small_world, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["--stream", str(small_world), "--images", str(small_world / "images"), "--no-mlflow",
                 "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.startswith(f"simulate: error: --stream {small_world} is a folder")
    assert main(["--stream", str(small_world / "eval.jsonl"), "--no-mlflow", "--out", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.strip() == f"simulate: error: --out {tmp_path / 'file'} is a file: give a folder " \
                                              "for the run's outputs"


def test_mlflow_writes_the_server_rejects_are_counted_in_the_summary(stream, small_world, small_model, tmp_path):
    """A tag key MLflow refuses becomes a dead letter: the run goes on, its summary counts it, its metrics arrive."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = config(stream, small_world, small_model, tmp_path / "run", limit=4, mlflow_uri=uri,
                      mlflow_experiment="dead-letters", mlflow_tags={"bad?key": "1"}).model_copy(
                          update={"no_mlflow": False})
    sinks = build_sinks(settings)
    try:
        summary = simulate(settings, sinks, progress=False)
    finally:
        sinks[0].close()
    assert summary["mlflow_dead_letters"] == 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["mlflow_dead_letters"] == 1
    letters = [json.loads(line) for line in (tmp_path / "run" / "mlflow" / "dead_letter.jsonl").read_text().splitlines()]
    assert len(letters) == 1 and "bad?key" in json.dumps(letters[0])
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dead-letters").experiment_id])
    assert run.data.metrics["gap_1/reliability"] == summary["results"]["gap_1"]["reliability"]
