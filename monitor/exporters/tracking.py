"""MLflow exporter: one MLflow run per `simulate` run (DESIGN.md, Monitoring), never blocking the run.

Every operation (create the run, params, the stream as a dataset input, metrics of each probe
round at `step` = edits applied, tags, artifacts, end) is first written to a journal in the run folder
(`<out>/mlflow/`), then sent by a background thread. While the tracking server is
unreachable the thread warns once, retries with backoff and the simulation goes on; when the
server is back, the buffered operations go out in order. At the end the run waits up to
`flush_seconds` for the server, then stops the thread; whatever is still unsent stays in the
journal and is sent on `--resume` or by `simulate compare --sync DIR` (`sync` here).

A write the server rejects (a 4xx answer about the operation itself: a param changed to another
value, a key MLflow refuses) is not dropped: it goes to `<out>/mlflow/dead_letter.jsonl` with the
server's answer and the sender moves on. MLflow rejects a whole batch for one bad item, so a
rejected batch is halved until each rejected item stands alone: the rest of the batch arrives.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import math
import os
import re
import shutil
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

from memory.files import read_jsonl
from monitor.alarms import CollapseThresholds
from monitor.exporters.journal import DeadLetters, Journal, JournalError
from monitor.exporters.plots import collapse_thresholds, round_plots
from monitor.run_files import CONFIG, ROUNDS, SUMMARY
from monitor.run_tags import COLLAPSE_AT_TAG, COLLAPSE_TAG, FORGETTING_TAG, LIMIT_TAG, STOPPED_TAG
from monitor.sink import Sink

log = logging.getLogger(__name__)

FOLDER = "mlflow"  # inside the run folder: journal, state and artifact snapshots
ARTIFACTS = "artifacts"
RUN_FILES = (CONFIG, SUMMARY, ROUNDS)
# Tags the MLflow run with its journal's id, so that re-sending a `create` (a crash after the
# run was created but before that was recorded) finds the run instead of making a second one.
JOURNAL_TAG = "editwatch.journal"
# MLflow's own HTTP retries (7 with exponential backoff: minutes per call) would stall the
# sender through a whole outage; the journal retries instead. Explicit user settings win.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
RETRY_SECONDS = (1.0, 30.0)  # backoff from, up to, while the server is unreachable
CLOSING_RETRY_SECONDS = 2.0  # backoff cap while the run waits to flush at its end
STOP_SECONDS = 30.0  # at close, how long to wait for an operation in flight (HTTP timeout 10 s by default)
RUN_PREFIX = "run/"  # run-level value of a probe-round metric (monitor.metrics.reduce_rounds)
BATCH = 1000  # MLflow's log_batch limit on metrics per call
PARAM_BATCH = 100  # ... and on params per call
MAX_PARAM_KEY, MAX_PARAM_VALUE = 250, 6000  # MLflow's limits on a param's key and value (characters)
# MLflow 3 opens an experiment without this tag in its GenAI view (traces, prompts); with it, in the
# training view: runs, params and metric charts (the UI's ExperimentKind enum, MLflow 3.17).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
BASE_PREFIX = "base/"
# The unedited model's accuracies (the summary's `base`) are logged at step 0, each under the key of the
# run metric that asks the same query: `pred_src` is reliability's query (image + src) scored on the old
# answer, so `base/reliability` beside `gap_10/reliability` reads "knew the old fact / learnt the new one".
# `port_<k>hop` keeps its key; `loc` and `m_loc` keep theirs: t_loc and i_loc measure agreement with this
# very unedited model (1 by definition before any edit), a different quantity from its token accuracy.
BASE_KEYS = {"pred_src": "reliability", "pred_rephrase": "t_gen", "pred_image_rephrase": "i_gen"}
DATASET_CONTEXT = "eval"  # the stream is measured, not trained on (MLflow's `mlflow.data.context` input tag)
# 4xx answers that are about the connection, not the operation: credentials (401, 403), a timeout (408),
# too many requests (429), a cancelled call (499). The operation stays journaled and is retried.
RETRIED_4XX = frozenset({401, 403, 408, 429, 499})


class TrackingUnavailable(RuntimeError):
    """The tracking server (or local store) cannot be reached now; the operation stays journaled."""


class TrackingRejected(RuntimeError):
    """The tracking server refuses to create the run's experiment: nothing can be sent; the journal keeps it all."""


