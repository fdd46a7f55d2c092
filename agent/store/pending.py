"""Pending predictions: what is kept until an outcome joins it, and how callers reach it.

A prediction that may get an outcome is ``put`` in a durable store (one call per accepted
batch, durable when it returns); an outcome ``take``s it by model + prediction id. Ids not
found are orphans; predictions never taken are counted as unmatched by ``expire``.

    store = AsyncPendingPredictions(GroupCommitPendingPredictions(SqlitePendingPredictions(path)))
    await store.put(PendingBatch.from_columns(prediction_columns))      # before the ack
    joined = await store.take("churn", outcome_columns.ids)             # joined.found: mask
    orphans.hold(outcome_columns, ~joined.found)                        # grace for late predictions

Only model outputs are stored (scores, labels, probabilities, trace context, segment
attributes): never feature values.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import queue
import threading
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from agent.engine.columns import OutcomeColumns, PredictionColumns

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
ByteMatrix = npt.NDArray[np.uint8]
# (model, model version): the unit unmatched and pending counts are reported by.
ModelVersion = tuple[str, str]

T = TypeVar("T")

NO_ATTRIBUTES: Mapping[str, str] = types.MappingProxyType({})


class StoreError(Exception):
    """A pending-store failure; ``path`` names the file (or server) involved."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"pending store {path}: {message}")
        self.path = path


class StoreFullError(StoreError):
    """The disk (or the configured size cap) is full; nothing of the failed call was stored."""


class StoreSchemaError(StoreError):
    """The file's schema version is newer than this build understands, or a migration failed."""


class CorruptStoreError(StoreError):
    """The file is not a pending store, or a stored batch cannot be decoded."""


class StoreInUseError(StoreError):
    """Another process holds the store (one agent per data directory)."""


class StoreClosedError(StoreError):
    """A call after ``close()``."""


@dataclass(frozen=True, slots=True)
class PendingBatch:
    """One accepted prediction batch, as kept for the outcome join (no feature values).

    >>> batch = PendingBatch("churn", "v1", ids=["a", "b"], received_unix_nano=0,
    ...                      scores=np.array([0.2, 0.9]))
    >>> batch.rows
    2

    Ids must be unique within a batch (ingest guarantees it); should one repeat, the later
    row replaces the earlier, as for a duplicate across batches. Empty trace/span ids and
    all-zero ones both mean "none".
    """

    model: str
    version: str
    ids: Sequence[str]
    received_unix_nano: int
    timestamps_unix_nano: IntArray | None = None
    scores: FloatArray | None = None
    labels: Sequence[str] | None = None
    # rows x len(class_names)
    probabilities: FloatArray | None = None
    class_names: Sequence[str] = ()
    trace_ids: Sequence[bytes] | None = None
    span_ids: Sequence[bytes] | None = None
    # Segment attributes of the whole batch (low cardinality, e.g. region).
    attributes: Mapping[str, str] = field(default_factory=dict)
    # 1 / sample_rate: how many real predictions each row stands for.
    weight: float = 1.0

    def __post_init__(self) -> None:
        n = len(self.ids)
        for name in ("timestamps_unix_nano", "scores", "labels", "trace_ids", "span_ids"):
            column = getattr(self, name)
            if column is not None and len(column) != n:
                raise ValueError(
                    f"pending batch of model {self.model!r}: {name} has {len(column)} values, "
                    f"expected {n} (len(ids))"
                )
        if self.probabilities is not None:
            shape = np.shape(self.probabilities)
            if shape != (n, len(self.class_names)):
                raise ValueError(
                    f"pending batch of model {self.model!r}: probabilities have shape {shape}, "
                    f"expected ({n}, {len(self.class_names)}) (rows x class_names)"
                )
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(
                f"pending batch of model {self.model!r}: weight {self.weight} must be positive"
            )

    @property
    def rows(self) -> int:
        return len(self.ids)

    @classmethod
    def from_columns(cls, cols: PredictionColumns) -> PendingBatch:
        """The outputs of decoded prediction columns; feature columns are left behind."""
        return cls(
            model=cols.model,
            version=cols.version,
            ids=cols.ids,
            received_unix_nano=cols.received_unix_nano,
            timestamps_unix_nano=cols.timestamps_unix_nano,
            scores=cols.scores,
            labels=cols.labels,
            probabilities=cols.probabilities,
            class_names=cols.class_names,
            trace_ids=cols.trace_ids,
            span_ids=cols.span_ids,
            attributes=cols.attributes,
            weight=cols.weight,
        )


