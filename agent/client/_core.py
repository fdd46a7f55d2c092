"""What both clients share: options, the bounded buffer, the ``log_*`` calls and helpers.

The ``log_*`` calls run on the model service's threads, so they only validate cheaply,
build a tuple and append it to the buffer under a lock held for O(1) work: they never
wait for the network. The sender (a thread or an asyncio task) drains the buffer.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import logging
import random
import re
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb
from agent.client._batches import (
    OUTCOMES,
    PREDICTIONS,
    Chunk,
    Columns,
    Event,
    Outcome,
    Prediction,
    build_prediction_batch,
    group_predictions,
    pack_columns,
    pack_outcomes,
    trace_bytes,
)
from agent.client._delivery import ClientStats, Counters, Delivery, Send, Sleep

try:  # optional: trace linking and the drop metric need only the API, never the SDK
    from opentelemetry import context as otel_context
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import trace as otel_trace
except ImportError:  # pragma: no cover - exercised only where opentelemetry-api is absent
    otel_context = None  # type: ignore[assignment]
    otel_metrics = None  # type: ignore[assignment]
    otel_trace = None  # type: ignore[assignment]

log = logging.getLogger("agent.client")

MODEL_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
VERSION = re.compile(r"[!-~]{0,128}")
MAX_ATTRIBUTES = 8  # the agent's limit per batch (docs/ingest.md, "Limits")
F = TypeVar("F", bound=Callable[..., Any])
_new_tuple = tuple.__new__


# (context, (trace id, span id)) of the last lookup. An OTel Context is immutable, so the
# same object means the same span: a request that logs 20 rows looks its span up once.
# One tuple, swapped whole: threads may race to refresh it, never to tear it.
_last_trace: tuple[Any, tuple[int, int]] = (None, (0, 0))


def current_trace() -> tuple[int, int]:
    """(trace id, span id) of the active OTel span, or (0, 0) outside one."""
    global _last_trace
    if otel_trace is None:
        return 0, 0
    context = otel_context.get_current()
    last = _last_trace
    if last[0] is context:
        return last[1]
    span_context = otel_trace.get_current_span(context).get_span_context()
    ids = (span_context.trace_id, span_context.span_id) if span_context.is_valid else (0, 0)
    _last_trace = (context, ids)
    return ids


class EventBuffer:
    """A bounded FIFO of events counted in rows; when full, the oldest rows go first."""

    def __init__(self, max_rows: int, counters: Counters) -> None:
        self.max_rows = max_rows
        self.rows = 0
        self._items: deque[Event] = deque()
        self._lock = threading.Lock()
        self._counters = counters

    def put(self, item: Event, rows: int = 1) -> int:
        """Append; returns the buffered row count after it."""
        if rows > self.max_rows:  # a chunk larger than the whole buffer
            self._counters.drop(rows, "buffer_full", f"max_buffer={self.max_rows} rows")
            return self.rows
        with self._lock:
            items = self._items
            if self.rows + rows > self.max_rows:
                dropped = 0
                while items and self.rows + rows > self.max_rows:
                    old = items.popleft()
                    n = old.rows if isinstance(old, Chunk) else 1
                    self.rows -= n
                    dropped += n
                self._counters.drop(dropped, "buffer_full", f"max_buffer={self.max_rows} rows")
            items.append(item)
            self.rows += rows
            return self.rows

    def take(self, max_rows: int, slice_items: int = 64) -> list[Event]:
        """Up to ``max_rows`` rows from the front, taking the lock for short slices."""
        taken: list[Event] = []
        rows = 0
        while rows < max_rows:
            with self._lock:
                items = self._items
                for _ in range(slice_items):
                    if not items or rows >= max_rows:
                        break
                    item = items.popleft()
                    n = item.rows if isinstance(item, Chunk) else 1
                    self.rows -= n
                    rows += n
                    taken.append(item)
                if not items:
                    break
        return taken

    def drain_all(self) -> int:
        with self._lock:
            rows = self.rows
            self._items.clear()
            self.rows = 0
        return rows


def _column_values(features: Any, n: int) -> tuple[tuple[str, ...], list[np.ndarray]]:
    """(names, values) of the features, from a Mapping of arrays or a pandas DataFrame.

    The arrays are copies: the sender packs them later, and the caller may reuse its own
    as soon as the call returns.
    """
    if features is None:
        return (), []
    if hasattr(features, "columns") and hasattr(features, "__getitem__"):  # pandas DataFrame
        items = [(str(name), features[name].to_numpy(copy=True)) for name in features.columns]
    elif isinstance(features, Mapping):
        items = [(str(name), np.array(values)) for name, values in features.items()]
    else:
        raise TypeError(
            f"features: expected a Mapping of arrays or a pandas DataFrame, got {type(features).__name__}"
        )
    for name, values in items:
        if values.ndim != 1 or len(values) != n:
            raise ValueError(f"features[{name!r}]: {values.shape} values, expected {n} (len(ids))")
    return tuple(name for name, _ in items), [values for _, values in items]


def _rows(arrays: tuple[Any, ...], rows: Any) -> tuple[Any, ...]:
    """``arrays[i][rows]`` for each array that is not None."""
    return tuple(None if values is None else values[rows] for values in arrays)


def _optional_array(name: str, values: Any, n: int, dtype: Any) -> np.ndarray | None:
    if values is None:
        return None
    array = np.array(values, dtype=dtype)  # a copy, as in _column_values
    if array.ndim != 1 or len(array) != n:
        raise ValueError(f"{name}: {array.shape} values, expected {n} (len(ids))")
    return array


class ClientCore:
    """Options, buffer, ``log_*`` and helpers; the subclasses add the sender."""

    _atexit: Callable[[], None]  # the subclass registers its exit hook (register_exit_hook)

    def __init__(
        self,
        target: str = "127.0.0.1:4320",
        model: str = "",
        model_version: str = "",
        *,
        sample_rate: float = 1.0,
        max_buffer: int = 10_000,
        batch_rows: int = 500,
        flush_interval_s: float = 1.0,
        token: str | None = None,
        credentials: Any = None,
        class_names: Sequence[str] | None = None,
        attributes: Mapping[str, str] | None = None,
        send_timeout_s: float = 2.0,
        max_retries: int = 3,
        backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
        breaker_fail_max: int = 3,
        breaker_reset_s: float = 5.0,
        max_message_bytes: int = 4 * 1024 * 1024,
        max_rows_per_batch: int = 10_000,
        meter_provider: Any = None,
        seed: int | None = None,
        close_timeout_s: float = 5.0,
    ) -> None:
        if not isinstance(model, str) or not MODEL_NAME.fullmatch(model):
            raise ValueError(f"model: {model!r} does not match [A-Za-z0-9._-]{{1,128}}")
        _check_version(model_version)
        if not (isinstance(sample_rate, int | float) and 0 < sample_rate <= 1):
            raise ValueError(f"sample_rate: {sample_rate!r} is outside (0, 1]")
        for name, value in (
            ("max_buffer", max_buffer),
            ("batch_rows", batch_rows),
            ("max_message_bytes", max_message_bytes),
            ("max_rows_per_batch", max_rows_per_batch),
            ("breaker_fail_max", breaker_fail_max),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {value!r} must be a positive integer")
        for name, number in (
            ("flush_interval_s", flush_interval_s),
            ("send_timeout_s", send_timeout_s),
            ("breaker_reset_s", breaker_reset_s),
        ):
            if not number > 0:
                raise ValueError(f"{name}: {number!r} must be positive")
        for name, number in (
            ("max_retries", max_retries),
            ("backoff_s", backoff_s),
            ("max_backoff_s", max_backoff_s),
            ("close_timeout_s", close_timeout_s),
        ):
            if not number >= 0:  # NaN fails too
                raise ValueError(f"{name}: {number!r} must not be negative")
        if attributes is not None and (problem := _attributes_problem(attributes)):
            raise ValueError(problem)
        if class_names is not None and len(set(class_names)) != len(class_names):
            raise ValueError(f"class_names: {list(class_names)!r} has duplicates")
        self.target = target
        self.model = model
        self.model_version = model_version
        self.sample_rate = float(sample_rate)
        self.close_timeout_s = float(close_timeout_s)  # close() and the exit hook flush this long
        self.batch_rows = min(batch_rows, max_rows_per_batch, max_buffer)
        # The batch forms queue pieces of at most a quarter of the buffer (or one batch):
        # when it overflows, the oldest rows go a piece at a time, never a whole call.
        self._chunk_rows = min(max_rows_per_batch, max(self.batch_rows, max_buffer // 4))
        self.flush_interval_s = float(flush_interval_s)
        self.send_timeout_s = float(send_timeout_s)
        self.class_names = tuple(class_names) if class_names else None
        self.attributes = dict(attributes) if attributes else None
        self._default_attribute_key = tuple(sorted((self.attributes or {}).items()))
        self._attribute_keys: dict[tuple, tuple] = {}  # as given -> sorted, checked
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._credentials = credentials
        self._counters = Counters()
        self._buffer = EventBuffer(max_buffer, self._counters)
        self._delivery = Delivery(
            target=target,
            counters=self._counters,
            sample_rate=self.sample_rate,
            max_retries=max_retries,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
            breaker_fail_max=breaker_fail_max,
            breaker_reset_s=breaker_reset_s,
            max_message_bytes=max_message_bytes,
            max_rows_per_batch=max_rows_per_batch,
        )
        self._random = random.Random(seed).random
        self._closed = False
        self._flush_waiters = 0  # flush() calls waiting: the sender sends partial batches
        self._busy = False  # the sender holds taken rows (flush waits for them too)
        self._in_flight = 0  # rows taken from the buffer and not yet settled
        self._needs_start = False  # the asyncio client starts its task on first use
        self._register_metrics(meter_provider)

    # -- the hot path -------------------------------------------------------------------------

    def log_prediction(
        self,
        id: str,
        features: Mapping[str, Any] | None,
        *,
        score: float | None = None,
        label: str | None = None,
        probabilities: Mapping[str, float] | Sequence[float] | None = None,
        latency_ms: float | None = None,
        model: str | None = None,
        model_version: str | None = None,
        attributes: Mapping[str, str] | None = None,
    ) -> None:
        """Queue one prediction; returns at once and never raises.

        ``probabilities``: {class: p}, or a sequence in the order of ``class_names``.
        An event the agent would refuse (bad id, override or probabilities) is dropped
        and counted as ``invalid_event``, so that it cannot sink its whole batch: here, or
        for ``attributes``, by the sender (checked once per distinct mapping).
        """
        if self._closed:
            self._counters.drop(1, "closed", "log_prediction after close()")
            return
        if self._needs_start:
            self._poke()
        if self.sample_rate < 1.0 and self._random() >= self.sample_rate:
            self._counters.count_sampled_out(1)
            return
        try:
            problem = None
            if type(id) is not str and id is not None:
                id = str(id)  # ints and UUIDs are fine: the wire's ids are strings
            if not id:
                problem = f"id: {id!r} must be a non-empty string"
            elif model is not None or model_version is not None:
                problem = _override_problem(model, model_version, None)
            # attributes are checked by the sender, once per distinct mapping (not per call)
            if problem is None and probabilities is not None:
                problem = self._probabilities_problem(probabilities)
            if problem is not None:
                self._counters.drop(1, "invalid_event", problem)
                return
            trace_id, span_id = current_trace()
            # tuple.__new__ skips NamedTuple's Python-level __new__: 0.5 µs of a ~3 µs call
            event = _new_tuple(
                Prediction,
                (
                    id,
                    dict(features) if features is not None else None,
                    None if score is None else float(score),
                    None if label is None else str(label),
                    probabilities,
                    None if latency_ms is None else float(latency_ms),
                    model or self.model,
                    self.model_version if model_version is None else model_version,
                    attributes if attributes is not None else self.attributes,
                    trace_id,
                    span_id,
                    time.time_ns(),
                ),
            )
        except (TypeError, ValueError) as error:  # e.g. features that are not a mapping
            self._counters.drop(1, "invalid_event", f"log_prediction: {error}")
            return
        if self._buffer.put(event) == self.batch_rows:  # once per batch, not per call
            self._wake()

    def log_outcome(
        self,
        id: str,
        *,
        value: float | None = None,
        label: str | None = None,
        model: str | None = None,
        model_version: str | None = None,
    ) -> None:
        """Queue the ground truth of prediction ``id``: exactly one of ``value`` or ``label``."""
        if self._closed:
            self._counters.drop(1, "closed", "log_outcome after close()")
            return
        if self._needs_start:
            self._poke()
        try:
            problem = None
            if type(id) is not str and id is not None:
                id = str(id)  # ints and UUIDs are fine: the wire's ids are strings
            if not id:
                problem = f"id: {id!r} must be a non-empty string"
            elif (value is None) == (label is None):
                problem = "log_outcome: set exactly one of value, label"
            elif model is not None or model_version is not None:
                problem = _override_problem(model, model_version, None)
            if problem is not None:
                self._counters.drop(1, "invalid_event", problem)
                return
            event = Outcome(
                id,
                None if value is None else float(value),
                None if label is None else str(label),
                model or self.model,
                self.model_version if model_version is None else model_version,
                time.time_ns(),
            )
        except (TypeError, ValueError) as error:
            self._counters.drop(1, "invalid_event", f"log_outcome: {error}")
            return
        if self._buffer.put(event) == self.batch_rows:
            self._wake()

    def _probabilities_problem(self, probabilities: Any) -> str | None:
        if isinstance(probabilities, Mapping):
            return None
        expected = len(self.class_names) if self.class_names else 0
        if len(probabilities) != expected:
            return (
                f"probabilities: {len(probabilities)} values, expected len(class_names)="
                f"{expected}; pass a {{class: p}} mapping or the client's class_names="
            )
        return None

    # -- batch forms --------------------------------------------------------------------------

    def log_predictions(
        self,
        ids: Sequence[str] | np.ndarray,
        features: Any = None,
        *,
        scores: Any = None,
        labels: Any = None,
        probabilities: Any = None,
        class_names: Sequence[str] | None = None,
        latencies_ms: Any = None,
        model: str | None = None,
        model_version: str | None = None,
        attributes: Mapping[str, str] | None = None,
    ) -> None:
        """Queue N predictions given as columns (numpy arrays, lists, a pandas DataFrame).

        Shapes are checked here and a mismatch raises ``ValueError`` naming the argument,
        as a programming error should; delivery problems never raise.
        """
        ids_list = _unique_ids(ids)
        n = len(ids_list)
        if n == 0:
            return
        if (model is not None or model_version is not None) and (
            problem := _override_problem(model, model_version, None)
        ):
            raise ValueError(problem)
        attribute_key = self._attribute_key(attributes)
        names, columns = _column_values(features, n)
        classes = tuple(class_names) if class_names else self.class_names
        prob_array = None
        if probabilities is not None:
            prob_array = np.array(probabilities, dtype=np.float64)
            if classes is None or prob_array.shape != (n, len(classes)):
                raise ValueError(
                    f"probabilities: shape {prob_array.shape}, expected ({n}, len(class_names))"
                )
        # Copies (the caller may reuse its arrays); the sender makes labels strings and
        # features protobuf columns.
        extras = (
            _optional_array("scores", scores, n, np.float64),
            _optional_array("labels", labels, n, None),
            _optional_array("latencies_ms", latencies_ms, n, np.float64),
            prob_array,
        )
        if self.sample_rate < 1.0:
            keep = np.array([self._random() < self.sample_rate for _ in range(n)])
            self._counters.count_sampled_out(int(n - keep.sum()))
            if not keep.any():
                return
            ids_list = [i for i, k in zip(ids_list, keep, strict=True) if k]
            columns = [values[keep] for values in columns]
            extras = _rows(extras, keep)
        if self._closed:
            self._counters.drop(n, "closed", "log_predictions after close()")
            return
        trace, span = trace_bytes(*current_trace())
        key = (
            model or self.model,
            self.model_version if model_version is None else model_version,
            attribute_key,
            classes if prob_array is not None else None,
            names,
            (extras[0] is not None, extras[1] is not None, extras[2] is not None, bool(trace)),
        )
        now = time.time_ns()  # the time of the call, not of the send (the agent may be down)
        rows, size = len(ids_list), self._chunk_rows
        for lo in range(0, rows, size):  # pieces: when the buffer overflows, the oldest go first
            hi = min(lo + size, rows)
            part = slice(lo, hi)
            scores_, labels_, latencies, probs = extras if hi - lo == rows else _rows(extras, part)
            piece = Columns(
                key,
                ids_list if hi - lo == rows else ids_list[part],
                now,
                columns if hi - lo == rows else [values[part] for values in columns],
                scores_,
                labels_,
                latencies,
                probs,
                trace,
                span,
            )
            self._put_chunk(Chunk(PREDICTIONS, hi - lo, piece))

    def _attribute_key(self, attributes: Mapping[str, str] | None) -> tuple:
        """A call's attributes (or the client's) as a sorted tuple, the agent's limits
        checked (ValueError naming the problem); each distinct mapping is checked once."""
        if attributes is None:
            return self._default_attribute_key
        try:
            items = tuple(attributes.items())
            known = self._attribute_keys.get(items)
        except (AttributeError, TypeError):  # not a mapping, or unhashable values
            items, known = None, None
        if known is not None:
            return known
        if problem := _attributes_problem(attributes):
            raise ValueError(problem)
        known = tuple(sorted(attributes.items()))
        if items is not None and len(self._attribute_keys) < 1024:  # bounded: a few per service
            self._attribute_keys[items] = known
        return known

    def log_outcomes(
        self,
        ids: Sequence[str] | np.ndarray,
        *,
        values: Any = None,
        labels: Any = None,
        model: str | None = None,
        model_version: str | None = None,
    ) -> None:
        """Queue N outcomes: ``values`` (numbers) or ``labels`` (classes), one per id."""
        ids_list = _unique_ids(ids)
        n = len(ids_list)
        if n == 0:
            return
        if problem := _override_problem(model, model_version, None):
            raise ValueError(problem)
        if (values is None) == (labels is None):
            raise ValueError("values, labels: set exactly one of them")
        if values is not None:
            value_array = _optional_array("values", values, n, np.float64)
            label_list: list[str] | None = None
        else:
            value_array = None
            label_list = [str(v) for v in np.asarray(labels).tolist()]
            if len(label_list) != n:
                raise ValueError(f"labels: {len(label_list)} values, expected {n} (len(ids))")
        if self._closed:
            self._counters.drop(n, "closed", "log_outcomes after close()")
            return
        now = time.time_ns()
        for lo in range(0, n, self._chunk_rows):  # chunks, as in log_predictions
            hi = min(lo + self._chunk_rows, n)
            batch = pb.OutcomeBatch(
                model=model or self.model,
                model_version=self.model_version if model_version is None else model_version,
                ids=ids_list[lo:hi],
                timestamps_unix_nano=[now] * (hi - lo),
            )
            if value_array is not None:
                batch.actual_values.extend(value_array[lo:hi])
            elif label_list is not None:
                batch.actual_labels.extend(label_list[lo:hi])
            self._put_chunk(Chunk(OUTCOMES, hi - lo, batch))

    def _put_chunk(self, chunk: Chunk) -> None:
        if self._needs_start:
            self._poke()
        # Wake the sender when this chunk carries the buffer over a batch, not on every
        # chunk after that: waking a thread costs the caller a syscall and the GIL.
        after = self._buffer.put(chunk, chunk.rows)
        if after - chunk.rows < self.batch_rows <= after:
            self._wake()

    # -- helpers ------------------------------------------------------------------------------

    @contextmanager
    def timed(
        self, id: str | None = None, features: Mapping[str, Any] | None = None, **fields: Any
    ) -> Iterator[TimedPrediction]:
        """Time a block and log its prediction when the block succeeds.

        with client.timed(features=row) as p:
            p.score = model.predict_proba(x)[0, 1]     # p.id is the prediction id
        """
        record = TimedPrediction(id or uuid.uuid4().hex, features, fields)
        started = time.perf_counter()
        yield record
        record.latency_ms = (time.perf_counter() - started) * 1000.0
        self.log_prediction(
            record.id,
            record.features,
            score=record.score,
            label=record.label,
            probabilities=record.probabilities,
            latency_ms=record.latency_ms,
            **record.fields,
        )

    def monitor(
        self,
        *,
        features: Callable[..., Mapping[str, Any] | None] | None = None,
        output: Callable[[Any], Mapping[str, Any]] | None = None,
        id: Callable[..., str] | None = None,
    ) -> Callable[[F], F]:
        """Decorate a predict function: time it and log its input and output.

        @client.monitor()                       # features = the first argument (a Mapping)
        def predict(features: dict) -> float:   # float -> score, str -> label,
            ...                                 # Mapping -> its score/label/probabilities keys
        """

        def features_of(*args: Any, **kwargs: Any) -> Mapping[str, Any] | None:
            if features is not None:
                return features(*args, **kwargs)
            first = args[0] if args else next(iter(kwargs.values()), None)
            return first if isinstance(first, Mapping) else None

        def log_result(started: float, result: Any, args: Any, kwargs: Any) -> None:
            latency_ms = (time.perf_counter() - started) * 1000.0
            try:
                fields = dict(output(result)) if output is not None else _output_fields(result)
                prediction_id = id(*args, **kwargs) if id is not None else uuid.uuid4().hex
                self.log_prediction(
                    prediction_id, features_of(*args, **kwargs), latency_ms=latency_ms, **fields
                )
            except Exception as error:  # monitoring must never break the prediction
                self._counters.drop(1, "invalid_event", f"monitor: {error!r}")

        def decorate(fn: F) -> F:
            if inspect.iscoroutinefunction(fn):

                @functools.wraps(fn)
                async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                    started = time.perf_counter()
                    result = await fn(*args, **kwargs)
                    log_result(started, result, args, kwargs)
                    return result

                return async_wrapper  # type: ignore[return-value]

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                result = fn(*args, **kwargs)
                log_result(started, result, args, kwargs)
                return result

            return wrapper  # type: ignore[return-value]

        return decorate

    # -- state --------------------------------------------------------------------------------

    def stats(self) -> ClientStats:
        c = self._counters
        with c._lock:
            return ClientStats(
                sent_predictions=c.sent[PREDICTIONS],
                sent_outcomes=c.sent[OUTCOMES],
                sent_batches=c.sent_batches,
                duplicate_batches=c.duplicate_batches,
                dropped=dict(c.dropped),
                retries=c.retries,
                splits=c.splits,
                sampled_out=c.sampled_out,
                breaker_state=self._delivery.breaker_state,
                buffered=self._buffer.rows + self._in_flight,
                last_errors=dict(c.last_errors),
            )

    def _register_metrics(self, meter_provider: Any) -> None:
        if otel_metrics is None:
            return
        counters = weakref.ref(self._counters)  # the meter must not keep the client alive
        attributes = {"ml.model.name": self.model}

        def dropped(_options: Any) -> Iterator[Any]:
            tally = counters()
            if tally is None:
                return
            with tally._lock:
                items = list(tally.dropped.items())
            for reason, count in items:
                yield otel_metrics.Observation(count, {**attributes, "reason": reason})

        meter = otel_metrics.get_meter("mlsidecar.client", meter_provider=meter_provider)
        meter.create_observable_counter(
            "mlsidecar.client.dropped",
            callbacks=[dropped],
            unit="{event}",
            description="Events the mlsidecar client dropped instead of sending, by reason.",
        )

    # -- the sender's side --------------------------------------------------------------------

    def _wake(self) -> None:
        """Wake the sender now (a full batch is waiting): the thread client sets its event,
        the asyncio client its loop's event. Both subclasses define it."""
        raise NotImplementedError(f"{type(self).__name__} must define _wake")

    def _poke(self) -> None:
        """Start the sender if it waits for a running loop (asyncio client)."""

    def _sender_due(self, now: float, next_flush: float) -> tuple[bool, float]:
        """Whether the sender sends a batch now, and its next timer deadline.

        A full batch goes at once; a partial one when the timer fires or a ``flush``
        waits. The timer sends what is queued now, once: under steady traffic, draining
        "until empty" would send a trickle of tiny batches instead of full ones.
        """
        if now >= next_flush:
            next_flush = now + self.flush_interval_s
            due = True
        else:
            due = self._flush_waiters > 0
        rows = self._buffer.rows
        return rows >= self.batch_rows or (rows > 0 and due), next_flush

    def _closed_with(self, flushed: bool, timeout: float) -> None:
        """The end of ``close``, once the sender has stopped: what is left is dropped."""
        left = self._buffer.drain_all()
        if left:
            self._counters.drop(left, "closed", "the client closed before the agent took them")
        atexit.unregister(self._atexit)
        if not flushed:
            log.warning(
                "mlsidecar client: closed with events undelivered (agent unreachable or "
                "timeout %.1f s); counted in stats().dropped",
                timeout,
            )

    def _cycle(self) -> Iterator[Send | Sleep | None]:
        """Take one batch worth of rows, pack and deliver it.

        Yields ``None`` between packing slices (the driver lets other threads run),
        and the delivery's ``Send`` / ``Sleep`` ops.
        """
        events = self._buffer.take(self.batch_rows)
        if not events:
            return
        taken = sum(e.rows if isinstance(e, Chunk) else 1 for e in events)
        self._in_flight += taken
        try:
            predictions = self._valid_attributes([e for e in events if isinstance(e, Prediction)])
            outcomes = [e for e in events if isinstance(e, Outcome)]
            chunks = [e for e in events if isinstance(e, Chunk)]
            yield None
            for key, rows in group_predictions(predictions, self.class_names):
                batch = yield from build_prediction_batch(key, rows)
                yield from self._delivery.deliver(PREDICTIONS, batch)
            pieces = [chunk.batch for chunk in chunks if chunk.kind == PREDICTIONS]
            for packed in pack_columns(pieces):
                if packed is None:
                    yield None
                else:
                    yield from self._delivery.deliver(PREDICTIONS, packed[1])
            for _rows, batch in pack_outcomes(outcomes):
                yield None
                yield from self._delivery.deliver(OUTCOMES, batch)
            for chunk in chunks:
                if chunk.kind == OUTCOMES:
                    yield from self._delivery.deliver(OUTCOMES, chunk.batch)
        finally:
            self._in_flight -= taken

    def _valid_attributes(self, predictions: list[Prediction]) -> list[Prediction]:
        """``predictions`` without those whose per-call attributes the agent would refuse
        (counted as ``invalid_event``); each distinct mapping is checked once."""
        default = self.attributes
        verdicts: dict[int, str | None] = {}  # id() is unique: the events hold the mappings
        kept: list[Prediction] = []
        for event in predictions:
            attributes = event.attributes
            if attributes is None or attributes is default:
                kept.append(event)
                continue
            key = id(attributes)
            if key in verdicts:
                problem = verdicts[key]
            else:
                problem = verdicts[key] = _attributes_problem(attributes)
            if problem is None:
                kept.append(event)
            else:
                self._counters.drop(1, "invalid_event", problem)
        return kept


