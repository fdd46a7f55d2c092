"""Health events: one OTel log record per change of a model's health, never one per evaluation.

The tracker is fed model health reports (synthetic ones here, shaped as
docs/health-report.md documents them); the event log writes to a LoggerProvider and to
the JSON log; the agent runs both periodically and exports to a real OTLP receiver.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from conftest import AgentHarness, agent_settings
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from otlp_receiver import OtlpGrpcReceiver, attributes

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb
from agent.config import TelemetrySettings
from agent.engine import Engine, ModelConfig, PredictionColumns
from agent.telemetry.events import (
    EVENTS_LOGGER,
    HealthEvent,
    HealthEventLog,
    HealthEvents,
    poll_health_events,
)
from agent.telemetry.logs import JsonFormatter
from agent.telemetry.providers import Telemetry

S = 10**9
WINDOW = 300 * S
W0 = 1_800_000_000 * S - (1_800_000_000 * S) % WINDOW  # a window boundary (2027-01-15 08:00 UTC)
W1, W2 = W0 + WINDOW, W0 + 2 * WINDOW


def drift(drifted: bool, *, method: str = "psi", **fields: Any) -> dict[str, Any]:
    """A feature's drift result as the report has it; a PSI of 0.31 or 0.02 by default."""
    result = {
        "method": method,
        "score": 0.31 if drifted else 0.02,
        "p_value": None,
        "threshold": 0.2,
        "drifted": drifted,
        "psi": 0.31 if drifted else 0.02,
        "psi_p_value": None,
    }
    result.update(fields)
    return result


def report(
    *,
    start: int = W0,
    features: dict[str, bool | dict[str, Any] | None] | None = None,
    evaluated: str | None = "current",
    reference: str | None = "ref1",
    status: str = "healthy",
    score: int | None = 100,
    reasons: list[str] | None = None,
    penalties: dict[str, float] | None = None,
    dataset: tuple[float, bool] | None = None,
    prediction: dict[str, Any] | None = None,
    class_drift: dict[str, Any] | None = None,
    performance: dict[str, Any] | None = None,
    model: str = "credit",
    version: str = "v1",
    first_seen: str = "2027-01-15T07:00:00Z",
) -> dict[str, Any]:
    """A model health report with only what the tracker reads; ``start`` is the live window."""
    entries: dict[str, Any] = {}
    for name, value in (features or {}).items():
        if value is None:
            entries[name] = {"type": "numeric"}
        elif isinstance(value, bool):
            entries[name] = {"type": "numeric", "drift": drift(value)}
        else:
            entries[name] = {"type": "numeric", "drift": value}
    share, drifted = dataset if dataset is not None else (None, False)
    return {
        "model": model,
        "version": version,
        "first_seen": first_seen,
        "window": {"start_unix_nano": start, "end_unix_nano": start + WINDOW},
        "previous": {"start_unix_nano": start - WINDOW, "end_unix_nano": start},
        "reference": None if reference is None else {"id": reference, "source": "upload"},
        "evaluated_window": evaluated,
        "features": entries,
        "prediction": {"labels": {}, "drift": prediction, "class_drift": class_drift},
        "dataset_drift": {"share": share, "threshold": 0.5, "drifted": drifted, "features": 4},
        "performance": performance or {"kind": None, "count": 0},
        "health": {
            "score": score,
            "status": status,
            "reasons": reasons or [],
            "penalties": penalties if penalties is not None else {"drift": 0.0},
        },
    }


def names(events: list[HealthEvent]) -> list[str]:
    return [event.name for event in events]


# -- drift per feature -----------------------------------------------------------------------


