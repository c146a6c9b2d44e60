"""The shipped Grafana dashboard and the metric names it reads (no root)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from controller import metrics
from tests.helpers.controller import NOW, loaded_state

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs" / "grafana" / "netkv-fabric.json"


def families() -> dict[str, str]:
    text = metrics.render(loaded_state(), NOW)
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))


def test_metric_names_follow_prometheus_conventions() -> None:
    for name, kind in families().items():
        assert name.startswith("netkv_"), name
        assert (kind == "counter") == name.endswith("_total"), (name, kind)
        assert not re.search(r"_(bps|gbps|mbps|ms|kb|mb)(_|$)", name), f"{name}: use base units"


def test_dashboard_reads_only_exported_metrics_and_rates_only_counters() -> None:
    dash = json.loads(DASHBOARD.read_text())
    known = families()
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bnetkv_[a-z_]+", e)}
    assert used and used <= set(known), used - set(known)
    assert {n for n in known if n.startswith("netkv_link_")} <= used, "every link family has a panel"
    for expr in exprs:
        for name in re.findall(r"\bnetkv_[a-z_]+_total\b", expr):
            assert re.search(rf"(rate|resets|increase)\({name}\b", expr), f"counter {name} read raw in {expr!r}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
