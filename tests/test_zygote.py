"""The zygote's children stand in for fresh processes: thread counts from their environment, `python -c` exit codes."""

import os
import subprocess
import sys

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
    assert (forked.returncode, forked.stdout) == (fresh.returncode, fresh.stdout) == (0, fresh.stdout)
    counts = fresh.stdout.split()[:2]
    assert counts == [threads or str(len(os.sched_getaffinity(0)))] * 2


@pytest.mark.parametrize("code, status", [("import sys; sys.exit(3)", 3), ("raise ValueError('no')", 1), ("", 0)])
def test_python_c_in_a_forked_child_exits_as_it_would_in_a_fresh_process(code, status):
    result = zygote.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == status
    assert ("ValueError: no" in result.stderr) == (status == 1)
