"""Names match end to end: the agent's own ``/metrics`` and the Collector's translation.

Dashboards and Prometheus rules are written against Prometheus names. A metric reaches
Prometheus two ways: Prometheus scrapes the agent's ``/metrics`` (OpenTelemetry's Python
Prometheus exporter), or the agent pushes OTLP to the Collector, whose
``prometheusremotewrite`` exporter translates names. Both must give the same name.

No Collector binary runs here, so its translation is implemented below from the rules of
the translator it uses, cited line by line; everything else is real: a real agent serves
real traffic (engine, drift, outcomes, resources, host metrics, the upstream proxy and its
breaker), every metric its metric readers receive and every metric its real OTLP exporter
sends (decoded by the loopback receiver of tests/otlp_receiver.py) is translated, and the
result is compared with the names the agent's real ``/metrics`` endpoint serves. The names
documented in docs/metrics.md are checked the same way, against the real Python exporter.

    translate("ml.feature.drift.psi", "1", "gauge")   # 'ml_feature_drift_psi_ratio'
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import AgentHarness
from opentelemetry.sdk.metrics.export import Gauge, Histogram, Sum
from otlp_receiver import OtlpGrpcReceiver
from upstream_server import FlakyUpstream

from agent.demo import SyntheticTraffic

ROOT = Path(__file__).resolve().parent.parent
COLLECTOR_CONFIG = ROOT / "collector-config" / "otel-collector.yaml"

# -- The Collector's translation ----------------------------------------------------------
# otelcol-contrib's prometheusremotewrite exporter, with `add_metric_suffixes: true` (pinned
# in collector-config/otel-collector.yaml), names metrics with the OTLP-to-Prometheus
# normalizer: github.com/prometheus/otlptranslator metric_namer.go `normalizeName` (ported
# there from opentelemetry-collector-contrib pkg/translator/prometheus/normalize_name.go,
# which the exporter used before), following the specification's "OTLP Metric points to
# Prometheus" (opentelemetry-specification compatibility/prometheus_and_openmetrics.md).

# unitMap of metric_namer.go: UCUM units -> Prometheus base-unit words.
UNIT_MAP = {
    "d": "days",
    "h": "hours",
    "min": "minutes",
    "s": "seconds",
    "ms": "milliseconds",
    "us": "microseconds",
    "ns": "nanoseconds",
    "By": "bytes",
    "KiBy": "kibibytes",
    "MiBy": "mebibytes",
    "GiBy": "gibibytes",
    "TiBy": "tibibytes",
    "KBy": "kilobytes",
    "MBy": "megabytes",
    "GBy": "gigabytes",
    "TBy": "terabytes",
    "m": "meters",
    "V": "volts",
    "A": "amperes",
    "J": "joules",
    "W": "watts",
    "g": "grams",
    "Cel": "celsius",
    "Hz": "hertz",
    "1": "",
    "%": "percent",
}
# perUnitMap of metric_namer.go: the denominator of "x/y" units ("per_second").
PER_UNIT_MAP = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week"}
PER_UNIT_MAP.update({"mo": "month", "y": "year"})

_INVALID = re.compile(r"[^a-zA-Z0-9:]")


def _clean_unit(unit: str) -> str:
    # cleanUpUnit: invalid characters become "_", runs of "_" collapse, no leading "_".
    return re.sub(r"__+", "_", _INVALID.sub("_", unit)).lstrip("_")


def _unit_suffixes(unit: str) -> tuple[str, str]:
    # buildUnitSuffixes: split at the first "/"; a unit with braces ("{request}") adds nothing.
    main, _, per = unit.partition("/")
    main, per = main.strip(), per.strip()
    main_suffix = UNIT_MAP.get(main, main) if main and not re.search("[{}]", main) else ""
    per_suffix = ""
    if per and not re.search("[{}]", per):
        per_suffix = "per_" + PER_UNIT_MAP.get(per, per)
    return _clean_unit(main_suffix), _clean_unit(per_suffix)


def translate(name: str, unit: str, kind: str) -> str:
    """The Prometheus name the Collector gives an OTLP metric (``kind``: counter, updown,
    gauge or histogram; a counter is a monotonic sum, an updown a non-monotonic one)."""
    # Split into tokens of valid characters: dots become "_", runs of "_" collapse.
    tokens = [token for token in _INVALID.split(name) if token]
    main, per = _unit_suffixes(unit)
    # addUnitTokens: a unit word already among the name's tokens is not added again.
    if main in tokens:
        main = ""
    per = "" if per == "per_" else per.rstrip("_")
    if per in tokens:
        per = ""
    if per:
        main = main.rstrip("_")
    tokens += [suffix for suffix in (main, per) if suffix]
    # Monotonic sums end in "total" (any "total" token elsewhere is removed).
    if kind == "counter":
        tokens = [token for token in tokens if token != "total"] + ["total"]
    # Gauges with unit "1" end in "ratio" (non-monotonic sums and counters do not).
    if unit == "1" and kind == "gauge":
        tokens = [token for token in tokens if token != "ratio"] + ["ratio"]
    translated = "_".join(tokens)
    return "_" + translated if translated[:1].isdigit() else translated


def collector_unit(unit: str, kind: str) -> str:
    """The unit after the Collector's ``transform/prometheus_names`` processor, which blanks
    unit "1" on gauges (for third-party instrumentation whose units we do not choose)."""
    return "" if unit == "1" and kind == "gauge" else unit


def sample_names(name: str, kind: str) -> set[str]:
    """The sample names Prometheus stores for a translated metric."""
    if kind == "histogram":
        return {name + "_bucket", name + "_sum", name + "_count"}
    return {name}


def test_the_translation_follows_the_documented_examples() -> None:
    """The examples of otlptranslator's own docs and tests, so the port above is faithful."""
    assert translate("http.server.request.duration", "s", "histogram") == (
        "http_server_request_duration_seconds"
    )
    assert translate("requests.count", "1", "counter") == "requests_count_total"
    assert translate("memory.usage", "By", "gauge") == "memory_usage_bytes"
    assert translate("system.cpu.utilization", "1", "gauge") == "system_cpu_utilization_ratio"
    assert translate("ml.feature.missing.ratio", "1", "gauge") == "ml_feature_missing_ratio"
    assert translate("system.disk.operations", "operations", "counter") == (
        "system_disk_operations_total"
    )
    assert translate("network.transmit", "By/s", "gauge") == "network_transmit_bytes_per_second"
    assert translate("ml.predictions", "{prediction}", "counter") == "ml_predictions_total"
    assert translate("process.thread.count", "{thread}", "updown") == "process_thread_count"


