"""Stopping on Ctrl-C and SIGTERM, the one way every long-running command does it."""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

log = logging.getLogger(__name__)


@contextmanager
def stopping_on_signals(stop: threading.Event, announce: str | None = None) -> Iterator[None]:
    """The first Ctrl-C or SIGTERM sets `stop`, so the work in progress ends cleanly.

    A second Ctrl-C raises KeyboardInterrupt (stop at once). `announce` is logged at the first
    signal. Outside the main thread (where handlers cannot be installed) this does nothing.
    """

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()
        if announce:
            log.warning(announce)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
