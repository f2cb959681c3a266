"""The Editor contract every editing method implements, and the edit request it receives."""

from __future__ import annotations

import hashlib
import json
import logging
import weakref
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
from PIL import Image
from pydantic import BaseModel

from editors.adapter import LVLM, SpanScore
from editors.inputs import Query
from editors.state import EditorState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EditRequest:
    """One edit: make the model answer `target` to `prompt` about `image`."""

    prompt: str
    target: str
    image: Image.Image | None = None
    ground_truth: str | None = None  # the pre-edit answer, when known
    key: str = ""  # stable id of the edit in its stream

    @property
    def query(self) -> Query:
        """The edit as a teacher-forced query for the new answer."""
        return Query(self.prompt, self.target, self.image)


@dataclass(frozen=True)
class EditExample:
    """A training example for methods that learn (MEND, KE, SERAC scope): an edit, queries it
    must change (its generality set, answered with the new target) and queries it must not
    (its locality set, answered as before)."""

    edit: EditRequest
    generality: tuple[Query, ...] = ()
    locality: tuple[Query, ...] = ()


@dataclass(frozen=True)
class Retrieval:
    """Where a memory-based editor routed one query: the key of an edit, or None (out of scope)."""

    key: str | None
    score: float  # similarity of the best memory entry (higher is closer)


@dataclass
class EditOutcome:
    """What one `apply` did: whether it took, which parameters moved and by how much."""

    applied: bool
    changed: dict[str, float] = field(default_factory=dict)  # parameter name -> Frobenius norm of the change
    message: str = ""


class Editor(ABC):
    """A knowledge-editing method bound to one LVLM.

    Edits accumulate across `apply` calls (sequential editing); `reset` returns to the
    unedited model (single editing applies, measures, resets). All scoring goes through
    `score`, so memory-based methods can route queries and parameter methods need not.
    """

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]
    trainable: ClassVar[bool] = False  # True: `train` must run on a train split before editing
    # Why `retract` refuses, completing "<name> cannot retract an edit: ..."; editors that can retract are `CanRetract`.
    cannot_retract: ClassVar[str] = "it keeps no record of which change each edit made"

    def __init__(self, lvlm: LVLM, config: BaseModel | dict[str, Any] | None = None) -> None:
        self.lvlm = lvlm
        self.model_identity = model_identity(lvlm)  # stamped into every state() as meta["model"]
        self.config = config if isinstance(config, self.Config) else self.Config.model_validate(config or {})

    @abstractmethod
    def apply(self, edit: EditRequest) -> EditOutcome:
        """Install one edit."""

    def retract(self, key: str) -> EditOutcome:
        """Undo the earlier edit with stream key `key`; this editor cannot, and says why (applied=False)."""
        return EditOutcome(applied=False, message=f"{self.name} cannot retract an edit: {self.cannot_retract}")

    def score(self, queries: Sequence[Query], **kwargs: Any) -> list[SpanScore]:
        """Teacher-forced answer-span scores of the edited model (see `LVLM.score`)."""
        return self.lvlm.score(queries, **kwargs)

    def clear_caches(self, keep_saved: bool = False) -> None:
        """Forget what the editor memoised from batches (scores): what it computes next depends on its state alone.

        Results of a batch differ from those of the same query in another batch in the last float
        bits, so a cache filled before a checkpoint would make the uninterrupted run and one resumed
        from that checkpoint differ. The timeline calls this when it is made, and with `keep_saved`
        when a run starts and after every checkpoint: what checkpoints save (and a resume restores)
        may then stay. What is computed one item at a time (image features and keys) may stay.
        Nothing to forget here.
        """

    def train(self, examples: Sequence[EditExample], progress: bool = True) -> dict[str, float]:
        """Fit what the method learns (hypernetwork, scope threshold) on a train split; returns a report.

        The trained parts belong to `state()`, and `reset()` keeps them.
        """
        return {}

    @contextmanager
    def unedited(self) -> Iterator[None]:
        """Inside the block the model answers as before any edit; the edits are back afterwards.

        Pre-edit references (locality, base accuracy) of records met mid-stream need the
        unedited model without a second copy of it. This default goes through `state()`;
        methods override it with something cheaper (swap the touched tensors, bypass memory).
        """
        saved = self.state()
        self.reset()
        try:
            yield
        finally:
            self.load_state(saved)

    @abstractmethod
    def state(self) -> EditorState:
        """Everything needed to rebuild the edited model from the unedited one."""

    @abstractmethod
    def load_state(self, state: EditorState) -> None:
        """Restore a state from `state()` onto the unedited model."""

    @abstractmethod
    def reset(self) -> None:
        """Undo every edit: back to the unedited model."""

    def _new_state(self, meta: dict[str, Any] | None = None, tensors: dict[str, torch.Tensor] | None = None) -> EditorState:
        """A state of this editor: the model it was made on and its config, plus the method's own parts."""
        base = {"model": self.model_identity, "config": self.config.model_dump(mode="json")}
        return EditorState(self.name, {**base, **(meta or {})}, tensors or {})

    def _check_state(self, state: EditorState) -> None:
        """Refuse a state of another method, or one trained on another model or prompt format."""
        if state.method != self.name:
            raise StateMismatchError(f"state was saved by method {state.method!r}, not {self.name!r}")
        check_model(state.meta.get("model"), self.model_identity)


