"""Proof on real data: every dashboard query and every Prometheus rule, on a real run.

One run (about a minute) drives everything through the real parts:

- ``mlsidecar demo --speed 10`` as a subprocess: the 30-second story (healthy, a feature
  drifts, accuracy drops, the feature store fails and its breaker opens, recovery), with
  the agent's OTLP export pointed at a loopback OTLP receiver (tests/otlp_receiver.py).
- Debian's real Prometheus scraping the agent's ``/metrics`` every second, with the rule
  files of ``prometheus/rules/`` loaded (evaluation every second). The test copy of the
  rules drops ``for:`` and the group intervals, so that conditions fire within the run;
  ``for:`` itself is covered by the promtool unit tests (tests/test_prometheus_rules.py).
- Three things the story does not contain, added through real interfaces: a stand-in
  "model process" (a real child process the agent watches through ``resources.model``;
  the demo's model service runs inside the demo process, and the pod-resources panels
  need a separate one, which the test kills and restarts), and a small regression model
  sent over the real gRPC ingest API (the demo's fraud model is a classifier, so it has
  no MAE/RMSE/MAPE), with a malformed batch now and then (the ingest-error rule and panel).

Then, through the Prometheus HTTP API: every ``expr`` of every panel, variables
substituted, returns data over the run (except the documented exceptions in
docs/dashboards.md); every rule evaluates without error and every series selector in it
matches series; the alerts the story should fire fire. Exemplars are proved in the OTLP
payload: the trace ids on the latency histogram are those of the model service's
request spans.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from conftest import free_port, mlsidecar_command, subprocess_env
from grafana_dashboards import (
    ROOT,
    committed_dashboards,
    substitute,
    targets,
)
from otlp_receiver import OtlpGrpcReceiver, attributes
from prometheus_server import PrometheusServer

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb
from agent._proto.mlsidecar.v1 import ingest_pb2_grpc as pb_grpc
from agent.resources.cgroup import OwnCgroup

pytestmark = pytest.mark.slow

SPEED = 10  # the 300 s story in 30 s (docs/demo.md)
STORY_S = 30
MODEL, VERSION, FEATURE, UPSTREAM = "fraud-scorer", "v1", "amount", "features"
REGRESSION = "demand-forecast"

# Panels (dashboard file, panel title, refId) allowed to return no data here, and why.
# docs/dashboards.md lists the same ones; nothing else may come back empty.
SIDECAR_MEMORY_USAGE = ("mlsidecar-resources.json", "Sidecar memory", "B")
SIDECAR_MEMORY_LIMIT = ("mlsidecar-resources.json", "Sidecar memory", "C")
SIDECAR_THROTTLING = ("mlsidecar-resources.json", "Sidecar CPU throttling", "A")
EXCEPTIONS: dict[tuple[str, str, str], str] = {
    SIDECAR_MEMORY_USAGE: "cgroup v2 only (container.memory.usage)",
    SIDECAR_MEMORY_LIMIT: "cgroup v2 with a memory limit only",
    SIDECAR_THROTTLING: "cgroup v2 with a CPU quota only",
}


def exceptions_here() -> set[tuple[str, str, str]]:
    """The exceptions that apply on this machine, read as the agent reads its cgroup (the
    demo is this process's child, in the same cgroup): v1, or v2 without a limit."""
    reading = OwnCgroup(Path("/sys/fs/cgroup")).read()
    applies = {
        SIDECAR_MEMORY_USAGE: reading is None or reading.memory_current is None,
        SIDECAR_MEMORY_LIMIT: reading is None or reading.memory_max is None,
        SIDECAR_THROTTLING: reading is None or reading.cpu_limit_cores is None,
    }
    return {key for key, applied in applies.items() if applied}


# The pod the agent says it runs in (as the Helm chart's downward API sets it): promoted to
# labels on /metrics, so the dashboards' namespace and pod filters are tested on real values.
NAMESPACE, POD = "ml-demo", "fraud-scorer-7f9c"
# Alerts whose condition the story must hold for a while: the test copy keeps a `for:`
# for them. MLDatasetDrift's 10 minutes do not fit in the 5-minute story; 10 s is 100 story
# seconds at speed 10, over half of the 180 drifted ones (two of four features drift).
SUSTAINED = {"MLDatasetDrift": "10s"}
# The alerts the story must fire (the test copy has no `for:` but SUSTAINED's).
EXPECTED_ALERTS = {
    "MLDatasetDrift",  # amount and merchant drift: half the features, for 18 s
    "MLFeaturePSIHigh",  # amount drifts
    "MLAccuracyLow",  # the fraud ring fools the model
    "MLAccuracyDropped",  # ... far below its own recent average
    "MLHealthScoreLow",  # the score falls to critical
    "MLUpstreamBreakerOpen",  # the feature store fails
    "MLModelProcessDown",  # the test kills the stand-in model process
    "MLModelMemoryNearLimit",  # its memory limit is set below its RSS
    "MLFleetFeaturePSIHigh",  # the fleet's amount drifts over the run too
    "MLSidecarIngestErrors",  # the malformed batches
    "MLMAPEHigh",  # the regression model errs by ~10 %
    "MLSidecarDown",  # the demo exits at the end of the story
}


def rules_without_for(tmp_path: Path) -> list[Path]:
    """The rule files without `for:` and group intervals: conditions fire within the run;
    but the `for:` of SUSTAINED, to show that the story holds their conditions."""
    copies = []
    for path in sorted((ROOT / "prometheus" / "rules").glob("*.yml")):
        doc = yaml.safe_load(path.read_text())
        for group in doc["groups"]:
            group.pop("interval", None)
            for rule in group["rules"]:
                rule.pop("for", None)
                if rule.get("alert") in SUSTAINED:
                    rule["for"] = SUSTAINED[rule["alert"]]
        copy = tmp_path / path.name
        copy.write_text(yaml.safe_dump(doc))
        copies.append(copy)
    return copies


def stand_in_model(token: str) -> subprocess.Popen[bytes]:
    """A real process for the agent's resources.model to find by its command line."""
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", token],
        stdin=subprocess.DEVNULL,
    )


