"""Buffered events and their packing into columnar ``PredictionBatch`` / ``OutcomeBatch``.

A logged event is a plain tuple (cheap to build on the caller's thread); the sender
packs a list of them into batches, one per (model, version, attributes, class names):

    for key, rows in group_predictions(events, class_names=None):
        batch = yield from build_prediction_batch(key, rows)
    first, second = split(batch)                      # when the agent says "split the batch"
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb

NAN = math.nan
# Rows packed per slice of the sender (between two yields): about 0.1-0.2 ms of the GIL.
SLICE_ROWS = 256
PREDICTIONS = "predictions"
OUTCOMES = "outcomes"


class Prediction(NamedTuple):
    """One ``log_prediction`` call, as buffered (features as given, ids as ints)."""

    id: str
    features: Mapping[str, Any] | None
    score: float | None
    label: str | None
    probabilities: Mapping[str, float] | Sequence[float] | None
    latency_ms: float | None
    model: str
    model_version: str
    attributes: Mapping[str, str] | None
    trace_id: int
    span_id: int
    time_ns: int


class Outcome(NamedTuple):
    """One ``log_outcome`` call, as buffered."""

    id: str
    value: float | None
    label: str | None
    model: str
    model_version: str
    time_ns: int


class Columns(NamedTuple):
    """A piece of one ``log_predictions`` call as queued: copies of its columns, no batch yet.

    The sender concatenates the queued pieces that share a ``key`` into one batch
    (``pack_columns``): a service that logs 20 rows per request sends one RPC per
    ``batch_rows`` rows, not one per request, and the caller never builds protobufs.
    """

    # (model, version, sorted attributes, class names or None, feature names,
    #  (has scores, has labels, has latencies, has trace)): equal keys (and equal kinds
    #  of feature arrays, see array_kind) concatenate.
    key: tuple
    ids: list[str]
    time_ns: int
    features: list[np.ndarray]  # in the order of the key's feature names
    scores: np.ndarray | None
    labels: np.ndarray | None  # as given: made strings when packed
    latencies_ms: np.ndarray | None
    probabilities: np.ndarray | None  # (rows, len(class names))
    trace_id: bytes
    span_id: bytes


class Chunk(NamedTuple):
    """A batch-form call queued as one buffer item of ``rows`` rows.

    ``batch`` is ``Columns`` for predictions and a ready ``pb.OutcomeBatch`` for outcomes.
    """

    kind: str
    rows: int
    batch: Any


Event = Prediction | Outcome | Chunk


def trace_bytes(trace_id: int, span_id: int) -> tuple[bytes, bytes]:
    if not trace_id:
        return b"", b""
    return trace_id.to_bytes(16, "big"), span_id.to_bytes(8, "big")


def _is_number(value: Any) -> bool:
    # bool is an int: True/False go as 1/0, as numpy booleans do in the batch form
    return isinstance(value, int | float | np.number | np.bool_)


# The types a feature value usually has; checked per column by type, not per value.
NUMERIC_TYPES = frozenset(
    {float, int, bool, type(None), np.float64, np.float32, np.int64, np.int32, np.bool_}
)


def feature_column(name: str, values: list[Any]) -> Any:
    """One ``pb.Column``: numbers when every present value is a number, else categories.

    Missing values (absent or None) are NaN or "" as the wire contract says.
    """
    types = set(map(type, values))
    if types <= NUMERIC_TYPES or all(v is None or _is_number(v) for v in values):
        # numpy turns None into NaN and converts the column in C
        numbers = np.array(values, dtype=np.float64)
        return pb.Column(name=name, numbers=pb.NumberValues(values=numbers))
    return pb.Column(
        name=name,
        categories=pb.CategoryValues(values=["" if v is None else str(v) for v in values]),
    )


def group_predictions(
    events: list[Prediction], class_names: Sequence[str] | None
) -> list[tuple[tuple, list[Prediction]]]:
    """``events`` by (model, version, attributes, class names): one batch each."""
    default_classes = tuple(class_names) if class_names else None
    # Requests usually share one attributes mapping between their rows: sort it once.
    # id() is unique here because the events hold their mappings for the whole call.
    sorted_attributes: dict[int, tuple] = {}

    def key_of(event: Prediction) -> tuple:
        attributes: tuple = ()
        if event.attributes:
            attributes = sorted_attributes.get(id(event.attributes), ())
            if not attributes:
                attributes = tuple(sorted(event.attributes.items()))
                sorted_attributes[id(event.attributes)] = attributes
        probabilities = event.probabilities
        if probabilities is None:
            classes: tuple[str, ...] | None = None
        elif isinstance(probabilities, Mapping):
            classes = tuple(str(name) for name in probabilities)
        else:
            classes = default_classes
        return (event.model, event.model_version, attributes, classes)

    return unique_id_groups(events, key_of)


def unique_id_groups(events: list[Any], key_of: Callable[[Any], tuple]) -> list[tuple[tuple, list]]:
    """``events`` grouped by ``key_of``, in order, with ids unique within each group.

    The agent refuses a whole batch that repeats an id, so an id logged twice before a
    send goes to a second batch of the same key instead of costing its neighbours.
    """
    groups: dict[tuple[tuple, int], tuple[list[Any], set[str]]] = {}
    for event in events:
        key, generation = key_of(event), 0
        while True:
            entry = groups.get((key, generation))
            if entry is None:
                groups[(key, generation)] = ([event], {event.id})
                break
            rows, ids = entry
            if event.id not in ids:
                rows.append(event)
                ids.add(event.id)
                break
            generation += 1
    return [(key, rows) for (key, _), (rows, _) in groups.items()]


def array_kind(values: np.ndarray) -> str:
    """How a batch-form column goes on the wire: "n" numbers, "s" strings, "o" decided by value."""
    kind = values.dtype.kind
    return "n" if kind in "fiub" else "s" if kind in "US" else "o"


def array_column(column: Any, values: np.ndarray) -> Generator[None, None, None]:
    """Fill ``pb.Column`` ``column`` from a batch-form array, ``SLICE_ROWS`` values per
    slice (it yields between them), without a Python loop where numpy has one."""
    kind = array_kind(values)
    if kind == "n":  # booleans go as 1/0, as in log_prediction
        column.numbers.SetInParent()  # a column of no rows is still a number column
        # via a list: upb converts a list of floats twice as fast as numpy scalars
        yield from _extend(column.numbers.values, values.astype(np.float64))
    elif kind == "s":  # numpy strings cannot be missing: no per-value check
        column.categories.SetInParent()
        if values.dtype.kind == "S":
            values = np.char.decode(values)
        yield from _extend(column.categories.values, values)
    else:
        packed = feature_column(column.name, [None if _missing(v) else v for v in values.tolist()])
        column.CopyFrom(packed)


def _extend(field: Any, values: np.ndarray) -> Generator[None, None, None]:
    for lo in range(0, len(values), SLICE_ROWS):
        if lo:
            yield
        field.extend(values[lo : lo + SLICE_ROWS].tolist())


def _missing(value: Any) -> bool:
    """None, NaN, and pandas' NA / NaT (told by type name: pandas is not imported here)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return type(value).__name__ in ("NAType", "NaTType")


