"""ML health of one model version: reference, drift and quality per window, performance, score.

Pure computation like the rest of the engine: batches in, a report section out.
``ModelState`` owns one ``ModelMonitor`` and calls it with each batch and at each
window boundary.

    monitor = ModelMonitor("churn", "v1", MonitorConfig(warmup_rows=1000))
    monitor.observe_predictions(cols)           # bins, quality; warm-up until a reference exists
    monitor.observe_joined(pairs)               # performance, once outcomes join predictions
    monitor.roll()                              # the live window closed
    monitor.report(min_rows=100)                # reference, features, dataset_drift, health, ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.engine.anomaly import EwmaBank
from agent.engine.binning import NumericBlock, NumericTally
from agent.engine.columns import PredictionColumns
from agent.engine.drift import DriftBaseline, DriftMethod, DriftResult, dataset_drift
from agent.engine.health import HealthAssessment, HealthInputs, HealthPolicy, score_health
from agent.engine.performance import JoinedPairs, PerformanceTally
from agent.engine.quality import ColumnCounts, NumericCounts, QualityTally
from agent.engine.reference import (
    CategoricalBins,
    CategoricalProfile,
    NumericBins,
    NumericProfile,
    ReferenceBuilder,
    ReferenceProfile,
)

Bins = NumericBins | CategoricalBins
# Window aggregates watched for anomalies (one observation per closed window).
ANOMALY_STREAMS = ("score.mean", "latency.mean", "traffic.rows")


@dataclass(frozen=True, slots=True)
class MonitorConfig:
    """Reference, drift, performance and health settings of one model."""

    psi_bins: int = 10
    cdf_bins: int = 100
    top_k: int = 50
    # The first N live predictions become the reference when none is given; 0 turns it off.
    warmup_rows: int = 1000
    drift_methods: Mapping[str, DriftMethod] = field(default_factory=dict)
    drift_thresholds: Mapping[str, float] = field(default_factory=dict)
    drift_share: float = 0.5
    positive_class: str | None = None
    score_bins: int = 100
    max_segments: int = 20
    health: HealthPolicy = field(default_factory=HealthPolicy)
    # Tumbling windows longer than the base window (multiples of it), for drift only.
    long_windows_ns: tuple[int, ...] = ()
    anomaly_half_life: float = 12.0
    anomaly_z: float = 3.0
    anomaly_warmup: int = 6


class HealthWindow:
    """What one window (or the totals) counted: drift bins, quality, performance."""

    __slots__ = (
        "binned_rows",
        "categorical",
        "label_bins",
        "numeric",
        "performance",
        "quality",
        "score_bins",
    )

    def __init__(
        self, quality: QualityTally, config: MonitorConfig, block: NumericBlock | None = None
    ) -> None:
        # Rows counted against the current reference: what drift is judged on.
        self.binned_rows = 0
        self.numeric = None if block is None else NumericTally(block)
        self.categorical: dict[str, CategoricalBins] = {}
        self.score_bins: NumericBins | None = None
        self.label_bins: CategoricalBins | None = None
        self.quality = quality
        self.performance = PerformanceTally(
            positive_class=config.positive_class,
            score_bins=config.score_bins,
            max_segments=config.max_segments,
        )

    @property
    def bins(self) -> dict[str, Bins]:
        """Every feature's counts in its reference bins (built on demand: reports only)."""
        out: dict[str, Bins] = {} if self.numeric is None else dict(self.numeric.bins())
        out.update(self.categorical)
        return out


@dataclass(frozen=True, slots=True)
class PsiBins:
    """One feature's live counts in its psi bins (categories for categoricals), cumulative
    since the reference ``reference_id`` was set, with the reference's own proportions."""

    feature: str
    reference_id: str
    labels: tuple[str, ...]  # bin index ("0".."9") or category; "other" last for categoricals
    counts: npt.NDArray[np.int64]
    reference_proportions: npt.NDArray[np.float64]


# The categorical bucket of labels outside the reference's top-K categories.
OTHER_BIN = "__other__"


