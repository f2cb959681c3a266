"""What the dashboard tests read: the shipped files and the PromQL expressions in them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import yaml

ROOT = Path(__file__).resolve().parents[2] / "dashboards"
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
RULES = ROOT / "prometheus" / "rules"
# What Grafana puts in for the variables when the test asks Prometheus directly.
SUBSTITUTES = {"__rate_interval": "1m", "run": ".*", "method": ".*", "model": ".*", "setting": ".*"}


def load_dashboard(path: Path) -> dict[str, Any]:
    """One dashboard's JSON."""
    return json.loads(path.read_text(encoding="utf-8"))


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def panel_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target of every dashboard, variables substituted."""
    found = []
    for path in DASHBOARDS:
        for panel in panels(load_dashboard(path)):
            for target in panel.get("targets", []):
                found.append((f"{path.name}: {panel['title']} [{target['refId']}]", substitute(target["expr"])))
    return found


def rule_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every recording and alerting rule."""
    found = []
    for path in sorted(RULES.glob("*.yml")):
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            for rule in group["rules"]:
                found.append((f"{path.name}: {rule.get('record') or rule.get('alert')}", rule["expr"]))
    return found


def substitute(expr: str) -> str:
    """A panel expression with Grafana's variables replaced; an unknown variable is an error."""

    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in SUBSTITUTES:
            raise KeyError(f"unknown dashboard variable ${name} in {expr!r}")
        return SUBSTITUTES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


_SELECTOR = re.compile(r'editwatch_(?:probe|edit|run)_[a-z]+\{[^}]*?metric(=~?)"([^"]+)"')
GRAFANA_UNITS = {"ratio": "percentunit", "seconds": "s", "factor": "none", "nats": "none", "norm": "none",
                 "count": "none"}  # monitor.metrics units -> Grafana's unit ids


def panel_metric_keys(panel: dict[str, Any], keys: list[str]) -> set[str]:
    """The registered metric keys a panel's queries select by the `metric` label (exact or regex)."""
    found: set[str] = set()
    for target in panel.get("targets", []):
        for operator, value in _SELECTOR.findall(target.get("expr", "")):
            found |= {value} if operator == "=" else {k for k in keys if re.fullmatch(value, k)}
    return found