def send_regression_model(target: str, stop: threading.Event) -> None:
    """A regression model's predictions and outcomes (~10 % error), and a rejected batch,
    over real gRPC."""
    import grpc

    rng = np.random.default_rng(3)
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.IngestStub(channel)
        batch = 0
        while not stop.is_set():
            ids = [f"r{batch}-{i}" for i in range(200)]
            actual = rng.uniform(50, 150, 200)
            predicted = actual * (1 + rng.choice([-0.1, 0.1], 200))
            try:
                stub.SubmitPredictions(
                    pb.PredictionBatch(
                        model=REGRESSION,
                        model_version="v1",
                        ids=ids,
                        scores=predicted,
                        latencies_ms=rng.uniform(1, 5, 200),
                        features=[pb.Column(name="x", numbers=pb.NumberValues(values=actual))],
                    ),
                    timeout=5,
                )
                stub.SubmitOutcomes(
                    pb.OutcomeBatch(
                        model=REGRESSION, model_version="v1", ids=ids, actual_values=actual
                    ),
                    timeout=5,
                )
            except grpc.RpcError:
                if stop.is_set():
                    return
            # And a malformed batch (3 scores for 2 ids), which the agent rejects and counts.
            with contextlib.suppress(grpc.RpcError):
                stub.SubmitPredictions(
                    pb.PredictionBatch(model=REGRESSION, ids=["a", "b"], scores=[1.0, 2.0, 3.0]),
                    timeout=5,
                )
            batch += 1
            stop.wait(0.25)


SELECTOR = re.compile(r"(?<![\w:])([a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?")
NOT_SERIES = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "sum", "min", "max", "avg", "count", "topk", "bottomk", "inf", "nan",
}  # fmt: skip