class BinSums:
    """The drift bins of a span of closed windows, added up (since the reference, or one
    long window); ``binned_rows`` counts the rows binned in them."""

    def __init__(self, block: NumericBlock | None) -> None:
        self.numeric = None if block is None else NumericTally(block)
        self.categorical: dict[str, CategoricalBins] = {}
        self.binned_rows = 0

    def add(self, window: HealthWindow) -> None:
        if self.numeric is not None and window.numeric is not None:
            self.numeric.merge(window.numeric)
        for name, bins in window.categorical.items():
            self.categorical[name] = _merge(self.categorical.get(name), bins)
        self.binned_rows += window.binned_rows

    def bins(self, live: HealthWindow | None = None) -> dict[str, Bins]:
        """Every feature's counts in these windows (plus the ``live`` one's)."""
        out: dict[str, Bins] = {}
        if self.numeric is not None:
            numeric = NumericTally(self.numeric.block)
            numeric.merge(self.numeric)
            if live is not None and live.numeric is not None:
                numeric.merge(live.numeric)
            out.update(numeric.bins())
        out.update(self.categorical)
        if live is not None:
            for name, bins in live.categorical.items():
                out[name] = _merge(self.categorical.get(name), bins)
        return out

    def psi_counts(self, live: HealthWindow) -> dict[str, npt.NDArray[np.int64]]:
        """Psi-bin counts of the closed windows plus the ``live`` one's."""
        out: dict[str, npt.NDArray[np.int64]] = {}
        if self.numeric is not None:
            out.update(self.numeric.psi_counts())
            if live.numeric is not None:
                for name, counts in live.numeric.psi_counts().items():
                    out[name] += counts
        for name in self.categorical.keys() | live.categorical.keys():
            bins = [
                b.counts
                for b in (self.categorical.get(name), live.categorical.get(name))
                if b is not None
            ]
            out[name] = bins[0] if len(bins) == 1 else bins[0] + bins[1]
        return out


class LongWindow:
    """A tumbling window of ``length_ns`` (a multiple of the base window), made of the
    base windows that close in it; only its bins are kept, so drift alone is judged."""

    __slots__ = ("current", "length_ns", "previous", "previous_start", "start")

    def __init__(self, length_ns: int, block: NumericBlock | None) -> None:
        self.length_ns = length_ns
        self.start: int | None = None
        self.current = BinSums(block)
        self.previous_start: int | None = None
        self.previous: BinSums | None = None

    def add(self, window: HealthWindow, window_start: int, block: NumericBlock | None) -> None:
        """The base window that started at ``window_start`` closed."""
        self._advance(window_start, block)
        self.current.add(window)

    def _advance(self, at: int, block: NumericBlock | None) -> None:
        start = at - at % self.length_ns
        if self.start == start:
            return
        if self.start is not None:
            adjacent = self.start + self.length_ns == start
            self.previous_start = start - self.length_ns
            self.previous = self.current if adjacent else BinSums(block)
        self.start = start
        self.current = BinSums(block)

    def spans(self, live_start: int) -> tuple[int, BinSums | None, tuple[int, BinSums] | None]:
        """As of a live base window that started at ``live_start``: the live long window's
        start and the sums of its closed base windows (None if none), and the start and
        sums of the last closed long window (None if none)."""
        start = live_start - live_start % self.length_ns
        if self.start == start:
            last = None
            if self.previous is not None and self.previous_start is not None:
                last = (self.previous_start, self.previous)
            return start, self.current, last
        # The live base window opened a new long window: the tallied one has closed.
        if self.start is not None and self.start + self.length_ns == start:
            return start, None, (self.start, self.current)
        return start, None, None


def iso_time(unix_nano: int) -> str:
    """'2026-11-23T18:05:00Z' (UTC, ISO 8601) for a time in nanoseconds since the epoch."""
    return datetime.fromtimestamp(unix_nano / 1e9, tz=UTC).isoformat().replace("+00:00", "Z")


def _merge(old: Any, new: Any) -> Any:
    return new if old is None else old.merged(new)


