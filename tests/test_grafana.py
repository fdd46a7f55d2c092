"""Grafana dashboards as code and provisioning, checked statically.

Grafana cannot run here, so: the committed JSON must equal what grafana/dashboards.py
(grafana-foundation-sdk) generates; panels have unique ids and a non-empty PromQL expr
that real ``promtool`` parses; every datasource and variable they use exists. The proof
that every query returns data is tests/test_dashboards_live.py (a real Prometheus).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from grafana_dashboards import (
    BUILTINS,
    DASHBOARDS,
    PROVISIONING,
    ROOT,
    committed_dashboards,
    generator,
    panels,
    referenced,
    substitute,
    targets,
    variable_names,
)

REQUIRED = {
    "mlsidecar-model-health.json",
    "mlsidecar-drift.json",
    "mlsidecar-outcomes.json",
    "mlsidecar-resources.json",
    "mlsidecar-upstreams.json",
}
# Upstream metrics carry no model label (a target is shared by the pod's models), so the
# upstreams dashboard filters by namespace and upstream instead of model and version.
MODEL_VARIABLES = {"datasource", "namespace", "model", "version"}


def datasources() -> list[dict[str, Any]]:
    text = (PROVISIONING / "datasources" / "datasources.yaml").read_text()
    return list(yaml.safe_load(text)["datasources"])


def test_committed_json_is_what_the_generator_builds(tmp_path):
    built = generator().build_all()
    assert set(built) == REQUIRED
    render = generator().render
    stale = [
        name
        for name, board in built.items()
        if not (DASHBOARDS / name).exists() or (DASHBOARDS / name).read_text() != render(board)
    ]
    assert not stale, f"stale dashboards, run `make dashboards`: {stale}"
    assert {p.name for p in DASHBOARDS.glob("*.json")} == REQUIRED


def test_the_check_mode_fails_on_stale_json(tmp_path):
    module = generator()
    assert module.main(["--out", str(tmp_path)]) == 0
    assert module.main(["--check", "--out", str(tmp_path)]) == 0
    victim = tmp_path / "mlsidecar-drift.json"
    victim.write_text(victim.read_text().replace("Feature drift now", "Feature drift"))
    assert module.main(["--check", "--out", str(tmp_path)]) == 1


def test_panel_ids_are_unique_and_every_panel_has_a_query():
    for name, board in committed_dashboards().items():
        ids = [panel["id"] for panel in panels(board)]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids {ids}"
        assert all(isinstance(i, int) and i > 0 for i in ids), name
        for panel in panels(board):
            if panel["type"] == "row":
                continue
            assert panel.get("title") and panel.get("description"), f"{name}: {panel}"
            assert panel.get("targets"), f"{name}: panel {panel['title']!r} has no query"
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), f"{name}: {panel['title']}"
            for target in panel["targets"]:
                assert target.get("expr", "").strip(), f"{name}: {panel['title']!r} empty expr"


def test_datasources_used_exist_in_provisioning():
    provisioned = {ds["uid"]: ds["type"] for ds in datasources()}
    for name, board in committed_dashboards().items():
        ds_variables = {
            v["name"]: v["query"] for v in board["templating"]["list"] if v["type"] == "datasource"
        }
        # A datasource variable must offer a provisioned type, default to a provisioned uid.
        for variable in board["templating"]["list"]:
            if variable["type"] == "datasource":
                assert variable["query"] in provisioned.values(), name
                assert provisioned.get(variable["current"]["value"]) == variable["query"], name
        refs = [p["datasource"] for p in panels(board) if p["type"] != "row"]
        refs += [t["datasource"] for _, _, t in targets({name: board})]
        refs += [v["datasource"] for v in board["templating"]["list"] if v["type"] == "query"]
        for ref in refs:
            uid = ref["uid"]
            names = referenced(uid)
            if names:
                (variable,) = names
                assert variable in ds_variables, f"{name}: {uid} is not a datasource variable"
                assert ds_variables[variable] == ref["type"], name
            else:
                assert provisioned.get(uid) == ref["type"], f"{name}: datasource {uid} unknown"


def test_variables_referenced_exist():
    for name, board in committed_dashboards().items():
        defined = variable_names(board)
        assert defined >= {"datasource", "namespace"}, name
        if name != "mlsidecar-upstreams.json":
            assert defined >= MODEL_VARIABLES, name
        texts = [t["expr"] for _, _, t in targets({name: board})]
        texts += [p["title"] for p in panels(board)]
        texts += [v.get("query", "") for v in board["templating"]["list"] if v["type"] == "query"]
        for text in texts:
            unknown = referenced(text) - defined - set(BUILTINS)
            assert not unknown, f"{name}: {text!r} uses undefined {unknown}"
        # A variable defined but used nowhere is a dead filter.
        used = set().union(*(referenced(t) for t in texts))
        assert defined - {"datasource"} <= used, f"{name}: unused {defined - used}"


def test_label_filters_tolerate_absent_k8s_labels():
    """An agent without k8s resource attributes (outside Kubernetes) has no k8s_* labels:
    "All" must be .*, which matches a series without the label, and selectors must use =~
    so that it applies."""
    for name, board in committed_dashboards().items():
        for variable in board["templating"]["list"]:
            if variable["type"] == "query" and variable.get("includeAll"):
                assert variable["allValue"] == ".*", f"{name}: {variable['name']}"
        for _, panel, target in targets({name: board}):
            assert 'k8s_namespace_name="' not in target["expr"], panel["title"]
            assert 'k8s_pod_name="' not in target["expr"], panel["title"]


def test_every_expr_parses_with_promtool(tmp_path):
    """Real PromQL parsing: every query, variables substituted, as a recording rule."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("'promtool' is not installed: run `make system-deps`")
    values = {"datasource": "prometheus", "namespace": ".*", "model": "m", "version": ".*"}
    values |= {"feature": "amount", "pod": ".*", "upstream": ".*"}
    rules = [
        {"record": f"panel:{i}", "expr": substitute(target["expr"], values)}
        for i, (_, _, target) in enumerate(targets(committed_dashboards()))
    ]
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_latency_panel_asks_for_exemplars():
    board = committed_dashboards()["mlsidecar-model-health.json"]
    latency = [p for p in panels(board) if "latency" in p["title"].lower() and p["type"] != "row"]
    assert latency and all(t.get("exemplar") for p in latency for t in p["targets"])


