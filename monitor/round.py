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
from monitor.metrics import METRICS, token_accuracy
from monitor.plan import GENERALITY, ImageOpener, planned
from monitor.probes import ReferenceSet, RetainedEdit, reference_health, retention, retrieval_health
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
    at_edit: float  # its reliability right after it was applied

    @classmethod
    def remembered(cls, editor: Editor, edit: Any, key: str, open_image: ImageOpener) -> PoolEntry:
        """The pool entry of `edit` (a record) just applied to `editor`, with its reliability now."""
        at_edit = token_accuracy(editor.score([planned(edit, "reliability", open_image).query], top_k=1)[0])
        return cls(key, edit.src, edit.alt, edit.image, edit.rephrase, edit.image_rephrase, at_edit)

    def row(self) -> dict[str, Any]:
        """As a JSON line."""
        return asdict(self)


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


class ProbeRound:
    """The probe round of one editor: retention on a sample of its pool, reference set, collapse, retrieval."""

    def __init__(self, editor: Editor, open_image: ImageOpener, thresholds: CollapseThresholds,
                 sample_size: int) -> None:
        self.editor = editor
        self.open_image = open_image
        self.thresholds = thresholds
        self.sample_size = sample_size

    def __call__(self, pool: Sequence[PoolEntry], refset: ReferenceSet, rng: np.random.Generator) -> RoundResult:
        """Measure the editor now; `rng` draws the retention sample from `pool`."""
        start = time.perf_counter()
        editor = self.editor
        size = min(self.sample_size, len(pool))
        sample = [pool[i] for i in sorted(rng.choice(len(pool), size=size, replace=False).tolist())] if size else []
        retained = [RetainedEdit(e.key, planned(e, "reliability", self.open_image).query, e.at_edit) for e in sample]
        values = retention(editor, retained, len(pool))
        values.update(reference_health(editor, refset))
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
