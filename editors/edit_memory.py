"""What memory-based editors (IKE, SERAC) share: image keys from the LVLM's own vision path, and a
memory of edits searched by multimodal key (`memory.VectorMemory`).

The image key is the vision path's per-token output (LLaVA: projector over the tower's patches;
BLIP-2: Q-Former; Qwen2-VL: patch merger), flattened so that *where* each feature sits is kept
(a creature's identity is the layout of its glyph cells; a mean over patches discards it),
and normalised. SERAC's `train` also fits a per-token discriminant projection on train-split images (see
`VisionKeys.fit`: a small key that ignores render jitter); IKE, which does not train, uses the
raw pooled feature.
Flat pooling needs one token layout for every image. LLaVA and BLIP-2 processors bring every
image to one resolution, so their keys embed the image as given. On dynamic-resolution families
(Qwen2-VL, Qwen2.5-VL, Qwen3-VL; LLaVA-NeXT / OneVision anyres; Idefics3 tiles) the token count
follows the image size, so every image is first resized (bicubic) to the family's key resolution,
chosen per model from its config and processor (`Family.key_image_size`; Qwen: a square of 16 x 16
merged patches brought into the processor's pixel range, as many tokens as Qwen-VL's 448-px
image). Images of any size, mixed in one batch, then get keys of one dimension, and the same
picture at two sizes gets nearly one key. Only the key is computed at that size: scoring still
sees each image at its own resolution.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from editors.adapter import LVLM, ScoreMemo, SpanScore
from editors.editor import (
    CanRetract,
    EditOutcome,
    Editor,
    EditRequest,
    HasJournal,
    HasMemory,
    Retrieval,
    ScoresUnedited,
    StateMismatchError,
    bypassing,
)
from editors.inputs import Query, image_digest
from editors.memo_files import OURS, load_generation, memo_path, open_path, save_generation
from editors.state import EditorState
from memory import (
    Change,
    JournalPosition,
    MemoryConfig,
    MemoryJournal,
    MultimodalKeys,
    TextEmbedder,
    VectorMemory,
    read_journal,
)
from memory.cache import LRUCache
from memory.files import fsync_folder

Pooling = Literal["flat", "mean"]
FEATURE_CACHE_BYTES = 256 * 2**20
MEMO = "memo"  # in a journal's folder: the score memo's files (`editors.memo_files`)


class KeyConfig(BaseModel):
    """How edits and queries become memory keys (shared by IKE and SERAC)."""

    model_config = ConfigDict(extra="forbid")

    pooling: Pooling = Field("flat", description="image tokens flattened (keeps layout) or averaged")
    image_weight: float = Field(
        0.5, ge=0.0, lt=1.0, description="share of the image in the key similarity: (1-w)·cos_text + w·cos_image"
    )
    memory: MemoryConfig = Field(default_factory=MemoryConfig, description="vector memory index settings")


class VisionKeys:
    """`memory.ImageEmbedder` over an LVLM's vision path: per-token features, optionally projected, unit-norm.

    `fit` learns a per-token linear discriminant (LDA) from images and pairs of images of one
    identity (an edit's image and its image rephrase): tokens are centred, whitened by the
    within-identity scatter (render jitter: colour, background, pose) and projected on the
    directions that best separate identities. Measured on the default world (250 held-out
    creatures, render 1 against render 0; outsiders: 150 creatures of the other split): raw
    projector tokens put same-creature cosines (2nd percentile 0.45) below outsiders' (98th
    percentile 0.50); 8 LDA directions per token (a 128-d key) give 0.86 against 0.52.
    """

    def __init__(self, lvlm: LVLM, pooling: Pooling = "flat") -> None:
        self.lvlm = lvlm
        self.pooling = pooling
        # (height, width) keys are embedded at; None when the processor already fixes the resolution.
        self.size = lvlm.family.key_image_size(lvlm.model.config, lvlm.inputs.image_processor)
        probe = [Image.new("RGB", (8, 8) if self.size is None else self.size[::-1])]
        self.token_dim = int(lvlm.embed_images(probe, pooling="mean").shape[1])
        self.tokens = int(lvlm.embed_images(probe, pooling=pooling).shape[1]) // self.token_dim
        # The vision path is frozen under a memory editor, so an image's features never change.
        self._features: LRUCache[np.ndarray] = LRUCache(FEATURE_CACHE_BYTES, lambda f: f.nbytes)
        self.center: np.ndarray | None = None  # (token_dim,)
        self.projection: np.ndarray | None = None  # (token_dim, components)

    @property
    def dim(self) -> int:
        """Key dimension: tokens x components when fitted, else the raw pooled feature size."""
        return self.tokens * (self.token_dim if self.projection is None else self.projection.shape[1])

    def _tokens(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Raw features (B, tokens, token_dim); each distinct image (by content) runs through the vision path once."""
        digests = [image_digest(image) for image in images]
        found = {d: f for d in dict.fromkeys(digests) if (f := self._features.get(d)) is not None}
        todo = {d: image for d, image in zip(digests, images) if d not in found}
        if todo:
            for digest, features in zip(todo, self._compute_tokens(list(todo.values()))):
                self._features.put(digest, features)
                found[digest] = features
        if not digests:
            return np.zeros((0, self.tokens, self.token_dim), np.float32)
        return np.stack([found[d] for d in digests])

    def _compute_tokens(self, images: list[Image.Image]) -> np.ndarray:
        """Raw features (B, tokens, token_dim) from the vision path."""
        if self.size is not None:
            height, width = self.size
            images = [image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC) for image in images]
        # One image per forward: a feature then depends on the image alone, not on what it was batched with, so
        # the cache can outlive checkpoints and a resumed run still computes bit for bit what the first one did.
        x = np.concatenate([self.lvlm.embed_images([image], pooling=self.pooling).numpy() for image in images])
        x = x.astype(np.float32)
        if x.shape[1] != self.tokens * self.token_dim:
            family = self.lvlm.family
            raise ValueError(
                f"{family.name}: an image gave {x.shape[1] // self.token_dim} image tokens where keys expect "
                f"{self.tokens}; a family whose token count follows the image size must declare key_image_size"
            )
        return x.reshape(len(x), self.tokens, self.token_dim)

    def fit(
        self,
        images: Sequence[Image.Image],
        pairs: Sequence[tuple[Image.Image, Image.Image]],
        components: int,
        ridge: float = 0.01,
    ) -> None:
        """Learn the centre and a `components`-direction LDA per token (Fisher: total vs within-pair scatter).

        Without pairs the within scatter is the identity, and this is PCA. `ridge` adds that
        fraction of the mean within-variance to its diagonal, so rare directions are not blown up.
        """
        if not 0 < components <= self.token_dim:
            raise ValueError(f"components must be in 1..{self.token_dim}, got {components}")
        x = self._tokens(images).reshape(-1, self.token_dim).astype(np.float64)
        center = x.mean(0)
        total = np.cov(x - center, rowvar=False, bias=True).reshape(self.token_dim, self.token_dim)
        within = np.eye(self.token_dim)
        if pairs:
            a, b = (self._tokens([p[i] for p in pairs]).reshape(-1, self.token_dim).astype(np.float64) for i in (0, 1))
            diff = a - b  # each pair's difference holds twice the within-identity variance
            within = diff.T @ diff / (2 * len(diff))
        within += ridge * np.trace(within) / self.token_dim * np.eye(self.token_dim)
        values, vectors = np.linalg.eigh(within)
        whiten = vectors / np.sqrt(values)  # whiten.T @ within @ whiten = I
        spread, directions = np.linalg.eigh(whiten.T @ total @ whiten)
        basis = whiten @ directions[:, np.argsort(spread)[::-1][:components]]
        basis *= np.sign(basis[np.abs(basis).argmax(0), np.arange(components)])  # fixed signs: deterministic
        self.center = center.astype(np.float32)
        self.projection = np.ascontiguousarray(basis, dtype=np.float32)

    def embed(self, images: Sequence[Any]) -> np.ndarray:
        """Unit-norm keys (N, dim) of `images`."""
        x = self._tokens(images)
        if self.projection is not None:
            x = (x - self.center) @ self.projection
        x = x.reshape(len(x), -1)
        return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)


