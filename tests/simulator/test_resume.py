"""Checkpoints: a run killed with SIGKILL and resumed ends exactly where an uninterrupted run does.

The runs are `simulate` processes forked from `tests.zygote`, which has imported what a run needs: these
tests start about 25 of them.
"""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests import zygote
from tests.services import SIMULATE, one_thread_env

TIMING = ("probe_seconds", "edits_per_second")


def run_args(world, model, out):
    return [SIMULATE, "--stream", str(world / "eval.jsonl"), "--model", str(model), "--method", "ft-llm",
            "--gap", "1", "3", "--probe-every", "4", "--checkpoint-every", "3", "--retention-sample", "5",
            "--reference-size", "4", "--seed", "7", "--run-name", "resume-test", "--out", str(out)]


def rows(path):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def whole(small_world, small_model, tmp_path_factory):
    """The outputs of the same run, uninterrupted."""
    out = tmp_path_factory.mktemp("whole") / "run"
    zygote.run(run_args(small_world, small_model, out), check=True, env=one_thread_env(), capture_output=True,
               timeout=300)
    return out


def test_a_forked_run_writes_what_a_fresh_simulate_process_writes(small_world, small_model, whole, tmp_path):
    """What the zygote's runs stand in for: the console script in a process of its own."""
    out = tmp_path / "fresh"
    subprocess.run(run_args(small_world, small_model, out), check=True, env=one_thread_env(), capture_output=True,
                   timeout=300)
    assert json.loads((out / "summary.json").read_text()) == json.loads((whole / "summary.json").read_text())
    assert rows(out / "rounds.jsonl") == rows(whole / "rounds.jsonl")
    assert rows(out / "pool.jsonl") == rows(whole / "pool.jsonl")


