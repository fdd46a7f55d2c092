"""gRPC PutReference / GetReference: the HTTP reference upload over the Ingest service.

Every test drives a real agent on 127.0.0.1 through the generated Python stub: the same
document, checks, errors, storage and effect on drift as PUT /v1/models/{model}/reference.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from conftest import AgentHarness, agent_settings, mlsidecar_command, subprocess_env

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb
from agent.engine import ReferenceProfile

MODEL = "credit"
# One long window, no warm-up: the reference in use is the one uploaded.
ENGINE = {"window_s": 1e9, "min_window_rows": 200, "warmup_rows": 0}
ADMIN = "adm1n-t0ken"
INGEST = "ingest-t0ken"

http = httpx.Client(timeout=10.0)


@pytest.fixture(scope="module", autouse=True)
def _close_http_client() -> Iterator[None]:
    yield
    http.close()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def traffic(rows: int, *, shift: float = 0.0, seed: int = 1, version: str = "v1") -> Any:
    """Live credit-model predictions; ``shift`` moves income by that many std."""
    rng = np.random.default_rng(seed)
    return pb.PredictionBatch(
        model=MODEL,
        model_version=version,
        ids=[f"s{seed}-{i}" for i in range(rows)],
        features=[
            pb.Column(
                name="income", numbers=pb.NumberValues(values=rng.normal(50 + 10 * shift, 10, rows))
            ),
            pb.Column(name="age", numbers=pb.NumberValues(values=rng.normal(40, 12, rows))),
            pb.Column(
                name="region",
                categories=pb.CategoryValues(values=rng.choice(["n", "s", "e"], rows).tolist()),
            ),
        ],
        scores=rng.beta(2, 5, rows),
    )


def sample_columns(rows: int = 2000, seed: int = 5) -> dict[str, Any]:
    """Raw sample columns, as PUT /v1/models/{model}/reference takes them."""
    rng = np.random.default_rng(seed)
    return {
        "features": {
            "income": rng.normal(50, 10, rows).tolist(),
            "age": [None, *rng.normal(40, 12, rows - 1).tolist()],
            "region": rng.choice(["n", "s", "e"], rows).tolist(),
        },
        "scores": rng.beta(2, 5, rows).tolist(),
    }


def report(harness: AgentHarness, version: str = "v1") -> dict[str, Any]:
    response = http.get(f"{harness.api_url}/v1/models/{MODEL}/health", params={"version": version})
    assert response.status_code == 200, response.text
    return response.json()


def drifted(rep: dict[str, Any]) -> dict[str, bool]:
    return {name: f["drift"]["drifted"] for name, f in rep["features"].items() if "drift" in f}


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reference file written by `mlsidecar reference build` from a training CSV."""
    directory = tmp_path_factory.mktemp("reference-build")
    rng = np.random.default_rng(4)
    lines = ["income,age,region,score,row_id"]
    for i in range(1500):
        lines.append(
            f"{rng.normal(50, 10):.3f},{rng.normal(40, 12):.1f},"
            f"{rng.choice(['n', 's', 'e'])},{rng.beta(2, 5):.4f},{i}"
        )
    data = directory / "train.csv"
    data.write_text("\n".join(lines) + "\n")
    out = directory / "credit-ref.json"
    command = [mlsidecar_command(), "reference", "build", str(data), "-o", str(out)]
    command += ["--model", MODEL, "--score-column", "score", "--exclude", "row_id"]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
    )
    assert result.returncode == 0, result.stderr
    return out


# --- uploads and their effect ----------------------------------------------------------


def test_a_file_from_reference_build_becomes_the_reference_drift_is_judged_against(
    start_agent, reference_file
):
    harness = start_agent(engine=ENGINE)
    stub = harness.stub()
    response = stub.PutReference(
        pb.PutReferenceRequest(
            model=MODEL, model_version="v1", document=reference_file.read_bytes()
        ),
        timeout=10,
    )
    built = ReferenceProfile.from_dict(json.loads(reference_file.read_text()))
    # The file was built without a version: bound to v1, its content (and so its id) changes.
    expected_id = dataclasses.replace(built, version="v1").id
    assert (response.model, response.model_version) == (MODEL, "v1")
    assert (response.id, response.source, response.rows) == (expected_id, "upload", 1500)
    assert list(response.features) == ["age", "income", "region"]

    stub.SubmitPredictions(traffic(600, shift=2.0), timeout=10)
    rep = report(harness)
    assert rep["reference"]["id"] == response.id
    assert rep["reference"]["source"] == "upload"
    assert drifted(rep) == {"income": True, "age": False, "region": False}

    got = stub.GetReference(pb.GetReferenceRequest(model=MODEL, model_version="v1"), timeout=10)
    assert (got.id, got.source, got.rows, list(got.features)) == (
        response.id,
        "upload",
        1500,
        ["age", "income", "region"],
    )
    # GetReference answers the bytes GET /v1/models/{model}/reference does.
    http_get = http.get(f"{harness.api_url}/v1/models/{MODEL}/reference?version=v1")
    assert got.document == http_get.content
    assert ReferenceProfile.from_dict(json.loads(got.document)).id == response.id


