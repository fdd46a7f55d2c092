"""What the upstream guard records: per-upstream requests, latency, retries, rejections,
breaker state (a 0/1/2 gauge and a state-change counter) and a log record per state change.

    telemetry = UpstreamTelemetry(meter, tracer)
    breaker = build_breaker("features", policy, listeners=[telemetry.listener])
    telemetry.request("features", "success", 0.012)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import pybreaker
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.trace import Tracer

from agent.upstream.breaker import STATE_CODES

log = logging.getLogger("agent.upstream.breaker")

# Seconds; an upstream call from sub-millisecond to a timeout.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class BreakerTelemetry(pybreaker.CircuitBreakerListener):
    """A pybreaker listener: counts each state change and logs it, once per change."""

    def __init__(self, telemetry: UpstreamTelemetry) -> None:
        self._telemetry = telemetry

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        old = old_state.name if old_state is not None else None
        new = new_state.name
        if old == new:
            return
        self._telemetry.state_changes.add(
            1, {"upstream": cb.name, "from": old or "none", "to": new}
        )
        level = logging.WARNING if new == pybreaker.STATE_OPEN else logging.INFO
        log.log(
            level,
            "circuit breaker %s: %s -> %s",
            cb.name,
            old,
            new,
            extra={"upstream": cb.name, "breaker_from": old, "breaker_to": new},
        )


class UpstreamTelemetry:
    """The instruments; ``states`` is read by the breaker-state gauge (no I/O in callbacks)."""

    def __init__(self, meter: Meter | None = None, tracer: Tracer | None = None) -> None:
        meter = meter or metrics.NoOpMeter("mlsidecar.upstream")
        self.tracer: Tracer = tracer or trace.NoOpTracer()
        self.states: Callable[[], Iterable[tuple[str, str]]] = lambda: ()
        self.requests = meter.create_counter(
            "mlsidecar.upstream.requests",
            unit="{request}",
            description="Calls through the egress proxy by upstream and outcome "
            "(success, error_status, timeout, unreachable, breaker_open, bulkhead_full).",
        )
        self.duration = meter.create_histogram(
            "mlsidecar.upstream.duration",
            unit="s",
            description="Time to the upstream's response headers, retries included.",
            explicit_bucket_boundaries_advisory=list(LATENCY_BUCKETS_S),
        )
        self.retries = meter.create_counter(
            "mlsidecar.upstream.retries", unit="{retry}", description="Attempts after the first."
        )
        self.rejections = meter.create_counter(
            "mlsidecar.upstream.rejections",
            unit="{request}",
            description="Calls refused without reaching the upstream, by reason.",
        )
        self.state_changes = meter.create_counter(
            "mlsidecar.upstream.breaker.state_changes",
            unit="{change}",
            description="Circuit breaker state changes, by from and to state.",
        )
        meter.create_observable_gauge(
            "mlsidecar.upstream.breaker.state",
            callbacks=[self._observe_states],
            unit="",  # not "1": a Collector would name it ..._state_ratio (docs/metrics.md)
            description="Circuit breaker state: 0 closed, 1 half-open, 2 open.",
        )
        self.listener = BreakerTelemetry(self)

    def _observe_states(self, options: CallbackOptions) -> Iterable[Observation]:
        for name, state in self.states():
            yield Observation(STATE_CODES[state], {"upstream": name})

    def request(self, upstream: str, outcome: str, seconds: float | None = None) -> None:
        attributes = {"upstream": upstream, "outcome": outcome}
        self.requests.add(1, attributes)
        if seconds is not None:
            self.duration.record(seconds, attributes)
        if outcome in ("breaker_open", "bulkhead_full"):
            self.rejections.add(1, {"upstream": upstream, "reason": outcome})
