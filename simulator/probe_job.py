"""`simulate probe`: the run's own probe rounds (simulator.probing) on a schedule (monitor.schedule).

Rounds go to `--out` (default STATE/probes), where the schedule's job store also lives, and
to the exporters — never into the run's own rounds.jsonl.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from monitor.schedule import IntervalSchedule, ScheduleError, parse_interval
from simulator.command import ArgumentParser, CommandError, exporters
from simulator.config import RunConfig
from simulator.signals import stopping_on_signals

if TYPE_CHECKING:
    from monitor.sink import Sink

log = logging.getLogger(__name__)

JOB_STORE = "jobs.sqlite"


def parser() -> argparse.ArgumentParser:
    """Options of `simulate probe`."""
    probe = ArgumentParser(
        prog="simulate probe",
        description="Run a run's probe suite (retention, reference set, collapse, retrieval) on a schedule "
        "against its latest checkpoint; results go to --out, Prometheus/Pushgateway and MLflow.",
    )
    probe.add_argument("--state", required=True, help="the run's folder (its --out): config.json and checkpoint/")
    probe.add_argument("--every", default="10m", help="interval, e.g. 30s, 10m, 1h (default: 10m)")
    probe.add_argument("--out", help="folder for rounds.jsonl, summary.json and the job store (default: STATE/probes)")
    probe.add_argument("--rounds", type=int, help="stop after this many rounds (default: run until stopped)")
    probe.add_argument("--seed", type=int, help="seed of the fixed retention sample (default: the run's)")
    probe.add_argument("--run-name", help="name in the exporters (default: the run's name + '-probe')")
    probe.add_argument("--mlflow-uri", help="MLflow tracking URI (default: the run's)")
    probe.add_argument("--mlflow-experiment", help="MLflow experiment (default: the run's)")
    probe.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    probe.add_argument("--prometheus-port", type=int, help="serve live Prometheus metrics on this port")
    probe.add_argument("--prometheus-host", default="127.0.0.1", help="address to serve them on (default: 127.0.0.1)")
    probe.add_argument("--pushgateway", help="Pushgateway URL (default: the run's)")
    probe.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return probe


def main(args: argparse.Namespace) -> int:
    """`simulate probe`."""
    from simulator.run import CONFIG  # imported here, as the rest: torch is not needed for --help

    try:
        seconds = parse_interval(args.every)
    except ScheduleError as error:
        raise CommandError(str(error)) from None
    if args.rounds is not None and args.rounds < 1:
        raise CommandError(f"--rounds must be at least 1, got {args.rounds}")
    state = Path(args.state)
    if not (state / CONFIG).is_file():
        raise CommandError(f"{state} holds no run (missing {CONFIG}): give the --out folder of a `simulate` run")
    config = RunConfig.model_validate_json((state / CONFIG).read_text(encoding="utf-8"))
    out = Path(args.out) if args.out else state / "probes"
    overrides = {"prometheus_port": args.prometheus_port, "prometheus_host": args.prometheus_host,
                 "no_mlflow": args.no_mlflow or config.no_mlflow}
    for name in ("mlflow_uri", "mlflow_experiment", "pushgateway"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    sinks = exporters(config.model_copy(update=overrides), kind="probe")
    try:
        return _run(args, state, out, config, seconds, sinks)
    finally:
        for sink in sinks:
            sink.close()


def _run(args: argparse.Namespace, state: Path, out: Path, config: RunConfig, seconds: float,
         sinks: list[Sink]) -> int:
    """Restore the run, announce the probe job to the exporters, probe on schedule, then summarise."""
    from simulator.checkpoint import CheckpointError
    from simulator.outputs import RunFiles
    from simulator.probing import ProbeError, ProbeJob
    from simulator.run import CONFIG, RunError, run_name

    seed = config.seed if args.seed is None else args.seed
    try:
        job = ProbeJob(state, out, config, seed, sinks)
    except (CheckpointError, RunError, ProbeError) as error:
        raise CommandError(str(error)) from None
    name = args.run_name or f"{run_name(config)}-probe"
    files = RunFiles(out)
    settings = {"state": str(state.resolve()), "every": args.every, "seed": seed, "run": config.model_dump(mode="json")}
    (out / CONFIG).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    params = {"method": config.method, "model": job.editor.lvlm.name, "mode": config.mode, "gaps": job.gaps, "seed": seed, "state": settings["state"], "every": args.every}
    for sink in sinks:
        sink.on_start(name, params, out, job.applied)
    stop = threading.Event()

    def scheduled() -> None:
        job.round()
        if args.rounds is not None and job.rounds >= args.rounds:
            stop.set()

    with stopping_on_signals(stop):
        IntervalSchedule(scheduled, seconds, out / JOB_STORE).run(stop)
    summary = {"run": name, "state": settings["state"], "rounds": job.rounds, "edits_applied": job.applied,
               "last_round": job.last, "alarms": job.alarms.as_dict(),
               "stopped": "rounds" if args.rounds is not None and job.rounds >= args.rounds else "stopped"}
    files.write_summary(summary)
    for sink in sinks:
        sink.on_finish(summary, out)
    log.info("%s: %d probe rounds; results in %s", name, job.rounds, out)
    return 0