def package_version() -> str:
    """The installed editwatch version (an MLflow param of every run)."""
    return importlib.metadata.version("editwatch")


def now_ms() -> int:
    """Wall-clock time in milliseconds (MLflow's timestamps)."""
    return int(time.time() * 1000)


class MlflowSink(Sink):
    """Journals a run's parameters, probe-round metrics, summary and artifacts; a thread sends them."""

    def __init__(
        self, uri: str | None = None, experiment: str = "editwatch", kind: str = "simulate",
        flush_seconds: float = 30.0, tags: dict[str, str] | None = None,
    ) -> None:
        self.uri = uri  # None: MLflow's own default (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)
        self.experiment = experiment
        self.kind = kind
        self.flush_seconds = flush_seconds
        self.tags = tags or {}  # extra tags of the new run, e.g. mlflow.parentRunId of a sweep's cell
        self._logged: dict[tuple[str, int], Any] = {}  # (key, step) -> value logged past the resumed checkpoint
        self.journal: Journal | None = None
        self._sender: _Sender | None = None
        self._follow = False
        self._deadline: float | None = None  # when flush_seconds, counted from the first flush or close, are up

    def on_start(self, run: str, params: dict[str, Any], folder: Path, step: int) -> None:
        """Create the MLflow run, or continue the folder's own when the run resumes (`step` > 0).

        The params are the run's whole settings (its `config.json`, nested fields flattened as
        `collapse.ppl_ratio`, `method_config.lr`) overlaid by `params` (the values the run resolved:
        the loaded model's name, the method's hyperparameters as run ...); a stream file with a data
        hash becomes the run's dataset input.
        """
        self.journal = Journal(folder / FOLDER)
        settings = _settings(folder)
        # A --follow run has no end of its stream: stopping it on purpose is how it ends (FINISHED, not KILLED).
        self._follow = settings.get("follow") is True
        state = self.journal.state()
        if step and self.journal.exists():
            if self.uri is not None and state.get("uri") not in (None, self.uri):
                log.warning("resuming: the MLflow run continues at %s, where it started", state["uri"])
            # The run replays what it did between its checkpoint and its end: a value logged then is not logged
            # again; a replay that measured otherwise is logged, so MLflow's latest value is the run's own.
            self._logged = {(row[0], row[3]): row[1] for _, op in self.journal.pending(0)
                            if op.get("op") == "metrics" for row in op["metrics"] if row[3] > step}
            self.journal.append({"op": "resume"})
        else:
            if self.journal.exists():
                log.info("a new run in %s: the previous MLflow journal moved to %s", folder, self.journal.archive())
            self.journal.save_state({"offset": 0, "uri": self.uri})
            tags = {**self.tags, "editwatch.kind": self.kind, "editwatch.folder": str(folder.resolve()),
                    JOURNAL_TAG: uuid.uuid4().hex}
            self.journal.append({"op": "create", "experiment": self.experiment, "run": run, "time": now_ms(),
                                 "tags": tags})
            values = {**settings, **params, "editwatch_version": package_version()}
            self.journal.append({"op": "params", "params": flat_params(values)})
            if (dataset := _dataset(params)) is not None:
                self.journal.append({"op": "inputs", "datasets": [dataset]})
        self._sender = _Sender(self.journal)
        self._sender.start()
        self._wake()

    def on_round(
        self, step: int, values: dict[str, float], seconds: float, results: dict[str, dict[str, float]],
        crossed: Mapping[str, str] = MappingProxyType({}),
    ) -> None:
        """Log the round's metrics and the per-setting running means (`gap_10/reliability`) at `step`."""
        metrics = {**values, "probe_seconds": seconds}
        for setting, row in results.items():
            metrics.update({f"{setting}/{key}": value for key, value in row.items()})
        self._log_metrics(_rows(metrics, step))

    def on_finish(self, summary: dict[str, Any], folder: Path) -> None:
        """Log the final numbers, tags, the run's files and plots as artifacts, and end the MLflow run."""
        if self.journal is None:
            return
        metrics = {f"{setting}/{key}": value for setting, row in summary.get("results", {}).items()
                   for key, value in row.items()}
        # Probe-round metrics reduced to one number each by the registry's aggregation (what compare reads).
        metrics.update({f"{RUN_PREFIX}{key}": value for key, value in summary.get("health", {}).items()})
        metrics.update({key: summary[key] for key in ("edits_read", "edits_applied", "failed", "quarantined",
                                                      "rounds") if isinstance(summary.get(key), (int, float))})
        base = {BASE_PREFIX + BASE_KEYS.get(key, key): value for key, value in summary.get("base", {}).items()}
        # Before the first edit: the curves' starting point (a resumed run logs them again, same step, same values).
        self._log_metrics(_rows(metrics, summary.get("edits_applied", 0)) + _rows(base, 0))
        alarms = summary.get("alarms", {})
        collapse = alarms.get("collapse", {})
        tags = {STOPPED_TAG: summary.get("stopped"),
                COLLAPSE_TAG: collapse.get("raised"),
                COLLAPSE_AT_TAG: collapse.get("first_at") if collapse.get("raised") else None,
                FORGETTING_TAG: alarms.get("forgetting", {}).get("detected"),
                LIMIT_TAG: _settings(folder).get("limit")}
        self.journal.append({"op": "tags", "tags": {k: str(v) for k, v in tags.items() if v is not None}})
        _snapshot(folder, self.journal.folder / ARTIFACTS)
        self.journal.append({"op": "artifacts", "dir": ARTIFACTS})
        status = "KILLED" if summary.get("stopped") == "interrupted" and not self._follow else "FINISHED"
        self.journal.append({"op": "end", "status": status, "time": now_ms()})
        self._wake()

    def flush(self) -> bool:
        """Wait until everything journaled so far is sent (or rejected) or `flush_seconds` are up; whether it was."""
        if self.journal is None:
            return True
        if self._sender is None:
            return self.journal.unsent() == 0
        return self._sender.drain(self._seconds_left())

    def settle(self) -> dict[str, Any]:
        """Flush, then the number of writes the tracking server rejected (`mlflow_dead_letters` in the summary)."""
        self.flush()
        return {"mlflow_dead_letters": self.dead_letters()}

    def dead_letters(self) -> int:
        """How many writes the tracking server rejected for this run folder so far (`mlflow/dead_letter.jsonl`).

        Final once `flush` returned True: the writes of `on_finish` are rejected or not by then.
        """
        return DeadLetters(self.journal.folder).count() if self.journal is not None else 0

    def close(self) -> None:
        """Wait up to `flush_seconds` for everything to be sent, then stop the sender; say where the rest is kept."""
        if self._sender is None or self.journal is None:
            return
        sender, self._sender = self._sender, None
        if not sender.finish(self._seconds_left()):
            sender.stop(STOP_SECONDS)
        unsent = self.journal.unsent()
        if not unsent and sender.error is None:
            return
        where = (f"they are kept in {self.journal.folder} and sent by `simulate compare --sync "
                 f"{self.journal.folder.parent}` (or when the run is resumed)")
        if sender.error is not None:
            log.error("the MLflow sender stopped on an error (%s: %s) with %d operations unsent; %s",
                      type(sender.error).__name__, sender.error, unsent, where)
        else:
            log.warning("%d MLflow operations could not be sent to %s within %.0f s; %s", unsent,
                        self.journal.state().get("uri") or "the default tracking URI", self.flush_seconds, where)
        if sender.is_alive():
            log.warning("the MLflow sender is still in a call to the tracking server; it stops after that call")

    def _seconds_left(self) -> float:
        """What is left of `flush_seconds`: a flush then a close wait that long in all, not twice."""
        if self._deadline is None:
            self._deadline = time.monotonic() + self.flush_seconds
        return max(0.0, self._deadline - time.monotonic())

    def _log_metrics(self, rows: list[list[Any]]) -> None:
        if self.journal is None:
            return
        if self._logged:  # a resumed run's replay of rounds it had logged before it died: no second value per step
            rows = [row for row in rows if not _replayed(row, self._logged)]
            if not rows:
                return
        self.journal.append({"op": "metrics", "metrics": rows})
        self._wake()

    def _wake(self) -> None:
        if self._sender is not None:
            self._sender.wake()


