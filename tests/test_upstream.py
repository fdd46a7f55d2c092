"""The asyncio breaker adapter over pybreaker: states, listeners, storage, concurrency.

Guarded calls go to a real HTTP server on 127.0.0.1 (tests/upstream_server.py); shared
state goes through a real redis-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pybreaker
import pytest
from redis_server import RedisServer
from upstream_server import FlakyUpstream

from agent.config import BreakerPolicy, RetryPolicy
from agent.upstream.breaker import AsyncBreaker, BreakerOpen, FailureRate
from agent.upstream.policy import Bulkhead, BulkheadFull, build_breaker, retry_delays


class UpstreamError(Exception):
    pass


class Transitions(pybreaker.CircuitBreakerListener):
    def __init__(self) -> None:
        self.changes: list[tuple[str | None, str]] = []
        self.failures = 0
        self.successes = 0

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        self.changes.append((old_state.name if old_state else None, new_state.name))

    def failure(self, cb: Any, exc: BaseException) -> None:
        self.failures += 1

    def success(self, cb: Any) -> None:
        self.successes += 1


@pytest.fixture
def upstream() -> Iterator[FlakyUpstream]:
    with FlakyUpstream() as server:
        yield server


def breaker(**policy: Any) -> tuple[AsyncBreaker, Transitions]:
    listener = Transitions()
    return build_breaker("features", BreakerPolicy(**policy), listeners=[listener]), listener


async def get(client: httpx.AsyncClient, url: str) -> httpx.Response:
    response = await client.get(url)
    if response.status_code >= 500:
        raise UpstreamError(response.status_code)
    return response


def client() -> httpx.AsyncClient:
    # No keep-alive: httpcore's pool slows down with 64 idle connections to reuse.
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    return httpx.AsyncClient(limits=limits, timeout=10)


async def trip(guard: AsyncBreaker, upstream: FlakyUpstream, failures: int) -> None:
    upstream.fail_next(failures)
    async with client() as http:
        for _ in range(failures):
            with pytest.raises(UpstreamError):
                await guard.call(get, http, upstream.url)


def test_64_concurrent_calls_through_a_closed_breaker_run_at_once_not_one_after_another(
    upstream: FlakyUpstream,
) -> None:
    upstream.delay_s = 0.1
    guard, _ = breaker()

    async def timed(calls: Any) -> float:
        started = time.perf_counter()
        results = await asyncio.gather(*calls)
        assert all(r is None or r.status_code == 200 for r in results)
        return time.perf_counter() - started

    async def scenario() -> tuple[float, float, float]:
        # The adapter alone: 64 guarded 100 ms waits.
        alone = await timed(guard.call(asyncio.sleep, 0.1) for _ in range(64))
        async with client() as http:
            # The same HTTP calls without a breaker, then through it, in the same run.
            direct = await timed(get(http, upstream.url) for _ in range(64))
            guarded = await timed(guard.call(get, http, upstream.url) for _ in range(64))
        return alone, direct, guarded

    alone, direct, guarded = asyncio.run(scenario())
    print(
        f"\n64 concurrent 100 ms calls, one closed breaker: adapter alone {alone * 1000:.0f} ms; "
        f"HTTP direct {direct * 1000:.0f} ms, HTTP through the breaker {guarded * 1000:.0f} ms"
    )
    # pybreaker's call() holds its lock across each call: 64 x 100 ms = 6.4 s. The bounds
    # are loose (a busy CI machine is slow); the proof is the overlap: serialised calls
    # would take 6.4 s and never have more than one in flight.
    assert alone < 1.0
    assert guarded < 3.2
    assert upstream.max_in_flight >= 48  # they overlap (connecting 64 sockets takes a moment)


def test_pybreakers_own_call_serialises_the_same_calls(upstream: FlakyUpstream) -> None:
    """Why the adapter exists: pybreaker holds one lock across the guarded call."""
    upstream.delay_s = 0.1
    sync = pybreaker.CircuitBreaker(name="sync")
    with httpx.Client() as http:
        started = time.perf_counter()
        threads = [
            threading.Thread(target=sync.call, args=(http.get, upstream.url)) for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert time.perf_counter() - started >= 0.4
    assert upstream.max_in_flight == 1


def test_half_open_admits_exactly_the_probe_budget_among_50_concurrent_callers(
    upstream: FlakyUpstream,
) -> None:
    guard, listener = breaker(
        consecutive_failures=2, open_s=0.2, half_open_requests=3, close_after_successes=3
    )

    async def scenario() -> list[Any]:
        await trip(guard, upstream, 2)
        assert await guard.state() == "open"
        await asyncio.sleep(0.25)
        upstream.delay_s = 0.2  # probes are still in flight when the others arrive
        seen_before = len(upstream.requests)
        async with client() as http:
            results = await asyncio.gather(
                *(guard.call(get, http, upstream.url) for _ in range(50)),
                return_exceptions=True,
            )
        assert len(upstream.requests) - seen_before == 3
        return results

    results = asyncio.run(scenario())
    admitted = [r for r in results if isinstance(r, httpx.Response)]
    refused = [r for r in results if isinstance(r, BreakerOpen)]
    assert len(admitted) == 3 and len(refused) == 47
    assert {r.state for r in refused} == {"half-open"}
    # Three successful probes close it, through pybreaker's transitions and listeners.
    assert guard.last_state == "closed"
    assert listener.changes == [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]


def test_a_failed_probe_opens_the_breaker_again_and_open_refuses_at_once(
    upstream: FlakyUpstream,
) -> None:
    guard, listener = breaker(consecutive_failures=3, open_s=0.2)

    async def scenario() -> None:
        await trip(guard, upstream, 3)
        started = time.perf_counter()
        with pytest.raises(BreakerOpen) as refused:
            await guard.call(asyncio.sleep, 1)
        assert time.perf_counter() - started < 0.05
        assert refused.value.state == "open" and 0 < refused.value.retry_after_s <= 0.2
        await asyncio.sleep(0.25)
        await trip(guard, upstream, 1)  # the probe fails
        assert await guard.state() == "open"

    asyncio.run(scenario())
    assert listener.changes == [("closed", "open"), ("open", "half-open"), ("half-open", "open")]
    assert listener.failures == 4


def test_a_success_resets_the_consecutive_failure_count(upstream: FlakyUpstream) -> None:
    guard, _ = breaker(consecutive_failures=3)

    async def scenario() -> None:
        for _ in range(3):
            await trip(guard, upstream, 2)
            async with client() as http:
                await guard.call(get, http, upstream.url)
        assert await guard.state() == "closed"
        assert guard.breaker.fail_counter == 0

    asyncio.run(scenario())


def test_failure_rate_trips_over_the_minimum_volume_without_consecutive_failures(
    upstream: FlakyUpstream,
) -> None:
    guard, listener = breaker(
        consecutive_failures=100, failure_rate=0.5, min_requests=10, window_s=30
    )

    async def scenario() -> int:
        calls = 0
        async with client() as http:
            while await guard.state() == "closed":
                upstream.fail_next(calls % 2)  # every other call fails
                calls += 1
                with contextlib.suppress(UpstreamError):
                    await guard.call(get, http, upstream.url)
        return calls

    calls = asyncio.run(scenario())
    assert calls == 10  # 5 of 10 failed: never two in a row
    assert listener.changes == [("closed", "open")]


def test_failure_rate_needs_its_minimum_volume() -> None:
    rate = FailureRate(0.5, min_requests=4, window_s=30)
    guard = AsyncBreaker(pybreaker.CircuitBreaker(fail_max=100, name="x"), failure_rate=rate)

    async def scenario() -> None:
        for _ in range(3):
            with pytest.raises(UpstreamError):
                await guard.call(_raise)
        assert await guard.state() == "closed"
        with pytest.raises(UpstreamError):
            await guard.call(_raise)
        assert await guard.state() == "open"

    asyncio.run(scenario())


async def _raise() -> None:
    raise UpstreamError("down")


def test_excluded_business_errors_do_not_count_as_failures() -> None:
    sync = pybreaker.CircuitBreaker(fail_max=1, exclude=[KeyError], name="x")
    guard = AsyncBreaker(sync)

    async def lookup() -> None:
        raise KeyError("no such user")

    async def scenario() -> None:
        for _ in range(3):
            with pytest.raises(KeyError):
                await guard.call(lookup)
        assert await guard.state() == "closed"

    asyncio.run(scenario())


def test_bulkhead_refuses_beyond_max_pending_and_lets_the_rest_through(
    upstream: FlakyUpstream,
) -> None:
    upstream.delay_s = 0.2

    async def scenario() -> list[Any]:
        bulkhead = Bulkhead("features", max_in_flight=2, max_pending=3)

        async def one(http: httpx.AsyncClient) -> httpx.Response:
            async with bulkhead:
                return await http.get(upstream.url)

        async with client() as http:
            return await asyncio.gather(*(one(http) for _ in range(10)), return_exceptions=True)

    results = asyncio.run(scenario())
    assert sum(isinstance(r, httpx.Response) for r in results) == 5
    assert sum(isinstance(r, BulkheadFull) for r in results) == 5
    assert upstream.max_in_flight == 2


def test_two_replicas_sharing_redis_see_the_same_open_state_and_reset(
    upstream: FlakyUpstream, redis_server: RedisServer
) -> None:
    policy = BreakerPolicy(consecutive_failures=2, open_s=30, storage="redis")
    first_listener, second_listener = Transitions(), Transitions()
    first = build_breaker(
        "features", policy, redis_url=redis_server.url, listeners=[first_listener]
    )
    second = build_breaker(
        "features", policy, redis_url=redis_server.url, listeners=[second_listener]
    )
    assert first.blocking_storage and second.storage.name == "redis"

    async def scenario() -> None:
        await trip(first, upstream, 2)
        with pytest.raises(BreakerOpen) as refused:
            await second.call(asyncio.sleep, 0)
        assert refused.value.state == "open" and refused.value.retry_after_s > 25
        # pybreaker's keys, under the configured namespace.
        client = redis_server.client()
        assert client.get("mlsidecar:breaker:features:pybreaker:state") == b"open"
        await second.reset()
        assert await first.state() == "closed"

    asyncio.run(scenario())
    assert first_listener.changes == [("closed", "open"), ("open", "closed")]
    # The second replica noticed the change made by the first, as pybreaker reports it.
    assert second_listener.changes == [("closed", "open"), ("open", "closed")]


def test_redis_storage_io_runs_off_the_event_loop(
    upstream: FlakyUpstream, redis_server: RedisServer
) -> None:
    guard = build_breaker("features", BreakerPolicy(storage="redis"), redis_url=redis_server.url)
    upstream.delay_s = 0.1
    loop_threads: set[int] = set()
    storage_threads: set[int] = set()
    real_get = guard.storage._redis.get  # type: ignore[attr-defined]

    def recording_get(*args: Any) -> Any:
        storage_threads.add(threading.get_ident())
        return real_get(*args)

    guard.storage._redis.get = recording_get  # type: ignore[attr-defined]

    async def scenario() -> float:
        loop_threads.add(threading.get_ident())
        async with client() as http:
            started = time.perf_counter()
            await asyncio.gather(*(guard.call(get, http, upstream.url) for _ in range(32)))
            return time.perf_counter() - started

    elapsed = asyncio.run(scenario())
    assert storage_threads and not storage_threads & loop_threads
    assert elapsed < 1.0


def test_retry_delays_back_off_within_their_cap_and_jitter() -> None:
    exponential = RetryPolicy(max=5, backoff="exponential", base_s=0.1, max_s=0.5, jitter=0)
    assert list(retry_delays(exponential, lambda: 0.0)) == [0.1, 0.2, 0.4, 0.5, 0.5]
    constant = RetryPolicy(max=3, backoff="constant", base_s=0.2, jitter=0.5)
    assert list(retry_delays(constant, lambda: 1.0)) == [0.1, 0.1, 0.1]


def test_config_names_the_offending_key() -> None:
    from pydantic import ValidationError

    from agent.config import Settings

    with pytest.raises(ValidationError, match=r"upstream\.policies\.p\.breaker\.trip_after"):
        Settings.load(None, upstream={"policies": {"p": {"breaker": {"trip_after": 3}}}})
    with pytest.raises(ValidationError, match=r"upstream\.targets\.t\.policy"):
        Settings.load(None, upstream={"targets": {"t": {"url": "http://a", "policy": "none"}}})
    with pytest.raises(ValidationError, match="not an http:// or https:// URL"):
        Settings.load(None, upstream={"targets": {"t": {"url": "ftp://a"}}})
    with pytest.raises(ValidationError, match=r"breaker\.storage: redis needs upstream\.redis_url"):
        Settings.load(None, upstream={"policies": {"shared": {"breaker": {"storage": "redis"}}}})
    with pytest.raises(ValidationError, match="not a loopback address"):
        Settings.load(None, upstream={"listen": "0.0.0.0:8321"})
    settings = Settings.load(
        None,
        upstream={
            "policies": {"fast": {"timeout_s": 0.5, "retries": None, "bulkhead": {}}},
            "targets": {"t": {"url": "https://features.internal/v1", "policy": "fast"}},
        },
    )
    assert set(settings.upstream.policies) == {"default", "fast"}
    assert settings.upstream.policies["fast"].retries is None
    assert settings.upstream.policies["fast"].bulkhead is not None


def test_half_open_budget_holds_with_redis_storage_too(
    upstream: FlakyUpstream, redis_server: RedisServer
) -> None:
    # pybreaker keeps opened_at in whole seconds in Redis: open_s is 1 s here.
    policy = BreakerPolicy(consecutive_failures=1, open_s=1, half_open_requests=2, storage="redis")
    guard = build_breaker("features", policy, redis_url=redis_server.url)

    async def scenario() -> list[Any]:
        await trip(guard, upstream, 1)
        await asyncio.sleep(2.05)
        upstream.delay_s = 0.3
        async with client() as http:
            return await asyncio.gather(
                *(guard.call(get, http, upstream.url) for _ in range(50)),
                return_exceptions=True,
            )

    results = asyncio.run(scenario())
    assert sum(isinstance(r, httpx.Response) for r in results) == 2
    assert sum(isinstance(r, BreakerOpen) for r in results) == 48
    assert redis_server.client().get("mlsidecar:breaker:features:pybreaker:state") == b"closed"