def test_a_model_already_drifted_at_its_first_evaluation_is_reported_once():
    tracker = HealthEvents()

    (event,) = tracker.observe(report(features={"age": True, "income": False}))

    assert event.name == "drift.detected"
    assert event.severity == "WARN"
    assert event.body == (
        "credit v1: feature 'age' drifted: psi 0.31 ≥ 0.2 (window 08:00-08:05 UTC)"
    )
    assert event.attributes == {
        "ml.model.name": "credit",
        "ml.model.version": "v1",
        "ml.reference.id": "ref1",
        "ml.drift.subject": "feature",
        "ml.feature.name": "age",
        "ml.drift.method": "psi",
        "ml.drift.score": 0.31,
        "ml.drift.threshold": 0.2,
        "ml.drift.psi": 0.31,
        "ml.window.start_unix_nano": W0,
        "ml.window.end_unix_nano": W0 + WINDOW,
        "ml.window.evaluated": "current",
    }
    # The same window read again, and later windows still drifted: nothing new.
    assert tracker.observe(report(features={"age": True, "income": False})) == []
    assert tracker.observe(report(start=W1, features={"age": True, "income": False})) == []


def test_a_feature_that_starts_drifting_is_detected_then_resolved_when_it_stops():
    tracker = HealthEvents()
    assert tracker.observe(report(features={"age": False})) == []

    assert names(tracker.observe(report(start=W1, features={"age": True}))) == ["drift.detected"]
    (resolved,) = tracker.observe(report(start=W2, features={"age": False}))

    assert resolved.name == "drift.resolved"
    assert resolved.severity == "INFO"
    assert resolved.body == (
        "credit v1: feature 'age' no longer drifts: psi 0.02 < 0.2 (window 08:10-08:15 UTC)"
    )
    assert resolved.attributes["ml.feature.name"] == "age"
    assert resolved.attributes["ml.window.start_unix_nano"] == W2


def test_a_verdict_that_flips_back_within_the_live_window_waits_for_the_next_window():
    tracker = HealthEvents()
    assert names(tracker.observe(report(features={"age": True}))) == ["drift.detected"]

    # More rows arrive in the same live window: the verdict wobbles around the threshold.
    assert tracker.observe(report(features={"age": False})) == []
    assert tracker.observe(report(features={"age": True})) == []
    assert tracker.observe(report(features={"age": False})) == []

    assert names(tracker.observe(report(start=W1, features={"age": False}))) == ["drift.resolved"]


def test_a_closed_window_evaluated_after_the_live_one_is_the_same_window():
    tracker = HealthEvents()
    assert names(tracker.observe(report(features={"age": True}))) == ["drift.detected"]

    # W0 closed; W1 has too few rows, so W0 is judged again as "previous", with all its rows.
    assert tracker.observe(report(start=W1, evaluated="previous", features={"age": False})) == []

    (resolved,) = tracker.observe(report(start=W1, features={"age": False}))
    assert resolved.attributes["ml.window.start_unix_nano"] == W1


def test_not_evaluated_is_not_resolved():
    tracker = HealthEvents()
    tracker.observe(report(features={"age": True}))

    no_values = drift(False, score=None, psi=None)
    assert tracker.observe(report(start=W1, features={"age": no_values})) == []
    assert tracker.observe(report(start=W1, evaluated=None, features={"age": None})) == []
    assert tracker.observe(report(start=W1, reference=None, features={"age": None})) == []

    assert names(tracker.observe(report(start=W2, features={"age": False}))) == ["drift.resolved"]


def test_a_p_value_method_says_which_p_value_decided():
    tracker = HealthEvents()
    income = drift(True, method="ks", score=0.1625, p_value=8.234e-15, threshold=0.05, psi=0.17)

    (event,) = tracker.observe(report(features={"income": income}))

    assert "feature 'income' drifted: ks 0.163, p-value 8.23e-15 < 0.05" in event.body
    assert event.attributes["ml.drift.p_value"] == pytest.approx(8.234e-15)
    assert event.attributes["ml.drift.method"] == "ks"


def test_a_new_reference_judges_the_window_afresh():
    tracker = HealthEvents()
    assert names(tracker.observe(report(features={"age": True}))) == ["drift.detected"]

    (event,) = tracker.observe(report(reference="ref2", features={"age": False}))

    assert event.name == "drift.resolved"
    assert event.attributes["ml.reference.id"] == "ref2"