def _snapshot(folder: Path, target: Path) -> None:
    """Copy the run's files and draw its plots into `target`, as they are now."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for name in RUN_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, target / name)
    rounds = folder / ROUNDS
    if rounds.is_file():
        rows = list(read_jsonl(rounds))
        config = folder / CONFIG
        given = json.loads(config.read_text(encoding="utf-8")).get("collapse", {}) if config.is_file() else {}
        round_plots(rows, target / "plots", collapse_thresholds(CollapseThresholds.model_validate(given)))


def _replayed(row: list[Any], logged: dict[tuple[str, int], Any]) -> bool:
    """Whether a resumed run's metric row repeats one logged before it died: the same value, or any value of a
    wall-clock timing (those differ between any two runs)."""
    key, value, _, step = row
    return (key, step) in logged and (logged[key, step] == value or "seconds" in key)


def _rows(metrics: dict[str, Any], step: int) -> list[list[Any]]:
    """Journal rows [key, value, time, step] of the metrics that have a value."""
    stamp = now_ms()
    return [[key, _journal_value(value), stamp, step] for key, value in metrics.items() if value is not None]


def _journal_value(value: Any) -> float | str:
    """A metric value as the journal keeps it: JSON has no NaN or infinity, so those are the strings "nan",
    "inf" and "-inf" (float() reads them back; MLflow stores them as they are)."""
    number = float(value)
    return number if math.isfinite(number) else repr(number)


def _settings(folder: Path) -> dict[str, Any]:
    """The run's settings file (`config.json`) as a mapping; empty when there is none (yet)."""
    path = folder / CONFIG
    if not path.is_file():
        return {}
    loaded = json.loads(path.read_text(encoding="utf-8"))
    return loaded if isinstance(loaded, dict) else {}