def test_raw_sample_columns_give_the_same_reference_as_the_http_put(start_agent):
    harness = start_agent(engine=ENGINE)
    stub = harness.stub()
    body = sample_columns()
    response = stub.PutReference(
        pb.PutReferenceRequest(model=MODEL, model_version="v1", document=json.dumps(body).encode()),
        timeout=10,
    )
    assert (response.source, response.rows) == ("upload", 2000)
    assert list(response.features) == ["age", "income", "region"]

    # One code path: the same sample over HTTP gives the same profile (same content hash).
    over_http = http.put(f"{harness.api_url}/v1/models/{MODEL}/reference?version=v1", json=body)
    assert over_http.status_code == 200, over_http.text
    assert over_http.json() == {
        "model": MODEL,
        "version": "v1",
        "id": response.id,
        "source": "upload",
        "rows": 2000,
        "features": ["age", "income", "region"],
    }

    stub.SubmitPredictions(traffic(600, shift=2.0, seed=2), timeout=10)
    rep = report(harness)
    assert rep["reference"]["id"] == response.id
    assert rep["reference"]["rows"] == 2000
    assert drifted(rep)["income"] is True
    assert drifted(rep)["age"] is False


def test_without_a_version_the_latest_version_seen_is_meant_and_empty_means_unversioned(
    start_agent,
):
    harness = start_agent(engine=ENGINE)
    stub = harness.stub()
    document = json.dumps({"features": {"age": [31, 45, 52]}}).encode()
    unknown = stub.PutReference(pb.PutReferenceRequest(model="fresh", document=document))
    assert unknown.model_version == ""  # the model has sent nothing yet

    stub.SubmitPredictions(traffic(10, version="v7"), timeout=10)
    latest = stub.PutReference(pb.PutReferenceRequest(model=MODEL, document=document))
    assert latest.model_version == "v7"
    explicit = stub.PutReference(
        pb.PutReferenceRequest(model=MODEL, model_version="", document=document)
    )
    assert explicit.model_version == ""
    assert report(harness, "v7")["reference"]["id"] == latest.id


# --- refusals --------------------------------------------------------------------------


def tampered_file(path: Path) -> bytes:
    document = json.loads(path.read_text())
    document["features"]["age"]["psi_counts"].append(0)
    return json.dumps(document).encode()


BAD_REQUESTS = [
    pytest.param({"document": b'{"features": {"age": [1, "x"]}}'}, "features.age:", id="mixed"),
    pytest.param({"document": b'{"features": {"age": [1, 2]}, "scores": [0.5]}'}, "scores:", id="ragged"),
    pytest.param({"document": b'{"feature": {"age": [1, 2]}}'}, "feature:", id="unknown-key"),
    pytest.param({"document": b'{"features": {}}'}, "features:", id="no-features"),
    pytest.param({"document": b"[1, 2]"}, "document: expected a JSON object", id="array"),
    pytest.param({"document": b""}, "document: expected a JSON object", id="empty"),
    pytest.param({"document": b"{not json"}, "document: not valid JSON", id="not-json"),
    pytest.param({"document": b'{"features": {"\xff": [1]}}'}, "document: not valid JSON", id="not-utf8"),
    pytest.param({"model": "credit scorer"}, "model: 'credit scorer' does not match", id="model"),
    pytest.param({"model": ""}, "model: is empty", id="no-model"),
    pytest.param({"model_version": "v 1"}, "model_version: 'v 1' must be", id="version"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "field"), BAD_REQUESTS)
