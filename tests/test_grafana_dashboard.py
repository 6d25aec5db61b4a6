"""The Grafana dashboard (docker/grafana/thawed-dashboard.json) and compose's monitoring profile.

The dashboard validates against docker/grafana/dashboard.schema.json (Grafana's dashboard model:
panels, gridPos, targets, datasource uid), every datasource uid is the provisioned Prometheus's, and
every metric a PromQL expression names is one the server really exports: the test scrapes
``/metrics`` of a real app on the tiny model after a request and compares.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from server_fixtures import make_app, tiny_chat_ckpt, tiny_loaded, wait_ready  # noqa: F401

DOCKER = Path(__file__).resolve().parent.parent / "docker"
DASHBOARD = DOCKER / "grafana" / "thawed-dashboard.json"
SCHEMA = DOCKER / "grafana" / "dashboard.schema.json"

# PromQL words that are not metric names: functions, aggregations, modifiers, keywords
_PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "label_values", "label_replace",
    "clamp_min", "clamp_max", "abs", "vector", "scalar", "time", "sort", "sort_desc", "avg_over_time",
    "max_over_time", "min_over_time", "sum_over_time", "by", "without", "on", "ignoring", "group_left",
    "group_right", "offset", "bool", "and", "or", "unless", "inf", "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label matchers, label lists of by/without/on,
    durations, strings, numbers and Grafana's $variables removed)."""
    s = re.sub(r"label_values\(\s*([^,()]+?)\s*,[^)]*\)", r"\1", expr)  # Grafana: label_values(metric, label)
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', s)                         # string literals
    s = re.sub(r"\{[^}]*\}", "", s)                                    # label matchers
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", s)  # label lists
    s = re.sub(r"\[[^\]]*\]", "", s)                                   # range durations
    s = re.sub(r"\$\{?\w+\}?", "", s)                                  # $__rate_interval, $model
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", s):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


def exported_names(text: str) -> set[str]:
    """Every series name a Prometheus scrape of this exposition text can hold: sample names, plus
    the names a declared family produces even before it has a sample (a labelled counter)."""
    from prometheus_client.parser import text_string_to_metric_families

    names: set[str] = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count"),
                "gauge": ("",), "untyped": ("",), "info": ("_info",)}
    for fam in text_string_to_metric_families(text):
        names.update(s.name for s in fam.samples)
        names.update(fam.name + suf for suf in suffixes.get(fam.type, ("",)))
    return names


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_exprs(d: dict) -> list[str]:
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    for v in d["templating"]["list"]:
        q = v.get("query")
        exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def test_dashboard_validates_against_the_schema():
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    validator = jsonschema_rs.validator_for(json.loads(SCHEMA.read_text()))
    d = dashboard()
    errors = [f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in validator.iter_errors(d)]
    assert not errors, errors[:5]
    # the schema can fail: a misspelt key, a panel without targets, a gridPos wider than the grid
    bad = dashboard()
    bad["panels"][1]["gridpos"] = bad["panels"][1].pop("gridPos")
    assert not validator.is_valid(bad)
    bad = dashboard()
    bad["panels"][1]["targets"] = []
    assert not validator.is_valid(bad)
    bad = dashboard()
    bad["panels"][1]["gridPos"]["w"] = 25
    assert not validator.is_valid(bad)


def test_every_datasource_is_the_provisioned_prometheus():
    prov = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    (ds,) = prov["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    d = dashboard()
    refs = [p["datasource"] for p in d["panels"] if p["type"] != "row"]
    refs += [t["datasource"] for p in d["panels"] for t in p.get("targets", [])]
    refs += [v["datasource"] for v in d["templating"]["list"] if "datasource" in v]
    assert refs and all(r == {"type": "prometheus", "uid": ds["uid"]} for r in refs), refs


def test_panels_tile_the_grid_without_overlap_and_ids_are_unique():
    d = dashboard()
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_the_dashboard_shows_what_the_issue_asks_for():
    exprs = "\n".join(all_exprs(dashboard()))
    for q in ("0.5", "0.9", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(thawed_time_to_first_token_seconds_bucket" in exprs
        assert f"histogram_quantile({q}, sum by (le) (rate(thawed_inter_token_latency_seconds_bucket" in exprs
    for needle in ("rate(thawed_generation_tokens_total", "thawed_num_requests_running", "thawed_num_requests_waiting",
                   'thawed_requests_rejected_total{model_name=~"$model",reason="queue_full"}',
                   "thawed_cache_hits_total", "thawed_cache_misses_total", "thawed_cache_bytes",
                   "sum by (codec, device) (rate(thawed_layer_decode_seconds_total", "process_resident_memory_bytes"):
        assert needle in exprs, needle


def test_promql_name_extraction():
    assert promql_metric_names(
        'histogram_quantile(0.9, sum by (le) (rate(a_bucket{model_name=~"$model", x="y{z}"}[$__rate_interval])))'
    ) == {"a_bucket"}
    assert promql_metric_names("sum(rate(a_total[5m])) / (sum(rate(a_total[5m])) + sum(b))") == {"a_total", "b"}
    assert promql_metric_names("sum by (codec, device) (rate(c_seconds_total{m=\"1\"}[1h])) > bool 0") == \
        {"c_seconds_total"}
    assert promql_metric_names("label_values(thawed_model_ready, model_name)") == {"thawed_model_ready"}


def test_every_promql_metric_is_exported_by_the_server(tiny_loaded):
    with TestClient(make_app(tiny_loaded, served_model_name="tiny")) as c:
        wait_ready(c)
        assert c.post("/v1/completions", json={"prompt": "the", "max_tokens": 3}).status_code == 200
        text = c.get("/metrics").text
    exported = exported_names(text)
    assert "thawed_requests_rejected_total" in exported and "thawed_cache_hits_total" in exported
    used: dict[str, str] = {}
    for expr in all_exprs(dashboard()):
        names = promql_metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        for n in names:
            used[n] = expr
    missing = {n: e for n, e in used.items() if n not in exported}
    assert not missing, f"the dashboard queries metrics /metrics does not export: {missing}"
    # the check can fail: a misspelt metric is caught
    assert "thawed_time_to_first_token_second_bucket" not in exported


def test_compose_monitoring_profile_loads_the_dashboard():
    doc = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = doc["services"]
    prom, graf = services["prometheus"], services["grafana"]
    assert prom["profiles"] == ["monitoring"] and graf["profiles"] == ["monitoring"]
    assert "profiles" not in services["thawed"]  # `docker compose up` alone still starts the server only
    for svc in (prom, graf):
        assert all(p.startswith("127.0.0.1:") for p in svc["ports"])
        for vol in svc["volumes"]:
            host, target, mode = vol.split(":")
            assert (DOCKER / host).exists(), host
            assert mode == "ro"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in graf["volumes"]}
    assert mounts["/var/lib/grafana/dashboards/thawed-dashboard.json"] == "./grafana/thawed-dashboard.json"
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/thawed.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    scrape = yaml.safe_load((DOCKER / "prometheus/prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    assert job["job_name"] == "thawed" and job["metrics_path"] == "/metrics"
    hosts = {t.split(":")[0] for t in job["static_configs"][0]["targets"]}
    assert hosts <= set(services) and "thawed" in hosts
    assert 'job="thawed"' in "\n".join(all_exprs(dashboard()))