def flat_params(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """MLflow params: nested mappings flattened to dotted keys (`collapse.ppl_ratio`), None left out.

    `mlflow_tags` are the run's tags, not params (nor a probe job's `run.mlflow_tags`). A value past
    MLflow's 6000 characters is cut (and said so); a key past 250 is left out with a warning.
    """
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if value is None or key == "mlflow_tags":
            continue
        if isinstance(value, dict) and value:
            out.update(flat_params(value, name + "."))
        elif len(name) > MAX_PARAM_KEY:
            log.warning("MLflow param %s... left out: its key is longer than %d characters", name[:60], MAX_PARAM_KEY)
        else:
            out[name] = _param(value, name)
    return out


def _param(value: Any, name: str = "") -> str:
    """An MLflow param value: strings as they are (a password in a URL hidden), anything else as JSON."""
    text = _without_password(value) if isinstance(value, str) else json.dumps(value)
    if len(text) > MAX_PARAM_VALUE:
        log.warning("MLflow param %s cut to %d characters (it has %d)", name, MAX_PARAM_VALUE, len(text))
        text = text[: MAX_PARAM_VALUE - 1] + "…"
    return text


def _without_password(text: str) -> str:
    """A URL with its password replaced by *** (e.g. an --mlflow-uri or --pushgateway with credentials)."""
    try:
        parts = urllib.parse.urlsplit(text)
        password = parts.password
    except ValueError:  # not a URL (e.g. an unbalanced "[" in a path)
        return text
    if not password:
        return text
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _dataset(params: dict[str, Any]) -> dict[str, str] | None:
    """The stream as an MLflow dataset input: its file name, data hash (digest) and absolute path (source).

    Only a stream with a data hash: a --follow run's file grows and standard input has no file,
    so neither has one digest.
    """
    stream, digest = params.get("stream"), params.get("data_hash")
    if not stream or stream == "-" or not digest:
        return None
    path = Path(stream).resolve()
    return {"name": path.name, "digest": str(digest), "source": str(path), "context": DATASET_CONTEXT}


class _Sender(threading.Thread):
    """Sends the journal whenever woken; backs off while the tracking server is unreachable."""

    def __init__(self, journal: Journal) -> None:
        super().__init__(name="mlflow-sender", daemon=True)
        self.journal = journal
        self.error: Exception | None = None  # what stopped the thread, other than an unreachable server
        self._woken = threading.Event()
        self._stopping = threading.Event()
        self._tried = threading.Condition()  # notified after every attempt to send, and when the thread ends
        self._hurry = False  # someone waits for the journal to be sent: retry at the short backoff
        self._closing = False  # end the thread once everything is sent
        self._done = False
        self._outage = False

    def wake(self) -> None:
        """Send what is new."""
        self._woken.set()

    def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds until everything journaled so far is sent (or rejected); False when not."""
        target = self.journal.size()
        self._hurry = True
        self.wake()

        def sent() -> bool:
            return self.journal.state()["offset"] >= target

        with self._tried:
            self._tried.wait_for(lambda: self._done or sent(), timeout)
        self._hurry = self._closing  # nobody waits any more (unless the run is closing)
        return sent()

    def finish(self, timeout: float) -> bool:
        """Send everything left, waiting up to `timeout` seconds; False when some is still unsent."""
        self._hurry = self._closing = True
        self.wake()
        self.join(timeout)
        return not self.is_alive()

    def stop(self, timeout: float) -> None:
        """Give up: no further operation is sent; waits up to `timeout` seconds for one in flight."""
        self._stopping.set()
        self.wake()
        self.join(timeout)

    def run(self) -> None:
        try:
            self._send_until_done()
        except Exception as error:  # anything else would end the thread silently; close() reports it
            log.exception("the MLflow sender stopped on an unexpected error; the journal %s keeps what is unsent",
                          self.journal.folder)
            self.error = error
        finally:
            self._done = True
            self._notify()

    def _notify(self) -> None:
        with self._tried:
            self._tried.notify_all()

    def _send_until_done(self) -> None:
        delay: float | None = None
        while not self._stopping.is_set():
            self._woken.wait(delay)
            self._woken.clear()
            if self._stopping.is_set():
                return
            try:
                sent = send(self.journal, self._stopping)
            except TrackingUnavailable as error:
                if not self._outage:
                    log.warning("MLflow tracking unreachable (%s): buffering in %s and retrying; the run goes on",
                                error, self.journal.folder)
                    self._outage = True
                cap = CLOSING_RETRY_SECONDS if self._hurry else RETRY_SECONDS[1]
                delay = min(2 * delay if delay else RETRY_SECONDS[0], cap)
                continue
            finally:
                self._notify()
            if self._outage:
                log.warning("MLflow tracking reachable again: %d buffered operations sent", sent)
                self._outage = False
            delay = None
            if self._closing:
                return


def sync(folder: Path, uri: str | None = None) -> int:
    """Send the operations a run left unsent in `folder/mlflow` (to `uri`, else where it started); how many."""
    journal = Journal(Path(folder) / FOLDER)
    if not journal.exists():
        raise FileNotFoundError(f"no MLflow journal in {folder} (expected {journal.path})")
    if uri is not None and uri != journal.state().get("uri"):
        # Another tracking server: the whole run, anew; what the old one rejected is kept aside.
        if (moved := DeadLetters(journal.folder).archive()) is not None:
            log.info("%s: the writes %s rejected moved to %s", folder, journal.state().get("uri"), moved)
        journal.save_state({"offset": 0, "uri": uri})
    return send(journal)


def dead_letters(folder: Path) -> DeadLetters:
    """The writes the tracking server rejected for the run in `folder` (its `mlflow/dead_letter.jsonl`)."""
    return DeadLetters(Path(folder) / FOLDER)


def send(journal: Journal, stop: threading.Event | None = None) -> int:
    """Send the unsent operations in order, recording progress, until done or `stop` is set; how many were sent
    (rejected ones included: they are the dead letters).

    TrackingUnavailable when the server is unreachable; JournalError for a line that is not an operation;
    TrackingRejected when the run's experiment cannot be created.
    """
    for name, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    import mlflow
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import OperationalError

    state = journal.state()
    if state.get("uri") is None:
        state["uri"] = _absolute(mlflow.get_tracking_uri())
        journal.save_state(state)
    letters = DeadLetters(journal.folder)
    sent = 0
    for end, op in journal.pending(state["offset"]):
        if stop is not None and stop.is_set():
            break
        try:
            rejected = _send_one(_client(state["uri"]), op, state, journal.folder)
        except MlflowException as error:  # not the operation's fault (5xx, RETRIED_4XX): the server's trouble
            raise TrackingUnavailable(f"{state['uri']}: {error.message[:300]}") from error
        except (OSError, OperationalError) as error:  # requests' errors are OSErrors; sqlite: database locked
            raise TrackingUnavailable(f"{state['uri']}: {error}") from error
        if rejected:
            context = {"run_id": state.get("run_id"), "uri": state["uri"], "time": now_ms()}
            letters.add(state["offset"], [{**letter, **context} for letter in rejected])
            log.error("MLflow rejected %d write(s) of the %r operation (%s): kept in %s, not sent again",
                      len(rejected), op["op"], rejected[0]["message"][:300], letters.path)
        state["offset"] = end
        journal.save_state(state)
        sent += 1
    return sent


@functools.lru_cache(maxsize=4)
def _client(uri: str) -> Any:
    """One MlflowClient per tracking URI for the process (a sqlite store checks its schema when opened)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _send_one(client: Any, op: dict[str, Any], state: dict[str, Any], folder: Path) -> list[dict[str, Any]]:
    """One journaled operation against MLflow; what MLflow rejected of it, as dead letters (without context).

    `state` learns the run id when the run is created.
    """
    kind = op["op"]
    if kind == "create":
        try:
            experiment = _experiment_id(client, op["experiment"], state["uri"])
        except Exception as error:
            if _rejection(error) is None:
                raise
            raise TrackingRejected(f"{state['uri']} refuses the experiment {op['experiment']!r}: "
                                   f"{_message(error)[:500]}") from None
        journal_id = op["tags"].get(JOURNAL_TAG)
        run = _journal_run(client, experiment, journal_id)
        if run is None:
            # Created with its journal id alone, which MLflow always takes; the other tags (a user's
            # --mlflow-tags among them) go as a batch, so a key MLflow refuses is a dead letter, not a lost run.
            run = client.create_run(experiment, start_time=op["time"], run_name=op["run"],
                                    tags={JOURNAL_TAG: journal_id} if journal_id else {})
        state.update(run_id=run.info.run_id, experiment_id=experiment)
        tags = [(k, v) for k, v in op["tags"].items() if k != JOURNAL_TAG]
        return _log_batches(client, run.info.run_id, "tags", tags, PARAM_BATCH)
    run_id = state.get("run_id")
    if run_id is None:
        raise JournalError(f"journal {folder} has a {kind!r} operation before its run was created")
    if kind == "params":
        return _log_batches(client, run_id, "params", list(op["params"].items()), PARAM_BATCH)
    if kind == "metrics":
        return _log_batches(client, run_id, "metrics", op["metrics"], BATCH)
    if kind == "tags":
        return _log_batches(client, run_id, "tags", list(op["tags"].items()), PARAM_BATCH)
    calls: dict[str, Callable[[], Any]] = {
        "inputs": lambda: client.log_inputs(run_id, datasets=[_dataset_input(spec) for spec in op["datasets"]]),
        "artifacts": lambda: client.log_artifacts(run_id, str(folder / op["dir"])),
        "resume": lambda: client.update_run(run_id, status="RUNNING"),
        "end": lambda: client.set_terminated(run_id, status=op["status"], end_time=op["time"]),
    }
    if kind not in calls:
        raise JournalError(f"unknown operation {kind!r} in the MLflow journal {folder} (written by a newer editwatch?)")
    try:
        calls[kind]()
    except Exception as error:
        if (status := _rejection(error)) is None:
            raise
        return [{**op, "status": status, "message": _message(error)}]
    return []


def _log_batches(client: Any, run_id: str, field: str, items: list[Any], size: int) -> list[dict[str, Any]]:
    """log_batch `items` (journal form: [key, value, time, step] rows or (key, value) pairs) `size` at a time;
    the dead letters, one per item MLflow rejected."""
    letters: list[dict[str, Any]] = []
    for start in range(0, len(items), size):
        _log_halves(client, run_id, field, items[start : start + size], letters)
    return letters


def _log_halves(client: Any, run_id: str, field: str, items: list[Any], letters: list[dict[str, Any]]) -> None:
    """One log_batch call; when MLflow rejects it (the whole batch, for any bad item), each half on its own:
    k bad items among n cost about 2k log2(n) calls, and every good item arrives."""
    from mlflow.exceptions import MlflowException

    try:
        client.log_batch(run_id, **{field: _entities(field, items)})
    except MlflowException as error:
        if (status := _rejection(error)) is None:
            raise
        if len(items) == 1:
            rejected = items if field == "metrics" else dict(items)
            letters.append({"op": field, field: rejected, "status": status, "message": _message(error)})
            return
        half = len(items) // 2
        _log_halves(client, run_id, field, items[:half], letters)
        _log_halves(client, run_id, field, items[half:], letters)


def _entities(field: str, items: list[Any]) -> list[Any]:
    """MLflow's Metric, Param or RunTag objects of journal items."""
    from mlflow.entities import Metric, Param, RunTag

    if field == "metrics":
        # A journal written before non-finite values were kept holds null for NaN and infinities alike.
        return [Metric(key, math.nan if value is None else float(value), stamp, step)
                for key, value, stamp, step in items]
    return [(Param if field == "params" else RunTag)(key, value) for key, value in items]


def _rejection(error: Exception) -> int | None:
    """The HTTP status of an answer that rejects the operation itself: 4xx, not one of RETRIED_4XX; else None."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
    elif isinstance(error, requests.HTTPError) and error.response is not None:  # an artifact upload
        status = error.response.status_code
    else:
        return None
    return status if 400 <= status < 500 and status not in RETRIED_4XX else None


def _message(error: Exception) -> str:
    """The server's answer: an MlflowException's message, else the error as text."""
    return str(getattr(error, "message", error))


def _dataset_input(spec: dict[str, str]) -> Any:
    """An MLflow dataset input of a local file, described as MLflow's own `MetaDataset` over a local source
    describes one (source type "local", source {"uri": PATH}), tagged with its context."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(name=spec["name"], digest=spec["digest"], source_type="local",
                      source=json.dumps({"uri": spec["source"]}))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", spec["context"])])


def _journal_run(client: Any, experiment: str, journal_id: str | None) -> Any:
    """The run a previous attempt created for this journal, if any (journals before JOURNAL_TAG have no id)."""
    if journal_id is None:
        return None
    found = client.search_runs([experiment], f"tags.`{JOURNAL_TAG}` = '{journal_id}'", max_results=1)
    return found[0] if found else None


def _experiment_id(client: Any, name: str, uri: str) -> str:
    """The experiment `name`, created when missing (artifacts beside a local sqlite database); tagged to open in
    MLflow's training view unless it already says which kind it is."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        if EXPERIMENT_KIND[0] not in found.tags:
            client.set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        # MLflow would put artifacts under ./mlruns of whatever the working directory is;
        # beside the database keeps a run's files with its records wherever it is run from.
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlruns" / slug).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
    except MlflowException:  # created meanwhile by a parallel run
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _absolute(uri: str) -> str:
    """A local sqlite URI with an absolute path, so a later `sync` from elsewhere finds the same database."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri
