"""The shipped alert rules end to end: real Prometheus and Alertmanager deliver a collapsing run's alert, then resolve it.

The run collapses (a perplexity threshold it crosses at once) and keeps running (`--follow`); the
alert must reach a webhook receiver with the crossed indicator as a label. When the run is then
stopped on purpose (SIGTERM), it says so before it goes, and the alert must come back resolved —
because the run ended, not because its process vanished.
"""

import json
import signal
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from tests.dashboards.dashboards import ROOT, RULES
from tests.services import SIMULATE, Service, free_port, one_thread_env, require_binary, wait_until


class Receiver(BaseHTTPRequestHandler):
    """Alertmanager's webhook: keeps every notification's alerts."""

    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).received.extend(body["alerts"])
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def delivered(status: str) -> list[dict]:
    return [a for a in Receiver.received if a["labels"].get("alertname") == "EditwatchCollapse"
            and a["status"] == status]


@pytest.mark.slow
def test_a_collapsing_runs_alert_is_delivered_and_resolved_when_it_ends(small_world, small_model, tmp_path):
    prometheus, alertmanager = require_binary("prometheus"), require_binary("prometheus-alertmanager")
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    Receiver.received = []
    am_port, prom_port, run_port = free_port(), free_port(), free_port()
    # The shipped routing, made fast for a test; the receiver points at the local webhook.
    am_config = yaml.safe_load((ROOT / "alertmanager" / "alertmanager.yml").read_text())
    am_config["route"].update(group_wait="1s", group_interval="1s", repeat_interval="1h")
    for route in am_config["route"].get("routes", []):
        route["group_wait"] = "1s"
    am_config["receivers"][0]["webhook_configs"][0]["url"] = f"http://127.0.0.1:{receiver.server_port}/"
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(am_config))
    prom_config = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    prom_config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    prom_config["rule_files"] = [str(RULES / "*.yml")]
    prom_config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{am_port}"]
    prom_config["scrape_configs"] = [{"job_name": "editwatch",
                                      "static_configs": [{"targets": [f"127.0.0.1:{run_port}"]}]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prom_config))
    services = [
        Service([alertmanager, f"--config.file={tmp_path / 'alertmanager.yml'}", f"--storage.path={tmp_path / 'am'}",
                 f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="],
                tmp_path / "alertmanager.log", f"http://127.0.0.1:{am_port}/-/ready"),
        Service([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                tmp_path / "prometheus.log", f"http://127.0.0.1:{prom_port}/-/ready"),
    ]
    stream = tmp_path / "stream.jsonl"
    stream.write_text("".join((small_world / "eval.jsonl").read_text().splitlines(keepends=True)[:8]))
    # Collapse on the weight-change norm, which every FT edit moves: how a small model's reference perplexity moves
    # depends on the model (on the world v4 one it fell).
    run = None
    try:
        for service in services:
            service.start()
        run = subprocess.Popen(
            [SIMULATE, "--stream", str(stream), "--images", str(small_world / "images"), "--model", str(small_model),
             "--method", "ft-llm", "--gap", "1", "--probe-every", "2", "--reference-size", "2",
             "--collapse-ppl-ratio", "off", "--collapse-agreement", "off", "--collapse-weight-change", "1e-6", "--follow", "--no-mlflow", "--prometheus-port", str(run_port),
             "--run-name", "collapsing", "--out", str(tmp_path / "run")],
            env=one_thread_env(), stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "run.log").open("w"))
        firing = wait_until(lambda: delivered("firing"), 120, "the collapse alert at the webhook", run)
        alert = firing[0]
        assert alert["labels"]["run"] == "collapsing" and alert["labels"]["method"] == "ft-llm"
        assert alert["labels"]["metric"] == "weight_change_norm"  # the reason reaches the receiver
        assert alert["labels"]["model"] == small_model.name  # a short name, not the folder's absolute path
        assert alert["annotations"]["runbook_url"] == "README.md#editwatchcollapse"
        assert not delivered("resolved")
        run.send_signal(signal.SIGTERM)  # stopped on purpose; the model is still collapsed
        assert run.wait(120) == 0
        resolved = wait_until(lambda: delivered("resolved"), 60, "the collapse alert to resolve")
        assert resolved[0]["labels"] == alert["labels"]
        rounds = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
        assert rounds[-1]["collapse_alarm"] == 1.0  # resolved because the run ended, not because it recovered
    finally:
        if run is not None and run.poll() is None:
            run.kill()
        for service in reversed(services):
            service.stop()
        receiver.shutdown()
