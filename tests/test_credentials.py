"""``agent.client.credentials``: the TLS and token helper shared by the SDK's users,
``mlsidecar replay`` and the demo parts, exercised with the SDK against a real TLS agent
(in-process, real gRPC on 127.0.0.1; certificates from tests/tls.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import AgentHarness
from tls import Pki

from agent.client import SidecarClient
from agent.client.credentials import CredentialsError, channel_credentials, read_token

TOKEN = "sdk-s3cret-token"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def test_the_sdk_sends_over_mtls_with_a_token_read_by_the_helpers(
    start_agent: Callable[..., AgentHarness], pki: Pki, tmp_path: Path
) -> None:
    harness = start_agent(ingest={"tls": pki.server_tls(client_ca=str(pki.ca)), "token": TOKEN})
    (tmp_path / "token").write_text(f"  {TOKEN}\n")
    client = SidecarClient(
        harness.ingest_target, model="sdk-tls", model_version="v1",
        token=read_token(tmp_path / "token"),
        credentials=channel_credentials(
            ca_file=pki.ca, cert_file=pki.client, key_file=pki.client_key
        ),
    )  # fmt: skip
    try:
        for i in range(20):
            client.log_prediction(f"p{i}", {"amount": float(i)}, score=0.5)
        assert client.flush(10.0)
        assert client.stats().sent_predictions == 20, client.stats()
    finally:
        client.close(5.0)
    report = harness.agent.engine.report("sdk-tls", "v1")
    assert report is not None and report["totals"]["rows"] == 20


def test_without_any_option_the_channel_is_plaintext_and_tls_alone_uses_system_cas() -> None:
    import grpc

    assert channel_credentials() is None
    assert isinstance(channel_credentials(tls=True), grpc.ChannelCredentials)


def test_the_token_comes_from_the_file_first_then_the_environment() -> None:
    assert read_token(None, {"MLSIDECAR_TOKEN": " from-env \n"}) == "from-env"
    assert read_token(None, {}) is None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda d, pki: channel_credentials(ca_file=d / "absent.pem"),
         "ca_file: cannot read '{d}/absent.pem': No such file or directory"),
        (lambda d, pki: channel_credentials(ca_file=pki.ca_key),
         "ca_file: '{ca_key}' holds no PEM certificate"),
        (lambda d, pki: channel_credentials(cert_file=pki.client, key_file=pki.client),
         "key_file: '{client}' holds no PEM private key"),
        (lambda d, pki: channel_credentials(key_file=pki.client_key),
         "cert_file: needed with key_file"),
        (lambda d, pki: read_token(d / "empty"), "token_file: '{d}/empty' is empty"),
        (lambda d, pki: read_token(d / "two-lines"),
         "token_file: the token holds a control or non-ASCII character"),
        (lambda d, pki: read_token(None, {"MLSIDECAR_TOKEN": "a\x1bb"}),
         "MLSIDECAR_TOKEN: the token holds a control or non-ASCII character"),
    ],
    ids=["ca-missing", "ca-is-a-key", "key-is-a-cert", "key-without-cert", "token-empty",
         "token-two-lines", "env-token-control-char"],
)  # fmt: skip
def test_unusable_files_are_refused_naming_the_option(
    pki: Pki, tmp_path: Path, call: Callable[[Path, Pki], object], message: str
) -> None:
    (tmp_path / "empty").write_text(" \n")
    (tmp_path / "two-lines").write_text("first\nsecond\n")
    with pytest.raises(CredentialsError) as error:
        call(tmp_path, pki)
    expected = message.format(d=tmp_path, ca_key=pki.ca_key, client=pki.client)
    assert str(error.value).startswith(expected), str(error.value)
    assert "second" not in str(error.value)  # a token's content is never in a message
