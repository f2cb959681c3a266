"""The probe scheduler on real APScheduler: intervals, no overlapping runs, persistence, coalesced misfires."""

import sqlite3
import threading
import time

import pytest

from monitor.schedule import IntervalSchedule, ScheduleError, parse_interval


@pytest.mark.parametrize("text, seconds", [("30s", 30), ("10m", 600), ("1h", 3600), ("2s", 2), ("1h30m", 5400),
                                           ("500ms", 0.5), (" 1.5M ", 90), ("1d", 86400)])
def test_intervals(text, seconds):
    assert parse_interval(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["10", "m", "10 m", "-5s", "0s", "1w", "10m5", ""])
def test_bad_intervals_say_what_is_allowed(text):
    with pytest.raises(ScheduleError, match=r"e\.g\. 30s|longer than zero"):
        parse_interval(text)


def run_for(schedule, seconds):
    """Run `schedule` in a thread for about `seconds`, then stop it (waiting for a running job)."""
    stop = threading.Event()
    thread = threading.Thread(target=schedule.run, args=(stop,))
    thread.start()
    time.sleep(seconds)
    stop.set()
    thread.join(30)
    assert not thread.is_alive()


def test_a_slow_job_never_overlaps_itself(tmp_path):
    spans = []

    def slow():
        start = time.monotonic()
        time.sleep(0.5)
        spans.append((start, time.monotonic()))

    run_for(IntervalSchedule(slow, 0.1, tmp_path / "jobs.sqlite"), 1.8)
    assert 2 <= len(spans) <= 4  # every 0.1 s it would be 18 runs; one at a time it is about 3
    for (_, end), (next_start, _) in zip(spans, spans[1:]):
        assert next_start >= end


def test_the_schedule_persists_and_missed_runs_are_coalesced(tmp_path):
    store = tmp_path / "jobs.sqlite"
    runs = []
    run_for(IntervalSchedule(lambda: runs.append(time.monotonic()), 0.4, store), 0.2)
    assert len(runs) == 1  # a new schedule runs at once
    with sqlite3.connect(store) as db:
        assert db.execute("select id from apscheduler_jobs").fetchall() == [("probe",)]
    time.sleep(1.7)  # down while four runs were due
    runs.clear()
    run_for(IntervalSchedule(lambda: runs.append(time.monotonic()), 0.4, store), 0.25)
    # The missed runs happen once, not four times in a row; the next follows the 0.4 s grid.
    assert runs and sum(1 for t in runs if t - runs[0] < 0.05) == 1


def test_a_changed_interval_reschedules(tmp_path):
    store = tmp_path / "jobs.sqlite"
    runs = []
    run_for(IntervalSchedule(lambda: runs.append(1), 3600, store), 0.2)
    run_for(IntervalSchedule(lambda: runs.append(2), 0.2, store), 0.7)
    assert runs[0] == 1 and runs[1:].count(2) >= 2  # the hourly schedule would not have run again
