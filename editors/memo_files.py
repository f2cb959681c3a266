"""A score memo on disk (`ScoreMemo`): a safetensors file per sealed generation, written once, and a copy of the
open generation at each checkpoint.

A memory editor writes each sealed generation when a checkpoint first names it, and the open generation as it is
then, under a name of its own each time (the previous checkpoint's copy stays until the new checkpoint is written).
A resumed run reads back what its checkpoint names, so it looks up the very scores the uninterrupted run holds: a
score computed again would come from another batch and differ in its last bits. A generation is stored in columns
(`save_generation`); the JSON metadata holds each entry's key and top-k.
"""

from __future__ import annotations

import json
import re
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
OURS = re.compile(r"^\.?(?:open-)?\d+\.safetensors(?:\.tmp-\d+)?$")  # the files below, and their temporaries


def memo_path(folder: Path, generation: int) -> Path:
    """The file of one sealed generation in `folder`."""
    return folder / f"{generation}.safetensors"


def open_path(folder: Path, save: int) -> Path:
    """The file of the open generation as the `save`-th checkpoint found it."""
    return folder / f"open-{save}.safetensors"


def save_generation(path: Path, values: dict[tuple, Memoised]) -> None:
    """Write one generation of memoised scores to `path`, atomically.

    Columns, not an entry at a time: the tensors of a field that agree in dtype and in every dimension but the first
    are stacked along it, with the entries holding them and their lengths (a generation holds thousands of scores,
    and work per tensor would cost more than the write).
    """
    groups: dict[tuple, tuple[list[torch.Tensor], list[int]]] = {}
    keys, top_ks = [], []
    for row, (key, (score, top_k, gather)) in enumerate(values.items()):
        keys.append(key)
        top_ks.append(top_k)
        for name, tensor in zip(FIELDS, (*score.__dict__.values(), gather)):
            if tensor is not None:
                tensors, rows = groups.setdefault((name, tensor.dtype, tensor.shape[1:]), ([], []))
                tensors.append(tensor)
                rows.append(row)
    packed = {}
    for (name, dtype, rest), (tensors, rows) in groups.items():
        group = f"{name}/{str(dtype).removeprefix('torch.')}/{'x'.join(map(str, rest))}"
        packed[f"{group}/values"] = torch.cat(tensors)
        packed[f"{group}/rows"] = torch.tensor(rows)
        packed[f"{group}/lengths"] = torch.tensor([len(tensor) for tensor in tensors])
    metadata = {"keys": json.dumps(keys), "top_k": json.dumps(top_ks)}
    write_atomically(path, lambda tmp: save_file(packed, tmp, metadata=metadata))


def load_generation(path: Path) -> dict[tuple, Memoised]:
    """One generation as `save_generation` wrote it; JournalError when the file is missing or unreadable."""
    try:
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata()
            keys, top_ks = json.loads(metadata["keys"]), json.loads(metadata["top_k"])
            packed = {name: handle.get_tensor(name) for name in handle.keys()}
    except (OSError, KeyError, ValueError, SafetensorError) as error:
        raise JournalError(f"{path}: the checkpoint names this memo generation, but it cannot be read "
                           f"({error})") from None
    parts: list[dict[str, torch.Tensor]] = [{} for _ in keys]
    for name, stacked in packed.items():
        group, part = name.rsplit("/", 1)
        if part != "values":
            continue
        pieces = torch.split(stacked, packed[f"{group}/lengths"].tolist())
        for row, piece in zip(packed[f"{group}/rows"].tolist(), pieces):
            parts[row][group.split("/")[0]] = piece
    values: dict[tuple, Memoised] = {}
    for key, top_k, held in zip(keys, top_ks, parts):
        gather = held.pop(GATHER, None)
        values[tuple(key)] = (SpanScore(**held), top_k, gather)
    return values
