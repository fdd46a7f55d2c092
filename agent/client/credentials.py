"""How a client proves who it is to the agent's gRPC ingest: TLS credentials and the token.

    from agent.client.credentials import channel_credentials, read_token
    client = SidecarClient("agent:4320", model="m", token=read_token("/run/secrets/token"),
                           credentials=channel_credentials(ca_file="/etc/mlsidecar/ca.pem"))

Used by the SDK's callers, ``mlsidecar replay`` and the demo's parts, so every client reads
the same files the same way. Needs only grpcio. The token is read from a file or the
``MLSIDECAR_TOKEN`` variable, never taken from a command line (``ps`` shows those).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TOKEN_ENV = "MLSIDECAR_TOKEN"
MAX_TOKEN_BYTES = 4096  # a bearer token, not a file someone pointed at by mistake


class CredentialsError(ValueError):
    """A TLS or token option that cannot be used; ``option`` is its name (``ca_file``)."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{option}: {reason}")
        self.option = option
        self.reason = reason


def _read(option: str, path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise CredentialsError(option, f"cannot read {str(path)!r}: {error.strerror}") from None


def _pem(option: str, path: str | Path, marker: bytes) -> bytes:
    data = _read(option, path)
    if b"-----BEGIN " not in data or marker not in data:
        what = "certificate" if marker == b"CERTIFICATE" else "private key"
        raise CredentialsError(option, f"{str(path)!r} holds no PEM {what}")
    return data


def channel_credentials(
    *,
    tls: bool = False,
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
) -> Any:
    """``grpc.ChannelCredentials`` for the agent's ingest, or None for plaintext.

    TLS is on when ``tls`` is true or any file is given; without ``ca_file`` the agent's
    certificate is checked against the system's trusted CAs. ``cert_file`` and ``key_file``
    (together) are the client certificate an mTLS agent (``ingest.tls.client_ca``) asks for.
    Files are read now, so a bad path fails here, naming the option.
    """
    if (cert_file is None) != (key_file is None):
        given, missing = (
            ("cert_file", "key_file") if key_file is None else ("key_file", "cert_file")
        )
        raise CredentialsError(missing, f"needed with {given} (a client certificate and its key)")
    if not (tls or ca_file or cert_file):
        return None
    import grpc

    root = None if ca_file is None else _pem("ca_file", ca_file, b"CERTIFICATE")
    chain = None if cert_file is None else _pem("cert_file", cert_file, b"CERTIFICATE")
    key = None if key_file is None else _pem("key_file", key_file, b"PRIVATE KEY")
    return grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key, certificate_chain=chain
    )


def read_token(
    token_file: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> str | None:
    """The ingest bearer token: from ``token_file`` (surrounding whitespace, such as the
    newline of ``echo token > file``, removed), else ``$MLSIDECAR_TOKEN``, else None."""
    if token_file is not None:
        data = _read("token_file", token_file)
        if len(data) > MAX_TOKEN_BYTES:
            raise CredentialsError(
                "token_file", f"{str(token_file)!r} is over {MAX_TOKEN_BYTES} bytes: not a token"
            )
        try:
            token = data.decode("ascii").strip()
        except UnicodeDecodeError:
            raise CredentialsError("token_file", f"{str(token_file)!r} is not ASCII text") from None
        if not token:
            raise CredentialsError("token_file", f"{str(token_file)!r} is empty")
        _check_token("token_file", token)
        return token
    value = (os.environ if environ is None else environ).get(TOKEN_ENV, "").strip()
    if not value:
        return None
    _check_token(TOKEN_ENV, value)
    return value


def _check_token(option: str, token: str) -> None:
    # gRPC metadata values must be printable ASCII; a token with a newline inside would
    # fail on every call with an unclear error. The token itself is never shown.
    if any(not 0x20 <= ord(c) < 0x7F for c in token):
        raise CredentialsError(option, "the token holds a control or non-ASCII character")