@lru_cache(maxsize=1)
def shared_text_embedder() -> TextEmbedder:
    """One MiniLM per process, loaded now: loading it costs seconds, and its text cache helps every editor.

    Loaded here rather than at the first text, since a memory editor embeds at its first edit anyway: so a run
    freezes MiniLM's objects with the rest of its set-up (`simulator.run._frozen_heap`)."""
    embedder = TextEmbedder()
    embedder.load()
    return embedder


# The image of an edit saved before edits kept their image's digest: never the same fact as any edit made now.
UNKNOWN_IMAGE = "unknown"


@dataclass(frozen=True)
class StoredEdit:
    """An edit as memory editors keep it: its question, new answer, stream key and image digest."""

    prompt: str
    target: str
    key: str
    image: str | None = None  # `image_digest` of the edit's image; None: a text-only edit

    @classmethod
    def of(cls, edit: EditRequest) -> StoredEdit:
        """What the memory keeps of `edit`."""
        return cls(edit.prompt, edit.target, edit.key, None if edit.image is None else image_digest(edit.image))

    @property
    def fact(self) -> tuple[str, str | None]:
        """What an edit of the same fact shares: the question and the image's content."""
        return self.prompt, self.image

    def row(self) -> list[str | None]:
        """The edit as JSON data (states and journals)."""
        return [self.prompt, self.target, self.key, self.image]


