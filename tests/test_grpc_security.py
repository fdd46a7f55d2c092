"""Who may talk to the agent: bearer tokens (gRPC and HTTP), TLS and mTLS, safe listen defaults.

Certificates are made per test session with the ``openssl`` command-line tool.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from pydantic import ValidationError
from tls import Pki

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb
from agent._proto.mlsidecar.v1 import ingest_pb2_grpc as pb_grpc
from agent.config import Settings

TOKEN = "s3cret-ingest-token"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


# --- certificates ----------------------------------------------------------------------


# One client per module: creating one per request costs more than the request itself.
http = httpx.Client(timeout=10.0)


@pytest.fixture(scope="module", autouse=True)
def _close_http_client() -> Iterator[None]:
    yield
    http.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command-line tool is needed to make test certificates")
    return Pki(tmp_path_factory.mktemp("pki"))


def models_seen(harness: Any, **kwargs: Any) -> list[Any]:
    response = http.get(harness.api_url + "/v1/models", **kwargs)
    assert response.status_code == 200
    return list(response.json()["models"])


# --- gRPC bearer token -----------------------------------------------------------------


@pytest.fixture
def guarded(start_agent: Any) -> Any:
    return start_agent(ingest={"token": TOKEN})


BAD_CREDENTIALS = [
    pytest.param((), id="no metadata"),
    pytest.param((("authorization", "Bearer wrong"),), id="wrong token"),
    pytest.param((("authorization", TOKEN),), id="token without Bearer"),
    pytest.param((("authorization", f"bearer {TOKEN}x"),), id="token with a suffix"),
]


@pytest.mark.parametrize("metadata", BAD_CREDENTIALS)
def test_ingest_token_is_required_on_every_ingest_rpc(guarded, metadata):
    stub = guarded.stub()
    calls = [
        lambda: stub.SubmitPredictions(
            pb.PredictionBatch(model="m", ids=["a"]), metadata=metadata, timeout=5
        ),
        lambda: stub.SubmitOutcomes(
            pb.OutcomeBatch(model="m", ids=["a"], actual_values=[1.0]), metadata=metadata, timeout=5
        ),
        lambda: stub.GetModelHealth(pb.ModelHealthRequest(model="m"), metadata=metadata, timeout=5),
        lambda: list(
            stub.StreamEvents(
                iter([pb.EventBatch(predictions=pb.PredictionBatch(model="m", ids=["b"]))]),
                metadata=metadata,
                timeout=5,
            )
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == UNAUTHENTICATED
        assert error.value.details() == "missing or wrong bearer token"
    assert models_seen(guarded) == []


def test_ingest_token_lets_every_rpc_through(guarded):
    stub = guarded.stub()
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    batch = pb.PredictionBatch(model="m", ids=["a"])
    assert stub.SubmitPredictions(batch, metadata=metadata, timeout=5).accepted == 1
    outcome = pb.OutcomeBatch(model="m", ids=["a"], actual_values=[1.0])
    assert stub.SubmitOutcomes(outcome, metadata=metadata, timeout=5).accepted == 1
    events = iter([pb.EventBatch(predictions=pb.PredictionBatch(model="m", ids=["b", "c"]))])
    assert [r.accepted for r in stub.StreamEvents(events, metadata=metadata, timeout=5)] == [2]
    health = stub.GetModelHealth(pb.ModelHealthRequest(model="m"), metadata=metadata, timeout=5)
    assert health.report.fields["totals"].struct_value.fields["rows"].number_value == 3
    assert models_seen(guarded) == [
        {"model": "m", "version": "", "latest": True, "rows": 3, "outcomes": 1}
    ]


def test_health_service_stays_reachable_without_the_token(guarded):
    health = health_pb2_grpc.HealthStub(guarded.channel())
    for service in ("", "mlsidecar.v1.Ingest"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_is_behind_the_token_too(guarded):
    with pytest.raises(grpc.RpcError) as error:
        ProtoReflectionDescriptorDatabase(guarded.channel()).get_services()
    assert error.value.code() == UNAUTHENTICATED


def test_ingest_token_does_not_guard_the_http_api(guarded):
    # api.token is a separate setting; the admin API is loopback-only by default.
    response = http.post(guarded.api_url + "/v1/predictions", json={"model": "m", "ids": ["a"]})
    assert response.status_code == 200


# --- HTTP bearer token -----------------------------------------------------------------

API_TOKEN = "api-t0ken"
API_AUTH = {"authorization": f"Bearer {API_TOKEN}"}


def test_api_token_guards_every_path_but_liveness_and_readiness(start_agent):
    harness = start_agent(api={"token": API_TOKEN})
    url = harness.api_url
    for path in ("/healthz", "/readyz"):
        assert http.get(url + path).status_code == 200, path

    guarded_gets = ("/v1/models", "/v1/models/m/health", "/metrics", "/docs", "/openapi.json")
    for path in guarded_gets:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": API_TOKEN}):
            response = http.get(url + path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.json() == {
                "error": {
                    "code": "UNAUTHENTICATED",
                    "reason": "token",
                    "message": "missing or wrong bearer token",
                }
            }
    for path in ("/v1/predictions", "/v1/outcomes"):
        body = {"model": "m", "ids": ["a"], "actualValues": [1.0]}
        assert http.post(url + path, json=body).status_code == 401, path
    assert http.delete(url + "/v1/models/m").status_code == 401
    assert models_seen(harness, headers=API_AUTH) == []

    response = http.post(
        url + "/v1/predictions", json={"model": "m", "ids": ["a"]}, headers=API_AUTH
    )
    assert response.json() == {"accepted": 1, "duplicate": False}
    assert http.get(url + "/metrics", headers=API_AUTH).status_code == 200
    assert http.get(url + "/docs", headers=API_AUTH).status_code == 200


def test_admin_token_alone_can_delete_when_the_api_also_has_a_token(start_agent):
    harness = start_agent(api={"token": API_TOKEN, "admin_token": "adm1n"})
    url = harness.api_url
    http.post(url + "/v1/predictions", json={"model": "m", "ids": ["a"]}, headers=API_AUTH)
    # The API token reads and ingests but cannot delete ...
    assert http.delete(url + "/v1/models/m", headers=API_AUTH).status_code == 401
    assert len(models_seen(harness, headers=API_AUTH)) == 1
    # ... the admin token can: it is the stronger credential, and one request has one header.
    response = http.delete(url + "/v1/models/m", headers={"authorization": "Bearer adm1n"})
    assert response.status_code == 200
    assert models_seen(harness, headers=API_AUTH) == []


# --- listen addresses ------------------------------------------------------------------

EXPOSED = ["0.0.0.0:4320", "[::]:4320", "192.0.2.10:4320", "sidecar.example:4320"]


@pytest.mark.parametrize("section", ["ingest", "api"])
@pytest.mark.parametrize("listen", EXPOSED)
def test_non_loopback_listen_without_tls_or_token_is_refused(section, listen):
    with pytest.raises(ValidationError) as error:
        Settings.load(None, **{section: {"listen": listen}})
    message = str(error.value)
    assert section in message
    assert f"listen: {listen!r} is not a loopback address; set tls or token" in message
    assert "insecure: true" in message


@pytest.mark.parametrize("section", ["ingest", "api"])
def test_non_loopback_listen_is_allowed_with_a_token_or_explicit_insecure(section):
    with_token = Settings.load(None, **{section: {"listen": "0.0.0.0:4320", "token": "t"}})
    assert getattr(with_token, section).host == "0.0.0.0"
    insecure = Settings.load(None, **{section: {"listen": "0.0.0.0:4320", "insecure": True}})
    assert getattr(insecure, section).insecure is True


def test_non_loopback_listen_is_allowed_with_tls(pki):
    settings = Settings.load(None, ingest={"listen": "0.0.0.0:4320", "tls": pki.server_tls()})
    assert settings.ingest.tls is not None
    assert settings.ingest.tls.cert == pki.server


@pytest.mark.parametrize("listen", ["127.0.0.1:4320", "127.9.9.9:0", "[::1]:4320", "localhost:1"])
def test_loopback_listen_needs_no_protection(listen):
    assert Settings.load(None, ingest={"listen": listen}).ingest.listen == listen


def test_tls_with_a_missing_file_is_refused_naming_it(pki, tmp_path):
    missing = tmp_path / "nope.pem"
    with pytest.raises(ValidationError) as error:
        Settings.load(None, ingest={"tls": {"cert": str(missing), "key": str(pki.server_key)}})
    assert f"cert: file {str(missing)!r} does not exist" in str(error.value)


# --- TLS and mTLS ----------------------------------------------------------------------


@pytest.fixture
def secure_stub() -> Iterator[Callable[[Any, grpc.ChannelCredentials], Any]]:
    """IngestStubs on TLS channels to a harness; the channels are closed after the test."""
    channels: list[grpc.Channel] = []

    def make(harness: Any, credentials: grpc.ChannelCredentials) -> Any:
        channels.append(grpc.secure_channel(harness.ingest_target, credentials))
        return pb_grpc.IngestStub(channels[-1])

    yield make
    for channel in channels:
        channel.close()


def submit(stub: Any, model: str = "m") -> int:
    return int(
        stub.SubmitPredictions(pb.PredictionBatch(model=model, ids=["a"]), timeout=5).accepted
    )


def test_tls_ingest_accepts_a_client_that_trusts_the_ca_and_refuses_plaintext(
    start_agent, pki, secure_stub
):
    harness = start_agent(ingest={"tls": pki.server_tls()})
    trusted = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    assert submit(secure_stub(harness, trusted)) == 1

    with pytest.raises(grpc.RpcError) as error:
        submit(harness.stub())  # plaintext
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE

    untrusted = grpc.ssl_channel_credentials(root_certificates=pki.other_ca.read_bytes())
    with pytest.raises(grpc.RpcError) as error:
        submit(secure_stub(harness, untrusted))
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert models_seen(harness)[0]["rows"] == 1


def test_mtls_ingest_requires_a_client_certificate_from_the_client_ca(
    start_agent, pki, secure_stub
):
    harness = start_agent(ingest={"tls": pki.server_tls(client_ca=str(pki.ca))})
    without_cert = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    with pytest.raises(grpc.RpcError) as error:
        submit(secure_stub(harness, without_cert))
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE

    with_cert = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.client_key.read_bytes(),
        certificate_chain=pki.client.read_bytes(),
    )
    assert submit(secure_stub(harness, with_cert)) == 1
    assert models_seen(harness)[0]["rows"] == 1


def test_tls_and_token_together(start_agent, pki, secure_stub):
    harness = start_agent(ingest={"listen": "127.0.0.1:0", "tls": pki.server_tls(), "token": TOKEN})
    stub = secure_stub(harness, grpc.ssl_channel_credentials(pki.ca.read_bytes()))
    with pytest.raises(grpc.RpcError) as error:
        submit(stub)
    assert error.value.code() == UNAUTHENTICATED
    batch = pb.PredictionBatch(model="m", ids=["a"])
    auth = (("authorization", f"Bearer {TOKEN}"),)
    assert stub.SubmitPredictions(batch, metadata=auth, timeout=5).accepted == 1


def test_tls_admin_api_serves_https_to_clients_that_trust_the_ca(start_agent, pki):
    harness = start_agent(api={"tls": pki.server_tls()})
    https_url = harness.api_url.replace("http://", "https://")
    context = ssl.create_default_context(cafile=str(pki.ca))
    response = httpx.get(https_url + "/healthz", verify=context)
    assert response.json() == {"status": "ok"}
    with pytest.raises(httpx.ConnectError):
        httpx.get(
            https_url + "/healthz", verify=ssl.create_default_context(cafile=str(pki.other_ca))
        )
    with pytest.raises(httpx.TransportError):
        httpx.get(harness.api_url + "/healthz")  # plaintext HTTP to a TLS port


def test_the_raw_grpc_example_reads_its_token_from_a_file_or_the_environment(
    start_agent: Callable[..., Any], tmp_path: Path
) -> None:
    """examples/submit.py, the "any gRPC client" example, against an agent that wants a token."""
    from conftest import subprocess_env

    harness = start_agent(ingest={"token": TOKEN})
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    script = str(Path(__file__).resolve().parent.parent / "examples" / "submit.py")
    base = [sys.executable, script, "--target", harness.ingest_target, "--rows", "20"]
    by_file = subprocess.run([*base, "--token-file", str(token_file)], capture_output=True,
                             text=True, timeout=60, env=subprocess_env())  # fmt: skip
    assert by_file.returncode == 0, by_file.stderr[-2000:]
    assert "predictions: accepted=20" in by_file.stdout
    assert TOKEN not in by_file.stdout + by_file.stderr
    by_env = subprocess.run(base, capture_output=True, text=True, timeout=60,
                            env=subprocess_env(MLSIDECAR_TOKEN=TOKEN))  # fmt: skip
    assert by_env.returncode == 0, by_env.stderr[-2000:]
    without = subprocess.run(base, capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert without.returncode != 0 and "UNAUTHENTICATED" in without.stderr
