"""Engine state exported as pre-aggregated OpenTelemetry metric points.

The Python SDK has no bulk ``record`` and no MetricProducer hook, and one
``Histogram.record`` costs about 4 µs: calling instruments per event would cost
more than the rest of ingest. Instead the engine aggregates each batch with
numpy, and at collection time this module turns the engine's cumulative state
into ``Metric`` points that are appended to whatever a reader collected from
the SDK's own instruments. Every reader (periodic OTLP, Prometheus pull,
in-memory in tests) gets the same points, so names and values agree.

    producer = EngineMetricsProducer(engine, resource)
    inject_engine_metrics(reader, producer)   # before the reader serves or exports
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from opentelemetry.sdk.metrics import Exemplar as OtelExemplar
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from agent import __version__
from agent.engine import Engine, FixedHistogram, ModelSnapshot
from agent.engine.performance import HEADLINE_METRICS

log = logging.getLogger(__name__)
SCOPE = InstrumentationScope("mlsidecar.engine", __version__)
CUMULATIVE = AggregationTemporality.CUMULATIVE

# name, unit, description: the one list of engine metrics (docs/metrics.md mirrors it).
PREDICTIONS = (
    "ml.predictions",
    "{prediction}",
    "Predictions made by the model service, estimated from received rows scaled by 1/sample_rate.",
)
OUTCOMES = ("ml.outcomes", "{outcome}", "Outcomes (ground truth) received.")
CLASSES = ("ml.prediction.classes", "{prediction}", "Predictions per predicted class.")
DURATION = ("ml.prediction.duration", "s", "Model prediction latency reported by the service.")
SCORE = ("ml.prediction.score", "{score}", "Distribution of prediction scores / regression values.")
# Gauges of the latest evaluation (the live window once complete, else the last closed one).
# Dimensionless gauges carry no unit (not "1"): a Collector's Prometheus translation adds
# `_ratio` to unit-"1" gauges and the agent's /metrics does not, and the names must match
# (docs/metrics.md#names-end-to-end, tests/test_metric_name_parity.py).
FEATURE_PSI = (
    "ml.feature.drift.psi",
    "",
    "Population stability index of a feature against the reference.",
)
FEATURE_DRIFT = (
    "ml.feature.drift.score",
    "",
    "Drift score of a feature by its decision method (ml.drift.method).",
)
FEATURE_DRIFTED = (
    "ml.feature.drifted",
    "",
    "1 when the feature's drift method says it drifted, else 0.",
)
FEATURE_MISSING = (
    "ml.feature.missing.ratio",
    "",
    "Share of a feature's values missing in the evaluated window.",
)
# The other quality ratios of the evaluated window, as ``ml.feature.missing.ratio``.
QUALITY_RATIOS = {
    check: (f"ml.feature.{check}.ratio", "", f"Share of a feature's values {meaning}.")
    for check, meaning in (
        ("nonfinite", "that are ±inf in the evaluated window"),
        ("out_of_range", "outside the reference's [min, max] in the evaluated window"),
        ("unseen", "that are categories the reference never saw, in the evaluated window"),
        ("type_mismatch", "sent as the other type than the reference's, in the evaluated window"),
    )
}
DATASET_DRIFT = (
    "ml.dataset.drift.share",
    "",
    "Share of features that drifted in the evaluated window.",
)
PREDICTION_PSI = (
    "ml.prediction.drift.psi",
    "",
    "Population stability index of the scores against the reference.",
)
PERFORMANCE = (
    "ml.model.performance",
    "",
    "Model performance on joined outcomes, by metric (ml.metric).",
)
SEGMENT_PERFORMANCE = (
    "ml.model.segment.performance",
    "",
    "Model performance on joined outcomes per segment (ml.segment: the prediction batch's "
    "attributes), by metric (ml.metric); the window of ml.model.performance.",
)
LABEL_DELAY = (
    "ml.outcome.label_delay",
    "s",
    "Seconds from a prediction to the outcome joined to it.",
)
HEALTH = ("ml.model.health.score", "", "Model health score, 0-100.")
# Counters of live values per psi bin since the reference was set, and the reference's own
# proportions per bin: fleet-wide PSI in PromQL across replicas sharing a reference id.
JOINED = ("ml.outcomes.joined", "{outcome}", "Outcomes joined to their predictions.")
ORPHANED = (
    "ml.outcomes.orphaned",
    "{outcome}",
    "Outcomes whose prediction was never found (after the grace period).",
)
UNMATCHED = (
    "ml.predictions.unmatched",
    "{prediction}",
    "Predictions dropped from the pending store without an outcome (expired or evicted).",
)
PENDING = (
    "ml.predictions.pending",
    "{prediction}",
    "Predictions kept pending for an outcome now.",
)
ANOMALIES = (
    "ml.anomalies",
    "{window}",
    "Closed windows whose aggregate (ml.anomaly.stream) was flagged as an anomaly.",
)
OVERFLOW = (
    "mlsidecar.engine.overflow",
    "",
    "1 while a bounded attribute set of a model version (mlsidecar.overflow) folds "
    "new keys into 'other'.",
)
PSI_BIN_VALUES = (
    "ml.feature.psi.bin.values",
    "{value}",
    "Live values of a feature counted per psi bin (ml.bin) since the reference was set.",
)
PSI_BIN_REFERENCE = (
    "ml.feature.psi.bin.reference",
    "",
    "Proportion of the reference's values in each psi bin (ml.bin) of a feature.",
)
PERFORMANCE_METRICS = HEADLINE_METRICS


class EngineMetricsProducer:
    """Turns ``Engine.snapshots()`` into OTel ``Metric`` points with cumulative temporality."""

    def __init__(self, engine: Engine, resource: Resource, clock: Callable[[], int]) -> None:
        self._engine = engine
        self._resource = resource
        self._clock = clock
        # (model, version, kind) already logged: one warning per overflow, not per collection.
        self._overflow_logged: set[tuple[str, str, str]] = set()

    def produce(self) -> list[Metric]:
        snapshots = self._engine.snapshots()
        if not snapshots:
            return []
        now = self._clock()
        predictions: list[NumberDataPoint] = []
        outcomes: list[NumberDataPoint] = []
        classes: list[NumberDataPoint] = []
        durations: list[HistogramDataPoint] = []
        scores: list[HistogramDataPoint] = []
        label_delays: list[HistogramDataPoint] = []
        bin_values: list[NumberDataPoint] = []
        bin_reference: list[NumberDataPoint] = []
        overflow: list[NumberDataPoint] = []
        joins: dict[tuple[str, str, str], list[NumberDataPoint]] = {}
        pending: list[NumberDataPoint] = []
        pending_for = self._engine.pending_for
        for snap in snapshots:
            base = _model_attributes(snap)
            start = snap.start_unix_nano
            health = snap.health or {}
            join = health.get("outcomes") or {}
            for spec, key in ((JOINED, "joined"), (ORPHANED, "orphaned"), (UNMATCHED, "unmatched")):
                if key in join:
                    joins.setdefault(spec, []).append(NumberDataPoint(base, start, now, join[key]))
            if pending_for is not None:
                pending.append(NumberDataPoint(base, 0, now, pending_for(snap.model, snap.version)))
            streams = (health.get("anomalies") or {}).get("streams") or {}
            for stream, state in streams.items():
                attributes = {**base, "ml.anomaly.stream": stream}
                joins.setdefault(ANOMALIES, []).append(
                    NumberDataPoint(attributes, start, now, state["anomalies"])
                )
            for kind in snap.overflowed:
                overflow.append(NumberDataPoint({**base, "mlsidecar.overflow": kind}, 0, now, 1))
                self._log_overflow(snap, kind)
            for series in snap.psi_bins:
                feature = {
                    **base,
                    "ml.feature.name": series.feature,
                    "ml.reference.id": series.reference_id,
                }
                for label, count, share in zip(
                    series.labels,
                    series.counts.tolist(),
                    series.reference_proportions.tolist(),
                    strict=True,
                ):
                    attributes = {**feature, "ml.bin": label}
                    bin_values.append(NumberDataPoint(attributes, start, now, count))
                    bin_reference.append(NumberDataPoint(attributes, 0, now, share))
            for segment, count in snap.segments.items():
                predictions.append(
                    NumberDataPoint({**base, "ml.segment": segment}, start, now, count)
                )
            outcomes.append(NumberDataPoint(base, start, now, snap.totals.outcomes))
            for label, count in snap.labels.items():
                classes.append(
                    NumberDataPoint({**base, "ml.prediction.label": label}, start, now, count)
                )
            if snap.totals.latency.count:
                durations.append(_histogram_point(snap.totals.latency, base, start, now, 1e-3))
            if snap.totals.scores.count:
                scores.append(_histogram_point(snap.totals.scores, base, start, now, 1.0))
            if snap.label_delay is not None and snap.label_delay.count:
                label_delays.append(_histogram_point(snap.label_delay, base, start, now, 1.0))
        gauges = self._health_gauges(snapshots, now)
        metrics = [
            *gauges,
            _sum(PREDICTIONS, predictions),
            _sum(OUTCOMES, outcomes),
            _sum(CLASSES, classes),
            _histogram(DURATION, durations),
            _histogram(SCORE, scores),
            _histogram(LABEL_DELAY, label_delays),
            _sum(PSI_BIN_VALUES, bin_values),
            _gauge(PSI_BIN_REFERENCE, bin_reference),
            _gauge(OVERFLOW, overflow),
            _gauge(PENDING, pending),
            *(_sum(spec, points) for spec, points in joins.items()),
        ]
        return [m for m in metrics if _has_points(m)]

    def _log_overflow(self, snap: ModelSnapshot, kind: str) -> None:
        key = (snap.model, snap.version, kind)
        if key in self._overflow_logged:
            return
        self._overflow_logged.add(key)
        log.warning(
            "model %s version %s: more distinct %s than the agent keeps; the rest are "
            "counted as 'other' (limits: docs/metrics.md#cardinality)",
            snap.model,
            snap.version,
            kind.replace("_", " "),
            extra={"ml.model.name": snap.model, "ml.model.version": snap.version},
        )

    def _health_gauges(self, snapshots: Sequence[ModelSnapshot], now: int) -> list[Metric]:
        points: dict[tuple[str, str, str], list[NumberDataPoint]] = {}

        def add(spec: tuple[str, str, str], attributes: dict[str, str], value: Any) -> None:
            if isinstance(value, bool):
                value = int(value)
            if isinstance(value, int | float):
                points.setdefault(spec, []).append(NumberDataPoint(attributes, 0, now, value))

        for snap in snapshots:
            health = snap.health
            if not health:
                continue
            base = _model_attributes(snap)
            add(HEALTH, base, health["health"]["score"])
            add(DATASET_DRIFT, base, health["dataset_drift"]["share"])
            prediction_drift = health["prediction"]["drift"]
            if prediction_drift:
                add(PREDICTION_PSI, base, prediction_drift["psi"])
            for name, feature in health["features"].items():
                attributes = {**base, "ml.feature.name": name}
                drift = feature.get("drift")
                if drift:
                    add(FEATURE_PSI, attributes, drift["psi"])
                    add(
                        FEATURE_DRIFT,
                        {**attributes, "ml.drift.method": drift["method"]},
                        drift["score"],
                    )
                    add(FEATURE_DRIFTED, attributes, drift["drifted"])
                quality = feature.get("quality")
                if quality:
                    add(FEATURE_MISSING, attributes, quality["missing_ratio"])
                    for check, spec in QUALITY_RATIOS.items():
                        add(spec, attributes, quality.get(f"{check}_ratio"))
            performance = health["performance"]
            for metric in PERFORMANCE_METRICS:
                add(PERFORMANCE, {**base, "ml.metric": metric}, performance.get(metric))
            # Segments are bounded by max_segments (+ "other"): segments x headline metrics.
            for segment, figures in (performance.get("segments") or {}).items():
                for metric in PERFORMANCE_METRICS:
                    attributes = {**base, "ml.segment": segment, "ml.metric": metric}
                    add(SEGMENT_PERFORMANCE, attributes, figures.get(metric))
        return [_gauge(spec, series) for spec, series in points.items()]

    def merge(self, data: MetricsData) -> MetricsData:
        """``data`` with the engine's metrics appended as their own instrumentation scope."""
        metrics = self.produce()
        if not metrics:
            return data
        scope = ScopeMetrics(SCOPE, metrics, "")
        if not data.resource_metrics:
            return MetricsData([ResourceMetrics(self._resource, [scope], "")])
        first, *rest = data.resource_metrics
        merged = replace(first, scope_metrics=[*first.scope_metrics, scope])
        return MetricsData([merged, *rest])


