"""The probe scheduler: one job on an interval, on APScheduler 3 with a persistent SQLite job store.

The job store keeps the schedule across restarts; a run never overlaps the previous one
(`max_instances=1`), and runs missed while the process was down (or busy) are coalesced into
one (`coalesce=True`, no misfire grace limit) instead of being replayed one by one.
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
# Persistent job stores keep jobs by reference (module:function) with JSON-able arguments, so
# the stored job carries a token made for each running schedule and the live callable is
# looked up here by it: schedules with the same job id (in other stores) never share an entry.
_JOBS: dict[str, Callable[[], None]] = {}


class ScheduleError(ValueError):
    """A schedule that cannot be used as given; the message says what is allowed."""


def parse_interval(text: str) -> float:
    """Seconds in an interval like `30s`, `10m`, `1h`, `1h30m` or `500ms`."""
    cleaned = text.strip().lower()
    parts = _PART.findall(cleaned)
    if not parts or "".join(n + u for n, u in parts) != cleaned:
        raise ScheduleError(
            f"invalid interval {text!r}: use a number and a unit (ms, s, m, h, d), e.g. 30s, 10m, 1h30m"
        )
    seconds = sum(float(number) * UNITS[unit] for number, unit in parts)
    if seconds <= 0:
        raise ScheduleError(f"invalid interval {text!r}: it must be longer than zero")
    return seconds


def _run_job(token: str) -> None:
    """What the job store calls: the job of the running schedule that registered `token`."""
    _JOBS[token]()


class IntervalSchedule:
    """Runs `job` every `seconds` until stopped; the schedule itself lives in the SQLite file `store`."""

    def __init__(self, job: Callable[[], None], seconds: float, store: Path, job_id: str = "probe") -> None:
        self.job = job
        self.seconds = seconds
        self.store = store
        self.job_id = job_id

    def run(self, stop: threading.Event) -> None:
        """Run the job on schedule until `stop` is set; a job already running is finished first.

        A new job store runs the job at once; an existing one keeps its next run time (runs
        missed meanwhile happen once, now), unless the interval changed.
        """
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.interval import IntervalTrigger

        self.store.parent.mkdir(parents=True, exist_ok=True)
        scheduler = BackgroundScheduler(
            jobstores={"default": SQLAlchemyJobStore(url=f"sqlite:///{self.store.resolve()}")},
            executors={"default": ThreadPoolExecutor(1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=timezone.utc,
        )
        token = f"{self.job_id}-{uuid.uuid4().hex}"
        _JOBS[token] = self.job
        trigger = IntervalTrigger(seconds=self.seconds, timezone=timezone.utc)
        scheduler.start(paused=True)
        try:
            existing = scheduler.get_job(self.job_id)
            if existing is None:
                scheduler.add_job(f"{__name__}:_run_job", trigger, args=[token], id=self.job_id,
                                  next_run_time=datetime.now(timezone.utc))
            else:
                scheduler.modify_job(self.job_id, args=[token])  # the stored token is a past process's
                if existing.trigger.interval != trigger.interval:
                    log.info("interval changed to %.6g s: rescheduling %s", self.seconds, self.job_id)
                    scheduler.reschedule_job(self.job_id, trigger=trigger)
                else:
                    log.info("continuing the schedule in %s: next run at %s", self.store, existing.next_run_time)
            scheduler.resume()
            while not stop.wait(0.2):  # short waits: signal handlers run between them
                pass
        finally:
            # Without its job store the scheduler has nothing left to submit: a run falling due
            # while the executor shuts down would fail and still be marked done in the store.
            scheduler.remove_jobstore("default")
            scheduler.shutdown(wait=True)
            _JOBS.pop(token, None)
