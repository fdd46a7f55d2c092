"""decode_predictions / decode_outcomes on wire messages, no server: columns out, or a
Rejected naming the field and the row."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb
from agent.ingest.decode import (
    Limits,
    RejectCode,
    Rejected,
    check_size,
    decode_outcomes,
    decode_predictions,
)

NOW = 1_700_000_000_123_456_789
TRACE = [bytes([i + 1]) * 16 for i in range(4)]
SPAN = [bytes([i + 1]) * 8 for i in range(4)]


def decode(batch: pb.PredictionBatch, limits: Limits | None = None):
    # Through the wire format, as the servers see it.
    message = pb.PredictionBatch.FromString(batch.SerializeToString())
    return decode_predictions(message, limits or Limits(), received_unix_nano=NOW)


def decode_out(batch: pb.OutcomeBatch, limits: Limits | None = None):
    message = pb.OutcomeBatch.FromString(batch.SerializeToString())
    return decode_outcomes(message, limits or Limits(), received_unix_nano=NOW)


def rejected(batch, limits: Limits | None = None, *, outcome: bool = False) -> Rejected:
    with pytest.raises(Rejected) as info:
        (decode_out if outcome else decode)(batch, limits)
    assert info.value.code is RejectCode.INVALID
    assert str(info.value) == info.value.message
    return info.value


def numbers(name: str, values) -> pb.Column:
    return pb.Column(name=name, numbers=pb.NumberValues(values=values))


def categories(name: str, values) -> pb.Column:
    return pb.Column(name=name, categories=pb.CategoryValues(values=values))


def assert_float64(array, n: int) -> None:
    assert isinstance(array, np.ndarray)
    assert array.dtype == np.float64
    assert array.shape == (n,)


# --- the columnar form ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 31, 32, 33, 1000])
def test_columnar_numbers_become_float64_arrays_of_len_ids(n):
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=n), rng.normal(size=n)
    x[0] = math.nan
    cols = decode(
        pb.PredictionBatch(
            model="m",
            ids=[f"id{i}" for i in range(n)],
            features=[numbers("x", x), numbers("y", y)],
            scores=rng.random(n),
            latencies_ms=rng.random(n) * 100,
        )
    )
    assert cols.rows == n
    assert list(cols.numbers) == ["x", "y"]
    for name, expected in (("x", x), ("y", y)):
        assert_float64(cols.numbers[name], n)
        np.testing.assert_array_equal(cols.numbers[name], expected)
    assert_float64(cols.scores, n)
    assert_float64(cols.latencies_ms, n)
    assert cols.categories == {}


def test_columnar_batch_keeps_every_column():
    cols = decode(
        pb.PredictionBatch(
            model="churn-model_1.2",
            model_version="2024-06-01",
            ids=["a", "b", "c"],
            timestamps_unix_nano=[1, 2, 3],
            features=[numbers("x", [1, 2, 3]), categories("plan", ["basic", "", "pro"])],
            scores=[0.1, 0.5, 0.9],
            labels=["no", "no", "yes"],
            probabilities=[0.9, 0.1, 0.5, 0.5, 0.1, 0.9],
            class_names=["no", "yes"],
            latencies_ms=[1.5, 2.5, 3.5],
            trace_ids=[TRACE[0], b"", TRACE[2]],
            span_ids=[SPAN[0], b"", SPAN[2]],
            attributes={"region": "eu"},
            sample_rate=0.25,
            batch_id="b-1",
        )
    )
    assert (cols.model, cols.version) == ("churn-model_1.2", "2024-06-01")
    assert list(cols.ids) == ["a", "b", "c"]
    assert cols.received_unix_nano == NOW
    assert cols.timestamps_unix_nano.dtype == np.int64
    assert cols.timestamps_unix_nano.tolist() == [1, 2, 3]
    assert list(cols.categories["plan"]) == ["basic", "", "pro"]
    assert list(cols.labels) == ["no", "no", "yes"]
    assert cols.probabilities.shape == (3, 2)
    assert cols.probabilities.dtype == np.float64
    assert cols.probabilities[2].tolist() == [0.1, 0.9]
    assert cols.class_names == ("no", "yes")
    assert list(cols.trace_ids) == [TRACE[0], b"", TRACE[2]]
    assert list(cols.span_ids) == [SPAN[0], b"", SPAN[2]]
    assert cols.attributes == {"region": "eu"}
    assert cols.weight == 4.0


def test_optional_columns_are_none_when_absent():
    cols = decode(pb.PredictionBatch(model="m", ids=["a"]))
    assert cols.scores is None
    assert cols.latencies_ms is None
    assert cols.labels is None
    assert cols.probabilities is None
    assert cols.timestamps_unix_nano is None
    assert cols.trace_ids is None and cols.span_ids is None
    assert cols.numbers == {} and cols.categories == {}
    assert cols.weight == 1.0  # sample_rate unset means 1


def test_odd_values_are_accepted():
    cols = decode(
        pb.PredictionBatch(
            model="m",
            ids=["a", "b", "c"],
            features=[numbers("x", [math.nan, math.inf, -math.inf])],
            scores=[math.nan, 2.0, -1.0],
            latencies_ms=[-5.0, math.inf, 0.0],
        )
    )
    assert math.isnan(cols.numbers["x"][0]) and cols.numbers["x"][1] == math.inf
    assert cols.scores[1] == 2.0


# --- columnar errors name the field and the row -----------------------------------------------


def batch(**fields) -> pb.PredictionBatch:
    fields.setdefault("model", "m")
    fields.setdefault("ids", ["a", "b"])
    return pb.PredictionBatch(**fields)


@pytest.mark.parametrize(
    ("message", "reason", "text"),
    [
        (batch(ids=[]), "empty_batch", "ids: the batch has no rows (ids is empty)"),
        (batch(ids=["a", ""]), "empty_id", "ids[1]: empty id"),
        (
            batch(ids=["a", "b", "a"]),
            "duplicate_id",
            "ids[2]: duplicate id 'a' (first at ids[0])",
        ),
        (batch(model=""), "invalid_model", "model: is empty"),
        (
            batch(model="bad model"),
            "invalid_model",
            "model: 'bad model' does not match [A-Za-z0-9._-]{1,128}",
        ),
        (
            batch(model_version="v 1"),
            "invalid_model",
            "model_version: 'v 1' must be at most 128 printable ASCII characters without spaces",
        ),
        (
            batch(features=[numbers("x", [1, 2]), numbers("y", [1])]),
            "column_length",
            "features[1] 'y': 1 values, expected 2 (len(ids))",
        ),
        (
            batch(features=[numbers("x", [1, 2]), numbers("x", [1, 2])]),
            "duplicate_feature",
            "features[1] 'x': duplicate feature name",
        ),
        (
            batch(features=[numbers("x", [1, 2]), categories("x", ["u", "v"])]),
            "duplicate_feature",
            "features[1] 'x': duplicate feature name",
        ),
        (batch(features=[numbers("", [1, 2])]), "invalid_feature", "features[0]: empty name"),
        (
            batch(features=[pb.Column(name="x")]),
            "invalid_feature",
            "features[0] 'x': no values (set numbers or categories)",
        ),
        (batch(scores=[0.5]), "column_length", "scores: 1 values, expected 2 (len(ids)) or none"),
        (
            batch(labels=["a", "b", "c"]),
            "column_length",
            "labels: 3 values, expected 2 (len(ids)) or none",
        ),
        (
            batch(latencies_ms=[1.0]),
            "column_length",
            "latencies_ms: 1 values, expected 2 (len(ids)) or none",
        ),
        (
            batch(timestamps_unix_nano=[1]),
            "column_length",
            "timestamps_unix_nano: 1 values, expected 2 (len(ids)) or none",
        ),
        (
            batch(trace_ids=[TRACE[0]], span_ids=SPAN[:2]),
            "column_length",
            "trace_ids: 1 values, expected 2 (len(ids)) or none",
        ),
        (
            batch(trace_ids=[TRACE[0], TRACE[1][:15]]),
            "invalid_trace_context",
            "trace_ids[1]: 15 bytes, expected 16 (or empty)",
        ),
        (
            batch(trace_ids=TRACE[:2], span_ids=[SPAN[0] + b"x", SPAN[1]]),
            "invalid_trace_context",
            "span_ids[0]: 9 bytes, expected 8 (or empty)",
        ),
        (
            batch(probabilities=[0.5, 0.5]),
            "probabilities",
            "probabilities: 2 values but class_names is empty",
        ),
        (
            batch(probabilities=[0.5, 0.5, 0.5], class_names=["a", "b"]),
            "probabilities",
            "probabilities: 3 values, expected 4 (len(ids)=2 x len(class_names)=2)",
        ),
        (
            batch(probabilities=[0.5] * 4, class_names=["a", "a"]),
            "probabilities",
            "class_names: names must be unique and non-empty",
        ),
        (batch(sample_rate=1.5), "invalid_sample_rate", "sample_rate: 1.5 is outside (0, 1]"),
        (batch(sample_rate=-0.5), "invalid_sample_rate", "sample_rate: -0.5 is outside (0, 1]"),
        (batch(sample_rate=math.nan), "invalid_sample_rate", "sample_rate: nan is outside (0, 1]"),
        (
            batch(attributes={f"k{i}": "v" for i in range(9)}),
            "too_many_attributes",
            "attributes: 9 entries, at most 8 (segments must be low-cardinality)",
        ),
        (
            batch(attributes={"k": "v" * 129}),
            "invalid_attribute",
            "attributes['k']: keys must be 1-128 characters and values at most 128",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and " " not in v else None,
)
def test_columnar_errors_name_the_field_and_row(message, reason, text):
    error = rejected(message)
    assert (error.reason, error.message) == (reason, text)


def test_static_limits_are_invalid_argument():
    limits = Limits(max_rows=2, max_features=1, max_message_bytes=1024)
    error = rejected(batch(ids=["a", "b", "c"]), limits)
    assert error.message == ("ids: 3 rows exceed ingest.max_rows_per_batch=2; split the batch")
    error = rejected(batch(features=[numbers("x", [1, 2]), numbers("y", [1, 2])]), limits)
    assert error.message == "features: 2 columns exceed ingest.max_features=1"
    with pytest.raises(
        Rejected, match=r"message is 1025 bytes, over ingest\.max_message_bytes=1024"
    ):
        check_size(1025, limits)
    check_size(1024, limits)


def test_the_first_problem_is_reported():
    # Both trace and span ids are wrong: trace_ids is checked first, and its first bad row.
    error = rejected(
        batch(
            ids=["a", "b", "c"],
            trace_ids=[TRACE[0], b"x", b"yy"],
            span_ids=[b"z", SPAN[1], SPAN[2]],
        )
    )
    assert error.message == "trace_ids[1]: 1 bytes, expected 16 (or empty)"


# --- the row form ---------------------------------------------------------------------------


def event(id_: str, **fields) -> pb.PredictionEvent:
    return pb.PredictionEvent(id=id_, **fields)


def rows(*events: pb.PredictionEvent, **fields) -> pb.PredictionBatch:
    fields.setdefault("model", "m")
    return pb.PredictionBatch(events=list(events), **fields)


def test_row_form_with_missing_features_yields_nan():
    cols = decode(
        rows(
            event("a", numbers={"x": 1.0, "y": 2.0}, categories={"c": "u"}),
            event("b", numbers={"x": 3.0}),
            event("c", numbers={"y": 4.0}, categories={"d": "w"}),
        )
    )
    assert list(cols.ids) == ["a", "b", "c"]
    assert set(cols.numbers) == {"x", "y"}
    for column in cols.numbers.values():
        assert_float64(column, 3)
    np.testing.assert_array_equal(cols.numbers["x"], [1.0, 3.0, math.nan])
    np.testing.assert_array_equal(cols.numbers["y"], [2.0, math.nan, 4.0])
    assert cols.categories == {"c": ["u", "", ""], "d": ["", "", "w"]}


@pytest.mark.parametrize("n", [1, 5, 40])
def test_row_form_with_the_same_features_everywhere(n):
    cols = decode(
        rows(*(event(f"e{i}", numbers={"x": float(i), "y": -float(i)}) for i in range(n)))
    )
    assert set(cols.numbers) == {"x", "y"}
    assert_float64(cols.numbers["x"], n)
    assert cols.numbers["x"].tolist() == [float(i) for i in range(n)]
    assert cols.numbers["y"].tolist() == [-float(i) for i in range(n)]
    assert cols.categories == {}


def test_row_form_optional_fields():
    cols = decode(
        rows(
            event("a", score=0.25, latency_ms=3.0, label="yes", trace_id=TRACE[0], span_id=SPAN[0]),
            event("b", timestamp_unix_nano=77),
            event("c", score=0.0, probabilities=[0.3, 0.7]),
            class_names=["no", "yes"],
            sample_rate=0.5,
            attributes={"region": "eu"},
        )
    )
    np.testing.assert_array_equal(cols.scores, [0.25, math.nan, 0.0])  # 0.0 is a value
    np.testing.assert_array_equal(cols.latencies_ms, [3.0, math.nan, math.nan])
    assert_float64(cols.scores, 3)
    assert list(cols.labels) == ["yes", "", ""]
    assert cols.timestamps_unix_nano.tolist() == [0, 77, 0]
    np.testing.assert_array_equal(
        cols.probabilities, [[math.nan, math.nan], [math.nan, math.nan], [0.3, 0.7]]
    )
    assert cols.class_names == ("no", "yes")
    assert list(cols.trace_ids) == [TRACE[0], b"", b""]
    assert list(cols.span_ids) == [SPAN[0], b"", b""]
    assert cols.weight == 2.0
    assert cols.attributes == {"region": "eu"}


def test_row_form_absent_optional_fields_are_none():
    cols = decode(rows(event("a"), event("b")))
    assert cols.scores is None and cols.latencies_ms is None
    assert cols.labels is None and cols.timestamps_unix_nano is None
    assert cols.trace_ids is None and cols.span_ids is None
    assert cols.probabilities is None
    assert cols.numbers == {} and cols.categories == {}


@pytest.mark.parametrize(
    ("message", "reason", "text"),
    [
        (
            rows(event("a", numbers={"x": 1.0}), ids=["a"]),
            "mixed_forms",
            "events: the row form cannot be combined with columns (ids)",
        ),
        (
            rows(event("a"), scores=[1.0], trace_ids=[TRACE[0]]),
            "mixed_forms",
            "events: the row form cannot be combined with columns (scores, trace_ids)",
        ),
        (rows(event("a"), event("")), "empty_id", "events[1].id: empty id"),
        (
            rows(event("a"), event("b"), event("a")),
            "duplicate_id",
            "events[2].id: duplicate id 'a' (first at events[0].id)",
        ),
        (
            rows(event("a", numbers={"x": 1.0}), event("b", categories={"x": "u"})),
            "invalid_feature",
            "events[1].categories['x']: feature is numeric in other rows",
        ),
        (
            rows(event("a", categories={"x": "u"}), event("b", numbers={"x": 1.0})),
            "invalid_feature",
            "events[1].numbers['x']: feature is categorical in other rows",
        ),
        (
            rows(event("a", probabilities=[0.5, 0.5])),
            "probabilities",
            "events[0].probabilities: 2 values, expected 0 (len(class_names))",
        ),
        (
            rows(event("a"), event("b", probabilities=[1.0]), class_names=["x", "y"]),
            "probabilities",
            "events[1].probabilities: 1 values, expected 2 (len(class_names))",
        ),
        (
            rows(event("a", probabilities=[0.5, 0.5]), class_names=["x", "x"]),
            "probabilities",
            "class_names: names must be unique and non-empty",
        ),
        (
            rows(event("a"), event("b", trace_id=b"short")),
            "invalid_trace_context",
            "events[1]: trace_id must be 16 bytes and span_id 8 bytes (or empty)",
        ),
        (
            rows(event("a", trace_id=TRACE[0], span_id=b"\x01" * 9)),
            "invalid_trace_context",
            "events[0]: trace_id must be 16 bytes and span_id 8 bytes (or empty)",
        ),
        (
            rows(event("a"), sample_rate=2.0),
            "invalid_sample_rate",
            "sample_rate: 2.0 is outside (0, 1]",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and " " not in v else None,
)
def test_row_form_errors_name_the_event(message, reason, text):
    error = rejected(message)
    assert (error.reason, error.message) == (reason, text)


def test_row_form_feature_limit():
    limits = Limits(max_features=2)
    decode(rows(event("a", numbers={"x": 1.0, "y": 2.0})), limits)
    error = rejected(rows(event("a", numbers={"x": 1.0, "y": 2.0, "z": 3.0})), limits)
    assert error.reason == "too_many_features"
    assert error.message == "events[0]: more than ingest.max_features=2 distinct features"
    error = rejected(
        rows(event("a", numbers={"x": 1.0}), event("b", numbers={"y": 1.0}, categories={"c": "u"})),
        limits,
    )
    assert error.message == "events[1]: more than ingest.max_features=2 distinct features"


def test_row_form_reports_the_earliest_bad_event_whatever_the_problem():
    # events[0] has a bad trace id, events[1] a feature type clash: events[0] wins.
    error = rejected(
        rows(
            event("a", numbers={"x": 1.0}, trace_id=b"bad"),
            event("b", categories={"x": "u"}),
        )
    )
    assert error.message == "events[0]: trace_id must be 16 bytes and span_id 8 bytes (or empty)"
    # And with the same features everywhere (read in one pass), still the earliest event.
    error = rejected(
        rows(
            event("a", numbers={"x": 1.0}),
            event("b", numbers={"x": 2.0}, probabilities=[1.0]),
            event("c", numbers={"x": 3.0}, trace_id=b"bad"),
        )
    )
    assert error.message == "events[1].probabilities: 1 values, expected 0 (len(class_names))"


# The row form against a plain reference: one dict per event, NaN / "" for what an event lacks.

names = st.sampled_from(["a", "b", "c", "d"])
values = st.floats(allow_nan=True, allow_infinity=True)


@st.composite
def row_batches(draw):
    n = draw(st.integers(1, 12))
    numeric = draw(st.sets(names))
    categorical = draw(st.sets(names.filter(lambda x: x not in numeric), max_size=2))
    uniform = draw(st.booleans())
    events = []
    for i in range(n):
        keys = (
            numeric
            if uniform
            else draw(st.sets(st.sampled_from(sorted(numeric))))
            if numeric
            else set()
        )
        cats = (
            draw(st.dictionaries(st.sampled_from(sorted(categorical)), st.text(max_size=3)))
            if categorical and not uniform
            else {}
        )
        score = draw(st.one_of(st.none(), values))
        events.append(
            {
                "id": f"r{i}",
                "numbers": {k: draw(values) for k in sorted(keys)},
                "categories": cats,
                "score": score,
            }
        )
    return events


@settings(max_examples=150)
@given(row_batches())
def test_row_form_matches_a_reference_decoding(events):
    message = rows(
        *(
            event(
                e["id"],
                numbers=e["numbers"],
                categories=e["categories"],
                **({} if e["score"] is None else {"score": e["score"]}),
            )
            for e in events
        )
    )
    cols = decode(message)
    n = len(events)
    numeric = {k for e in events for k in e["numbers"]}
    categorical = {k for e in events for k in e["categories"]}
    assert set(cols.numbers) == numeric
    assert set(cols.categories) == categorical
    for name in numeric:
        expected = [e["numbers"].get(name, math.nan) for e in events]
        assert_float64(cols.numbers[name], n)
        np.testing.assert_array_equal(cols.numbers[name], expected)
    for name in categorical:
        assert list(cols.categories[name]) == [e["categories"].get(name, "") for e in events]
    if all(e["score"] is None for e in events):
        assert cols.scores is None
    else:
        expected = [math.nan if e["score"] is None else e["score"] for e in events]
        np.testing.assert_array_equal(cols.scores, expected)


# --- outcomes -------------------------------------------------------------------------------


def test_outcomes_with_values():
    cols = decode_out(
        pb.OutcomeBatch(
            model="m",
            model_version="v2",
            ids=["a", "b"],
            actual_values=[1.0, math.nan],
            timestamps_unix_nano=[5, 6],
        )
    )
    assert (cols.model, cols.version, cols.rows) == ("m", "v2", 2)
    assert list(cols.ids) == ["a", "b"]
    assert_float64(cols.actual_values, 2)
    np.testing.assert_array_equal(cols.actual_values, [1.0, math.nan])
    assert cols.actual_labels is None
    assert cols.timestamps_unix_nano.dtype == np.int64
    assert cols.timestamps_unix_nano.tolist() == [5, 6]
    assert cols.received_unix_nano == NOW


def test_outcomes_with_labels():
    cols = decode_out(pb.OutcomeBatch(model="m", ids=["a"], actual_labels=["yes"]))
    assert list(cols.actual_labels) == ["yes"]
    assert cols.actual_values is None
    assert cols.timestamps_unix_nano is None


@pytest.mark.parametrize(
    ("message", "reason", "text"),
    [
        (
            pb.OutcomeBatch(model="m", ids=["a"]),
            "invalid_outcome",
            "actual_values, actual_labels: set exactly one of them (neither is set)",
        ),
        (
            pb.OutcomeBatch(model="m", ids=["a"], actual_values=[1.0], actual_labels=["x"]),
            "invalid_outcome",
            "actual_values, actual_labels: set exactly one of them (both are set)",
        ),
        (
            pb.OutcomeBatch(model="m", ids=["a", "b"], actual_values=[1.0]),
            "column_length",
            "actual_values: 1 values, expected 2 (len(ids))",
        ),
        (
            pb.OutcomeBatch(model="m", ids=["a"], actual_labels=["x", "y"]),
            "column_length",
            "actual_labels: 2 values, expected 1 (len(ids))",
        ),
        (
            pb.OutcomeBatch(model="m", ids=["a"], actual_labels=["x"], timestamps_unix_nano=[1, 2]),
            "column_length",
            "timestamps_unix_nano: 2 values, expected 1 (len(ids)) or none",
        ),
        (
            pb.OutcomeBatch(model="m", ids=["a", "a"], actual_labels=["x", "y"]),
            "duplicate_id",
            "ids[1]: duplicate id 'a' (first at ids[0])",
        ),
        (
            pb.OutcomeBatch(model="", ids=["a"], actual_labels=["x"]),
            "invalid_model",
            "model: is empty",
        ),
        (pb.OutcomeBatch(model="m"), "empty_batch", "ids: the batch has no rows (ids is empty)"),
    ],
    ids=lambda v: v if isinstance(v, str) and " " not in v else None,
)
def test_outcome_errors_name_the_field(message, reason, text):
    error = rejected(message, outcome=True)
    assert (error.reason, error.message) == (reason, text)
