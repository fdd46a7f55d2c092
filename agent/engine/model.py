"""Per model-version state: cumulative totals for export, tumbling windows for reports."""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.engine.columns import OutcomeColumns, PredictionColumns
from agent.engine.histogram import FixedHistogram
from agent.engine.monitor import ModelMonitor, MonitorConfig, PsiBins, iso_time
from agent.engine.reference import ReferenceProfile

OTHER = "other"
REPORT_SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """What the engine needs to know about one model, resolved from settings."""

    window_ns: int = 300 * 10**9
    min_window_rows: int = 100
    latency_bounds_ms: Sequence[float] = (
        1,
        2,
        5,
        10,
        25,
        50,
        100,
        250,
        500,
        1000,
        2500,
        5000,
        10000,
    )
    score_bounds: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    max_segments: int = 20
    max_classes: int = 50
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


class BoundedCounter:
    """Counts per key for at most ``max_keys`` keys; later keys fold into ``"other"``.

    Keeps attribute cardinality bounded by configuration, never by traffic.
    """

    __slots__ = ("counts", "max_keys", "overflowed")

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self.counts: dict[str, float] = {}
        self.overflowed = False

    def add(self, key: str, amount: float) -> None:
        counts = self.counts
        if key not in counts and len(counts) >= self.max_keys:
            self.overflowed = True
            key = OTHER
        counts[key] = counts.get(key, 0.0) + amount

    def add_many(self, keys: Sequence[str], weight: float) -> None:
        """Count every key; distinct keys are taken in sorted order (as ``np.unique`` gives them)."""
        counted = Counter(keys)
        for key in sorted(counted):
            self.add(str(key), counted[key] * weight)


@dataclass(slots=True)
class Tally:
    """What happened in one span of time (a window, or since the state was created)."""

    start_unix_nano: int
    end_unix_nano: int
    latency: FixedHistogram
    scores: FixedHistogram
    # Weighted by 1/sample_rate: estimated predictions made by the service.
    predictions: float = 0.0
    rows: int = 0
    batches: int = 0
    outcomes: int = 0

    @classmethod
    def empty(cls, start: int, end: int, config: ModelConfig, like: Tally | None = None) -> Tally:
        """An empty tally; with ``like``, its histograms share that tally's bounds arrays."""
        if like is not None:
            return cls(
                start,
                end,
                FixedHistogram.empty_like(like.latency),
                FixedHistogram.empty_like(like.scores),
            )
        return cls(
            start,
            end,
            FixedHistogram(config.latency_bounds_ms),
            FixedHistogram(config.score_bounds),
        )

    def observe(self, cols: PredictionColumns) -> None:
        self.observe_batch(cols, *batch_histograms(cols, self.latency, self.scores))

    def observe_batch(
        self,
        cols: PredictionColumns,
        latency: FixedHistogram | None,
        scores: FixedHistogram | None,
    ) -> None:
        """Count ``cols`` whose latency and score histograms were already filled (once per batch)."""
        self.rows += cols.rows
        self.predictions += cols.rows * cols.weight
        self.batches += 1
        if latency is not None:
            self.latency.merge(latency)
        if scores is not None:
            self.scores.merge(scores)

    def report(self, min_rows: int, *, live: bool) -> dict[str, object]:
        return {
            "start": iso_time(self.start_unix_nano),
            "end": iso_time(self.end_unix_nano),
            "start_unix_nano": self.start_unix_nano,
            "end_unix_nano": self.end_unix_nano,
            "count": self.rows,
            "closed": not live,
            # Enough rows to evaluate (drift, quality) whether the window is live or closed.
            "complete": self.rows >= min_rows,
            "estimated_predictions": self.predictions,
            "outcomes": self.outcomes,
            "latency_ms": self.latency.summary(),
            "score": self.scores.summary(),
        }


# Histogram exemplars come from at most one batch per second per model version.
EXEMPLAR_INTERVAL_NS = 10**9


