"""A run's model and editor restored from its checkpoint, probed one round at a time (`simulate probe`).

Each round reloads the checkpoint when it changed (a `--follow` run keeps checkpointing) and
runs the run's own probe round (`Timeline.probe_round`) with a fixed seed, so every round asks
the same questions of the same edits; rounds are written to the probe job's folder.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from editors import create_editor
from memory.files import current_folder
from monitor.sink import Sink
from simulator.checkpoint import FOLDER, META, Checkpoint, CheckpointError
from simulator.config import RunConfig, apply_protocol
from simulator.outputs import RunFiles
from simulator.run import image_root, load_model
from simulator.timeline import Timeline

log = logging.getLogger(__name__)

LOAD_ATTEMPTS = 5  # a checkpoint replaced while it is read is read again


class ProbeError(RuntimeError):
    """A run that cannot be probed; the message says why."""


class ProbeFiles(RunFiles):
    """Reads what the run wrote (the pool of applied edits retention samples from); writes into `out`."""

    def __init__(self, run: Path, out: Path) -> None:
        super().__init__(out)
        self.run = RunFiles(run)

    def rows(self, name: str) -> Iterator[dict[str, Any]]:
        """The rows of one of the run's JSONL outputs."""
        return self.run.rows(name)


class ProbeJob:
    """The run's model and editor, restored from its checkpoint, probed one round at a time."""

    def __init__(self, state: Path, out: Path, config: RunConfig, seed: int, sinks: list[Sink]) -> None:
        if config.mode != "sequential":
            raise ProbeError(f"{state} is a single-mode run: its edits were rolled back, there is nothing to probe")
        if not (current_folder(state / FOLDER) / META).is_file():
            raise ProbeError(f"{state} has no checkpoint yet: a run writes one every --checkpoint-every edits and "
                             "at its end")
        self.state = state
        self.seed = seed
        images = image_root(config)
        lvlm = load_model(apply_protocol(config))
        config = apply_protocol(config, lvlm.family)
        editor = create_editor(config.method, lvlm, config.method_config)
        self.timeline = Timeline(editor, config, images, ProbeFiles(state, out), sinks)
        self.rounds = 0
        self.last: dict[str, Any] = {}
        self._loaded: tuple[int, int] | None = None
        self.reload()

    def reload(self) -> None:
        """Restore the run's checkpoint if it changed since the last load."""
        meta = self.state / FOLDER / META
        last_error: Exception | None = None
        for _ in range(LOAD_ATTEMPTS):
            stamp = _stamp(meta)
            if stamp is not None and stamp == self._loaded:
                return
            try:
                checkpoint = Checkpoint.load(self.state)
            except (CheckpointError, OSError) as error:  # missing, or being replaced right now
                last_error = error
            else:
                if _stamp(meta) == stamp:  # not replaced while it was read
                    self.timeline.restore(checkpoint)
                    self._loaded = stamp
                    log.info("probing the state of %s after %d edits", self.state, self.timeline.applied)
                    return
                last_error = CheckpointError("the checkpoint was replaced while it was read")
            time.sleep(0.2)
        raise CheckpointError(f"cannot load the checkpoint of {self.state}: {last_error}")

    def round(self) -> dict[str, Any]:
        """One probe round on the latest state, with the fixed sample."""
        self.reload()
        self.timeline.rng = np.random.default_rng(self.seed)
        self.last = self.timeline.probe_round()
        self.rounds += 1
        log.info("probe round %d after %d edits: retention %s, collapse alarm %s", self.rounds,
                 self.timeline.applied, self.last.get("retention"), self.last.get("collapse_alarm"))
        return self.last


def _stamp(path: Path) -> tuple[int, int] | None:
    """Identity of a file version: inode and modification time (None when it is missing)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns
