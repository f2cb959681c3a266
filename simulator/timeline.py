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

from editors import Editor, EditOutcome, InputError, ScoresUnedited, SpanScore
from monitor.metrics import (
    RunningMeans,
    base_values,
    edit_values,
    keep_references,
    score_probes,
    token_accuracy,
    unedited_key,
)
from monitor.plan import LOCALITY, PORTABILITY, Probe, base_probes, edit_probes, planned
from monitor.probes import ReferenceSet
from monitor.reference import ReferenceStore
from monitor.round import AlarmLog, Pool, PoolEntry, ProbeRound, announce, round_row
from monitor.sink import Sink
from simulator.config import RunConfig
from simulator.outputs import POOL, ROUNDS, RunFiles
from simulator.records import EditRecord, Retraction
from simulator.requests import edit_request, one_hop_request
from simulator.stream import ImageRoot, ImageRootError

log = logging.getLogger(__name__)

REFERENCE_TOP_K = 10  # pre-edit top-k ids kept per answer token: locality's KL is computed on them


@dataclass
class Measurement:
    """What is asked after one record is applied (`Timeline._plan`) and where its values go."""

    record: EditRecord
    setting: str | None  # None: each due edit's gap_<edits since>
    reliability: Probe | None  # the record's own reliability, for its retention pool entry (sequential only)
    due: list[tuple[Pending, list[Probe], list[Probe]]]  # (edit, its probes, its older values' probes)
    references: ReferenceStore

    @property
    def probes(self) -> list[Probe]:
        """Every probe asked, in order."""
        own = [] if self.reliability is None else [self.reliability]
        return [*own, *(p for _, probes, stale in self.due for p in probes + stale)]


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
        self.editor.clear_caches()  # whatever training left: every run starts alike (a resume restores what it saved)
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
        self.pool = Pool()
        self.retractions = RunningMeans()  # what each applied retraction left behind (retracted_recall, ...)
        self.hop_answers: dict[str, set[str]] = {}  # port_<k>hop -> the distinct answers read: its chance level
        self.refset = ReferenceSet()
        self.refset_records = 0  # records whose locality questions are in the reference set
        self.line = self.edits_read = self.applied = self.failed = self.rounds = self.unmeasured = self.retracted = 0
        self.last_round: dict[str, Any] = {}
        self.alarms = AlarmLog()
        self.stopped: str | None = None
        self.held_back = False  # the run ended with a record read from the stream but not applied
        # A record is being taken: what the run holds may be half of it, so no checkpoint can be written now.
        self.in_record = False
        self._clock = time.monotonic()
        self._edits_since_round = 0

    def run(self, records: Iterable[tuple[int, EditRecord | Retraction]], checkpoint: Callable[[], None] = lambda: None,
            stop: threading.Event | None = None) -> None:
        """Consume `(line, record)` pairs until the stream ends, the limit is hit, a stop alarm, or `stop` is set.

        `stop` is only looked at between records, so a stop never leaves a record half done;
        `checkpoint()` runs every `checkpoint_every` records read. `line` is the stream position
        consumed: a record read but not applied (a stop, the limit) is read again on resume.
        """
        self.editor.clear_caches(keep_saved=True)  # what was asked since the start or a restore: every run goes alike
        for line, record in records:
            interrupted = stop is not None and stop.is_set()
            if interrupted or (self.config.limit is not None and self.edits_read >= self.config.limit):
                self.stopped = "interrupted" if interrupted else "limit"
                self.line, self.held_back = line - 1, True
                return
            self.in_record = True
            if isinstance(record, Retraction):
                self.retract(line, record)
            else:
                self.step(line, record)
            self.in_record = False
            if self.config.limit is not None and self.edits_read >= self.config.limit:
                self.stopped = "limit"
            if self.edits_read % self.config.checkpoint_every == 0 and not self.stopped:
                checkpoint()
                self.editor.clear_caches(keep_saved=True)  # a run resumed here has what it saved: both go on alike
            if self.stopped:
                return
        # A following reader ends when asked to stop: that is an interruption, not the stream's end.
        self.stopped = "interrupted" if stop is not None and stop.is_set() else "end of stream"

    def step(self, line: int, record: EditRecord) -> None:
        """Read one record: references and base accuracy on the unedited model, apply, measure.

        Every query of the record is scored or checked before the edit is applied, so a record the
        model cannot take (too long for its context, special tokens, blank text) is quarantined
        with the reason and changes nothing. What the unedited model is asked (locality
        references, base accuracy, the reference set) is scored in one call; for an editor that
        `ScoresUnedited` (its weights never change) that call comes after the edit and also holds
        the post-edit probes.
        """
        self.line = line
        probes = edit_probes(record, self.images.open, one_hop=self.config.one_hop_edit)
        base = base_probes(record, self.images.open)
        locality = [p for p in probes if p.metric in LOCALITY]
        before = [*locality, *base]
        together = self.sequential and isinstance(self.editor, ScoresUnedited) and self.gaps[0] > 0
        try:
            if together:
                self.editor.lvlm.check([p.query for p in [*probes, *base]])
            else:
                scores = self._score_unedited(before)
                self.editor.lvlm.check([p.query for p in probes if p.metric not in LOCALITY])  # the rest, unscored
        except InputError as error:
            if self.reject is None:
                raise
            self.reject(line, f"the model cannot take this record: {error}")
            return
        self.edits_read += 1
        for probe in probes:
            if probe.metric in PORTABILITY:
                self.hop_answers.setdefault(probe.metric, set()).add(probe.query.answer)
        start = time.perf_counter()
        outcome = self._apply(record)
        seconds = time.perf_counter() - start
        for sink in self.sinks:
            sink.on_edit(outcome.applied, seconds, self.applied + outcome.applied)
        references = ReferenceStore()
        if not outcome.applied:
            if together:
                scores = self._score_unedited(before)
            self._keep_unedited(locality, base, scores, references)
            self.failed += 1
            log.warning("edit %s failed and was rolled back: %s", record.id, outcome.message)
            if not self.sequential:
                self.editor.reset()
            return
        self.applied += 1
        if not self.sequential:
            self._keep_unedited(locality, base, scores, references)
            self._measure(self._plan(record, [Pending(self.applied - 1, record, references)], "single"))
            self.editor.reset()
            return
        self.pending.append(Pending(self.applied - 1, record, references))
        # An edit whose fact is edited again (or that was retracted) before its gap passed is not measured.
        fact = (record.image, record.src)
        self.pending = [p for p in self.pending if p.record is record or (
            (p.record.image, p.record.src) != fact and self.pool.live_entry(str(p.record.id)) is not None)]
        plan = self._plan(record, [p for p in self.pending if self.applied - p.index - 1 in self.gaps], None)
        if together:
            self._measure_together(plan, locality, base, references)
        else:
            self._keep_unedited(locality, base, scores, references)
            self._measure(plan)
        self.pending = [p for p in self.pending if self.applied - p.index - 1 < self.gaps[-1]]
        self._edits_since_round += 1
        if self.applied % self.probe_every == 0:
            self.probe_round()

    def _score_unedited(self, before: list[Probe]) -> dict[str, SpanScore]:
        """The unedited model's scores of a record's locality and base probes."""
        with self._unedited():
            return score_probes(self.editor, before, top_k=REFERENCE_TOP_K, vlkeb_compat=self.config.vlkeb_compat)

    def _keep_unedited(self, locality: list[Probe], base: list[Probe], scores: dict[str, SpanScore],
                       references: ReferenceStore) -> None:
        """Keep a record's pre-edit locality references, add its base accuracy, fill the reference set."""
        keep_references(locality, scores, references)
        self.base.add(base_values(base, scores))
        if self.sequential and self.refset_records < self.config.reference_size:
            self.refset_records += 1
            self.refset.add(locality, scores)

    def _measure_together(self, plan: Measurement, locality: list[Probe], base: list[Probe],
                          references: ReferenceStore) -> None:
        """The record's unedited probes and `plan`'s edited ones in one call; apart, as usual, if that call fails."""
        before = [*locality, *base]
        try:
            scores = score_probes(self.editor, plan.probes, plan.references, top_k=REFERENCE_TOP_K,
                                  vlkeb_compat=self.config.vlkeb_compat, unedited=before)
        except Exception:  # not KeyboardInterrupt: measured apart, a failure is what it would have been
            self._keep_unedited(locality, base, self._score_unedited(before), references)
            self._measure(plan)
            return
        self._keep_unedited(locality, base, {p.key: scores[unedited_key(p.key)] for p in before}, references)
        self._record(plan, scores)

    def retract(self, line: int, retraction: Retraction) -> None:
        """Undo the applied edit `retraction.id` (sequential mode) and measure what the model answers now.

        A retraction the editor refuses (a method that cannot undo an edit), of an edit that is not
        live (never applied, re-edited since, retracted already) or in single mode (every edit is
        rolled back anyway) counts as failed, with the reason logged.
        """
        self.line = line
        self.edits_read += 1
        key = str(retraction.id)
        entry = self.pool.live_entry(key) if self.sequential else None
        if entry is None:
            reason = ("single mode rolls every edit back: there is nothing to retract" if not self.sequential
                      else f"no live edit with id {key!r} (never applied, re-edited or retracted since)")
            outcome = EditOutcome(applied=False, message=reason)
        else:
            try:
                outcome = self.editor.retract(key)
            except Exception as error:  # not KeyboardInterrupt: a stop is not a failed retraction
                outcome = EditOutcome(applied=False, message=f"{type(error).__name__}: {error}")
        for sink in self.sinks:
            sink.on_retraction(outcome.applied)
        if not outcome.applied:
            self.failed += 1
            log.warning("retraction of %s at line %d failed: %s", key, line, outcome.message)
            return
        self.retracted += 1
        self.files.append(POOL, self.pool.retract(key))
        self.pending = [p for p in self.pending if str(p.record.id) != key]
        probes = {"retracted_recall": planned(entry, "reliability", self.images.open)}
        if entry.pred:
            probes["retraction_restore"] = planned(entry, "reliability", self.images.open, answer=entry.pred)
        try:
            scores = score_probes(self.editor, probes.values())
        except Exception as error:  # as for edits: the measurement is lost, not the run
            self.unmeasured += 1
            log.warning("measuring retraction %s failed: %s: %s", key, type(error).__name__, error)
            return
        self.retractions.add({metric: token_accuracy(scores[p.key]) for metric, p in probes.items()})

    def _apply(self, record: EditRecord) -> EditOutcome:
        """Apply the record's edit (and with --one-hop-edit its one-hop edit: both or neither).

        An exception inside the method (out of memory, a failure of its own on this record) fails
        the record with the reason and the run goes on: parameter editors restore the touched
        weights themselves (editors.weights.WeightTracker), memory editors add nothing until the
        edit is embedded.
        """
        try:
            return self._apply_pair(record)
        except ImageRootError:  # opening the edit's image: a fault of the run, not of this record
            raise
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

    def _plan(self, record: EditRecord, due: list[Pending], setting: str | None) -> Measurement:
        """What to ask after applying `record`: its reliability (its pool entry, sequential only) and every probe
        of the `due` edits, whose values go to `setting` (None: gap_<edits since>).

        A due edit of a fact edited before also asks its older values (`stale_rate`: 1 when the
        model still gives one of them in full).
        """
        one_hop = self.config.one_hop_edit
        reliability = planned(record, "reliability", self.images.open)
        plans = []
        for item in due:
            probes = edit_probes(item.record, self.images.open, one_hop=one_hop)
            edit = item.record
            older = self.pool.older_values((edit.image, edit.src), edit.alt, str(edit.id)) if setting is None else []
            stale = [planned(edit, "reliability", self.images.open, answer=value) for value in older]
            plans.append((item, probes, stale))
        references = ReferenceStore.merged(item.references for item in due)
        return Measurement(record, setting, reliability if setting is None else None, plans, references)

    def _measure(self, plan: Measurement) -> None:
        """Score `plan` in one call and record it. A failure while scoring (a rewritten query too long for the
        model, out of memory) loses what the call measured, not the run: the record's reliability (rounds cannot
        re-ask it, though it stays live) and the due edits' values at this gap. `unmeasured` counts each edit that
        lost a measurement in the call (an edit can lose more than one call's), and the log names them.
        """
        try:
            scores = score_probes(self.editor, plan.probes, plan.references, vlkeb_compat=self.config.vlkeb_compat)
        except Exception as error:  # not KeyboardInterrupt: a stop is not a lost measurement
            record = plan.record
            lost = [str(record.id)] * (plan.reliability is not None) + [str(item.record.id) for item, _, _ in plan.due]
            self.unmeasured += len(lost)
            log.warning("measuring after edit %s failed, the measurements of %s are lost: %s: %s", record.id,
                        ", ".join(lost), type(error).__name__, error)
            if plan.reliability is not None:  # it still replaces its fact's older value
                self.files.append(POOL, self.pool.add(PoolEntry.remembered(record, str(record.id), None)))
            return
        self._record(plan, scores)

    def _record(self, plan: Measurement, scores: dict[str, SpanScore]) -> None:
        """Add the record's pool entry and each due edit's values from `plan`'s scores."""
        if plan.reliability is not None:
            entry = PoolEntry.remembered(plan.record, str(plan.record.id), token_accuracy(scores[plan.reliability.key]))
            self.files.append(POOL, self.pool.add(entry))
        for item, probes, stale in plan.due:
            values = edit_values(probes, scores, plan.references, self.config.vlkeb_compat)
            if stale:
                values["stale_rate"] = float(any(token_accuracy(scores[p.key]) == 1.0 for p in stale))
            self.results[plan.setting or f"gap_{self.applied - item.index - 1}"].add(values)

    def probe_round(self) -> dict[str, Any]:
        """Run monitor's probe round after `applied` edits; write its row and tell the exporters."""
        result = self.prober(self.pool.live(), self.refset, self.rng)
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
        """Final numbers (DESIGN.md keys): per setting means, base accuracy, counts, retractions, alarms.

        `port_chance` is each hop's chance level: 1 / the number of distinct answers its questions had.
        """
        results = {key: {**means.means(), "edits_measured": means.count("reliability")}
                   for key, means in self.results.items()}
        return {
            "mode": self.config.mode, "gaps": self.gaps if self.sequential else [],
            "edits_read": self.edits_read, "edits_applied": self.applied, "quarantined": quarantined,
            "failed": self.failed, "unmeasured": self.unmeasured, "retracted": self.retracted, "results": results,
            "base": self.base.means(), "retractions": self.retractions.means(),
            "port_chance": {metric: 1 / len(answers) for metric, answers in sorted(self.hop_answers.items())},
            "rounds": self.rounds, "last_round": self.last_round, "alarms": self.alarms.as_dict(),
            "stopped": self.stopped,
        }
