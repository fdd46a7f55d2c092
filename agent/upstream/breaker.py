"""An asyncio circuit breaker on pybreaker's state machine, without its call-wide lock.

pybreaker's ``CircuitBreaker.call`` holds one lock across the guarded call, so every
caller waits for the one before it; its async support is Tornado-only; it trips on
consecutive failures only; and its ``CircuitRedisStorage`` blocks. ``AsyncBreaker``
keeps pybreaker's states, listeners and ``CircuitBreakerStorage`` (the transitions are
pybreaker's own ``open()``, ``half_open()``, ``close()``, so listeners see the same
``state_change`` calls), decides admission under a short lock that never spans the
guarded call, adds a failure-rate rule and a half-open probe budget, and runs blocking
storage (Redis) in a worker thread:

    breaker = AsyncBreaker(pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30, name="features"))
    result = await breaker.call(fetch_features, user_id)   # raises BreakerOpen when open

Synchronous code uses the wrapped ``breaker.breaker`` (a plain pybreaker breaker) as is.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import pybreaker

T = TypeVar("T")

STATE_CODES = {pybreaker.STATE_CLOSED: 0, pybreaker.STATE_HALF_OPEN: 1, pybreaker.STATE_OPEN: 2}


class BreakerOpen(Exception):
    """The breaker refused the call: it is open, or half-open with its probes all taken."""

    def __init__(self, name: str, state: str, retry_after_s: float) -> None:
        super().__init__(f"circuit breaker {name!r} is {state}; retry after {retry_after_s:.1f} s")
        self.name = name
        self.state = state
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class FailureRate:
    """Trip when at least ``min_requests`` calls ended in the last ``window_s`` seconds and
    ``rate`` or more of them failed (the consecutive-failures rule still applies)."""

    rate: float
    min_requests: int
    window_s: float

    def __post_init__(self) -> None:
        if not 0 < self.rate <= 1:
            raise ValueError(f"rate must be in (0, 1], got {self.rate}")
        if self.min_requests < 1:
            raise ValueError(f"min_requests must be >= 1, got {self.min_requests}")
        if self.window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {self.window_s}")


@dataclass(frozen=True)
class Ticket:
    """One admitted call; ``probe`` calls count against the half-open budget."""

    probe: bool


class AsyncBreaker:
    """pybreaker's breaker for asyncio callers: many calls in flight at once, exactly
    ``half_open_requests`` probes in flight while half-open.

        ticket = await breaker.admit()          # raises BreakerOpen
        try:
            response = await send()
        except Exception as error:
            await breaker.failed(ticket, error)
            raise
        await breaker.succeeded(ticket)
    """

    def __init__(
        self,
        breaker: pybreaker.CircuitBreaker,
        *,
        half_open_requests: int = 1,
        failure_rate: FailureRate | None = None,
        blocking_storage: bool | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if half_open_requests < 1:
            raise ValueError(f"half_open_requests must be >= 1, got {half_open_requests}")
        self.breaker = breaker
        self.name = breaker.name or "unnamed"
        self.half_open_requests = half_open_requests
        self.failure_rate = failure_rate
        storage = breaker._state_storage
        # Memory storage is plain attribute access; anything else (Redis) goes to a thread.
        self.blocking_storage = (
            not isinstance(storage, pybreaker.CircuitMemoryStorage)
            if blocking_storage is None
            else blocking_storage
        )
        self._monotonic = monotonic
        # Decisions only (read state, maybe transition); never held across a guarded call.
        self._decide = asyncio.Lock()
        self._probes_in_flight = 0
        self._outcomes: deque[tuple[float, bool]] = deque()
        self._failures_in_window = 0
        # Last state seen, for gauges and listings that must not do I/O.
        self.last_state: str = breaker._state.name

    @property
    def storage(self) -> pybreaker.CircuitBreakerStorage:
        return self.breaker._state_storage

    async def _run(self, fn: Callable[[], T]) -> T:
        if self.blocking_storage:
            return await asyncio.to_thread(fn)
        return fn()

    def _current_state(self) -> str:
        # pybreaker's `state` notices a change made elsewhere (another replica) and tells
        # the listeners, as pybreaker does.
        name = self.breaker.state.name
        self.last_state = name
        return name

    def _retry_after_s(self) -> float:
        opened_at = self.storage.opened_at
        if opened_at is None:
            return self.breaker.reset_timeout
        elapsed = (datetime.now(UTC) - opened_at).total_seconds()
        return max(self.breaker.reset_timeout - elapsed, 0.0)

    def _admit_sync(self) -> tuple[Ticket | None, str, float]:
        state = self._current_state()
        if state == pybreaker.STATE_OPEN:
            retry_after = self._retry_after_s()
            if retry_after > 0:
                return None, state, retry_after
            self.breaker.half_open()
            self._probes_in_flight = 0
            state = self._current_state()
        if state == pybreaker.STATE_HALF_OPEN:
            if self._probes_in_flight >= self.half_open_requests:
                return None, state, min(self.breaker.reset_timeout, 1.0)
            self._probes_in_flight += 1
            return Ticket(probe=True), state, 0.0
        return Ticket(probe=False), state, 0.0

    async def admit(self) -> Ticket:
        """A ticket for one call, or ``BreakerOpen`` with how long to wait."""
        async with self._decide:
            ticket, state, retry_after = await self._run(self._admit_sync)
        if ticket is None:
            raise BreakerOpen(self.name, state, retry_after)
        return ticket

    def _record(self, ok: bool) -> bool:
        """Remember an outcome for the failure-rate rule; True when the rate trips."""
        rule = self.failure_rate
        if rule is None:
            return False
        now = self._monotonic()
        self._outcomes.append((now, ok))
        self._failures_in_window += not ok
        while self._outcomes and self._outcomes[0][0] <= now - rule.window_s:
            _, old_ok = self._outcomes.popleft()
            self._failures_in_window -= not old_ok
        total = len(self._outcomes)
        return total >= rule.min_requests and self._failures_in_window >= rule.rate * total

    def _forget_outcomes(self) -> None:
        self._outcomes.clear()
        self._failures_in_window = 0

    def _succeeded_sync(self, ticket: Ticket) -> None:
        storage = self.storage
        storage.reset_counter()
        state = self._current_state()
        if state == pybreaker.STATE_HALF_OPEN and ticket.probe:
            storage.increment_success_counter()
            if storage.success_counter >= self.breaker.success_threshold:
                self.breaker.close()
                self._forget_outcomes()
        elif state == pybreaker.STATE_CLOSED:
            self._record(True)
        for listener in self.breaker.listeners:
            listener.success(self.breaker)
        self._current_state()

    def _failed_sync(self, ticket: Ticket, error: BaseException) -> None:
        self.storage.increment_counter()
        for listener in self.breaker.listeners:
            listener.failure(self.breaker, error)
        state = self._current_state()
        if state == pybreaker.STATE_HALF_OPEN and ticket.probe:
            self.breaker.open()
        elif state == pybreaker.STATE_CLOSED:
            rate_tripped = self._record(False)
            if rate_tripped or self.storage.counter >= self.breaker.fail_max:
                self.breaker.open()
                self._forget_outcomes()
        self._current_state()

    async def succeeded(self, ticket: Ticket) -> None:
        async with self._decide:
            if ticket.probe:
                self._probes_in_flight = max(self._probes_in_flight - 1, 0)
            await self._run(lambda: self._succeeded_sync(ticket))

    async def failed(self, ticket: Ticket, error: BaseException) -> None:
        async with self._decide:
            if ticket.probe:
                self._probes_in_flight = max(self._probes_in_flight - 1, 0)
            await self._run(lambda: self._failed_sync(ticket, error))

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Await ``fn(*args, **kwargs)`` through the breaker; an exception is a failure
        unless pybreaker's ``exclude`` list says it is a business error."""
        ticket = await self.admit()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as error:
            if isinstance(error, Exception) and not self.breaker.is_system_error(error):
                await self.succeeded(ticket)
            elif isinstance(error, asyncio.CancelledError):
                await self.release(ticket)
            else:
                await self.failed(ticket, error)
            raise
        await self.succeeded(ticket)
        return result

    async def release(self, ticket: Ticket) -> None:
        """Give back a ticket whose call neither succeeded nor failed (it was cancelled)."""
        if ticket.probe:
            async with self._decide:
                self._probes_in_flight = max(self._probes_in_flight - 1, 0)

    async def state(self) -> str:
        """The state as the storage holds it (reads Redis off the event loop)."""
        async with self._decide:
            return await self._run(self._current_state)

    async def reset(self) -> None:
        """Close the breaker now (an operator's reset), telling the listeners."""
        async with self._decide:
            await self._run(self._reset_sync)

    def _reset_sync(self) -> None:
        self.breaker.close()
        self._probes_in_flight = 0
        self._forget_outcomes()
        self._current_state()

    async def snapshot(self) -> dict[str, Any]:
        """What ``GET /v1/breakers`` shows for this breaker."""

        def read() -> dict[str, Any]:
            state = self._current_state()
            opened_at = self.storage.opened_at
            return {
                "state": state,
                "consecutive_failures": self.storage.counter,
                "half_open_successes": self.storage.success_counter,
                "opened_at": None if opened_at is None else opened_at.isoformat(),
                "retry_after_s": round(self._retry_after_s(), 3)
                if state == pybreaker.STATE_OPEN
                else 0.0,
                "storage": self.storage.name,
            }

        async with self._decide:
            return await self._run(read)
