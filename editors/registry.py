"""Editing methods by name: the one registry, one row per method module.

Rows name the class by import path, so listing methods (e.g. for `simulate --help`) does not
import torch or transformers; the class is imported when it is asked for.
"""

from __future__ import annotations

import difflib
import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import BaseModel

    from editors.adapter import LVLM
    from editors.editor import Editor

METHODS: dict[str, str] = {
    "none": "editors.none:NoEdit",
    "ike": "editors.ike:Ike",
    "serac": "editors.serac:Serac",
    "ft-llm": "editors.ft:FTLLM",
    "ft-vis": "editors.ft:FTVis",
    "mend": "editors.mend:MEND",
    "ke": "editors.ke:KnowledgeEditor",
    "wise": "editors.wise:Wise",
    "grace": "editors.grace:Grace",
    "lora": "editors.lora:LoRA",
}


class UnknownMethodError(KeyError):
    """No editing method is registered under that name."""

    def __str__(self) -> str:
        return str(self.args[0])


def editor_class(name: str) -> type[Editor]:
    """The Editor class registered as `name`, or an error suggesting the closest names."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownMethodError(f"Unknown method {name!r}.{hint} Available: {', '.join(sorted(METHODS))}")
    module, _, attribute = METHODS[name].partition(":")
    cls = getattr(importlib.import_module(module), attribute)
    if cls.name != name:
        raise TypeError(f"{METHODS[name]} declares name {cls.name!r}, registered as {name!r}")
    return cls


def create_editor(name: str, lvlm: LVLM, config: BaseModel | dict[str, Any] | None = None) -> Editor:
    """Build the editor `name` on `lvlm`; the config is validated by the method's own model."""
    return editor_class(name)(lvlm, config)
