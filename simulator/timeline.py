"""The timeline: one editor driven through a stream of edit records (DESIGN.md, Timeline and probes).

Single mode applies each edit to the unedited model, measures it and resets (VLKEB Table 2).
Sequential mode lets edits accumulate; edit i is measured after G further edits (VLKEB's gap),
for every gap in one pass, and a probe round runs every `probe_every` edits.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from editors import Editor, EditOutcome, Query
from monitor.alarms import collapse_alarms
from monitor.metrics import (
    METRICS,
    Probe,
    RunningMeans,
    base_probes,
    edit_probes,
    fill_references,
    measure,
    measure_base,
)
from monitor.probes import (
    ReferenceSet,
    RetainedEdit,
    nonfinite_parameters,
    reference_health,
    retention,
    retrieval_health,
)
from monitor.reference import ReferenceStore
from monitor.sink import Sink
from simulator.checkpoint import Checkpoint
from simulator.config import RunConfig
from simulator.outputs import POOL, ROUNDS, RunFiles
from simulator.records import RECORD_FORMATS, EditRecord
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

    def __init__(
        self,
        editor: Editor,
        config: RunConfig,
        images: ImageRoot,
        files: RunFiles,
        sinks: Iterable[Sink] = (),
    ) -> None:
        self.editor = editor
        self.config = config
        self.images = images
        self.files = files
        self.sinks = list(sinks)
        self.sequential = config.mode == "sequential"
        self.gaps = sorted(set(config.gap))
        self.probe_every = config.probe_every or self.gaps[0]
        self.rng = np.random.default_rng(config.seed)
        self.results = {key: RunningMeans() for key in self._settings()}
        self.base = RunningMeans()
        self.pending: list[Pending] = []
        self.pool: list[dict[str, Any]] = []
        self.refset = ReferenceSet()
        self.refset_records = 0  # records whose locality questions are in the reference set
        self.refset_items: list[dict[str, Any]] = []  # the same questions with image paths, for checkpoints
        self.line = 0
        self.edits_read = 0
        self.applied = 0
        self.failed = 0
        self.rounds = 0
        self.last_round: dict[str, Any] = {}
        self.alarms: dict[str, dict[str, Any]] = {
            "collapse": {"raised": False, "first_at": None, "reasons": []},
            "forgetting": {"detected": False, "first_at": None},
        }
        self.stopped: str | None = None
        self._clock = time.monotonic()
        self._edits_since_round = 0

    def _settings(self) -> list[str]:
        return [f"gap_{g}" for g in self.gaps] if self.sequential else ["single"]

    # -- the stream -----------------------------------------------------------------------

    def run(
        self,
        records: Iterable[tuple[int, EditRecord]],
        extra: Callable[[], dict[str, Any]] = dict,
        stop: threading.Event | None = None,
    ) -> None:
        """Consume `(line, record)` pairs until the stream ends, the limit is hit, a stop alarm, or `stop` is set.

        `stop` is only looked at between records, so a stop never leaves a record half done.
        `extra()` adds the reader's counters to every checkpoint.
        """
        for line, record in records:
            if stop is not None and stop.is_set():
                self.stopped = "interrupted"
                return
            self.step(line, record)
            if self.config.limit is not None and self.edits_read >= self.config.limit:
                self.stopped = "limit"
            if self.edits_read % self.config.checkpoint_every == 0 and not self.stopped:
                self.checkpoint(extra())
            if self.stopped:
                return
        # A following reader ends when asked to stop: that is an interruption, not the stream's end.
        self.stopped = "interrupted" if stop is not None and stop.is_set() else "end of stream"

    def _grow_reference_set(self, record: EditRecord, probes: list[Probe]) -> None:
        """Add a record's locality questions to the reference set (on the unedited model), while it is short."""
        self.refset_records += 1
        for probe in self.refset.add(self.editor, probes):
            image = record.m_loc if probe.metric == "i_loc" else None
            self.refset_items.append({"metric": probe.metric, "prompt": probe.query.prompt,
                                      "answer": probe.query.answer, "image": image, "key": probe.key})

    def step(self, line: int, record: EditRecord) -> None:
        """Read one record: references and base accuracy on the unedited model, apply, measure."""
        self.line = line
        self.edits_read += 1
        probes = edit_probes(record, self.images.open, one_hop=self.config.one_hop_edit)
        references = ReferenceStore()
        with self._unedited():
            fill_references(self.editor, probes, references, self.config.vlkeb_compat)
            self.base.add(measure_base(self.editor, base_probes(record, self.images.open)))
            if self.sequential and self.refset_records < self.config.reference_size:
                self._grow_reference_set(record, probes)
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
        if not self.sequential:
            values = measure(self.editor, probes, references, self.config.vlkeb_compat)
            self.results["single"].add(values)
            self.applied += 1
            self.editor.reset()
            return
        self.applied += 1
        self._remember(record)
        self.pending.append(Pending(self.applied - 1, record, references))
        self._measure_due()
        self._edits_since_round += 1
        if self.applied % self.probe_every == 0:
            self.probe_round()

    def _apply(self, record: EditRecord) -> EditOutcome:
        """Apply the record's edit (and with --one-hop-edit its one-hop edit: both or neither)."""
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

    def _remember(self, record: EditRecord) -> None:
        """Add the edit to the pool retention samples from, with its reliability right now."""
        query = Query(record.src, record.alt, self.images.open(record.image))
        at_edit = self.editor.score([query], top_k=1)[0].token_accuracy
        row = {"key": str(record.id), "src": record.src, "alt": record.alt, "image": record.image,
               "rephrase": record.rephrase, "image_rephrase": record.image_rephrase, "at_edit": at_edit}
        self.pool.append(row)
        self.files.append(POOL, row)

    def _measure_due(self) -> None:
        """Measure each pending edit whose gap has passed (VLKEB: i + gap + 1 edits applied)."""
        for pending in self.pending:
            waited = self.applied - pending.index - 1
            if waited in self.gaps:
                probes = edit_probes(pending.record, self.images.open, one_hop=self.config.one_hop_edit)
                values = measure(self.editor, probes, pending.references, self.config.vlkeb_compat)
                self.results[f"gap_{waited}"].add(values)
        self.pending = [p for p in self.pending if self.applied - p.index - 1 < self.gaps[-1]]

    # -- probe rounds ---------------------------------------------------------------------

    def probe_round(self) -> dict[str, Any]:
        """Retention, reference set, collapse indicators and retrieval health, after `applied` edits."""
        start = time.perf_counter()
        size = min(self.config.retention_sample, len(self.pool))
        chosen = sorted(self.rng.choice(len(self.pool), size=size, replace=False).tolist()) if size else []
        sample = [self.pool[i] for i in chosen]
        open_image = self.images.open
        retained = [RetainedEdit(r["key"], Query(r["src"], r["alt"], open_image(r["image"])), r["at_edit"])
                    for r in sample]
        values: dict[str, float] = retention(self.editor, retained, len(self.pool))
        values.update(reference_health(self.editor, self.refset))
        values["weight_change_norm"] = self.editor.weight_change()
        nonfinite = nonfinite_parameters(self.editor.lvlm.model)
        in_scope = [(Query(r["rephrase"], r["alt"], open_image(r["image"])), r["key"]) for r in sample]
        in_scope += [(Query(r["src"], r["alt"], open_image(r["image_rephrase"])), r["key"]) for r in sample]
        out_of_scope = [p.query for p in self.refset.probes]
        values.update(retrieval_health(self.editor, in_scope, out_of_scope))
        if (size := self.editor.memory_size()) is not None:
            values["memory_size"] = float(size)
        values.update(self.editor.retrieval_stats())
        reasons = collapse_alarms(values, nonfinite, self.config.collapse)
        values["collapse_alarm"] = float(bool(reasons))
        seconds = time.perf_counter() - start
        self.rounds += 1
        self._check_alarms(values, reasons)
        elapsed = time.monotonic() - self._clock
        row = {
            "round": self.rounds,
            "edits_applied": self.applied,
            "edits_read": self.edits_read,
            "failed": self.failed,
            **values,
            "forgetting_significant": self._forgetting_significant(values),
            "alarms": reasons,
            "results": {key: means.means() for key, means in self.results.items()},
            "probe_seconds": seconds,
            "edits_per_second": self._edits_since_round / elapsed if elapsed > 0 else None,
        }
        self._clock, self._edits_since_round = time.monotonic(), 0
        self.files.append(ROUNDS, row)
        self.last_round = {k: v for k, v in row.items() if k not in ("probe_seconds", "edits_per_second")}
        for sink in self.sinks:
            sink.on_round(self.applied, {k: v for k, v in values.items() if k in METRICS}, seconds, row["results"])
        return row

    @staticmethod
    def _forgetting_significant(values: dict[str, float]) -> bool:
        """The sampled edits are reliably worse now than right after they were applied (CI excludes no drop)."""
        if "retention" not in values:
            return False
        at_edit = values["retention"] + values["forgetting"]
        return values["forgetting"] > 0 and values["retention_ci_high"] < at_edit

    def _check_alarms(self, values: dict[str, float], reasons: list[str]) -> None:
        collapse, forgetting = self.alarms["collapse"], self.alarms["forgetting"]
        if reasons:
            # Loud once; later rounds of the same collapse go to the rounds file, not the terminal.
            level = logging.DEBUG if collapse["raised"] else logging.WARNING
            log.log(level, "collapse alarm after %d edits: %s", self.applied, "; ".join(reasons))
            if not collapse["raised"]:
                collapse.update(raised=True, first_at=self.applied, reasons=reasons)
            if self.config.stop_on_collapse:
                self.stopped = "collapse"
        if self._forgetting_significant(values) and not forgetting["detected"]:
            forgetting.update(detected=True, first_at=self.applied)
            log.warning("forgetting detected after %d edits: retention %.3f (95%% CI up to %.3f), %.3f below "
                        "reliability at edit time", self.applied, values["retention"], values["retention_ci_high"],
                        values["forgetting"])

    # -- results and checkpoints ----------------------------------------------------------

    def summary(self, quarantined: int) -> dict[str, Any]:
        """Final numbers (DESIGN.md keys): per setting means, base accuracy, counts, alarms."""
        results = {}
        for key, means in self.results.items():
            row = means.means()
            row["edits_measured"] = means.count("reliability")
            results[key] = row
        return {
            "mode": self.config.mode,
            "gaps": self.gaps if self.sequential else [],
            "edits_read": self.edits_read,
            "edits_applied": self.applied,
            "quarantined": quarantined,
            "failed": self.failed,
            "results": results,
            "base": self.base.means(),
            "rounds": self.rounds,
            "last_round": self.last_round,
            "alarms": self.alarms,
            "stopped": self.stopped,
        }

    def checkpoint(self, extra: dict[str, Any] | None = None) -> None:
        """Save everything needed to continue after the current record."""
        tensors: dict[str, torch.Tensor] = {"torch_rng": torch.get_rng_state()}
        pending = []
        for item in self.pending:
            tensors.update(item.references.to_tensors(prefix=f"pending/{item.index}/"))
            pending.append({"index": item.index, "record": item.record.model_dump(mode="json", by_alias=True)})
        tensors.update(self.refset.references.to_tensors(prefix="refset/"))
        progress = {
            "line": self.line, "edits_read": self.edits_read, "applied": self.applied, "failed": self.failed,
            "rounds": self.rounds, "last_round": self.last_round, "alarms": self.alarms,
            "results": {k: m.data for k, m in self.results.items()}, "base": self.base.data,
            "pending": pending, "pool": len(self.pool), "rng": self.rng.bit_generator.state,
            "refset": {"items": self.refset_items, "records": self.refset_records, "base_nll": self.refset.base_nll,
                       "tokens": self.refset.tokens},
            "files": self.files.sizes(), **(extra or {}),
        }
        Checkpoint(progress, self.editor.state(), tensors).save(self.files.folder)

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from a checkpoint: editor state, counters, pending edits, pool, RNG, reference set."""
        p, tensors = checkpoint.progress, checkpoint.tensors
        self.editor.load_state(checkpoint.editor)
        torch.set_rng_state(tensors["torch_rng"])
        self.line, self.edits_read, self.applied = p["line"], p["edits_read"], p["applied"]
        self.failed, self.rounds, self.last_round, self.alarms = p["failed"], p["rounds"], p["last_round"], p["alarms"]
        self.results = {k: RunningMeans(v) for k, v in p["results"].items()}
        self.base = RunningMeans(p["base"])
        self.rng.bit_generator.state = p["rng"]
        record_class = RECORD_FORMATS[self.config.record_format]
        self.pending = [
            Pending(item["index"], record_class.model_validate(item["record"]),
                    ReferenceStore.from_tensors(tensors, prefix=f"pending/{item['index']}/"))
            for item in p["pending"]
        ]
        self.pool = list(self.files.rows(POOL))[: p["pool"]]
        saved = p["refset"]
        self.refset_items, self.refset_records = saved["items"], saved["records"]
        probes = [
            Probe(item["metric"], Query(item["prompt"], item["answer"],
                                        self.images.open(item["image"]) if item["image"] else None), item["key"])
            for item in self.refset_items
        ]
        references = ReferenceStore.from_tensors(tensors, prefix="refset/")
        self.refset = ReferenceSet(probes, references, saved["base_nll"], saved["tokens"])
