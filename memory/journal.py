"""A vector memory checkpointed incrementally: snapshots, and an append-only log of the changes between them.

Saving a memory of N entries whole at every checkpoint costs O(N). A journal keeps, in one folder:
- `snapshot-<g>/`: the memory at one moment (`VectorMemory.save`, plus each entry's JSON payload), written
  through a temporary sibling and a rename (`write_atomically`);
- `log-<g>.bin`: the changes since that snapshot, appended: an entry added (its key as it was given to
  `VectorMemory.add`, and its payload) or removed.

A checkpoint records a `JournalPosition`: the generation g and the log's byte length, as it records the run's
other append-only files. Reading a position loads snapshot g and replays exactly the log's first `log_bytes`
bytes, one change at a time as they were made, so it rebuilds the same index (same ids, same storage order,
same search results); whatever was appended after the checkpoint (a write killed midway included) is ignored,
and a resumed writer cuts it off. A compaction (snapshot g+1, empty log) replaces appending when the log would
outgrow its snapshot (replay stays O(N), and each change is rewritten O(1) times on average) and after the
index was rebuilt (a rebuild in the background depends on timing that a replay cannot reproduce; the snapshot
keeps the rebuilt index itself). Other generations are deleted only once a checkpoint naming the new one is
written (`commit`), and a new writer numbers its first snapshot past every generation in the folder: a crash at
any instant leaves the generation the last checkpoint names intact, and a half-written snapshot is a temporary
folder no checkpoint names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from memory.files import fsync_folder, fsync_tree, write_atomically
from memory.index import IndexPlan
from memory.stats import RetrievalStats
from memory.store import VectorMemory

ENTRIES = "entries.json"  # in a snapshot: {"ids": [...], "payloads": [...]}, in the same order
ADD, REMOVE = 1, 2
HEADER = struct.Struct("<BqII")  # kind (ADD / REMOVE), entry id, key bytes, payload bytes; then key, payload
CHECK = struct.Struct("<I")  # CRC-32 of header and body: a record that does not match it is damage, not a change
# Every name a journal writes at its top level: snapshots (and write_atomically's temporary and old copies), logs.
OURS = re.compile(r"^\.?(?:snapshot-(\d+)|log-(\d+)\.bin)(?:\.tmp-\d+|\.old)?$")


class JournalError(ValueError):
    """A journal that does not hold what a position names; the message says what is wrong."""


class JournalPosition(BaseModel):
    """Where a checkpoint left a journal: the snapshot generation, and how many log bytes after it count."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    generation: int = Field(ge=1, description="the snapshot (snapshot-<g>) and its log (log-<g>.bin)")
    log_bytes: int = Field(ge=0, description="length of the log at the checkpoint; what follows is ignored")


@dataclass(frozen=True)
class Change:
    """One change of a memory: an entry added (its key and a JSON-serialisable payload), or removed."""

    entry: int
    vector: np.ndarray | None = None  # (D,) float32 as given to `VectorMemory.add`; None: the entry was removed
    payload: Any = None


