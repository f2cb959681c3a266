"""What a run reports as it goes: the events exporters (MLflow, Prometheus, Pushgateway) receive."""

from __future__ import annotations

import re
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping


def short_model_name(model: str) -> str:
    """A model's short, stable name for labels and tables: the last part of a hub id or folder path
    (`llava-hf/llava-1.5-7b-hf` -> `llava-1.5-7b-hf`, `/models/run3/llava` -> `llava`)."""
    parts = [part for part in re.split(r"[\\/]", model) if part]
    return parts[-1] if parts else model


class Sink:
    """Receives a run's events; every method is a no-op here, exporters override what they need.

    `step` is always the number of edits applied so far (DESIGN.md, Monitoring).
    """

    def on_start(self, run: str, params: dict[str, Any], folder: Path, step: int) -> None:
        """The run begins (`step` 0) or resumes (`step` > 0) writing into `folder`: its name and parameters."""

    def on_resume(self, counts: Mapping[str, int]) -> None:
        """Right after `on_start`, when the run continues from a checkpoint: what it had counted by then
        (`applied`, `failed`, `quarantined`, `rounds`), so running totals go on from there."""

    def on_edit(self, applied: bool, seconds: float, step: int) -> None:
        """One edit was applied (or failed and was rolled back) in `seconds`."""

    def on_retraction(self, applied: bool) -> None:
        """A retraction undid its edit (`applied`), or was refused and counts as a failed line."""

    def on_quarantine(self, total: int) -> None:
        """The count of quarantined stream lines is now `total`."""

    def on_round(
        self, step: int, values: dict[str, float], seconds: float, results: dict[str, dict[str, float]],
        crossed: Mapping[str, str] = MappingProxyType({}),
    ) -> None:
        """A probe round measured `values` (metric key -> value) in `seconds`.

        `results` holds the running means of the per-edit metrics by setting (`gap_10`, ..., or `single`);
        `crossed` the collapse indicators the round crossed, with their reasons (monitor.alarms.crossed_checks).
        """

    def on_finish(self, summary: dict[str, Any], folder: Path) -> None:
        """The run ended; `folder` holds summary.json, rounds.jsonl and the rest."""

    def settle(self) -> dict[str, Any]:
        """After `on_finish`: wait (bounded) for what the exporter still sends; counts the run's summary should hold."""
        return {}

    def close(self) -> None:
        """Release resources (servers, connections)."""
