"""Settings read from the environment, in one place."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Where trained world models and other caches live: $EDITWATCH_CACHE or ~/.cache/editwatch."""
    configured = os.environ.get("EDITWATCH_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "editwatch"