def test_the_collector_pins_the_translation_this_test_assumes() -> None:
    """The Collector config sets the options the translation above depends on."""
    config = yaml.safe_load(COLLECTOR_CONFIG.read_text())
    prw = config["exporters"]["prometheusremotewrite"]
    assert prw["add_metric_suffixes"] is True
    assert prw["resource_to_telemetry_conversion"]["enabled"] is True
    assert prw.get("namespace", "") == ""
    statements = config["processors"]["transform/prometheus_names"]["metric_statements"]
    flat = [s for group in statements for s in group["statements"]]
    assert 'set(metric.unit, "") where metric.unit == "1" and metric.type == ' in flat[0]
    assert "transform/prometheus_names" in config["service"]["pipelines"]["metrics"]["processors"]


# -- A live agent -------------------------------------------------------------------------


def _kind(data: Any) -> str:
    if isinstance(data, Histogram):
        return "histogram"
    if isinstance(data, Sum):
        return "counter" if data.is_monotonic else "updown"
    assert isinstance(data, Gauge), data
    return "gauge"


def _otel_metrics(harness: AgentHarness) -> dict[str, tuple[str, str, str]]:
    """name -> (unit, kind, scope) of every metric the agent's metric readers receive."""
    data = harness.metric_reader.get_metrics_data()
    assert data is not None
    found: dict[str, tuple[str, str, str]] = {}
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if metric.data.data_points:
                    kind = _kind(metric.data)
                    found[metric.name] = (metric.unit or "", kind, scope_metrics.scope.name)
    return found