class ModelMonitor:
    """Reference, windows and health of one model version. Not thread-safe (Engine locks)."""

    def __init__(
        self,
        model: str,
        version: str,
        config: MonitorConfig,
        reference: ReferenceProfile | None = None,
    ) -> None:
        self.model = model
        self.version = version
        self.config = config
        self.reference: ReferenceProfile | None = None
        # The reference's numeric features, binned together (see agent.engine.binning).
        self._block: NumericBlock | None = None
        # Bins of the windows closed since the reference was set (exported as counters).
        self._closed_bins = BinSums(None)
        self.long_windows = [LongWindow(n, None) for n in config.long_windows_ns]
        self._baseline: DriftBaseline | None = None
        self._prediction_baseline: DriftBaseline | None = None
        self.warmup: ReferenceBuilder | None = None
        # A reference built from warm-up traffic, waiting to be persisted by the caller.
        self.new_reference: ReferenceProfile | None = None
        self.warmup_skipped_batches = 0
        self.joined = 0
        self.orphaned = 0
        self.unmatched = 0
        self.totals_performance = self._performance()
        self.anomalies = EwmaBank(
            ANOMALY_STREAMS,
            half_life=config.anomaly_half_life,
            z_threshold=config.anomaly_z,
            warmup=config.anomaly_warmup,
        )
        # Per numeric reference feature, its window mean ("feature.<name>.mean"); set with
        # the reference, since its features name the streams.
        self.feature_anomalies: EwmaBank | None = None
        self._block_features: tuple[str, ...] = ()
        self.window_anomalies: dict[str, int] = {}
        self.windows_closed = 0
        if reference is not None:
            self.set_reference(reference)
        elif config.warmup_rows > 0:
            self.warmup = ReferenceBuilder(
                model,
                version,
                rows=config.warmup_rows,
                psi_bins=config.psi_bins,
                cdf_bins=config.cdf_bins,
                top_k=config.top_k,
            )
        self.current = HealthWindow(self._quality(), config, self._block)
        self.previous: HealthWindow | None = None

    def _performance(self) -> PerformanceTally:
        c = self.config
        return PerformanceTally(
            positive_class=c.positive_class, score_bins=c.score_bins, max_segments=c.max_segments
        )

    def _quality(self) -> QualityTally:
        ref = self.reference
        if ref is None:
            return QualityTally()
        schema = {
            name: "numeric" if isinstance(p, NumericProfile) else "categorical"
            for name, p in ref.features.items()
        }
        ranges = {
            name: (p.min, p.max)
            for name, p in ref.features.items()
            if isinstance(p, NumericProfile) and p.count > 0
        }
        # Only a complete vocabulary says what is unseen; a top-K one would flag rare categories.
        known = {
            name: p.categories
            for name, p in ref.features.items()
            if isinstance(p, CategoricalProfile) and int(p.counts[-1]) == 0
        }
        return QualityTally(schema, ranges, known)  # type: ignore[arg-type]

    # --- reference --------------------------------------------------------------------------

    def set_reference(self, reference: ReferenceProfile) -> None:
        """Use ``reference`` from now on; the live window restarts its bins and quality."""
        if (reference.model, reference.version) != (self.model, self.version):
            raise ValueError(
                f"reference: it is for {reference.model!r} version {reference.version!r}, "
                f"not {self.model!r} version {self.version!r}"
            )
        self._baseline = DriftBaseline(
            reference.features,
            methods={k: v for k, v in self.config.drift_methods.items() if k in reference.features},
            thresholds=self.config.drift_thresholds,
        )
        prediction: dict[str, NumericProfile | CategoricalProfile] = {}
        if reference.scores is not None:
            prediction["score"] = reference.scores
        if reference.labels is not None:
            prediction["label"] = reference.labels
        self._prediction_baseline = (
            DriftBaseline(prediction, thresholds=self.config.drift_thresholds)
            if prediction
            else None
        )
        self.reference = reference
        numeric = {n: p for n, p in reference.features.items() if isinstance(p, NumericProfile)}
        self._block = NumericBlock(numeric) if numeric else None
        self._closed_bins = BinSums(self._block)
        self.long_windows = [LongWindow(n, self._block) for n in self.config.long_windows_ns]
        self._block_features = tuple(numeric)
        self.feature_anomalies = (
            None
            if self._block is None
            else EwmaBank(
                [f"feature.{name}.mean" for name in numeric],
                half_life=self.config.anomaly_half_life,
                z_threshold=self.config.anomaly_z,
                warmup=self.config.anomaly_warmup,
            )
        )
        self.warmup = None
        if hasattr(self, "current"):
            performance = self.current.performance
            self.current = HealthWindow(self._quality(), self.config, self._block)
            self.current.performance = performance  # outcomes do not depend on the reference

    # --- observation ------------------------------------------------------------------------

    def observe_predictions(self, cols: PredictionColumns) -> None:
        # The batch that completes the warm-up is part of the reference: not judged against it.
        ref = self.reference
        if self.warmup is not None:
            self._warm_up(cols)
        window = self.current
        counted: dict[str, ColumnCounts] = {}
        numeric: NumericCounts | None = None
        if ref is not None:
            if window.numeric is not None and cols.numbers:
                numeric = window.numeric.observe(cols.numbers, cols.rows)
            for name, labels in cols.categories.items():
                profile = ref.features.get(name)
                if isinstance(profile, CategoricalProfile):
                    cbins = profile.bin(labels)
                    window.categorical[name] = _merge(window.categorical.get(name), cbins)
                    complete_vocabulary = int(profile.counts[-1]) == 0
                    counted[name] = ColumnCounts(
                        missing=cbins.missing, unseen=cbins.unseen if complete_vocabulary else 0
                    )
            if ref.scores is not None and cols.scores is not None:
                window.score_bins = _merge(window.score_bins, ref.scores.bin(cols.scores))
            if ref.labels is not None and cols.labels is not None:
                window.label_bins = _merge(window.label_bins, ref.labels.bin(cols.labels))
            window.binned_rows += cols.rows
        window.quality.observe(
            cols.rows, cols.numbers, cols.categories, counted=counted, numeric=numeric
        )

    def _warm_up(self, cols: PredictionColumns) -> None:
        assert self.warmup is not None
        try:
            self.warmup.add(cols)
        except ValueError:
            # A feature changed type mid-warm-up: a data-quality matter, never a rejection.
            self.warmup_skipped_batches += 1
            return
        if self.warmup.full:
            reference = self.warmup.build(created_unix_nano=cols.received_unix_nano)
            self.set_reference(reference)
            self.new_reference = reference

    def observe_joined(self, pairs: JoinedPairs) -> None:
        """Outcomes that joined their predictions, attributed to the window they arrived in."""
        self.joined += pairs.rows
        self.current.performance.observe(pairs)
        self.totals_performance.observe(pairs)

    def roll(
        self,
        window_aggregates: Mapping[str, float] | None = None,
        *,
        window_start_unix_nano: int | None = None,
    ) -> None:
        """The live window closed: it becomes ``previous``; its aggregates feed anomaly checks.

        ``window_start_unix_nano`` (when the window started) places it in the long windows.
        """
        self._closed_bins.add(self.current)
        if window_start_unix_nano is not None:
            for long_window in self.long_windows:
                long_window.add(self.current, window_start_unix_nano, self._block)
        if window_aggregates:
            values = np.array([window_aggregates.get(s, np.nan) for s in ANOMALY_STREAMS])
            flags = self.anomalies.observe(values)
            self.window_anomalies = dict.fromkeys(flags.flagged_names(), 1)
        else:
            self.window_anomalies = {}
        bank, tally = self.feature_anomalies, self.current.numeric
        if bank is not None and tally is not None:
            means = tally.means()
            flags = bank.observe([means.get(name, np.nan) for name in self._block_features])
            self.window_anomalies.update(dict.fromkeys(flags.flagged_names(), 1))
        self.windows_closed += 1
        self.previous = self.current
        self.current = HealthWindow(
            QualityTally.empty_like(self.previous.quality), self.config, self._block
        )

    def psi_bins(self) -> list[PsiBins]:
        """Per reference feature, its psi-bin counts since the reference was set (cumulative)."""
        ref = self.reference
        if ref is None:
            return []
        counts = self._closed_bins.psi_counts(self.current)
        out = []
        for name, profile in ref.features.items():
            mine = counts.get(name)
            if mine is None:
                continue
            if isinstance(profile, NumericProfile):
                labels = tuple(str(i) for i in range(profile.psi_counts.size))
                expected = profile.psi_counts
            else:
                labels = (*profile.categories, OTHER_BIN)
                expected = profile.counts
            total = int(expected.sum())
            proportions = expected / total if total else np.zeros(expected.size)
            out.append(PsiBins(name, ref.id, labels, mine, proportions))
        return out

    def _anomaly_streams(self) -> tuple[str, ...]:
        features = self.feature_anomalies.names if self.feature_anomalies else ()
        return (*ANOMALY_STREAMS, *features)

    @property
    def anomalies_ready(self) -> bool:
        return self.windows_closed > self.config.anomaly_warmup

    # --- report -----------------------------------------------------------------------------

    def _evaluated(self, min_rows: int) -> tuple[str, HealthWindow] | None:
        """The window drift is judged on: the live one once it holds ``min_rows`` rows counted
        against the reference, else the last closed one if it does."""
        if self.current.binned_rows >= min_rows:
            return "current", self.current
        if self.previous is not None and self.previous.binned_rows >= min_rows:
            return "previous", self.previous
        return None

    def _long_windows(self, min_rows: int, live_start: int | None) -> list[dict[str, Any]]:
        """Drift judged over each long window (``engine.long_windows_s``): the live one once
        it holds ``min_rows`` binned rows, else the last closed one."""
        out: list[dict[str, Any]] = []
        for long_window in self.long_windows:
            length = long_window.length_ns
            entry: dict[str, Any] = {"length_s": length / 1e9, "evaluated_window": None}
            out.append(entry)
            if live_start is None or self._baseline is None:
                continue
            start, closed, last = long_window.spans(live_start)
            rows = self.current.binned_rows + (closed.binned_rows if closed else 0)
            if rows >= min_rows:
                bins = closed.bins(self.current) if closed else self.current.bins
                entry["evaluated_window"] = "current"
            elif last is not None and last[1].binned_rows >= min_rows:
                start, rows, bins = last[0], last[1].binned_rows, last[1].bins()
                entry["evaluated_window"] = "previous"
            else:
                continue
            drift = self._baseline.evaluate(bins)
            share, drifted = dataset_drift(drift.values(), self.config.drift_share)
            entry.update(
                start=iso_time(start),
                end=iso_time(start + length),
                start_unix_nano=start,
                end_unix_nano=start + length,
                rows=rows,
                dataset_drift={"share": share, "drifted": drifted},
                features={name: result.to_dict() for name, result in sorted(drift.items())},
            )
        return out

    def report(self, min_rows: int, live_start_unix_nano: int | None = None) -> dict[str, Any]:
        """The ML health sections of the model report (see docs/health-report.md).

        ``live_start_unix_nano``: when the live window started (places it in long windows).
        """
        ref = self.reference
        evaluated = self._evaluated(min_rows)
        drift: dict[str, DriftResult] = {}
        prediction: dict[str, DriftResult] = {}
        if evaluated is not None and self._baseline is not None:
            drift = self._baseline.evaluate(evaluated[1].bins)
            if self._prediction_baseline is not None:
                current: dict[str, Bins] = {}
                if evaluated[1].score_bins is not None:
                    current["score"] = evaluated[1].score_bins
                if evaluated[1].label_bins is not None:
                    current["label"] = evaluated[1].label_bins
                prediction = self._prediction_baseline.evaluate(current)
        share, drifted = dataset_drift(drift.values(), self.config.drift_share)
        quality_window = evaluated[1] if evaluated is not None else self.current
        quality = quality_window.quality.report()
        performance = self.current.performance
        if performance.metrics().get("count") in (None, 0) and self.previous is not None:
            performance = self.previous.performance
        performance_report = performance.report()
        health = self._health(drift, prediction, share, drifted, quality, performance_report)
        features: dict[str, Any] = {}
        names = set(quality["features"]) | (set(ref.features) if ref else set())
        for name in sorted(names):
            entry: dict[str, Any] = {}
            if ref is not None and name in ref.features:
                p = ref.features[name]
                entry["type"] = "numeric" if isinstance(p, NumericProfile) else "categorical"
            if name in drift:
                entry["drift"] = drift[name].to_dict()
            if name in quality["features"]:
                entry["quality"] = quality["features"][name]
            features[name] = entry
        return {
            "reference": None
            if ref is None
            else {
                "id": ref.id,
                "source": ref.source,
                "rows": ref.rows,
                "created_unix_nano": ref.created_unix_nano,
                "features": len(ref.features),
            },
            "warmup": None
            if self.warmup is None
            else {"rows": self.warmup.rows, "target": self.warmup.capacity},
            "evaluated_window": None if evaluated is None else evaluated[0],
            "features": features,
            "unknown_features": quality.get("unknown_features", {}),
            "missing_features": quality.get("missing_features", []),
            "prediction_drift": prediction["score"].to_dict() if "score" in prediction else None,
            "class_drift": prediction["label"].to_dict() if "label" in prediction else None,
            "dataset_drift": {
                "share": share,
                "threshold": self.config.drift_share,
                "drifted": drifted,
                "features": len([r for r in drift.values() if r.score is not None]),
            },
            "long_windows": self._long_windows(min_rows, live_start_unix_nano),
            "performance": performance_report,
            "performance_totals": self.totals_performance.report(),
            "outcomes": {
                "joined": self.joined,
                "orphaned": self.orphaned,
                "unmatched": self.unmatched,
                "label_delay_s": self.totals_performance.label_delay.summary(),
            },
            "anomalies": {
                "streams": {
                    **self.anomalies.report(),
                    **(self.feature_anomalies.report() if self.feature_anomalies else {}),
                },
                "flagged_last_window": sorted(self.window_anomalies),
            },
            "health": health.to_dict(),
        }

    def _health(
        self,
        drift: Mapping[str, DriftResult],
        prediction: Mapping[str, DriftResult],
        share: float | None,
        drifted: bool,
        quality: Mapping[str, Any],
        performance: Mapping[str, Any],
    ) -> HealthAssessment:
        evaluated = [r for r in drift.values() if r.score is not None]
        top = sorted(
            (r for r in evaluated if r.drifted),
            key=lambda r: -(r.psi or 0.0),
        )
        names = {id(r): n for n, r in drift.items()}
        score_drift = prediction.get("score")
        count = performance.get("count")
        inputs = HealthInputs(
            drifted_features=sum(r.drifted for r in evaluated) if evaluated else None,
            total_features=len(evaluated) if evaluated else None,
            dataset_drift=drifted if share is not None else None,
            drift_psi={names[id(r)]: r.psi for r in top[:3]},
            prediction_drift=None
            if score_drift is None or score_drift.score is None
            else score_drift.drifted,
            prediction_psi=None if score_drift is None else score_drift.psi,
            performance={
                k: v for k, v in performance.items() if isinstance(v, float | int) or v is None
            }
            if count
            else None,
            quality=quality["features"] or None,
            # Judged once the detectors are past their warm-up; before that, not evaluated.
            anomalies={s: self.window_anomalies.get(s, 0) for s in self._anomaly_streams()}
            if self.anomalies_ready
            else None,
            unknown_features=sorted(quality.get("unknown_features", {})),
            has_reference=self.reference is not None,
            outcomes=int(count) if isinstance(count, int | float) else None,
        )
        return score_health(inputs, self.config.health)


def with_reference_source(reference: ReferenceProfile, source: str) -> ReferenceProfile:
    """The same reference (same id) recorded as coming from ``source``."""
    return dataclasses.replace(reference, source=source)  # type: ignore[arg-type]
