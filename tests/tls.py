"""Test certificates, made with the ``openssl`` command-line tool: one helper for every test.

    pki = Pki(tmp_path)                  # a CA, a server cert for 127.0.0.1/localhost, a client cert
    start_agent(ingest={"tls": pki.server_tls()})
    grpc.ssl_channel_credentials(pki.ca.read_bytes())   # pki.other_ca: a CA that signed nothing

The same steps as tests/test_grpc_security.py's, tests/test_helm_chart.py's and
tests/test_inject_webhook.py's fixtures (which can import ``Pki`` / ``self_signed`` from here).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest


def openssl(*args: str | Path, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command-line tool is needed to make test certificates")
    subprocess.run(
        ["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=30
    )


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """(key, cert) of a new CA valid for two days."""
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return key, cert


def make_leaf(
    directory: Path, name: str, ca: tuple[Path, Path], extensions: str, serial: int
) -> tuple[Path, Path]:
    """(key, cert) signed by ``ca``; ``extensions`` in openssl extfile syntax."""
    key, csr, cert = (directory / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
    ext_file = directory / f"{name}.ext"
    ext_file.write_text(extensions)
    openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", csr, "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0], "-set_serial", str(serial),
        "-out", cert, "-days", "2", "-extfile", ext_file,
        cwd=directory,
    )  # fmt: skip
    return key, cert


def self_signed(directory: Path, cn: str, san: str, *, stem: str = "tls") -> tuple[Path, Path]:
    """(key, cert) of one self-signed certificate, e.g. a kubernetes.io/tls Secret's
    ``tls.key`` / ``tls.crt``: ``self_signed(d, "127.0.0.1", "IP:127.0.0.1")``."""
    key, cert = directory / f"{stem}.key", directory / f"{stem}.crt"
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={cn}",
        "-addext", f"subjectAltName={san}",
        cwd=directory,
    )  # fmt: skip
    return key, cert


class Pki:
    """A test CA with a server certificate (127.0.0.1, localhost), a client certificate
    (for mTLS) and a second CA that signed neither (a wrong ``--ca-file``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca_key, self.ca = make_ca(directory, "test-ca")
        ca = (self.ca_key, self.ca)
        self.server_key, self.server = make_leaf(
            directory,
            "server",
            ca,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
            serial=1,
        )
        self.client_key, self.client = make_leaf(
            directory, "client", ca, "extendedKeyUsage=clientAuth\n", serial=2
        )
        _, self.other_ca = make_ca(directory, "other-ca")

    def server_tls(self, **extra: Any) -> dict[str, Any]:
        """The ``tls`` section of a listener serving the server certificate."""
        return {"cert": str(self.server), "key": str(self.server_key), **extra}
