"""The observability files under deploy/ parse and chart only metrics the server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from serving.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_dashboard_queries_name_exported_metrics() -> None:
    dash = json.loads((DEPLOY / "grafana" / "prad-dashboard.json").read_text())
    exported = {m.name for m in Metrics().registry.collect()}
    used = {name for p in dash["panels"] for t in p["targets"] for name in re.findall(r"prad:[a-z0-9_]+", t["expr"])}
    assert used
    for name in used:
        base = re.sub(r"_(bucket|total|count|sum)$", "", name)
        assert base in exported, name


def test_prometheus_config_scrapes_metrics_path() -> None:
    text = (DEPLOY / "prometheus.yml").read_text()
    assert "metrics_path: /metrics" in text and "scrape_configs:" in text
