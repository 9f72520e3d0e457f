"""The Grafana dashboard only queries metrics the service exports."""

import json
import re

from service.records import metrics
from tests.support.servers import ROOT


def test_dashboard_queries_real_metric_names():
    dashboard = json.loads((ROOT / "service" / "grafana-dashboard.json").read_text())
    exported = {m._name for m in vars(metrics).values() if hasattr(m, "_name") and hasattr(m, "_type")}
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"vibethinker_[a-z_]+", target["expr"]))
    assert used
    for name in used:
        base = re.sub(r"_(bucket|count|sum|total)$", "", name)
        assert base in exported, name