def test_score_and_class_drift_are_drift_events_without_a_feature_name():
    tracker = HealthEvents()
    scores = drift(True, method="ks", p_value=0.001, threshold=0.05)
    classes = drift(True, method="chisquare", score=12.5, p_value=0.002, threshold=0.05)

    events = tracker.observe(report(prediction=scores, class_drift=classes))

    assert [(e.name, e.attributes["ml.drift.subject"]) for e in events] == [
        ("drift.detected", "prediction"),
        ("drift.detected", "class"),
    ]
    assert all("ml.feature.name" not in e.attributes for e in events)
    assert "credit v1: scores drifted: ks" in events[0].body
    assert "credit v1: predicted classes drifted: chisquare 12.5" in events[1].body


# -- dataset drift, health, performance ------------------------------------------------------


def test_dataset_drift_is_detected_and_resolved_with_the_drifted_features():
    tracker = HealthEvents()
    features = {"age": True, "income": True, "region": True, "zip": False}

    events = tracker.observe(report(features=features, dataset=(0.75, True)))
    (dataset,) = [e for e in events if e.name.startswith("dataset_drift")]

    assert dataset.name == "dataset_drift.detected"
    assert dataset.severity == "WARN"
    assert "dataset drift: 3/4 features drifted, share 0.75 ≥ 0.5" in dataset.body
    assert dataset.attributes["ml.dataset.drift.share"] == 0.75
    assert dataset.attributes["ml.dataset.drift.threshold"] == 0.5
    assert dataset.attributes["ml.dataset.drift.drifted_features"] == ["age", "income", "region"]

    calm = {"age": False, "income": False, "region": False, "zip": False}
    events = tracker.observe(report(start=W1, features=calm, dataset=(0.0, False)))
    assert names(events).count("dataset_drift.resolved") == 1
    assert names(events).count("drift.resolved") == 3


def test_health_events_follow_the_status_not_each_score():
    tracker = HealthEvents()
    assert tracker.observe(report(status="healthy", score=96)) == []
    assert tracker.observe(report(status="unknown", score=None)) == []  # nothing judged

    (degraded,) = tracker.observe(
        report(status="degraded", score=63, reasons=["dataset drift: 2/3 features (PSI age=0.31)"])
    )
    assert degraded.name == "health.degraded"
    assert degraded.severity == "WARN"
    assert degraded.body.startswith(
        "credit v1: health degraded from healthy to degraded, score 63: dataset drift: 2/3"
    )
    assert degraded.attributes["ml.health.status"] == "degraded"
    assert degraded.attributes["ml.health.previous_status"] == "healthy"
    assert degraded.attributes["ml.health.score"] == 63
    assert tracker.observe(report(status="degraded", score=58)) == []  # same window, same status

    (critical,) = tracker.observe(report(start=W1, status="critical", score=20))
    assert (critical.name, critical.attributes["ml.health.previous_status"]) == (
        "health.degraded",
        "degraded",
    )
    (recovered,) = tracker.observe(report(start=W2, status="healthy", score=100))
    assert recovered.name == "health.recovered"
    assert recovered.severity == "INFO"
    assert recovered.attributes["ml.health.previous_status"] == "critical"


def test_performance_degraded_names_the_metric_past_its_limit():
    tracker = HealthEvents()
    assert tracker.observe(report(penalties={"drift": 0.0})) == []  # not evaluated: no outcomes

    (event,) = tracker.observe(
        report(
            penalties={"performance": 30.0},
            reasons=["accuracy 0.55 < 0.60", "ROC AUC 0.70 < 0.75", "drift not evaluated"],
            performance={"kind": "classification", "count": 400, "accuracy": 0.55},
        )
    )
    assert event.name == "performance.degraded"
    assert event.severity == "WARN"
    assert "performance degraded: accuracy 0.55 < 0.60; ROC AUC 0.70 < 0.75" in event.body
    assert event.attributes["ml.performance.accuracy"] == 0.55
    assert event.attributes["ml.health.reasons"] == ["accuracy 0.55 < 0.60", "ROC AUC 0.70 < 0.75"]

    (event,) = tracker.observe(
        report(start=W1, penalties={"performance": 0.0}, performance={"accuracy": 0.9})
    )
    assert (event.name, event.severity) == ("performance.recovered", "INFO")


