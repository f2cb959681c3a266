"""The zygote's children stand in for fresh processes (thread counts from their environment, how `python -c` ends),
and the zygote outlives a child a test let go of."""

import os
import subprocess
import sys
import time

import pytest

from tests import zygote

THREADS = "import faiss, sys, torch; print(torch.get_num_threads(), faiss.omp_get_max_threads(), sys.argv[1:])"


@pytest.mark.parametrize("threads", [None, "1", "2"])
def test_a_forked_child_takes_its_thread_counts_from_its_environment_as_a_fresh_process_does(threads):
    env = {name: value for name, value in os.environ.items() if name != "OMP_NUM_THREADS"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    command = [sys.executable, "-c", THREADS, "an argument"]
    fresh = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    forked = zygote.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0, fresh.stderr
    assert (forked.returncode, forked.stdout) == (0, fresh.stdout), forked.stderr
    if threads is not None:
        assert fresh.stdout.split()[:2] == [threads, threads]


@pytest.mark.parametrize("code", ["import sys; sys.exit(3)", "raise ValueError('no')", "raise SystemExit('bye')",
                                  "raise KeyboardInterrupt", "print(__name__, '__file__' in globals())"])
def test_python_c_in_a_forked_child_ends_as_in_a_fresh_process(code):
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    forked = zygote.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (forked.returncode, forked.stdout) == (fresh.returncode, fresh.stdout)
    assert forked.stderr.splitlines()[-1:] == fresh.stderr.splitlines()[-1:]  # the error, or nothing


def test_the_zygote_outlives_a_child_that_a_test_let_go_of():
    let_go = zygote.Forked([sys.executable, "-c", "import time; time.sleep(0.5)"])
    server = zygote._zygote[0].pid
    let_go.let_go()  # what a failed test leaves behind: nobody reads this child's exit code
    time.sleep(1.5)
    assert zygote.run([sys.executable, "-c", "print('on')"], capture_output=True, text=True, timeout=60).stdout == "on\n"
    assert zygote._zygote[0].pid == server
