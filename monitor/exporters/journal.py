"""A durable, append-only journal of tracking operations and how much of it has been sent.

The MLflow exporter writes every operation here first and sends from here, so a tracking
server that is down (or a process that is killed) loses nothing: what was not sent yet is
still in the journal and goes out on the next attempt, on `--resume`, or with
`simulate compare --sync DIR`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

from editors.state import write_atomically

OPERATIONS = "journal.jsonl"
STATE = "state.json"


class Journal:
    """Operations as JSON lines in `folder/journal.jsonl`; `folder/state.json` records the sent offset."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / OPERATIONS
        self.state_path = folder / STATE

    def exists(self) -> bool:
        """Whether anything was ever journaled here."""
        return self.path.is_file()

    def append(self, op: dict[str, Any]) -> None:
        """Add one operation and flush it (a crash loses at most the line being written)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(op) + "\n")

    def state(self) -> dict[str, Any]:
        """What the sender knows: byte `offset` sent so far, the tracking `uri`, `run_id`, `experiment_id`."""
        if not self.state_path.is_file():
            return {"offset": 0}
        return json.loads(self.state_path.read_text(encoding="utf-8"))

    def save_state(self, state: dict[str, Any]) -> None:
        """Replace state.json atomically."""
        text = json.dumps(state, indent=2) + "\n"
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomically(self.state_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def pending(self, offset: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(end offset, operation) of every complete line after byte `offset`."""
        if not self.path.is_file():
            return
        with self.path.open("rb") as lines:
            lines.seek(offset)
            for line in lines:
                if not line.endswith(b"\n"):  # still being written
                    return
                offset += len(line)
                yield offset, json.loads(line)

    def unsent(self) -> int:
        """Number of complete operations not sent yet."""
        return sum(1 for _ in self.pending(self.state()["offset"]))

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
