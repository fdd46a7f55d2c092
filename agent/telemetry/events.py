"""Health events: drift detected or resolved, health degraded or recovered, as OTel log records.

The engine judges every model version on every report; this module turns those
judgements into events, one per change of state, never one per evaluation
(docs/events.md lists them):

    tracker = HealthEvents(max_versions=100, max_features=1000)
    log = HealthEventLog(telemetry.logger_provider, clock=time.time_ns)
    poll_health_events(engine, tracker, log)   # the Agent does this every events_interval_s

``HealthEvents.observe(report)`` is the pure part: a model health report in, the
events it implies out. It remembers, per model version, the state of each signal
(each feature's drift, the scores' and classes' drift, dataset drift, the health
status, performance) and the window each state last changed in:

- the first report of a model already drifted yields ``drift.detected`` once;
- re-reading the same window yields nothing new, and a signal changes at most once
  per evaluated window (a live window's verdict that flips back waits for the next one);
- a signal that is not evaluated (no reference, too few rows) keeps its state: not
  evaluated is not resolved.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from opentelemetry._logs import LoggerProvider, SeverityNumber

from agent import __version__
from agent.engine import Engine
from agent.engine.drift import TEST_METHODS
from agent.engine.performance import HEADLINE_METRICS

# The OTel logger's instrumentation scope, and the Python logger of the JSON log line.
EVENTS_LOGGER = "mlsidecar.events"

Severity = Literal["ERROR", "WARN", "INFO"]
AttributeValue = str | int | float | bool | list[str]

_SEVERITY_NUMBERS = {
    "ERROR": SeverityNumber.ERROR,
    "WARN": SeverityNumber.WARN,
    "INFO": SeverityNumber.INFO,
}
_LOGGING_LEVELS = {"ERROR": logging.ERROR, "WARN": logging.WARNING, "INFO": logging.INFO}
# Methods whose decision is ``p_value < threshold``; the others decide on ``score >= threshold``.
_P_VALUE_METHODS = TEST_METHODS
_STATUS_RANK = {"healthy": 0, "degraded": 1, "critical": 2}
# Performance metrics named in events, as the report's ``performance`` section has them.
_PERFORMANCE_METRICS = HEADLINE_METRICS
# How health reasons begin when they name one of those metrics: "accuracy 0.55 < 0.60",
# "ROC AUC 0.70 < 0.75", "MAPE 7.2% > 5%", "R² 0.41 < 0.50", "f1_macro 0.4 < 0.5".
_PERFORMANCE_REASON_PREFIXES = tuple(
    sorted(
        {f"{m} " for m in _PERFORMANCE_METRICS}
        | {f"{m.replace('_', ' ')} " for m in _PERFORMANCE_METRICS}
        | {"r² "}
    )
)
_MAX_LISTED = 10  # feature names listed in a dataset-drift event

log = logging.getLogger(__name__)

# (reference id, start, end) of the window a verdict was reached on.
_WindowKey = tuple[str, int, int]
# ("feature", name), ("prediction", ""), ("class", ""), ("dataset", ""), ("health", ""), ...
_SignalKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class HealthEvent:
    """One change of a model version's health, ready to be logged.

    >>> event.name, event.severity, event.attributes["ml.feature.name"]
    ('drift.detected', 'WARN', 'income')
    """

    name: str
    severity: Severity
    body: str
    attributes: dict[str, AttributeValue]


@dataclass(slots=True)
class _Signal:
    """One judged signal: its state and the window it last changed in."""

    state: bool | str
    changed_in: _WindowKey


@dataclass(slots=True)
class _VersionState:
    first_seen: str | None
    signals: dict[_SignalKey, _Signal]
    warned_full: bool = False


class HealthEvents:
    """Remembers the last state of each signal per model version; yields transitions.

    >>> tracker = HealthEvents()
    >>> [e.name for e in tracker.observe(engine.report("credit", "v1"))]
    ['drift.detected']
    >>> tracker.observe(engine.report("credit", "v1"))   # the same window again
    []

    Memory is bounded: at most ``max_versions`` model versions (the least recently
    observed is dropped first) and ``max_features`` feature signals per version. A
    signal back in its normal state is forgotten once its window has passed, so what
    is held is, per version, the drifted features and those that changed this window.
    """

    def __init__(self, *, max_versions: int = 100, max_features: int = 1000) -> None:
        if max_versions < 1 or max_features < 1:
            raise ValueError(
                f"HealthEvents: max_versions={max_versions} and max_features={max_features} "
                "must be at least 1"
            )
        self.max_versions = max_versions
        self.max_features = max_features
        self._versions: dict[tuple[str, str], _VersionState] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Model versions with state."""
        return len(self._versions)

    def held_signals(self, model: str, version: str) -> int:
        """Signals held for one model version (drifted, degraded, or changed this window)."""
        state = self._versions.get((model, version))
        return 0 if state is None else len(state.signals)

    def forget(self, model: str) -> None:
        """Drop the state of every version of ``model`` (DELETE /v1/models/{model})."""
        with self._lock:
            for key in [k for k in self._versions if k[0] == model]:
                del self._versions[key]

    def retain(self, tracked: Collection[tuple[str, str]]) -> None:
        """Drop the state of model versions not in ``tracked`` (those the engine forgot)."""
        keep = set(tracked)
        with self._lock:
            for key in [k for k in self._versions if k not in keep]:
                del self._versions[key]

    def observe(self, report: Mapping[str, Any]) -> list[HealthEvent]:
        """The events that one model health report implies (docs/health-report.md)."""
        model, version = str(report["model"]), str(report.get("version", ""))
        with self._lock:
            state = self._version_state(model, version, report.get("first_seen"))
            return _Judgement(self, state, report, model, version).events()

    def _version_state(self, model: str, version: str, first_seen: str | None) -> _VersionState:
        key = (model, version)
        state = self._versions.pop(key, None)
        if state is not None and state.first_seen != first_seen:
            state = None  # forgotten and tracked again since: a new life, from a clean slate
        if state is None:
            while len(self._versions) >= self.max_versions:
                del self._versions[next(iter(self._versions))]  # least recently observed
            state = _VersionState(first_seen, {})
        self._versions[key] = state  # most recently observed last
        return state


