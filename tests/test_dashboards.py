"""Fast checks of the Grafana dashboards (k8s/base/dashboards): they parse, every PromQL query
names only metrics the code exports, and they ship in a ConfigMap Grafana's sidecar picks up.
"""

from __future__ import annotations

import json
import re

from manifests import DASHBOARDS, exported_metrics, one, render


# -- dashboards ------------------------------------------------------------------------------
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
                   "and", "or", "unless", "inf", "nan", "atan2", "start", "end"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (or a Grafana label_values() query)."""
    m = re.fullmatch(r"\s*label_values\((.*)\)\s*", expr, re.S)
    if m:  # label_values(metric_or_selector, label) or label_values(label)
        args = m.group(1)
        expr = args.rsplit(",", 1)[0] if "," in re.sub(r"\{[^}]*\}", "", args) else ""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # strings
    s = re.sub(r"\{[^}]*\}", " ", s)     # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)    # ranges and subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{[^}]*\}|\$\w+", " ", s)  # Grafana variables
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", s):
        if m.start() and (s[m.start() - 1].isdigit() or s[m.start() - 1] == "."):
            continue  # 1e3, 5m
        if s[m.end():].lstrip().startswith("(") or m.group(0) in PROMQL_KEYWORDS:
            continue  # functions and aggregations
        names.add(m.group(0))
    return names


def test_promql_metric_name_extraction():
    assert promql_metric_names('histogram_quantile(0.95, sum by (le) (rate(a_bucket{x="y(z)", '
                                'namespace=~"$namespace"}[$__rate_interval])))') == {"a_bucket"}
    assert promql_metric_names("sum(rate(a[5m])) by (pod) / on(pod) group_left(node) b offset 1h") == {"a", "b"}
    assert promql_metric_names('max by (pod) (vllm:kv_cache_usage_perc) > 1e3') == {"vllm:kv_cache_usage_perc"}
    assert promql_metric_names('label_values(tunewire_trainer_jobs{a="b"}, namespace)') == {"tunewire_trainer_jobs"}
    assert promql_metric_names("label_values(namespace)") == set()


def dashboard_queries(dash: dict) -> list[str]:
    exprs = []

    def walk(panels):
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def test_dashboards_parse_and_query_only_exported_metrics():
    assert {p.stem for p in DASHBOARDS} == {"tunewire-training", "tunewire-serving"}
    exported = exported_metrics()
    uids = set()
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        assert dash["uid"] not in uids and dash["title"] and dash["panels"]
        uids.add(dash["uid"])
        exprs = dashboard_queries(dash)
        assert len(exprs) >= 10, path.name
        for expr in exprs:
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
            names = promql_metric_names(expr)
            assert names, expr
            unknown = {n for n in names if n not in exported and not n.startswith("vllm:")}
            assert not unknown, f"{path.name}: {expr!r} names metrics nobody exports: {sorted(unknown)}"
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), path.name
        # panels tile the 24-column grid without overlapping, all on the chosen data source
        cells = set()
        for p in dash["panels"]:
            g = p["gridPos"]
            assert g["x"] + g["w"] <= 24, p["title"]
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & mine, f"{path.name}: {p['title']} overlaps another panel"
            cells |= mine
            if p["type"] != "row":
                assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
    # what the dashboards were asked to show
    text = " ".join(e for p in DASHBOARDS for e in dashboard_queries(json.loads(p.read_text())))
    for metric in ("tunewire_trainer_loss", "tunewire_trainer_tokens_per_second", "tunewire_trainer_jobs",
                   "tunewire_serving_requests_total", "tunewire_serving_ttft_seconds_bucket",
                   "tunewire_serving_e2e_latency_seconds_bucket", "tunewire_serving_adapters_resident"):
        assert metric in text


def test_dashboards_ship_in_a_grafana_configmap():
    docs = render("cpu")
    cm = one(docs, "ConfigMap", "tunewire-dashboards")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"] == {p.name: p.read_text() for p in DASHBOARDS}
