"""One health score 0-100 per model, with the reasons behind it (documented in docs/health-score.md).

Four signals are judged: drift, performance, data quality and anomalies. Each gets
a severity in [0, 1] (0.5 = its degraded threshold reached, 1 = its critical
threshold), costs ``weight * severity`` points, and the score is 100 minus the
points. The status is the worst signal's state. A signal that cannot be evaluated
(no reference, no outcomes) costs nothing and is listed as an info reason.

    inputs = HealthInputs(drifted_features=7, total_features=20, drift_psi={"age": 0.31},
                          performance={"accuracy": 0.55})
    score_health(inputs, HealthPolicy()).reasons
    # ['accuracy 0.55 < 0.60', 'drift: 7/20 features (PSI age=0.31)', ...]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["healthy", "degraded", "critical", "unknown"]
SIGNALS = ("drift", "performance", "quality", "anomalies")
# Severity at a degraded threshold; it rises to 1 at the critical threshold.
DEGRADED = 0.5
CRITICAL = 1.0

# How reasons name metrics and quality checks; other keys are shown as they are.
_METRIC_LABELS = {"mape": "MAPE", "mae": "MAE", "rmse": "RMSE", "r2": "R²", "roc_auc": "ROC AUC"}
_PERCENT_METRICS = frozenset({"mape"})
_QUALITY_LABELS = {
    "missing_ratio": "missing ratio",
    "nonfinite_ratio": "non-finite",
    "out_of_range_ratio": "out of range",
    "unseen_ratio": "unseen categories",
    "type_mismatch_ratio": "type mismatch",
}


@dataclass(frozen=True, slots=True)
class Limit:
    """Where a number stops being fine: beyond ``degraded`` it degrades, at ``critical`` it is critical.

    >>> accuracy = Limit.at_least(0.60, critical=0.50)
    >>> accuracy.severity(0.70), round(accuracy.severity(0.55), 2), accuracy.severity(0.40)
    (0.0, 0.75, 1.0)
    """

    degraded: float
    critical: float
    higher_is_better: bool

    def __post_init__(self) -> None:
        if not (math.isfinite(self.degraded) and math.isfinite(self.critical)):
            raise ValueError(
                f"limit: degraded={self.degraded} and critical={self.critical} must be finite"
            )
        if self.higher_is_better and not self.critical < self.degraded:
            raise ValueError(
                f"limit: critical={self.critical} must be below degraded={self.degraded} (higher is better)"
            )
        if not self.higher_is_better and not self.critical > self.degraded:
            raise ValueError(
                f"limit: critical={self.critical} must be above degraded={self.degraded} (lower is better)"
            )

    @classmethod
    def at_least(cls, degraded: float, critical: float) -> Limit:
        """Higher is better (accuracy): degraded below ``degraded``, critical at or below ``critical``."""
        return cls(float(degraded), float(critical), True)

    @classmethod
    def at_most(cls, degraded: float, critical: float) -> Limit:
        """Lower is better (MAPE, missing ratio): degraded above ``degraded``, critical at or above ``critical``."""
        return cls(float(degraded), float(critical), False)

    def severity(self, value: float) -> float:
        """0 within the limit; from 0.5 just past ``degraded`` up to 1 at ``critical``."""
        beyond = self.degraded - value if self.higher_is_better else value - self.degraded
        if not beyond > 0:
            return 0.0
        span = abs(self.degraded - self.critical)
        return DEGRADED + (CRITICAL - DEGRADED) * min(beyond / span, 1.0)

    def describe(self, value: float, as_percent: bool = False) -> str:
        """'0.55 < 0.60'; once at the critical threshold, against that: '0.45 ≤ 0.50'."""
        critical = self.severity(value) >= CRITICAL
        threshold = self.critical if critical else self.degraded
        op = ("≤" if critical else "<") if self.higher_is_better else ("≥" if critical else ">")
        shown, bound = _pair(value, threshold, as_percent)
        return f"{shown} {op} {bound}"


def _default_performance() -> dict[str, Limit]:
    return {"accuracy": Limit.at_least(0.60, 0.50), "mape": Limit.at_most(0.05, 0.20)}


def _default_quality() -> dict[str, Limit]:
    return {
        "missing_ratio": Limit.at_most(0.10, 0.50),
        "nonfinite_ratio": Limit.at_most(0.10, 0.50),
        "out_of_range_ratio": Limit.at_most(0.10, 0.50),
        "unseen_ratio": Limit.at_most(0.10, 0.50),
        # A feature sent with the wrong type is a client bug, not data: any of it degrades.
        "type_mismatch_ratio": Limit.at_most(0.0, 0.50),
    }


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """Weights (points a signal can cost) and thresholds; the defaults are documented in docs/health-score.md.

    >>> HealthPolicy(performance={"roc_auc": Limit.at_least(0.75, 0.65)}).performance_weight
    40.0
    """

    drift_weight: float = 30.0
    performance_weight: float = 40.0
    quality_weight: float = 20.0
    anomaly_weight: float = 10.0
    # Share of drifted features at which drift degrades (dataset drift) and turns critical.
    dataset_drift_share: float = 0.5
    critical_drift_share: float = 0.75
    # Drift of the prediction itself (scores or classes) degrades the drift signal.
    prediction_drift_degrades: bool = True
    # Metric name (as the performance report names it) → limit; metrics not listed are not judged.
    performance: Mapping[str, Limit] = field(default_factory=_default_performance)
    # Quality ratio (as QualityTally reports it) → limit, applied to every feature.
    quality: Mapping[str, Limit] = field(default_factory=_default_quality)
    # Anomalies (flagged values across streams) in the window that degrade / are critical.
    anomalies_degraded: int = 3
    anomalies_critical: int = 10
    # Findings listed per signal before "and N more".
    max_reasons_per_signal: int = 3

    def __post_init__(self) -> None:
        for name in ("drift_weight", "performance_weight", "quality_weight", "anomaly_weight"):
            weight = getattr(self, name)
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"{name}={weight} must be a number ≥ 0")
            object.__setattr__(self, name, float(weight))
        if not 0 < self.dataset_drift_share < self.critical_drift_share <= 1:
            raise ValueError(
                f"dataset_drift_share={self.dataset_drift_share} and critical_drift_share="
                f"{self.critical_drift_share} must satisfy 0 < dataset_drift_share < critical_drift_share ≤ 1"
            )
        if not 1 <= self.anomalies_degraded < self.anomalies_critical:
            raise ValueError(
                f"anomalies_degraded={self.anomalies_degraded} and anomalies_critical="
                f"{self.anomalies_critical} must satisfy 1 ≤ anomalies_degraded < anomalies_critical"
            )
        if self.max_reasons_per_signal < 1:
            raise ValueError(f"max_reasons_per_signal={self.max_reasons_per_signal} must be ≥ 1")
        for section in ("performance", "quality"):
            for key, limit in getattr(self, section).items():
                if not isinstance(limit, Limit):
                    raise ValueError(
                        f"{section}[{key!r}]: expected a Limit, got {type(limit).__name__}"
                    )

    def weight(self, signal: str) -> float:
        return {
            "drift": self.drift_weight,
            "performance": self.performance_weight,
            "quality": self.quality_weight,
            "anomalies": self.anomaly_weight,
        }[signal]


@dataclass(frozen=True, slots=True)
class HealthInputs:
    """What the engine knows about one model in one window; ``None`` means not evaluated.

    >>> HealthInputs(drifted_features=2, total_features=10, drift_psi={"age": 0.31})
    HealthInputs(drifted_features=2, total_features=10, ...)
    """

    # Drift: features drifted (by each feature's method) out of those evaluated.
    drifted_features: int | None = None
    total_features: int | None = None
    # The drift evaluation's own dataset-drift verdict, if it made one.
    dataset_drift: bool | None = None
    # Most drifted features → PSI (None where undefined), shown in the reason.
    drift_psi: Mapping[str, float | None] = field(default_factory=dict)
    prediction_drift: bool | None = None
    prediction_psi: float | None = None
    # Metric → value (accuracy, mape as a fraction, ...); None: no outcomes to judge.
    performance: Mapping[str, float | None] | None = None
    # Feature → quality ratios (QualityTally.report()["features"] fits as it is).
    quality: Mapping[str, Mapping[str, Any]] | None = None
    # Stream (score, latency, feature.age, ...) → anomalies flagged in the window.
    anomalies: Mapping[str, int] | None = None
    # Features sent but not in the reference: shown, not penalised.
    unknown_features: Sequence[str] = ()
    has_reference: bool = True
    # Outcomes joined in the window, if known: tells "no outcomes" from "not evaluated".
    outcomes: int | None = None
    # More info reasons from the caller, listed as they are.
    notes: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class HealthAssessment:
    """The verdict: a score (None when nothing could be evaluated), a status and why."""

    score: int | None
    status: Status
    reasons: list[str]
    # Signal → points taken off; only evaluated signals appear.
    penalties: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "status": self.status,
            "reasons": list(self.reasons),
            "penalties": dict(self.penalties),
        }


@dataclass(slots=True)
class _Finding:
    """One thing wrong, with its severity and the sentence that says so."""

    severity: float
    text: str


def score_health(inputs: HealthInputs, policy: HealthPolicy | None = None) -> HealthAssessment:
    """Judge ``inputs`` by ``policy`` (the defaults if None). Deterministic and monotone:
    worse inputs never raise the score.

    >>> a = score_health(HealthInputs(performance={"accuracy": 0.55}, anomalies={}))
    >>> a.score, a.status, a.penalties
    (70, 'degraded', {'performance': 30.0, 'anomalies': 0.0})
    >>> a.reasons
    ['accuracy 0.55 < 0.60', 'drift not evaluated', 'data quality not evaluated']
    """
    policy = policy or HealthPolicy()
    info: list[str] = []
    judged: dict[str, tuple[float, list[_Finding]]] = {}
    for signal, judge in (
        ("drift", _judge_drift),
        ("performance", _judge_performance),
        ("quality", _judge_quality),
        ("anomalies", _judge_anomalies),
    ):
        outcome = judge(inputs, policy, info)
        if outcome is not None:
            judged[signal] = outcome
    if inputs.unknown_features:
        names = sorted(inputs.unknown_features)
        info.append(
            f"unknown features (not in the reference): {_listing(names, policy.max_reasons_per_signal)}"
        )
    info.extend(inputs.notes)
    if not judged:
        return HealthAssessment(None, "unknown", info, {})
    penalties = {s: policy.weight(s) * severity for s, (severity, _) in judged.items()}
    score = 100.0 - sum(penalties.values())
    worst = max(severity for severity, _ in judged.values())
    status: Status = (
        "critical" if worst >= CRITICAL else "degraded" if worst >= DEGRADED else "healthy"
    )
    ranked: list[tuple[float, int, int, str]] = []
    for order, (signal, (_, findings)) in enumerate(judged.items()):
        weight = policy.weight(signal)
        for rank, finding in enumerate(findings):
            text = finding.text + (" (critical)" if finding.severity >= CRITICAL else "")
            ranked.append((-weight * finding.severity, order, rank, text))
    reasons = [text for *_, text in sorted(ranked)] + info
    return HealthAssessment(
        max(0, min(100, math.floor(score + 0.5))),
        status,
        reasons,
        {s: round(p, 2) for s, p in penalties.items()},
    )


def _ramp(value: float, degraded: float, critical: float) -> float:
    """Severity of a count or share that matters from the first unit: linear to 0.5 at ``degraded``, 1 at ``critical``."""
    if value < degraded:
        return DEGRADED * value / degraded
    if value >= critical:
        return CRITICAL
    return DEGRADED + (CRITICAL - DEGRADED) * (value - degraded) / (critical - degraded)


def _judge_drift(
    inputs: HealthInputs, policy: HealthPolicy, info: list[str]
) -> tuple[float, list[_Finding]] | None:
    drifted, total = inputs.drifted_features, inputs.total_features
    if (drifted is None) != (total is None):
        raise ValueError(
            f"drifted_features={drifted} and total_features={total}: give both or neither"
        )
    if not inputs.has_reference:
        info.append("no reference profile: drift and the reference checks are not evaluated")
        return None
    predicted = inputs.prediction_drift
    if drifted is None or total is None or total == 0:
        if predicted is None:
            info.append("drift not evaluated")
            return None
        drifted = total = 0
    if not 0 <= drifted <= total:
        raise ValueError(f"drifted_features={drifted} must be between 0 and total_features={total}")
    findings = []
    severity = 0.0
    if total:
        share = drifted / total
        severity = _ramp(share, policy.dataset_drift_share, policy.critical_drift_share)
        dataset = bool(inputs.dataset_drift) or share >= policy.dataset_drift_share
        if dataset:
            severity = max(severity, DEGRADED)
        if drifted:
            label = "dataset drift" if dataset else "drift"
            psi = _top_psi(inputs.drift_psi, policy.max_reasons_per_signal)
            findings.append(
                _Finding(
                    severity,
                    f"{label}: {drifted}/{total} features" + (f" (PSI {psi})" if psi else ""),
                )
            )
    if predicted and policy.prediction_drift_degrades:
        psi_value = inputs.prediction_psi
        shown = "" if psi_value is None or math.isnan(psi_value) else f" (PSI {psi_value:.2f})"
        findings.append(_Finding(DEGRADED, f"prediction drift{shown}"))
        severity = max(severity, DEGRADED)
    return severity, findings


def _top_psi(psi: Mapping[str, float | None], limit: int) -> str:
    def key(item: tuple[str, float | None]) -> tuple[float, str]:
        value = item[1]
        return (-value if value is not None and not math.isnan(value) else math.inf, item[0])

    shown = []
    for name, value in sorted(psi.items(), key=key)[:limit]:
        undefined = value is None or math.isnan(value)
        shown.append(f"{name}=n/a" if undefined else f"{name}={value:.2f}")
    return ", ".join(shown)


def _judge_performance(
    inputs: HealthInputs, policy: HealthPolicy, info: list[str]
) -> tuple[float, list[_Finding]] | None:
    metrics = inputs.performance
    if metrics is None:
        if inputs.outcomes == 0:
            info.append("no outcomes joined: performance not evaluated")
        else:
            info.append("performance not evaluated")
        return None
    findings: list[_Finding] = []
    judged = 0
    for name in sorted(metrics):
        value, limit = metrics[name], policy.performance.get(name)
        if limit is None or value is None or math.isnan(value):
            continue
        judged += 1
        severity = limit.severity(value)
        if severity > 0:
            label = _METRIC_LABELS.get(name, name)
            findings.append(
                _Finding(severity, f"{label} {limit.describe(value, name in _PERCENT_METRICS)}")
            )
    if not judged:
        names = sorted(m for m, v in metrics.items() if v is not None and not math.isnan(v))
        if names:
            info.append(f"performance: no limits set for {', '.join(names)}")
    return _worst(findings, policy.max_reasons_per_signal, "performance")


def _judge_quality(
    inputs: HealthInputs, policy: HealthPolicy, info: list[str]
) -> tuple[float, list[_Finding]] | None:
    features = inputs.quality
    if features is None:
        info.append("data quality not evaluated")
        return None
    findings: list[_Finding] = []
    for feature in sorted(features):
        ratios = features[feature]
        for check, limit in policy.quality.items():
            value = ratios.get(check)
            if value is None or math.isnan(value):
                continue
            if not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"quality[{feature!r}][{check!r}]={value} is not a ratio in [0, 1]"
                )
            severity = limit.severity(value)
            if severity > 0:
                label = _QUALITY_LABELS.get(check, check.replace("_", " "))
                findings.append(_Finding(severity, f"{label} {feature} {_percent(value)}"))
    findings.sort(key=lambda f: -f.severity)
    return _worst(findings, policy.max_reasons_per_signal, "data quality")


def _judge_anomalies(
    inputs: HealthInputs, policy: HealthPolicy, info: list[str]
) -> tuple[float, list[_Finding]] | None:
    counts = inputs.anomalies
    if counts is None:
        info.append("anomalies not evaluated")
        return None
    for stream, count in counts.items():
        if count < 0:
            raise ValueError(f"anomalies[{stream!r}]={count} must be ≥ 0")
    total = sum(counts.values())
    if not total:
        return 0.0, []
    severity = _ramp(total, policy.anomalies_degraded, policy.anomalies_critical)
    streams = sorted((item for item in counts.items() if item[1]), key=lambda kv: (-kv[1], kv[0]))
    listed = [f"{s} {n}" for s, n in streams[: policy.max_reasons_per_signal]]
    more = len(streams) - len(listed)
    text = f"anomalies: {total} ({', '.join(listed)}{f', {more} more' if more else ''})"
    return severity, [_Finding(severity, text)]


def _worst(findings: list[_Finding], limit: int, what: str) -> tuple[float, list[_Finding]]:
    """The signal's severity is its worst finding's; the findings past ``limit`` are summed up."""
    severity = max((f.severity for f in findings), default=0.0)
    if len(findings) > limit:
        rest = findings[limit:]
        findings = [
            *findings[:limit],
            _Finding(max(f.severity for f in rest), f"{what}: {len(rest)} more not listed"),
        ]
    return severity, findings


def _listing(names: Sequence[str], limit: int) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def _percent(ratio: float, digits: int = 3) -> str:
    """0.12 → '12%', 0.0725 → '7.25%': ``digits`` significant digits."""
    return f"{ratio * 100:.{digits}g}%"


def _pair(value: float, threshold: float, as_percent: bool) -> tuple[str, str]:
    """The value and its threshold, with enough digits that they never print the same."""
    for digits in range(2, 8):
        if as_percent:
            shown, bound = _percent(value, digits + 1), _percent(threshold, digits + 1)
        else:
            shown, bound = f"{value:.{digits}f}", f"{threshold:.{digits}f}"
        if shown != bound:
            return shown, bound
    return repr(value), repr(threshold)