def test_provisioning_links_prometheus_tempo_and_exemplars():
    by_uid = {ds["uid"]: ds for ds in datasources()}
    prometheus, tempo = by_uid["prometheus"], by_uid["tempo"]
    assert prometheus["type"] == "prometheus" and prometheus["url"] == "http://prometheus:9090"
    assert tempo["type"] == "tempo" and tempo["url"] == "http://tempo:3200"
    assert by_uid["alertmanager"]["url"] == "http://alertmanager:9093"
    # The exemplar label the Collector's Prometheus translation writes the trace id to.
    (destination,) = prometheus["jsonData"]["exemplarTraceIdDestinations"]
    assert destination == {"name": "trace_id", "datasourceUid": "tempo"}
    assert tempo["jsonData"]["tracesToMetrics"]["datasourceUid"] == "prometheus"
    for query in tempo["jsonData"]["tracesToMetrics"]["queries"]:
        # Grafana expands $VAR in provisioning files: the Tempo macro must be written $$.
        assert "$$__tags" in query["query"], query
    assert [ds["uid"] for ds in datasources() if ds.get("isDefault")] == ["prometheus"]


def test_dashboard_provider_points_where_compose_mounts_the_json():
    text = (PROVISIONING / "dashboards" / "dashboards.yaml").read_text()
    (provider,) = yaml.safe_load(text)["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    assert path == "/var/lib/grafana/dashboards"
    compose = ROOT / "docker-compose.yml"
    if compose.exists():  # part of the same issue, written alongside
        volumes = yaml.safe_load(compose.read_text())["services"]["grafana"].get("volumes", [])
        mounts = [str(v) if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in volumes]
        assert any(m.split(":")[1].rstrip("/") == path for m in mounts if ":" in m), mounts
        assert any(
            Path(m.split(":")[0]).as_posix().rstrip("/").endswith("grafana/dashboards")
            for m in mounts
            if ":" in m
        ), mounts


def test_every_dashboard_and_panel_is_documented():
    """docs/dashboards.md describes every panel (by its title) of every dashboard."""
    docs = (ROOT / "docs" / "dashboards.md").read_text()
    for name, board in committed_dashboards().items():
        assert f"`{board['uid']}`" in docs, name
        for panel in panels(board):
            if panel["type"] != "row":
                title = panel["title"].replace("$feature", "`$feature`")
                assert f"| {title} |" in docs, f"{name}: {panel['title']!r} not in the docs"
