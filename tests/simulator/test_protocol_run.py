"""A `simulate --protocol vlkeb` run: VLKEB's prompt, locality and FT (LLM) settings end to end."""

import json

from simulator.cli import main
from simulator.config import RunConfig
from simulator.run import CONFIG


def test_a_vlkeb_protocol_run_uses_its_settings_and_resumes_as_given(small_world, small_model, tmp_path):
    out = tmp_path / "out"
    args = ["--stream", str(small_world / "eval.jsonl"), "--model", str(small_model), "--method", "ft-llm",
            "--protocol", "vlkeb", "--mode", "single", "--limit", "2", "--no-mlflow", "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"] == "vlkeb"
    expected = {"weight_decay": 0.01, "stop_loss": 0.0, "layers": [-1], "modules": ["up", "down"], "lr": 1e-4,
                "steps": 10}
    assert {k: summary["method_config"][k] for k in expected} == expected  # the settings the editor ran with
    single = summary["results"]["single"]
    assert "t_loc_vlkeb" in single and "i_loc_vlkeb" in single  # VLKEB's own locality is reported
    # config.json keeps the settings as given, so --resume compares like with like.
    saved = RunConfig.model_validate_json((out / CONFIG).read_text())
    assert saved.protocol == "vlkeb" and saved.prompt_format == "auto" and saved.method_config == {}
    assert main([*args, "--resume", "--limit", "3"]) == 0
    assert json.loads((out / "summary.json").read_text())["edits_applied"] == 3