def inject_engine_metrics(reader: MetricReader, producer: EngineMetricsProducer) -> MetricReader:
    """Make ``reader`` hand the engine's metrics to its exporter along with the SDK's.

    ``_receive_metrics`` is the hook every MetricReader implements to receive a
    collection; wrapping it on the instance works for push and pull readers alike.
    """
    receive = reader._receive_metrics
    lock = threading.Lock()

    def receive_with_engine_metrics(metrics_data: MetricsData, *args: Any, **kwargs: Any) -> None:
        with lock:
            receive(producer.merge(metrics_data), *args, **kwargs)

    reader._receive_metrics = receive_with_engine_metrics  # type: ignore[method-assign]
    return reader


def _model_attributes(snap: ModelSnapshot) -> dict[str, str]:
    return {"ml.model.name": snap.model, "ml.model.version": snap.version}


def _histogram_point(
    h: FixedHistogram, attributes: dict[str, str], start: int, now: int, scale: float
) -> HistogramDataPoint:
    exemplars = [
        OtelExemplar(
            {},
            e.value * scale,
            e.time_unix_nano,
            span_id=int.from_bytes(e.span_id, "big") if len(e.span_id) == 8 else None,
            trace_id=int.from_bytes(e.trace_id, "big"),
        )
        for e in h.exemplars
        if e is not None and len(e.trace_id) == 16
    ]
    return HistogramDataPoint(
        attributes=attributes,
        start_time_unix_nano=start,
        time_unix_nano=now,
        count=h.count,
        sum=h.sum * scale,
        bucket_counts=h.counts.tolist(),
        explicit_bounds=(h.bounds * scale).tolist(),
        min=h.min * scale,
        max=h.max * scale,
        exemplars=exemplars,
    )


def _sum(spec: tuple[str, str, str], points: Sequence[NumberDataPoint]) -> Metric:
    name, unit, description = spec
    return Metric(name, description, unit, Sum(points, CUMULATIVE, is_monotonic=True))


def _gauge(spec: tuple[str, str, str], points: Sequence[NumberDataPoint]) -> Metric:
    name, unit, description = spec
    return Metric(name, description, unit, Gauge(points))


def _histogram(spec: tuple[str, str, str], points: Sequence[HistogramDataPoint]) -> Metric:
    name, unit, description = spec
    return Metric(name, description, unit, Histogram(points, CUMULATIVE))


def _has_points(metric: Metric) -> bool:
    return bool(metric.data.data_points)
