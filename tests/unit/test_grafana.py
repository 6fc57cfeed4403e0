"""The Grafana dashboard only charts metrics that cachefs exports."""

import json
import re
from pathlib import Path

from prometheus_client import REGISTRY

from cachefs import metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json"


def exported_names() -> set[str]:
    """Every metric a master, a worker and a mount export (all three in one process)."""
    metrics.export_store(lambda: {"tiers": {"mem": {"used": 0, "capacity": 1}},
                                  "datasets": {"d": {"bytes": 1}}})  # fmt: skip
    metrics.export_master(lambda: {"datasets": {"d": {"files": 1, "bytes": 1}},
                                   "workers": {"live": 1}, "jobs": {}})  # fmt: skip
    metrics.export_shortcircuit(lambda: dict.fromkeys(
        ("hits", "misses", "fallbacks", "hit_bytes"), 0))  # fmt: skip
    try:
        names = set()
        for family in REGISTRY.collect():
            names.add(family.name)
            if family.type == "counter":
                names.add(family.name + "_total")
        return names
    finally:
        metrics.export_store(None)
        metrics.export_master(None)
        metrics.export_shortcircuit(None)


def test_every_expression_uses_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 7
    names = exported_names()
    for expr in exprs:
        for metric in re.findall(r"\bcachefs_[a-z_]+", expr):
            base = re.sub(r"_(bucket|count|sum)$", "", metric)
            assert metric in names or base in names, f"{metric} is not exported ({expr})"
