"""Command-line options for connecting to the agent's gRPC ingest, shared by every command
that sends to it (``replay``, ``demo-model``, ``demo-traffic``).

    add_connection_arguments(parser)                    # --token-file, --tls, --ca-file, ...
    connection = ingest_connection(args, target="127.0.0.1:4320")
    SidecarClient(connection.target, token=connection.token, credentials=connection.credentials)

The options mean what the SDK's ``token`` and ``credentials`` mean; the files are read by
``agent.client.credentials`` (the same helper an SDK user calls). The token comes from a
file or ``$MLSIDECAR_TOKEN``, never from the command line, and is never printed.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# agent.client.credentials.TOKEN_ENV; importing it here would load the whole SDK (numpy,
# grpc) whenever the CLI builds its parser, so the helper is imported when a command runs.
TOKEN_ENV = "MLSIDECAR_TOKEN"
FLAGS = {
    "token_file": "--token-file",
    "ca_file": "--ca-file",
    "cert_file": "--cert-file",
    "key_file": "--key-file",
    TOKEN_ENV: TOKEN_ENV,
}


@dataclass(frozen=True, slots=True)
class IngestConnection:
    """Where the agent's ingest is and how to prove who we are to it."""

    target: str
    token: str | None = None
    credentials: Any = None  # grpc.ChannelCredentials, or None for plaintext
    ca_file: Path | None = None

    @property
    def tls(self) -> bool:
        return self.credentials is not None

    def protection(self) -> str:
        """For messages: "TLS, with a token", "plaintext"; never the token itself."""
        return ("TLS" if self.tls else "plaintext") + (", with a token" if self.token else "")

    def channel(self, options: list[tuple[str, Any]] | None = None) -> Any:
        import grpc

        if self.credentials is None:
            return grpc.insecure_channel(self.target, options=options)
        return grpc.secure_channel(self.target, self.credentials, options=options)


def add_connection_arguments(parser: argparse.ArgumentParser, *, tls: bool = True) -> None:
    """The token option and, with ``tls``, the TLS ones, in their own help group."""
    group = parser.add_argument_group("connecting to the agent's gRPC ingest")
    group.add_argument(
        "--token-file", type=Path, metavar="PATH",
        help=f"file holding the agent's ingest.token (default: ${TOKEN_ENV})",
    )  # fmt: skip
    # A token given as a value would show in `ps` and the shell's history: refused with a hint.
    group.add_argument("--token", help=argparse.SUPPRESS)
    if not tls:
        return
    group.add_argument(
        "--tls", action="store_true",
        help="connect with TLS, checking the agent's certificate against the system's CAs",
    )  # fmt: skip
    group.add_argument(
        "--ca-file", type=Path, metavar="PATH",
        help="CA certificate(s) (PEM) that signed the agent's ingest.tls.cert; implies --tls",
    )  # fmt: skip
    group.add_argument(
        "--cert-file", type=Path, metavar="PATH",
        help="client certificate (PEM) for an agent with ingest.tls.client_ca (mTLS)",
    )  # fmt: skip
    group.add_argument(
        "--key-file", type=Path, metavar="PATH", help="the client certificate's private key (PEM)"
    )


def ingest_connection(
    args: argparse.Namespace,
    target: str,
    *,
    fallback_token: str | None = None,
    fallback_tls: bool = False,
) -> IngestConnection:
    """The connection the options describe; ValueError naming the flag when one is unusable.

    ``fallback_token`` / ``fallback_tls`` come from an agent config (``replay --config``):
    the options and ``$MLSIDECAR_TOKEN`` win over them.
    """
    if getattr(args, "token", None) is not None:
        raise ValueError(
            "--token: a token on the command line shows in `ps` and the shell's history; "
            f"put it in a file and give --token-file PATH, or set {TOKEN_ENV}"
        )
    from agent.client.credentials import CredentialsError, channel_credentials, read_token

    ca_file = getattr(args, "ca_file", None)
    try:
        token = read_token(args.token_file)
        credentials = channel_credentials(
            tls=bool(getattr(args, "tls", False)) or fallback_tls,
            ca_file=ca_file,
            cert_file=getattr(args, "cert_file", None),
            key_file=getattr(args, "key_file", None),
        )
    except CredentialsError as error:
        reason = re.sub(r"\b(token_file|ca_file|cert_file|key_file)\b",
                        lambda m: FLAGS[m[1]], error.reason)  # fmt: skip
        raise ValueError(f"{FLAGS.get(error.option, error.option)}: {reason}") from None
    return IngestConnection(
        target=target,
        token=token if token is not None else fallback_token,
        credentials=credentials,
        ca_file=ca_file,
    )


def quiet_grpc_core_logs() -> None:
    """Keep gRPC's C core from printing INFO lines (each failed TLS handshake) on a command's
    stderr: the command explains the failure itself. Effective only before grpc is imported;
    GRPC_VERBOSITY set by the user wins."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def explain_connect_failure(details: str, connection: IngestConnection) -> str:
    """What a failed connection's gRPC error most likely means, naming the flag to fix."""
    text = details.lower()
    if "certificate_verify_failed" in text or "certificate verify failed" in text:
        if connection.ca_file is not None:
            return (
                f"the agent's TLS certificate is not signed by a CA in --ca-file "
                f"{str(connection.ca_file)!r}"
            )
        return (
            "the agent's TLS certificate is not signed by a CA this system trusts: give --ca-file"
        )
    if "wrong_version_number" in text or "http_request" in text:
        return "the agent does not serve TLS there: drop --tls / --ca-file (or check the port)"
    if "peer_did_not_return_a_certificate" in text or "certificate required" in text:
        return "the agent asks for a client certificate: give --cert-file and --key-file"
    if "socket closed" in text or "connection reset" in text:
        if connection.tls:
            return (
                "the agent closed the TLS connection: it may ask for a client certificate "
                "(--cert-file, --key-file)"
            )
        return "the agent closed the connection: it may serve TLS (give --ca-file or --tls)"
    if "connection refused" in text:
        return "nothing listens there (connection refused)"
    return details