def batch_histograms(
    cols: PredictionColumns,
    latency_like: FixedHistogram,
    scores_like: FixedHistogram,
    *,
    exemplars: bool = True,
) -> tuple[FixedHistogram | None, FixedHistogram | None]:
    """One batch's latency and score histograms, to merge into every tally that counts it;
    with ``exemplars``, rows carrying trace ids become bucket exemplars."""
    t = cols.received_unix_nano
    trace_ids, span_ids = (cols.trace_ids, cols.span_ids) if exemplars else (None, None)
    latency = scores = None
    if cols.latencies_ms is not None:
        latency = FixedHistogram.empty_like(latency_like)
        latency.add(cols.latencies_ms, time_unix_nano=t, trace_ids=trace_ids, span_ids=span_ids)
    if cols.scores is not None:
        scores = FixedHistogram.empty_like(scores_like)
        scores.add(cols.scores, time_unix_nano=t, trace_ids=trace_ids, span_ids=span_ids)
    return latency, scores


@dataclass(slots=True)
class ModelSnapshot:
    """A consistent copy of one model version's cumulative state, for exporters."""

    model: str
    version: str
    start_unix_nano: int
    totals: Tally
    segments: dict[str, float]
    labels: dict[str, float]
    outcome_labels: dict[str, float] = field(default_factory=dict)
    # The ML health sections of the report (monitor.report), JSON-safe; None if not asked for.
    health: dict[str, Any] | None = None
    # Psi-bin counts per reference feature since the reference was set (with health only).
    psi_bins: list[PsiBins] = field(default_factory=list)
    # Bounded attribute sets that overflowed into "other" (see ModelState.overflowed).
    overflowed: tuple[str, ...] = ()
    # Seconds from prediction to outcome of every joined pair since the state was created
    # (with health only; None without it).
    label_delay: FixedHistogram | None = None