class _Judgement:
    """One report against one version's remembered state: the transitions it holds."""

    def __init__(
        self,
        tracker: HealthEvents,
        state: _VersionState,
        report: Mapping[str, Any],
        model: str,
        version: str,
    ) -> None:
        self.tracker = tracker
        self.state = state
        self.report = report
        self.label = f"{model} {version}" if version else model
        self.events_out: list[HealthEvent] = []
        reference = report.get("reference") or {}
        self.reference_id = str(reference.get("id") or "")
        # Drift is judged on the evaluated window ("current" is the report's "window"); the
        # health status also without one, on the live window.
        evaluated = report.get("evaluated_window")
        window = {"current": report.get("window"), "previous": report.get("previous")}.get(
            str(evaluated)
        )
        self.evaluated = str(evaluated) if window else None
        self.window = self._key(window)
        self.health_window = self.window or self._key(report.get("window"))
        self.base: dict[str, AttributeValue] = {"ml.model.name": model, "ml.model.version": version}
        if self.reference_id:
            self.base["ml.reference.id"] = self.reference_id

    def _key(self, window: Mapping[str, Any] | None) -> _WindowKey | None:
        if not window:
            return None
        return (self.reference_id, int(window["start_unix_nano"]), int(window["end_unix_nano"]))

    def events(self) -> list[HealthEvent]:
        if self.window is not None:
            self._features()
            prediction = self.report.get("prediction") or {}
            self._drift(("prediction", ""), prediction.get("drift"), "scores")
            self._drift(("class", ""), prediction.get("class_drift"), "predicted classes")
            self._dataset()
        if self.health_window is not None:
            self._health()
            self._performance()
        self._prune()
        return self.events_out

    # -- the signals -------------------------------------------------------------------------

    def _features(self) -> None:
        features = self.report.get("features") or {}
        for name in sorted(features):
            self._drift(("feature", str(name)), features[name].get("drift"), f"feature {name!r}")

    def _drift(self, key: _SignalKey, drift: Mapping[str, Any] | None, subject: str) -> None:
        if not drift or drift.get("score") is None:
            return  # not evaluated: no values in the window or the reference
        drifted = bool(drift["drifted"])
        if not self._changes(key, drifted, False, self.window):
            return
        kind, name = key
        attributes: dict[str, AttributeValue] = {"ml.drift.subject": kind}
        if kind == "feature":
            attributes["ml.feature.name"] = name
        attributes["ml.drift.method"] = str(drift["method"])
        for field in ("score", "threshold", "p_value", "psi"):
            if drift.get(field) is not None:
                attributes[f"ml.drift.{field}"] = float(drift[field])
        verb = "drifted" if drifted else "no longer drifts"
        self._emit(
            "drift.detected" if drifted else "drift.resolved",
            f"{subject} {verb}: {_decision(drift)}",
            attributes,
            self.window,
        )

    def _dataset(self) -> None:
        dataset = self.report.get("dataset_drift") or {}
        share = dataset.get("share")
        if share is None:
            return
        drifted = bool(dataset["drifted"])
        if not self._changes(("dataset", ""), drifted, False, self.window):
            return
        evaluated = int(dataset.get("features") or 0)
        features = self.report.get("features") or {}
        names = sorted(
            name for name, f in features.items() if (f.get("drift") or {}).get("drifted")
        )
        threshold = float(dataset["threshold"])
        compare = "≥" if drifted else "<"
        summary = (
            f"{round(share * evaluated)}/{evaluated} features drifted, "
            f"share {_num(share)} {compare} {_num(threshold)}"
        )
        self._emit(
            "dataset_drift.detected" if drifted else "dataset_drift.resolved",
            f"dataset drift: {summary}" if drifted else f"dataset drift resolved: {summary}",
            {
                "ml.dataset.drift.share": float(share),
                "ml.dataset.drift.threshold": threshold,
                "ml.dataset.drift.features": evaluated,
                "ml.dataset.drift.drifted_features": names[:_MAX_LISTED],
            },
            self.window,
        )

    def _health(self) -> None:
        health = self.report.get("health") or {}
        status = health.get("status")
        if status not in _STATUS_RANK:
            return  # "unknown": nothing could be judged
        signal = self.state.signals.get(("health", ""))
        before = str(signal.state) if signal is not None else "healthy"
        if not self._changes(("health", ""), status, "healthy", self.health_window):
            return
        worse = _STATUS_RANK[status] > _STATUS_RANK[before]
        score = health.get("score")
        reasons = [str(r) for r in health.get("reasons") or []]
        attributes: dict[str, AttributeValue] = {
            "ml.health.status": status,
            "ml.health.previous_status": before,
            "ml.health.reasons": reasons,
        }
        if score is not None:
            attributes["ml.health.score"] = score
        verb = "degraded" if worse else "recovered"
        why = f": {reasons[0]}" if worse and reasons else ""
        self._emit(
            f"health.{verb}",
            f"health {verb} from {before} to {status}, score {_num(score)}{why}",
            attributes,
            self.health_window,
        )

    def _performance(self) -> None:
        penalties = (self.report.get("health") or {}).get("penalties") or {}
        if "performance" not in penalties:
            return  # not evaluated: no outcomes joined, or no limits set
        degraded = float(penalties["performance"]) > 0
        if not self._changes(("performance", ""), degraded, False, self.health_window):
            return
        performance = self.report.get("performance") or {}
        attributes: dict[str, AttributeValue] = {
            f"ml.performance.{metric}": float(performance[metric])
            for metric in _PERFORMANCE_METRICS
            if isinstance(performance.get(metric), int | float)
        }
        reasons = [
            str(r)
            for r in (self.report.get("health") or {}).get("reasons") or []
            if str(r).lower().startswith(_PERFORMANCE_REASON_PREFIXES)
        ]
        attributes["ml.health.reasons"] = reasons
        if degraded:
            detail = f": {'; '.join(reasons)}" if reasons else ""
            body = f"performance degraded{detail}"
        else:
            body = "performance recovered: every judged metric is within its limit"
        self._emit(
            "performance.degraded" if degraded else "performance.recovered",
            body,
            attributes,
            self.health_window,
        )

    # -- state -------------------------------------------------------------------------------

    def _changes(
        self, key: _SignalKey, new: bool | str, normal: bool | str, window: _WindowKey | None
    ) -> bool:
        """Record ``new`` as the state of ``key`` if it is a change worth an event."""
        assert window is not None
        signals = self.state.signals
        signal = signals.get(key)
        old = normal if signal is None else signal.state
        if new == old:
            return False
        if signal is not None and signal.changed_in == window:
            return False  # at most one change per signal per window
        if signal is None and key[0] == "feature":
            held = sum(1 for k in signals if k[0] == "feature")
            if held >= self.tracker.max_features:
                if not self.state.warned_full:
                    self.state.warned_full = True
                    log.warning(
                        "health events: feature signals of a model version at their limit; "
                        "later features are not reported",
                        extra={"model": self.label, "max_features": self.tracker.max_features},
                    )
                return False
        signals[key] = _Signal(new, window)
        return True

    def _prune(self) -> None:
        """Forget signals back in their normal state whose window has passed."""
        current = {self.window, self.health_window}
        signals = self.state.signals
        for key in [
            k
            for k, s in signals.items()
            if s.state in (False, "healthy") and s.changed_in not in current
        ]:
            del signals[key]

    def _emit(
        self,
        name: str,
        sentence: str,
        attributes: dict[str, AttributeValue],
        window: _WindowKey | None,
    ) -> None:
        assert window is not None
        _, start, end = window
        severity: Severity = "WARN" if name.endswith((".detected", ".degraded")) else "INFO"
        self.events_out.append(
            HealthEvent(
                name,
                severity,
                f"{self.label}: {sentence} (window {_window_text(start, end)})",
                {
                    **self.base,
                    **attributes,
                    "ml.window.start_unix_nano": start,
                    "ml.window.end_unix_nano": end,
                    **({"ml.window.evaluated": self.evaluated} if self.evaluated else {}),
                },
            )
        )


