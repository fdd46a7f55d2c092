"""The demo's traffic generator: card transactions to the model service, a story in phases.

    traffic = Traffic("http://127.0.0.1:8080", sidecar="127.0.0.1:4320", speed=10, seed=7,
                      feature_store="http://127.0.0.1:8090")
    await traffic.run(stop_event, duration=30)   # traffic.phase, traffic.sent_predictions

It POSTs batches of transactions to ``/predict`` and, after a delay, sends their outcomes
(was it fraud?) to the agent through the SDK, as a chargeback system would. Phases are in
story seconds; ``speed`` compresses them (speed 10: the 300 s story takes 30 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from agent.demo.world import MODEL, VERSION, World

if TYPE_CHECKING:
    from agent.client import SidecarClient

log = logging.getLogger(__name__)
MAX_IN_FLIGHT = 8


@dataclass(frozen=True, slots=True)
class Phase:
    """One chapter of the story; ``seconds`` at speed 1."""

    name: str
    seconds: float
    description: str
    drifted: bool = False
    fraud_ring: bool = False
    store_failing: bool = False
    outcome_delay_s: float = 10.0


PHASES: tuple[Phase, ...] = (
    Phase("healthy", 60, "healthy traffic; the agent learns its reference from it"),
    Phase("drift", 60, "transaction amounts drift up (a new market): amount PSI rises", True),
    Phase(
        "late-outcomes",
        60,
        "chargebacks arrive late (30 s) and a fraud ring fools the model: accuracy drops",
        drifted=True,
        fraud_ring=True,
        outcome_delay_s=30.0,
    ),
    Phase(
        "upstream-failing",
        60,
        "the feature store fails: the proxy's breaker opens, the model falls back",
        drifted=True,
        fraud_ring=True,
        store_failing=True,
        outcome_delay_s=30.0,
    ),
    Phase("recovery", 60, "all back to normal: drift gone, store up, breaker closes"),
)
STORY_S = sum(p.seconds for p in PHASES)


def phase_at(story_s: float) -> tuple[int, Phase]:
    """The phase (index, phase) at ``story_s`` story seconds; the last one lasts forever."""
    end = 0.0
    for i, phase in enumerate(PHASES):
        end += phase.seconds
        if story_s < end:
            return i, phase
    return len(PHASES) - 1, PHASES[-1]


def rows_per_request(rows_per_s: float) -> int:
    """20 rows a request, more above 2,000 rows/s: at most ~100 requests/s over HTTP."""
    return max(20, math.ceil(rows_per_s / 100))


class Traffic:
    """Sends ``rate * speed`` transactions per second until stopped or ``duration`` passes."""

    def __init__(
        self,
        target: str,
        *,
        sidecar: str | None = "127.0.0.1:4320",
        speed: float = 1.0,
        seed: int = 7,
        rate: float = 50.0,
        outcome_share: float = 0.5,
        feature_store: str | None = None,
        sidecar_token: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not speed > 0 or not math.isfinite(speed):
            raise ValueError(f"speed: must be a positive number, got {speed}")
        if not rate > 0 or not math.isfinite(rate):
            raise ValueError(f"rate: must be a positive number, got {rate}")
        if not 0 <= outcome_share <= 1:
            raise ValueError(f"outcome_share: must be in [0, 1], got {outcome_share}")
        self.target = target.rstrip("/")
        self.sidecar = sidecar
        self._sidecar_token = sidecar_token
        self.speed = speed
        self.rows_per_s = rate * speed
        self.batch_rows = rows_per_request(self.rows_per_s)
        self.outcome_share = outcome_share
        self.feature_store = None if feature_store is None else feature_store.rstrip("/")
        self._clock = clock
        self._world = World(seed)
        self._started: float | None = None
        self._store_failing = False
        # (due time, ids, actual labels): chargebacks waiting for their delay to pass.
        self._pending: deque[tuple[float, list[str], list[str]]] = deque()
        self.client: SidecarClient | None = None
        self.sent_predictions = 0
        self.sent_outcomes = 0
        self.failed_requests = 0
        self.fallback_requests = 0
        self.phase_index, self.phase = 0, PHASES[0]

    @property
    def story_s(self) -> float:
        """Story seconds elapsed (wall seconds * speed)."""
        return 0.0 if self._started is None else (self._clock() - self._started) * self.speed

    @property
    def progress(self) -> float:
        return min(1.0, self.story_s / STORY_S)

    async def _set_store_failing(self, http: httpx.AsyncClient, failing: bool) -> None:
        if self.feature_store is None or failing == self._store_failing:
            return
        try:
            response = await http.put(
                f"{self.feature_store}/admin/failing", json={"failing": failing}
            )
            response.raise_for_status()
            self._store_failing = failing
        except httpx.HTTPError as error:
            log.warning("demo traffic: cannot switch the feature store's outage: %s", error)

    async def _predict(
        self, http: httpx.AsyncClient, phase: Phase, gate: asyncio.Semaphore
    ) -> None:
        async with gate:
            n = self.batch_rows
            columns = self._world.transactions(n, drifted=phase.drifted)
            truth = self._world.truth(columns, fraud_ring=phase.fraud_ring)
            ids = [f"tx-{uuid.uuid4().hex[:20]}" for _ in range(n)]
            instances = [
                {
                    "id": ids[i],
                    "amount": float(columns["amount"][i]),
                    "hour": int(columns["hour"][i]),
                    "merchant": str(columns["merchant"][i]),
                    "user_id": int(columns["user_id"][i]),
                }
                for i in range(n)
            ]
            try:
                response = await http.post(f"{self.target}/predict", json={"instances": instances})
                response.raise_for_status()
                body = response.json()
            except (httpx.HTTPError, ValueError) as error:
                self.failed_requests += 1
                if self.failed_requests in (1, 10, 100, 1000):
                    log.warning(
                        "demo traffic: /predict failed (%d so far): %s", self.failed_requests, error
                    )
                return
            self.sent_predictions += n
            if body.get("features_source") == "fallback":
                self.fallback_requests += 1
            keep = np.flatnonzero(self._world.rng.random(n) < self.outcome_share)
            if len(keep):
                due = self._clock() + phase.outcome_delay_s / self.speed
                labels = np.where(truth[keep], "fraud", "legit").tolist()
                self._pending.append((due, [ids[i] for i in keep], labels))

    def _send_due_outcomes(self, *, everything: bool = False) -> None:
        now = self._clock()
        # Delays differ by phase, so the queue is not in due order: scan it.
        still: deque[tuple[float, list[str], list[str]]] = deque()
        for due, ids, labels in self._pending:
            if not everything and due > now:
                still.append((due, ids, labels))
                continue
            if self.client is not None:
                for id_, label in zip(ids, labels, strict=True):
                    self.client.log_outcome(id_, label=label)
                self.sent_outcomes += len(ids)
        self._pending = still

    async def run(self, stop: asyncio.Event, duration: float | None = None) -> None:
        """Until ``stop`` is set or ``duration`` wall seconds pass; the outage is undone."""
        if self.sidecar is not None:
            from agent.client import SidecarClient

            self.client = SidecarClient(
                self.sidecar, model=MODEL, model_version=VERSION, token=self._sidecar_token
            )
        self._started = self._clock()
        interval = self.batch_rows / self.rows_per_s
        gate = asyncio.Semaphore(MAX_IN_FLIGHT)
        tasks: set[asyncio.Task[None]] = set()
        async with httpx.AsyncClient(timeout=10.0, trust_env=False) as http:
            try:
                next_at = self._clock()
                while not stop.is_set():
                    if duration is not None and self._clock() - self._started >= duration:
                        break
                    self.phase_index, self.phase = phase_at(self.story_s)
                    await self._set_store_failing(http, self.phase.store_failing)
                    if not gate.locked():  # behind (model slow): skip rather than pile up
                        task = asyncio.create_task(self._predict(http, self.phase, gate))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                    self._send_due_outcomes()
                    next_at += interval
                    delay = next_at - self._clock()
                    if delay < 0:  # fell behind: do not burst to catch up
                        next_at, delay = self._clock(), 0
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
            finally:
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
                await self._set_store_failing(http, False)
                if self.client is not None:
                    client = self.client
                    await asyncio.to_thread(client.flush, 5.0)
                    await asyncio.to_thread(client.close)

    def status(self) -> dict[str, Any]:
        return {
            "phase": self.phase.name,
            "phase_index": self.phase_index,
            "story_s": self.story_s,
            "progress": self.progress,
            "sent_predictions": self.sent_predictions,
            "sent_outcomes": self.sent_outcomes,
            "failed_requests": self.failed_requests,
        }
