"""General file helpers, on the bottom floor so every package shares them: atomic writes, publish by rename, JSONL.

Nothing here knows what it writes. Each helper leaves a reader the previous version or the new
one after a crash at any instant, never a half-written file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write a file or folder through a temporary sibling and a rename.

    A file is replaced in one rename. A folder cannot be: the old one is first renamed to
    `.<name>.old`, then the new one into place, then the old one is deleted. A crash between
    the two renames leaves the old folder at `.<name>.old`, where `current_folder` finds it,
    so readers always see the previous version or the new one; the next write puts its folder
    in place before deleting `.<name>.old`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    write(tmp)
    if not tmp.is_dir():
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_folder(path.parent)
        return
    old = _old(path)
    if path.is_dir():
        if old.exists():
            shutil.rmtree(old)  # left by a crash after `path` was whole again: superseded
        os.replace(path, old)
    # After a crash between the renames `path` is missing and `old` is the only whole version: it goes only after this.
    os.replace(tmp, path)
    fsync_folder(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomically(path: str | Path, text: str) -> None:
    """Replace a text file (UTF-8) in one rename."""
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def current_folder(path: str | Path) -> Path:
    """The folder to read: `path`, or its previous version while `path` is missing between the two renames
    of `write_atomically` (a crash there, or a writer right now). Reading never moves anything."""
    path = Path(path)
    return _old(path) if not path.exists() and _old(path).is_dir() else path


@contextmanager
def publishing(target: Path, ready: Callable[[Path], bool]) -> Iterator[Path]:
    """Build a folder in a temporary sibling (yielded) and publish it as `target` with one rename.

    When another process published `target` first (and `ready(target)` says it is complete),
    theirs is kept and ours discarded; the temporary folder never outlives the block.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError:
            if not ready(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class FolderLockedError(RuntimeError):
    """Another process holds the folder's lock."""


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold `folder`'s lock (an flock on `folder/.lock`) for the block; FolderLockedError when another process has it.

    The kernel drops the lock when its holder dies, so a killed run never leaves the folder locked.
    """
    import fcntl  # POSIX only, like the runs themselves

    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderLockedError(f"{folder} is in use by another process (a run, a --resume of it, or a probe "
                                    "job)") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_stale(folder: Path) -> list[Path]:
    """Delete the temporary files and folders `write_atomically` left in `folder` when its writer was killed.

    Only call this while holding the folder's lock: then no writer is at work there.
    """
    stale = [path for path in folder.glob(".*.tmp-*") if path.name.rsplit(".tmp-", 1)[-1].isdigit()]
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return stale


def jsonable(value: Any) -> Any:
    """`value` with NaN/Inf floats as None, so the files stay strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Add one JSON line (NaN/Inf as null) and flush it, so a crash loses at most the line being written."""
    with path.open("a", encoding="utf-8") as out:
        out.write(json.dumps(jsonable(row)) + "\n")


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a JSONL file (none when it is missing)."""
    if path.exists():
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                yield json.loads(line)


def fsync_tree(folder: Path) -> None:
    """Flush every file of a folder, and every folder's entries, to disk before it is renamed into place (survives
    power loss)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fsync_file(path)
        elif path.is_dir():
            fsync_folder(path)
    fsync_folder(folder)


def fsync_file(path: Path) -> None:
    """Flush a file's contents to disk."""
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def fsync_folder(folder: Path) -> None:
    """Make renames (and new entries) inside `folder` durable."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
