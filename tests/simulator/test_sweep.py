"""`simulate sweep` on a real local Ray instance: cells equal runs alone, a killed worker and an interrupted
driver resume from checkpoints, MLflow parent/child runs and the compare table, every file mistake at once.

The drivers (`simulate sweep`) are forked from `tests.zygote`, which has not imported Ray: each child imports it under
the environment the test gives it. Ray's own processes and its workers start as Ray starts them."""

import csv
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from editors.edit_memory import shared_text_embedder
from memory.files import current_folder
from simulator import cli
from simulator.sweep import CELL_ERROR, LOCAL_ONLY
from simulator.sweep_config import load_sweep
from tests import zygote
from tests.services import (SIMULATE, free_port, get, mlflow_service, one_thread_env, pushgateway_service, url_of,
                            wait_until)

REPO = Path(__file__).resolve().parents[2]
# Every cell and every run alone: 20 edits of the small world, a checkpoint every 5.
SETTINGS = {"gap": [1, 3], "probe_every": 4, "checkpoint_every": 5, "retention_sample": 5, "reference_size": 4,
            "limit": 20}


def env():
    """The environment of a `simulate` process: one thread, no Ray usage report, every worker line shown."""
    return one_thread_env(RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0")


def write_sweep(folder, world, model, name, grid, **base):
    """A sweep file over the small world and model."""
    spec = {"name": name, "grid": grid, "resources": {"cpu": 1},
            "base": {"stream": str(world / "eval.jsonl"), "model": str(model), **SETTINGS, "no_mlflow": True, **base}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))  # the grid's order names the cells
    return path


def lines(path):
    return len(path.read_text().splitlines()) if path.exists() else 0


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def summary(folder):
    return json.loads((folder / "summary.json").read_text())


def untimed(value):
    """`value` without wall-clock measurements (probe_seconds, edits_per_second, retrieval latencies), which
    differ between any two runs of the same cell, and without the MLflow exporter's count (cells log to
    MLflow, the runs alone do not); everything else must match."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items()
                if "seconds" not in k and "per_second" not in k and k != "mlflow_dead_letters"}
    return [untimed(item) for item in value] if isinstance(value, list) else value


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray instance for the module's sweeps (2 CPUs, no dashboard); its address for --address."""
    patch = pytest.MonkeyPatch()
    # The workers inherit the environment Ray starts with. Loopback only, as a sweep's own local instance: Ray reads
    # the switch when imported, and the drivers pointed at this instance (their environment is this one) need it too.
    for name, value in {**env(), LOCAL_ONLY: "0"}.items():
        patch.setenv(name, value)
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    patch.undo()


@pytest.fixture(scope="module")
def alone(small_world, small_model, tmp_path_factory):
    """`alone(method, seed, name)`: the folder of that cell run alone with `simulate` (in this process), once."""
    done = {}

    def run(method, seed, name):
        if name not in done:
            out = tmp_path_factory.mktemp("alone") / name
            flags = [f"--{key.replace('_', '-')}" for key in SETTINGS]
            args = ["--stream", str(small_world / "eval.jsonl"), "--model", str(small_model), "--method", method,
                    "--seed", str(seed), "--run-name", name, "--out", str(out), "--no-mlflow"]
            for flag, value in zip(flags, SETTINGS.values()):
                args += [flag, *map(str, value if isinstance(value, list) else [value])]
            # One thread, as the cells' workers (OMP_NUM_THREADS=1), and no embeddings cached by earlier tests:
            # float sums depend on the thread count and on the shapes of the batches a text was embedded in.
            shared_text_embedder().clear()
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                assert cli.main(args) == 0
            finally:
                torch.set_num_threads(threads)
            done[name] = out
        return done[name]

    return run


@pytest.fixture(scope="module")
def grid(small_world, small_model, ray_address, tmp_path_factory):
    """A 2 x 2 sweep (two methods x two seeds) logged to a real `mlflow server`, pushing to a Pushgateway if any."""
    folder = tmp_path_factory.mktemp("grid")
    server = mlflow_service(folder / "mlflow")
    has_pushgateway = shutil.which("prometheus-pushgateway") or os.environ.get("CI", "").lower() == "true"
    pushgateway = pushgateway_service(folder) if has_pushgateway else None
    try:
        server.start()
        push_url = url_of(pushgateway.start()) if pushgateway else None
        path = write_sweep(folder, small_world, small_model, "grid", {"method": ["ft-llm", "ike"], "seed": [0, 1]},
                           no_mlflow=False, mlflow_uri=url_of(server), mlflow_experiment="sweep", pushgateway=push_url)
        out = folder / "sweep"
        result = zygote.run([SIMULATE, "sweep", str(path), "--address", ray_address, "--out", str(out)], env=env(),
                            capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-5000:]
        yield {"out": out, "mlflow": url_of(server), "pushgateway": push_url, "stdout": result.stdout}
    finally:
        server.stop()
        if pushgateway:
            pushgateway.stop()