def selectors(expr: str) -> set[str]:
    """The series selectors of a PromQL expression (metric name with its matchers)."""
    expr = re.sub(
        r'"(?:[^"\\]|\\.)*"', lambda m: m.group(0).replace("(", "").replace(")", ""), expr
    )
    # Label lists of by/without/on/ignoring/group_x are not series; nor are ranges.
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    found = set()
    for match in SELECTOR.finditer(expr):
        name, matchers = match.group(1), match.group(2) or ""
        rest = expr[match.end() :].lstrip()
        if name in NOT_SERIES or rest.startswith("("):
            continue  # a function or keyword
        found.add(name + matchers)
    return found


def longest_run(values: list[list[Any]]) -> float:
    """Seconds of the longest stretch of 1s in a range query's [time, value] pairs (1 s steps)."""
    longest = run = 0.0
    previous = None
    for t, v in values:
        t = float(t)
        if v == "1" and previous is not None and t - previous[0] <= 1 and previous[1] == "1":
            run += t - previous[0]
        else:
            run = 0.0
        longest = max(longest, run)
        previous = (t, v)
    return longest


def test_selectors_parser_finds_the_series():
    expr = (
        'sum by (a, b) (rate(x_total{m=~"a|(b)"}[5m])) / ignoring (c) group_left () '
        "(ml:y:rate5m > 0) or absent_over_time(z[5m]) and on (d) histogram_quantile(0.9, w)"
    )
    assert selectors(expr) == {'x_total{m=~"a|b"}', "ml:y:rate5m", "z", "w"}


