"""The files a run writes into `--out` (DESIGN.md, Command line)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

from editors.state import write_atomically

SUMMARY = "summary.json"
ROUNDS = "rounds.jsonl"  # one line per probe round
POOL = "pool.jsonl"  # one line per applied edit: what retention probes re-ask later
QUARANTINE = "quarantine.jsonl"  # bad stream lines, with line number and reason
APPEND_ONLY = (ROUNDS, POOL, QUARANTINE)


def jsonable(value: Any) -> Any:
    """`value` with NaN/Inf floats as None, so the files stay strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


class RunFiles:
    """Append-only JSONL outputs plus the atomically replaced summary, in one folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        """Path of one output file."""
        return self.folder / name

    def append(self, name: str, row: dict[str, Any]) -> None:
        """Add one JSON line and flush it, so a crash loses at most the line being written."""
        with self.path(name).open("a", encoding="utf-8") as out:
            out.write(json.dumps(jsonable(row)) + "\n")

    def sizes(self) -> dict[str, int]:
        """Byte size of every append-only file now (what a checkpoint records)."""
        return {name: self.path(name).stat().st_size if self.path(name).exists() else 0 for name in APPEND_ONLY}

    def rows(self, name: str) -> Iterator[dict[str, Any]]:
        """The rows of a JSONL output."""
        if self.path(name).exists():
            with self.path(name).open(encoding="utf-8") as lines:
                for line in lines:
                    yield json.loads(line)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Replace summary.json atomically."""
        text = json.dumps(jsonable(summary), indent=2) + "\n"
        write_atomically(self.path(SUMMARY), lambda tmp: tmp.write_text(text, encoding="utf-8"))
