"""Wire messages -> engine columns, with structural validation.

A batch is all or nothing: ``decode_predictions`` either returns columns for
every row or raises ``Rejected`` naming the field and the row. Values are never
a reason to reject (NaN, inf, unknown features, unseen categories are data-quality
signals); structure is (lengths, ids, names, limits).

    cols = decode_predictions(batch, Limits(), received_unix_nano=time.time_ns())
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb
from agent.config import MODEL_NAME_PATTERN
from agent.engine import OutcomeColumns, PredictionColumns

VERSION_PATTERN = re.compile(r"[\x21-\x7e]{0,128}")
MAX_ATTRIBUTES = 8
MAX_ATTRIBUTE_LENGTH = 128


class RejectCode(enum.Enum):
    """Why a batch was not accepted, and so whether the client may retry it."""

    INVALID = "INVALID_ARGUMENT"  # permanent: fix or split the batch
    BUSY = "RESOURCE_EXHAUSTED"  # transient: retry later with the same batch_id
    UNAVAILABLE = "UNAVAILABLE"  # the agent is shutting down


class Rejected(Exception):
    """A batch refused as a whole; ``reason`` is a short label for self-metrics."""

    def __init__(self, reason: str, message: str, code: RejectCode = RejectCode.INVALID) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.code = code


@dataclass(frozen=True, slots=True)
class Limits:
    """Static limits; exceeding one is INVALID_ARGUMENT (split, do not retry)."""

    max_rows: int = 10_000
    max_features: int = 1_000
    max_message_bytes: int = 16 * 1024 * 1024


def check_size(size: int, limits: Limits) -> None:
    if size > limits.max_message_bytes:
        raise Rejected(
            "message_too_large",
            f"message is {size} bytes, over ingest.max_message_bytes={limits.max_message_bytes}; "
            "split the batch",
        )


def _check_model(model: str, version: str) -> None:
    if not MODEL_NAME_PATTERN.fullmatch(model):
        what = (
            "is empty" if not model else f"{model[:140]!r} does not match [A-Za-z0-9._-]{{1,128}}"
        )
        raise Rejected("invalid_model", f"model: {what}")
    if not VERSION_PATTERN.fullmatch(version):
        raise Rejected(
            "invalid_model",
            f"model_version: {version[:140]!r} must be at most 128 printable ASCII characters "
            "without spaces",
        )


def _check_ids(
    ids: Sequence[str], limits: Limits, *, rows: str = "ids", row: str = "ids[{}]"
) -> int:
    """``rows`` names the repeated field and ``row`` one element (the row form: events[i].id)."""
    n = len(ids)
    if n == 0:
        raise Rejected("empty_batch", f"{rows}: the batch has no rows ({rows} is empty)")
    if n > limits.max_rows:
        raise Rejected(
            "too_many_rows",
            f"{rows}: {n} rows exceed ingest.max_rows_per_batch={limits.max_rows}; split the batch",
        )
    unique = set(ids)
    if len(unique) != n or "" in unique:
        seen: dict[str, int] = {}
        for i, id_ in enumerate(ids):
            if not id_:
                raise Rejected("empty_id", f"{row.format(i)}: empty id")
            if id_ in seen:
                raise Rejected(
                    "duplicate_id",
                    f"{row.format(i)}: duplicate id {id_!r} (first at {row.format(seen[id_])})",
                )
            seen[id_] = i
    return n


def _check_length(field: str, actual: int, n: int) -> None:
    if actual not in (0, n):
        raise Rejected(
            "column_length", f"{field}: {actual} values, expected {n} (len(ids)) or none"
        )


def _trace_context(field: str, values: Sequence[bytes], size: int) -> Sequence[bytes] | None:
    """The ids copied out of the message once (a list), each ``size`` bytes or empty."""
    if not len(values):
        return None
    items = values[:]  # a list: later reads (exemplars) do not convert each value again
    if not set(map(len, items)) <= {0, size}:
        for row, value in enumerate(items):
            if len(value) not in (0, size):
                raise Rejected(
                    "invalid_trace_context",
                    f"{field}[{row}]: {len(value)} bytes, expected {size} (or empty)",
                )
    return items


def _check_attributes(attributes: Any) -> dict[str, str]:
    if len(attributes) > MAX_ATTRIBUTES:
        raise Rejected(
            "too_many_attributes",
            f"attributes: {len(attributes)} entries, at most {MAX_ATTRIBUTES} (segments must be "
            "low-cardinality)",
        )
    for key, value in attributes.items():
        if not key or len(key) > MAX_ATTRIBUTE_LENGTH or len(value) > MAX_ATTRIBUTE_LENGTH:
            raise Rejected(
                "invalid_attribute",
                f"attributes[{key[:40]!r}]: keys must be 1-{MAX_ATTRIBUTE_LENGTH} characters and "
                f"values at most {MAX_ATTRIBUTE_LENGTH}",
            )
    return dict(attributes)


def _weight(sample_rate: float) -> float:
    if sample_rate == 0:
        return 1.0
    if not (0 < sample_rate <= 1):  # also false for NaN
        raise Rejected("invalid_sample_rate", f"sample_rate: {sample_rate} is outside (0, 1]")
    return 1.0 / sample_rate


# Below this many values np.fromiter is quicker than np.array on a repeated field (fixed cost).
_SHORT_COLUMN = 32


def _floats(values: Sequence[float]) -> np.ndarray:
    """A float64 copy of a packed double field."""
    n = len(values)
    if n <= _SHORT_COLUMN:
        return np.fromiter(values, dtype=np.float64, count=n)
    return np.array(values, dtype=np.float64)


def _optional_floats(values: Sequence[float]) -> np.ndarray | None:
    return _floats(values) if len(values) else None


def decode_predictions(
    batch: pb.PredictionBatch, limits: Limits, *, received_unix_nano: int
) -> PredictionColumns:
    """Validate a PredictionBatch (columnar or row form) and return its columns."""
    _check_model(batch.model, batch.model_version)
    if batch.events:
        return _decode_prediction_rows(batch, limits, received_unix_nano)
    ids = batch.ids
    n = _check_ids(ids, limits)
    if len(batch.features) > limits.max_features:
        raise Rejected(
            "too_many_features",
            f"features: {len(batch.features)} columns exceed ingest.max_features="
            f"{limits.max_features}",
        )
    numbers: dict[str, np.ndarray] = {}
    categories: dict[str, Sequence[str]] = {}
    for i, column in enumerate(batch.features):
        name = column.name
        if not name:
            raise Rejected("invalid_feature", f"features[{i}]: empty name")
        if name in numbers or name in categories:
            raise Rejected("duplicate_feature", f"features[{i}] {name!r}: duplicate feature name")
        kind = column.WhichOneof("values")
        if kind == "numbers":
            values: Sequence[Any] = column.numbers.values
        elif kind == "categories":
            values = column.categories.values
        else:
            raise Rejected(
                "invalid_feature", f"features[{i}] {name!r}: no values (set numbers or categories)"
            )
        if len(values) != n:
            raise Rejected(
                "column_length",
                f"features[{i}] {name!r}: {len(values)} values, expected {n} (len(ids))",
            )
        if kind == "numbers":
            numbers[name] = _floats(values)
        else:
            categories[name] = values
    _check_length("timestamps_unix_nano", len(batch.timestamps_unix_nano), n)
    _check_length("scores", len(batch.scores), n)
    _check_length("labels", len(batch.labels), n)
    _check_length("latencies_ms", len(batch.latencies_ms), n)
    _check_length("trace_ids", len(batch.trace_ids), n)
    _check_length("span_ids", len(batch.span_ids), n)
    trace_ids = _trace_context("trace_ids", batch.trace_ids, 16)
    span_ids = _trace_context("span_ids", batch.span_ids, 8)
    probabilities = _probabilities(batch.probabilities, batch.class_names, n)
    return PredictionColumns(
        model=batch.model,
        version=batch.model_version,
        ids=ids,
        received_unix_nano=received_unix_nano,
        timestamps_unix_nano=(
            np.array(batch.timestamps_unix_nano, dtype=np.int64)
            if len(batch.timestamps_unix_nano)
            else None
        ),
        numbers=numbers,
        categories=categories,
        scores=_optional_floats(batch.scores),
        labels=batch.labels if len(batch.labels) else None,
        probabilities=probabilities,
        class_names=tuple(batch.class_names),
        latencies_ms=_optional_floats(batch.latencies_ms),
        trace_ids=trace_ids,
        span_ids=span_ids,
        attributes=_check_attributes(batch.attributes),
        weight=_weight(batch.sample_rate),
    )


def _probabilities(
    values: Sequence[float], class_names: Sequence[str], n: int
) -> np.ndarray | None:
    k = len(class_names)
    if not values:
        return None
    if k == 0:
        raise Rejected(
            "probabilities", f"probabilities: {len(values)} values but class_names is empty"
        )
    if len(set(class_names)) != k or "" in class_names:
        raise Rejected("probabilities", "class_names: names must be unique and non-empty")
    if len(values) != n * k:
        raise Rejected(
            "probabilities",
            f"probabilities: {len(values)} values, expected {n * k} "
            f"(len(ids)={n} x len(class_names)={k})",
        )
    return np.array(values, dtype=np.float64).reshape(n, k)


_COLUMN_FIELDS = (
    "ids",
    "timestamps_unix_nano",
    "features",
    "scores",
    "labels",
    "probabilities",
    "latencies_ms",
    "trace_ids",
    "span_ids",
)


def _decode_prediction_rows(
    batch: pb.PredictionBatch, limits: Limits, received_unix_nano: int
) -> PredictionColumns:
    """The row form: slower (a Python loop per event), meant for grpcurl and small clients."""
    mixed = [f for f in _COLUMN_FIELDS if len(getattr(batch, f))]
    if mixed:
        raise Rejected(
            "mixed_forms",
            f"events: the row form cannot be combined with columns ({', '.join(mixed)})",
        )
    events = batch.events
    ids = [e.id for e in events]
    n = _check_ids(ids, limits, rows="events", row="events[{}].id")
    k = len(batch.class_names)
    uniform = _uniform_numbers(events, limits.max_features)
    numbers: dict[str, np.ndarray] = {} if uniform is None else uniform
    categories: dict[str, list[str]] = {}
    scores = _optional_event_floats(events, "score")
    latencies = _optional_event_floats(events, "latency_ms")
    labels = [e.label for e in events]
    probabilities = np.full((n, k), np.nan) if k else None
    for row, event in enumerate(events):
        if uniform is None:  # else the features were read (and are valid) already
            _add_event_features(row, event, numbers, categories, n, limits)
        if event.probabilities:
            if probabilities is None or len(event.probabilities) != k:
                raise Rejected(
                    "probabilities",
                    f"events[{row}].probabilities: {len(event.probabilities)} values, expected "
                    f"{k} (len(class_names))",
                )
            probabilities[row] = event.probabilities
        if len(event.trace_id) not in (0, 16) or len(event.span_id) not in (0, 8):
            raise Rejected(
                "invalid_trace_context",
                f"events[{row}]: trace_id must be 16 bytes and span_id 8 bytes (or empty)",
            )
    if k and (len(set(batch.class_names)) != k or "" in batch.class_names):
        raise Rejected("probabilities", "class_names: names must be unique and non-empty")
    trace_ids = [e.trace_id for e in events]
    timestamps = [e.timestamp_unix_nano for e in events]
    return PredictionColumns(
        model=batch.model,
        version=batch.model_version,
        ids=ids,
        received_unix_nano=received_unix_nano,
        timestamps_unix_nano=np.array(timestamps, dtype=np.int64) if any(timestamps) else None,
        numbers=numbers,
        categories=categories,
        scores=scores,
        labels=labels if any(labels) else None,
        probabilities=probabilities,
        class_names=tuple(batch.class_names),
        latencies_ms=latencies,
        trace_ids=trace_ids if any(trace_ids) else None,
        span_ids=[e.span_id for e in events] if any(trace_ids) else None,
        attributes=_check_attributes(batch.attributes),
        weight=_weight(batch.sample_rate),
    )


def _uniform_numbers(events: Sequence[Any], max_features: int) -> dict[str, np.ndarray] | None:
    """The row form's numeric columns in one pass per feature, when every event has the same
    numeric features (in the same order) and none has categorical ones: the common case.

    None otherwise: ``_add_event_features`` then reads (and validates) event by event.
    """
    maps = [e.numbers for e in events]
    names = list(maps[0])
    if len(names) > max_features or any(e.categories for e in events):
        return None
    if any(list(m) != names for m in maps):
        return None
    return {name: np.array([m[name] for m in maps], dtype=np.float64) for name in names}


def _check_feature_room(row: int, features: int, limits: Limits) -> None:
    if features >= limits.max_features:
        raise Rejected(
            "too_many_features",
            f"events[{row}]: more than ingest.max_features={limits.max_features} distinct features",
        )


def _add_event_features(
    row: int,
    event: Any,
    numbers: dict[str, np.ndarray],
    categories: dict[str, list[str]],
    n: int,
    limits: Limits,
) -> None:
    """Put one event's features into the columns, which grow a feature at a time."""
    kinds: tuple[tuple[str, Any, dict[str, Any], dict[str, Any], str, Any], ...] = (
        ("numbers", event.numbers, numbers, categories, "categorical", lambda: np.full(n, np.nan)),
        ("categories", event.categories, categories, numbers, "numeric", lambda: [""] * n),
    )
    for field, values, own, other, other_kind, new_column in kinds:
        for name, value in values.items():
            if name in other:
                raise Rejected(
                    "invalid_feature",
                    f"events[{row}].{field}[{name!r}]: feature is {other_kind} in other rows",
                )
            column = own.get(name)
            if column is None:
                _check_feature_room(row, len(numbers) + len(categories), limits)
                column = own[name] = new_column()
            column[row] = value