@dataclass(frozen=True, slots=True)
class JoinedPredictions:
    """The predictions ``take`` found for requested ids, row i answering ``ids[i]``.

    joined = store.take("churn", ["a", "zzz"])
    joined.found            # array([ True, False]): "zzz" is an orphan outcome
    joined.scores[joined.found], joined.versions[0], joined.trace_id(0)

    Rows not found (and absent columns) hold fill values: NaN scores and probabilities,
    "" labels and versions, 0 times, weight 1, all-zero trace/span ids, no attributes.
    """

    model: str
    ids: Sequence[str]
    found: BoolArray
    versions: list[str]
    received_unix_nano: IntArray
    timestamps_unix_nano: IntArray
    scores: FloatArray
    labels: list[str]
    # rows x len(class_names); class_names is the union over the batches the rows came from.
    probabilities: FloatArray | None
    class_names: tuple[str, ...]
    weights: FloatArray
    # rows x 16 and rows x 8 bytes; all zero = none
    trace_ids: ByteMatrix
    span_ids: ByteMatrix
    attributes: list[Mapping[str, str]]

    @property
    def rows(self) -> int:
        return len(self.ids)

    @property
    def joined(self) -> int:
        return int(np.count_nonzero(self.found))

    def trace_id(self, row: int) -> bytes:
        """The 16-byte trace id of ``row``'s prediction, or b"" when it had none."""
        value = self.trace_ids[row].tobytes()
        return value if any(value) else b""

    def span_id(self, row: int) -> bytes:
        value = self.span_ids[row].tobytes()
        return value if any(value) else b""

    def groups(self, segment_key: str | None = None) -> Iterator[tuple[str, str | None, IntArray]]:
        """The found rows split by model version (and by the value of attribute
        ``segment_key``, None where absent): (version, segment, row indices), for an engine
        that counts one version and segment at a time.

        for version, segment, rows in joined.groups("region"):
            engine.observe_joined(joined.model, version, pairs_for(rows, segment))
        """
        split: dict[tuple[str, str | None], list[int]] = {}
        versions, attributes = self.versions, self.attributes
        for row in np.flatnonzero(self.found).tolist():
            segment = None if segment_key is None else attributes[row].get(segment_key)
            split.setdefault((versions[row], segment), []).append(row)
        for (version, segment), rows in split.items():
            yield version, segment, np.array(rows, dtype=np.int64)

    @classmethod
    def none_found(cls, model: str, ids: Sequence[str]) -> JoinedPredictions:
        n = len(ids)
        return cls(
            model=model,
            ids=ids,
            found=np.zeros(n, dtype=np.bool_),
            versions=[""] * n,
            received_unix_nano=np.zeros(n, dtype=np.int64),
            timestamps_unix_nano=np.zeros(n, dtype=np.int64),
            scores=np.full(n, np.nan),
            labels=[""] * n,
            probabilities=None,
            class_names=(),
            weights=np.ones(n),
            trace_ids=np.zeros((n, 16), dtype=np.uint8),
            span_ids=np.zeros((n, 8), dtype=np.uint8),
            attributes=[NO_ATTRIBUTES] * n,
        )


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Self-metrics of a pending store (totals since open)."""

    pending: int
    batches: int
    evicted: int
    expired: int
    replaced: int
    index_bytes: int
    file_bytes: int


class PendingPredictions(Protocol):
    """The durable pending-prediction join store (SQLite locally, Redis shared)."""

    def put(self, batch: PendingBatch) -> None:
        """Store a batch; it is durable when this returns (or raises, storing nothing)."""
        ...

    def take(self, model: str, ids: Sequence[str]) -> JoinedPredictions:
        """Remove and return the pending predictions of ``ids``; absent ids are orphans."""
        ...

    def expire(self, now_unix_nano: int) -> dict[ModelVersion, int]:
        """Drop predictions past the TTL; return those plus the evicted since the last call.

        Every count returned is a prediction that will never join: count it as unmatched.
        """
        ...

    def forget(self, model: str) -> int:
        """Drop every pending prediction of ``model``; returns how many."""
        ...

    def pending_count(self, model: str | None = None, version: str | None = None) -> int:
        """Pending predictions of ``model`` (all when None), of ``version`` (all when None);
        safe from any thread."""
        ...

    def stats(self) -> StoreStats: ...

    def close(self) -> None: ...


class TransactionalPendingPredictions(PendingPredictions, Protocol):
    """A store whose calls can share one commit: inside ``transaction()`` each call is atomic
    on its own (a failing call undoes only itself) and all are durable at the block's end."""

    def transaction(self) -> contextlib.AbstractContextManager[None]: ...


