"""Checkpoints of a run: editor state, stream position, RNG and everything measured so far.

A checkpoint is one folder written through a temporary sibling and a rename, so a crash at
any instant leaves the previous checkpoint or the new one. Append-only outputs (rounds,
quarantine, the pool of applied edits) are recorded by byte size and cut back to it on
resume, so nothing measured after the checkpoint is counted twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from editors import EditorState
from memory.files import current_folder, fsync_tree, write_atomically

FOLDER = "checkpoint"
META = "checkpoint.json"
TENSORS = "tensors.safetensors"
EDITOR = "editor"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed; the message says why."""


@dataclass
class Checkpoint:
    """What a run needs to continue: JSON-able progress, the editor's state and extra tensors."""

    progress: dict[str, Any]
    editor: EditorState
    tensors: dict[str, torch.Tensor]

    def save(self, out: Path) -> None:
        """Write into `out/checkpoint`, atomically."""

        def write(tmp: Path) -> None:
            tmp.mkdir(parents=True)
            self.editor.save(tmp / EDITOR)
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, tmp / TENSORS)
            (tmp / META).write_text(json.dumps({"version": VERSION, **self.progress}))
            fsync_tree(tmp)

        write_atomically(out / FOLDER, write)

    @classmethod
    def load(cls, out: Path) -> Checkpoint:
        """Read `out/checkpoint`; CheckpointError when there is none or it is from another version."""
        folder = current_folder(out / FOLDER)
        if not (folder / META).is_file():
            raise CheckpointError(f"no checkpoint in {out} to resume from (run without --resume to start anew)")
        progress = json.loads((folder / META).read_text())
        if progress.pop("version", None) != VERSION:
            raise CheckpointError(f"checkpoint in {out} was written by another editwatch version")
        return cls(progress, EditorState.load(folder / EDITOR), load_file(str(folder / TENSORS)))


def truncate(path: Path, size: int) -> None:
    """Cut an append-only file back to `size` bytes (what it held at the checkpoint)."""
    if not path.exists():
        if size:
            raise CheckpointError(f"{path} is missing but the checkpoint recorded {size} bytes of it")
        return
    if path.stat().st_size < size:
        raise CheckpointError(f"{path} is shorter than the checkpoint recorded ({size} bytes)")
    with path.open("r+b") as handle:
        handle.truncate(size)
