"""How a batch reaches the agent, written once for the thread and the asyncio sender.

``Delivery.deliver`` is a generator that *asks* for I/O (``Send``, ``Sleep``) and is
told the result, so the same retry / split / breaker rules drive both clients:

    plan = delivery.deliver(PREDICTIONS, batch)
    op = next(plan); op = plan.send(do(op)) ...            # until StopIteration
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import uuid
from collections import Counter
from collections.abc import Generator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
import pybreaker

from agent.client._batches import OUTCOMES, PREDICTIONS, rows_of, split

log = logging.getLogger("agent.client")

# Retried with the same batch_id; everything else is final (docs/ingest.md, "what to retry").
RETRIED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# The agent is down or overwhelmed: these count against the circuit breaker. A rejection
# (INVALID_ARGUMENT, UNAUTHENTICATED...) means the agent is up and answering.
BREAKER_FAILURES = RETRIED | {grpc.StatusCode.DEADLINE_EXCEEDED}


@dataclass(frozen=True)
class Send:
    """Op: submit ``batch`` (``kind`` is PREDICTIONS or OUTCOMES); answered with an ack or Failure."""

    kind: str
    batch: Any


@dataclass(frozen=True)
class Sleep:
    """Op: wait ``seconds`` (cut short when the client is closing)."""

    seconds: float


@dataclass(frozen=True)
class Failure:
    """The gRPC status of a failed submit."""

    code: grpc.StatusCode
    details: str


class AgentFailure(Exception):
    """A failed submit, as told to pybreaker (which counts exceptions)."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(f"{failure.code.name}: {failure.details}")
        self.failure = failure


@dataclass(frozen=True)
class ClientStats:
    """What the client did so far: ``client.stats()``.

    stats = client.stats()
    stats.sent_predictions, stats.dropped.get("buffer_full", 0), stats.breaker_state
    """

    sent_predictions: int
    sent_outcomes: int
    sent_batches: int
    duplicate_batches: int
    dropped: dict[str, int]
    retries: int
    splits: int
    sampled_out: int
    breaker_state: str
    buffered: int
    last_errors: dict[str, str] = field(default_factory=dict)

    @property
    def sent(self) -> int:
        """Rows the agent acknowledged: predictions and outcomes."""
        return self.sent_predictions + self.sent_outcomes

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