class HasMemory(ABC):
    """Capability: the editor keeps edits in a memory that queries are routed through (SERAC, IKE, GRACE, WISE).

    Declared by inheriting it; probe rounds measure retrieval health only of editors that do.
    """

    @abstractmethod
    def retrieve(self, queries: Sequence[Query]) -> list[Retrieval]:
        """Where each query is routed: the key of an edit in memory, or None (out of scope)."""

    @abstractmethod
    def memory_size(self) -> int:
        """Number of edits held in the memory."""

    @abstractmethod
    def retrieval_stats(self) -> dict[str, float]:
        """The memory's own statistics (search latency quantiles, hits, misses, rebuilds)."""


class HasWeightDelta(ABC):
    """Capability: the editor changes the model's weights (fine-tuning, hypernetworks, LoRA, WISE's side memory)."""

    @abstractmethod
    def weight_change(self) -> float:
        """Frobenius norm of the accumulated change to the model's weights."""


class CanRetract(ABC):
    """Capability: `retract` undoes one earlier edit by its stream key (memory editors delete the stored edit)."""

    @abstractmethod
    def retract(self, key: str) -> EditOutcome:
        """Undo the edit `key`; applied=False with the reason when there is no such edit to undo."""


class HasJournal(ABC):
    """Capability: checkpoints hold the editor's memory incrementally, as the changes since the last checkpoint
    appended to a journal (`memory.MemoryJournal`) in a folder beside them, so checkpoint time does not grow with
    the memory. `state()` / `load_state` stay whole (single mode, rollbacks, `train-editor` use them).
    """

    @abstractmethod
    def journal_state(self, folder: Path) -> EditorState:
        """The state with its memory left out: that goes to the journal in `folder`, and the state records where."""

    @abstractmethod
    def journal_committed(self) -> None:
        """The last `journal_state` is in a written checkpoint now: what only older checkpoints named can go."""

    @abstractmethod
    def resume_journal(self, state: EditorState, folder: Path) -> None:
        """After `load_state(state)` of a state `whole_state` read from `folder`: cut the journal back to the state's
        position (a crash may have appended more) and continue it."""

    @classmethod
    @abstractmethod
    def whole_state(cls, state: EditorState, folder: Path) -> EditorState:
        """A `journal_state` made whole (as `state()` gives it) from the journal in `folder`, which is only read;
        a state that is whole already comes back as it is."""


