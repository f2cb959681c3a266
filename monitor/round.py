"""The probe round (DESIGN.md, Timeline and probes 2-5): one function that `simulate` and `simulate probe` both call.

A round re-asks a bounded random sample of the applied edits (retention), the fixed reference
set (unedited knowledge, perplexity), checks the collapse indicators and, for editors that
declare a memory, its retrieval health. Its cost does not grow with the stream.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from editors import Editor, HasMemory, HasWeightDelta
from monitor.alarms import CollapseThresholds, crossed_checks, forgetting_significant
from monitor.metrics import METRICS, score_probes
from monitor.plan import GENERALITY, ImageOpener, planned
from monitor.probes import ReferenceSet, reference_health, retention, retrieval_health
from monitor.sink import Sink

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolEntry:
    """An applied edit as later rounds re-ask it (a line of the run's pool): the edit plan's fields it needs."""

    key: str
    src: str
    alt: str
    image: str
    rephrase: str
    image_rephrase: str
    at_edit: float | None  # its reliability right after it was applied; None: that measurement was lost
    pred: str | None = None  # the fact's answer before the edit, when the record says

    @classmethod
    def remembered(cls, edit: Any, key: str, at_edit: float | None) -> PoolEntry:
        """The pool entry of `edit` (a record) just applied, with its reliability `at_edit` measured then."""
        return cls(key, edit.src, edit.alt, edit.image, edit.rephrase, edit.image_rephrase, at_edit, edit.pred)

    @property
    def fact(self) -> tuple[str, str]:
        """What the edit is about: its image and question (a later edit of the same pair re-edits the fact)."""
        return self.image, self.src

    def row(self) -> dict[str, Any]:
        """As a JSON line."""
        return asdict(self)


RETRACTED = "retracted"  # the key of a pool line that retracts an earlier entry: {"retracted": key}


@dataclass
class Pool:
    """The applied edits of a run in order (its pool file, line by line), and which of them are still live.

    An entry dies when a later edit re-edits its fact (the newest value is the fact's value) or
    when it is retracted; rounds re-ask live entries only, so a replaced value is not counted as
    forgotten. An entry whose reliability after the edit was lost stays live (it can be retracted,
    its later gaps are measured) but rounds cannot re-ask it: there is nothing to compare with.
    """

    entries: list[PoolEntry] = field(default_factory=list)
    dead: set[int] = field(default_factory=set)
    unasked: set[int] = field(default_factory=set)  # entries without a reliability after the edit
    rows: int = 0  # lines of the pool file this pool holds
    _facts: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # fact -> its entries, oldest first
    _keys: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries) - len(self.dead | self.unasked)

    @classmethod
    def from_rows(cls, rows: Iterable[dict[str, Any]]) -> Pool:
        """The pool a pool file's lines describe."""
        pool = cls()
        for row in rows:
            if RETRACTED in row:
                pool.retract(row[RETRACTED])
            else:
                pool.add(PoolEntry(**row))
        return pool

    def add(self, entry: PoolEntry) -> dict[str, Any]:
        """Add a just-applied edit (the live one of its fact from now on); returns its pool line."""
        chain = self._facts.setdefault(entry.fact, [])
        self.dead.update(chain)
        chain.append(len(self.entries))
        self._keys[entry.key] = len(self.entries)
        if entry.at_edit is None:
            self.unasked.add(len(self.entries))
        self.entries.append(entry)
        self.rows += 1
        return entry.row()

    def live_entry(self, key: str) -> PoolEntry | None:
        """The live entry of the edit `key`, if it is applied and neither re-edited nor retracted."""
        index = self._keys.get(key)
        return None if index is None or index in self.dead else self.entries[index]

    def retract(self, key: str) -> dict[str, Any]:
        """Mark the live entry `key` retracted; returns its pool line."""
        index = self._keys.get(key)
        if index is not None:
            self.dead.add(index)
        self.rows += 1
        return {RETRACTED: key}

    def older_values(self, fact: tuple[str, str], value: str, key: str) -> list[str]:
        """Values `fact` had from edits before the edit `key` (all, when it is not in the pool yet), other than
        `value`: what a stale answer would be."""
        index = self._keys.get(key, len(self.entries))
        values = [self.entries[i].alt for i in self._facts.get(fact, []) if i < index]
        return [v for v in dict.fromkeys(values) if v != value]

    def live(self) -> Sequence[PoolEntry]:
        """The live entries rounds can re-ask, in order."""
        gone = self.dead | self.unasked
        if not gone:
            return self.entries
        return [e for i, e in enumerate(self.entries) if i not in gone]


@dataclass
class RoundResult:
    """What one round measured: metric values (METRICS keys), why it counts as collapsed, its cost."""

    values: dict[str, float]
    crossed: dict[str, str]  # collapse indicator -> reason (monitor.alarms.crossed_checks)
    seconds: float

    @property
    def reasons(self) -> list[str]:
        """Why the round counts as collapsed (empty when healthy)."""
        return list(self.crossed.values())


@dataclass
class AlarmLog:
    """When each alarm was first raised in a run (loud once: later rounds go to the rounds file)."""

    collapse: dict[str, Any] = field(default_factory=lambda: {"raised": False, "first_at": None, "reasons": []})
    forgetting: dict[str, Any] = field(default_factory=lambda: {"detected": False, "first_at": None})

    def update(self, result: RoundResult, applied: int) -> None:
        """Record the round measured after `applied` edits."""
        if result.reasons:
            level = logging.DEBUG if self.collapse["raised"] else logging.WARNING
            log.log(level, "collapse alarm after %d edits: %s", applied, "; ".join(result.reasons))
            if not self.collapse["raised"]:
                self.collapse.update(raised=True, first_at=applied, reasons=result.reasons)
        values = result.values
        if values.get("forgetting_significant") and not self.forgetting["detected"]:
            self.forgetting.update(detected=True, first_at=applied)
            log.warning("forgetting detected after %d edits: retention %.3f (95%% CI up to %.3f), %.3f below "
                        "reliability at edit time", applied, values["retention"], values["retention_ci_high"],
                        values["forgetting"])

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """The summary's `alarms`."""
        return {"collapse": self.collapse, "forgetting": self.forgetting}

    def merged(self, other: AlarmLog) -> AlarmLog:
        """Each alarm as first raised by either log (the earlier one when both raised it)."""
        def first(mine: dict[str, Any], theirs: dict[str, Any], flag: str) -> dict[str, Any]:
            raised = [alarm for alarm in (mine, theirs) if alarm[flag]]
            return dict(min(raised, key=lambda alarm: alarm["first_at"]) if raised else mine)

        return AlarmLog(first(self.collapse, other.collapse, "raised"),
                        first(self.forgetting, other.forgetting, "detected"))


class ProbeRound:
    """The probe round of one editor: retention on a sample of its pool, reference set, collapse, retrieval."""

    def __init__(self, editor: Editor, open_image: ImageOpener, thresholds: CollapseThresholds,
                 sample_size: int) -> None:
        self.editor = editor
        self.open_image = open_image
        self.thresholds = thresholds
        self.sample_size = sample_size

    def __call__(self, pool: Sequence[PoolEntry], refset: ReferenceSet, rng: np.random.Generator) -> RoundResult:
        """Measure the editor now; `rng` draws the retention sample from `pool` (the live entries: `Pool.live`)."""
        start = time.perf_counter()
        editor = self.editor
        size = min(self.sample_size, len(pool))
        sample = [pool[i] for i in sorted(rng.choice(len(pool), size=size, replace=False).tolist())] if size else []
        retained = [planned(e, "reliability", self.open_image) for e in sample]
        scores = score_probes(editor, [*retained, *refset.probes], refset.references)  # one call for both
        values = retention([scores[p.key] for p in retained], [e.at_edit for e in sample], len(pool))
        values.update(reference_health(refset, scores))
        if isinstance(editor, HasWeightDelta):
            values["weight_change_norm"] = editor.weight_change()
        if isinstance(editor, HasMemory):
            # In scope: each sampled edit's generality questions, owned by its key; out of scope: the reference set.
            in_scope = [(planned(e, metric, self.open_image).query, e.key) for metric in GENERALITY for e in sample]
            values.update(retrieval_health(editor, in_scope, [p.query for p in refset.probes]))
            values["memory_size"] = float(editor.memory_size())
            values.update(editor.retrieval_stats())
        values["forgetting_significant"] = float(forgetting_significant(values))
        crossed = crossed_checks(values, editor.lvlm.nonfinite_parameters(), self.thresholds)
        values["collapse_alarm"] = float(bool(crossed))
        return RoundResult(values, crossed, time.perf_counter() - start)


def round_row(number: int, progress: dict[str, Any], result: RoundResult,
              results: dict[str, dict[str, float]]) -> dict[str, Any]:
    """A line of rounds.jsonl: the round's number, the run's progress counters, its values, reasons and cost."""
    return {"round": number, **progress, **result.values, "alarms": result.reasons, "results": results,
            "probe_seconds": result.seconds}


def announce(sinks: Iterable[Sink], step: int, result: RoundResult, results: dict[str, dict[str, float]]) -> None:
    """Send a round's registered metrics to the exporters."""
    metrics = {k: v for k, v in result.values.items() if k in METRICS}
    for sink in sinks:
        sink.on_round(step, metrics, result.seconds, results, result.crossed)