@pytest.fixture
def story(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Runs the demo story with Prometheus scraping it; yields what the checks need."""
    token = f"mlsidecar-test-model-{free_port()}"
    models = [stand_in_model(token)]
    config = tmp_path / "demo.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "resources": {
                    "model": {
                        "cmdline": token,
                        "cpu_limit_cores": 1.0,
                        # Below a Python process's RSS: the memory alert fires.
                        "memory_limit_bytes": 4 * 1024 * 1024,
                        "discovery_interval_s": 0.5,
                    }
                },
                "telemetry": {
                    "metric_export_interval_ms": 1000,
                    "resource_attributes": {
                        "k8s.namespace.name": NAMESPACE,
                        "k8s.pod.name": POD,
                    },
                },
            }
        )
    )
    api_port, ingest_port = free_port(), free_port()
    receiver = OtlpGrpcReceiver().start()
    demo_log = (tmp_path / "demo.log").open("w")
    command = [mlsidecar_command(), "demo", "--config", str(config), "--seed", "1"]
    command += ["--duration", str(STORY_S), "--speed", str(SPEED)]
    command += [
        "--api-listen",
        f"127.0.0.1:{api_port}",
        "--ingest-listen",
        f"127.0.0.1:{ingest_port}",
    ]
    demo = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=demo_log,
        stderr=subprocess.STDOUT,
        env=subprocess_env(
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_EXPORTER_OTLP_INSECURE="true",
        ),
    )
    prometheus = PrometheusServer(
        tmp_path, f"127.0.0.1:{api_port}", rule_files=rules_without_for(tmp_path)
    )
    stop = threading.Event()
    sender = threading.Thread(
        target=send_regression_model, args=(f"127.0.0.1:{ingest_port}", stop), daemon=True
    )
    try:
        prometheus.wait_ready()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{api_port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            pytest.fail(f"the demo did not start:\n{(tmp_path / 'demo.log').read_text()[-3000:]}")
        start = time.time()
        sender.start()
        # In the recovery phase, the model process dies and a new one starts.
        time.sleep(STORY_S * 0.75)
        models[0].kill()
        models[0].wait()
        time.sleep(3)
        models.append(stand_in_model(token))
        assert demo.wait(STORY_S + 60) == 0, (tmp_path / "demo.log").read_text()[-3000:]
        stop.set()
        time.sleep(3)  # Prometheus sees the agent gone (up == 0) and evaluates once more
        yield {
            "prometheus": prometheus,
            "receiver": receiver,
            "start": start,
            "end": time.time(),
            "demo_log": (tmp_path / "demo.log").read_text(),
        }
    finally:
        stop.set()
        if demo.poll() is None:
            demo.kill()
            demo.wait(30)
        for model in models:
            model.kill()
            model.wait(10)
        prometheus.stop()
        receiver.stop()
        demo_log.close()


def test_dashboards_rules_and_exemplars_on_a_real_story(story):
    prometheus: PrometheusServer = story["prometheus"]
    start, end = story["start"], story["end"]
    # The built-ins as Grafana computes them for a 1 s scrape interval and this run.
    values = {
        "datasource": "prometheus",
        "namespace": NAMESPACE,
        "pod": POD,
        "model": MODEL,
        "version": VERSION,
        "feature": FEATURE,
        "upstream": UPSTREAM,
        "__rate_interval": "5s",
        "__range": f"{int(end - start) + 10}s",
    }
    boards = committed_dashboards()

    # Variables: each label_values() query finds the demo's values.
    for name, board in boards.items():
        for variable in board["templating"]["list"]:
            if variable["type"] != "query":
                continue
            match = re.fullmatch(r"label_values\((.*), (\w+)\)", variable["query"])
            assert match, variable["query"]
            selector = substitute(match.group(1), values)
            found = {
                series.get(match.group(2))
                for series in prometheus.api(
                    "series", **{"match[]": selector}, start=start, end=end
                )
            } - {None}
            assert values[variable["name"]] in found, (name, variable["name"], found)

    # Panels: every query returns data over the run, but the documented exceptions.
    empty = set()
    checked = 0
    for name, panel, target in targets(boards):
        panel_values = values
        if panel["title"].startswith("Regression"):
            panel_values = {**values, "model": REGRESSION}
        expr = substitute(target["expr"], panel_values)
        checked += 1
        if not prometheus.range(expr, start, end):
            empty.add((name, panel["title"], target["refId"]))
    assert checked > 60
    allowed = exceptions_here()
    assert empty <= allowed, f"panels without data: {sorted(empty - allowed)}"

    # Rules: all loaded and evaluated without error.
    groups = prometheus.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    files = [yaml.safe_load(p.read_text()) for p in (ROOT / "prometheus" / "rules").glob("*.yml")]
    assert len(rules) == sum(len(g["rules"]) for doc in files for g in doc["groups"])
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
    # Every series selector in every rule matches series during the run.
    for rule in rules:
        for selector in selectors(rule["query"]):
            found = prometheus.api("series", **{"match[]": selector}, start=start, end=end)
            assert found, f"rule {rule['name']}: {selector} matches no series"
    # Recorded series hold values (the fleet drift of the drifting feature among them).
    for rule in rules:
        if rule["type"] == "recording":
            assert prometheus.range(rule["name"], start, end), rule["name"]
    (fleet,) = prometheus.range(
        f'ml:feature_drift_psi:fleet1h{{ml_model_name="{MODEL}", ml_feature_name="{FEATURE}"}}',
        start,
        end,
    )
    assert max(float(v) for _, v in fleet["values"]) >= 0.25

    # Alerts the story should fire, fired.
    fired = {
        series["metric"]["alertname"]
        for series in prometheus.range('ALERTS{alertstate="firing"}', start, end)
    }
    assert fired >= EXPECTED_ALERTS, f"not fired: {EXPECTED_ALERTS - fired}"
    # No sidecar reporting: true only before the first scrape (the test copy has no
    # `for: 5m` to wait it out), never once the agent's series exist.
    (models,) = prometheus.range("mlsidecar_models", start, end)
    first_seen = float(models["values"][0][0])
    for series in prometheus.range('ALERTS{alertname="MLSidecarsNotReporting"}', start, end):
        assert all(float(t) <= first_seen + 2 for t, _ in series["values"]), series
    # A scraped sidecar that stops is MLSidecarDown's; the OTLP path's per-pod alert stays
    # quiet (and the demo stopped gracefully: its last mlsidecar_running is 0 over OTLP).
    assert not prometheus.range('ALERTS{alertname="MLSidecarStoppedReporting"}', start, end)
    assert story["receiver"].gauge_values("mlsidecar.running")[-1] == 0
    (psi,) = [
        s["metric"]
        for s in prometheus.range('ALERTS{alertname="MLFeaturePSIHigh"}', start, end)
        if s["metric"].get("ml_feature_name") == FEATURE
    ]
    assert psi["ml_model_name"] == MODEL and psi["severity"] == "warning"
    (breaker,) = prometheus.range('ALERTS{alertname="MLUpstreamBreakerOpen"}', start, end)
    assert breaker["metric"]["upstream"] == UPSTREAM
    # The drift share held at >= 0.5 without a break for longer than MLDatasetDrift's
    # (test) `for:`, and the alert fired with the model's labels.
    (share,) = prometheus.range(
        f'max(ml_dataset_drift_share{{ml_model_name="{MODEL}"}}) >= bool 0.5', start, end
    )
    assert longest_run(share["values"]) >= 10, share["values"]
    (drift,) = prometheus.range(
        'ALERTS{alertname="MLDatasetDrift",alertstate="firing"}', start, end
    )
    assert drift["metric"]["ml_model_name"] == MODEL
    # The agent's own alerts as a gauge: its breaker-open alert fired (1) and resolved (0)
    # when the breaker closed in the recovery phase.
    (agent_alert,) = prometheus.range(
        'mlsidecar_alerts_firing{alertname="breaker-open"}', start, end
    )
    values = [float(v) for _, v in agent_alert["values"]]
    assert 1 in values and 0 in values[values.index(1) :], values
    # Performance per segment: the requests scored with the store's features and, while
    # the store failed, those scored with the fallback.
    segments = {
        series["metric"]["ml_segment"]
        for series in prometheus.range(
            f'ml_model_segment_performance{{ml_model_name="{MODEL}", ml_metric="accuracy"}}',
            start,
            end,
        )
    }
    assert segments == {"features_source=store", "features_source=fallback"}, segments
    # Label delay: the story's outcomes come 10 or 30 story seconds (1 or 3 s at speed 10)
    # after their predictions, plus the SDK's batching (and a busy machine's lag): every
    # p90 lies around those (measured: 1.2-3.1 s).
    (p90,) = prometheus.range(
        "histogram_quantile(0.9, sum by (le) (rate("
        f'ml_outcome_label_delay_seconds_bucket{{ml_model_name="{MODEL}"}}[10s])))',
        start,
        end,
    )
    delays = [float(v) for _, v in p90["values"] if v != "NaN"]
    assert delays and min(delays) >= 0.5 and max(delays) <= 10, delays

    # Exemplars: the latency histogram's exemplars carry the trace ids of the model
    # service's request spans (both exported over OTLP to the loopback receiver).
    receiver: OtlpGrpcReceiver = story["receiver"]
    exemplar_traces = {
        exemplar.trace_id
        for metric in receiver.metrics("ml.prediction.duration")
        for point in metric.histogram.data_points
        if attributes(point.attributes).get("ml.model.name") == MODEL
        for exemplar in point.exemplars
    }
    assert exemplar_traces and all(len(t) == 16 for t in exemplar_traces)
    model_traces = {
        span.trace_id
        for resource in receiver.resource_spans()
        if attributes(resource.resource.attributes).get("service.name") == "demo-fraud-model"
        for scope in resource.scope_spans
        for span in scope.spans
        if span.name == "POST /predict" and span.kind == span.SpanKind.SPAN_KIND_SERVER
    }
    assert model_traces, "the model service exported no request spans"
    # The model's BatchSpanProcessor may drop spans at this rate (its queue holds 2048),
    # so not every exemplar's trace need have arrived: some must, and be a request's.
    assert exemplar_traces & model_traces, "no exemplar points at a model request's trace"


def test_the_exceptions_are_documented_and_exist():
    """Each panel allowed to be empty here is named in docs/dashboards.md, and exists."""
    documented = (ROOT / "docs" / "dashboards.md").read_text()
    existing = {(n, p["title"], t["refId"]) for n, p, t in targets(committed_dashboards())}
    for key, why in EXCEPTIONS.items():
        assert key in existing, key
        assert key[1] in documented and why.split(" ")[0] in documented, key
