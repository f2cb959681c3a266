"""Published model dimensions, built without weights on the meta device.

One module per family group (`tests/published/<name>.py`), each with a `PUBLISHED` dict of
checkpoint name -> `Published`; `tests/editors/test_published_sizes.py` gathers them and checks,
for every entry, the number of model parameters each method trains.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

from transformers import PreTrainedConfig


@dataclass(frozen=True)
class Published:
    """A checkpoint's config at its published size and the parameters each method trains on it.

    `trains` maps a method name (editwatch's defaults) or "<method>/vlkeb" (VLKEB's protocol)
    to the number of model parameters it changes, computed by hand from the published
    dimensions (so a wrong module selection shows as a wrong count).
    """

    config: Callable[[], PreTrainedConfig]
    trains: dict[str, int] = field(default_factory=dict)
    modules: dict[str, list[str]] = field(default_factory=dict)  # optional: method -> exact parameter names


def published() -> dict[str, Published]:
    """Every published checkpoint of every module of this package."""
    found: dict[str, Published] = {}
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        found.update(getattr(importlib.import_module(f"{__name__}.{module}"), "PUBLISHED", {}))
    return found
