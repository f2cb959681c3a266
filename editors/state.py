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

    A crash leaves the old version or the new one, never a half-written mix.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    write(tmp)
    if tmp.is_dir() and path.is_dir():
        # Directories cannot be replaced in one rename: move the old one aside first.
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


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
        directory = Path(directory)
        if not (directory / META).is_file():
            raise FileNotFoundError(f"no editor state in {directory} (missing {META})")
        head = json.loads((directory / META).read_text())
        return cls(head["method"], head["meta"], load_file(str(directory / TENSORS)))