class TimedPrediction:
    """What ``client.timed()`` yields: set ``score`` / ``label`` / ``probabilities`` in the block."""

    def __init__(self, id: str, features: Mapping[str, Any] | None, fields: dict[str, Any]):
        self.id = id
        self.features = features
        self.fields = fields
        self.score: float | None = None
        self.label: str | None = None
        self.probabilities: Mapping[str, float] | Sequence[float] | None = None
        self.latency_ms: float | None = None


def _output_fields(result: Any) -> dict[str, Any]:
    """A predict function's return value as log_prediction keywords."""
    if isinstance(result, bool | np.bool_):
        return {"label": str(bool(result))}
    if isinstance(result, int | float | np.number):
        return {"score": float(result)}
    if isinstance(result, str):
        return {"label": result}
    if isinstance(result, Mapping):
        return {k: result[k] for k in ("score", "label", "probabilities") if k in result}
    return {}


def _unique_ids(ids: Any) -> list[str]:
    """The ids of a batch form as strings; a repeated or empty id is a ValueError naming it."""
    ids_list = list(map(str, ids.tolist() if isinstance(ids, np.ndarray) else ids))
    unique = set(ids_list)
    if len(unique) == len(ids_list) and "" not in unique:
        return ids_list  # the usual case, checked in C; the loop below names the culprit
    seen: dict[str, int] = {}
    for index, value in enumerate(ids_list):
        if not value:
            raise ValueError(f"ids[{index}]: empty id")
        first = seen.setdefault(value, index)
        if first != index:
            raise ValueError(f"ids[{index}]: duplicate id {value!r} (first at ids[{first}])")
    return ids_list