class EditMemory:
    """Edits under multimodal keys: add (newest edit of a fact wins), retract, nearest edits of queries, state round
    trip, and the changes since the last journal write (`memory.MemoryJournal`)."""

    def __init__(self, vision: VisionKeys, config: KeyConfig) -> None:
        self.config = config
        self.vision = vision
        self.keys = MultimodalKeys(shared_text_embedder(), vision, config.image_weight)
        self.memory = VectorMemory(self.keys.dim, config.memory)
        self.edits: dict[int, StoredEdit] = {}
        self.facts: dict[tuple[str, str | None], int] = {}  # fact -> the entry holding it
        self.text_only = 0  # edits without an image (see `route`)
        # Stream key -> the live entries given that key, oldest first (ids only grow): a key given to two facts names
        # its newest live edit, in a live memory and in one restored from a state alike.
        self.keyed: dict[str, list[int]] = {}
        # Changes since the last journal write; None: not journaled yet or replaced since (the next write compacts).
        self.changes: list[Change] | None = None

    @classmethod
    def for_model(cls, lvlm: LVLM, config: KeyConfig) -> EditMemory:
        """An empty memory keyed by `lvlm`'s vision path and MiniLM."""
        return cls(VisionKeys(lvlm, config.pooling), config)

    def empty_copy(self) -> EditMemory:
        """A memory with the same keys (vision path, centre) and no edits, e.g. for calibration."""
        return EditMemory(self.vision, self.config)

    def embed(self, queries: Sequence[Query | EditRequest]) -> np.ndarray:
        """Keys (N, dim) of queries or edits (their prompt and image)."""
        return self.keys.embed([q.prompt for q in queries], [q.image for q in queries])

    def add(self, edit: EditRequest) -> tuple[int, StoredEdit | None]:
        """Store one edit; returns its memory id and the older edit of the same fact it replaced (None: a new fact).

        A fact edited again (same question, same image content) keeps only its newest answer: the memory holds one
        entry per live fact, and retrieval cannot return the stale answer through a tie.
        """
        stored = StoredEdit.of(edit)
        vector = self.embed([edit])
        entry = int(self.memory.add(vector)[0])  # added before the old entry goes: a failed add changes nothing
        if self.changes is not None:  # in the order the memory changed: a replay then rebuilds the same index
            self.changes.append(Change(entry, vector[0], stored.row()))
        older = self.facts.get(stored.fact)
        replaced = None if older is None else self._remove(older)
        self.edits[entry] = stored
        self.text_only += stored.image is None
        self.facts[stored.fact] = entry
        self.keyed.setdefault(stored.key, []).append(entry)
        return entry, replaced

    def retract(self, key: str) -> StoredEdit | None:
        """Delete the edit with stream key `key`; returns it, or None when no entry holds it."""
        entries = self.keyed.get(key)
        return None if not entries else self._remove(entries[-1])

    def holder(self, edit: EditRequest) -> int | None:
        """The entry holding `edit`'s fact (its newest edit), if any."""
        return self.facts.get(StoredEdit.of(edit).fact)

    def _remove(self, entry: int) -> StoredEdit:
        self.memory.remove([entry])
        stored = self.edits.pop(entry)
        self.text_only -= stored.image is None
        if self.facts.get(stored.fact) == entry:
            del self.facts[stored.fact]
        entries = self.keyed[stored.key]
        entries.remove(entry)
        if not entries:
            del self.keyed[stored.key]
        if self.changes is not None:
            self.changes.append(Change(entry))
        return stored

    def nearest(self, queries: Sequence[Query], k: int) -> tuple[np.ndarray, list[list[StoredEdit]]]:
        """Scores (Q, k') and up to k' = min(k, size) nearest edits of each query, best first.

        An IVF index scans only `nprobe` lists, so a row may hold fewer edits than k'; its
        missing places score -inf.
        """
        if not self.edits or not queries:
            return np.zeros((len(queries), 0), np.float32), [[] for _ in queries]
        found = self.memory.search(self.embed(queries), min(k, len(self.edits)))
        present = found.ids >= 0  # FAISS pads short rows with id -1
        scores = np.where(present, found.scores, np.float32(-np.inf))
        return scores, [[self.edits[int(i)] for i in row[keep]] for row, keep in zip(found.ids, present)]

    def reset(self) -> None:
        """Forget every edit; the image centre and projection stay (they are trained parts)."""
        self.keys = MultimodalKeys(self.keys.text, self.vision, self.config.image_weight)  # dim follows a new fit
        self.memory = VectorMemory(self.keys.dim, self.config.memory, self.memory.stats)
        self.edits, self.facts, self.keyed, self.changes, self.text_only = {}, {}, {}, None, 0

    def route(
        self, queries: Sequence[Query], threshold: float | None, count: bool = True, scored: bool = True
    ) -> list[tuple[StoredEdit | None, float]]:
        """Top-1 edit of each query and its score; the edit is None below `threshold` (None: all route).

        With `count`, the routing is counted as hits and misses in the memory's statistics.
        Without `scored` only the edits matter: a query without an image scores at most
        sqrt(1 - image_weight) against an edit with one (`memory.MultimodalKeys`), so while every
        stored edit has an image and the threshold is above that bound, such a query is out of
        scope without being embedded or searched (its score is then -inf).
        """
        bound = math.sqrt(1 - self.config.image_weight)
        blind = not scored and threshold is not None and not self.text_only and threshold > bound
        asked = [i for i, query in enumerate(queries) if not (blind and query.image is None)]
        scores, edits = self.nearest([queries[i] for i in asked], 1)
        out: list[tuple[StoredEdit | None, float]] = [(None, float("-inf"))] * len(queries)
        for i, row, found in zip(asked, scores, edits):
            hit = bool(found) and (threshold is None or row[0] >= threshold)
            out[i] = (found[0] if hit else None, float(row[0]) if found else float("-inf"))
        if count:
            self.count_routing([edit is not None for edit, _ in out])
        return out

    def count_routing(self, routed: Sequence[bool]) -> None:
        """Count queries answered with an edit (hits) and without one (misses) in the memory's statistics."""
        hits = sum(routed)
        self.memory.stats.record_routing(hits=hits, misses=len(routed) - hits)

    def retrievals(self, queries: Sequence[Query], threshold: float | None) -> list[Retrieval]:
        """`route` as the Editor contract reports it: the stream key of each query's edit, or None."""
        # Not counted: probes that look where queries would go are not the routing `score` does.
        routes = self.route(queries, threshold, count=False)
        return [Retrieval(edit.key if edit else None, score) for edit, score in routes]

    def save_into(self, state: EditorState) -> None:
        """Put the memory (FAISS-serialised), the edits and the image centre into an editor state."""
        blob, manifest = self.memory.to_bytes()
        state.tensors["memory.index"] = torch.from_numpy(blob)
        self._save_keys(state)
        ids = sorted(self.edits)
        state.meta["memory"] = {
            "manifest": manifest,
            "ids": ids,
            "edits": [self.edits[i].row() for i in ids],
            "counters": self.memory.stats.counters(),  # hits and misses of `score`'s routing continue on resume
        }

    def save_journaled(self, state: EditorState, journal: MemoryJournal) -> None:
        """Write the changes since the last call into `journal` and put its position and the image centre into a state.

        The state holds no entry: `whole_state` reads them back from the journal.
        """
        position = journal.write(self.memory, self.changes, lambda: {i: e.row() for i, e in self.edits.items()})
        self.changes = []
        self._save_keys(state)
        state.meta["memory"] = {"journal": position.model_dump(), "counters": self.memory.stats.counters()}

    def resume_journal(self, state: EditorState, journal: MemoryJournal) -> None:
        """Continue `journal` from the position in `state`, a `whole_state` this memory was just loaded from."""
        position = state.meta["memory"].get("journal")
        if position is not None:  # else a checkpoint written whole (before journals): the next write compacts
            journal.resume(JournalPosition.model_validate(position), self.memory)
            self.changes = []

    @staticmethod
    def whole_state(state: EditorState, folder: Path) -> EditorState:
        """A `save_journaled` state with its memory read from the journal in `folder`, as `save_into` writes it."""
        saved = state.meta.get("memory", {})
        if "journal" not in saved or "manifest" in saved:
            return state
        memory, rows = read_journal(folder, JournalPosition.model_validate(saved["journal"]))
        blob, manifest = memory.to_bytes()
        ids = sorted(rows)
        whole = {**saved, "manifest": manifest, "ids": ids, "edits": [rows[i] for i in ids]}  # the position stays
        return EditorState(state.method, {**state.meta, "memory": whole},
                           {**state.tensors, "memory.index": torch.from_numpy(blob)})

    def _save_keys(self, state: EditorState) -> None:
        if self.vision.center is not None:
            state.tensors["keys.image_center"] = torch.from_numpy(self.vision.center)
        if self.vision.projection is not None:
            state.tensors["keys.image_projection"] = torch.from_numpy(self.vision.projection)

    def load_from(self, state: EditorState) -> None:
        """Restore what `save_into` wrote."""
        saved = state.meta["memory"]
        if "manifest" not in saved:  # a run's checkpoint/editor folder, read on its own
            raise StateMismatchError("this editor state keeps its memory in the journal beside its run's checkpoint: "
                                     "resume the run, or read the whole state with the checkpoint (Checkpoint.load)")
        center, projection = state.tensors.get("keys.image_center"), state.tensors.get("keys.image_projection")
        self.vision.center = None if center is None else center.numpy().astype(np.float32)
        self.vision.projection = None if projection is None else projection.numpy().astype(np.float32)
        self.keys = MultimodalKeys(self.keys.text, self.vision, self.config.image_weight)
        self.memory = VectorMemory.from_bytes(state.tensors["memory.index"].numpy(), saved["manifest"], self.memory.stats)
        if "counters" in saved:  # states written before the counters were kept start them anew
            self.memory.stats.restore(saved["counters"])
        # Rows of states saved before edits kept their image's digest have three fields.
        self.edits = {int(i): StoredEdit(*row) if len(row) == 4 else StoredEdit(*row, image=UNKNOWN_IMAGE)
                      for i, row in zip(saved["ids"], saved["edits"])}
        if set(self.edits) != set(self.memory.ids().tolist()):
            raise ValueError("editor state is inconsistent: its edit list and its memory index hold different ids")
        self.facts = {edit.fact: entry for entry, edit in self.edits.items()}
        self.keyed = {}
        for entry in sorted(self.edits):
            self.keyed.setdefault(self.edits[entry].key, []).append(entry)
        self.text_only = sum(edit.image is None for edit in self.edits.values())
        self.changes = None


