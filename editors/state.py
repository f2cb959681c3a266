"""Editor state on disk: tensors in safetensors, everything else in JSON; never pickle."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from memory.files import current_folder, write_atomically

TENSORS = "state.safetensors"
META = "state.json"


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
