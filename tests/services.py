"""Real services for exporter tests: Prometheus, Pushgateway and MLflow server processes on 127.0.0.1.

Binaries from the Debian packages (`prometheus`, `prometheus-pushgateway`) may be missing on a
developer machine: tests needing them skip there, but fail under CI (CI=true), where
`.ci/run` installs them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

SIMULATE = str(Path(sys.executable).parent / "simulate")
MLFLOW = str(Path(sys.executable).parent / "mlflow")


def one_thread_env(**extra: str) -> dict[str, str]:
    """The environment of a process a test starts: this process's as it is now (the session's cache and MLflow store
    are set once its fixtures have run, not when a test module is imported), one thread, and `extra`."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def require_binary(name: str) -> str:
    """Path of an executable; skips the test without it, except under CI where it must exist."""
    path = shutil.which(name)
    if path is None:
        message = (f"{name} is not installed (apt-get install prometheus prometheus-pushgateway "
                   "prometheus-alertmanager chromium-headless-shell)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " — CI must install it")
        pytest.skip(message)
    return path


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(url: str, timeout: float = 5.0) -> bytes:
    """The body of an HTTP GET."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def get_json(url: str) -> Any:
    """An HTTP GET answered with JSON."""
    return json.loads(get(url))


def wait_until(condition, timeout: float, what: str, process: subprocess.Popen | None = None, poll: float = 0.2):
    """Poll `condition()` until it returns something truthy; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            pytest.fail(f"process {process.args[0]} exited ({process.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def answers(url: str) -> bool:
    """Whether `url` answers 200 now."""
    try:
        get(url, timeout=2)
    except (urllib.error.URLError, OSError):
        return False
    return True


class Service:
    """A server process in its own session (its children die with it), logging to a file."""

    def __init__(self, args: list[str], log: Path, ready_url: str, env: dict[str, str] | None = None,
                 startup_seconds: float = 60.0) -> None:
        self.args, self.log, self.ready_url, self.env = args, log, ready_url, env
        self.startup_seconds = startup_seconds
        self.process: subprocess.Popen | None = None

    def start(self) -> Service:
        """Start and wait until `ready_url` answers."""
        with self.log.open("a") as out:
            self.process = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**os.environ, **(self.env or {})})
        wait_until(lambda: answers(self.ready_url), self.startup_seconds, f"{self.args[0]} to answer",
                   self.process, poll=0.25)
        return self

    def kill(self) -> None:
        """SIGKILL the whole session: the server dies as in a crash."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """Terminate the session (SIGKILL after 10 s)."""
        if self.process is None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            self.process.wait()


def pushgateway_service(folder: Path) -> Service:
    """A Pushgateway on a free port, its metrics in memory only (not started).

    Debian's build persists to /var/lib/prometheus/pushgateway.data by default: every test's gateway would start
    with the groups of the ones before it.
    """
    port = free_port()
    return Service([require_binary("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{port}",
                    "--persistence.file="],
                   folder / "pushgateway.log", f"http://127.0.0.1:{port}/-/ready")


def mlflow_service(folder: Path) -> Service:
    """`mlflow server` on a free port with a sqlite store and artifacts in `folder` (not started).

    Its background job runner is switched off: it starts a dozen worker processes we do not need.
    """
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    return Service([MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                    "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                    "--artifacts-destination", str(folder / "artifacts")],
                   folder / "server.log", f"http://127.0.0.1:{port}/health",
                   env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, startup_seconds=180.0)


def url_of(service: Service) -> str:
    """The base URL of a service (its ready URL without the path)."""
    scheme, _, rest = service.ready_url.partition("://")
    return f"{scheme}://{rest.split('/')[0]}"


@pytest.fixture
def pushgateway(tmp_path):
    """A running Pushgateway; yields its URL."""
    service = pushgateway_service(tmp_path).start()
    yield url_of(service)
    service.stop()
