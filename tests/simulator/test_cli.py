"""The `simulate` command line: help, settings validation, scenario files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from editors import METHODS
from simulator.cli import main
from simulator.config import RunConfig, load_run_config

DESIGN_FLAGS = ["--stream", "--model", "--method", "--mode", "--gap", "--images", "--out", "--seed", "--limit",
                "--resume", "--mlflow-uri", "--prometheus-port", "--follow", "--device", "--dtype", "--prompt-format",
                "--trust-remote-code"]


def test_help_lists_the_design_options_and_subcommands():
    simulate = Path(sys.executable).parent / "simulate"
    result = subprocess.run([str(simulate), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for flag in DESIGN_FLAGS:
        assert flag in result.stdout
    for sub in ("simulate world", "simulate probe", "simulate compare"):
        assert sub in result.stdout
    assert f"methods: {', '.join(sorted(METHODS))}" in result.stdout


def test_all_invalid_settings_are_reported_at_once(capsys):
    assert main(["--gap", "0", "--prometheus-port", "70000", "--resume"]) == 2
    err = capsys.readouterr().err
    for expected in ("--stream: Field required", "--gap: Input should be greater than 0",
                     "--prometheus-port: Input should be less than or equal to 65535"):
        assert expected in err


def test_cross_field_conflicts_say_what_is_wrong():
    with pytest.raises(ValueError, match="--resume needs --out.*--follow needs a stream file"):
        RunConfig(stream="-", resume=True, follow=True)


def test_scenario_file_with_flag_overrides(tmp_path):
    scenario = tmp_path / "run.yaml"
    scenario.write_text("stream: edits.jsonl\nmethod: none\ngap: [10, 20]\nseed: 3\n")
    config = load_run_config(scenario, {"seed": 7})
    assert (config.stream, config.gap, config.seed) == ("edits.jsonl", [10, 20], 7)
    scenario.write_text("- not a mapping\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_run_config(scenario, {})


def test_probe_without_a_run_says_so(capsys):
    assert main(["probe", "--state", "s"]) == 2
    assert "holds no run" in capsys.readouterr().err


def test_the_main_job_reads_standard_input_and_prints_the_results(small_world, small_model, tmp_path):
    simulate = Path(sys.executable).parent / "simulate"
    result = subprocess.run(
        [str(simulate), "--stream", "-", "--model", str(small_model), "--images", str(small_world / "images"),
         "--method", "none", "--mode", "single", "--limit", "3", "--out", str(tmp_path / "out")],
        input=(small_world / "eval.jsonl").read_text(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert printed["results"] == summary["results"] and summary["edits_applied"] == 3
    assert summary["stopped"] == "limit" and summary["results"]["single"]["t_loc"] == 1.0
    assert (tmp_path / "out" / "config.json").is_file()


def test_run_errors_are_one_line_without_a_traceback(small_world, tmp_path, capsys):
    assert main(["--stream", str(small_world / "eval.jsonl"), "--method", "nnoe", "--images",
                 str(small_world / "images"), "--out", str(tmp_path / "o")]) == 2
    assert "Unknown method 'nnoe'" in capsys.readouterr().err


def test_bad_method_settings_are_named(small_world, tmp_path, capsys):
    assert main(["--stream", str(small_world / "eval.jsonl"), "--method", "none", "--method-config", '{"x": 1}',
                 "--out", str(tmp_path / "o")]) == 2
    assert "invalid --method-config for none: x: Extra inputs are not permitted" in capsys.readouterr().err
