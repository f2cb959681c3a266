"""The probe scheduler on real APScheduler: intervals, no overlapping runs, persistence, coalesced misfires.

No assertion depends on how fast this machine is: the tests wait for events (a run started,
the job store moved on) and assert the order of what happened, or count runs between events.
"""

import sqlite3
import threading
import time
from datetime import datetime, timezone

import pytest

from monitor.schedule import IntervalSchedule, ScheduleError, parse_interval
from tests.services import wait_until

PATIENCE = 60  # seconds before a wait fails: only reached when the behaviour is wrong


@pytest.mark.parametrize("text, seconds", [("30s", 30), ("10m", 600), ("1h", 3600), ("2s", 2), ("1h30m", 5400),
                                           ("500ms", 0.5), (" 1.5M ", 90), ("1d", 86400)])
def test_intervals(text, seconds):
    assert parse_interval(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["10", "m", "10 m", "-5s", "0s", "1w", "10m5", ""])
def test_bad_intervals_say_what_is_allowed(text):
    with pytest.raises(ScheduleError, match=r"e\.g\. 30s|longer than zero"):
        parse_interval(text)


class Running:
    """A schedule running in a thread, stopped (waiting for a running job) on leaving the block."""

    def __init__(self, schedule: IntervalSchedule) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=schedule.run, args=(self.stop,))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(PATIENCE)
        assert not self.thread.is_alive()


def wait_for(event: threading.Event, what: str) -> None:
    if not event.wait(PATIENCE):
        pytest.fail(f"timed out waiting for {what}")


def next_run(store, job_id="probe") -> float:
    """The job's next run time in the job store (Unix seconds), as the scheduler left it."""
    with sqlite3.connect(store) as db:
        return db.execute("select next_run_time from apscheduler_jobs where id = ?", (job_id,)).fetchone()[0]


def set_next_run(store, when: float, job_id="probe") -> None:
    """Change the stored next run time through APScheduler itself (as if the process had been down)."""
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    scheduler = BackgroundScheduler(jobstores={"default": SQLAlchemyJobStore(url=f"sqlite:///{store}")},
                                    timezone=timezone.utc)
    scheduler.start(paused=True)
    scheduler.modify_job(job_id, next_run_time=datetime.fromtimestamp(when, timezone.utc))
    scheduler.remove_jobstore("default")  # so that shutting down cannot submit the now overdue run
    scheduler.shutdown()


def test_a_run_never_overlaps_and_runs_due_meanwhile_are_skipped_not_queued(tmp_path):
    store, interval = tmp_path / "jobs.sqlite", 0.2
    spans: list[list[float]] = []  # [start, end] of each run, wall-clock seconds like the job store's times
    first, second, release = threading.Event(), threading.Event(), threading.Event()

    def job():
        spans.append([time.time(), 0.0])
        if len(spans) == 1:
            first.set()
            release.wait(PATIENCE)
        else:
            second.set()
        spans[-1][1] = time.time()

    with Running(IntervalSchedule(job, interval, store)):
        try:
            wait_for(first, "the first run")
            # Hold the first run until the scheduler has handled at least two more due runs.
            before = next_run(store)
            wait_until(lambda: next_run(store) >= before + 2 * interval - 1e-6, PATIENCE,
                       "runs to come due during the first", poll=0.01)
            due = next_run(store)  # every run due before this one came due while the first was running
        finally:
            release.set()
        wait_for(second, "a second run")
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end
    # Runs due during the first were dropped, not queued behind it (max_instances=1): a queued
    # one would start as soon as the first ended, before the next run time the store held then.
    assert spans[1][0] >= due


def test_the_schedule_persists_and_runs_missed_while_down_happen_once(tmp_path):
    store, hour = tmp_path / "jobs.sqlite", 3600.0
    runs = []
    ran = threading.Event()

    def job():
        runs.append(time.time())
        ran.set()

    with Running(IntervalSchedule(job, hour, store)):
        wait_for(ran, "the first run")  # a new schedule runs at once
    assert len(runs) == 1
    with sqlite3.connect(store) as db:
        assert db.execute("select id from apscheduler_jobs").fetchall() == [("probe",)]
    due = next_run(store)
    assert due > runs[0]
    set_next_run(store, due - 4 * hour)  # down for four hours: four runs are overdue
    ran.clear()
    runs.clear()
    with Running(IntervalSchedule(job, hour, store)):
        wait_for(ran, "the overdue run")
    # Stopping waited for the job to finish: without coalescing it would have run four times.
    assert len(runs) == 1
    assert next_run(store) == pytest.approx(due)  # and the schedule keeps its hourly grid


def test_a_changed_interval_reschedules(tmp_path):
    store = tmp_path / "jobs.sqlite"
    hourly, fast = [], []
    ran, twice = threading.Event(), threading.Event()
    with Running(IntervalSchedule(lambda: (hourly.append(1), ran.set()), 3600, store)):
        wait_for(ran, "the first run")

    def job():
        fast.append(1)
        if len(fast) == 2:
            twice.set()

    with Running(IntervalSchedule(job, 0.1, store)):
        wait_for(twice, "two runs at the new interval")  # the hourly schedule would not run for an hour
    assert hourly == [1]


def test_schedules_with_the_same_job_id_run_their_own_jobs(tmp_path):
    counts = {"a": 0, "b": 0}

    def job(name):
        def count():
            counts[name] += 1
        return count

    with Running(IntervalSchedule(job("b"), 0.05, tmp_path / "b.sqlite")):
        with Running(IntervalSchedule(job("a"), 0.05, tmp_path / "a.sqlite")):
            wait_until(lambda: counts["a"] >= 3 and counts["b"] >= 3, PATIENCE, "both schedules to run", poll=0.01)
        seen = counts["b"]  # a has stopped; b goes on with its own job
        wait_until(lambda: counts["b"] >= seen + 2, PATIENCE, "b to go on alone", poll=0.01)