class ScoresUnedited(ABC):
    """Capability: one `score_mixed` call asks some queries of the unedited model and the rest of the edited one.

    Memory editors never change the weights, so the unedited model is the same network without the memory: a
    record's pre-edit references and its post-edit probes can share batches, after the edit is applied.
    """

    @abstractmethod
    def score_mixed(self, queries: Sequence[Query], unedited: Sequence[bool], **kwargs: Any) -> list[SpanScore]:
        """`score` of every query, on the unedited model where `unedited[i]`, else on the edited one, in one call."""


def capabilities(editor: Editor | type[Editor]) -> list[str]:
    """The capabilities an editor (or editor class) declares: "memory", "weight_delta", "retract", "journal",
    "scores_unedited"."""
    cls = editor if isinstance(editor, type) else type(editor)
    declared = (("memory", HasMemory), ("weight_delta", HasWeightDelta), ("retract", CanRetract),
                ("journal", HasJournal), ("scores_unedited", ScoresUnedited))
    return [name for name, capability in declared if issubclass(cls, capability)]


class StateMismatchError(ValueError):
    """An editor state that does not belong to this editor: another method, model or prompt format."""


def model_identity(lvlm: LVLM) -> dict[str, str]:
    """What an editor state records about the model it was made on; `config_hash` fingerprints the architecture."""
    config = lvlm.model.config
    return {
        "name": lvlm.name,
        "config_class": type(config).__name__,
        "family": lvlm.family.name,
        "dtype": str(lvlm.dtype).removeprefix("torch."),
        "prompt_format": lvlm.inputs.prompt_format,
        "config_hash": hashlib.sha256(json.dumps(_architecture(config.to_dict()), sort_keys=True,
                                                 default=str).encode()).hexdigest()[:16],
    }


def _architecture(values: dict[str, Any]) -> dict[str, Any]:
    """A config's dict without what loading changes (path, dtype, library version, private fields)."""
    return {
        key: _architecture(value) if isinstance(value, dict) else value
        for key, value in values.items()
        if not str(key).startswith("_") and key not in ("dtype", "torch_dtype", "transformers_version")
    }


def check_model(saved: dict[str, str] | None, current: dict[str, str]) -> None:
    """Refuse a state made on another model (config class or hash) or prompt format; warn on a new name or dtype.

    A state without the record (written before it existed) is accepted with a warning.
    """
    if saved is None:
        log.warning("the editor state does not say which model it was trained on; assuming %r", current["name"])
        return
    same_model = all(saved.get(key) == current[key] for key in ("config_class", "config_hash"))
    if not same_model or saved.get("prompt_format") != current["prompt_format"]:
        raise StateMismatchError(
            f"editor state was trained on model {_described(saved)} with prompt format {saved.get('prompt_format')!r}; "
            f"this run uses {_described(current)} with {current['prompt_format']!r}"
        )
    if saved.get("name") != current["name"]:
        log.warning("the editor state was trained on %r; this run uses %r, with the same config",
                    saved.get("name"), current["name"])
    if saved.get("dtype") != current["dtype"]:
        log.warning("the editor state was trained in %s; this run uses %s", saved.get("dtype"), current["dtype"])


def _described(identity: dict[str, str]) -> str:
    return f"{identity.get('name')!r} ({identity.get('config_class')}, config {identity.get('config_hash')})"


@contextmanager
def bypassing(editor: Any) -> Iterator[None]:
    """Inside the block `editor._bypass` is set, so its memory answers nothing; what it was comes back after."""
    previous, editor._bypass = editor._bypass, True
    try:
        yield
    finally:
        editor._bypass = previous


def weak_hook(owner: object, method: str) -> Callable[..., Any]:
    """A module hook calling `owner.<method>` without keeping the owner alive (a model outlives its editors)."""
    ref = weakref.ref(owner)

    def hook(*args: Any, **kwargs: Any) -> Any:
        target = ref()
        return None if target is None else getattr(target, method)(*args, **kwargs)

    return hook


def tensor_norms(changes: dict[str, torch.Tensor]) -> dict[str, float]:
    """Frobenius norm of each named weight change."""
    return {name: float(delta.float().norm()) for name, delta in changes.items()}
