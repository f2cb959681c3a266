"""A run's model and editor restored from its checkpoint, probed one round at a time (`simulate probe`).

Each round reloads the checkpoint when it changed (a `--follow` run keeps checkpointing) and
runs monitor's probe round (the same one `simulate` runs) with a fixed seed, so rounds on an
unchanged pool ask the same questions of the same edits (a pool that grew is sampled anew);
rounds are written to the probe job's folder.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from editors import create_editor
from memory.files import current_folder
from monitor.probes import ReferenceSet
from monitor.metrics import RunningMeans
from monitor.round import AlarmLog, Pool, ProbeRound, announce, round_row
from monitor.sink import Sink
from simulator.checkpoint import FOLDER, META, Checkpoint, CheckpointError, read_pool, restored_refset
from simulator.config import RunConfig, apply_protocol
from simulator.outputs import POOL, ROUNDS, RunFiles
from simulator.run import image_root, load_model

log = logging.getLogger(__name__)

LOAD_ATTEMPTS = 5  # a checkpoint replaced while it is read is read again


class ProbeError(RuntimeError):
    """A run that cannot be probed; the message says why."""


class ProbeJob:
    """The run's model and editor, restored from its checkpoint, probed one round at a time."""

    def __init__(self, state: Path, out: Path, config: RunConfig, seed: int, sinks: list[Sink]) -> None:
        if config.mode != "sequential":
            raise ProbeError(f"{state} is a single-mode run: its edits were rolled back, there is nothing to probe")
        if not (current_folder(state / FOLDER) / META).is_file():
            raise ProbeError(f"{state} has no checkpoint yet: a run writes one every --checkpoint-every edits and "
                             "at its end")
        # The run's paths are as it was given them: relative ones name files from the folder it ran in.
        missing = [f"--{name} {value}" for name, value in (("stream", config.stream), ("images", config.images))
                   if value not in (None, "-") and not Path(value).is_absolute() and not Path(value).exists()]
        if missing:
            raise ProbeError(f"the run's {' and '.join(missing)} cannot be found from {Path.cwd()}: they are relative "
                             "to the folder the run ran in; start `simulate probe` from there")
        self.state = state
        self.seed = seed
        self.sinks = sinks
        self.files = RunFiles(out)
        self.images = image_root(config)
        lvlm = load_model(apply_protocol(config))
        config = apply_protocol(config, lvlm.family)
        self.editor = create_editor(config.method, lvlm, config.method_config)
        self.prober = ProbeRound(self.editor, self.images.open, config.collapse, config.retention_sample)
        self.gaps = sorted(set(config.gap))
        self.alarms = AlarmLog()
        self.rounds = max((row["round"] for row in self.files.rows(ROUNDS)), default=0)  # a restarted job goes on
        self.last: dict[str, Any] = {}
        self.progress: dict[str, int] = {}  # the run's counters at its checkpoint
        self.results: dict[str, dict[str, float]] = {}
        self.pool = Pool()
        self.refset = ReferenceSet()
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
                checkpoint = Checkpoint.read(self.state)
                if _stamp(meta) != stamp:
                    raise CheckpointError("the checkpoint was replaced while it was read")
                # Only the folder must stay put while it is read. A run writes a journal generation's log only past
                # the length its last checkpoint recorded, and deletes the generation only once a later checkpoint
                # names a newer one: replaying the length this checkpoint recorded gives its memory or an error,
                # however many checkpoints the run writes meanwhile (a large memory loads slower than a run may
                # checkpoint); a compaction committed meanwhile costs one attempt.
                checkpoint = checkpoint.made_whole(self.state)
            except (CheckpointError, OSError) as error:  # missing, or being replaced right now
                last_error = error
                time.sleep(0.2)
                continue
            self._restore(checkpoint)
            self._loaded = stamp
            log.info("probing the state of %s after %d edits", self.state, self.applied)
            return
        raise CheckpointError(f"cannot load the checkpoint of {self.state}: {last_error}")

    def _restore(self, checkpoint: Checkpoint) -> None:
        """The editor, pool, reference set and running means as the checkpoint holds them."""
        progress = checkpoint.progress
        self.editor.load_state(checkpoint.editor)
        self.progress = {"edits_applied": progress["applied"], "edits_read": progress["edits_read"],
                         "failed": progress["failed"]}
        self.results = {key: RunningMeans(data).means() for key, data in progress["results"].items()}
        # The run's alarms, merged with this job's own: a round's alarm is not forgotten when the run checkpoints.
        self.alarms = self.alarms.merged(AlarmLog(**progress["alarms"]))
        self.pool = read_pool(RunFiles(self.state).rows(POOL), progress["pool"])
        self.refset = restored_refset(checkpoint, self.images.open)

    @property
    def applied(self) -> int:
        """Edits the probed state holds."""
        return self.progress.get("edits_applied", 0)

    def round(self) -> dict[str, Any]:
        """One probe round on the latest state, with the fixed sample."""
        self.reload()
        result = self.prober(self.pool.live(), self.refset, np.random.default_rng(self.seed))
        self.rounds += 1
        self.alarms.update(result, self.applied)
        self.last = round_row(self.rounds, self.progress, result, self.results)
        self.files.append(ROUNDS, self.last)
        announce(self.sinks, self.applied, result, self.results)
        log.info("probe round %d after %d edits: retention %s, collapse alarm %s", self.rounds, self.applied,
                 self.last.get("retention"), self.last.get("collapse_alarm"))
        return self.last


def _stamp(path: Path) -> tuple[int, int] | None:
    """Identity of a file version: inode and modification time (None when it is missing)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns
