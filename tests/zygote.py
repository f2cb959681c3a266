"""`simulate` processes forked from one that has already imported what a run needs, for tests that start many.

A fresh `simulate` process spends 10-13 s of CPU importing torch and transformers before its first
edit (MLflow and sentence-transformers cost 2.5 and 3 s more); a 5-edit run then takes 13.5 s, where a child forked from a process that holds those imports
takes 1.1 s with the same outputs. The zygote is a single-threaded process (one a test process,
started on first use) that imports them and forks one child per request: the child takes the
request's stdio, working folder, environment and arguments and runs `simulator.cli.main`, a real
process that signals reach as they reach any; or, for `python -c CODE ARGS`, runs CODE (a patched
`simulate`). What a library reads from the environment when it is imported comes from the
zygote's (the test process's), except torch's and faiss's thread counts: the child sets them from
the request's `OMP_NUM_THREADS` (all CPUs without it), as a fresh process reads them. A test that
changes another such variable for its run (Ray's) starts a real `simulate` instead.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.services import SIMULATE

# Runs in the zygote: accepts one request per connection, answers the child's pid, then its exit code.
SERVER = r"""
import json, os, select, socket, sys, traceback
import editors.adapter, faiss, simulator.cli, simulator.run, torch, transformers.image_processing_utils  # every run's
import mlflow, sentence_transformers  # what a run logging to MLflow, or of a memory editor, imports too

server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1])
server.listen()
parent = os.getppid()
print("ready", flush=True)
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing more goes to the pipe the test process stopped reading
children = {}
while os.getppid() == parent:  # the test process is gone: so is the zygote
    if select.select([server], [], [], 0.02)[0]:
        connection, _ = server.accept()
        message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
        request = json.loads(message)
        pid = os.fork()
        if pid == 0:
            for held in (server, connection, *children.values()):
                held.close()
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            # A fresh process takes its thread counts from the environment when torch and faiss load; they are loaded.
            threads = int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))
            torch.set_num_threads(threads)
            faiss.omp_set_num_threads(threads)
            sys.argv = request["argv"]
            code = 1
            try:
                if request["code"] is None:
                    code = simulator.cli.main()
                else:  # python -c CODE ARGS
                    exec(compile(request["code"], "<string>", "exec"), {"__name__": "__main__"})
                    code = 0
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        for fd in fds:
            os.close(fd)
        connection.sendall(f"{pid}\n".encode())
        children[pid] = connection
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            break
        connection = children.pop(pid)
        connection.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
        connection.close()
"""

_zygote: tuple[subprocess.Popen, str] | None = None


def _address() -> str:
    """The zygote's socket, started on first use and stopped when this process exits."""
    global _zygote
    if _zygote is None or _zygote[0].poll() is not None:
        folder = tempfile.mkdtemp(prefix="zygote-")
        address = str(Path(folder) / "socket")
        process = subprocess.Popen([sys.executable, "-c", SERVER, address], stdout=subprocess.PIPE,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True)
        assert process.stdout is not None and process.stdout.readline().strip() == "ready", "the zygote did not start"
        atexit.register(process.kill)
        _zygote = process, address
    return _zygote[1]


class Forked:
    """A `simulate` (or `python -c CODE`) forked by the zygote, handled like `subprocess.Popen` (what the tests use
    of it)."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None, stdout: Any = None,
                 stderr: Any = None, text: bool = False, cwd: str | Path | None = None) -> None:
        if command[0] == SIMULATE:
            code, argv = None, ["simulate", *command[1:]]
        elif command[:2] == [sys.executable, "-c"] and len(command) > 2:
            code, argv = command[2], ["-c", *command[3:]]
        else:
            raise ValueError(f"the zygote runs {SIMULATE} or {sys.executable} -c CODE, not {command[:2]}")
        self.text = text
        self.returncode: int | None = None
        self._pipes: dict[str, int] = {}
        fds = [os.open(os.devnull, os.O_RDONLY)]
        for name, target in (("stdout", stdout), ("stderr", stderr)):
            if target == subprocess.PIPE:
                read, write = os.pipe()
                self._pipes[name] = read
                fds.append(write)
            elif target is None:
                fds.append(os.dup(1 if name == "stdout" else 2))
            elif target == subprocess.DEVNULL:
                fds.append(os.open(os.devnull, os.O_WRONLY))
            else:
                fds.append(os.dup(target.fileno()))
        self._connection = socket.socket(socket.AF_UNIX)
        self._connection.connect(_address())
        request = {"argv": argv, "code": code, "env": dict(os.environ if env is None else env),
                   "cwd": str(cwd or os.getcwd())}
        socket.send_fds(self._connection, [json.dumps(request).encode()], fds)
        for fd in fds:
            os.close(fd)
        self._lines = self._connection.makefile("r")
        self.pid = int(self._lines.readline())

    def poll(self) -> int | None:
        """The exit code if the child has ended, else None."""
        return self._ended(0)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child to end; its exit code (minus the signal that killed it)."""
        code = self._ended(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(SIMULATE, timeout or 0)
        return code

    def _ended(self, timeout: float | None) -> int | None:
        """The exit code, once the zygote reports it within `timeout` seconds (None: wait as long as it takes)."""
        if self.returncode is None and select.select([self._connection], [], [], timeout)[0]:
            self.returncode = int(self._lines.readline())
        return self.returncode

    def send_signal(self, number: int) -> None:
        """Signal the child, unless it has ended."""
        if self.poll() is None:
            os.kill(self.pid, number)

    def kill(self) -> None:
        """SIGKILL the child."""
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[Any, Any]:
        """Read the piped output to its end and wait for the child: (stdout, stderr), None where not piped."""
        deadline = None if timeout is None else time.monotonic() + timeout
        chunks: dict[int, list[bytes]] = {fd: [] for fd in self._pipes.values()}
        open_fds = list(chunks)
        while open_fds:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = select.select(open_fds, [], [], left)[0]
            if not ready:
                raise subprocess.TimeoutExpired(SIMULATE, timeout or 0)
            for fd in ready:
                data = os.read(fd, 1 << 16)
                if data:
                    chunks[fd].append(data)
                else:
                    open_fds.remove(fd)
                    os.close(fd)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        out = {name: b"".join(chunks[fd]) for name, fd in self._pipes.items()}
        if self.text:
            out = {name: data.decode() for name, data in out.items()}
        return out.get("stdout"), out.get("stderr")


def run(command: list[str], env: dict[str, str] | None = None, capture_output: bool = False, text: bool = False,
        timeout: float | None = None, check: bool = False, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """`subprocess.run` of a forked `simulate` (or `python -c CODE`)."""
    pipe = subprocess.PIPE if capture_output else None
    process = Forked(command, env=env, stdout=pipe, stderr=pipe, text=text, cwd=cwd)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    if check and process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command, stdout, stderr)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