def pack_columns(pieces: list[Columns]) -> Generator[tuple[int, Any] | None, None, None]:
    """Concatenate queued ``log_predictions`` pieces into batches; yields ``None`` between
    columns (a packing slice) and ``(rows, batch)`` for each batch ready to send.

    Pieces join the first batch of their key whose ids they do not repeat (the agent
    refuses a batch that repeats an id), so a repeated id costs a second batch, not data.
    """
    groups: dict[tuple[tuple, tuple[str, ...], int], tuple[list[Columns], set[str]]] = {}
    for piece in pieces:
        kinds = tuple(array_kind(values) for values in piece.features)
        generation = 0
        while True:
            entry = groups.get((piece.key, kinds, generation))
            if entry is None:
                groups[(piece.key, kinds, generation)] = ([piece], set(piece.ids))
                break
            parts, ids = entry
            if ids.isdisjoint(piece.ids):
                parts.append(piece)
                ids.update(piece.ids)
                break
            generation += 1
    for (key, _, _), (parts, _) in groups.items():
        yield None
        batch = yield from _columns_batch(key, parts)
        yield len(batch.ids), batch


def _columns_batch(key: tuple, parts: list[Columns]) -> Generator[None, None, Any]:
    model, version, attributes, classes, names, present = key
    has_scores, _, has_latencies, has_trace = present  # labels: part.labels is set
    batch = pb.PredictionBatch(model=model, model_version=version, attributes=dict(attributes))
    since_yield = 0
    for part in parts:
        rows = len(part.ids)
        batch.ids.extend(part.ids)
        batch.timestamps_unix_nano.extend([part.time_ns] * rows)
        if part.labels is not None:  # has_labels
            batch.labels.extend(map(str, part.labels.tolist()))
        if has_trace:
            batch.trace_ids.extend([part.trace_id] * rows)
            batch.span_ids.extend([part.span_id] * rows)
        since_yield += rows
        if since_yield >= SLICE_ROWS:
            since_yield = 0
            yield
    for j, name in enumerate(names):
        yield
        yield from array_column(
            batch.features.add(name=name), _joined([part.features[j] for part in parts])
        )
    if has_scores:
        yield
        yield from _extend(batch.scores, _joined([part.scores for part in parts]))
    if has_latencies:
        yield
        yield from _extend(batch.latencies_ms, _joined([part.latencies_ms for part in parts]))
    if classes:
        yield
        batch.class_names.extend(classes)
        yield from _extend(
            batch.probabilities, _joined([part.probabilities for part in parts]).ravel()
        )
    return batch


