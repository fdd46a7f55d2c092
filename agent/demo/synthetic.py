"""Raw synthetic load straight to the agent's gRPC ingest (no model service, no SDK).

For tests and benchmarks that want many rows quickly: columnar prediction batches and,
a few batches later, the outcomes of a share of them. ``mlsidecar demo`` uses the model
service and the SDK instead (traffic.py).

    traffic = SyntheticTraffic("127.0.0.1:4320", rate=500)
    await traffic.run(stop_event)          # until stop_event is set
    traffic.sent_predictions, traffic.sent_outcomes
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque

import grpc
import numpy as np

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb
from agent._proto.mlsidecar.v1 import ingest_pb2_grpc as pb_grpc
from agent.demo.world import MODEL, VERSION

log = logging.getLogger(__name__)

REGIONS = np.array(["eu", "us", "apac"])
MERCHANTS = np.array(["grocery", "travel", "electronics", "fuel", "online"])
# Outcomes (chargebacks) arrive this many batches after their predictions.
OUTCOME_DELAY_BATCHES = 10


class SyntheticTraffic:
    """Sends ``rate`` predictions per second in batches of ``batch_rows`` until stopped."""

    def __init__(
        self,
        target: str,
        *,
        rate: float = 500.0,
        batch_rows: int = 100,
        outcome_share: float = 0.5,
        seed: int = 7,
    ) -> None:
        if rate <= 0 or batch_rows <= 0:
            raise ValueError("rate and batch_rows must be positive")
        self.target = target
        self.rate = rate
        self.batch_rows = batch_rows
        self.outcome_share = outcome_share
        self.sent_predictions = 0
        self.sent_outcomes = 0
        self.failed_batches = 0
        self._rng = np.random.default_rng(seed)
        self._pending: deque[pb.OutcomeBatch] = deque()

    def _prediction_batch(self) -> tuple[pb.PredictionBatch, pb.OutcomeBatch]:
        n, rng = self.batch_rows, self._rng
        amount = rng.lognormal(3.5, 1.0, n)
        account_age_days = rng.gamma(2.0, 200.0, n)
        # A few missing values, as real feature pipelines have.
        account_age_days[rng.random(n) < 0.01] = np.nan
        hour = rng.integers(0, 24, n).astype(float)
        merchant = rng.choice(MERCHANTS, n)
        logit = -3.0 + 0.02 * (amount - 30) - 0.002 * np.nan_to_num(account_age_days, nan=100)
        logit += np.where(merchant == "online", 1.0, 0.0)
        score = 1.0 / (1.0 + np.exp(-logit))
        fraud = rng.random(n) < score
        ids = [uuid.uuid4().hex for _ in range(n)]
        region = str(rng.choice(REGIONS))
        batch = pb.PredictionBatch(
            model=MODEL,
            model_version=VERSION,
            ids=ids,
            features=[
                pb.Column(name="amount", numbers=pb.NumberValues(values=amount)),
                pb.Column(
                    name="account_age_days", numbers=pb.NumberValues(values=account_age_days)
                ),
                pb.Column(name="hour", numbers=pb.NumberValues(values=hour)),
                pb.Column(name="merchant", categories=pb.CategoryValues(values=merchant.tolist())),
            ],
            scores=score,
            labels=np.where(score >= 0.5, "fraud", "legit").tolist(),
            latencies_ms=rng.gamma(4.0, 3.0, n),
            attributes={"region": region},
            batch_id=uuid.uuid4().hex,
        )
        keep = rng.random(n) < self.outcome_share
        outcomes = pb.OutcomeBatch(
            model=MODEL,
            model_version=VERSION,
            ids=[i for i, k in zip(ids, keep, strict=True) if k],
            actual_labels=np.where(fraud[keep], "fraud", "legit").tolist(),
            batch_id=uuid.uuid4().hex,
        )
        return batch, outcomes

    async def run(self, stop: asyncio.Event) -> None:
        interval = self.batch_rows / self.rate
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = pb_grpc.IngestStub(channel)
            next_at = time.monotonic()
            while not stop.is_set():
                batch, outcomes = self._prediction_batch()
                try:
                    ack = await stub.SubmitPredictions(batch, timeout=5)
                    self.sent_predictions += ack.accepted
                    self._pending.append(outcomes)
                    if len(self._pending) > OUTCOME_DELAY_BATCHES:
                        ack = await stub.SubmitOutcomes(self._pending.popleft(), timeout=5)
                        self.sent_outcomes += ack.accepted
                except grpc.aio.AioRpcError as error:
                    self.failed_batches += 1
                    log.warning("demo traffic: batch failed: %s %s", error.code(), error.details())
                next_at += interval
                delay = next_at - time.monotonic()
                if delay < 0:  # fell behind: do not burst to catch up
                    next_at, delay = time.monotonic(), 0
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
