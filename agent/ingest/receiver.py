"""The receiver core shared by gRPC and HTTP ingest: validate, de-duplicate, hand to the engine.

receiver = EventReceiver(engine, limits, meter=meter_provider.get_meter("mlsidecar"),
                         tracer=tracer_provider.get_tracer("mlsidecar"), clock=time.time_ns)
receiver.admit(len(raw), "SubmitPredictions")
ack = receiver.accept_predictions(pb.PredictionBatch.FromString(raw), method="SubmitPredictions")
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from opentelemetry import trace
from opentelemetry.metrics import Meter
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, Tracer

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb
from agent.engine import Engine, ModelLimitError, PredictionColumns
from agent.ingest.decode import (
    Limits,
    RejectCode,
    Rejected,
    check_size,
    decode_outcomes,
    decode_predictions,
)
from agent.ingest.join import OutcomeJoiner
from agent.store import JoinedPredictions, StoreError, StoreFullError

# Span links per span: enough to reach a few examples, not one per row.
MAX_SPAN_LINKS = 8
JOIN_SPAN = "mlsidecar.join outcomes"
# kind, model, model version, batch_id
DedupKey = tuple[str, str, str, str]


@dataclass(frozen=True, slots=True)
class Ack:
    accepted: int
    duplicate: bool = False


class BatchDeduplicator:
    """Remembers recently accepted batch ids for ``window_ns``, at most ``max_batches`` of them.

    A re-sent batch (same kind, model, version and batch_id) is acknowledged again but not
    counted twice. The id is an idempotency key: it is checked before the batch is decoded.
    """

    def __init__(self, window_ns: int, max_batches: int, clock: Callable[[], int]) -> None:
        self._window_ns = window_ns
        self._max = max_batches
        self._clock = clock
        self._seen: OrderedDict[DedupKey, tuple[int, int]] = OrderedDict()

    def seen(self, key: DedupKey) -> int | None:
        """Rows acknowledged for ``key`` if it was accepted within the window."""
        if not key[-1] or self._max == 0:
            return None
        self._expire()
        hit = self._seen.get(key)
        return None if hit is None else hit[1]

    def remember(self, key: DedupKey, rows: int) -> None:
        if not key[-1] or self._max == 0:
            return
        self._seen[key] = (self._clock(), rows)
        self._seen.move_to_end(key)
        while len(self._seen) > self._max:
            self._seen.popitem(last=False)

    def _expire(self) -> None:
        horizon = self._clock() - self._window_ns
        seen = self._seen
        while seen:
            _, (at, _) = next(iter(seen.items()))
            if at >= horizon:
                break
            seen.popitem(last=False)


class EventReceiver:
    """Turns wire batches into engine observations; one span and a few counters per batch."""

    def __init__(
        self,
        engine: Engine,
        limits: Limits,
        *,
        meter: Meter,
        tracer: Tracer,
        clock: Callable[[], int],
        dedup_window_s: float = 600.0,
        dedup_max_batches: int = 100_000,
        joiner: OutcomeJoiner | None = None,
    ) -> None:
        self._joiner = joiner
        self._engine = engine
        self._limits = limits
        self._tracer = tracer
        self._clock = clock
        self._dedup = BatchDeduplicator(int(dedup_window_s * 1e9), dedup_max_batches, clock)
        self._in_flight: dict[DedupKey, asyncio.Future[None]] = {}
        self.draining = False
        self._batches = meter.create_counter(
            "mlsidecar.ingest.batches",
            unit="{batch}",
            description="Batches received, by RPC method and result (accepted, duplicate, rejected).",
        )
        self._rows = meter.create_counter(
            "mlsidecar.ingest.rows",
            unit="{row}",
            description="Rows accepted, by kind (prediction, outcome).",
        )
        self._duration = meter.create_histogram(
            "mlsidecar.ingest.duration",
            unit="s",
            description="Time to validate and process one batch.",
            explicit_bucket_boundaries_advisory=[
                0.0001,
                0.00025,
                0.0005,
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.5,
                1.0,
            ],
        )

    @property
    def max_message_bytes(self) -> int:
        return self._limits.max_message_bytes

    def admit(self, size: int, method: str) -> None:
        """Refuse a message before parsing it: while draining, or when it is too large."""
        try:
            if self.draining:
                raise Rejected(
                    "shutting_down",
                    "the agent is shutting down; retry on another replica or later",
                    RejectCode.UNAVAILABLE,
                )
            check_size(size, self._limits)
        except Rejected as error:
            self.reject(method, error)
            raise

    async def accept_predictions(self, batch: pb.PredictionBatch, *, method: str) -> Ack:
        return await self._accept("prediction", batch, method)

    async def accept_outcomes(self, batch: pb.OutcomeBatch, *, method: str) -> Ack:
        return await self._accept("outcome", batch, method)

    def reject(self, method: str, error: Rejected) -> None:
        """Count a rejection decided outside ``_accept`` (e.g. an unparsable message)."""
        self._batches.add(
            1, {"rpc.method": method, "mlsidecar.result": "rejected", "error.type": error.reason}
        )

    async def _accept(
        self, kind: str, batch: pb.PredictionBatch | pb.OutcomeBatch, method: str
    ) -> Ack:
        started = time.perf_counter()
        if method.startswith("http:"):
            # FastAPI's instrumentation already made the HTTP SERVER span; this one is inside it.
            name, span_kind = f"mlsidecar.ingest {kind}s", SpanKind.INTERNAL
            attributes = {"mlsidecar.ingest.path": method.removeprefix("http:")}
        else:
            name, span_kind = f"mlsidecar.v1.Ingest/{method}", SpanKind.SERVER
            attributes = {
                "rpc.system": "grpc",
                "rpc.service": "mlsidecar.v1.Ingest",
                "rpc.method": method,
            }
        attributes["ml.model.name"] = batch.model
        attributes["ml.model.version"] = batch.model_version
        with self._tracer.start_as_current_span(
            name,
            kind=span_kind,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                ack, links = await self._process(kind, batch)
            except Rejected as error:
                span.set_status(Status(StatusCode.ERROR, error.message))
                span.set_attribute("error.type", error.reason)
                self.reject(method, error)
                raise
            span.set_attribute("mlsidecar.batch.rows", ack.accepted)
            if ack.duplicate:
                span.set_attribute("mlsidecar.batch.duplicate", True)
            for link in links:
                span.add_link(link.context, link.attributes)
        result = "duplicate" if ack.duplicate else "accepted"
        self._batches.add(1, {"rpc.method": method, "mlsidecar.result": result})
        if not ack.duplicate:
            self._rows.add(ack.accepted, {"mlsidecar.kind": kind})
        self._duration.record(time.perf_counter() - started, {"rpc.method": method})
        return ack

    async def _process(
        self, kind: str, batch: pb.PredictionBatch | pb.OutcomeBatch
    ) -> tuple[Ack, list[trace.Link]]:
        """The ack, and the batch span's links to the model requests of its predictions
        (those it carried, or those its outcomes joined; none for duplicates).

        A prediction batch is in the pending store before it is counted or acknowledged,
        and its batch_id is remembered only then: a batch whose store write failed is
        retried in full, not acknowledged as a duplicate.
        """
        key = (kind, batch.model, batch.model_version, batch.batch_id)
        rows = self._dedup.seen(key)
        if rows is not None:
            return Ack(rows, duplicate=True), []
        if batch.batch_id:
            # A retry that arrives while the first copy is still being stored waits for it.
            while (first := self._in_flight.get(key)) is not None:
                await asyncio.shield(first)
                rows = self._dedup.seen(key)
                if rows is not None:
                    return Ack(rows, duplicate=True), []
            done = self._in_flight[key] = asyncio.get_running_loop().create_future()
            try:
                return await self._process_new(kind, batch, key)
            finally:
                del self._in_flight[key]
                done.set_result(None)
        return await self._process_new(kind, batch, key)

    async def _process_new(
        self, kind: str, batch: pb.PredictionBatch | pb.OutcomeBatch, key: DedupKey
    ) -> tuple[Ack, list[trace.Link]]:
        now = self._clock()
        links: list[trace.Link] = []
        joiner = self._joiner
        try:
            if isinstance(batch, pb.PredictionBatch):
                cols = decode_predictions(batch, self._limits, received_unix_nano=now)
                if joiner is not None:
                    await joiner.keep_pending(cols)
                self._engine.observe_predictions(cols)
                if joiner is not None:
                    await self._join_late_outcomes(joiner, cols)
                if cols.trace_ids and cols.span_ids:
                    carried = zip(cols.ids, cols.trace_ids, cols.span_ids, strict=True)
                    links = prediction_links(carried)
                rows = cols.rows
            else:
                outcomes = decode_outcomes(batch, self._limits, received_unix_nano=now)
                # Counted after the join: a batch the store refuses (UNAVAILABLE) comes back.
                self._engine.admit_outcomes(outcomes)
                if joiner is not None:
                    joined = await joiner.join(outcomes)
                    links = prediction_links(traced_predictions(joined))
                self._engine.observe_outcomes(outcomes)
                rows = outcomes.rows
        except ModelLimitError as error:
            raise Rejected("too_many_models", str(error)) from None
        except StoreFullError as error:
            raise Rejected(
                "store_full",
                f"the pending-prediction store is full ({error}); retry later",
                RejectCode.BUSY,
            ) from None
        except StoreError as error:
            raise Rejected(
                "store_unavailable",
                f"the pending-prediction store failed: {error}",
                RejectCode.UNAVAILABLE,
            ) from None
        self._dedup.remember(key, rows)
        return Ack(rows), links

    async def _join_late_outcomes(self, joiner: OutcomeJoiner, cols: PredictionColumns) -> None:
        """Join the outcomes that were waiting for ``cols``; their own spans have ended, so a
        short INTERNAL join span (under this batch's span) links to those predictions."""
        started = time.time_ns()
        late = await joiner.release_held(cols)
        if late is None:
            return
        span = self._tracer.start_span(
            JOIN_SPAN,
            kind=SpanKind.INTERNAL,
            attributes={
                "ml.model.name": cols.model,
                "ml.model.version": cols.version,
                "mlsidecar.join.rows": late.joined,
            },
            links=prediction_links(traced_predictions(late)),
            start_time=started,
        )
        span.end()


def prediction_links(predictions: Iterable[tuple[str, bytes, bytes]]) -> list[trace.Link]:
    """Span links to the model requests of a few predictions, given as (prediction id,
    trace id, span id): at most MAX_SPAN_LINKS, one per distinct trace. A prediction
    without a (non-zero) trace or span id gets no link.

    >>> links = prediction_links([("p1", bytes(range(1, 17)), bytes(range(1, 9)))])
    >>> links[0].attributes
    {'ml.link': 'prediction', 'ml.prediction.id': 'p1'}
    """
    links: list[trace.Link] = []
    seen: set[bytes] = set()
    for prediction_id, trace_id, span_id in predictions:
        if len(links) >= MAX_SPAN_LINKS:
            break
        if len(trace_id) != 16 or len(span_id) != 8 or trace_id in seen:
            continue
        context = SpanContext(
            int.from_bytes(trace_id, "big"),
            int.from_bytes(span_id, "big"),
            is_remote=True,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )
        if not context.is_valid:  # all-zero ids mean "none"
            continue
        seen.add(trace_id)
        links.append(
            trace.Link(context, {"ml.link": "prediction", "ml.prediction.id": prediction_id})
        )
    return links


def traced_predictions(joined: JoinedPredictions) -> Iterator[tuple[str, bytes, bytes]]:
    """(prediction id, trace id, span id) of the joined predictions that recorded both ids,
    lazily: the links need only the first few."""
    traced = joined.found & joined.trace_ids.any(axis=1) & joined.span_ids.any(axis=1)
    for row in np.flatnonzero(traced).tolist():
        yield joined.ids[row], joined.trace_id(row), joined.span_id(row)
