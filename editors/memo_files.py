"""A score memo's sealed generations on disk (`ScoreMemo`): one safetensors file each, written once.

A memory editor writes each generation when a checkpoint first names it and a resumed run reads back the
ones its checkpoint names, so it looks up the very scores the uninterrupted run holds: a score computed
again would come from another batch and differ in its last bits. The tensors of a generation are packed
one flat tensor per field and dtype; the JSON metadata holds each entry's key, top-k and shapes.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from editors.adapter import Memoised, SpanScore
from memory.files import write_atomically
from memory.journal import JournalError

GATHER = "gather"  # the ids a score's log-probs were gathered at, beside the score's own fields
FIELDS = [*(field.name for field in fields(SpanScore)), GATHER]


def memo_path(folder: Path, generation: int) -> Path:
    """The file of one generation in `folder`."""
    return folder / f"{generation}.safetensors"


def save_generation(path: Path, values: dict[tuple, Memoised]) -> None:
    """Write one generation of memoised scores to `path`, atomically."""
    parts: dict[str, list[torch.Tensor]] = {}
    entries = []
    for key, (score, top_k, gather) in values.items():
        shapes = {}
        for name in FIELDS:
            tensor = gather if name == GATHER else getattr(score, name)
            if tensor is not None:
                packed = f"{name}/{str(tensor.dtype).removeprefix('torch.')}"
                parts.setdefault(packed, []).append(tensor.reshape(-1))
                shapes[name] = [packed, list(tensor.shape)]
        entries.append({"key": list(key), "top_k": top_k, "shapes": shapes})
    tensors = {name: torch.cat(tensors) for name, tensors in parts.items()}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata={"entries": json.dumps(entries)}))


def load_generation(path: Path) -> dict[tuple, Memoised]:
    """One generation as `save_generation` wrote it; JournalError when the file is missing or unreadable."""
    try:
        with safe_open(path, "pt") as handle:
            entries = json.loads(handle.metadata()["entries"])
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (OSError, KeyError, ValueError, SafetensorError) as error:
        raise JournalError(f"{path}: the checkpoint names this memo generation, but it cannot be read "
                           f"({error})") from None
    offsets = dict.fromkeys(tensors, 0)
    values: dict[tuple, Memoised] = {}
    for entry in entries:
        unpacked = {}
        for name, (packed, shape) in entry["shapes"].items():
            start, size = offsets[packed], math.prod(shape)
            unpacked[name] = tensors[packed][start : start + size].view(shape)
            offsets[packed] = start + size
        gather = unpacked.pop(GATHER, None)
        values[tuple(entry["key"])] = (SpanScore(**unpacked), entry["top_k"], gather)
    return values
