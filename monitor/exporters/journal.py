"""A durable, append-only journal of tracking operations and how much of it has been sent.

The MLflow exporter writes every operation here first and sends from here, so a tracking
server that is down (or a process that is killed) loses nothing: what was not sent yet is
still in the journal and goes out on the next attempt, on `--resume`, or with
`simulate compare --sync DIR`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator

from memory.files import append_jsonl, write_text_atomically

log = logging.getLogger(__name__)

OPERATIONS = "journal.jsonl"
STATE = "state.json"
TAIL_CHUNK = 1 << 16  # bytes read at a time when looking back for the last whole line


class JournalError(ValueError):
    """A journal line that is not an operation; the message names the file and the byte offset."""


class Journal:
    """Operations as JSON lines in `folder/journal.jsonl`; `folder/state.json` records the sent offset."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / OPERATIONS
        self.state_path = folder / STATE
        self._whole = False  # whether this instance checked that the file ends with a whole line

    def exists(self) -> bool:
        """Whether anything was ever journaled here."""
        return self.path.is_file()

    def append(self, op: dict[str, Any]) -> None:
        """Add one operation and flush it (a crash loses at most the line being written).

        The first append of this instance drops a partial last line a killed process left.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self._whole:
            self._cut_torn_tail()
            self._whole = True
        append_jsonl(self.path, op)

    def state(self) -> dict[str, Any]:
        """What the sender knows: byte `offset` sent so far, the tracking `uri`, `run_id`, `experiment_id`."""
        if not self.state_path.is_file():
            return {"offset": 0}
        return json.loads(self.state_path.read_text(encoding="utf-8"))

    def save_state(self, state: dict[str, Any]) -> None:
        """Replace state.json atomically."""
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text_atomically(self.state_path, json.dumps(state, indent=2) + "\n")

    def pending(self, offset: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(end offset, operation) of every complete line after byte `offset`."""
        if not self.path.is_file():
            return
        with self.path.open("rb") as lines:
            lines.seek(offset)
            for line in lines:
                if not line.endswith(b"\n"):  # still being written
                    return
                try:
                    op = json.loads(line)
                except json.JSONDecodeError as error:
                    raise JournalError(
                        f"{self.path}: the line at byte {offset} is not a JSON operation ({error}); delete or "
                        "repair that line, then sync again"
                    ) from None
                offset += len(line)
                yield offset, op

    def _cut_torn_tail(self) -> None:
        """Cut the file back to its last newline: appending onto a partial line would merge two operations."""
        if not self.path.is_file():
            return
        with self.path.open("r+b") as handle:
            size = end = handle.seek(0, 2)
            while end > 0:
                start = max(0, end - TAIL_CHUNK)
                handle.seek(start)
                newline = handle.read(end - start).rfind(b"\n")
                if newline >= 0:
                    end = start + newline + 1
                    break
                end = start
            if end < size:
                handle.seek(end)
                torn = handle.read(80)
                handle.truncate(end)
                log.warning("%s ended in a partial line (%d bytes from byte %d, starting %r), left by a process "
                            "killed while writing it: dropped", self.path, size - end, end, torn)

    def unsent(self) -> int:
        """Number of complete lines (operations) not sent yet; counted without parsing, so it never raises."""
        if not self.path.is_file():
            return 0
        with self.path.open("rb") as lines:
            lines.seek(self.state()["offset"])
            return sum(1 for line in lines if line.endswith(b"\n"))

    def archive(self) -> Path:
        """Move this journal aside (a fresh run starts its own) and return where it went."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.folder.with_name(f"{self.folder.name}-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.folder.with_name(f"{self.folder.name}-{stamp}-{n}")
        self.folder.rename(target)
        return target
