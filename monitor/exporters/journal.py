"""A durable, append-only journal of tracking operations and how much of it has been sent.

The MLflow exporter writes every operation here first and sends from here, so a tracking
server that is down (or a process that is killed) loses nothing: what was not sent yet is
still in the journal and goes out on the next attempt, on `--resume`, or with
`simulate compare --sync DIR`. What the server refuses (a 4xx answer about the operation itself)
is not sent again: it goes to the dead letters beside the journal, with the server's answer.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from memory.files import append_jsonl, write_text_atomically

log = logging.getLogger(__name__)

OPERATIONS = "journal.jsonl"
STATE = "state.json"
DEAD_LETTERS = "dead_letter.jsonl"
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
            cut_torn_tail(self.path)
            self._whole = True
        append_jsonl(self.path, op)

    def size(self) -> int:
        """Bytes journaled so far: the `offset` state reaches once all of it is sent."""
        return self.path.stat().st_size if self.path.is_file() else 0

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

    def unsent(self) -> int:
        """Number of complete lines (operations) not sent yet; counted without parsing, so it never raises."""
        if not self.path.is_file():
            return 0
        with self.path.open("rb") as lines:
            lines.seek(self.state()["offset"])
            return sum(1 for line in lines if line.endswith(b"\n"))

    def archive(self) -> Path:
        """Move this journal aside (a fresh run starts its own) and return where it went."""
        target = _aside(lambda stamp: self.folder.with_name(f"{self.folder.name}-{stamp}"))
        self.folder.rename(target)
        return target


class DeadLetters:
    """Writes the tracking server rejected, one JSON line each in `folder/dead_letter.jsonl`, never sent again.

    A line is the journal operation cut down to what was rejected (one metric, param or tag of a
    batch; a whole operation otherwise) with the server's `status` and `message`, the journal byte
    `offset` of the operation it came from and its `part` number among that operation's rejections.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / DEAD_LETTERS

    def count(self) -> int:
        """Number of dead letters (complete lines); counted without parsing, so it never raises."""
        if not self.path.is_file():
            return 0
        with self.path.open("rb") as lines:
            return sum(1 for line in lines if line.endswith(b"\n"))

    def add(self, offset: int, letters: list[dict[str, Any]]) -> None:
        """Append the rejected parts of the journal operation at byte `offset`.

        A process killed after writing some of them, before it recorded the operation as sent,
        sends it again and is rejected again: the parts already here are not written twice.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cut_torn_tail(self.path)
        last = _last_line(self.path)
        done = 0
        if last is not None and (written := json.loads(last)).get("offset") == offset:
            done = written["part"] + 1
        for part in range(done, len(letters)):
            append_jsonl(self.path, {"offset": offset, "part": part, **letters[part]})

    def archive(self) -> Path | None:
        """Move the dead letters aside (the journal is sent anew elsewhere); where they went, None if none."""
        if not self.path.is_file():
            return None
        target = _aside(lambda stamp: self.path.with_name(f"{self.path.stem}-{stamp}{self.path.suffix}"))
        self.path.rename(target)
        return target


def _aside(named: Callable[[str], Path]) -> Path:
    """A path nothing holds yet: `named(stamp)` with the time now as stamp, else with `stamp-2`, `stamp-3` ..."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = named(stamp), 1
    while target.exists():
        n += 1
        target = named(f"{stamp}-{n}")
    return target


def cut_torn_tail(path: Path) -> None:
    """Cut a JSON-lines file back to its last newline: appending onto a partial line would merge two lines."""
    if not path.is_file():
        return
    with path.open("r+b") as handle:
        size = handle.seek(0, 2)
        end = _line_start(handle, size)
        if end < size:
            handle.seek(end)
            torn = handle.read(80)
            handle.truncate(end)
            log.warning("%s ended in a partial line (%d bytes from byte %d, starting %r), left by a process "
                        "killed while writing it: dropped", path, size - end, end, torn)


def _last_line(path: Path) -> bytes | None:
    """The last line of a file that ends with a newline; None when it is empty or missing."""
    if not path.is_file():
        return None
    with path.open("rb") as handle:
        size = handle.seek(0, 2)
        if size == 0:
            return None
        start = _line_start(handle, size - 1)
        handle.seek(start)
        return handle.read(size - start)


def _line_start(handle: BinaryIO, pos: int) -> int:
    """The byte after the last newline before byte `pos` (0 when there is none), read backwards in chunks."""
    while pos > 0:
        start = max(0, pos - TAIL_CHUNK)
        handle.seek(start)
        newline = handle.read(pos - start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        pos = start
    return 0