def _override_problem(
    model: str | None, model_version: str | None, attributes: Mapping[str, str] | None
) -> str | None:
    """Why the agent would refuse a per-call model, version or attributes (else None)."""
    if model is not None and (not isinstance(model, str) or not MODEL_NAME.fullmatch(model)):
        return f"model: {model!r} does not match [A-Za-z0-9._-]{{1,128}}"
    if model_version is not None and (
        not isinstance(model_version, str) or not VERSION.fullmatch(model_version)
    ):
        return f"model_version: {model_version!r} must be at most 128 printable ASCII characters without spaces"
    if attributes is not None:
        return _attributes_problem(attributes)
    return None


def _attributes_problem(attributes: Mapping[str, str]) -> str | None:
    if not isinstance(attributes, Mapping):
        return f"attributes: expected a mapping of str to str, got {type(attributes).__name__}"
    if len(attributes) > MAX_ATTRIBUTES:
        return f"attributes: {len(attributes)} entries, at most {MAX_ATTRIBUTES}"
    for key, value in attributes.items():
        if not isinstance(key, str) or not 1 <= len(key) <= 128:
            return f"attributes: key {key!r} must be 1-128 characters"
        if not isinstance(value, str) or len(value) > 128:
            return f"attributes[{key!r}]: must be a string of at most 128 characters"
    return None


def _check_version(model_version: Any) -> None:
    if not isinstance(model_version, str) or not VERSION.fullmatch(model_version):
        raise ValueError(
            f"model_version: {model_version!r} must be at most 128 printable ASCII characters without spaces"
        )
