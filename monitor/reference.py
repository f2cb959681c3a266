"""Pre-edit references: what the unedited model predicted on locality answer spans, stored compactly.

A full-logit cache would cost T x V floats per query (~1.3 MB for 10 tokens of a 32k
vocabulary); a reference keeps the top-k ids and log-probs of the answer span only, plus, for
VLKEB-compatible locality, the top ids at every position of the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file

from editors import SpanScore
from memory.files import write_atomically


@dataclass
class Reference:
    """The unedited model on one locality query's answer span (T tokens, top-k)."""

    topk_ids: torch.Tensor  # (T, k) int32
    topk_logprobs: torch.Tensor  # (T, k) float32
    sequence_topk_ids: torch.Tensor | None = None  # (L, k') int32, VLKEB-compatible locality only

    @classmethod
    def from_score(cls, score: SpanScore) -> Reference:
        """Keep the compact part of an unedited model's span score."""
        sequence = score.sequence_topk_ids
        # Copies: a score may be shared (editors' score memos), and a reference is saved on its own.
        return cls(
            topk_ids=score.topk_ids.to(torch.int32, copy=True),
            topk_logprobs=score.topk_logprobs.to(torch.float32, copy=True),
            sequence_topk_ids=None if sequence is None else sequence.to(torch.int32, copy=True),
        )

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors."""
        tensors = [self.topk_ids, self.topk_logprobs, self.sequence_topk_ids]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class ReferenceStore:
    """References by probe key (content hash), saved as one safetensors file."""

    def __init__(self) -> None:
        self._refs: dict[str, Reference] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._refs

    def __getitem__(self, key: str) -> Reference:
        return self._refs[key]

    def __setitem__(self, key: str, reference: Reference) -> None:
        self._refs[key] = reference

    def __len__(self) -> int:
        return len(self._refs)

    @classmethod
    def merged(cls, stores: Iterable[ReferenceStore]) -> ReferenceStore:
        """One store holding the references of all `stores` (keys are content hashes, so they agree)."""
        merged = cls()
        for store in stores:
            merged._refs.update(store._refs)
        return merged

    @property
    def nbytes(self) -> int:
        """Bytes held by all references' tensors."""
        return sum(ref.nbytes for ref in self._refs.values())

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flat named tensors (`{prefix}{key}.ids` ...), for safetensors files that hold several stores."""
        tensors = {}
        for key, ref in self._refs.items():
            tensors[f"{prefix}{key}.ids"] = ref.topk_ids.contiguous()
            tensors[f"{prefix}{key}.logprobs"] = ref.topk_logprobs.contiguous()
            if ref.sequence_topk_ids is not None:
                tensors[f"{prefix}{key}.sequence"] = ref.sequence_topk_ids.contiguous()
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> ReferenceStore:
        """The store whose tensors `to_tensors(prefix)` wrote (other names are ignored)."""
        store = cls()
        for name in tensors:
            if not name.startswith(prefix):
                continue
            key, _, kind = name[len(prefix) :].rpartition(".")
            if kind == "ids":
                base = f"{prefix}{key}"
                store[key] = Reference(tensors[name], tensors[f"{base}.logprobs"], tensors.get(f"{base}.sequence"))
        return store

    def save(self, path: str | Path) -> None:
        """Write as safetensors, atomically."""
        tensors = self.to_tensors()
        write_atomically(path, lambda tmp: save_file(tensors, tmp))

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStore:
        """Read a store written by `save`."""
        return cls.from_tensors(load_file(str(path)))
