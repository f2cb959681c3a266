"""The `simulate` command line: help, settings validation, scenario files."""

import subprocess
import sys
from pathlib import Path

import pytest

from simulator.cli import main
from simulator.config import RunConfig, load_run_config

DESIGN_FLAGS = ["--stream", "--model", "--method", "--mode", "--gap", "--images", "--out", "--seed", "--limit",
                "--resume", "--mlflow-uri", "--prometheus-port", "--follow"]


def test_help_lists_the_design_options_and_subcommands():
    simulate = Path(sys.executable).parent / "simulate"
    result = subprocess.run([str(simulate), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for flag in DESIGN_FLAGS:
        assert flag in result.stdout
    for sub in ("simulate world", "simulate probe", "simulate compare", "methods: none"):
        assert sub in result.stdout


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


def test_unfinished_subcommands_say_so(capsys):
    assert main(["probe", "--state", "s"]) == 2
    assert "lands with" in capsys.readouterr().err
