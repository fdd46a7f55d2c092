"""What the OpenTelemetry SDK really produced for ingested batches.

The agent runs for real (gRPC on loopback); its metrics are read back through an
``InMemoryMetricReader`` and its spans through an ``InMemorySpanExporter``, so
these tests see exactly what an OTLP or Prometheus exporter would be handed.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from conftest import AgentHarness, agent_settings
from metric_data import by_name
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    Metric,
    NumberDataPoint,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb
from agent.config import LoggingSettings, TelemetrySettings
from agent.engine import Engine, ModelConfig
from agent.ingest.receiver import MAX_SPAN_LINKS
from agent.telemetry.logs import JsonFormatter, TextFormatter, configure_logging
from agent.telemetry.providers import Telemetry

MODEL, VERSION = "fraud", "v3"
LATENCY_BOUNDS_MS = [1.0, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000]
SCORE_BOUNDS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
SUBMIT_SPAN = "mlsidecar.v1.Ingest/SubmitPredictions"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_* and MLSIDECAR_* variables of the surrounding shell must not leak in."""
    for name in list(os.environ):
        if name.startswith(("OTEL_", "MLSIDECAR_")):
            monkeypatch.delenv(name)


# -- helpers ---------------------------------------------------------------------------------


class Rows:
    """A columnar batch's values kept as numpy arrays for computing expectations."""

    def __init__(self, n: int, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.n = n
        self.ids = [f"p{seed}-{i}" for i in range(n)]
        latencies = rng.lognormal(mean=3.0, sigma=1.5, size=n)  # ms, spread over all buckets
        latencies[:3] = [5.0, 100.0, 20_000.0]  # on bucket bounds, and in the overflow bucket
        self.latencies_ms = latencies
        self.scores = rng.uniform(0, 1, size=n)
        self.scores[:2] = [0.5, 1.0]
        self.trace_ids = [rng.bytes(16) for _ in range(n)]
        self.span_ids = [rng.bytes(8) for _ in range(n)]

    def batch(self, **fields: Any) -> pb.PredictionBatch:
        return pb.PredictionBatch(
            model=MODEL,
            model_version=VERSION,
            ids=self.ids,
            latencies_ms=self.latencies_ms.tolist(),
            scores=self.scores.tolist(),
            trace_ids=self.trace_ids,
            span_ids=self.span_ids,
            attributes={"region": "eu"},
            **fields,
        )


def bucket_counts(values: np.ndarray, bounds: list[float]) -> list[int]:
    """OpenTelemetry explicit buckets: bucket i holds bounds[i-1] < v <= bounds[i]."""
    edges = [-np.inf, *bounds, np.inf]
    return [
        int(np.count_nonzero((values > lo) & (values <= hi)))
        for lo, hi in itertools.pairwise(edges)
    ]


def only_point(metric: Metric, **attributes: Any) -> Any:
    points = [
        p
        for p in metric.data.data_points
        if all(p.attributes.get(k) == v for k, v in attributes.items())
    ]
    assert len(points) == 1, (
        f"{metric.name}: {len(points)} points match {attributes}: {list(metric.data.data_points)}"
    )
    return points[0]


def submit_spans(harness: AgentHarness) -> list[Any]:
    return [s for s in harness.spans.get_finished_spans() if s.name == SUBMIT_SPAN]


# -- engine metrics --------------------------------------------------------------------------


def test_predictions_counter_counts_every_row_with_model_and_segment_attributes(agent):
    rows = Rows(500)
    assert agent.stub().SubmitPredictions(rows.batch()).accepted == 500

    metric = by_name(agent.metric_reader)["ml.predictions"]
    assert metric.unit == "{prediction}"
    assert metric.data.is_monotonic
    point = only_point(metric)
    assert isinstance(point, NumberDataPoint)
    assert dict(point.attributes) == {
        "ml.model.name": MODEL,
        "ml.model.version": VERSION,
        "ml.segment": "region=eu",
    }
    assert point.value == 500


def test_duration_histogram_is_in_seconds_with_the_rows_bucket_counts_and_sum(agent):
    rows = Rows(1000)
    agent.stub().SubmitPredictions(rows.batch())

    metric = by_name(agent.metric_reader)["ml.prediction.duration"]
    assert metric.unit == "s"
    point = only_point(metric)
    assert isinstance(point, HistogramDataPoint)
    assert dict(point.attributes) == {"ml.model.name": MODEL, "ml.model.version": VERSION}
    assert point.count == 1000
    assert list(point.explicit_bounds) == pytest.approx([b / 1000 for b in LATENCY_BOUNDS_MS])
    seconds = rows.latencies_ms / 1000
    assert list(point.bucket_counts) == bucket_counts(
        seconds, [b / 1000 for b in LATENCY_BOUNDS_MS]
    )
    assert sum(point.bucket_counts) == 1000
    assert point.sum == pytest.approx(float(seconds.sum()), rel=1e-9)
    assert point.min == pytest.approx(float(seconds.min()))
    assert point.max == pytest.approx(20.0)  # the 20 000 ms row, in the overflow bucket


def test_duration_exemplars_carry_the_rows_own_trace_and_span_ids(agent):
    rows = Rows(300)
    agent.stub().SubmitPredictions(rows.batch())

    point = only_point(by_name(agent.metric_reader)["ml.prediction.duration"])
    by_trace = {
        int.from_bytes(t, "big"): (int.from_bytes(s, "big"), latency / 1000)
        for t, s, latency in zip(rows.trace_ids, rows.span_ids, rows.latencies_ms, strict=True)
    }
    non_empty_buckets = sum(1 for c in point.bucket_counts if c)
    assert len(point.exemplars) == non_empty_buckets  # one per bucket that saw a traced row
    for exemplar in point.exemplars:
        assert exemplar.trace_id in by_trace, "exemplar trace id is not one of the batch's rows"
        span_id, value = by_trace[exemplar.trace_id]
        assert exemplar.span_id == span_id
        assert exemplar.value == pytest.approx(value)


def test_score_histogram_has_the_rows_distribution(agent):
    rows = Rows(400)
    agent.stub().SubmitPredictions(rows.batch())

    metric = by_name(agent.metric_reader)["ml.prediction.score"]
    point = only_point(metric, **{"ml.model.name": MODEL})
    assert point.count == 400
    assert list(point.explicit_bounds) == pytest.approx(SCORE_BOUNDS)
    assert list(point.bucket_counts) == bucket_counts(rows.scores, SCORE_BOUNDS)
    assert point.sum == pytest.approx(float(rows.scores.sum()))
    assert {e.trace_id for e in point.exemplars} <= {
        int.from_bytes(t, "big") for t in rows.trace_ids
    }


def test_outcomes_counter_counts_outcome_rows(agent):
    rows = Rows(50)
    stub = agent.stub()
    stub.SubmitPredictions(rows.batch())
    ack = stub.SubmitOutcomes(
        pb.OutcomeBatch(
            model=MODEL, model_version=VERSION, ids=rows.ids[:20], actual_labels=["1"] * 20
        )
    )
    assert ack.accepted == 20

    point = only_point(by_name(agent.metric_reader)["ml.outcomes"])
    assert dict(point.attributes) == {"ml.model.name": MODEL, "ml.model.version": VERSION}
    assert point.value == 20


def test_metrics_are_cumulative_across_collections(agent):
    stub = agent.stub()
    stub.SubmitPredictions(Rows(100, seed=1).batch())
    first = by_name(agent.metric_reader)
    again = by_name(agent.metric_reader)  # nothing new: a delta reader would report 0 here
    stub.SubmitPredictions(Rows(30, seed=2).batch())
    later = by_name(agent.metric_reader)

    for name in ("ml.predictions", "ml.prediction.duration", "ml.prediction.score"):
        assert first[name].data.aggregation_temporality == AggregationTemporality.CUMULATIVE
    counts = [only_point(m["ml.predictions"]).value for m in (first, again, later)]
    assert counts == [100, 100, 130]
    durations = [only_point(m["ml.prediction.duration"]).count for m in (first, again, later)]
    assert durations == [100, 100, 130]
    start_times = {
        only_point(m["ml.predictions"]).start_time_unix_nano for m in (first, again, later)
    }
    assert len(start_times) == 1, "a cumulative series keeps its start time"
    assert (
        only_point(later["ml.predictions"]).time_unix_nano
        >= only_point(first["ml.predictions"]).time_unix_nano
    )


def test_sample_rate_scales_the_predictions_estimate_but_not_rows_received(agent):
    rows = Rows(200)
    assert agent.stub().SubmitPredictions(rows.batch(sample_rate=0.25)).accepted == 200

    metrics = by_name(agent.metric_reader)
    assert only_point(metrics["ml.predictions"]).value == pytest.approx(800)
    assert only_point(metrics["mlsidecar.ingest.rows"]).value == 200
    report = httpx.get(f"{agent.api_url}/v1/models/{MODEL}/health").json()
    assert report["totals"]["rows"] == 200
    assert report["totals"]["estimated_predictions"] == pytest.approx(800)


def test_each_segment_is_its_own_predictions_series(agent):
    stub = agent.stub()
    stub.SubmitPredictions(Rows(10, seed=1).batch())  # region=eu
    batch = Rows(7, seed=2).batch()
    batch.attributes.clear()
    batch.attributes["region"] = "us"
    stub.SubmitPredictions(batch)

    metric = by_name(agent.metric_reader)["ml.predictions"]
    assert only_point(metric, **{"ml.segment": "region=eu"}).value == 10
    assert only_point(metric, **{"ml.segment": "region=us"}).value == 7


# -- spans -----------------------------------------------------------------------------------


def test_one_server_span_per_batch_with_rows_and_links_to_the_model_requests(agent):
    rows = Rows(50)
    agent.stub().SubmitPredictions(rows.batch())

    (span,) = submit_spans(agent)
    assert span.kind == SpanKind.SERVER
    assert span.attributes["rpc.system"] == "grpc"
    assert span.attributes["rpc.method"] == "SubmitPredictions"
    assert span.attributes["ml.model.name"] == MODEL
    assert span.attributes["ml.model.version"] == VERSION
    assert span.attributes["mlsidecar.batch.rows"] == 50
    row_contexts = {
        (int.from_bytes(t, "big"), int.from_bytes(s, "big"))
        for t, s in zip(rows.trace_ids, rows.span_ids, strict=True)
    }
    links = [(link.context.trace_id, link.context.span_id) for link in span.links]
    assert len(links) == MAX_SPAN_LINKS  # a few links, not one per row
    assert set(links) <= row_contexts
    assert span.context.trace_id not in {t for t, _ in links}, "links, not a parent"


def test_row_form_batches_link_to_the_model_requests_too(agent):
    trace_id, span_id = bytes(range(1, 17)), bytes(range(1, 9))
    event = pb.PredictionEvent(id="r1", score=0.5, trace_id=trace_id, span_id=span_id)
    agent.stub().SubmitPredictions(pb.PredictionBatch(model=MODEL, events=[event]))

    (span,) = submit_spans(agent)
    links = [(link.context.trace_id, link.context.span_id) for link in span.links]
    assert links == [(int.from_bytes(trace_id, "big"), int.from_bytes(span_id, "big"))]


OUTCOME_SPAN = "mlsidecar.v1.Ingest/SubmitOutcomes"


def spans_named(harness: AgentHarness, name: str) -> list[Any]:
    return [s for s in harness.spans.get_finished_spans() if s.name == name]


def linked(span: Any) -> dict[tuple[int, int], dict[str, Any]]:
    """The span's links: (trace id, span id) -> the link's attributes."""
    return {
        (link.context.trace_id, link.context.span_id): dict(link.attributes) for link in span.links
    }


def context_of(trace_id: bytes, span_id: bytes) -> tuple[int, int]:
    return int.from_bytes(trace_id, "big"), int.from_bytes(span_id, "big")


def test_an_outcome_span_links_to_the_model_requests_of_the_predictions_it_joined(agent):
    rng = np.random.default_rng(7)
    ids = ["a", "b", "c", "d", "e"]
    trace_ids = [rng.bytes(16) for _ in range(3)] + [b"", b""]  # d and e: no trace context
    span_ids = [rng.bytes(8) for _ in range(3)] + [b"", b""]
    stub = agent.stub()
    stub.SubmitPredictions(
        pb.PredictionBatch(
            model=MODEL, ids=ids, scores=[0.5] * 5, trace_ids=trace_ids, span_ids=span_ids
        )
    )
    outcomes = pb.OutcomeBatch(model=MODEL, ids=["b", "c", "d", "nobody"], actual_values=[1] * 4)
    assert stub.SubmitOutcomes(outcomes).accepted == 4

    (span,) = spans_named(agent, OUTCOME_SPAN)
    # b and c joined and have trace context; d joined without any; "nobody" did not join.
    assert linked(span) == {
        context_of(trace_ids[1], span_ids[1]): {"ml.link": "prediction", "ml.prediction.id": "b"},
        context_of(trace_ids[2], span_ids[2]): {"ml.link": "prediction", "ml.prediction.id": "c"},
    }
    assert span.context.trace_id not in {t for t, _ in linked(span)}, "links, not a parent"


def test_predictions_without_trace_ids_give_their_outcomes_no_links(agent):
    stub = agent.stub()
    stub.SubmitPredictions(pb.PredictionBatch(model=MODEL, ids=["n1", "n2"], scores=[0.1, 0.9]))
    zero = pb.PredictionBatch(
        model=MODEL,
        ids=["z1", "z2"],
        scores=[0.1, 0.9],
        trace_ids=[bytes(16)] * 2,  # all-zero ids mean "none"
        span_ids=[bytes(8)] * 2,
    )
    stub.SubmitPredictions(zero)
    stub.SubmitOutcomes(
        pb.OutcomeBatch(model=MODEL, ids=["n1", "n2", "z1", "z2"], actual_values=[1] * 4)
    )

    (outcome_span,) = spans_named(agent, OUTCOME_SPAN)
    assert outcome_span.attributes["mlsidecar.batch.rows"] == 4
    assert list(outcome_span.links) == []
    assert [list(s.links) for s in submit_spans(agent)] == [[], []]


def test_an_outcome_span_links_to_at_most_8_predictions(agent):
    rows = Rows(40, seed=3)
    stub = agent.stub()
    stub.SubmitPredictions(rows.batch())
    stub.SubmitOutcomes(pb.OutcomeBatch(model=MODEL, ids=rows.ids, actual_values=rows.scores))

    (span,) = spans_named(agent, OUTCOME_SPAN)
    recorded = {
        context_of(t, s): i for i, t, s in zip(rows.ids, rows.trace_ids, rows.span_ids, strict=True)
    }
    links = linked(span)
    assert len(links) == MAX_SPAN_LINKS == 8
    for context, attributes in links.items():
        assert attributes["ml.prediction.id"] == recorded[context]


def test_an_outcome_held_for_its_late_prediction_is_linked_from_a_join_span(agent):
    stub = agent.stub()
    stub.SubmitOutcomes(pb.OutcomeBatch(model=MODEL, ids=["late"], actual_values=[1.0]))
    (outcome_span,) = spans_named(agent, OUTCOME_SPAN)
    assert list(outcome_span.links) == []  # held as an orphan: nothing joined yet

    trace_id, span_id = bytes(range(1, 17)), bytes(range(1, 9))
    stub.SubmitPredictions(
        pb.PredictionBatch(
            model=MODEL,
            model_version=VERSION,
            ids=["late", "other"],
            scores=[0.8, 0.2],
            trace_ids=[trace_id, b""],
            span_ids=[span_id, b""],
        )
    )
    (submit,) = submit_spans(agent)
    (join,) = spans_named(agent, "mlsidecar.join outcomes")
    assert join.kind == SpanKind.INTERNAL
    assert join.parent is not None and join.parent.span_id == submit.context.span_id
    assert join.attributes["ml.model.name"] == MODEL
    assert join.attributes["ml.model.version"] == VERSION
    assert join.attributes["mlsidecar.join.rows"] == 1
    assert linked(join) == {
        context_of(trace_id, span_id): {"ml.link": "prediction", "ml.prediction.id": "late"}
    }
    # Without late outcomes there is no join span.
    stub.SubmitPredictions(pb.PredictionBatch(model=MODEL, ids=["p9"], scores=[0.3]))
    assert len(spans_named(agent, "mlsidecar.join outcomes")) == 1


def test_http_ingest_span_is_internal_under_the_http_server_span(agent):
    body = {"model": MODEL, "ids": ["h1"], "scores": [0.4]}
    assert httpx.post(agent.api_url + "/v1/predictions", json=body).status_code == 200

    # The HTTP server span ends after the response has gone out: wait for it.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(
        s.kind == SpanKind.SERVER for s in agent.spans.get_finished_spans()
    ):
        time.sleep(0.01)
    spans = agent.spans.get_finished_spans()
    (ingest,) = [s for s in spans if s.name == "mlsidecar.ingest predictions"]
    assert ingest.kind == SpanKind.INTERNAL
    assert "rpc.system" not in ingest.attributes
    assert ingest.attributes["mlsidecar.ingest.path"] == "/v1/predictions"
    (server,) = [s for s in spans if s.kind == SpanKind.SERVER]
    assert ingest.parent is not None and ingest.parent.span_id == server.context.span_id