# -- state: forgetting and bounds ------------------------------------------------------------


def test_forgetting_a_model_clears_its_state():
    tracker = HealthEvents()
    drifted = report(features={"age": True})
    assert names(tracker.observe(drifted)) == ["drift.detected"]

    tracker.forget("credit")

    assert len(tracker) == 0
    assert names(tracker.observe(drifted)) == ["drift.detected"]


def test_versions_the_engine_no_longer_tracks_are_dropped():
    tracker = HealthEvents()
    tracker.observe(report(version="v1", features={"age": True}))
    tracker.observe(report(version="v2", features={"age": True}))

    tracker.retain([("credit", "v2")])

    assert len(tracker) == 1
    assert tracker.held_signals("credit", "v1") == 0
    assert tracker.observe(report(version="v2", features={"age": True})) == []


def test_a_model_tracked_again_after_delete_starts_from_a_clean_slate():
    # DELETE then new traffic between two evaluations: only first_seen tells them apart.
    tracker = HealthEvents()
    assert names(tracker.observe(report(features={"age": True}))) == ["drift.detected"]

    again = report(features={"age": True}, first_seen="2027-01-15T08:01:00Z")

    assert names(tracker.observe(again)) == ["drift.detected"]


def test_memory_is_bounded_by_versions_and_features():
    tracker = HealthEvents(max_versions=3, max_features=2)
    for version in ("v1", "v2", "v3", "v4", "v5"):
        tracker.observe(report(version=version))
    assert len(tracker) == 3
    assert tracker.held_signals("credit", "v1") == 0  # the least recently observed went first

    five = {f"f{i}": True for i in range(5)}
    events = tracker.observe(report(version="v5", features=five))
    assert [e.attributes["ml.feature.name"] for e in events] == ["f0", "f1"]
    assert tracker.held_signals("credit", "v5") == 2

    # Back to normal and the window passed: nothing is held for the features any more.
    tracker.observe(report(start=W1, version="v5", features=dict.fromkeys(five, False)))
    tracker.observe(report(start=W2, version="v5", features=dict.fromkeys(five, False)))
    assert tracker.held_signals("credit", "v5") == 0


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError, match="max_versions=0"):
        HealthEvents(max_versions=0)