def _joined(arrays: list[Any]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def build_prediction_batch(key: tuple, rows: list[Prediction]) -> Generator[None, None, Any]:
    """A columnar ``pb.PredictionBatch`` of ``rows``; yields between columns.

    The sender runs it in slices (``yield``) so that it never holds the GIL (or the
    event loop) for long: a model service's threads keep their latency.
    """
    model, version, attributes, classes = key
    names: dict[str, None] = {}
    for i, row in enumerate(rows, 1):
        # rows nearly always share their feature names: a C-level subset check, no copy
        if row.features and not row.features.keys() <= names.keys():
            names.update(dict.fromkeys(row.features))
        if i % 128 == 0:
            yield
    yield
    batch = pb.PredictionBatch(
        model=model,
        model_version=version,
        ids=[row.id for row in rows],
        timestamps_unix_nano=[row.time_ns for row in rows],
        attributes=dict(attributes),
    )
    yield
    for name in names:
        values = [row.features.get(name) if row.features else None for row in rows]
        batch.features.append(feature_column(name, values))
        yield
    if any(row.score is not None for row in rows):
        batch.scores.extend([NAN if row.score is None else row.score for row in rows])
    if any(row.label is not None for row in rows):
        batch.labels.extend(["" if row.label is None else row.label for row in rows])
    if any(row.latency_ms is not None for row in rows):
        batch.latencies_ms.extend(
            [NAN if row.latency_ms is None else row.latency_ms for row in rows]
        )
    yield
    if classes:
        batch.class_names.extend(classes)
        width = len(classes)
        flat: list[float] = []
        for row in rows:
            p = row.probabilities
            if p is None:
                flat.extend([NAN] * width)
            elif isinstance(p, Mapping):
                flat.extend(float(p.get(name, NAN)) for name in classes)
            else:
                flat.extend(float(v) for v in p)
        batch.probabilities.extend(flat)
        yield
    if any(row.trace_id for row in rows):
        pairs = [trace_bytes(row.trace_id, row.span_id) for row in rows]
        batch.trace_ids.extend([t for t, _ in pairs])
        batch.span_ids.extend([s for _, s in pairs])
    return batch


def pack_outcomes(events: list[Outcome]) -> Iterator[tuple[int, Any]]:
    """Columnar outcome batches, one per model, version and kind (values or labels)."""
    groups = unique_id_groups(
        events, lambda event: (event.model, event.model_version, event.label is not None)
    )
    for (model, version, by_label), rows in groups:
        batch = pb.OutcomeBatch(
            model=model,
            model_version=version,
            ids=[row.id for row in rows],
            timestamps_unix_nano=[row.time_ns for row in rows],
        )
        if by_label:
            batch.actual_labels.extend([row.label or "" for row in rows])
        else:
            batch.actual_values.extend([NAN if row.value is None else row.value for row in rows])
        yield len(rows), batch


def rows_of(batch: Any) -> int:
    return len(batch.ids)


def split(batch: Any) -> tuple[Any, Any]:
    """Two halves of a columnar batch (predictions or outcomes), every column cut alike."""
    n = len(batch.ids)
    half = n // 2
    first, second = type(batch)(), type(batch)()
    for part, lo, hi in ((first, 0, half), (second, half, n)):
        part.model = batch.model
        part.model_version = batch.model_version
        part.ids.extend(batch.ids[lo:hi])
        if batch.timestamps_unix_nano:
            part.timestamps_unix_nano.extend(batch.timestamps_unix_nano[lo:hi])
        if isinstance(batch, pb.OutcomeBatch):
            if batch.actual_labels:
                part.actual_labels.extend(batch.actual_labels[lo:hi])
            else:
                part.actual_values.extend(batch.actual_values[lo:hi])
            continue
        for column in batch.features:
            if column.HasField("numbers"):
                part.features.add(
                    name=column.name,
                    numbers=pb.NumberValues(values=column.numbers.values[lo:hi]),
                )
            else:
                part.features.add(
                    name=column.name,
                    categories=pb.CategoryValues(values=column.categories.values[lo:hi]),
                )
        for field in ("scores", "labels", "latencies_ms", "trace_ids", "span_ids"):
            values = getattr(batch, field)
            if values:
                getattr(part, field).extend(values[lo:hi])
        if batch.class_names:
            width = len(batch.class_names)
            part.class_names.extend(batch.class_names)
            part.probabilities.extend(batch.probabilities[lo * width : hi * width])
        part.attributes.update(batch.attributes)
        part.sample_rate = batch.sample_rate
    return first, second