class Counters:
    """Mutable tallies behind ``ClientStats``; ``drop`` may be called from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent = {PREDICTIONS: 0, OUTCOMES: 0}
        self.sent_batches = 0
        self.duplicate_batches = 0
        self.retries = 0
        self.splits = 0
        self.sampled_out = 0
        self.dropped: Counter[str] = Counter()
        self.last_errors: dict[str, str] = {}

    def count_sampled_out(self, rows: int) -> None:
        with self._lock:
            self.sampled_out += rows

    def drop(self, rows: int, reason: str, detail: str = "") -> None:
        with self._lock:
            first = reason not in self.dropped
            self.dropped[reason] += rows
            if detail:
                self.last_errors[reason] = detail
        if first:  # one log line per reason, not one per event
            log.warning(
                "mlsidecar client: dropping events (%s)%s; counted in stats().dropped",
                reason,
                f": {detail}" if detail else "",
            )


class _LogStateChanges(pybreaker.CircuitBreakerListener):
    def __init__(self, target: str) -> None:
        self.target = target

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        old = old_state.name if old_state is not None else "none"
        level = logging.INFO if new_state.name == pybreaker.STATE_CLOSED else logging.WARNING
        log.log(
            level,
            "mlsidecar client: circuit breaker for %s %s -> %s",
            self.target,
            old,
            new_state.name,
        )


def _raise(error: BaseException | None) -> None:
    if error is not None:
        raise error


def _is_size_limit(failure: Failure) -> bool:
    """The agent's "split the batch" rejections and gRPC's own message-size refusal."""
    if failure.code == grpc.StatusCode.INVALID_ARGUMENT:
        return "split the batch" in failure.details
    if failure.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return "larger than max" in failure.details
    return False


class Delivery:
    """Retries, splits, breaker and counting for one client (see module docstring)."""

    def __init__(
        self,
        *,
        target: str,
        counters: Counters,
        sample_rate: float,
        max_retries: int,
        backoff_s: float,
        max_backoff_s: float,
        breaker_fail_max: int,
        breaker_reset_s: float,
        max_message_bytes: int,
        max_rows_per_batch: int,
    ) -> None:
        self.counters = counters
        self.sample_rate = sample_rate
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_message_bytes = max_message_bytes
        self.max_rows_per_batch = max_rows_per_batch
        # Set when close() runs out of time: pending batches are dropped, not awaited.
        self.abandon = False
        self.storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        self.breaker = pybreaker.CircuitBreaker(
            fail_max=breaker_fail_max,
            reset_timeout=breaker_reset_s,
            exclude=[lambda error: not isinstance(error, AgentFailure)],
            listeners=[_LogStateChanges(target)],
            state_storage=self.storage,
            name=f"mlsidecar-client:{target}",
        )

    @property
    def breaker_state(self) -> str:
        return str(self.breaker.current_state)

    def breaker_wait_s(self) -> float:
        """Seconds until the open breaker lets a trial call through (0: send now)."""
        if self.breaker.current_state != pybreaker.STATE_OPEN:
            return 0.0
        opened_at = self.storage.opened_at
        if opened_at is None:
            return 0.0
        elapsed = (datetime.now(UTC) - opened_at).total_seconds()
        return max(0.0, self.breaker.reset_timeout - elapsed)

    def _record(self, failure: Failure | None) -> None:
        # pybreaker's call() runs the state machine (open -> half-open after the reset
        # timeout, trial call, close or re-open, listeners); the I/O itself happened
        # outside it, so its lock is held for microseconds, never across a network call.
        error = AgentFailure(failure) if failure is not None else None
        with contextlib.suppress(AgentFailure, pybreaker.CircuitBreakerError):
            self.breaker.call(_raise, error)

    def _backoff(self, attempt: int) -> float:
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        return delay * random.uniform(0.5, 1.0)  # jitter: replicas do not retry in step

    def deliver(self, kind: str, batch: Any) -> Generator[Send | Sleep, Any, None]:
        """Send ``batch`` until acknowledged, dropped (counted) or abandoned."""
        if not batch.batch_id:
            batch.batch_id = uuid.uuid4().hex
        if kind == PREDICTIONS and self.sample_rate < 1.0:
            batch.sample_rate = self.sample_rate
        stack: list[tuple[Any, int]] = [(batch, 0)]
        while stack:
            batch, attempts = stack.pop()
            rows = rows_of(batch)
            if rows > 1 and (
                rows > self.max_rows_per_batch or batch.ByteSize() > self.max_message_bytes
            ):
                stack.extend(self._halves(batch, attempts))
                continue
            while not self.abandon and (wait := self.breaker_wait_s()) > 0:
                yield Sleep(wait)
            if self.abandon:
                self.counters.drop(rows, "closed", "the client closed before the agent took them")
                continue
            answer = yield Send(kind, batch)
            if not isinstance(answer, Failure):
                self._record(None)
                with self.counters._lock:
                    self.counters.sent[kind] += rows
                    self.counters.sent_batches += 1
                    self.counters.duplicate_batches += bool(answer.duplicate)
                continue
            size_limit = _is_size_limit(answer)
            counts = answer.code in BREAKER_FAILURES and not size_limit
            self._record(answer if counts else None)
            if size_limit:
                if rows > 1:
                    stack.extend(self._halves(batch, attempts))
                else:
                    self.counters.drop(rows, "too_large", answer.details)
            elif answer.code in RETRIED and attempts < self.max_retries:
                self.counters.retries += 1
                yield Sleep(self._backoff(attempts + 1))
                stack.append((batch, attempts + 1))  # the same batch_id: counted once
            else:
                self.counters.drop(rows, answer.code.name.lower(), answer.details)

    def _halves(self, batch: Any, attempts: int) -> list[tuple[Any, int]]:
        first, second = split(batch)
        # Derived ids: a retried half is still recognised as the same half.
        first.batch_id, second.batch_id = f"{batch.batch_id}.0", f"{batch.batch_id}.1"
        self.counters.splits += 1
        return [(second, attempts), (first, attempts)]  # a stack: the first half goes first
