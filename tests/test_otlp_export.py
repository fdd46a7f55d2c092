"""OTLP export end to end: a real Agent pushes to a loopback OTLP receiver.

No OpenTelemetry Collector binary is available on the test machines, so the
receiving side is ``tests/otlp_receiver.py``: OTLP/gRPC services built from the
official ``opentelemetry-proto`` definitions, and an ``http.server`` endpoint
that parses the OTLP/HTTP protobuf bodies. The agent side is not faked: its
real OTLP exporters send over real sockets.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import AgentHarness, agent_settings, free_port
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from otlp_receiver import OtlpGrpcReceiver, OtlpHttpReceiver, attributes

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb

MODEL = "fraud"
SUBMIT_SPAN = "mlsidecar.v1.Ingest/SubmitPredictions"


@pytest.fixture(autouse=True)
def _otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OTEL_*/MLSIDECAR_* from the shell; spans and logs leave their batches quickly."""
    for name in list(os.environ):
        if name.startswith(("OTEL_", "MLSIDECAR_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    monkeypatch.setenv("OTEL_BLRP_SCHEDULE_DELAY", "100")


@pytest.fixture
def grpc_collector() -> Iterator[OtlpGrpcReceiver]:
    with OtlpGrpcReceiver() as receiver:
        yield receiver


@pytest.fixture
def http_collector() -> Iterator[OtlpHttpReceiver]:
    with OtlpHttpReceiver() as receiver:
        yield receiver


def prediction_batch(n: int, seed: int = 0) -> pb.PredictionBatch:
    return pb.PredictionBatch(
        model=MODEL,
        model_version="v1",
        ids=[f"{seed}-{i}" for i in range(n)],
        scores=[i / n for i in range(n)],
        latencies_ms=[1.0 + i for i in range(n)],
        trace_ids=[(seed * n + i + 1).to_bytes(16, "big") for i in range(n)],
        span_ids=[(i + 1).to_bytes(8, "big") for i in range(n)],
    )


def otlp_settings(endpoint: str, protocol: str) -> dict[str, Any]:
    return {
        "telemetry": {
            "otlp": True,
            "endpoint": endpoint,
            "protocol": protocol,
            "metric_export_interval_ms": 200,
            "service_name": "fraud-scorer",
        }
    }


def assert_received_everything(collector: Any, n: int) -> None:
    """Metrics, spans and logs of one agent that accepted ``n`` prediction rows of MODEL."""
    collector.wait_for(
        lambda: collector.metric_value("ml.predictions", **{"ml.model.name": MODEL}) == n
    )

    # Metrics: the engine's points, cumulative, under the monitored service's resource.
    (resource,) = {
        attributes(rm.resource.attributes)["service.name"]
        for rm in collector.resource_metrics()
        if any(m.name == "ml.predictions" for sm in rm.scope_metrics for m in sm.metrics)
    }
    assert resource == "fraud-scorer"
    latest = collector.metrics("ml.predictions")[-1]
    assert latest.unit == "{prediction}"
    assert latest.sum.is_monotonic
    assert (
        latest.sum.aggregation_temporality
        == AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
    )
    (point,) = latest.sum.data_points
    assert attributes(point.attributes) == {
        "ml.model.name": MODEL,
        "ml.model.version": "v1",
        "ml.segment": "",
    }
    duration = collector.metrics("ml.prediction.duration")[-1]
    assert duration.unit == "s"
    (histogram,) = duration.histogram.data_points
    assert histogram.count == n
    assert histogram.sum == pytest.approx(sum(1.0 + i for i in range(n)) / 1000)
    assert histogram.exemplars, "exemplars survive the OTLP encoding"
    assert all(len(e.trace_id) == 16 for e in histogram.exemplars)
    collector.wait_for(lambda: collector.metric_value("mlsidecar.ingest.rows") == n)

    # Traces: the ingest RPC's server span, with links to the model requests.
    spans = collector.wait_for(lambda: collector.spans(SUBMIT_SPAN))
    (span,) = spans
    assert span.kind == Span.SpanKind.SPAN_KIND_SERVER
    assert attributes(span.attributes)["mlsidecar.batch.rows"] == n
    assert span.links and all(len(link.trace_id) == 16 for link in span.links)
    span_resources = {
        attributes(rs.resource.attributes)["service.name"] for rs in collector.resource_spans()
    }
    assert span_resources == {"fraud-scorer"}

    # Logs: the agent's own log records, with their structured fields as attributes.
    def started_records() -> list[Any]:
        return [r for r in collector.log_records() if r.body.string_value == "mlsidecar started"]

    (started,) = collector.wait_for(started_records)
    assert started.severity_text == "INFO"
    fields = attributes(started.attributes)
    assert fields["ingest"].startswith("127.0.0.1:")
    assert "otlp-metrics" in fields["exporting"]


def test_grpc_export_delivers_metrics_spans_and_logs(grpc_collector, start_agent, caplog):
    caplog.set_level(logging.INFO)  # the root level decides which records reach the OTLP handler
    harness = start_agent(**otlp_settings(grpc_collector.endpoint, "grpc"))
    assert harness.agent.telemetry.exporting == [
        "otlp-metrics",
        "prometheus",
        "otlp-traces",
        "otlp-logs",
    ]

    assert harness.stub().SubmitPredictions(prediction_batch(40)).accepted == 40

    assert_received_everything(grpc_collector, 40)


def test_http_protobuf_export_delivers_metrics_spans_and_logs(http_collector, start_agent, caplog):
    caplog.set_level(logging.INFO)
    harness = start_agent(**otlp_settings(http_collector.endpoint, "http/protobuf"))

    assert harness.stub().SubmitPredictions(prediction_batch(25)).accepted == 25

    assert_received_everything(http_collector, 25)
    assert {"/v1/metrics", "/v1/traces", "/v1/logs"} <= set(http_collector.paths)


def test_periodic_export_keeps_sending_the_running_total(grpc_collector, start_agent):
    harness = start_agent(**otlp_settings(grpc_collector.endpoint, "grpc"))
    stub = harness.stub()
    stub.SubmitPredictions(prediction_batch(10, seed=1))
    grpc_collector.wait_for(lambda: grpc_collector.metric_value("ml.predictions") == 10)
    stub.SubmitPredictions(prediction_batch(15, seed=2))
    grpc_collector.wait_for(lambda: grpc_collector.metric_value("ml.predictions") == 25)

    values = [
        point.as_double
        for metric in grpc_collector.metrics("ml.predictions")
        for point in metric.sum.data_points
    ]
    assert values == sorted(values), "a cumulative counter never goes down between exports"


def test_otel_exporter_endpoint_env_wins_over_the_config_endpoint(
    grpc_collector, start_agent, monkeypatch
):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", grpc_collector.endpoint)
    settings = otlp_settings(f"http://127.0.0.1:{free_port()}", "grpc")  # nobody listens there
    harness = start_agent(**settings)

    harness.stub().SubmitPredictions(prediction_batch(7))

    grpc_collector.wait_for(lambda: grpc_collector.metric_value("ml.predictions") == 7)


def test_collector_down_does_not_affect_ingest_and_stop_keeps_its_deadline():
    closed = f"http://127.0.0.1:{free_port()}"  # bound once, now closed: connection refused
    settings = agent_settings(shutdown_timeout_s=1, **otlp_settings(closed, "grpc"))
    harness = AgentHarness(settings).start()
    try:
        stub = harness.stub()
        for seed in range(5):
            assert stub.SubmitPredictions(prediction_batch(20, seed=seed)).accepted == 20
        time.sleep(0.5)  # a few export attempts fail meanwhile
        assert stub.SubmitPredictions(prediction_batch(20, seed=9)).accepted == 20
        assert httpx.get(f"{harness.api_url}/readyz").status_code == 200
        report = httpx.get(f"{harness.api_url}/v1/models/{MODEL}/health").json()
        assert report["totals"]["rows"] == 120
    finally:
        started = time.monotonic()
        harness.stop()
        elapsed = time.monotonic() - started
    assert elapsed < 1 + 3, f"stop() took {elapsed:.1f}s with shutdown_timeout_s=1"


def test_delta_temporality_preference_does_not_turn_counters_into_deltas(
    grpc_collector, start_agent, monkeypatch
):
    # Engine points are cumulative; SDK instruments exported as deltas next to them would
    # make one backend series per agent mix both kinds.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "delta")
    harness = start_agent(**otlp_settings(grpc_collector.endpoint, "grpc"))
    harness.stub().SubmitPredictions(prediction_batch(9))
    grpc_collector.wait_for(lambda: grpc_collector.metric_value("mlsidecar.ingest.rows") == 9)
    exports_so_far = len(grpc_collector.metric_requests)
    grpc_collector.wait_for(lambda: len(grpc_collector.metric_requests) >= exports_so_far + 2)

    assert grpc_collector.metric_value("mlsidecar.ingest.rows") == 9  # a delta would be 0
    cumulative = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
    for rm in grpc_collector.resource_metrics():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                kind = metric.WhichOneof("data")
                if kind in ("sum", "histogram"):
                    temporality = getattr(metric, kind).aggregation_temporality
                    assert temporality == cumulative, metric.name
