"""Editors: the LVLM adapter over transformers, the Editor contract and one module per method.

Public names resolve lazily (PEP 562): importing `editors` costs nothing until a name that
needs torch or transformers is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "LVLM": "editors.adapter",
    "SpanLogits": "editors.adapter",
    "SpanScore": "editors.adapter",
    "EditExample": "editors.editor",
    "EditOutcome": "editors.editor",
    "EditRequest": "editors.editor",
    "Editor": "editors.editor",
    "CanRetract": "editors.editor",
    "HasJournal": "editors.editor",
    "HasMemory": "editors.editor",
    "HasWeightDelta": "editors.editor",
    "Retrieval": "editors.editor",
    "ScoresUnedited": "editors.editor",
    "capabilities": "editors.editor",
    "tensor_norms": "editors.editor",
    "FAMILIES": "editors.families",
    "Family": "editors.families",
    "UnsupportedModelError": "editors.families",
    "family_for": "editors.families",
    "InputError": "editors.inputs",
    "Query": "editors.inputs",
    "PromptFormat": "editors.prompts",
    "METHODS": "editors.registry",
    "UnknownMethodError": "editors.registry",
    "create_editor": "editors.registry",
    "editor_class": "editors.registry",
    "EditorState": "editors.state",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from editors.adapter import LVLM, SpanLogits, SpanScore
    from editors.editor import (
        EditExample,
        EditOutcome,
        Editor,
        EditRequest,
        CanRetract,
        HasJournal,
        HasMemory,
        HasWeightDelta,
        Retrieval,
        ScoresUnedited,
        capabilities,
        tensor_norms,
    )
    from editors.families import FAMILIES, Family, UnsupportedModelError, family_for
    from editors.inputs import InputError, Query
    from editors.prompts import PromptFormat
    from editors.registry import METHODS, UnknownMethodError, create_editor, editor_class
    from editors.state import EditorState


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'editors' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