class ModelState:
    """Everything the engine tracks for one model version.

    Not thread-safe on its own; ``Engine`` serialises access.
    """

    def __init__(
        self,
        model: str,
        version: str,
        config: ModelConfig,
        now_unix_nano: int,
        reference: ReferenceProfile | None = None,
    ) -> None:
        self.model = model
        self.version = version
        self.config = config
        self.created_unix_nano = now_unix_nano
        self.last_seen_unix_nano = now_unix_nano
        self.totals = Tally.empty(now_unix_nano, now_unix_nano, config)
        start = now_unix_nano - now_unix_nano % config.window_ns
        self.current = Tally.empty(start, start + config.window_ns, config, like=self.totals)
        self.previous: Tally | None = None
        self.segments = BoundedCounter(config.max_segments)
        self.labels = BoundedCounter(config.max_classes)
        self.outcome_labels = BoundedCounter(config.max_classes)
        self.features: dict[str, str] = {}
        self.monitor = ModelMonitor(model, version, config.monitor, reference)
        self._exemplars_due = 0  # receipt time from which a batch's trace ids give exemplars

    def _roll(self, now: int) -> None:
        if now < self.current.end_unix_nano:
            return
        w = self.config.window_ns
        start = now - now % w
        closing = self.current
        self.monitor.roll(
            window_start_unix_nano=closing.start_unix_nano,
            window_aggregates={
                "score.mean": closing.scores.sum / closing.scores.count
                if closing.scores.count
                else math.nan,
                "latency.mean": closing.latency.sum / closing.latency.count
                if closing.latency.count
                else math.nan,
                "traffic.rows": float(closing.rows),
            },
        )
        if closing.end_unix_nano == start:
            self.previous = closing
        else:  # whole windows passed without traffic: the last closed one was empty
            self.previous = Tally.empty(start - w, start, self.config, like=self.totals)
            self.monitor.roll({"traffic.rows": 0.0})
        self.current = Tally.empty(start, start + w, self.config, like=self.totals)

    def observe_predictions(self, cols: PredictionColumns) -> None:
        now = cols.received_unix_nano
        self._roll(now)
        self.last_seen_unix_nano = now
        totals = self.totals
        # Exemplars are samples: refreshed from at most one batch per EXEMPLAR_INTERVAL_NS,
        # which spares their per-bucket bookkeeping on every other batch.
        fresh = now >= self._exemplars_due
        if fresh and cols.trace_ids:
            self._exemplars_due = now + EXEMPLAR_INTERVAL_NS
        latency, scores = batch_histograms(cols, totals.latency, totals.scores, exemplars=fresh)
        totals.observe_batch(cols, latency, scores)
        self.current.observe_batch(cols, latency, scores)
        self.segments.add(segment_key(cols.attributes), cols.rows * cols.weight)
        if cols.labels is not None:
            self.labels.add_many(cols.labels, cols.weight)
        features = self.features
        for name in cols.numbers:
            features.setdefault(name, "numeric")
        for name in cols.categories:
            features.setdefault(name, "categorical")
        self.monitor.observe_predictions(cols)

    def observe_outcomes(self, cols: OutcomeColumns) -> None:
        now = cols.received_unix_nano
        self._roll(now)
        self.last_seen_unix_nano = now
        self.totals.outcomes += cols.rows
        self.current.outcomes += cols.rows
        if cols.actual_labels is not None:
            self.outcome_labels.add_many(cols.actual_labels, 1.0)

    def snapshot(self, now_unix_nano: int, *, with_health: bool = True) -> ModelSnapshot:
        self._roll(now_unix_nano)
        totals = copy.deepcopy(self.totals)
        totals.end_unix_nano = now_unix_nano
        return ModelSnapshot(
            self.model,
            self.version,
            self.created_unix_nano,
            totals,
            dict(self.segments.counts),
            dict(self.labels.counts),
            dict(self.outcome_labels.counts),
            json_safe(self._ml_sections(self.config.min_window_rows)) if with_health else None,
            self.monitor.psi_bins() if with_health else [],
            self.overflowed(),
            copy.deepcopy(self.monitor.totals_performance.label_delay.histogram)
            if with_health
            else None,
        )

    def overflowed(self) -> tuple[str, ...]:
        """Which bounded sets saw more distinct keys than configured: ``segments``,
        ``classes`` (predicted or actual labels), ``features`` (columns past
        ``max_features`` or unknown names past their limit), ``performance_segments``."""
        quality = [w.quality for w in (self.monitor.current, self.monitor.previous) if w]
        kinds = {
            "segments": self.segments.overflowed,
            "classes": self.labels.overflowed or self.outcome_labels.overflowed,
            "features": any(q.over_limit_rows > 0 for q in quality),
            "performance_segments": self.monitor.totals_performance.segments_overflowed,
        }
        return tuple(kind for kind, flag in kinds.items() if flag)

    def report(self, now_unix_nano: int) -> dict[str, Any]:
        """The model's health report (documented in docs/health-report.md), JSON-safe."""
        self._roll(now_unix_nano)
        min_rows = self.config.min_window_rows
        totals = self.totals
        return json_safe(
            {
                "schema_version": REPORT_SCHEMA_VERSION,
                "model": self.model,
                "version": self.version,
                "generated": iso_time(now_unix_nano),
                "first_seen": iso_time(self.created_unix_nano),
                "last_seen": iso_time(self.last_seen_unix_nano),
                "window": self.current.report(min_rows, live=True),
                "previous": None
                if self.previous is None
                else self.previous.report(min_rows, live=False),
                "totals": {
                    "rows": totals.rows,
                    "estimated_predictions": totals.predictions,
                    "batches": totals.batches,
                    "outcomes": totals.outcomes,
                },
                **self._ml_sections(min_rows),
            }
        )

    def _ml_sections(self, min_rows: int) -> dict[str, Any]:
        ml = self.monitor.report(min_rows, self.current.start_unix_nano)
        features = ml.pop("features")
        for name, kind in self.features.items():
            features.setdefault(name, {}).setdefault("type", kind)
        return {
            "reference": ml.pop("reference"),
            "warmup": ml.pop("warmup"),
            "evaluated_window": ml.pop("evaluated_window"),
            "features": dict(sorted(features.items())),
            "unknown_features": ml.pop("unknown_features"),
            "missing_features": ml.pop("missing_features"),
            "segments": dict(self.segments.counts),
            "prediction": {
                "labels": dict(self.labels.counts),
                "drift": ml.pop("prediction_drift"),
                "class_drift": ml.pop("class_drift"),
            },
            **ml,
        }


def json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity: undefined numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def segment_key(attributes: Mapping[str, str]) -> str:
    """A batch's segment: its attributes as sorted ``k=v`` pairs (``""`` without any).

    >>> segment_key({"tier": "gold", "region": "eu"})
    'region=eu,tier=gold'
    """
    if not attributes:
        return ""
    return ",".join(f"{k}={v}" for k, v in sorted(attributes.items()))
