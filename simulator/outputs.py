"""The files a run writes into `--out` (DESIGN.md, Command line)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from memory.files import append_jsonl, fsync_file, fsync_folder, jsonable, read_jsonl, write_text_atomically

from monitor.run_files import CONFIG, ROUNDS, SUMMARY

__all__ = ["APPEND_ONLY", "CONFIG", "POOL", "QUARANTINE", "ROUNDS", "SUMMARY", "RunFiles"]

POOL = "pool.jsonl"  # one line per applied edit: what retention probes re-ask later
QUARANTINE = "quarantine.jsonl"  # bad stream lines, with line number and reason
APPEND_ONLY = (ROUNDS, POOL, QUARANTINE)


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
        append_jsonl(self.path(name), row)

    def sizes(self) -> dict[str, int]:
        """Byte size of every append-only file now."""
        return {name: self.path(name).stat().st_size if self.path(name).exists() else 0 for name in APPEND_ONLY}

    def durable_sizes(self) -> dict[str, int]:
        """`sizes`, after flushing the files and the folder to disk: what a checkpoint records, so that a power loss
        cannot leave a file shorter than its checkpoint says."""
        for name in APPEND_ONLY:
            if self.path(name).exists():
                fsync_file(self.path(name))
        fsync_folder(self.folder)
        return self.sizes()

    def rows(self, name: str) -> Iterator[dict[str, Any]]:
        """The rows of a JSONL output."""
        return read_jsonl(self.path(name))

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Replace summary.json atomically."""
        write_text_atomically(self.path(SUMMARY), json.dumps(jsonable(summary), indent=2) + "\n")
