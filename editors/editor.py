"""The Editor contract every editing method implements, and the edit request it receives."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
from PIL import Image
from pydantic import BaseModel

from editors.adapter import LVLM, SpanScore
from editors.inputs import Query
from editors.state import EditorState


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

    def __init__(self, lvlm: LVLM, config: BaseModel | dict[str, Any] | None = None) -> None:
        self.lvlm = lvlm
        self.config = config if isinstance(config, self.Config) else self.Config.model_validate(config or {})

    @abstractmethod
    def apply(self, edit: EditRequest) -> EditOutcome:
        """Install one edit."""

    def score(self, queries: Sequence[Query], **kwargs: Any) -> list[SpanScore]:
        """Teacher-forced answer-span scores of the edited model (see `LVLM.score`)."""
        return self.lvlm.score(queries, **kwargs)

    @abstractmethod
    def state(self) -> EditorState:
        """Everything needed to rebuild the edited model from the unedited one."""

    @abstractmethod
    def load_state(self, state: EditorState) -> None:
        """Restore a state from `state()` onto the unedited model."""

    @abstractmethod
    def reset(self) -> None:
        """Undo every edit: back to the unedited model."""

    def _check_state(self, state: EditorState) -> None:
        if state.method != self.name:
            raise ValueError(f"state was saved by method {state.method!r}, not {self.name!r}")


def tensor_norms(changes: dict[str, torch.Tensor]) -> dict[str, float]:
    """Frobenius norm of each named weight change."""
    return {name: float(delta.float().norm()) for name, delta in changes.items()}