def started(args, edits):
    """A running `simulate` that has applied at least `edits` edits (lines in its pool)."""
    process = zygote.Forked(args, env=one_thread_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pool = Path(args[args.index("--out") + 1]) / "pool.jsonl"
    deadline = time.monotonic() + 240
    while not (pool.exists() and len(pool.read_text().splitlines()) >= edits):
        assert process.poll() is None, "the run ended before it could be stopped"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return process


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_same_outputs_as_an_uninterrupted_run(small_world, small_model, whole, tmp_path):
    killed = tmp_path / "killed"
    process = started(run_args(small_world, small_model, killed), 14)  # past a checkpoint (12), not on one
    process.kill()
    assert process.wait() == -9
    assert not (killed / "summary.json").exists()

    resumed = zygote.run(run_args(small_world, small_model, killed) + ["--resume"], env=one_thread_env(),
                         capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming resume-test after line 12" in resumed.stderr
    expected = json.loads((whole / "summary.json").read_text())
    assert json.loads((killed / "summary.json").read_text()) == expected
    assert expected["edits_applied"] == 40 and expected["last_round"]["weight_change_norm"] > 0
    assert rows(killed / "rounds.jsonl") == rows(whole / "rounds.jsonl")
    assert rows(killed / "pool.jsonl") == rows(whole / "pool.jsonl")


@pytest.mark.slow
def test_sigterm_stops_between_records_and_resume_gives_the_same_outputs(small_world, small_model, whole, tmp_path):
    stopped = tmp_path / "stopped"
    pool = stopped / "pool.jsonl"
    process = started(run_args(small_world, small_model, stopped), 7)
    process.send_signal(signal.SIGTERM)  # lands anywhere inside a record: it must finish that record first
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["stopped"] == "interrupted" and 7 <= summary["edits_applied"] < 40
    assert len(pool.read_text().splitlines()) == summary["edits_applied"]  # every applied edit fully recorded

    # Resumed, the run goes on past the end its summary describes: that summary goes (a report would show it as
    # the run's state), and killed again before its new end, the run has none.
    process = started(run_args(small_world, small_model, stopped) + ["--resume"], summary["edits_applied"] + 2)
    process.kill()
    assert process.wait() == -9
    assert not (stopped / "summary.json").exists()
    resumed = zygote.run(run_args(small_world, small_model, stopped) + ["--resume"], env=one_thread_env(),
                         capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((stopped / "summary.json").read_text()) == json.loads((whole / "summary.json").read_text())
    assert rows(stopped / "rounds.jsonl") == rows(whole / "rounds.jsonl")


def test_resume_refuses_settings_that_change_what_is_measured(small_world, small_model, tmp_path):
    out = tmp_path / "run"
    args = run_args(small_world, small_model, out)
    zygote.run(args[:3] + ["--limit", "2"] + args[3:], check=True, capture_output=True, timeout=300)
    changed = [a if a != "3" else "5" for a in args] + ["--seed", "8", "--resume"]  # another gap and seed
    result = zygote.run(changed, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--gap: [1, 3] in the checkpoint, [1, 5] now" in result.stderr and "--seed: 7" in result.stderr
    more = zygote.run(args + ["--limit", "4", "--resume", "--no-mlflow"], capture_output=True, text=True,
                      timeout=300)  # how far to go and where to report may change
    assert more.returncode == 0, more.stderr
    assert json.loads((out / "summary.json").read_text())["edits_applied"] == 4


@pytest.mark.slow
def test_resume_without_a_checkpoint_starts_from_the_beginning(small_world, small_model, whole, tmp_path):
    """A supervisor that always passes --resume recovers from a kill before the first checkpoint."""
    out = tmp_path / "early"
    process = started(run_args(small_world, small_model, out), 1)  # killed before its first checkpoint (3 edits)
    process.kill()
    process.wait()
    assert not (out / "checkpoint").exists()
    result = zygote.run(run_args(small_world, small_model, out) + ["--resume"], env=one_thread_env(),
                        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "holds no checkpoint yet: the run starts from the beginning" in result.stderr
    assert json.loads((out / "summary.json").read_text()) == json.loads((whole / "summary.json").read_text())
    assert rows(out / "pool.jsonl") == rows(whole / "pool.jsonl")  # the killed run's partial lines are gone


def serac_args(world, model, out):
    return [SIMULATE, "--stream", str(world / "eval.jsonl"), "--model", str(model), "--method", "serac",
            "--gap", "1", "--probe-every", "5", "--checkpoint-every", "2", "--retention-sample", "5",
            "--reference-size", "4", "--seed", "7", "--run-name", "journal-test", "--no-mlflow", "--out", str(out)]


@pytest.fixture(scope="module")
def serac_whole(small_world, small_model, tmp_path_factory):
    """The outputs of an uninterrupted SERAC run (`serac_args`)."""
    out = tmp_path_factory.mktemp("serac") / "whole"
    done = zygote.run(serac_args(small_world, small_model, out), env=one_thread_env(), capture_output=True, text=True,
                      timeout=300)
    assert done.returncode == 0, done.stderr
    return out


def untimed(value):
    """`value` without wall-clock numbers (memory search latency, edits per second)."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if "seconds" not in k and "per_second" not in k}
    return [untimed(item) for item in value] if isinstance(value, list) else value


def journal_position(out):
    """The journal position the checkpoint's editor state records."""
    return json.loads((out / "checkpoint" / "editor" / "state.json").read_text())["meta"]["memory"]["journal"]


@pytest.mark.slow
def test_a_memory_editor_killed_mid_journal_resumes_to_the_uninterrupted_outputs(small_world, small_model, serac_whole,
                                                                                 tmp_path):
    """SERAC checkpoints its memory as a journal: a run killed after a checkpoint, whose journal then holds a torn
    append past the recorded length and a half-written snapshot, resumes to the outputs of an uninterrupted run."""
    from simulator.checkpoint import Checkpoint
    from simulator.config import RunConfig
    from simulator.probing import ProbeJob

    whole = serac_whole
    killed = tmp_path / "killed"
    process = started(serac_args(small_world, small_model, killed), 11)  # past the checkpoints at 8 and 10
    process.kill()
    assert process.wait() == -9
    position = journal_position(killed)
    journal = killed / "memory-journal"
    log = journal / f"log-{position['generation']}.bin"
    assert position["log_bytes"] > 0  # appended since its snapshot, not rewritten whole
    with log.open("ab") as handle:  # what a kill inside the next append leaves
        handle.write(b"\x01torn record")
    (journal / f".snapshot-{position['generation'] + 1}.tmp-4242").mkdir()  # and one inside a compaction
    memo = journal / "memo"
    named = json.loads((killed / "checkpoint" / "editor" / "state.json").read_text())["meta"]["memo"]
    (memo / f"open-{named['open'] + 1}.safetensors").write_bytes(b"a checkpoint's memo, never named")
    (memo / f".{named['opened'] + 1}.safetensors.tmp-4242").write_bytes(b"half")
    assert len(Checkpoint.load(killed).editor.meta["memory"]["ids"]) >= 8  # readers get the whole state

    resumed = zygote.run(serac_args(small_world, small_model, killed) + ["--resume"], env=one_thread_env(),
                         capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    expected = json.loads((whole / "summary.json").read_text())
    assert untimed(json.loads((killed / "summary.json").read_text())) == untimed(expected)
    assert untimed(rows(killed / "rounds.jsonl")) == untimed(rows(whole / "rounds.jsonl"))
    assert rows(killed / "pool.jsonl") == rows(whole / "pool.jsonl")
    final = journal_position(killed)
    assert final == journal_position(whole)  # the same journal writes as the uninterrupted run
    assert sorted(p.name for p in journal.iterdir()) == [f"log-{final['generation']}.bin", "memo",
                                                        f"snapshot-{final['generation']}"]
    state = Checkpoint.load(killed).editor
    # The score memo's generations the checkpoint names, and nothing else, as in the uninterrupted run.
    named = state.meta["memo"]
    assert sorted(p.name for p in memo.iterdir()) == sorted([f"{g}.safetensors" for g in named["generations"]]
                                                           + [f"open-{named['open']}.safetensors"])
    assert named == Checkpoint.load(whole).editor.meta["memo"]
    assert len(state.meta["memory"]["ids"]) == expected["last_round"]["memory_size"] == expected["edits_applied"]
    # `simulate probe` restores each run from its journaled checkpoint: the resumed one probes as the other does.
    config = RunConfig.model_validate_json((killed / "config.json").read_text())
    probed = [ProbeJob(run, tmp_path / f"probes-{run.name}", config, seed=7, sinks=[]).round()
              for run in (killed, whole)]
    assert untimed(probed[0]) == untimed(probed[1]) and probed[0]["memory_size"] == expected["edits_applied"]


@pytest.mark.slow
def test_a_memory_editor_stopped_off_its_checkpoint_schedule_resumes_to_the_uninterrupted_outputs(
        small_world, small_model, serac_whole, tmp_path):
    """A run stopped at its limit checkpoints where the uninterrupted run does not, and resumes on another schedule:
    the score memo it saved does not depend on when checkpoints were written, so the outputs are the same."""
    from simulator.checkpoint import Checkpoint

    runs = {"whole": serac_whole, "stopped": tmp_path / "stopped"}
    stopped = serac_args(small_world, small_model, runs["stopped"]) + ["--limit", "7", "--checkpoint-every", "3"]
    done = zygote.run(stopped, env=one_thread_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    resumed = zygote.run(serac_args(small_world, small_model, runs["stopped"]) + ["--resume"], env=one_thread_env(),
                         capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert untimed(json.loads((runs["stopped"] / "summary.json").read_text())) == untimed(
        json.loads((runs["whole"] / "summary.json").read_text()))
    assert untimed(rows(runs["stopped"] / "rounds.jsonl")) == untimed(rows(runs["whole"] / "rounds.jsonl"))
    memos = [Checkpoint.load(runs[name]).editor.meta["memo"] for name in ("stopped", "whole")]
    assert [{k: m[k] for k in ("generations", "opened")} for m in memos] == [
        {k: memos[1][k] for k in ("generations", "opened")}] * 2


def mixed_stream(world, folder):
    """The eval stream with hostile lines and a retraction between its records: a copy beside the world's images."""
    lines = (world / "eval.jsonl").read_text().splitlines()
    good = json.loads(lines[0])
    hostile = ["{not json", json.dumps([1, 2]), json.dumps({**good, "id": "noimage", "image": "missing.png"}),
               json.dumps({**good, "id": "special", "src": "what is <image> here?"}), "",
               json.dumps({"op": "retract", "id": good["id"]}), json.dumps({"op": "retract", "id": "nowhere"})]
    mixed = [line for i, line in enumerate(lines) for line in ([line, hostile[i]] if i < len(hostile) else [line])]
    stream = folder / "mixed.jsonl"
    stream.write_text("\n".join(mixed) + "\n")
    return stream


def mixed_args(world, model, stream, out):
    """The serac run of the mixed stream into `out`."""
    listed = run_args(world, model, out)
    listed[listed.index("--stream") + 1] = str(stream)
    listed[listed.index("--method") + 1] = "serac"
    return [*listed, "--images", str(world / "images"), "--train", str(world / "train.jsonl")]


@pytest.fixture(scope="module")
def mixed_whole(small_world, small_model, tmp_path_factory):
    """The mixed stream and its uninterrupted serac run (the kill points below share it)."""
    folder = tmp_path_factory.mktemp("mixed")
    stream = mixed_stream(small_world, folder)
    done = zygote.run(mixed_args(small_world, small_model, stream, folder / "whole"), env=one_thread_env(),
                      capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return stream, folder / "whole"


@pytest.mark.slow
@pytest.mark.parametrize("at", [5, 11])
def test_a_stream_of_mixed_good_and_hostile_lines_killed_and_resumed_ends_as_the_uninterrupted_run(
        small_world, small_model, mixed_whole, tmp_path, at):
    stream, whole_run = mixed_whole
    killed = tmp_path / "killed"
    process = started(mixed_args(small_world, small_model, stream, killed), at)
    process.kill()
    process.wait()
    zygote.run(mixed_args(small_world, small_model, stream, killed) + ["--resume"], check=True, env=one_thread_env(),
               capture_output=True, timeout=300)
    summary = json.loads((whole_run / "summary.json").read_text())
    assert untimed(json.loads((killed / "summary.json").read_text())) == untimed(summary)
    assert (summary["quarantined"], summary["retracted"], summary["failed"]) == (4, 1, 1)
    for name in ("rounds.jsonl", "pool.jsonl", "quarantine.jsonl"):
        assert untimed(rows(killed / name)) == untimed(rows(whole_run / name)), name
