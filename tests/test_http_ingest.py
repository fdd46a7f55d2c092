"""The admin HTTP API against a real agent on loopback: JSON ingest, health, models, metrics.

Bodies are the protobuf JSON mapping of the gRPC messages (lowerCamel or original field
names), validated by the same code as gRPC: a rejection is 400 with a JSON error naming
the field and row, and changes nothing.
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import feature_types
from metric_data import data_points

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb

STABLE_WINDOW = {"window_s": 1e9}  # no window boundary can pass during a test


# One client per module: creating one per request costs more than the request itself.
http = httpx.Client(timeout=10.0)


@pytest.fixture(scope="module", autouse=True)
def _close_http_client() -> Iterator[None]:
    yield
    http.close()


def models(harness: Any, model: str | None = None) -> list[dict[str, Any]]:
    response = http.get(harness.api_url + "/v1/models")
    assert response.status_code == 200
    found = response.json()["models"]
    return sorted(
        (m for m in found if model is None or m["model"] == model),
        key=lambda m: (m["model"], m["version"]),
    )


def post(harness: Any, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    if isinstance(body, bytes | str):
        return http.post(harness.api_url + path, content=body, **kwargs)
    return http.post(harness.api_url + path, json=body, **kwargs)


def rejections(harness: Any) -> Counter[tuple[str, str]]:
    """Rejected batches as {(rpc.method, error.type): count} from the self-metrics."""
    counts: Counter[tuple[str, str]] = Counter()
    for point in data_points(harness.metric_reader, "mlsidecar.ingest.batches"):
        a = point.attributes
        if a["mlsidecar.result"] == "rejected":
            counts[(a["rpc.method"], a["error.type"])] += point.value
    return counts


@pytest.fixture(scope="module")
def shared(module_agent: Any) -> Any:
    """One agent for the many read-mostly cases; it holds one batch of model "m"."""
    response = post(module_agent, "/v1/predictions", {"model": "m", "ids": ["s1", "s2"]})
    assert response.json() == {"accepted": 2, "duplicate": False}
    return module_agent


# --- ingest ----------------------------------------------------------------------------


def test_post_predictions_in_protobuf_json_reaches_the_engine(start_agent):
    harness = start_agent(engine=STABLE_WINDOW)
    body = {
        "model": "churn",
        "modelVersion": "v3",
        "ids": ["a", "b", "c"],
        "features": [
            {"name": "age", "numbers": {"values": [31, 45.5, "NaN"]}},
            {"name": "plan", "categories": {"values": ["basic", "pro", ""]}},
        ],
        "scores": [0.2, 0.6, "Infinity"],
        "labels": ["stay", "churn", "churn"],
        "probabilities": [0.8, 0.2, 0.4, 0.6, 0.1, 0.9],
        "classNames": ["stay", "churn"],
        "latenciesMs": [4.0, 6.0, 8.0],
        # bytes are base64 in the JSON mapping
        "traceIds": ["AQIDBAUGBwgJCgsMDQ4PEA==", "", ""],
        "spanIds": ["AQIDBAUGBwg=", "", ""],
        "attributes": {"region": "eu"},
        "sampleRate": 0.25,
        "batchId": "http-1",
    }
    response = post(harness, "/v1/predictions", body)
    assert response.status_code == 200
    assert response.json() == {"accepted": 3, "duplicate": False}

    assert models(harness) == [
        {"model": "churn", "version": "v3", "latest": True, "rows": 3, "outcomes": 0}
    ]
    report = http.get(harness.api_url + "/v1/models/churn/health").json()
    assert report["totals"]["estimated_predictions"] == 12.0
    assert feature_types(report) == {"age": "numeric", "plan": "categorical"}
    assert report["segments"] == {"region=eu": 12.0}
    assert report["window"]["latency_ms"]["count"] == 3
    assert report["window"]["score"]["nonfinite"] == 1


def test_original_proto_field_names_are_accepted_too(shared):
    body = {
        "model": "snake",
        "model_version": "v1",
        "ids": ["a"],
        "latencies_ms": [1.5],
        "class_names": ["n", "y"],
        "probabilities": [0.5, 0.5],
    }
    assert post(shared, "/v1/predictions", body).json() == {"accepted": 1, "duplicate": False}
    assert models(shared, "snake")[0]["version"] == "v1"


def test_row_form_json_is_accepted(shared):
    body = {
        "model": "fraud-scorer",
        "events": [
            {
                "id": "p1",
                "numbers": {"amount": 42.5},
                "categories": {"merchant": "grocery"},
                "score": 0.12,
                "latencyMs": 8.5,
            },
            {"id": "p2", "numbers": {"amount": "NaN"}},
        ],
    }
    assert post(shared, "/v1/predictions", body).json() == {"accepted": 2, "duplicate": False}
    assert models(shared, "fraud-scorer")[0]["rows"] == 2


@pytest.mark.parametrize(
    "actuals", [{"actualValues": [1.0, 0.0]}, {"actualLabels": ["churn", "stay"]}]
)
def test_post_outcomes_are_counted_once_per_batch_id(shared, actuals):
    model = "outcomes-" + next(iter(actuals))
    body = {"model": model, "ids": ["a", "b"], "batchId": "o1", **actuals}
    assert post(shared, "/v1/outcomes", body).json() == {"accepted": 2, "duplicate": False}
    assert post(shared, "/v1/outcomes", body).json() == {"accepted": 2, "duplicate": True}
    assert models(shared, model)[0]["outcomes"] == 2


def test_resent_prediction_batch_id_is_a_duplicate_over_http_and_over_grpc(shared):
    body = {"model": "dedup-http", "ids": ["a", "b"], "batchId": "same"}
    assert post(shared, "/v1/predictions", body).json() == {"accepted": 2, "duplicate": False}
    assert post(shared, "/v1/predictions", body).json() == {"accepted": 2, "duplicate": True}
    # HTTP and gRPC share one receiver, so one de-duplication window.
    batch = pb.PredictionBatch(model="dedup-http", ids=["a", "b"], batch_id="same")
    assert shared.stub().SubmitPredictions(batch).duplicate
    assert models(shared, "dedup-http")[0]["rows"] == 2


# --- validation ------------------------------------------------------------------------

INVALID: list[tuple[str, str, Any, str, str]] = [
    # (case, path, body, message, reason)
    (
        "invalid model name",
        "/v1/predictions",
        {"model": "fraud scorer", "ids": ["a"]},
        "model: 'fraud scorer' does not match [A-Za-z0-9._-]{1,128}",
        "invalid_model",
    ),
    ("empty model name", "/v1/predictions", {"ids": ["a"]}, "model: is empty", "invalid_model"),
    (
        "no rows",
        "/v1/predictions",
        {"model": "m"},
        "ids: the batch has no rows (ids is empty)",
        "empty_batch",
    ),
    (
        "empty id",
        "/v1/predictions",
        {"model": "m", "ids": ["a", ""]},
        "ids[1]: empty id",
        "empty_id",
    ),
    (
        "duplicate ids",
        "/v1/predictions",
        {"model": "m", "ids": ["a", "b", "a"]},
        "ids[2]: duplicate id 'a' (first at ids[0])",
        "duplicate_id",
    ),
    (
        "feature column too short",
        "/v1/predictions",
        {
            "model": "m",
            "ids": ["a", "b", "c"],
            "features": [
                {"name": "x", "numbers": {"values": [1, 2, 3]}},
                {"name": "age", "numbers": {"values": [1, 2]}},
            ],
        },
        "features[1] 'age': 2 values, expected 3 (len(ids))",
        "column_length",
    ),
    (
        "scores length",
        "/v1/predictions",
        {"model": "m", "ids": ["a", "b"], "scores": [0.1, 0.2, 0.3]},
        "scores: 3 values, expected 2 (len(ids)) or none",
        "column_length",
    ),
    (
        "probabilities not rows x classes",
        "/v1/predictions",
        {"model": "m", "ids": ["a"], "probabilities": [0.5], "classNames": ["n", "y"]},
        "probabilities: 1 values, expected 2 (len(ids)=1 x len(class_names)=2)",
        "probabilities",
    ),
    (
        "row form mixed with columns",
        "/v1/predictions",
        {"model": "m", "ids": ["a"], "events": [{"id": "a"}]},
        "events: the row form cannot be combined with columns (ids)",
        "mixed_forms",
    ),
    (
        "row form duplicate ids",
        "/v1/predictions",
        {"model": "m", "events": [{"id": "a"}, {"id": "b"}, {"id": "a"}]},
        "events[2].id: duplicate id 'a' (first at events[0].id)",
        "duplicate_id",
    ),
    (
        "outcomes with both actuals",
        "/v1/outcomes",
        {"model": "m", "ids": ["a"], "actualValues": [1], "actualLabels": ["x"]},
        "actual_values, actual_labels: set exactly one of them (both are set)",
        "invalid_outcome",
    ),
    (
        "outcomes with neither actual",
        "/v1/outcomes",
        {"model": "m", "ids": ["a"]},
        "actual_values, actual_labels: set exactly one of them (neither is set)",
        "invalid_outcome",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "message", "reason"),
    [case[1:] for case in INVALID],
    ids=[case[0] for case in INVALID],
)
def test_invalid_batch_is_400_naming_the_field_and_changes_nothing(
    shared, path, body, message, reason
):
    before, rejected = models(shared), rejections(shared)
    response = post(shared, path, body)
    assert response.status_code == 400
    assert response.json() == {
        "error": {"code": "INVALID_ARGUMENT", "reason": reason, "message": message}
    }
    assert models(shared) == before
    assert rejections(shared) - rejected == {("http:" + path, reason): 1}


MALFORMED: list[tuple[str, bytes, str]] = [
    # (case, body, what the message must say)
    ("truncated JSON", b'{"model": "m", "ids": ["a"', "Expecting"),
    ("not JSON at all", b"model=m&ids=a", "Expecting value: line 1 column 1"),
    ("empty body", b"", "the body is empty; send a JSON object"),
    ("a JSON array", b'[{"model": "m"}]', "expected a JSON object, got an array"),
    ("a JSON string", b'"m"', "expected a JSON object, got a string"),
    ("JSON null", b"null", "expected a JSON object, got null"),
    ("unknown field", b'{"model": "m", "ids": ["a"], "score": [1]}', 'no field named "score"'),
    ("wrong type", b'{"model": "m", "ids": "a"}', "Failed to parse ids field"),
    ("bare NaN token", b'{"model": "m", "ids": ["a"], "scores": [NaN]}', 'use quoted "NaN"'),
    ("invalid base64 bytes", b'{"model": "m", "ids": ["a"], "traceIds": ["A"]}', "Invalid base64"),
]


@pytest.mark.parametrize(
    ("body", "problem"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_json_is_400_naming_the_problem(shared, body, problem):
    before, rejected = models(shared), rejections(shared)
    response = post(shared, "/v1/predictions", body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["reason"]) == ("INVALID_ARGUMENT", "malformed")
    assert error["message"].startswith("body: not a valid PredictionBatch: ")
    assert problem in error["message"]
    assert models(shared) == before
    assert rejections(shared) - rejected == {("http:/v1/predictions", "malformed"): 1}


def test_http_ingest_applies_the_same_static_limits(start_agent):
    harness = start_agent(
        ingest={"max_rows_per_batch": 5, "max_message_bytes": 1024, "max_models": 1}
    )
    response = post(harness, "/v1/predictions", {"model": "m", "ids": list("abcdef")})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        "ids: 6 rows exceed ingest.max_rows_per_batch=5; split the batch"
    )
    big = b'{"model": "m", "ids": ["a"], "labels": ["' + b"x" * 2000 + b'"]}'
    response = post(harness, "/v1/predictions", big)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        f"message is {len(big)} bytes, over ingest.max_message_bytes=1024; split the batch"
    )
    assert post(harness, "/v1/predictions", {"model": "m", "ids": ["a"]}).status_code == 200
    response = post(harness, "/v1/outcomes", {"model": "n", "ids": ["a"], "actualValues": [1]})
    assert response.status_code == 400
    assert response.json()["error"]["reason"] == "too_many_models"
    assert "ingest.max_models=1" in response.json()["error"]["message"]
    assert [(m["model"], m["rows"], m["outcomes"]) for m in models(harness)] == [("m", 1, 0)]


def test_an_oversized_body_is_refused_before_it_is_read_whole(start_agent):
    """By its Content-Length before reading; a chunked body (no length) once the bytes read
    pass the limit. Either way the message names the limit and the batch counts as refused."""
    harness = start_agent(ingest={"max_message_bytes": 64 * 1024})
    url = f"{harness.api_url}/v1/predictions"
    declared = httpx.post(url, content=b"{" + b" " * (200 * 1024) + b"}", timeout=10)
    assert declared.status_code == 400
    assert declared.json()["error"]["reason"] == "message_too_large"
    assert f"message is {200 * 1024 + 2} bytes" in declared.json()["error"]["message"]

    def chunks():
        yield b'{"model": "m", "ids": ["a"], "labels": ["'
        for _ in range(16):  # 16 x 16 KiB: over the limit after the fourth
            yield b"x" * 16 * 1024
        yield b'"]}'

    chunked = httpx.post(url, content=chunks(), timeout=10)
    assert chunked.status_code == 400
    assert chunked.json()["error"]["reason"] == "message_too_large"
    assert "over ingest.max_message_bytes=65536" in chunked.json()["error"]["message"]
    # The agent stopped reading past the limit: its count is of what it had read, not all.
    reported = int(chunked.json()["error"]["message"].split()[2])
    assert 64 * 1024 < reported < 16 * 16 * 1024
    assert post(harness, "/v1/predictions", {"model": "m", "ids": ["a"]}).status_code == 200


# --- health, readiness, draining ---------------------------------------------------------


def test_healthz_and_readyz_answer_200_while_serving(shared):
    assert http.get(shared.api_url + "/healthz").json() == {"status": "ok"}
    response = http.get(shared.api_url + "/readyz")
    assert response.status_code == 200
    assert response.json()["status"] == "ready"
    assert response.json()["checks"]["grpc_serving"] is True


def test_after_drain_readyz_is_503_and_http_ingest_is_refused(agent):
    agent.run(agent.agent.ingest.drain())
    response = http.get(agent.api_url + "/readyz")
    assert response.status_code == 503
    assert response.json()["status"] == "not ready"
    assert response.json()["checks"]["grpc_serving"] is False
    # Liveness is unaffected: the process is still up.
    assert http.get(agent.api_url + "/healthz").status_code == 200

    response = post(agent, "/v1/predictions", {"model": "m", "ids": ["a"]})
    assert response.status_code == 503
    error = response.json()["error"]
    assert (error["code"], error["reason"]) == ("UNAVAILABLE", "shutting_down")
    assert models(agent) == []


# --- model reports -----------------------------------------------------------------------


def test_model_health_by_version_and_latest_by_default(shared):
    for version, ids in (("v1", ["a"]), ("v2", ["a", "b"])):
        body = {"model": "versioned", "modelVersion": version, "ids": ids}
        assert post(shared, "/v1/predictions", body).status_code == 200
    url = shared.api_url + "/v1/models/versioned/health"
    latest = http.get(url).json()
    assert (latest["version"], latest["totals"]["rows"]) == ("v2", 2)
    v1 = http.get(url, params={"version": "v1"}).json()
    assert (v1["version"], v1["totals"]["rows"]) == ("v1", 1)
    assert [(m["version"], m["latest"]) for m in models(shared, "versioned")] == [
        ("v1", False),
        ("v2", True),
    ]

    response = http.get(url, params={"version": "v9"})
    assert response.status_code == 404
    assert (
        response.json()["error"]["message"] == "model 'versioned' version 'v9' has sent no events"
    )


def test_model_health_of_an_unknown_model_is_404_and_of_an_invalid_name_400(shared):
    response = http.get(shared.api_url + "/v1/models/nope/health")
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "code": "NOT_FOUND",
            "reason": "unknown_model",
            "message": "model 'nope' has sent no events",
        }
    }
    response = http.get(shared.api_url + "/v1/models/bad%20name/health")
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("model: 'bad name' does not match")


def test_delete_forgets_every_version_of_a_model(shared):
    for version in ("v1", "v2"):
        body = {"model": "forget-me", "modelVersion": version, "ids": ["a"]}
        post(shared, "/v1/predictions", body)
    response = http.delete(shared.api_url + "/v1/models/forget-me")
    assert response.status_code == 200
    assert response.json() == {
        "model": "forget-me",
        "forgotten_versions": ["v1", "v2"],
        "forgotten_references": 0,
        "forgotten_pending": 1,  # one id: the v2 prediction replaced the v1 one
    }
    assert models(shared, "forget-me") == []
    assert http.get(shared.api_url + "/v1/models/forget-me/health").status_code == 404
    response = http.delete(shared.api_url + "/v1/models/forget-me")
    assert response.status_code == 404
    assert response.json()["error"]["reason"] == "unknown_model"


def test_delete_needs_the_admin_token_when_one_is_set(start_agent):
    harness = start_agent(api={"admin_token": "adm1n"})
    post(harness, "/v1/predictions", {"model": "m", "ids": ["a"]})
    url = harness.api_url + "/v1/models/m"
    refused = http.delete(url)
    assert refused.status_code == 401
    assert refused.json()["error"]["reason"] == "admin_token"
    assert http.delete(url, headers={"authorization": "Bearer wrong"}).status_code == 401
    assert http.delete(url, headers={"authorization": "adm1n"}).status_code == 401
    assert models(harness, "m") != []
    # Reading and ingesting need no admin token.
    assert http.get(harness.api_url + "/v1/models/m/health").status_code == 200
    response = http.delete(url, headers={"authorization": "Bearer adm1n"})
    assert response.status_code == 200
    assert models(harness) == []


def test_admin_api_connections_disable_nagle(agent):
    """Without TCP_NODELAY every response waits ~40 ms for the client's delayed ACK."""
    with httpx.Client() as client:
        assert client.get(agent.api_url + "/healthz").status_code == 200  # stays open

        async def nodelay_flags() -> list[int]:
            connections = agent.agent.api._listener._server.server_state.connections
            return [
                c.transport.get_extra_info("socket").getsockopt(
                    socket.IPPROTO_TCP, socket.TCP_NODELAY
                )
                for c in connections
            ]

        flags = agent.run(nodelay_flags())
    assert flags
    assert all(flags)