@dataclass(slots=True)
class _Call:
    fn: Callable[[Any], Any]
    future: Future[Any]


class GroupCommitPendingPredictions:
    """Runs a store on one writer thread; concurrent calls share one commit (group commit).

    writer = GroupCommitPendingPredictions(SqlitePendingPredictions(path))
    writer.put(batch)                         # blocks until the commit that covers it
    future = writer.submit(lambda s: s.take("churn", ids))   # concurrent.futures.Future

    The thread takes every call queued while the previous commit ran and applies them in
    one transaction, in submission order, so a burst of N puts costs one commit (one fsync
    with synchronous=FULL). No call waits for company: an idle writer commits at once.
    ``max_group=1`` gives one commit per call (for comparison). Safe from any thread.

    Each store method is atomic on its own: one that raises undoes itself and leaves the
    rest of its group to commit. A submitted function is not: if it raises after a store
    call succeeded, that call stays done.
    """

    def __init__(
        self,
        store: TransactionalPendingPredictions,
        *,
        max_group: int = 1024,
        name: str = "mlsidecar-pending-store",
    ) -> None:
        if max_group < 1:
            raise ValueError(f"max_group must be at least 1, got {max_group}")
        self.store = store
        self._max_group = max_group
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._closing = threading.Lock()
        self._closed = False
        self.commits = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[Any], T]) -> Future[T]:
        """Run ``fn(store)`` on the writer thread; the future resolves after its commit."""
        future: Future[T] = Future()
        with self._closing:
            if self._closed:
                raise StoreClosedError(str(getattr(self.store, "path", "?")), "closed")
            self._queue.put(_Call(fn, future))
        return future

    def put(self, batch: PendingBatch) -> None:
        self.submit(lambda store: store.put(batch)).result()

    def take(self, model: str, ids: Sequence[str]) -> JoinedPredictions:
        return self.submit(lambda store: store.take(model, ids)).result()

    def expire(self, now_unix_nano: int) -> dict[ModelVersion, int]:
        return self.submit(lambda store: store.expire(now_unix_nano)).result()

    def forget(self, model: str) -> int:
        return self.submit(lambda store: store.forget(model)).result()

    def pending_count(self, model: str | None = None, version: str | None = None) -> int:
        return self.store.pending_count(model, version)

    def stats(self) -> StoreStats:
        return self.store.stats()

    def close(self) -> None:
        """Finish every queued call, then close the store; later calls raise."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            calls = [first]
            while len(calls) < self._max_group:
                try:
                    call = self._queue.get_nowait()
                except queue.Empty:
                    break
                if call is None:
                    stopping = True
                    break
                calls.append(call)
            self._commit(calls)
        self.store.close()

    def _commit(self, calls: list[_Call]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            with self.store.transaction():
                for call in calls:
                    if not call.future.set_running_or_notify_cancel():
                        outcomes.append((False, None))
                        continue
                    try:
                        outcomes.append((True, call.fn(self.store)))
                    except Exception as error:  # the store undid this call alone
                        outcomes.append((False, error))
        except BaseException as error:  # the commit itself failed: nothing of the group is durable
            for call, (ok, own) in zip(
                calls, [*outcomes, *[(True, None)] * len(calls)], strict=False
            ):
                if call.future.running():
                    # A call that failed by itself keeps its own error.
                    call.future.set_exception(error if ok else own)
            if not isinstance(error, Exception):
                raise
            return
        self.commits += 1
        for call, (ok, value) in zip(calls, outcomes, strict=True):
            if not call.future.running():
                continue
            if ok:
                call.future.set_result(value)
            else:
                call.future.set_exception(value)


class AsyncPendingPredictions:
    """The group-commit writer for asyncio code: the event loop never blocks on SQLite.

    store = AsyncPendingPredictions(GroupCommitPendingPredictions(SqlitePendingPredictions(path)))
    await store.put(batch)                 # returns once the batch is committed
    joined = await store.take("churn", ids)
    """

    def __init__(self, writer: GroupCommitPendingPredictions) -> None:
        self.writer = writer

    async def put(self, batch: PendingBatch) -> None:
        await asyncio.wrap_future(self.writer.submit(lambda store: store.put(batch)))

    async def take(self, model: str, ids: Sequence[str]) -> JoinedPredictions:
        return await asyncio.wrap_future(self.writer.submit(lambda store: store.take(model, ids)))

    async def expire(self, now_unix_nano: int) -> dict[ModelVersion, int]:
        return await asyncio.wrap_future(
            self.writer.submit(lambda store: store.expire(now_unix_nano))
        )

    async def forget(self, model: str) -> int:
        return await asyncio.wrap_future(self.writer.submit(lambda store: store.forget(model)))

    def pending_count(self, model: str | None = None, version: str | None = None) -> int:
        return self.writer.pending_count(model, version)

    def stats(self) -> StoreStats:
        return self.writer.stats()

    async def close(self) -> None:
        await asyncio.to_thread(self.writer.close)


# -- orphan outcomes ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _HeldOutcome:
    version: str
    actual_value: float
    actual_label: str
    timestamp_unix_nano: int
    received_unix_nano: int


@dataclass(frozen=True, slots=True)
class HeldOutcomes:
    """Outcomes released from the grace hold because their prediction has now arrived."""

    model: str
    ids: list[str]
    versions: list[str]
    actual_values: FloatArray  # NaN when the outcome had no value
    actual_labels: list[str]  # "" when the outcome had no label
    timestamps_unix_nano: IntArray  # 0 when absent
    received_unix_nano: IntArray

    @property
    def rows(self) -> int:
        return len(self.ids)


class OrphanOutcomes:
    """Outcomes whose prediction is not (yet) pending, held briefly in case it is in flight.

    orphans = OrphanOutcomes(grace_s=60, max_held=50_000)
    orphans.hold(outcomes, ~joined.found)            # after store.take
    late = orphans.match(batch.model, batch.ids)     # after store.put: take(late.ids) now joins
    orphaned = orphans.expire(now_unix_nano)         # {(model, version): n}: count as orphans

    In memory and bounded: beyond ``max_held`` the oldest is released early and counted
    as orphaned at the next ``expire``. A re-sent outcome replaces the held one. Outcomes
    are expected in order of receipt (one clock). Not thread-safe (use it from the ingest
    event loop); a restart drops what is held.
    """

    def __init__(self, *, grace_s: float = 60.0, max_held: int = 50_000) -> None:
        if grace_s < 0 or not math.isfinite(grace_s):
            raise ValueError(f"grace_s must be a finite number >= 0, got {grace_s}")
        if max_held < 0:
            raise ValueError(f"max_held must be >= 0, got {max_held}")
        self._grace_ns = int(grace_s * 1e9)
        self._max_held = max_held
        # (model, id) -> outcome, oldest first: expiry and eviction pop from the front.
        self._held: OrderedDict[tuple[str, str], _HeldOutcome] = OrderedDict()
        self._per_model: dict[str, int] = {}
        self._orphaned: dict[ModelVersion, int] = {}

    def held_count(self, model: str | None = None) -> int:
        return len(self._held) if model is None else self._per_model.get(model, 0)

    def hold(self, outcomes: OutcomeColumns, rows: BoolArray) -> None:
        """Hold the outcomes of ``outcomes`` selected by the mask ``rows`` (the orphans)."""
        positions = np.flatnonzero(rows)
        if positions.size == 0:
            return
        if self._max_held == 0:
            self._count(outcomes.model, outcomes.version, int(positions.size))
            return
        model = outcomes.model
        values = outcomes.actual_values
        labels = outcomes.actual_labels
        stamps = outcomes.timestamps_unix_nano
        held, per_model = self._held, self._per_model
        for i in positions.tolist():
            key = (model, outcomes.ids[i])
            replaced = held.pop(key, None)
            if replaced is not None:
                per_model[model] -= 1
                self._count(model, replaced.version, 1)
            held[key] = _HeldOutcome(
                outcomes.version,
                float(values[i]) if values is not None else math.nan,
                labels[i] if labels is not None else "",
                int(stamps[i]) if stamps is not None else 0,
                outcomes.received_unix_nano,
            )
            per_model[model] = per_model.get(model, 0) + 1
        while len(held) > self._max_held:
            (old_model, _), old = held.popitem(last=False)
            per_model[old_model] -= 1
            self._count(old_model, old.version, 1)

    def match(self, model: str, ids: Sequence[str]) -> HeldOutcomes:
        """Release the held outcomes of ``model`` whose id is among ``ids`` (just stored)."""
        found_ids: list[str] = []
        found: list[_HeldOutcome] = []
        if self._per_model.get(model):
            held = self._held
            for id_ in ids:
                outcome = held.pop((model, id_), None)
                if outcome is not None:
                    found_ids.append(id_)
                    found.append(outcome)
            self._per_model[model] -= len(found)
        return HeldOutcomes(
            model=model,
            ids=found_ids,
            versions=[o.version for o in found],
            actual_values=np.array([o.actual_value for o in found], dtype=np.float64),
            actual_labels=[o.actual_label for o in found],
            timestamps_unix_nano=np.array([o.timestamp_unix_nano for o in found], dtype=np.int64),
            received_unix_nano=np.array([o.received_unix_nano for o in found], dtype=np.int64),
        )

    def expire(self, now_unix_nano: int) -> dict[ModelVersion, int]:
        """Release outcomes held past the grace period; returns, per (model, version of the
        outcome), every outcome that became a definite orphan since the last call (expired,
        pushed out by ``max_held``, or replaced by a re-sent one)."""
        horizon = now_unix_nano - self._grace_ns
        held = self._held
        while held:
            key, outcome = next(iter(held.items()))
            if outcome.received_unix_nano > horizon:
                break
            del held[key]
            self._per_model[key[0]] -= 1
            self._count(key[0], outcome.version, 1)
        orphaned, self._orphaned = self._orphaned, {}
        return orphaned

    def forget(self, model: str) -> int:
        """Drop the outcomes held for ``model`` (not counted); returns how many."""
        keys = [key for key in self._held if key[0] == model]
        for key in keys:
            del self._held[key]
        self._per_model.pop(model, None)
        self._orphaned = {mv: n for mv, n in self._orphaned.items() if mv[0] != model}
        return len(keys)

    def _count(self, model: str, version: str, n: int) -> None:
        key = (model, version)
        self._orphaned[key] = self._orphaned.get(key, 0) + n


def scatter(
    fill: list[T], where: IntArray, values: list[T], pick: IntArray | None = None
) -> list[T]:
    """``fill`` with ``values`` (or ``values[pick]``) placed at ``where``: object-array
    copies instead of a Python loop over the rows."""
    source = np.empty(len(values), dtype=object)
    source[:] = values
    out = np.empty(len(fill), dtype=object)
    out[:] = fill
    out[where] = source if pick is None else source[pick]
    return out.tolist()
