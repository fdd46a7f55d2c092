"""Per-upstream policy parts: the bulkhead, the retry schedule, and the breaker built from config.

bulkhead = Bulkhead("features", max_in_flight=32, max_pending=64)
async with bulkhead:            # raises BulkheadFull when 32 run and 64 wait
    ...
delays = retry_delays(policy.retries, random.random)   # seconds before attempts 2, 3, ...
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType

import pybreaker

from agent.config import BreakerPolicy, RetryPolicy
from agent.upstream.breaker import AsyncBreaker, FailureRate

log = logging.getLogger(__name__)


class BulkheadFull(Exception):
    """More calls waiting for an in-flight slot than the bulkhead's ``max_pending``."""

    def __init__(self, name: str, max_in_flight: int, max_pending: int) -> None:
        super().__init__(
            f"upstream {name!r}: {max_in_flight} calls in flight and {max_pending} waiting"
        )
        self.name = name


class Bulkhead:
    """At most ``max_in_flight`` calls at once and ``max_pending`` waiting; more are refused."""

    def __init__(self, name: str, *, max_in_flight: int, max_pending: int) -> None:
        if max_in_flight < 1 or max_pending < 0:
            raise ValueError(
                f"bulkhead {name!r}: max_in_flight must be >= 1 and max_pending >= 0, "
                f"got {max_in_flight} and {max_pending}"
            )
        self.name = name
        self.max_in_flight = max_in_flight
        self.max_pending = max_pending
        self._slots = asyncio.Semaphore(max_in_flight)
        self.pending = 0

    async def __aenter__(self) -> Bulkhead:
        if self._slots.locked() and self.pending >= self.max_pending:
            raise BulkheadFull(self.name, self.max_in_flight, self.max_pending)
        self.pending += 1
        try:
            await self._slots.acquire()
        finally:
            self.pending -= 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._slots.release()


def retry_delays(policy: RetryPolicy, random: Callable[[], float]) -> Iterator[float]:
    """Seconds to wait before each retry: constant or doubling from ``base_s``, capped at
    ``max_s``, with ``jitter`` of each delay drawn at random (``random()`` in [0, 1))."""
    for attempt in range(policy.max):
        delay = policy.base_s if policy.backoff == "constant" else policy.base_s * 2**attempt
        delay = min(delay, policy.max_s)
        yield delay * (1 - policy.jitter * random())


def build_breaker(
    name: str,
    policy: BreakerPolicy,
    *,
    redis_url: str | None = None,
    key_prefix: str = "mlsidecar",
    listeners: Sequence[pybreaker.CircuitBreakerListener] = (),
) -> AsyncBreaker:
    """pybreaker's breaker for ``policy`` (memory or Redis storage), in its asyncio adapter."""
    storage: pybreaker.CircuitBreakerStorage
    if policy.storage == "redis":
        if redis_url is None:
            raise ValueError(f"upstream {name!r}: breaker storage redis needs a Redis URL")
        import redis

        client = redis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        storage = pybreaker.CircuitRedisStorage(
            pybreaker.STATE_CLOSED, client, namespace=f"{key_prefix}:breaker:{name}"
        )
    else:
        storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
    breaker = pybreaker.CircuitBreaker(
        fail_max=policy.consecutive_failures,
        reset_timeout=policy.open_s,
        success_threshold=policy.close_after_successes,
        listeners=list(listeners),
        state_storage=storage,
        name=name,
    )
    rate = (
        None
        if policy.failure_rate is None
        else FailureRate(policy.failure_rate, policy.min_requests, policy.window_s)
    )
    return AsyncBreaker(breaker, half_open_requests=policy.half_open_requests, failure_rate=rate)