CELLS = [(method, seed, f"method={method},seed={seed}") for method in ("ft-llm", "ike") for seed in (0, 1)]


@pytest.mark.slow
def test_each_cell_of_a_grid_ends_as_the_same_run_alone(grid, alone):
    assert summary(grid["out"])["cells"] == {name: {"status": "finished"} for _, _, name in CELLS}
    for method, seed, name in CELLS:
        cell, expected = grid["out"] / "cells" / name, alone(method, seed, name)
        # Only timings are left out: the run alone is named like the cell, and the sweep resolves the
        # same absolute stream and model paths, so everything measured must match.
        assert untimed(summary(cell)) == untimed(summary(expected)), name
        assert summary(cell)["edits_applied"] == 20
        assert untimed(rows(cell / "rounds.jsonl")) == untimed(rows(expected / "rounds.jsonl")), name
    assert "Trial status: 4 TERMINATED" in grid["stdout"]  # Ray Tune ran the cells


@pytest.mark.slow
def test_the_sweep_is_one_mlflow_parent_run_with_a_child_per_cell_and_a_compare_table(grid):
    from mlflow import MlflowClient

    client = MlflowClient(grid["mlflow"])
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    parents = [run for run in runs if run.data.tags["editwatch.kind"] == "sweep"]
    assert [(run.info.run_name, run.info.status) for run in parents] == [("grid", "FINISHED")]
    parent = parents[0]
    assert parent.data.tags["editwatch.stopped"] == "end of grid"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"config.json", "summary.json"}
    children = {run.info.run_name: run for run in runs if run is not parent}
    assert set(children) == {name for _, _, name in CELLS}
    for method, seed, name in CELLS:
        child = children[name]
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert (child.data.tags["method"], child.data.tags["seed"]) == (method, str(seed))  # the grid values
        assert (child.data.params["method"], child.data.params["seed"]) == (method, str(seed))

    table = grid["out"] / "compare"
    with (table / "table.csv").open() as handle:
        found = list(csv.DictReader(handle))
    assert sorted((row["setting"], row["method"], row["n"], row["status"]) for row in found) == [
        (setting, method, "2", "2 finished") for setting in ("gap_1", "gap_3") for method in ("ft-llm", "ike")]
    for row in found:  # each value: the mean over the two seeds' final numbers
        seeds = [summary(grid["out"] / "cells" / f"method={row['method']},seed={seed}")["results"][row["setting"]]
                 for seed in (0, 1)]
        for key in ("reliability", "t_loc", "i_loc", "port_4hop"):
            assert float(row[key]) == pytest.approx(sum(s[key] for s in seeds) / 2), (row, key)
    assert (table / "table.md").read_text().count("| 2 finished |") == 4
    assert (table / "plots" / "retention.png").stat().st_size > 0


@pytest.mark.slow
def test_each_cell_pushes_its_metrics_labelled_with_its_name(grid):
    if grid["pushgateway"] is None:
        pytest.skip("prometheus-pushgateway is not installed (CI installs it)")
    metrics = get(grid["pushgateway"] + "/metrics").decode()
    for _, _, name in CELLS:
        applied = [line for line in metrics.splitlines()
                   if line.startswith("editwatch_edits_applied_total{") and f'run="{name}"' in line]
        assert len(applied) == 1 and applied[0].endswith(" 20"), (name, applied)