def _scraped_names(harness: AgentHarness) -> set[str]:
    """Sample names on the agent's real /metrics, without the resource's target_info."""
    text = httpx.get(harness.api_url + "/metrics", timeout=10).text
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names - {"target_info"}


def _drive(harness: AgentHarness, upstream: FlakyUpstream, seconds: float) -> None:
    """Demo traffic (predictions, latencies, scores, labels, outcomes) and proxied calls,
    some failing, so the upstream counters, histogram and breaker have series."""
    assert harness.agent.proxy is not None
    base = f"http://127.0.0.1:{harness.agent.proxy.port}/upstream/features"
    for _ in range(3):
        httpx.get(base + "/ok", timeout=10)
    upstream.fail_next(10, status=503)
    for _ in range(6):  # 3 consecutive failures open the breaker, later calls are refused
        httpx.get(base + "/fail", timeout=10)

    for path in ("/v1/models", "/v1/models/fraud-scorer/health"):  # http.server.* metrics
        httpx.get(harness.api_url + path, timeout=10)

    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    traffic = SyntheticTraffic(harness.ingest_target, rate=4000, batch_rows=200)
    timer = threading.Timer(seconds, lambda: loop.call_soon_threadsafe(stop.set))
    timer.start()
    try:
        loop.run_until_complete(traffic.run(stop))
    finally:
        timer.cancel()
        loop.close()
    assert traffic.sent_predictions > 0 and traffic.sent_outcomes > 0


def _wire_metrics(receiver: OtlpGrpcReceiver) -> dict[str, tuple[str, str, str]]:
    """name -> (unit, kind, scope) as the Collector receives them: decoded from the OTLP
    export requests the agent's real exporter sent to the loopback receiver."""
    found: dict[str, tuple[str, str, str]] = {}
    for resource_metrics in receiver.resource_metrics():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                data = metric.WhichOneof("data")
                kind = {"gauge": "gauge", "histogram": "histogram"}.get(data or "")
                if data == "sum":
                    kind = "counter" if metric.sum.is_monotonic else "updown"
                assert kind is not None, (metric.name, data)
                found[metric.name] = (metric.unit, kind, scope_metrics.scope.name)
    return found


def _collector_names(metrics: dict[str, tuple[str, str, str]]) -> dict[str, str]:
    """Prometheus sample name -> OTel name, as the Collector config translates them."""
    translated: dict[str, str] = {}
    for name, (unit, kind, scope) in metrics.items():
        # The agent's own units must translate identically with any Collector; only
        # third-party instrumentation relies on the Collector's unit transform.
        if not scope.startswith("mlsidecar"):
            unit = collector_unit(unit, kind)
        for sample in sample_names(translate(name, unit, kind), kind):
            translated[sample] = name
    return translated