class MemoryEditor(Editor, HasMemory, CanRetract, HasJournal, ScoresUnedited):
    """An editor that keeps edits in an `EditMemory` and rewrites prompts instead of weights.

    Subclasses say how a query is rewritten (`_prompted`) and what they learn (`_trained`). An edit of a fact
    already held replaces it (the newest answer wins), `retract` deletes one, and checkpoints journal the memory.
    """

    def __init__(self, lvlm: LVLM, config: BaseModel | dict[str, Any] | None = None) -> None:
        super().__init__(lvlm, config)
        self.edits = EditMemory.for_model(lvlm, self.config)
        self._bypass = False
        self._journal: MemoryJournal | None = None  # where checkpoints write the memory's changes (`journal_state`)
        self._memo = ScoreMemo()  # the weights never change under a memory editor: a query asked again is looked up
        self._memo_written: set[int] = set()  # sealed memo generations on disk in the journal's folder
        self._memo_named: dict[str, Any] = {}  # the memo files the last checkpoint names (`journal_state`)

    @abstractmethod
    def _prompted(self, queries: Sequence[Query]) -> list[Query]:
        """The queries as the model sees them with the edits in memory."""

    def _trained(self) -> dict[str, Any]:
        """JSON-serialisable trained parts, restored by `_restore_trained`."""
        return {}

    def _restore_trained(self, meta: dict[str, Any]) -> None:
        """Restore what `_trained` returned."""

    def apply(self, edit: EditRequest) -> EditOutcome:
        """Store the edit in memory, in place of an older edit of the same fact; the model's weights are not touched."""
        _, replaced = self.edits.add(edit)
        held = f"{len(self.edits.edits)} edits in memory"
        if replaced is None:
            return EditOutcome(applied=True, message=held)
        return EditOutcome(applied=True, message=f"replaced edit {replaced.key!r} of the same fact; {held}")

    def retract(self, key: str) -> EditOutcome:
        """Delete the edit `key` from memory.

        Retracting the newest edit of a fact edited again removes the fact: the older answer does not come back,
        because the newer edit replaced it.
        """
        if self.edits.retract(key) is None:
            return EditOutcome(applied=False, message=f"{self.name} holds no edit {key!r} to retract (never applied, "
                               "retracted already, or replaced by a newer edit of the same fact)")
        return EditOutcome(applied=True, message=f"retracted edit {key!r}; {len(self.edits.edits)} edits in memory")

    def score(self, queries: Sequence[Query], **kwargs: Any) -> list[SpanScore]:
        """Scores of the rewritten queries; the answer span is the query's own (see `LVLM.score`)."""
        return self.score_mixed(queries, [False] * len(queries), **kwargs)

    def score_mixed(self, queries: Sequence[Query], unedited: Sequence[bool], **kwargs: Any) -> list[SpanScore]:
        """Scores of the queries, rewritten unless `unedited[i]` (the base model unprompted), in one `LVLM.score`."""
        if len(unedited) != len(queries):
            raise ValueError(f"unedited has {len(unedited)} flags for {len(queries)} queries")
        edited = [i for i, flag in enumerate(unedited) if not flag]
        asked = list(queries)
        if not self._bypass:
            for i, query in zip(edited, self._prompted([queries[i] for i in edited])):
                asked[i] = query
        return self.lvlm.score(asked, memo=self._memo, **kwargs)

    @contextmanager
    def unedited(self) -> Iterator[None]:
        """Bypass the memory inside the block: the base model answers every query unprompted."""
        with bypassing(self):
            yield

    def clear_caches(self, keep_saved: bool = False) -> None:
        """Forget image prefixes and memoised scores (see `Editor.clear_caches`); with `keep_saved` the scores stay:
        a checkpoint saves them all (`journal_state`). Image keys stay, as they depend on the image alone."""
        self._memo.prefixes.clear()
        if not keep_saved:
            self._memo.scores.clear()

    def memory_size(self) -> int:
        """Number of edits in memory."""
        return len(self.edits.edits)

    def retrieval_stats(self) -> dict[str, float]:
        """The edit memory's search latency (p50/p99, seconds), hits and misses of `score`'s routing, rebuilds.

        Latency counts every search of the memory, probes' too. Counters run across `reset` (the
        memory keeps its `RetrievalStats`); `load_state` starts new ones with the restored memory.
        """
        # Latency quantiles are upper bounds of histogram buckets (`StatsSnapshot.latency_quantile`).
        return self.edits.memory.snapshot().summary()

    def state(self) -> EditorState:
        """Config, trained parts, image centre and the memory of edits."""
        state = self._new_state(self._trained())
        self.edits.save_into(state)
        return state

    def load_state(self, state: EditorState) -> None:
        """Restore a `state()`, memory and trained parts included."""
        self._check_state(state)
        self.config = self.Config.model_validate(state.meta["config"])
        self._restore_trained(state.meta)
        self.edits = EditMemory.for_model(self.lvlm, self.config)  # keys follow the saved config
        self.edits.load_from(state)

    def reset(self) -> None:
        """Forget every edit; trained parts (threshold, image centre) stay."""
        self.edits.reset()

    def journal_state(self, folder: Path) -> EditorState:
        """Config, trained parts, image centre and the journal's position; the memory's changes go to the journal."""
        if self._journal is None or self._journal.folder != Path(folder):
            self._journal, self._memo_written = MemoryJournal(folder), set()
        state = self._new_state(self._trained())
        self.edits.save_journaled(state, self._journal)
        state.meta["memo"] = self._save_memo(Path(folder) / MEMO)
        return state

    def _save_memo(self, folder: Path) -> dict[str, Any]:
        """Write the score memo's sealed generations not yet on disk and a copy of its open one; what a resume reads."""
        sealed, opened, values = self._memo.scores.saved()
        if not folder.is_dir():
            folder.mkdir(parents=True)
            fsync_folder(folder.parent)
        for generation in sealed.keys() - self._memo_written:
            save_generation(memo_path(folder, generation), sealed[generation])
        self._memo_written = set(sealed)
        save = self._memo_named.get("open", 0) + 1
        save_generation(open_path(folder, save), values)
        self._memo_named = {"generations": list(sealed), "opened": opened, "open": save}
        return self._memo_named

    def journal_committed(self) -> None:
        """Older journal generations, and memo generations the checkpoint does not name, can go."""
        if self._journal is not None:
            self._journal.commit()
            self._drop_memo_files(self._journal.folder / MEMO)

    def resume_journal(self, state: EditorState, folder: Path) -> None:
        """Continue the journal in `folder` from the position of `state` (loaded just before by `load_state`), with
        the score memo the checkpoint saved; what was written after the checkpoint goes."""
        self._journal = MemoryJournal(folder)
        self.edits.resume_journal(state, self._journal)
        memo = Path(folder) / MEMO
        saved = state.meta.get("memo")  # none in checkpoints written before the memo was kept
        if saved is None:
            self._memo.clear()
            self._memo_named, self._memo_written = {}, set()
        else:
            sealed = {g: load_generation(memo_path(memo, g)) for g in saved["generations"]}
            self._memo.restore(sealed, saved["opened"], load_generation(open_path(memo, saved["open"])),
                               self.lvlm.model, self.lvlm.inputs.form())
            self._memo_named, self._memo_written = dict(saved), set(sealed)
        self._drop_memo_files(memo)

    def _drop_memo_files(self, folder: Path) -> None:
        """Delete the memo's files in `folder` that the last checkpoint does not name (a killed write's too)."""
        keep = {memo_path(folder, g).name for g in self._memo_named.get("generations", [])}
        if self._memo_named:
            keep.add(open_path(folder, self._memo_named["open"]).name)
        for path in folder.iterdir() if folder.is_dir() else ():
            if path.name not in keep and OURS.match(path.name):
                path.unlink()

    @classmethod
    def whole_state(cls, state: EditorState, folder: Path) -> EditorState:
        """A `journal_state` with the memory read from the journal in `folder`; a whole state as it is."""
        return EditMemory.whole_state(state, folder)