def _optional_event_floats(events: Sequence[Any], field: str) -> np.ndarray | None:
    """An optional double of every event as a column (NaN where unset), or None if never set."""
    present = [e.HasField(field) for e in events]
    if not any(present):
        return None
    return np.array(
        [getattr(e, field) if p else np.nan for e, p in zip(events, present, strict=True)],
        dtype=np.float64,
    )


def decode_outcomes(
    batch: pb.OutcomeBatch, limits: Limits, *, received_unix_nano: int
) -> OutcomeColumns:
    """Validate an OutcomeBatch and return its columns."""
    _check_model(batch.model, batch.model_version)
    n = _check_ids(batch.ids, limits)
    has_values, has_labels = len(batch.actual_values) > 0, len(batch.actual_labels) > 0
    if has_values == has_labels:
        raise Rejected(
            "invalid_outcome",
            "actual_values, actual_labels: set exactly one of them"
            + (" (both are set)" if has_values else " (neither is set)"),
        )
    if has_values and len(batch.actual_values) != n:
        raise Rejected(
            "column_length",
            f"actual_values: {len(batch.actual_values)} values, expected {n} (len(ids))",
        )
    if has_labels and len(batch.actual_labels) != n:
        raise Rejected(
            "column_length",
            f"actual_labels: {len(batch.actual_labels)} values, expected {n} (len(ids))",
        )
    _check_length("timestamps_unix_nano", len(batch.timestamps_unix_nano), n)
    return OutcomeColumns(
        model=batch.model,
        version=batch.model_version,
        ids=batch.ids,
        received_unix_nano=received_unix_nano,
        actual_values=_optional_floats(batch.actual_values),
        actual_labels=batch.actual_labels if has_labels else None,
        timestamps_unix_nano=(
            np.array(batch.timestamps_unix_nano, dtype=np.int64)
            if len(batch.timestamps_unix_nano)
            else None
        ),
    )