@pytest.mark.slow
def test_every_metric_of_a_live_agent_has_the_same_name_through_the_collector(
    start_agent: Callable[..., AgentHarness],
) -> None:
    """Both what the metric readers receive and what the real OTLP exporter puts on the
    wire (a loopback OTLP receiver stands in for the Collector, which cannot run here)."""
    with FlakyUpstream() as upstream, OtlpGrpcReceiver() as receiver:
        harness = start_agent(
            engine={"window_s": 1, "min_window_rows": 200},
            telemetry={
                "otlp": True,
                "endpoint": receiver.endpoint,
                "metric_export_interval_ms": 500,
                "traces": False,
                "logs": False,
            },
            # This test's own process stands in for the model service (mlsidecar.model.*).
            resources={
                "model": {"pid": os.getpid(), "cpu_limit_cores": 2, "memory_limit_bytes": 2**34}
            },
            upstream={
                "listen": "127.0.0.1:0",
                "policies": {
                    "features": {
                        "retries": {"max": 1, "base_s": 0.01, "jitter": 0},
                        "breaker": {"consecutive_failures": 3, "open_s": 30},
                    }
                },
                "targets": {"features": {"url": upstream.url, "policy": "features"}},
            },
            # The breaker _drive opens fires this rule: mlsidecar.alerts.firing has a series.
            alerts={
                "rules": {"breaker-open": {"signal": "breakers.*.open", "op": "==", "threshold": 1}}
            },
        )
        _drive(harness, upstream, seconds=3.0)
        harness.run(harness.agent.evaluate_alerts())

        # Series appear over time (a rate needs two readings, drift a closed window) and
        # go again (drift once no window holds min_window_rows), and each reader collects
        # on its own clock: compare what each has seen so far, retrying a few times.
        scraped: set[str] = set()
        otel: dict[str, tuple[str, str, str]] = {}
        for _attempt in range(10):
            scraped |= _scraped_names(harness)
            otel |= _otel_metrics(harness)
            translated = _collector_names(otel)
            wire = _collector_names(_wire_metrics(receiver))
            if set(translated) == scraped == set(wire):
                break
            time.sleep(1.0)
        harness.stop()  # while the receiver still answers the exporter's final flush

    for source, names in (("metric reader", translated), ("OTLP wire", wire)):
        missing = {s: names[s] for s in set(names) - scraped}
        extra = scraped - set(names)
        assert not missing, f"{source}: the Collector would name these differently: {missing}"
        assert not extra, f"{source}: /metrics names no OTel metric translates to: {sorted(extra)}"

    # docs/metrics.md lists every metric the live agent exported, with both names.
    documented = {name: prom for _, name, _, _, prom in documented_metrics()}
    undocumented = set(otel) - set(documented)
    assert not undocumented, f"not in docs/metrics.md: {sorted(undocumented)}"

    # The groups the dashboards and rules use all took part.
    for must in (
        "ml_predictions_total",
        "ml_prediction_duration_seconds_bucket",
        "ml_prediction_score_bucket",
        "ml_outcomes_joined_total",
        "ml_model_performance",
        "ml_model_segment_performance",
        "ml_outcome_label_delay_seconds_bucket",
        "mlsidecar_alerts_firing",
        "ml_model_health_score",
        "mlsidecar_ingest_batches_total",
        "mlsidecar_ingest_duration_seconds_bucket",
        "process_cpu_utilization",
        "process_memory_usage_bytes",
        "system_cpu_utilization",
        "mlsidecar_upstream_requests_total",
        "mlsidecar_upstream_rejections_total",
        "mlsidecar_upstream_breaker_state",
        "mlsidecar_upstream_duration_seconds_bucket",
        "ml_feature_drift_psi",
        "ml_feature_psi_bin_reference",
        "mlsidecar_model_process_up",
        "mlsidecar_model_memory_limit_utilization",
        "http_server_duration_milliseconds_bucket",
    ):
        assert must in scraped, must


# -- Every name documented in docs/metrics.md --------------------------------------------

DOC = ROOT / "docs" / "metrics.md"
# Tables without an instrument column: the kind their section says.
SECTION_KINDS = {"ML health gauges": "gauge", "Outcome joins and anomalies (counters)": "counter"}


def _kind_of(instrument: str) -> str | None:
    instrument = instrument.lower()
    if "histogram" in instrument:
        return "histogram"
    if "up-down" in instrument:
        return "updown"
    if "counter" in instrument:
        return "counter"
    if "gauge" in instrument:
        return "gauge"
    return None


