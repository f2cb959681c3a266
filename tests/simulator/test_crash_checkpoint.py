"""SIGKILL inside checkpoint writes: the run resumes to the uninterrupted run's outputs (issue 11).

A checkpoint is a folder written through a temporary sibling and two renames (`memory.files.write_atomically`:
`checkpoint/` to `.checkpoint.old/`, then `.checkpoint.tmp-PID/` to `checkpoint/`, then the old one is deleted).
`simulate` processes (forked from `tests.zygote`) on the default world are killed with SIGKILL at four instants of
such writes, one process after the other, each kill followed by `--resume`:
1. while the temporary folder is being filled (the first moment it holds anything: the editor's state half or
   wholly written, its own temporary folder: a different instant every time);
2. between the two renames: no `checkpoint/`, only the previous one at `.checkpoint.old/`;
3. in the next process, while `.checkpoint.old/` is being deleted, when it was the only whole checkpoint;
4. after the second rename, before the previous folder is deleted.
The windows of 2 to 4 last microseconds, so those processes rename and delete checkpoint folders slowly (a pause
after each rename, and half-way through deleting `.checkpoint.old/`; nothing else changed). The last resume runs to
the end: its summary, rounds and pool equal the uninterrupted run's, row for row.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from simulator.world.export import write_world
from simulator.world.graph import WorldConfig
from tests import zygote
from tests.services import SIMULATE, one_thread_env
from tests.simulator.test_resume_every_method import outputs

EDITS = 16
PAUSE = 0.4  # seconds a slow process waits after each rename of a checkpoint folder, and inside a deletion

# `simulate` whose checkpoint folders are renamed and deleted slowly: a kill lands in those windows at once.
SLOW = f"""
import os, shutil, sys, time
rename, remove = os.replace, shutil.rmtree
def replace(src, dst, *args, **kwargs):
    rename(src, dst, *args, **kwargs)
    if os.path.basename(src) == "checkpoint" or os.path.basename(src).startswith(".checkpoint.tmp-"):
        time.sleep({PAUSE})
def rmtree(path, *args, **kwargs):
    if os.path.basename(path) == ".checkpoint.old" and os.path.isdir(path):
        files = sorted(os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names)
        for name in files[: len(files) // 2 + 1]:  # checkpoint.json first
            os.unlink(name)
        time.sleep({PAUSE})
    remove(path, *args, **kwargs)
os.replace, shutil.rmtree = replace, rmtree
from simulator.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """The default world's first records, beside its world.json and images (so --model default is its model)."""
    world = write_world(WorldConfig(), tmp_path_factory.mktemp("default-world"), progress=False)
    path = world / "stream.jsonl"
    path.write_text("".join((world / "eval.jsonl").read_text().splitlines(keepends=True)[:EDITS]))
    return path


def args(stream, method, out):
    return ["--stream", str(stream), "--method", method, "--gap", "1", "2", "--probe-every", "2",
            "--checkpoint-every", "2", "--retention-sample", "4", "--reference-size", "2", "--seed", "5",
            "--run-name", "crash", "--no-mlflow", "--out", str(out)]


def run_until(command, out, landed, log):
    """Run `command` (its stderr into `log`) and SIGKILL it the moment `landed(pid)` holds; returns the names of the
    checkpoint folders the kill left."""
    with log.open("w") as stderr:
        process = zygote.Forked(command, env=one_thread_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 240
    while not landed(process.pid):
        assert process.poll() is None, f"the run ended before the kill landed: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    return {path.name for path in out.iterdir() if "checkpoint" in path.name}


def checkpointed(out):
    """Edits applied at the checkpoint `--resume` continues from (`.checkpoint.old` while `checkpoint` is missing)."""
    folder = out / "checkpoint" if (out / "checkpoint").is_dir() else out / ".checkpoint.old"
    return json.loads((folder / "checkpoint.json").read_text())["applied"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ft-llm", "serac"])
def test_sigkill_inside_checkpoint_writes_then_resume_ends_as_the_uninterrupted_run(method, stream, tmp_path):
    whole = tmp_path / "whole"
    done = zygote.run([SIMULATE, *args(stream, method, whole)], env=one_thread_env(), capture_output=True, text=True,
                      timeout=300)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "run"
    plain, slow = [SIMULATE, *args(stream, method, out)], [sys.executable, "-c", SLOW, *args(stream, method, out)]
    old = out / ".checkpoint.old"

    def filling(pid):  # a later checkpoint's temporary folder (the first write has no old one) holds something
        tmp = out / f".checkpoint.tmp-{pid}"
        return (out / "checkpoint").is_dir() and tmp.is_dir() and any(tmp.iterdir())

    def between(pid):
        return not (out / "checkpoint").exists() and old.is_dir()

    def deleting(pid):  # checkpoint.json is the first file deleted
        return old.is_dir() and not (old / "checkpoint.json").exists()

    def after(pid):
        return (out / "checkpoint").is_dir() and (old / "checkpoint.json").is_file() and \
            not (out / f".checkpoint.tmp-{pid}").exists()

    left = run_until(plain, out, filling, tmp_path / "1.log")
    assert "checkpoint" in left and any(name.startswith(".checkpoint.tmp-") for name in left)
    first = checkpointed(out)
    left = run_until(slow + ["--resume"], out, between, tmp_path / "2.log")
    assert ".checkpoint.old" in left and "checkpoint" not in left  # the previous checkpoint is the only whole one
    assert checkpointed(out) == first  # killed in its first checkpoint write
    run_until(slow + ["--resume"], out, deleting, tmp_path / "3.log")  # resumed from .checkpoint.old
    assert (out / "checkpoint").is_dir(), "the only whole checkpoint was deleted before the new one was in place"
    assert checkpointed(out) == first + 2
    left = run_until(slow + ["--resume"], out, after, tmp_path / "4.log")
    assert {"checkpoint", ".checkpoint.old"} <= left
    last = checkpointed(out)
    assert last == first + 4 < EDITS
    resumed = zygote.run(plain + ["--resume"], env=one_thread_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr

    # Each process continued from the last whole checkpoint, and removed what the kill before it left.
    logs = [(tmp_path / f"{n}.log").read_text() for n in (2, 3, 4)] + [resumed.stderr]
    for log, edits in zip(logs, (first, first, first + 2, last)):
        assert f"resuming crash after line {edits} ({edits} edits applied)" in log
    assert "left by a run killed while writing it" in logs[0] and "left by a run killed while writing it" in logs[1]
    assert not [name for name in os.listdir(out) if ".checkpoint." in name]
    expected, got = outputs(whole), outputs(out)
    assert got["summary"] == expected["summary"]
    assert expected["summary"]["edits_applied"] == EDITS and expected["summary"]["results"]["gap_2"]["reliability"] > 0
    rounds, pool = got["rounds.jsonl"], got["pool.jsonl"]
    assert [row["round"] for row in rounds] == list(range(1, EDITS // 2 + 1))  # none twice, none missing
    assert [row["key"] for row in pool] == [json.loads(line)["id"] for line in stream.read_text().splitlines()]
    assert rounds == expected["rounds.jsonl"] and pool == expected["pool.jsonl"]
