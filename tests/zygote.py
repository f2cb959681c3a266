"""`simulate` processes forked from one that has already imported what a run needs, for tests that start many.

A fresh `simulate` process spends 10-13 s of CPU importing torch and transformers before its first edit (MLflow and
sentence-transformers cost 2.5 and 3 s more); a 5-edit run then takes 13.5 s, where a child forked from a process
that holds those imports takes 1.1 s with the same outputs. The zygote (one a test process, started on first use)
imports them and forks one child per request. The child takes the request's stdio, working folder, environment and
arguments and runs the console script's `simulator.cli.main`, or for `python -c CODE ARGS` runs CODE (a patched
`simulate`), as its own top-level code: a real process that signals reach, that ends as a fresh one would.

Where a child differs from a fresh process, and what keeps forking safe:
- what a library read from the environment when the zygote imported it stays, except torch's and faiss's thread
  counts, which the child sets from its own environment as a fresh process would. Ray is not imported there: a
  sweep's driver reads Ray's variables from its own environment;
- it shares the zygote's string-hash seed and numpy's global random state (a fresh process draws its own), so runs
  forked from one zygote cannot show an output that depends on set order; `test_resume_every_method` resumes in a
  child what ran in the test process, which has another seed;
- it ends without the interpreter's last step, tearing down its modules and objects (seconds in a forked child):
  what only a finalizer would write (a file a run never closed) is lost where a fresh process would write it;
- no thread pool may exist before a fork: the zygote runs with OMP_NUM_THREADS=1, so neither OpenMP nor OpenBLAS
  starts one (libarrow's allocator thread handles forks itself).
`test_resume.py` checks that a forked run writes what a fresh `simulate` process writes.
"""

from __future__ import annotations

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

from tests.services import SIMULATE, one_thread_env

# Runs in the zygote: accepts one request per connection, answers the child's pid, then its exit code. A child leaves
# the loop and runs its request, then ends as a fresh process would (a traceback or SystemExit's message, non-daemon
# threads joined, atexit handlers, the exit code), short of tearing down its modules.
SERVER = r"""
import atexit, json, os, select, signal, socket, sys, threading, types
import editors.adapter, faiss, simulator.cli, simulator.run, torch, transformers.image_processing_utils  # every run's
import mlflow, sentence_transformers  # what a run logging to MLflow, or of a memory editor, imports too


def tell(connection, line):
    try:
        connection.sendall(f"{line}\n".encode())
    except OSError:  # the test let go of this child (it failed, or timed out): nobody is asking
        pass


server = socket.socket(socket.AF_UNIX)
server.bind(sys.argv[1])
server.listen()
parent = os.getppid()
print("ready", flush=True)
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing more goes to the pipe the test process stopped reading
children, request = {}, None
while request is None and os.getppid() == parent:
    if select.select([server], [], [], 0.02)[0]:
        connection, _ = server.accept()
        message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
        pid = os.fork()
        if pid == 0:
            for held in (server, connection, *children.values()):
                held.close()
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            request = json.loads(message)
            break
        for fd in fds:
            os.close(fd)
        tell(connection, pid)
        children[pid] = connection
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            break
        connection = children.pop(pid)
        tell(connection, os.waitstatus_to_exitcode(status))
        connection.close()
if request is None:  # the test process is gone: so are the runs it started
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    sys.exit()
os.chdir(request["cwd"])
os.environ.clear()
os.environ.update(request["env"])
# A fresh process sets its thread counts from the environment when it loads torch and faiss; here they are loaded.
# torch: MKL_NUM_THREADS, else OMP_NUM_THREADS, else its own default (the physical cores), which it also takes
# for the inter-op pool the zygote never sized. faiss (OpenMP): OMP_NUM_THREADS, else the CPUs this process may use.
omp = os.environ.get("OMP_NUM_THREADS")
torch.set_num_threads(int(os.environ.get("MKL_NUM_THREADS") or omp or torch.get_num_interop_threads()))
faiss.omp_set_num_threads(int(omp or len(os.sched_getaffinity(0))))
sys.argv = request["argv"]
main = types.ModuleType("__main__")
sys.modules["__main__"] = main
status, interrupted = 0, False
try:
    if request["code"] is None:  # the console script
        main.__file__ = sys.argv[0]
        sys.path[0] = os.path.dirname(sys.argv[0])
        sys.exit(simulator.cli.main())
    exec(compile(request["code"], "<string>", "exec"), main.__dict__)  # python -c CODE ARGS
except SystemExit as exit:  # as the interpreter takes it
    status = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
    if not isinstance(exit.code, int | None):
        print(exit.code, file=sys.stderr)
except BaseException:
    sys.excepthook(*sys.exc_info())
    status, interrupted = 1, isinstance(sys.exc_info()[1], KeyboardInterrupt)
# The interpreter's exit, less its last step: tearing down every module and object would touch the pages the child
# shares with the zygote and cost it seconds (4 s against 0.1 s for `pass`); a fresh process's objects are not shared.
threading._shutdown()
atexit._run_exitfuncs()
sys.stdout.flush()
sys.stderr.flush()
if interrupted:  # as the interpreter does after an uncaught KeyboardInterrupt: ends by SIGINT
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
os._exit(status)
"""

_zygote: tuple[subprocess.Popen, str] | None = None


def _address() -> str:
    """The zygote's socket, started on first use. The zygote ends, and kills the runs it started, when this process
    has exited."""
    global _zygote
    if _zygote is None or _zygote[0].poll() is not None:
        folder = tempfile.mkdtemp(prefix="zygote-")
        address = str(Path(folder) / "socket")
        process = subprocess.Popen([sys.executable, "-c", SERVER, address], stdout=subprocess.PIPE,
                                   env=one_thread_env(), text=True)
        assert process.stdout is not None and process.stdout.readline().strip() == "ready", "the zygote did not start"
        _zygote = process, address
    return _zygote[1]


class Forked:
    """A `simulate` (or `python -c CODE`) forked by the zygote, handled like `subprocess.Popen` (what the tests use
    of it)."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None, stdout: Any = None,
                 stderr: Any = None, text: bool = False, cwd: str | Path | None = None) -> None:
        if command[0] == SIMULATE:
            code, argv = None, command
        elif command[:2] == [sys.executable, "-c"] and len(command) > 2:
            code, argv = command[2], ["-c", *command[3:]]
        else:
            raise ValueError(f"the zygote runs {SIMULATE} or {sys.executable} -c CODE, not {command[:2]}")
        self.args, self.text = command, text
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
            elif target == subprocess.STDOUT and name == "stderr":
                fds.append(os.dup(fds[1]))
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
            try:
                os.kill(self.pid, number)
            except ProcessLookupError:  # it ended before the zygote said so
                pass

    def kill(self) -> None:
        """SIGKILL the child."""
        self.send_signal(signal.SIGKILL)

    def let_go(self) -> None:
        """Stop listening for the child's exit, as a failed test does: the child runs on, the zygote serves others."""
        self._lines.close()
        self._connection.close()

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
        timeout: float | None = None, check: bool = False, cwd: str | Path | None = None
        ) -> subprocess.CompletedProcess:
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
