"""Breaker-guarded upstream calls: the asyncio adapter over pybreaker, per-upstream policies,
and the egress proxy (docs/upstream.md)."""

from agent.upstream.breaker import AsyncBreaker, BreakerOpen, FailureRate
from agent.upstream.policy import Bulkhead, BulkheadFull, build_breaker
from agent.upstream.proxy import EgressProxy, Upstreams
from agent.upstream.telemetry import UpstreamTelemetry

__all__ = [
    "AsyncBreaker",
    "BreakerOpen",
    "Bulkhead",
    "BulkheadFull",
    "EgressProxy",
    "FailureRate",
    "UpstreamTelemetry",
    "Upstreams",
    "build_breaker",
]