def test_rejected_batch_span_has_error_status_and_counts_as_rejected(agent):
    stub = agent.stub()
    with pytest.raises(grpc.RpcError) as raised:
        stub.SubmitPredictions(pb.PredictionBatch(model=MODEL, ids=["a", "a"]))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    (span,) = submit_spans(agent)
    assert not span.status.is_ok
    assert span.attributes["error.type"] == "duplicate_id"
    metrics = by_name(agent.metric_reader)
    rejected = only_point(metrics["mlsidecar.ingest.batches"], **{"mlsidecar.result": "rejected"})
    assert rejected.value == 1
    assert rejected.attributes["error.type"] == "duplicate_id"
    assert "ml.predictions" not in metrics  # nothing was counted


# -- self-metrics ----------------------------------------------------------------------------


def test_self_metrics_count_batches_rows_and_time_per_batch(agent):
    stub = agent.stub()
    for seed in range(3):
        stub.SubmitPredictions(Rows(40, seed=seed).batch())
    stub.SubmitOutcomes(pb.OutcomeBatch(model=MODEL, ids=["x", "y"], actual_values=[1.0, 0.0]))

    metrics = by_name(agent.metric_reader)
    batches = metrics["mlsidecar.ingest.batches"]
    assert batches.unit == "{batch}"
    accepted = {"mlsidecar.result": "accepted"}
    assert only_point(batches, **{"rpc.method": "SubmitPredictions"}, **accepted).value == 3
    assert only_point(batches, **{"rpc.method": "SubmitOutcomes"}, **accepted).value == 1
    rows = metrics["mlsidecar.ingest.rows"]
    assert only_point(rows, **{"mlsidecar.kind": "prediction"}).value == 120
    assert only_point(rows, **{"mlsidecar.kind": "outcome"}).value == 2
    duration = metrics["mlsidecar.ingest.duration"]
    assert duration.unit == "s"
    point = only_point(duration, **{"rpc.method": "SubmitPredictions"})
    assert point.count == 3  # one observation per batch, not per row
    assert 0 < point.sum < 30
    # Outcomes without a version count with the latest one: no phantom "" version.
    assert only_point(metrics["mlsidecar.models"]).value == 1