def descendants(root):
    """The pids of the processes under process `root`: its children, theirs, and so on."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        pid = int(proc.name)
        try:
            while pid > 1:
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                if pid == root:
                    found.append(int(proc.name))
                    break
        except OSError:  # a process that ended meanwhile
            continue
    return found


def ray_worker(cell):
    """The pid of the Ray worker (a descendant of this process, whose Ray runs the sweeps) running `cell`.

    A function trainable's worker is titled `ray::ImplicitFunc...` and works in a folder named after
    its trial, which the sweep names after the cell.
    """
    found = []
    for pid in descendants(os.getpid()):
        try:
            if (Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ImplicitFunc")
                    and Path(os.readlink(f"/proc/{pid}/cwd")).name == cell):
                found.append(pid)
        except OSError:  # one that ended meanwhile
            continue
    return found


def listening_addresses(root):
    """The addresses that process `root` and its descendants accept TCP connections on (from /proc/net)."""
    sockets = set()
    for pid in [root, *descendants(root)]:
        try:
            sockets |= {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()}
        except OSError:  # a process that ended meanwhile
            continue
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()  # local address, state and inode are the 2nd, 4th and 10th
            if fields[3] == "0A" and f"socket:[{fields[9]}]" in sockets:  # 0A: LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])  # 32-bit words in host (little-endian) order
                found.add(socket.inet_ntop(family, b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))))
    return found


def loopback(address):
    """Whether a listening address is the loopback one (also as an IPv4-mapped IPv6 address)."""
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


@pytest.mark.slow
def test_a_killed_worker_is_retried_from_the_cells_checkpoint_and_a_cells_own_error_is_not(
        small_world, small_model, ray_address, alone, tmp_path):
    path = write_sweep(tmp_path, small_world, small_model, "kill",
                       {"prompt_format": ["auto", "chat"], "method": ["ft-llm"], "seed": [0]})
    out = tmp_path / "sweep"
    log = tmp_path / "driver.log"
    with log.open("w") as output:
        driver = zygote.Forked([SIMULATE, "sweep", str(path), "--address", ray_address, "--out", str(out)],
                               env=env(), stdout=output, stderr=output)
    cell = out / "cells" / "prompt_format=auto,method=ft-llm,seed=0"
    wait_until(lambda: lines(cell / "pool.jsonl") >= 7, 240, "the cell past its first checkpoint", driver, poll=0.02)
    worker = wait_until(lambda: ray_worker(cell.name), 10, "the cell's Ray worker", driver, poll=0.02)
    assert len(worker) == 1
    os.kill(worker[0], signal.SIGKILL)
    # Read at once: the retried worker needs seconds to start, then cuts the pool back to the checkpoint.
    done = lines(cell / "pool.jsonl")
    checkpoint = json.loads((current_folder(cell / "checkpoint") / "checkpoint.json").read_text())
    assert 0 < checkpoint["applied"] < done

    assert driver.wait(300) == 1  # the chat cell failed
    output = log.read_text()
    # The retry continued from the checkpoint: it re-applied 20 - applied edits, not 20.
    assert f"resuming {cell.name} after line {checkpoint['line']} ({checkpoint['applied']} edits applied)" in output
    assert output.count("resuming ") == 1
    assert untimed(summary(cell)) == untimed(summary(alone("ft-llm", 0, cell.name)))
    # The cell whose model has no chat template failed once, for its own reason, and was not retried.
    failed = "cell prompt_format=chat,method=ft-llm,seed=0 failed: prompt_format='chat' but"
    assert output.count(failed) == 1, output[-3000:]
    assert [s["status"] for s in summary(out)["cells"].values()] == ["finished", "failed"]
    # --resume runs the failed cell again (its cause may have been fixed; here it was not) and keeps the finished one.
    resumed = zygote.run([SIMULATE, "sweep", str(path), "--address", ray_address, "--out", str(out), "--resume"],
                         env=env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 1 and (resumed.stdout + resumed.stderr).count(failed) == 1, resumed.stderr[-3000:]
    assert f"cell {cell.name} finished before: kept as it is" in resumed.stdout + resumed.stderr
    assert [s["status"] for s in summary(out)["cells"].values()] == ["finished", "failed"]
    assert sorted(p.name for p in (out / "ray").iterdir() if p.is_dir()) == ["start-1", "start-2"]
    rerun = out / "ray" / "start-2" / "prompt_format=chat,method=ft-llm,seed=0" / "result.json"
    assert CELL_ERROR in json.loads(rerun.read_text().splitlines()[-1])  # the second start ran it


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_touching_finished_cells(small_world, small_model, alone, tmp_path):
    path = write_sweep(tmp_path, small_world, small_model, "stopped", {"method": ["ft-llm"], "seed": [1, 0]})
    out = tmp_path / "sweep"
    # No --address: the driver starts its own local Ray, as a user's first sweep does.
    args = [SIMULATE, "sweep", str(path), "--out", str(out), "--max-concurrent", "1"]
    first, second = out / "cells" / "method=ft-llm,seed=1", out / "cells" / "method=ft-llm,seed=0"
    log = tmp_path / "driver.log"
    # Without the module's loopback switch (its own Ray set it in this environment): the sweep sets it itself.
    first_start = {name: value for name, value in env().items() if name != LOCAL_ONLY}
    with log.open("w") as output:
        driver = zygote.Forked(args, env=first_start, stdout=output, stderr=output)
    wait_until(lambda: (first / "summary.json").exists() and lines(second / "pool.jsonl") >= 7, 300,
               "the first cell finished and the second past its first checkpoint", driver, poll=0.02)
    # The local Ray it started (GCS, raylet, workers, agents) listens on the loopback address only.
    addresses = listening_addresses(driver.pid)
    assert addresses and all(loopback(a) for a in addresses), addresses
    driver.send_signal(signal.SIGINT)
    assert driver.wait(120) == 130, log.read_text()[-3000:]
    assert "Started a local Ray instance" in log.read_text()
    assert summary(out)["cells"] == {first.name: {"status": "finished"}, second.name: {"status": "unfinished"}}
    assert not (second / "summary.json").exists()
    kept = (first / "summary.json").stat().st_mtime_ns, (first / "summary.json").read_bytes()

    resumed = zygote.run(args + ["--resume"], env=env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ((first / "summary.json").stat().st_mtime_ns, (first / "summary.json").read_bytes()) == kept
    assert f"resuming {second.name} after line" in resumed.stdout + resumed.stderr
    assert f"resuming {first.name}" not in resumed.stdout + resumed.stderr
    assert untimed(summary(second)) == untimed(summary(alone("ft-llm", 0, second.name)))
    assert summary(out)["cells"] == {first.name: {"status": "finished"}, second.name: {"status": "finished"}}

    # Resuming with settings that change what is measured is refused, naming the cell and the setting.
    changed = write_sweep(tmp_path, small_world, small_model, "stopped", {"method": ["ft-llm"], "seed": [1, 0]},
                          gap=[1, 5])
    refused = zygote.run([SIMULATE, "sweep", str(changed), "--out", str(out), "--resume"], env=env(),
                         capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert f"cell {first.name}: cannot resume" in refused.stderr and "--gap: [1, 3] in the checkpoint, [1, 5] now" \
        in refused.stderr


def test_every_mistake_in_a_sweep_file_is_reported_in_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({
        "name": "bad name", "retries": 3, "resources": {"gpu": -1},
        "base": {"stream": "s.jsonl", "gap": [0], "out": "x", "method_config": {"lr": -1}},
        "grid": {"method": ["ft-llm", "nope"], "seeds": [0, 1]},
    }))
    assert cli.main(["sweep", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"simulate: error: invalid sweep file {path}: ")
    for problem in ("name: String should match pattern", "retries: Extra inputs are not permitted",
                    "resources.gpu: Input should be greater than or equal to 0", "base.out: set by the sweep",
                    "base.gap: Input should be greater than 0", "grid.seeds: Extra inputs are not permitted",
                    "base.method_config (ft-llm): lr: Input should be greater than 0",
                    "grid.method: Unknown method 'nope'"):
        assert error.count(problem) == 1, (problem, error)


def test_what_cannot_run_is_refused_before_anything_starts(tmp_path, capsys):
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump({"base": {"stream": "s.jsonl", "device": "cuda:0"}, "grid": {"seed": [0, 1]}}))
    assert cli.main(["sweep", str(path)]) == 2
    assert "resources.gpu: cells on cuda:0 need a GPU share" in capsys.readouterr().err
    path.write_text(yaml.safe_dump({"base": {"stream": "s.jsonl"}, "grid": {"seed": [0, 1]}}))
    assert cli.main(["sweep", str(path), "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert f"no sweep in {tmp_path / 'none'} to resume" in capsys.readouterr().err
    nobody = f"127.0.0.1:{free_port()}"
    assert cli.main(["sweep", str(path), "--out", str(tmp_path / "down"), "--address", nobody]) == 2
    assert f"cannot reach the Ray cluster at {nobody}" in capsys.readouterr().err
    assert not (tmp_path / "down").exists()  # so the sweep can start again without --resume


@pytest.mark.parametrize("name, cells", [("default-minutes", 6), ("vlkeb-table2", 24)])
def test_shipped_sweep_files_are_valid(name, cells):
    sweep = load_sweep(REPO / "sweeps" / f"{name}.yaml")
    assert sweep.name == name and len(sweep.cells) == cells
    assert len({cell.name for cell in sweep.cells}) == cells


def test_only_a_running_sweep_imports_ray():
    code = ("import sys; from simulator import cli; cli.main(['--help']); cli.main(['sweep', '--help']); "
            "sys.exit('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, timeout=120).returncode == 0
