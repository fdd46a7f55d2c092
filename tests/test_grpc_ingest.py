"""gRPC ingest against a real agent on loopback, driven as a model service would drive it.

Every rejection must answer INVALID_ARGUMENT (or UNAVAILABLE while draining) with a
message naming the field and row, change nothing in the engine, and be counted by
reason in the agent's self-metrics.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from conftest import feature_types
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from metric_data import data_points

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PB = pb.PredictionBatch
NUM = pb.NumberValues
CAT = pb.CategoryValues
TRACE_A, SPAN_A = bytes(range(1, 17)), bytes(range(1, 9))
TRACE_B, SPAN_B = bytes(range(17, 33)), bytes(range(9, 17))

# A stable window for tests that read the live window: its bounds are far from now, so
# no window boundary can pass between submitting and reading the report.
STABLE_WINDOW = {"window_s": 1e9}


# One client per module: creating one per request costs more than the request itself.
http = httpx.Client(timeout=10.0)


@pytest.fixture(scope="module", autouse=True)
def _close_http_client() -> Iterator[None]:
    yield
    http.close()


def numbers(name: str, values: list[float]) -> pb.Column:
    return pb.Column(name=name, numbers=NUM(values=values))


def categories(name: str, values: list[str]) -> pb.Column:
    return pb.Column(name=name, categories=CAT(values=values))


def full_batch(**overrides: Any) -> pb.PredictionBatch:
    """Four predictions of churn v1 with every columnar field set."""
    fields: dict[str, Any] = dict(
        model="churn",
        model_version="v1",
        ids=["p1", "p2", "p3", "p4"],
        timestamps_unix_nano=[1_700_000_000_000_000_000 + i for i in range(4)],
        features=[
            numbers("age", [31.0, 45.0, 27.0, 62.0]),
            categories("plan", ["basic", "pro", "pro", "basic"]),
        ],
        scores=[0.05, 0.35, 0.65, 0.95],
        labels=["stay", "stay", "churn", "churn"],
        probabilities=[0.95, 0.05, 0.65, 0.35, 0.35, 0.65, 0.05, 0.95],
        class_names=["stay", "churn"],
        latencies_ms=[3.0, 7.0, 12.0, 40.0],
        trace_ids=[TRACE_A, TRACE_B, b"", b""],
        span_ids=[SPAN_A, SPAN_B, b"", b""],
        attributes={"region": "eu"},
        sample_rate=0.5,
    )
    fields.update(overrides)
    return pb.PredictionBatch(**fields)


def models(harness: Any) -> list[dict[str, Any]]:
    """What a user sees at GET /v1/models, sorted."""
    response = http.get(harness.api_url + "/v1/models")
    response.raise_for_status()
    return sorted(response.json()["models"], key=lambda m: (m["model"], m["version"]))


def model_rows(harness: Any, model: str) -> list[dict[str, Any]]:
    """The /v1/models entries of one model (other tests may share the agent)."""
    return [m for m in models(harness) if m["model"] == model]


def http_report(harness: Any, model: str, version: str | None = None) -> dict[str, Any]:
    params = {"version": version} if version is not None else None
    response = http.get(f"{harness.api_url}/v1/models/{model}/health", params=params)
    response.raise_for_status()
    return dict(response.json())


def batch_counts(harness: Any) -> Counter[tuple[str, str, str]]:
    """``mlsidecar.ingest.batches`` as {(rpc.method, mlsidecar.result, error.type): count}."""
    counts: Counter[tuple[str, str, str]] = Counter()
    for point in data_points(harness.metric_reader, "mlsidecar.ingest.batches"):
        a = point.attributes
        counts[(a["rpc.method"], a["mlsidecar.result"], a.get("error.type", ""))] += point.value
    return counts


def rejections(harness: Any) -> Counter[str]:
    """Rejected batches by error.type, over every method."""
    counts: Counter[str] = Counter()
    for (_, result, reason), n in batch_counts(harness).items():
        if result == "rejected":
            counts[reason] += n
    return counts


def raw_unary(harness: Any, method: str) -> Any:
    """A generic unary call that sends and returns raw bytes (no protobuf on the client)."""
    return harness.channel().unary_unary(f"/mlsidecar.v1.Ingest/{method}")


@pytest.fixture(scope="module")
def shared(module_agent: Any) -> Any:
    """One agent for the many rejection cases; it already holds one batch of model "m", so
    "unchanged" means something. Rejections change nothing, so the cases cannot interfere."""
    ack = module_agent.stub().SubmitPredictions(pb.PredictionBatch(model="m", ids=["s1", "s2"]))
    assert ack.accepted == 2
    return module_agent


class Unchanged:
    """Asserts that a block changed no engine state, and collects the rejections it caused."""

    def __init__(self, harness: Any) -> None:
        self.harness = harness

    def __enter__(self) -> Unchanged:
        self.models, self.rejected = models(self.harness), rejections(self.harness)
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            assert models(self.harness) == self.models
            self.rejections = rejections(self.harness) - self.rejected


# --- accepted batches -----------------------------------------------------------------


def test_columnar_batch_with_every_field_is_accepted_and_reported(start_agent):
    harness = start_agent(engine=STABLE_WINDOW)
    ack = harness.stub().SubmitPredictions(full_batch())
    assert (ack.accepted, ack.duplicate) == (4, False)
    assert not ack.HasField("error")

    assert models(harness) == [
        {"model": "churn", "version": "v1", "latest": True, "rows": 4, "outcomes": 0}
    ]
    report = http_report(harness, "churn")
    assert (report["model"], report["version"]) == ("churn", "v1")
    # sample_rate 0.5: each row stands for two predictions the service made.
    assert report["totals"] == {
        "rows": 4,
        "estimated_predictions": 8.0,
        "batches": 1,
        "outcomes": 0,
    }
    assert feature_types(report) == {"age": "numeric", "plan": "categorical"}
    assert report["segments"] == {"region=eu": 8.0}
    assert report["prediction"]["labels"] == {"stay": 4.0, "churn": 4.0}
    window = report["window"]
    assert window["count"] == 4
    assert window["latency_ms"]["count"] == 4
    assert (window["latency_ms"]["min"], window["latency_ms"]["max"]) == (3.0, 40.0)
    assert window["score"]["count"] == 4
    assert window["score"]["mean"] == pytest.approx(0.5)


def test_get_model_health_rpc_returns_the_http_report_and_window_bounds(start_agent):
    harness = start_agent(engine=STABLE_WINDOW)
    stub = harness.stub()
    stub.SubmitPredictions(full_batch())

    health = stub.GetModelHealth(pb.ModelHealthRequest(model="churn"))
    report = json_format.MessageToDict(health.report)
    assert report["model"] == "churn"
    assert report["totals"]["rows"] == 4  # Struct numbers are doubles: 4.0 == 4
    # No reference yet: the score judges data quality alone, and says what it could not judge.
    assert health.health_score == report["health"]["score"]
    assert any("reference" in reason for reason in report["health"]["reasons"])

    start, end = health.window_start_unix_nano, health.window_end_unix_nano
    assert 0 < start < end
    assert end - start == int(STABLE_WINDOW["window_s"] * 1e9)
    assert report["window"]["start_unix_nano"] == pytest.approx(start, rel=1e-15)
    assert report["window"]["end_unix_nano"] == pytest.approx(end, rel=1e-15)

    over_http = http_report(harness, "churn")
    for key in ("model", "version", "totals", "features", "segments", "prediction", "health"):
        assert report[key] == over_http[key], key


def test_get_model_health_selects_a_version_and_defaults_to_the_latest(shared):
    stub = shared.stub()
    stub.SubmitPredictions(pb.PredictionBatch(model="mv", model_version="v1", ids=["a"]))
    stub.SubmitPredictions(pb.PredictionBatch(model="mv", model_version="v2", ids=["a", "b"]))

    latest = json_format.MessageToDict(
        stub.GetModelHealth(pb.ModelHealthRequest(model="mv")).report
    )
    v1 = json_format.MessageToDict(
        stub.GetModelHealth(pb.ModelHealthRequest(model="mv", model_version="v1")).report
    )
    assert (latest["version"], latest["totals"]["rows"]) == ("v2", 2)
    assert (v1["version"], v1["totals"]["rows"]) == ("v1", 1)


def test_get_model_health_of_an_unknown_model_or_version_is_not_found(shared):
    stub = shared.stub()
    with pytest.raises(grpc.RpcError) as error:
        stub.GetModelHealth(pb.ModelHealthRequest(model="nope"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert error.value.details() == "model 'nope' has sent no events"

    stub.SubmitPredictions(pb.PredictionBatch(model="known", model_version="v1", ids=["a"]))
    with pytest.raises(grpc.RpcError) as error:
        stub.GetModelHealth(pb.ModelHealthRequest(model="known", model_version="v9"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert error.value.details() == "model 'known' version 'v9' has sent no events"


@pytest.mark.parametrize("model", ["", "bad name", "x" * 129, "m/../etc"])
def test_get_model_health_with_an_invalid_model_name_is_invalid_argument(shared, model):
    with pytest.raises(grpc.RpcError) as error:
        shared.stub().GetModelHealth(pb.ModelHealthRequest(model=model))
    assert error.value.code() == INVALID
    assert error.value.details().startswith("model: ")
    assert "does not match [A-Za-z0-9._-]{1,128}" in error.value.details()


def test_get_model_health_with_malformed_bytes_is_invalid_argument(shared):
    with pytest.raises(grpc.RpcError) as error:
        raw_unary(shared, "GetModelHealth")(b"\xff\xff\xff\xff")
    assert error.value.code() == INVALID
    assert "ModelHealthRequest: not a valid ModelHealthRequest" in error.value.details()


def test_row_form_events_are_accepted_and_reported_like_columns(start_agent):
    harness = start_agent(engine=STABLE_WINDOW)
    batch = pb.PredictionBatch(
        model="fraud-scorer",
        class_names=["legit", "fraud"],
        attributes={"region": "us"},
        events=[
            pb.PredictionEvent(
                id="p1",
                numbers={"amount": 42.5},
                categories={"merchant": "grocery"},
                score=0.12,
                label="legit",
                latency_ms=8.5,
                probabilities=[0.88, 0.12],
                trace_id=TRACE_A,
                span_id=SPAN_A,
            ),
            # A sparse row: a missing feature and no score are data, not errors.
            pb.PredictionEvent(id="p2", numbers={"amount": 1200.0}, label="fraud"),
            pb.PredictionEvent(
                id="p3", categories={"merchant": "casino"}, score=0.97, latency_ms=11.0
            ),
        ],
    )
    ack = harness.stub().SubmitPredictions(batch)
    assert (ack.accepted, ack.duplicate) == (3, False)

    report = http_report(harness, "fraud-scorer")
    assert report["totals"]["rows"] == 3
    assert feature_types(report) == {
        "amount": "numeric",
        "merchant": "categorical",
    }
    assert report["segments"] == {"region=us": 3.0}
    window = report["window"]
    # Rows without a score or latency are missing values, not zeros.
    assert window["score"]["count"] == 2
    assert (window["score"]["min"], window["score"]["max"]) == (0.12, 0.97)
    assert window["latency_ms"]["count"] == 2
    assert window["latency_ms"]["max"] == 11.0
    assert report["prediction"]["labels"]["fraud"] == 1.0
    assert report["prediction"]["labels"]["legit"] == 1.0


def test_outcomes_with_actual_values_are_counted(shared):
    stub = shared.stub()
    stub.SubmitPredictions(pb.PredictionBatch(model="price", ids=["a", "b", "c"]))
    ack = stub.SubmitOutcomes(
        pb.OutcomeBatch(model="price", ids=["a", "b"], actual_values=[10.5, float("nan")])
    )
    assert (ack.accepted, ack.duplicate) == (2, False)
    assert model_rows(shared, "price") == [
        {"model": "price", "version": "", "latest": True, "rows": 3, "outcomes": 2}
    ]
    assert http_report(shared, "price")["totals"]["outcomes"] == 2


def test_outcomes_with_actual_labels_are_counted_even_before_any_prediction(shared):
    ack = shared.stub().SubmitOutcomes(
        pb.OutcomeBatch(
            model="churn",
            model_version="v1",
            ids=["p1", "p2", "p3"],
            actual_labels=["churn", "stay", "stay"],
            timestamps_unix_nano=[1, 2, 3],
        )
    )
    assert ack.accepted == 3
    assert model_rows(shared, "churn") == [
        {"model": "churn", "version": "v1", "latest": True, "rows": 0, "outcomes": 3}
    ]


# --- StreamEvents --------------------------------------------------------------------


def event(**kind: Any) -> bytes:
    return bytes(pb.EventBatch(**kind).SerializeToString())


def test_stream_answers_every_message_in_order_and_survives_bad_ones(shared):
    model = "streamed"
    requests = [
        event(predictions=PB(model=model, ids=["a", "b"], scores=[0.1, 0.2])),
        event(predictions=PB(model=model, ids=["c", "c"])),  # duplicate id
        b"\xff\xff\xff\xff",  # not an EventBatch at all
        event(),  # neither predictions nor outcomes
        event(outcomes=pb.OutcomeBatch(model=model, ids=["a"], actual_values=[1.0])),
        event(outcomes=pb.OutcomeBatch(model=model, ids=["a"])),  # no actuals
        event(predictions=PB(model="bad name", ids=["x"])),
        event(predictions=PB(model=model, ids=["d", "e", "f"], batch_id="b1")),
        event(predictions=PB(model=model, ids=["d", "e", "f"], batch_id="b1")),
    ]
    before = batch_counts(shared)
    call = shared.channel().stream_stream("/mlsidecar.v1.Ingest/StreamEvents")
    responses = [pb.SubmitResponse.FromString(r) for r in call(iter(requests), timeout=10)]

    assert len(responses) == len(requests)
    summary = [
        (r.accepted, r.duplicate, r.error.code if r.HasField("error") else None) for r in responses
    ]
    assert summary == [
        (2, False, None),
        (0, False, 3),
        (0, False, 3),
        (0, False, 3),
        (1, False, None),
        (0, False, 3),
        (0, False, 3),
        (3, False, None),
        (3, True, None),
    ]
    assert responses[1].error.message == "ids[1]: duplicate id 'c' (first at ids[0])"
    assert responses[2].error.message.startswith("EventBatch: not a valid EventBatch")
    assert responses[3].error.message == "batch: set predictions or outcomes"
    assert "neither is set" in responses[5].error.message
    assert responses[6].error.message.startswith("model: 'bad name' does not match")

    assert model_rows(shared, model) == [
        {"model": model, "version": "", "latest": True, "rows": 5, "outcomes": 1}
    ]
    assert batch_counts(shared) - before == {
        ("StreamEvents", "accepted", ""): 3,
        ("StreamEvents", "duplicate", ""): 1,
        ("StreamEvents", "rejected", "duplicate_id"): 1,
        ("StreamEvents", "rejected", "malformed"): 1,
        ("StreamEvents", "rejected", "empty_event"): 1,
        ("StreamEvents", "rejected", "invalid_outcome"): 1,
        ("StreamEvents", "rejected", "invalid_model"): 1,
    }


def test_a_long_stream_through_the_generated_stub_counts_every_row(shared):
    batches = [
        pb.EventBatch(predictions=PB(model="stub-streamed", ids=[f"{i}-a", f"{i}-b"]))
        for i in range(20)
    ]
    responses = list(shared.stub().StreamEvents(iter(batches), timeout=10))
    assert [r.accepted for r in responses] == [2] * 20
    assert model_rows(shared, "stub-streamed")[0]["rows"] == 40


# --- batch_id de-duplication ------------------------------------------------------------


def test_resent_batch_id_is_acknowledged_as_duplicate_and_counted_once(agent):
    stub = agent.stub()
    batch = pb.PredictionBatch(model="m", ids=["a", "b", "c"], batch_id="batch-7")
    first, again = stub.SubmitPredictions(batch), stub.SubmitPredictions(batch)
    assert (first.accepted, first.duplicate) == (3, False)
    assert (again.accepted, again.duplicate) == (3, True)
    assert models(agent)[0]["rows"] == 3
    assert http_report(agent, "m")["totals"]["batches"] == 1
    counts = batch_counts(agent)
    assert counts[("SubmitPredictions", "accepted", "")] == 1
    assert counts[("SubmitPredictions", "duplicate", "")] == 1


def test_resent_outcome_batch_id_is_counted_once(shared):
    stub = shared.stub()
    batch = pb.OutcomeBatch(
        model="dedup-outcomes", ids=["a", "b"], actual_labels=["x", "y"], batch_id="o-1"
    )
    assert stub.SubmitOutcomes(batch).duplicate is False
    again = stub.SubmitOutcomes(batch)
    assert (again.accepted, again.duplicate) == (2, True)
    assert model_rows(shared, "dedup-outcomes")[0]["outcomes"] == 2


def test_batch_id_is_scoped_by_kind_and_model(shared):
    stub = shared.stub()
    for model in ("scope-a", "scope-b"):
        ack = stub.SubmitPredictions(PB(model=model, ids=["1"], batch_id="k"))
        assert not ack.duplicate
    outcome = pb.OutcomeBatch(model="scope-a", ids=["1"], actual_values=[1.0], batch_id="k")
    assert not stub.SubmitOutcomes(outcome).duplicate
    seen = [(m["rows"], m["outcomes"]) for m in model_rows(shared, "scope-a")]
    seen += [(m["rows"], m["outcomes"]) for m in model_rows(shared, "scope-b")]
    assert seen == [(1, 1), (1, 0)]


def test_batches_without_batch_id_are_never_deduplicated(shared):
    stub = shared.stub()
    batch = PB(model="no-batch-id", ids=["a"])
    assert [stub.SubmitPredictions(batch).duplicate for _ in range(3)] == [False] * 3
    assert model_rows(shared, "no-batch-id")[0]["rows"] == 3


def test_a_rejected_batch_id_is_not_remembered_so_the_fixed_batch_counts(shared):
    stub = shared.stub()
    with pytest.raises(grpc.RpcError):
        stub.SubmitPredictions(PB(model="retried", ids=["a", "a"], batch_id="retry"))
    fixed = stub.SubmitPredictions(PB(model="retried", ids=["a", "b"], batch_id="retry"))
    assert (fixed.accepted, fixed.duplicate) == (2, False)
    assert model_rows(shared, "retried")[0]["rows"] == 2


def test_dedup_can_be_switched_off(start_agent):
    harness = start_agent(ingest={"dedup_max_batches": 0})
    stub = harness.stub()
    batch = pb.PredictionBatch(model="m", ids=["a"], batch_id="same")
    assert [stub.SubmitPredictions(batch).duplicate for _ in range(2)] == [False, False]
    assert models(harness)[0]["rows"] == 2


# --- validation: INVALID_ARGUMENT naming the field and row, nothing changed --------------

ROWS_1000 = [f"r{i}" for i in range(1000)]

INVALID_PREDICTIONS: list[tuple[str, pb.PredictionBatch, str, str]] = [
    # (case, batch, exact message or prefix, reason)
    (
        "model name with a space",
        PB(model="fraud scorer", ids=["a"]),
        "model: 'fraud scorer' does not match [A-Za-z0-9._-]{1,128}",
        "invalid_model",
    ),
    (
        "model name too long",
        PB(model="x" * 129, ids=["a"]),
        f"model: {'x' * 129!r} does not match [A-Za-z0-9._-]{{1,128}}",
        "invalid_model",
    ),
    ("empty model name", PB(model="", ids=["a"]), "model: is empty", "invalid_model"),
    (
        "model version with a space",
        PB(model="m", model_version="v 1", ids=["a"]),
        "model_version: 'v 1' must be at most 128 printable ASCII characters without spaces",
        "invalid_model",
    ),
    (
        "no rows",
        PB(model="m", scores=[0.5]),
        "ids: the batch has no rows (ids is empty)",
        "empty_batch",
    ),
    ("empty id", PB(model="m", ids=["a", "", "c"]), "ids[1]: empty id", "empty_id"),
    (
        "duplicate ids",
        PB(model="m", ids=["a", "b", "c", "b"]),
        "ids[3]: duplicate id 'b' (first at ids[1])",
        "duplicate_id",
    ),
    (
        "feature column one value short",
        PB(
            model="m",
            ids=ROWS_1000,
            features=[
                numbers("income", [1.0] * 1000),
                categories("plan", ["a"] * 1000),
                numbers("age", [30.0] * 999),
            ],
        ),
        "features[2] 'age': 999 values, expected 1000 (len(ids))",
        "column_length",
    ),
    (
        "categorical column too long",
        PB(model="m", ids=["a"], features=[categories("plan", ["x", "y"])]),
        "features[0] 'plan': 2 values, expected 1 (len(ids))",
        "column_length",
    ),
    (
        "feature without values",
        PB(model="m", ids=["a"], features=[pb.Column(name="age")]),
        "features[0] 'age': no values (set numbers or categories)",
        "invalid_feature",
    ),
    (
        "feature without a name",
        PB(model="m", ids=["a"], features=[numbers("", [1.0])]),
        "features[0]: empty name",
        "invalid_feature",
    ),
    (
        "duplicate feature name",
        PB(model="m", ids=["a"], features=[numbers("x", [1.0]), categories("x", ["b"])]),
        "features[1] 'x': duplicate feature name",
        "duplicate_feature",
    ),
    (
        "scores length",
        PB(model="m", ids=["a", "b"], scores=[0.5]),
        "scores: 1 values, expected 2 (len(ids)) or none",
        "column_length",
    ),
    (
        "labels length",
        PB(model="m", ids=["a", "b"], labels=["x", "y", "z"]),
        "labels: 3 values, expected 2 (len(ids)) or none",
        "column_length",
    ),
    (
        "latencies length",
        PB(model="m", ids=["a", "b"], latencies_ms=[1.0]),
        "latencies_ms: 1 values, expected 2 (len(ids)) or none",
        "column_length",
    ),
    (
        "timestamps length",
        PB(model="m", ids=["a", "b"], timestamps_unix_nano=[1, 2, 3]),
        "timestamps_unix_nano: 3 values, expected 2 (len(ids)) or none",
        "column_length",
    ),
    (
        "trace_ids length",
        PB(model="m", ids=["a", "b"], trace_ids=[TRACE_A], span_ids=[SPAN_A, SPAN_B]),
        "trace_ids: 1 values, expected 2 (len(ids)) or none",
        "column_length",
    ),
    (
        "span_ids length",
        PB(model="m", ids=["a", "b"], trace_ids=[TRACE_A, TRACE_B], span_ids=[SPAN_A]),
        "span_ids: 1 values, expected 2 (len(ids)) or none",
        "column_length",
    ),
    (
        "trace id of the wrong size",
        PB(model="m", ids=["a", "b"], trace_ids=[TRACE_A, TRACE_B[:15]]),
        "trace_ids[1]: 15 bytes, expected 16 (or empty)",
        "invalid_trace_context",
    ),
    (
        "span id of the wrong size",
        PB(model="m", ids=["a"], trace_ids=[TRACE_A], span_ids=[SPAN_A + b"x"]),
        "span_ids[0]: 9 bytes, expected 8 (or empty)",
        "invalid_trace_context",
    ),
    (
        "probabilities without class_names",
        PB(model="m", ids=["a", "b"], probabilities=[0.1, 0.9, 0.8, 0.2]),
        "probabilities: 4 values but class_names is empty",
        "probabilities",
    ),
    (
        "probabilities not rows x classes",
        PB(model="m", ids=["a", "b"], probabilities=[0.1, 0.9, 0.8], class_names=["n", "y"]),
        "probabilities: 3 values, expected 4 (len(ids)=2 x len(class_names)=2)",
        "probabilities",
    ),
    (
        "duplicate class names",
        PB(model="m", ids=["a"], probabilities=[0.5, 0.5], class_names=["y", "y"]),
        "class_names: names must be unique and non-empty",
        "probabilities",
    ),
    (
        "sample_rate above 1",
        PB(model="m", ids=["a"], sample_rate=1.5),
        "sample_rate: 1.5 is outside (0, 1]",
        "invalid_sample_rate",
    ),
    (
        "negative sample_rate",
        PB(model="m", ids=["a"], sample_rate=-0.1),
        "sample_rate: -0.1 is outside (0, 1]",
        "invalid_sample_rate",
    ),
    (
        "NaN sample_rate",
        PB(model="m", ids=["a"], sample_rate=math.nan),
        "sample_rate: nan is outside (0, 1]",
        "invalid_sample_rate",
    ),
    (
        "too many attributes",
        PB(model="m", ids=["a"], attributes={f"k{i}": "v" for i in range(9)}),
        "attributes: 9 entries, at most 8 (segments must be low-cardinality)",
        "too_many_attributes",
    ),
    (
        "attribute value too long",
        PB(model="m", ids=["a"], attributes={"region": "x" * 129}),
        "attributes['region']: keys must be 1-128 characters and values at most 128",
        "invalid_attribute",
    ),
    (
        "row form mixed with columns",
        PB(model="m", ids=["a"], scores=[0.1], events=[pb.PredictionEvent(id="a")]),
        "events: the row form cannot be combined with columns (ids, scores)",
        "mixed_forms",
    ),
    (
        "row form duplicate ids",
        PB(model="m", events=[pb.PredictionEvent(id="p1"), pb.PredictionEvent(id="p1")]),
        "events[1].id: duplicate id 'p1' (first at events[0].id)",
        "duplicate_id",
    ),
    (
        "row form empty id",
        PB(model="m", events=[pb.PredictionEvent(id="p1"), pb.PredictionEvent()]),
        "events[1].id: empty id",
        "empty_id",
    ),
    (
        "row form probabilities not matching class_names",
        PB(
            model="m",
            class_names=["n", "y"],
            events=[
                pb.PredictionEvent(id="a", probabilities=[0.4, 0.6]),
                pb.PredictionEvent(id="b", probabilities=[0.2, 0.3, 0.5]),
            ],
        ),
        "events[1].probabilities: 3 values, expected 2 (len(class_names))",
        "probabilities",
    ),
    (
        "row form feature both numeric and categorical",
        PB(
            model="m",
            events=[
                pb.PredictionEvent(id="a", numbers={"x": 1.0}),
                pb.PredictionEvent(id="b", categories={"x": "one"}),
            ],
        ),
        "events[1].categories['x']: feature is numeric in other rows",
        "invalid_feature",
    ),
    (
        "row form trace id of the wrong size",
        PB(model="m", events=[pb.PredictionEvent(id="a", trace_id=b"short", span_id=SPAN_A)]),
        "events[0]: trace_id must be 16 bytes and span_id 8 bytes (or empty)",
        "invalid_trace_context",
    ),
]


@pytest.mark.parametrize(
    ("batch", "message", "reason"),
    [case[1:] for case in INVALID_PREDICTIONS],
    ids=[case[0] for case in INVALID_PREDICTIONS],
)
def test_invalid_prediction_batch_is_rejected_whole_naming_the_field_and_changes_nothing(
    shared, batch, message, reason
):
    with Unchanged(shared) as unchanged, pytest.raises(grpc.RpcError) as error:
        shared.stub().SubmitPredictions(batch)
    assert error.value.code() == INVALID
    assert error.value.details() == message
    assert unchanged.rejections == {reason: 1}


INVALID_OUTCOMES: list[tuple[str, pb.OutcomeBatch, str, str]] = [
    (
        "both actual_values and actual_labels",
        pb.OutcomeBatch(model="m", ids=["a"], actual_values=[1.0], actual_labels=["x"]),
        "actual_values, actual_labels: set exactly one of them (both are set)",
        "invalid_outcome",
    ),
    (
        "neither actual_values nor actual_labels",
        pb.OutcomeBatch(model="m", ids=["a"]),
        "actual_values, actual_labels: set exactly one of them (neither is set)",
        "invalid_outcome",
    ),
    (
        "actual_values length",
        pb.OutcomeBatch(model="m", ids=["a", "b"], actual_values=[1.0]),
        "actual_values: 1 values, expected 2 (len(ids))",
        "column_length",
    ),
    (
        "actual_labels length",
        pb.OutcomeBatch(model="m", ids=["a"], actual_labels=["x", "y"]),
        "actual_labels: 2 values, expected 1 (len(ids))",
        "column_length",
    ),
    (
        "timestamps length",
        pb.OutcomeBatch(model="m", ids=["a"], actual_values=[1.0], timestamps_unix_nano=[1, 2]),
        "timestamps_unix_nano: 2 values, expected 1 (len(ids)) or none",
        "column_length",
    ),
    (
        "duplicate ids",
        pb.OutcomeBatch(model="m", ids=["a", "a"], actual_values=[1.0, 2.0]),
        "ids[1]: duplicate id 'a' (first at ids[0])",
        "duplicate_id",
    ),
    (
        "invalid model name",
        pb.OutcomeBatch(model="m!", ids=["a"], actual_values=[1.0]),
        "model: 'm!' does not match [A-Za-z0-9._-]{1,128}",
        "invalid_model",
    ),
]


@pytest.mark.parametrize(
    ("batch", "message", "reason"),
    [case[1:] for case in INVALID_OUTCOMES],
    ids=[case[0] for case in INVALID_OUTCOMES],
)
def test_invalid_outcome_batch_is_rejected_whole_and_changes_nothing(
    shared, batch, message, reason
):
    with Unchanged(shared) as unchanged, pytest.raises(grpc.RpcError) as error:
        shared.stub().SubmitOutcomes(batch)
    assert error.value.code() == INVALID
    assert error.value.details() == message
    assert unchanged.rejections == {reason: 1}


@pytest.mark.parametrize(
    ("method", "type_name"),
    [("SubmitPredictions", "PredictionBatch"), ("SubmitOutcomes", "OutcomeBatch")],
)
def test_malformed_bytes_are_invalid_argument_not_a_transport_error(shared, method, type_name):
    before = batch_counts(shared)
    with Unchanged(shared), pytest.raises(grpc.RpcError) as error:
        raw_unary(shared, method)(b"\x0a\xff\xff\xff\xff garbage")
    assert error.value.code() == INVALID
    assert error.value.details().startswith(f"{type_name}: not a valid {type_name}")
    assert batch_counts(shared) - before == {(method, "rejected", "malformed"): 1}


# --- static limits ---------------------------------------------------------------------


def test_max_rows_per_batch_is_a_static_limit(start_agent):
    harness = start_agent(ingest={"max_rows_per_batch": 10})
    stub = harness.stub()
    ids = [f"r{i}" for i in range(11)]
    assert stub.SubmitPredictions(PB(model="m", ids=ids[:10])).accepted == 10
    with pytest.raises(grpc.RpcError) as error:
        stub.SubmitPredictions(PB(model="m", ids=ids))
    assert error.value.code() == INVALID
    assert error.value.details() == (
        "ids: 11 rows exceed ingest.max_rows_per_batch=10; split the batch"
    )
    rows = PB(model="m", events=[pb.PredictionEvent(id=i) for i in ids])
    with pytest.raises(grpc.RpcError) as error:
        stub.SubmitPredictions(rows)
    assert error.value.code() == INVALID
    assert error.value.details().startswith("events: 11 rows exceed ingest.max_rows_per_batch=10")
    outcomes = pb.OutcomeBatch(model="m", ids=ids, actual_values=[1.0] * 11)
    with pytest.raises(grpc.RpcError) as error:
        stub.SubmitOutcomes(outcomes)
    assert error.value.code() == INVALID
    assert models(harness)[0]["rows"] == 10
    assert rejections(harness) == {"too_many_rows": 3}


def test_max_features_is_a_static_limit(start_agent):
    harness = start_agent(ingest={"max_features": 3})
    stub = harness.stub()
    columns = [numbers(f"f{i}", [1.0]) for i in range(4)]
    assert stub.SubmitPredictions(PB(model="m", ids=["a"], features=columns[:3])).accepted == 1
    with pytest.raises(grpc.RpcError) as error:
        stub.SubmitPredictions(PB(model="m", ids=["a"], features=columns))
    assert error.value.code() == INVALID
    assert error.value.details() == "features: 4 columns exceed ingest.max_features=3"

    rows = PB(
        model="m",
        events=[
            pb.PredictionEvent(id="a", numbers={"f0": 1.0, "f1": 2.0}),
            pb.PredictionEvent(id="b", numbers={"f2": 1.0}, categories={"c": "x"}),
        ],
    )
    with pytest.raises(grpc.RpcError) as error:
        stub.SubmitPredictions(rows)
    assert error.value.code() == INVALID
    assert error.value.details() == "events[1]: more than ingest.max_features=3 distinct features"
    assert models(harness)[0]["rows"] == 1
    assert rejections(harness) == {"too_many_features": 2}


def test_max_message_bytes_is_a_static_limit_checked_before_parsing(start_agent):
    harness = start_agent(ingest={"max_message_bytes": 1024})
    stub = harness.stub()
    small = PB(model="m", ids=[f"r{i}" for i in range(10)])
    big = PB(model="m", ids=[f"r{i}" for i in range(200)])
    size = big.ByteSize()
    assert small.ByteSize() < 1024 < size
    assert stub.SubmitPredictions(small).accepted == 10
    with pytest.raises(grpc.RpcError) as error:
        stub.SubmitPredictions(big)
    assert error.value.code() == INVALID
    assert error.value.details() == (
        f"message is {size} bytes, over ingest.max_message_bytes=1024; split the batch"
    )
    # The size is checked before parsing: even bytes that are not a batch get the same answer.
    with pytest.raises(grpc.RpcError) as error:
        raw_unary(harness, "SubmitOutcomes")(b"\xff" * 2000)
    assert error.value.code() == INVALID
    assert error.value.details().startswith("message is 2000 bytes")
    assert models(harness)[0]["rows"] == 10
    assert rejections(harness) == {"message_too_large": 2}


def test_max_models_is_a_static_limit_on_model_versions(start_agent):
    harness = start_agent(ingest={"max_models": 2})
    stub = harness.stub()
    stub.SubmitPredictions(PB(model="a", ids=["1"]))
    stub.SubmitPredictions(PB(model="b", ids=["1"]))
    for batch in (PB(model="c", ids=["1"]), PB(model="a", model_version="v2", ids=["1"])):
        with pytest.raises(grpc.RpcError) as error:
            stub.SubmitPredictions(batch)
        assert error.value.code() == INVALID
        assert "ingest.max_models=2" in error.value.details()
        assert error.value.details().startswith(f"model {batch.model!r} version ")
    with pytest.raises(grpc.RpcError) as error:
        stub.SubmitOutcomes(pb.OutcomeBatch(model="d", ids=["1"], actual_values=[1.0]))
    assert error.value.code() == INVALID
    # Models already tracked keep being accepted.
    assert stub.SubmitPredictions(PB(model="a", ids=["2"])).accepted == 1
    assert [(m["model"], m["rows"]) for m in models(harness)] == [("a", 2), ("b", 1)]
    assert rejections(harness) == {"too_many_models": 3}


# --- values are never a reason to reject -----------------------------------------------


def test_odd_values_are_accepted_because_they_are_what_monitoring_is_for(shared):
    stub = shared.stub()
    before = rejections(shared)
    stub.SubmitPredictions(
        PB(
            model="odd",
            ids=["a", "b"],
            features=[numbers("age", [30.0, 40.0]), categories("plan", ["basic", "pro"])],
        )
    )
    inf, nan = math.inf, math.nan
    odd = PB(
        model="odd",
        ids=["c", "d", "e", "f"],
        timestamps_unix_nano=[0, 0, 0, 0],
        features=[
            # "plan" is missing entirely; "age" is full of non-finite values.
            numbers("age", [nan, inf, -inf, -0.0]),
            categories("never-seen-before", ["", "unseen", "\u00e9\u00e8", "x" * 1000]),
            numbers("unknown", [1e308, -1e308, 5e-324, 0.0]),
        ],
        scores=[nan, inf, -inf, 2.5],
        latencies_ms=[nan, -1.0, inf, 0.0],
        labels=["", "a label never seen", "stay", "churn"],
        probabilities=[nan, inf, -1.0, 7.0, 0.5, 0.5, 0.0, 0.0],
        class_names=["n", "y"],
    )
    ack = stub.SubmitPredictions(odd)
    assert ack.accepted == 4
    rows = PB(
        model="odd",
        events=[
            pb.PredictionEvent(id="g", numbers={"age": nan}, score=inf),
            pb.PredictionEvent(id="h", categories={"plan": "enterprise"}, latency_ms=-inf),
            pb.PredictionEvent(id="i"),  # no features at all
        ],
    )
    assert stub.SubmitPredictions(rows).accepted == 3
    report = http_report(shared, "odd")
    assert report["totals"]["rows"] == 9
    assert set(report["features"]) == {"age", "plan", "never-seen-before", "unknown"}
    assert rejections(shared) == before


# --- standard services -----------------------------------------------------------------


def test_standard_health_service_reports_serving(shared):
    health = health_pb2_grpc.HealthStub(shared.channel())
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ("", "mlsidecar.v1.Ingest"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == serving, service
    with pytest.raises(grpc.RpcError) as error:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_server_reflection_lists_and_describes_the_ingest_service(shared):
    database = ProtoReflectionDescriptorDatabase(shared.channel())
    services = database.get_services()
    assert "mlsidecar.v1.Ingest" in services
    assert "grpc.health.v1.Health" in services

    from google.protobuf.descriptor_pool import DescriptorPool

    pool = DescriptorPool(database)
    service = pool.FindServiceByName("mlsidecar.v1.Ingest")
    methods = {m.name: m.input_type.full_name for m in service.methods}
    assert methods == {
        "SubmitPredictions": "mlsidecar.v1.PredictionBatch",
        "SubmitOutcomes": "mlsidecar.v1.OutcomeBatch",
        "StreamEvents": "mlsidecar.v1.EventBatch",
        "GetModelHealth": "mlsidecar.v1.ModelHealthRequest",
        "PutReference": "mlsidecar.v1.PutReferenceRequest",
        "GetReference": "mlsidecar.v1.GetReferenceRequest",
    }


def test_reflection_can_be_switched_off(start_agent):
    harness = start_agent(ingest={"reflection": False})
    database = ProtoReflectionDescriptorDatabase(harness.channel())
    with pytest.raises(grpc.RpcError) as error:
        database.get_services()
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # Ingest itself is unaffected.
    assert harness.stub().SubmitPredictions(PB(model="m", ids=["a"])).accepted == 1


# --- draining --------------------------------------------------------------------------


def test_draining_refuses_new_batches_with_unavailable_and_turns_health_not_serving(agent):
    seeded = agent  # holds one batch before draining
    stub = seeded.stub()
    stub.SubmitPredictions(PB(model="m", ids=["s1"]))
    before = models(seeded)
    seeded.run(seeded.agent.ingest.drain())

    for call, batch in (
        (stub.SubmitPredictions, PB(model="m", ids=["late"])),
        (stub.SubmitOutcomes, pb.OutcomeBatch(model="m", ids=["s1"], actual_values=[1.0])),
    ):
        with pytest.raises(grpc.RpcError) as error:
            call(batch)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in error.value.details()

    stream = list(
        stub.StreamEvents(iter([pb.EventBatch(predictions=PB(model="m", ids=["x"]))]), timeout=5)
    )
    assert [(r.accepted, r.error.code) for r in stream] == [(0, 14)]

    health = health_pb2_grpc.HealthStub(seeded.channel())
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    for service in ("", "mlsidecar.v1.Ingest"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == not_serving, service
    assert models(seeded) == before
    assert rejections(seeded) == {"shutting_down": 3}