class MemoryJournal:
    """Writes a memory's changes into a folder: a snapshot, then logs appended to it, now and then a new snapshot."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.position: JournalPosition | None = None  # of the last write; None: nothing written yet
        self._snapshot_bytes = 0
        self._plan: IndexPlan | None = None  # the index plan at the last write: another plan means a rebuild

    def resume(self, position: JournalPosition, memory: VectorMemory) -> None:
        """Continue after `position`, where `memory` (read from it by `read_journal`) stands.

        The log is cut back to the recorded length and every other generation is deleted: no checkpoint names them.
        """
        log = _log(self.folder, position.generation)
        _check_length(log, position.log_bytes)
        with log.open("r+b") as handle:
            handle.truncate(position.log_bytes)
            os.fsync(handle.fileno())
        self.position, self._plan = position, memory.plan
        self._snapshot_bytes = _bytes(_snapshot(self.folder, position.generation))
        self.commit()

    def write(
        self, memory: VectorMemory, changes: Sequence[Change] | None, payloads: Callable[[], dict[int, Any]]
    ) -> JournalPosition:
        """Record `memory` as it is now and return the position to checkpoint.

        `changes` (since the last write) are appended to the log; a new snapshot (with `payloads()`, every live
        entry's payload by id) is written instead on the first write, when `changes` is None (not known: the
        memory was replaced), after an index rebuild, or when the log would outgrow its snapshot.
        """
        memory.wait()  # a rebuild in flight finishes first, so the plan compared below is the one searches will use
        if changes is not None and self.position is not None and memory.plan == self._plan:
            records = b"".join(_encoded(change) for change in changes)
            if self.position.log_bytes + len(records) <= self._snapshot_bytes:
                return self._append(self.position, records)
        return self._compact(memory, payloads())

    def commit(self) -> None:
        """The last write is now in a checkpoint: delete every other generation, and leftovers of dead writers."""
        if self.position is None or not self.folder.is_dir():
            return
        keep = {_snapshot(self.folder, self.position.generation).name, _log(self.folder, self.position.generation).name}
        for path in self.folder.iterdir():
            if path.name not in keep and OURS.match(path.name):
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def _append(self, position: JournalPosition, records: bytes) -> JournalPosition:
        generation, start = position.generation, position.log_bytes
        if records:
            with _log(self.folder, generation).open("r+b") as handle:
                handle.seek(start)
                handle.write(records)
                handle.truncate()  # whatever a failed write left past `start` goes
                handle.flush()
                os.fsync(handle.fileno())  # on disk before the checkpoint that records its length
        self.position = JournalPosition(generation=generation, log_bytes=start + len(records))
        return self.position

    def _compact(self, memory: VectorMemory, payloads: dict[int, Any]) -> JournalPosition:
        # A new writer numbers past whatever the folder holds: it never overwrites a generation a checkpoint may name.
        generation = 1 + (self.position.generation if self.position else max(_generations(self.folder), default=0))
        ids = memory.ids().tolist()

        def write(tmp: Path) -> None:
            tmp.mkdir(parents=True)
            memory.save(tmp)
            (tmp / ENTRIES).write_text(json.dumps({"ids": ids, "payloads": [payloads[i] for i in ids]}))
            fsync_tree(tmp)

        self.folder.mkdir(parents=True, exist_ok=True)
        snapshot = _snapshot(self.folder, generation)
        write_atomically(snapshot, write)
        with _log(self.folder, generation).open("wb") as handle:
            os.fsync(handle.fileno())
        fsync_folder(self.folder)  # the new log's entry too: a checkpoint will name it
        self.position = JournalPosition(generation=generation, log_bytes=0)
        self._snapshot_bytes, self._plan = _bytes(snapshot), memory.plan
        return self.position


def read_journal(
    folder: str | Path, position: JournalPosition, stats: RetrievalStats | None = None
) -> tuple[VectorMemory, dict[int, Any]]:
    """The memory and every live entry's payload at `position`; reads only, so a running writer is not disturbed."""
    folder = Path(folder)
    snapshot = _snapshot(folder, position.generation)
    if not (snapshot / ENTRIES).is_file():
        raise JournalError(f"{folder} holds no snapshot {position.generation} (missing {snapshot.name}/{ENTRIES})")
    # A snapshot is whole once its folder has its name; what fails here was damaged since (or removed under us).
    try:
        memory = VectorMemory.load(snapshot, stats)
        entries = json.loads((snapshot / ENTRIES).read_text())
        payloads = dict(zip(entries["ids"], entries["payloads"], strict=True))
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as error:  # FAISS: RuntimeError
        raise JournalError(f"{snapshot} cannot be read: {type(error).__name__}: {error}") from error
    log = _log(folder, position.generation)
    # One call per change, as they were made: batching adds would change FAISS's arithmetic (BLAS past 20 queries
    # when an IVF index assigns lists), and with it, on near ties, which list a key lands in.
    for kind, entry, key, payload in _records(log, position.log_bytes):
        if kind == ADD:
            try:
                memory.add(np.frombuffer(key, dtype=np.float32)[None], ids=[entry])
            except ValueError as error:  # a key of another size, an id in use: not this memory's log
                raise JournalError(f"{log}: the log adds entry {entry}, which the memory cannot take: "
                                   f"{error}") from error
            payloads[entry] = json.loads(payload)
        elif entry not in payloads:  # a payload may be None itself
            raise JournalError(f"{folder}: the log removes entry {entry}, which the memory does not hold")
        else:
            del payloads[entry]
            memory.remove([entry])
    return memory, payloads


def _encoded(change: Change) -> bytes:
    key = b"" if change.vector is None else np.ascontiguousarray(change.vector, dtype=np.float32).tobytes()
    payload = b"" if change.vector is None else json.dumps(change.payload, separators=(",", ":")).encode()
    record = HEADER.pack(REMOVE if change.vector is None else ADD, change.entry, len(key), len(payload)) + key + payload
    return record + CHECK.pack(zlib.crc32(record))


def _check_length(log: Path, recorded: int) -> None:
    """JournalError unless `log` holds at least the `recorded` bytes its checkpoint names."""
    if not log.is_file():
        raise JournalError(f"{log} is missing; the checkpoint recorded {recorded} bytes of it")
    if (size := log.stat().st_size) < recorded:
        raise JournalError(f"{log} holds {size} bytes; the checkpoint recorded {recorded}")


def _records(log: Path, length: int) -> Iterator[tuple[int, int, bytes, bytes]]:
    """(kind, entry, key bytes, payload bytes) of each record in the log's first `length` bytes."""
    _check_length(log, length)
    offset = 0
    with log.open("rb") as handle:
        while offset < length:
            head = handle.read(HEADER.size)
            kind, entry, key_bytes, payload_bytes = HEADER.unpack(head) if len(head) == HEADER.size else (0, 0, 0, 0)
            end = offset + HEADER.size + key_bytes + payload_bytes + CHECK.size
            if kind not in (ADD, REMOVE) or end > length:
                raise JournalError(f"{log}: the record at byte {offset} is damaged or cut short: it does not end "
                                   f"within the {length} bytes recorded")
            body = handle.read(key_bytes + payload_bytes)
            if CHECK.unpack(handle.read(CHECK.size))[0] != zlib.crc32(head + body):
                raise JournalError(f"{log}: the record at byte {offset} is damaged (checksum mismatch)")
            yield kind, entry, body[:key_bytes], body[key_bytes:]
            offset = end


def _generations(folder: Path) -> list[int]:
    """Numbers of the generations whose files (whole or not) are in `folder`."""
    found = (OURS.match(path.name) for path in folder.iterdir()) if folder.is_dir() else ()
    return [int(match.group(1) or match.group(2)) for match in found if match]


def _snapshot(folder: Path, generation: int) -> Path:
    return folder / f"snapshot-{generation}"


def _log(folder: Path, generation: int) -> Path:
    return folder / f"log-{generation}.bin"


def _bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