# --- docs and metrics --------------------------------------------------------------------


def test_openapi_and_docs_are_served(shared):
    spec = http.get(shared.api_url + "/openapi.json").json()
    assert spec["info"]["title"] == "mlsidecar admin API"
    for path in ("/v1/predictions", "/v1/outcomes", "/v1/models", "/v1/models/{model}/health"):
        assert path in spec["paths"], path
    docs = http.get(shared.api_url + "/docs")
    assert docs.status_code == 200
    assert "text/html" in docs.headers["content-type"]
    assert "openapi.json" in docs.text


def prometheus_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Samples of one metric from Prometheus text exposition (labels without commas)."""
    samples = []
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        labels_part, value = line[len(name) + 1 :].rsplit("} ", 1)
        labels = dict(item.split("=", 1) for item in labels_part.split('",') if item)
        samples.append(({k: v.strip('"') for k, v in labels.items()}, float(value)))
    return samples


def test_metrics_serves_prometheus_text_with_the_submitted_predictions(agent):
    agent.stub().SubmitPredictions(pb.PredictionBatch(model="scraped", ids=["a", "b", "c"]))
    post(agent, "/v1/predictions", {"model": "scraped", "ids": ["d"], "sampleRate": 0.5})
    response = http.get(agent.api_url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = prometheus_samples(response.text, "ml_predictions_total")
    ours = [value for labels, value in samples if labels["ml_model_name"] == "scraped"]
    assert sum(ours) == 3 + 2  # the HTTP row stands for 2 predictions (sample rate 0.5)
    assert "# TYPE ml_predictions_total counter" in response.text
    assert "mlsidecar_ingest_batches_total" in response.text


def test_metrics_endpoint_is_absent_when_prometheus_is_off(start_agent):
    harness = start_agent(api={"prometheus": False})
    assert http.get(harness.api_url + "/metrics").status_code == 404
    assert "/metrics" not in http.get(harness.api_url + "/openapi.json").json()["paths"]