def _decision(drift: Mapping[str, Any]) -> str:
    """How the method decided: ``ks 0.162, p-value 8.2e-15 < 0.05`` or ``psi 0.31 ≥ 0.2``."""
    method, score, threshold = str(drift["method"]), drift["score"], drift["threshold"]
    drifted = bool(drift["drifted"])
    p_value = drift.get("p_value")
    if method in _P_VALUE_METHODS and p_value is not None:
        compare = "<" if drifted else "≥"
        return f"{method} {_num(score)}, p-value {_num(p_value)} {compare} {_num(threshold)}"
    compare = "≥" if drifted else "<"
    return f"{method} {_num(score)} {compare} {_num(threshold)}"


def _num(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.3g}"


def _window_text(start: int, end: int) -> str:
    """``12:00-12:05 UTC``; with seconds when the window is not whole minutes."""
    whole_minutes = start % 60_000_000_000 == 0 and end % 60_000_000_000 == 0
    pattern = "%H:%M" if whole_minutes else "%H:%M:%S"
    first = time.strftime(pattern, time.gmtime(start / 1e9))
    last = time.strftime(pattern, time.gmtime(end / 1e9))
    return f"{first}-{last} UTC"


class HealthEventLog:
    """Writes health events to the agent's LoggerProvider and, as one line, to its own log.

    >>> log = HealthEventLog(telemetry.logger_provider, clock=time.time_ns)
    >>> log.emit(event)

    The OTel record carries the event name in the LogRecord's EventName field (the
    convention since the ``event.name`` attribute was deprecated) and, for pipelines
    that predate that field, in the ``event.name`` attribute too. The JSON log line
    goes to the ``mlsidecar.events`` Python logger, whose records the OTLP log bridge
    skips (``Telemetry.log_handler``): each event reaches OTLP exactly once.
    """

    def __init__(
        self,
        logger_provider: LoggerProvider,
        *,
        clock: Callable[[], int] = time.time_ns,
        mirror: logging.Logger | None = None,
    ) -> None:
        self._logger = logger_provider.get_logger(EVENTS_LOGGER, __version__)
        self._clock = clock
        self._mirror = mirror if mirror is not None else logging.getLogger(EVENTS_LOGGER)

    def emit(self, event: HealthEvent) -> None:
        attributes = {"event.name": event.name, **event.attributes}
        self._logger.emit(
            timestamp=self._clock(),
            severity_number=_SEVERITY_NUMBERS[event.severity],
            severity_text=event.severity,
            body=event.body,
            attributes=attributes,
            event_name=event.name,
        )
        self._mirror.log(
            _LOGGING_LEVELS[event.severity],
            event.body,
            extra={
                key: "; ".join(value) if isinstance(value, list) else value
                for key, value in attributes.items()
            },
        )


def poll_health_events(engine: Engine, tracker: HealthEvents, log: HealthEventLog) -> int:
    """Judge every model version the engine tracks, once; log what changed. Returns the count.

    Reads the engine's public reports only (one per version); run it off the event loop.
    """
    versions = [(str(m["model"]), str(m["version"])) for m in engine.models()]
    tracker.retain(versions)
    emitted = 0
    for model, version in versions:
        report = engine.report(model, version)
        if report is None:
            continue  # forgotten meanwhile
        for event in tracker.observe(report):
            log.emit(event)
            emitted += 1
    return emitted
