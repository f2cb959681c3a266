"""`none`: applies nothing, so the unedited model is measured through the same path as any method."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from editors.editor import EditOutcome, Editor, EditRequest
from editors.state import EditorState


class NoneConfig(BaseModel):
    """No settings."""

    model_config = ConfigDict(extra="forbid")


class NoEdit(Editor):
    """The identity editor: every edit is accepted and changes nothing."""

    name = "none"
    Config = NoneConfig
    cannot_retract = "it applies no edit"

    def apply(self, edit: EditRequest) -> EditOutcome:
        """Accept the edit without touching the model."""
        return EditOutcome(applied=True)

    def state(self) -> EditorState:
        """An empty state."""
        return self._new_state()

    def load_state(self, state: EditorState) -> None:
        """Check the state is ours; there is nothing to restore."""
        self._check_state(state)

    def reset(self) -> None:
        """Nothing to undo."""