def test_duplicate_batch_is_acknowledged_but_not_counted_twice(agent):
    stub = agent.stub()
    batch = Rows(25).batch(batch_id="b-1")
    assert stub.SubmitPredictions(batch).accepted == 25
    again = stub.SubmitPredictions(batch)
    assert (again.accepted, again.duplicate) == (25, True)

    metrics = by_name(agent.metric_reader)
    assert only_point(metrics["ml.predictions"]).value == 25
    assert only_point(metrics["mlsidecar.ingest.rows"]).value == 25
    result = {"rpc.method": "SubmitPredictions", "mlsidecar.result": "duplicate"}
    assert only_point(metrics["mlsidecar.ingest.batches"], **result).value == 1


# -- resource --------------------------------------------------------------------------------


def build_telemetry(**settings: Any) -> Telemetry:
    engine = Engine(lambda _: ModelConfig(), max_models=10, clock=time.time_ns)
    return Telemetry(TelemetrySettings(otlp=False, **settings), engine, clock=time.time_ns)


def test_resource_service_name_comes_from_settings(start_agent):
    harness = start_agent(
        telemetry={"service_name": "fraud-scorer", "resource_attributes": {"team": "risk"}}
    )
    harness.stub().SubmitPredictions(Rows(5).batch())

    data = harness.metric_reader.get_metrics_data()
    resources = [rm.resource.attributes for rm in data.resource_metrics]
    assert resources and all(r["service.name"] == "fraud-scorer" for r in resources)
    assert all(r["team"] == "risk" for r in resources)
    (span,) = submit_spans(harness)
    assert span.resource.attributes["service.name"] == "fraud-scorer"


