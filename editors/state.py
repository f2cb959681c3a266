"""Editor state on disk: tensors in safetensors, everything else in JSON; never pickle."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

TENSORS = "state.safetensors"
META = "state.json"


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write a file or folder through a temporary sibling and a rename.

    A file is replaced in one rename. A folder cannot be: the old one is first renamed to
    `.<name>.old`, then the new one into place, then the old one is deleted. A crash between
    the two renames leaves the old folder at `.<name>.old`, where `current_folder` finds it,
    so readers always see the previous version or the new one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    write(tmp)
    if not tmp.is_dir():
        os.replace(tmp, path)
        return
    old = _old(path)
    if old.exists():
        shutil.rmtree(old)  # left by a crash; superseded by what is being written now
    if path.is_dir():
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def current_folder(path: str | Path) -> Path:
    """The folder to read: `path`, or its previous version while `path` is missing between the two renames
    of `write_atomically` (a crash there, or a writer right now). Reading never moves anything."""
    path = Path(path)
    return _old(path) if not path.exists() and _old(path).is_dir() else path


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _fsync_dir(folder: Path) -> None:
    """Make renames inside `folder` durable."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


@dataclass
class EditorState:
    """Everything an editor needs to resume: named tensors and JSON-serialisable metadata."""

    method: str
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def save(self, directory: str | Path) -> None:
        """Write `state.safetensors` and `state.json` into `directory`, atomically."""

        def write(tmp: Path) -> None:
            tmp.mkdir(parents=True)
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
            save_file(tensors, tmp / TENSORS)
            (tmp / META).write_text(json.dumps({"method": self.method, "meta": self.meta}, indent=2))

        Path(directory).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(directory, write)

    @classmethod
    def load(cls, directory: str | Path) -> EditorState:
        """Read a state written by `save`."""
        directory = current_folder(directory)
        if not (directory / META).is_file():
            raise FileNotFoundError(f"no editor state in {directory} (missing {META})")
        head = json.loads((directory / META).read_text())
        return cls(head["method"], head["meta"], load_file(str(directory / TENSORS)))
