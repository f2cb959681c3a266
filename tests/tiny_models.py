"""Every tiny model of `tests/tiny/`, by name: the families the contract tests run on.

Builders are gathered from each module's `BUILDERS`, so a new module under `tests/tiny/`
is picked up without editing this file.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from typing import Callable

import numpy as np
from PIL import Image

import tests.tiny
from editors import LVLM
from tests.tiny.llava import tiny_llava
from tests.tiny.qwen import QWEN_CHAT

BUILDERS: dict[str, Callable[[], LVLM]] = {}
for _module in sorted(m.name for m in pkgutil.iter_modules(tests.tiny.__path__)):
    BUILDERS.update(getattr(importlib.import_module(f"tests.tiny.{_module}"), "BUILDERS", {}))


@lru_cache(maxsize=None)
def tiny(name: str) -> LVLM:
    """A cached tiny model by name (tests must not mutate its weights)."""
    return BUILDERS[name]()


def random_image(seed: int, size: tuple[int, int] = (20, 24)) -> Image.Image:
    """A reproducible noise image (H, W) = size."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


__all__ = ["BUILDERS", "QWEN_CHAT", "random_image", "tiny", "tiny_llava"]
