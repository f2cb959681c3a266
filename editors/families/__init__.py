"""Model families: the declared table, lookup by config class, and families registered by other packages.

A family that transformers does not ship (MiniGPT-4, mPLUG-Owl2, the original Qwen-VL) comes from
the user's own package through the entry-point group `editwatch.families`: each entry point names
a `Family` subclass (or instance) whose `config_class` is the model's config class. editwatch itself
is never edited to add one.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from importlib.metadata import entry_points

from transformers import PreTrainedConfig

from editors.families import blip, gemma, idefics, llava, qwen
from editors.families.base import DECODERS, Decoder, Family, UnsupportedModelError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "editwatch.families"

# Each module of this package lists its families in `DECLARED`.
FAMILIES: dict[type[PreTrainedConfig], Family] = {
    family.config_class: family for module in (llava, blip, qwen, idefics, gemma) for family in module.DECLARED
}


@lru_cache(maxsize=1)
def plugin_families() -> dict[type[PreTrainedConfig], Family]:
    """Families registered by installed packages under `editwatch.families` (loaded once)."""
    found: dict[type[PreTrainedConfig], Family] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
        except Exception as error:  # a broken plugin must not take the declared families down with it
            log.warning("model family plugin %s (%s) failed to load: %s", entry.name, entry.value, error)
            continue
        family = loaded() if isinstance(loaded, type) else loaded
        if not isinstance(family, Family):
            log.warning("model family plugin %s (%s) is not a Family; ignored", entry.name, entry.value)
            continue
        if family.config_class in FAMILIES:
            log.warning("model family plugin %s redeclares %s; the built-in family is kept",
                        entry.name, family.config_class.__name__)
            continue
        found[family.config_class] = family
    return found


def all_families() -> dict[type[PreTrainedConfig], Family]:
    """Declared families and those of installed plugins, by config class."""
    return {**FAMILIES, **plugin_families()}


def supported() -> str:
    """The supported families for an error message: 'llava (LlavaConfig), ...' and how to add one."""
    known = ", ".join(f"{f.name} ({c.__name__})" for c, f in all_families().items())
    return f"Supported families: {known}; others can be registered through the '{ENTRY_POINT_GROUP}' entry-point group"


def family_for(config: PreTrainedConfig) -> Family:
    """The family of a model config (declared or from a plugin), or an error naming the supported ones."""
    family = all_families().get(type(config))
    if family is None:
        raise UnsupportedModelError(f"unsupported model config {type(config).__name__}. {supported()}")
    return family


__all__ = [
    "DECODERS", "ENTRY_POINT_GROUP", "FAMILIES", "Decoder", "Family", "UnsupportedModelError", "all_families",
    "family_for", "plugin_families", "supported",
]
