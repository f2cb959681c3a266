"""The shipped dashboard files: Grafana JSON sanity, provisioning, compose, Prometheus config and rules."""

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from monitor.exporters import PrometheusSink
from tests.dashboards.dashboards import (
    DASHBOARDS,
    GRAFANA_UNITS,
    ROOT,
    RULES,
    load_dashboard,
    panel_metric_keys,
    panel_queries,
    panels,
    rule_queries,
)
from tests.services import require_binary

PANEL_TYPES = {"row", "timeseries", "stat", "table"}
CURRENT_SCHEMA = 42  # the last Classic-model version (Grafana's dashboard migrations)


def yaml_file(*parts):
    return yaml.safe_load((ROOT.joinpath(*parts)).read_text(encoding="utf-8"))


def test_there_are_dashboards_with_distinct_uids():
    uids = [load_dashboard(path)["uid"] for path in DASHBOARDS]
    assert len(DASHBOARDS) >= 2 and len(set(uids)) == len(uids)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_json_is_sane(path):
    dashboard = load_dashboard(path)
    assert dashboard["schemaVersion"] == CURRENT_SCHEMA and dashboard["title"] and dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids, cells = set(), set()
    for panel in panels(dashboard):
        assert panel["type"] in PANEL_TYPES, panel["title"]
        assert panel["id"] not in ids, f"duplicate panel id {panel['id']}"
        ids.add(panel["id"])
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        covered = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                   for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not covered & cells, f"panel {panel['title']!r} overlaps another"
        cells |= covered
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(set(refs)) == len(refs), panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$\{?(\w+)", target["expr"])) - {"__rate_interval"}
            assert used <= set(variables), f"{panel['title']}: undefined variables {used - set(variables)}"


def test_every_metric_name_in_panels_and_rules_exists():
    """Typos in metric names show up here at once; the live test checks that they return data."""
    registry = CollectorRegistry()
    PrometheusSink(registry=registry)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    exported = {family.name + suffix for family in registry.collect() for suffix in suffixes[family.type]}
    recorded = {rule["record"] for path in RULES.glob("*.yml") for group in yaml.safe_load(path.read_text())["groups"]
                for rule in group["rules"] if "record" in rule}
    assert len(exported) == 37 and len(recorded) == 4  # 18 value gauges: 3 scopes x 6 units
    for where, expr in panel_queries() + rule_queries():
        for name in re.findall(r"\b(editwatch[a-z0-9_:]*)", expr):
            assert name in exported | recorded, f"{where}: unknown metric {name}"


def test_grafana_provisioning_points_at_the_prometheus_and_the_dashboards_of_compose():
    (datasource,) = yaml_file("grafana", "provisioning", "datasources", "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert datasource["isDefault"] is True
    (provider,) = yaml_file("grafana", "provisioning", "dashboards", "editwatch.yml")["providers"]
    assert provider["type"] == "file" and provider["folder"] == "editwatch"
    grafana = yaml_file("compose.yaml")["services"]["grafana"]
    mounts = dict(volume.rsplit(":", 1)[0].split(":", 1) for volume in grafana["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


def test_compose_runs_the_stack_and_its_files_exist():
    services = yaml_file("compose.yaml")["services"]
    assert {"simulator", "probe", "prometheus", "pushgateway", "grafana", "mlflow"} <= set(services)
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"compose mounts missing {source}"
    build = services["simulator"]["build"]
    assert (ROOT / build["context"] / build["dockerfile"]).is_file()
    targets = {t for job in yaml_file("prometheus", "prometheus.yml")["scrape_configs"]
               for c in job["static_configs"] for t in c["targets"]}
    assert "--prometheus-port 9108 --prometheus-host 0.0.0.0" in " ".join(services["simulator"]["command"])
    assert {"simulator:9108", "probe:9109", "pushgateway:9091"} <= targets
    assert "9109" in services["probe"]["command"]


def test_promtool_accepts_the_config_and_the_rules_and_their_unit_tests_pass():
    promtool = require_binary("promtool")
    prometheus = ROOT / "prometheus"
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", *map(str, RULES.glob("*.yml"))],
                 ["test", "rules", str(Path("tests") / "editwatch_test.yml")]):
        result = subprocess.run([promtool, *args], cwd=prometheus, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_panels_follow_the_metric_registry(path):
    """A panel showing registered metrics uses their unit and states their direction (monitor.metrics)."""
    from monitor.metrics import METRICS

    checked = 0
    for panel in panels(load_dashboard(path)):
        keys = panel_metric_keys(panel, list(METRICS))
        if not keys:
            continue
        checked += 1
        units = {METRICS[k].unit for k in keys}
        assert len(units) == 1, f"{panel['title']}: metrics of several units {units} in one panel"
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults["unit"] == GRAFANA_UNITS[units.pop()], panel["title"]
        directions = {METRICS[k].higher_is_better for k in keys}
        words = {True: "Higher is better.", False: "Lower is better.", None: None}[directions.pop()]
        if len(directions) == 0 and words:
            assert panel["description"].endswith(words), panel["title"]
    assert checked >= 4


def test_panel_metric_keys_reads_exact_and_regex_selectors():
    panel = {"targets": [{"expr": 'editwatch_edit_ratio{run=~"$run", metric=~"port_[1-4]hop"}'},
                         {"expr": 'max(editwatch_probe_ratio{metric="retention"})'}]}
    keys = ["port_1hop", "port_2hop", "port_3hop", "port_4hop", "port_onehop", "retention", "reliability"]
    assert panel_metric_keys(panel, keys) == {"port_1hop", "port_2hop", "port_3hop", "port_4hop", "retention"}