def test_a_bad_upload_is_invalid_argument_naming_the_field_and_keeps_the_reference(
    module_agent, change, field, request
):
    model = f"m-{request.node.callspec.id}"
    stub = module_agent.stub()
    good = stub.PutReference(
        pb.PutReferenceRequest(
            model=model, model_version="v1", document=json.dumps(sample_columns(50)).encode()
        ),
        timeout=10,
    )
    fields = {"model": model, "model_version": "v1", "document": b'{"features": {"x": [1]}}'}
    fields.update(change)
    with pytest.raises(grpc.RpcError) as error:
        stub.PutReference(pb.PutReferenceRequest(**fields), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(field), error.value.details()

    kept = stub.GetReference(pb.GetReferenceRequest(model=model, model_version="v1"), timeout=10)
    assert kept.id == good.id


def test_a_reference_file_that_was_edited_is_refused_naming_the_field(module_agent, reference_file):
    stub = module_agent.stub()
    with pytest.raises(grpc.RpcError) as error:
        stub.PutReference(
            pb.PutReferenceRequest(model="edited", document=tampered_file(reference_file)),
            timeout=10,
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("features.age.psi_counts")


def test_size_limits_apply_over_grpc_and_http_alike(start_agent):
    harness = start_agent(engine=ENGINE, ingest={"max_message_bytes": 1024})
    document = json.dumps(sample_columns(200)).encode()
    assert len(document) > 1024
    with pytest.raises(grpc.RpcError) as error:
        harness.stub().PutReference(
            pb.PutReferenceRequest(model=MODEL, model_version="v1", document=document), timeout=10
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "over ingest.max_message_bytes=1024" in error.value.details()
    assert error.value.details().startswith("message: ")

    response = http.put(
        f"{harness.api_url}/v1/models/{MODEL}/reference?version=v1", content=document
    )
    assert response.status_code == 400
    assert response.json()["error"]["reason"] == "reference_too_large"
    assert response.json()["error"]["message"].startswith("body: ")


def test_get_reference_of_a_model_without_one_is_not_found(module_agent):
    with pytest.raises(grpc.RpcError) as error:
        module_agent.stub().GetReference(pb.GetReferenceRequest(model="nobody"), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert error.value.details() == "model 'nobody' has no reference yet"


# --- who may upload --------------------------------------------------------------------


def put(stub: Any, metadata: Any = ()) -> Any:
    document = json.dumps({"features": {"age": [31, 45, 52]}}).encode()
    request = pb.PutReferenceRequest(model=MODEL, model_version="v1", document=document)
    return stub.PutReference(request, metadata=metadata, timeout=10)


def refused(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code(), error.value.details()


def test_with_an_admin_token_put_reference_needs_it_and_ingest_does_not(start_agent):
    harness = start_agent(engine=ENGINE, api={"admin_token": ADMIN})
    stub = harness.stub()
    for metadata in ((), bearer("wrong"), (("authorization", ADMIN),)):
        assert refused(lambda m=metadata: put(stub, m)) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "PutReference needs the admin token (api.admin_token)",
        )
    with pytest.raises(grpc.RpcError):
        stub.GetReference(pb.GetReferenceRequest(model=MODEL), timeout=10)  # nothing stored
    assert list((harness.settings.store.data_dir / "references").iterdir()) == []

    uploaded = put(stub, bearer(ADMIN))
    assert uploaded.rows == 3
    # Reading and ingesting stay as open as before: the admin token guards state changes.
    assert stub.SubmitPredictions(traffic(5), timeout=10).accepted == 5
    assert stub.GetReference(pb.GetReferenceRequest(model=MODEL), timeout=10).id == uploaded.id


def test_with_ingest_and_admin_tokens_only_the_admin_token_uploads(start_agent):
    harness = start_agent(engine=ENGINE, ingest={"token": INGEST}, api={"admin_token": ADMIN})
    stub = harness.stub()
    assert refused(lambda: put(stub, bearer(INGEST)))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert refused(lambda: put(stub))[1] == "missing or wrong bearer token"
    assert put(stub, bearer(ADMIN)).rows == 3
    # The admin token is the stronger credential: one call carries one authorization header.
    assert stub.SubmitPredictions(traffic(5), metadata=bearer(ADMIN), timeout=10).accepted == 5
    assert (
        stub.SubmitPredictions(traffic(5, seed=2), metadata=bearer(INGEST), timeout=10).accepted
        == 5
    )


def test_without_an_admin_token_the_ingest_token_uploads(start_agent):
    harness = start_agent(engine=ENGINE, ingest={"token": INGEST})
    stub = harness.stub()
    assert refused(lambda: put(stub))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert put(stub, bearer(INGEST)).rows == 3


def test_an_unauthenticated_non_loopback_listener_refuses_uploads_without_an_admin_token(
    start_agent,
):
    # insecure: true on a non-loopback address accepts plaintext from anyone: no state changes.
    harness = start_agent(engine=ENGINE, ingest={"listen": "0.0.0.0:0", "insecure": True})
    stub = harness.stub()
    code, message = refused(lambda: put(stub))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "set api.admin_token" in message
    assert stub.SubmitPredictions(traffic(5), timeout=10).accepted == 5  # ingest is unchanged

    guarded = start_agent(
        engine=ENGINE, ingest={"listen": "0.0.0.0:0", "insecure": True}, api={"admin_token": ADMIN}
    )
    assert refused(lambda: put(guarded.stub()))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert put(guarded.stub(), bearer(ADMIN)).rows == 3


# --- persistence -----------------------------------------------------------------------


def test_an_uploaded_reference_survives_a_restart(tmp_path, reference_file):
    settings = {"engine": ENGINE, "store": {"data_dir": str(tmp_path)}}
    first = AgentHarness(agent_settings(**settings)).start()
    try:
        uploaded = first.stub().PutReference(
            pb.PutReferenceRequest(
                model=MODEL, model_version="v1", document=reference_file.read_bytes()
            ),
            timeout=10,
        )
    finally:
        first.stop()

    second = AgentHarness(agent_settings(**settings)).start()
    try:
        stub = second.stub()
        stub.SubmitPredictions(traffic(600, shift=2.0), timeout=10)  # loads the stored one
        rep = report(second)
        assert (rep["reference"]["id"], rep["reference"]["source"]) == (uploaded.id, "upload")
        assert rep["warmup"] is None
        assert drifted(rep)["income"] is True
        got = stub.GetReference(pb.GetReferenceRequest(model=MODEL), timeout=10)
        assert got.id == uploaded.id
    finally:
        second.stop()