def test_otel_service_name_and_resource_attributes_env_win_over_settings(monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "team=env-team,deployment.environment=prod")
    telemetry = build_telemetry(service_name="from-yaml", resource_attributes={"team": "yaml-team"})
    try:
        attributes = telemetry.resource.attributes
        assert attributes["service.name"] == "from-env"
        assert attributes["team"] == "env-team"
        assert attributes["deployment.environment"] == "prod"
    finally:
        telemetry.shutdown()


def test_service_name_in_otel_resource_attributes_wins_over_settings(monkeypatch):
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=attr-name")
    telemetry = build_telemetry(service_name="from-yaml")
    try:
        assert telemetry.resource.attributes["service.name"] == "attr-name"
    finally:
        telemetry.shutdown()


def test_otel_service_name_env_applies_to_an_agents_exported_metrics(monkeypatch, start_agent):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    harness = start_agent(telemetry={"service_name": "from-yaml"})
    harness.stub().SubmitPredictions(Rows(5).batch())

    data = harness.metric_reader.get_metrics_data()
    assert {rm.resource.attributes["service.name"] for rm in data.resource_metrics} == {"from-env"}


# -- logs ------------------------------------------------------------------------------------


@pytest.fixture
def json_log() -> Any:
    """A logger writing through JsonFormatter into a buffer; returns (logger, lines())."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.telemetry.json")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False

    def lines() -> list[dict[str, Any]]:
        text = stream.getvalue()
        assert text.endswith("\n")
        return [json.loads(line) for line in text.splitlines()]

    yield logger, lines
    logger.removeHandler(handler)
    logger.propagate = True


def test_json_logs_are_one_object_per_line_with_trace_ids_inside_a_span(json_log):
    logger, lines = json_log
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        logger.info(
            "inside\nwith a newline", extra={"model": "fraud", "rows": 3, "path": Path("/x")}
        )
    logger.warning("outside")

    inside, outside = lines()
    context = span.get_span_context()
    assert inside["message"] == "inside\nwith a newline"
    assert inside["level"] == "INFO"
    assert inside["logger"] == "tests.telemetry.json"
    assert inside["trace_id"] == format(context.trace_id, "032x")
    assert inside["span_id"] == format(context.span_id, "016x")
    assert (inside["model"], inside["rows"], inside["path"]) == ("fraud", 3, "/x")
    assert inside["time"].endswith("Z")
    assert "trace_id" not in outside and "span_id" not in outside
    assert outside["level"] == "WARNING"


def test_json_log_exception_stays_on_one_line(json_log):
    logger, lines = json_log
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")

    (entry,) = lines()
    assert entry["message"] == "failed"
    assert "ValueError: boom" in entry["exception"]


def test_configure_logging_picks_json_for_non_terminals_and_text_for_terminals():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    root = logging.getLogger()
    level = root.level
    try:
        pipe = configure_logging(LoggingSettings(format="auto"), io.StringIO())
        assert isinstance(pipe.formatter, JsonFormatter)
        terminal = configure_logging(LoggingSettings(format="auto", level="DEBUG"), Terminal())
        assert isinstance(terminal.formatter, TextFormatter)
        assert pipe not in root.handlers, "a second call replaces the first handler"
        assert root.level == logging.DEBUG
        forced = configure_logging(LoggingSettings(format="json"), Terminal())
        assert isinstance(forced.formatter, JsonFormatter)
    finally:
        for handler in list(root.handlers):
            if handler.get_name() == "mlsidecar":
                root.removeHandler(handler)
        root.setLevel(level)


SECRETS = {
    "ingest_token": "ingest-secret-7f3a9c",
    "api_token": "api-secret-41d2e8",
    "admin_token": "admin-secret-9b7c11",
    "header": "otlp-header-secret-5e6f",
}


def test_secrets_never_appear_in_logs(caplog):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    caplog.set_level(logging.DEBUG)
    settings = agent_settings(
        ingest={"token": SECRETS["ingest_token"]},
        api={"token": SECRETS["api_token"], "admin_token": SECRETS["admin_token"]},
        telemetry={"headers": {"x-api-key": SECRETS["header"]}},
    )
    harness = AgentHarness(settings).start()
    try:
        stub = harness.stub()
        good = (("authorization", f"Bearer {SECRETS['ingest_token']}"),)
        assert stub.SubmitPredictions(Rows(5).batch(), metadata=good).accepted == 5
        with pytest.raises(grpc.RpcError) as raised:
            stub.SubmitPredictions(Rows(5).batch(), metadata=(("authorization", "Bearer wrong"),))
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        api = {"authorization": f"Bearer {SECRETS['api_token']}"}
        assert httpx.get(f"{harness.api_url}/v1/models", headers=api).status_code == 200
        assert httpx.delete(f"{harness.api_url}/v1/models/{MODEL}", headers=api).status_code == 401
        logging.getLogger("agent").info("settings in use", extra={"settings": harness.settings})
    finally:
        harness.stop()
        root.removeHandler(handler)

    output = stream.getvalue() + caplog.text + repr([r.__dict__ for r in caplog.records])
    assert "mlsidecar started" in output  # the capture did see the agent's logs
    for name, secret in SECRETS.items():
        assert secret not in output, f"{name} leaked into the logs"


def test_exporter_warnings_are_not_exported_through_the_otlp_log_pipeline():
    """The Collector being down makes the exporters warn; exporting those warnings would feed itself."""
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter

    exported = InMemoryLogRecordExporter()
    engine = Engine(lambda _: ModelConfig(), max_models=1, clock=time.time_ns)
    telemetry = Telemetry(
        TelemetrySettings(otlp=False), engine, clock=time.time_ns, log_exporter=exported
    )
    assert telemetry.log_handler is not None
    root = logging.getLogger()
    root.addHandler(telemetry.log_handler)
    try:
        logging.getLogger("opentelemetry.exporter.otlp").warning("Transient error, retrying")
        logging.getLogger("agent.ingest").warning("a record worth exporting")
        telemetry.logger_provider.force_flush()
    finally:
        root.removeHandler(telemetry.log_handler)
        telemetry.shutdown()
    bodies = [entry.log_record.body for entry in exported.get_finished_logs()]
    assert bodies == ["a record worth exporting"]
