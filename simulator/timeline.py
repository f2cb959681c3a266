"""The timeline: one editor driven through a stream of edit records (DESIGN.md, Timeline and probes).

Single mode applies each edit to the unedited model, measures it and resets (VLKEB Table 2).
Sequential mode lets edits accumulate; edit i is measured after G further edits (VLKEB's gap),
for every gap in one pass, and a probe round (monitor.round) runs every `probe_every` edits.
What is measured is monitor's; this module keeps the stream loop and the gap bookkeeping.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from editors import Editor, EditOutcome, InputError
from monitor.metrics import RunningMeans, fill_references, measure, measure_base
from monitor.plan import LOCALITY, base_probes, edit_probes
from monitor.probes import ReferenceSet
from monitor.reference import ReferenceStore
from monitor.round import AlarmLog, PoolEntry, ProbeRound, announce, round_row
from monitor.sink import Sink
from simulator.config import RunConfig
from simulator.outputs import POOL, ROUNDS, RunFiles
from simulator.records import EditRecord
from simulator.requests import edit_request, one_hop_request
from simulator.stream import ImageRoot

log = logging.getLogger(__name__)


@dataclass
class Pending:
    """An applied edit waiting for its gap measurements, with its pre-edit locality references."""

    index: int  # edits applied before it
    record: EditRecord
    references: ReferenceStore


class Timeline:
    """Drives `editor` through records and writes what it measures into `files`."""

    def __init__(self, editor: Editor, config: RunConfig, images: ImageRoot, files: RunFiles,
                 sinks: Iterable[Sink] = (), reject: Callable[[int, str], None] | None = None) -> None:
        self.editor = editor
        self.config = config
        self.images = images
        self.files = files
        self.sinks = list(sinks)
        self.reject = reject  # quarantines a record the model cannot take (line, reason); None: raise
        self.sequential = config.mode == "sequential"
        self.gaps = sorted(set(config.gap))
        self.probe_every = config.probe_every or self.gaps[0]
        self.rng = np.random.default_rng(config.seed)
        self.prober = ProbeRound(editor, images.open, config.collapse, config.retention_sample)
        settings = [f"gap_{g}" for g in self.gaps] if self.sequential else ["single"]
        self.results = {key: RunningMeans() for key in settings}
        self.base = RunningMeans()
        self.pending: list[Pending] = []
        self.pool: list[PoolEntry] = []
        self.refset = ReferenceSet()
        self.refset_records = 0  # records whose locality questions are in the reference set
        self.line = self.edits_read = self.applied = self.failed = self.rounds = 0
        self.last_round: dict[str, Any] = {}
        self.alarms = AlarmLog()
        self.stopped: str | None = None
        self.held_back = False  # the run ended with a record read from the stream but not applied
        self._clock = time.monotonic()
        self._edits_since_round = 0

    def run(self, records: Iterable[tuple[int, EditRecord]], checkpoint: Callable[[], None] = lambda: None,
            stop: threading.Event | None = None) -> None:
        """Consume `(line, record)` pairs until the stream ends, the limit is hit, a stop alarm, or `stop` is set.

        `stop` is only looked at between records, so a stop never leaves a record half done;
        `checkpoint()` runs every `checkpoint_every` records read. `line` is the stream position
        consumed: a record read but not applied (a stop, the limit) is read again on resume.
        """
        for line, record in records:
            interrupted = stop is not None and stop.is_set()
            if interrupted or (self.config.limit is not None and self.edits_read >= self.config.limit):
                self.stopped = "interrupted" if interrupted else "limit"
                self.line, self.held_back = line - 1, True
                return
            self.step(line, record)
            if self.config.limit is not None and self.edits_read >= self.config.limit:
                self.stopped = "limit"
            if self.edits_read % self.config.checkpoint_every == 0 and not self.stopped:
                checkpoint()
            if self.stopped:
                return
        # A following reader ends when asked to stop: that is an interruption, not the stream's end.
        self.stopped = "interrupted" if stop is not None and stop.is_set() else "end of stream"

    def step(self, line: int, record: EditRecord) -> None:
        """Read one record: references and base accuracy on the unedited model, apply, measure.

        Every query of the record is scored before the edit is applied, so a record the model
        cannot take (too long for its context, special tokens, blank text) is quarantined with
        the reason and changes nothing.
        """
        self.line = line
        probes = edit_probes(record, self.images.open, one_hop=self.config.one_hop_edit)
        references = ReferenceStore()
        try:
            with self._unedited():
                fill_references(self.editor, probes, references, self.config.vlkeb_compat)
                base = measure_base(self.editor, base_probes(record, self.images.open))
                self.editor.lvlm.check([p.query for p in probes if p.metric not in LOCALITY])  # the rest, unscored
        except InputError as error:
            if self.reject is None:
                raise
            self.reject(line, f"the model cannot take this record: {error}")
            return
        self.edits_read += 1
        self.base.add(base)
        if self.sequential and self.refset_records < self.config.reference_size:
            with self._unedited():
                self.refset_records += 1
                self.refset.add(self.editor, probes)
        start = time.perf_counter()
        outcome = self._apply(record)
        seconds = time.perf_counter() - start
        for sink in self.sinks:
            sink.on_edit(outcome.applied, seconds, self.applied + outcome.applied)
        if not outcome.applied:
            self.failed += 1
            log.warning("edit %s failed and was rolled back: %s", record.id, outcome.message)
            if not self.sequential:
                self.editor.reset()
            return
        self.applied += 1
        if not self.sequential:
            self.results["single"].add(measure(self.editor, probes, references, self.config.vlkeb_compat))
            self.editor.reset()
            return
        entry = PoolEntry.remembered(self.editor, record, str(record.id), self.images.open)
        self.pool.append(entry)
        self.files.append(POOL, entry.row())
        self.pending.append(Pending(self.applied - 1, record, references))
        self._measure_due()
        self._edits_since_round += 1
        if self.applied % self.probe_every == 0:
            self.probe_round()

    def _apply(self, record: EditRecord) -> EditOutcome:
        """Apply the record's edit (and with --one-hop-edit its one-hop edit: both or neither).

        An exception inside the method (out of memory, a failure of its own on this record) fails
        the record with the reason and the run goes on: parameter editors restore the touched
        weights themselves (editors.weights.WeightTracker), memory editors add nothing until the
        edit is embedded.
        """
        try:
            return self._apply_pair(record)
        except Exception as error:  # not KeyboardInterrupt: a stop is not a failed record
            return EditOutcome(applied=False, message=f"{type(error).__name__}: {error}")

    def _apply_pair(self, record: EditRecord) -> EditOutcome:
        second = one_hop_request(record, self.images) if self.config.one_hop_edit else None
        saved = self.editor.state() if second is not None else None
        outcome = self.editor.apply(edit_request(record, self.images))
        if not outcome.applied or second is None:
            return outcome
        hop = self.editor.apply(second)
        if hop.applied:
            return outcome
        self.editor.load_state(saved)  # a failed record leaves nothing behind, not half a pair
        return EditOutcome(applied=False, message=f"one-hop edit failed ({hop.message}); both edits rolled back")

    @contextlib.contextmanager
    def _unedited(self) -> Iterator[None]:
        """The unedited model for pre-edit references; free when nothing is applied (single mode)."""
        if self.sequential and self.applied:
            with self.editor.unedited():
                yield
        else:
            yield

    def _measure_due(self) -> None:
        """Measure each pending edit whose gap has passed (VLKEB: i + gap + 1 edits applied)."""
        for pending in self.pending:
            waited = self.applied - pending.index - 1
            if waited in self.gaps:
                probes = edit_probes(pending.record, self.images.open, one_hop=self.config.one_hop_edit)
                values = measure(self.editor, probes, pending.references, self.config.vlkeb_compat)
                self.results[f"gap_{waited}"].add(values)
        self.pending = [p for p in self.pending if self.applied - p.index - 1 < self.gaps[-1]]

    def probe_round(self) -> dict[str, Any]:
        """Run monitor's probe round after `applied` edits; write its row and tell the exporters."""
        result = self.prober(self.pool, self.refset, self.rng)
        self.rounds += 1
        self.alarms.update(result, self.applied)
        if result.reasons and self.config.stop_on_collapse:
            self.stopped = "collapse"
        elapsed = time.monotonic() - self._clock
        progress = {"edits_applied": self.applied, "edits_read": self.edits_read, "failed": self.failed}
        row = round_row(self.rounds, progress, result, {key: means.means() for key, means in self.results.items()})
        row["edits_per_second"] = self._edits_since_round / elapsed if elapsed > 0 else None
        self._clock, self._edits_since_round = time.monotonic(), 0
        self.files.append(ROUNDS, row)
        self.last_round = {k: v for k, v in row.items() if k not in ("probe_seconds", "edits_per_second")}
        announce(self.sinks, self.applied, result, row["results"])
        return row

    def summary(self, quarantined: int) -> dict[str, Any]:
        """Final numbers (DESIGN.md keys): per setting means, base accuracy, counts, alarms."""
        results = {key: {**means.means(), "edits_measured": means.count("reliability")}
                   for key, means in self.results.items()}
        return {
            "mode": self.config.mode, "gaps": self.gaps if self.sequential else [],
            "edits_read": self.edits_read, "edits_applied": self.applied, "quarantined": quarantined,
            "failed": self.failed, "results": results, "base": self.base.means(), "rounds": self.rounds,
            "last_round": self.last_round, "alarms": self.alarms.as_dict(), "stopped": self.stopped,
        }