def _ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]*)`", cell)


def documented_metrics() -> list[tuple[str, str, str, str, str]]:
    """(section, OTel name, unit, kind, Prometheus name) of every table row of metrics.md
    that names both, one tuple per name pair ("a, b" rows are zipped, "…" skipped)."""
    rows: list[tuple[str, str, str, str, str]] = []
    section, header = "", None
    for line in DOC.read_text().splitlines():
        if line.startswith("#"):
            section, header = line.lstrip("# ").strip(), None
            continue
        if not line.startswith("|"):
            header = None
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if header is None:
            header = [cell.lower() for cell in cells]
            continue
        if set(cells[0]) <= {"-", " "} or "otel name" not in header:
            continue
        column = dict(zip(header, cells, strict=False))
        names = [n for n in _ticked(column["otel name"]) if not n.startswith(".")]
        proms = [p for p in _ticked(column["prometheus name"]) if not p.startswith("_")]
        units = _ticked(column.get("unit", ""))
        instrument = column.get("instrument", "")
        if not units:  # "counter, `{value}`": instrument and unit in one cell
            units = _ticked(instrument)
        kind = _kind_of(instrument) or SECTION_KINDS.get(section)
        for index, (name, prom) in enumerate(zip(names, proms, strict=False)):
            unit = units[index] if index < len(units) else units[-1]
            unit = "" if unit == '""' else unit
            prom = prom.removesuffix("_*").removesuffix("_bucket")
            row_kind = kind or ("counter" if prom.endswith("_total") else "gauge")
            rows.append((section, name, unit, row_kind, prom))
    return rows


def python_exporter_name(name: str, unit: str, kind: str) -> str:
    """The name the agent's /metrics gives a metric: the real Python Prometheus exporter."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    meter = provider.get_meter("docs")
    if kind == "counter":
        meter.create_counter(name, unit=unit).add(1)
    elif kind == "updown":
        meter.create_up_down_counter(name, unit=unit).add(1)
    elif kind == "histogram":
        meter.create_histogram(name, unit=unit).record(1)
    else:
        from opentelemetry.metrics import Observation

        meter.create_observable_gauge(name, [lambda _options: [Observation(1)]], unit=unit)
    text = generate_latest(registry).decode()
    provider.shutdown()
    samples = {
        re.split(r"[{ ]", line, maxsplit=1)[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    } - {"target_info"}
    if kind == "histogram":
        (bucket,) = [s for s in samples if s.endswith("_bucket")]
        return bucket.removesuffix("_bucket")
    (sample,) = samples
    return sample


def test_every_documented_name_is_what_both_paths_produce() -> None:
    """docs/metrics.md's Prometheus name of every metric equals the real Python exporter's
    name and the Collector's translation, including metrics that cannot be produced on this
    machine (cgroup v2 container metrics, GPUs, overflow)."""
    rows = documented_metrics()
    checked = {name for _, name, *_ in rows}
    assert len(rows) >= 60, len(rows)
    for needed in (
        "ml.feature.drift.psi",
        "ml.feature.psi.bin.values",
        "mlsidecar.container.cpu.limit_utilization",
        "container.cpu.time",
        "hw.gpu.utilization",
        "hw.temperature",
        "system.swap.utilization",
        "mlsidecar.upstream.breaker.state",
        "http.server.duration",
    ):
        assert needed in checked, needed
    wrong = []
    for section, name, unit, kind, documented in rows:
        third_party = (section.startswith("Host") and unit == "1") or name.startswith("http.")
        collector = translate(name, collector_unit(unit, kind) if third_party else unit, kind)
        python = python_exporter_name(name, unit, kind)
        if not documented == collector == python:
            wrong.append((name, unit, kind, documented, collector, python))
    assert not wrong, wrong


def test_the_dashboards_resource_labels_are_on_every_metrics_series(
    start_agent: Callable[..., AgentHarness],
) -> None:
    """As the Collector's resource_to_telemetry_conversion does, the agent's /metrics puts
    the resource attributes the dashboards filter on onto every series; the others (e.g.
    service.instance.id, unique per process) stay on target_info only."""
    harness = start_agent(
        telemetry={
            "otlp": False,
            "service_name": "fraud-svc",
            "resource_attributes": {
                "service.version": "1.4.0",
                "k8s.namespace.name": "prod",
                "k8s.pod.name": "fraud-7f9c",
                "k8s.node.name": "node-a",
                "deployment.environment.name": "staging",
            },
        }
    )
    text = httpx.get(harness.api_url + "/metrics", timeout=10).text
    series = [line for line in text.splitlines() if line and not line.startswith("#")]
    promoted = (
        'service_name="fraud-svc"',
        'service_version="1.4.0"',
        'k8s_namespace_name="prod"',
        'k8s_pod_name="fraud-7f9c"',
        'k8s_node_name="node-a"',
    )
    assert len(series) > 20
    for line in series:
        for label in promoted:
            assert label in line, (label, line)
        if not line.startswith("target_info"):
            assert "service_instance_id" not in line and "deployment_environment" not in line
    (info,) = [line for line in series if line.startswith("target_info")]
    assert "service_instance_id=" in info and 'deployment_environment_name="staging"' in info