# -- the event log: OTel record + JSON line ----------------------------------------------------


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """The agent's JSON log format on a buffer, for the events logger at INFO."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(EVENTS_LOGGER)
    level = logger.level
    logger.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield buffer
    finally:
        root.removeHandler(handler)
        logger.setLevel(level)


def test_an_event_is_one_otel_record_with_its_event_name_and_one_json_line(json_lines):
    exported = InMemoryLogRecordExporter()
    engine = Engine(lambda _: ModelConfig(), max_models=1, clock=time.time_ns)
    telemetry = Telemetry(
        TelemetrySettings(otlp=False), engine, clock=time.time_ns, log_exporter=exported
    )
    # The Python-logging bridge is attached, as in a running agent: it must not copy the event.
    assert telemetry.log_handler is not None
    root = logging.getLogger()
    root.addHandler(telemetry.log_handler)
    try:
        log = HealthEventLog(telemetry.logger_provider, clock=lambda: W0 + 7 * S)
        tracker = HealthEvents()
        for event in tracker.observe(report(features={"age": True})):
            log.emit(event)
        for event in tracker.observe(report(start=W1, features={"age": False})):
            log.emit(event)
        telemetry.logger_provider.force_flush()
    finally:
        root.removeHandler(telemetry.log_handler)
        telemetry.shutdown()

    records = [entry.log_record for entry in exported.get_finished_logs()]
    assert [r.event_name for r in records] == ["drift.detected", "drift.resolved"]
    detected = records[0]
    assert detected.severity_text == "WARN"
    assert detected.severity_number is not None and detected.severity_number.name == "WARN"
    assert records[1].severity_number is not None and records[1].severity_number.name == "INFO"
    assert detected.timestamp == W0 + 7 * S
    assert str(detected.body).startswith("credit v1: feature 'age' drifted")
    assert detected.attributes is not None
    assert detected.attributes["event.name"] == "drift.detected"
    assert detected.attributes["ml.feature.name"] == "age"
    assert {e.instrumentation_scope.name for e in exported.get_finished_logs()} == {EVENTS_LOGGER}

    lines = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    assert [(line["level"], line["event.name"]) for line in lines] == [
        ("WARNING", "drift.detected"),
        ("INFO", "drift.resolved"),
    ]
    assert lines[0]["logger"] == EVENTS_LOGGER
    assert lines[0]["message"] == str(detected.body)
    assert lines[0]["ml.feature.name"] == "age"
    assert lines[0]["ml.window.start_unix_nano"] == W0


# -- with a real engine ----------------------------------------------------------------------


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def columns(n: int, at: int, *, shift: float = 0.0, seed: int = 0) -> PredictionColumns:
    rng = np.random.default_rng(seed)
    return PredictionColumns(
        model="m",
        version="v1",
        ids=[f"{at}-{i}" for i in range(n)],
        received_unix_nano=at,
        numbers={"x": rng.normal(10 * shift, 10, n)},
    )


def test_polling_a_real_engine_reports_each_change_once_and_follows_forget():
    clock = Clock(W0)
    engine = Engine(lambda _: ModelConfig(window_ns=WINDOW), max_models=10, clock=clock)
    exported = InMemoryLogRecordExporter()
    provider = LoggerProvider()
    provider.add_log_record_processor(SimpleLogRecordProcessor(exported))
    log = HealthEventLog(provider, clock=clock)
    tracker = HealthEvents()

    def event_names() -> list[str | None]:
        return [e.log_record.event_name for e in exported.get_finished_logs()]

    engine.observe_predictions(columns(1000, W0 + S, seed=1))  # the warm-up reference
    assert poll_health_events(engine, tracker, log) == 0
    engine.observe_predictions(columns(1000, W0 + 2 * S, shift=1.0, seed=2))
    clock.now = W0 + 3 * S
    assert poll_health_events(engine, tracker, log) >= 1
    assert poll_health_events(engine, tracker, log) == 0  # the same window, re-read
    assert event_names().count("drift.detected") == 1
    (detected,) = [
        e.log_record
        for e in exported.get_finished_logs()
        if e.log_record.event_name == "drift.detected"
    ]
    assert detected.attributes is not None
    assert detected.attributes["ml.feature.name"] == "x"
    assert detected.attributes["ml.window.start_unix_nano"] == W0
    assert detected.attributes["ml.window.end_unix_nano"] == W1
    reference = engine.reference("m")
    assert reference is not None
    assert detected.attributes["ml.reference.id"] == reference.id

    clock.now = W1 + S
    engine.observe_predictions(columns(1000, W1 + S, seed=3))
    poll_health_events(engine, tracker, log)
    assert event_names().count("drift.resolved") == 1

    engine.forget("m")
    poll_health_events(engine, tracker, log)
    assert len(tracker) == 0


# -- the agent, exporting to a real OTLP receiver --------------------------------------------


def test_the_agent_evaluates_events_in_its_own_task_unless_the_interval_is_zero(start_agent):
    assert start_agent().agent._events is not None
    assert start_agent(telemetry={"events_interval_s": 0}).agent._events is None


MODEL = "credit"


@pytest.fixture
def _otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OTEL_*/MLSIDECAR_* from the shell; log records leave their batches quickly."""
    for name in list(os.environ):
        if name.startswith(("OTEL_", "MLSIDECAR_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_BLRP_SCHEDULE_DELAY", "100")


def batch(rng: np.random.Generator, start_id: int, rows: int, shift: float) -> pb.PredictionBatch:
    """A credit model's batch; ``shift`` moves income by that many standard deviations."""
    return pb.PredictionBatch(
        model=MODEL,
        model_version="v1",
        ids=[f"p{start_id + i}" for i in range(rows)],
        features=[
            pb.Column(
                name="income",
                numbers=pb.NumberValues(values=rng.normal(50 + 10 * shift, 10, rows)),
            ),
            pb.Column(
                name="region",
                categories=pb.CategoryValues(values=rng.choice(["n", "s", "e"], rows).tolist()),
            ),
        ],
        scores=rng.beta(2, 5, rows),
    )


@pytest.mark.usefixtures("_otel_environment")
def test_the_agent_exports_one_detected_and_one_resolved_record_for_a_drifted_feature():
    window_s = 2.0
    with OtlpGrpcReceiver() as collector:
        settings = agent_settings(
            engine={"window_s": window_s, "min_window_rows": 200, "warmup_rows": 1000},
            telemetry={
                "otlp": True,
                "endpoint": collector.endpoint,
                "protocol": "grpc",
                "events_interval_s": 0.1,
            },
        )
        harness = AgentHarness(settings).start()

        def income_events(name: str) -> list[Any]:
            return [
                record
                for record in collector.log_records()
                if record.event_name == name
                and attributes(record.attributes).get("ml.feature.name") == "income"
            ]

        try:
            stub = harness.stub()
            rng = np.random.default_rng(7)
            assert stub.SubmitPredictions(batch(rng, 0, 1000, 0.0)).accepted == 1000  # warm-up
            assert stub.SubmitPredictions(batch(rng, 1000, 1000, 1.0)).accepted == 1000
            drifted_at = time.time()

            (detected,) = collector.wait_for(lambda: income_events("drift.detected"))
            time.sleep(0.5)  # five more evaluations of the same window
            assert len(income_events("drift.detected")) == 1

            # Undrifted traffic in a later window (a new one each try, for a chance failure).
            next_window = (drifted_at // window_s + 1) * window_s
            next_id = 2000
            while not income_events("drift.resolved"):
                time.sleep(max(next_window - time.time(), 0) + 0.05)
                stub.SubmitPredictions(batch(rng, next_id, 1000, 0.0))
                next_id += 1000
                next_window = (time.time() // window_s + 1) * window_s
                deadline = time.monotonic() + 3.0
                while not income_events("drift.resolved") and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert next_id <= 7000, "no drift.resolved after five undrifted windows"
        finally:
            harness.stop()  # flushes the logs still batched

        assert len(income_events("drift.detected")) == 1
        (resolved,) = income_events("drift.resolved")

    assert resolved.severity_text == "INFO"
    assert (
        attributes(resolved.attributes)["ml.window.start_unix_nano"]
        >= attributes(detected.attributes)["ml.window.end_unix_nano"]
    ), "resolved by a later window"
    assert detected.severity_text == "WARN"
    assert detected.body.string_value.startswith("credit v1: feature 'income' drifted: ")
    fields = attributes(detected.attributes)
    assert fields["event.name"] == "drift.detected"
    assert fields["ml.model.name"] == MODEL
    assert fields["ml.model.version"] == "v1"
    assert fields["ml.drift.subject"] == "feature"
    assert fields["ml.drift.method"] in {"ks", "psi", "wasserstein", "jensenshannon"}
    assert fields["ml.drift.score"] > 0
    assert "ml.drift.threshold" in fields
    assert len(fields["ml.reference.id"]) == 16
    end = fields["ml.window.end_unix_nano"]
    assert end - fields["ml.window.start_unix_nano"] == int(window_s * S)
