"""The wire contract is not Python-shaped: a Node.js client built from the .proto alone works.

tests/node_client/client.js loads proto/mlsidecar/v1/ingest.proto at run time with
@grpc/proto-loader (no generated code, no Python anywhere on its side) and talks to a
real agent over @grpc/grpc-js.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import feature_types

NODE_CLIENT = Path(__file__).resolve().parent / "node_client"

pytestmark = pytest.mark.slow


def _node_major(node: str) -> int:
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    return int(version.stdout.strip().lstrip("v").split(".")[0])


@pytest.fixture(scope="module")
def node_client() -> list[str]:
    """``node client.js``, after ``npm install`` if node_modules is missing or stale."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("Node.js and npm are needed (make test runs `npx buf` too): install Node >= 18")
    if _node_major(node) < 18:
        pytest.fail("the Node client test needs Node >= 18")
    installed = NODE_CLIENT / "node_modules" / ".package-lock.json"
    manifests = [NODE_CLIENT / "package.json", NODE_CLIENT / "package-lock.json"]
    if not installed.exists() or any(
        m.stat().st_mtime > installed.stat().st_mtime for m in manifests if m.exists()
    ):
        result = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund"],
            cwd=NODE_CLIENT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, f"npm install failed:\n{result.stdout}\n{result.stderr}"
    return [node, str(NODE_CLIENT / "client.js")]


def run_client(node_client: list[str], port: int) -> dict[str, Any]:
    result = subprocess.run(
        [*node_client, str(port)], capture_output=True, text=True, timeout=60, cwd=NODE_CLIENT
    )
    assert result.returncode == 0, f"node client failed:\n{result.stdout}\n{result.stderr}"
    output: dict[str, Any] = json.loads(result.stdout)
    return output


def test_node_client_submits_predictions_and_outcomes(node_client, agent):
    out = run_client(node_client, agent.agent.ingest.port)

    assert out["predictions"] == {"accepted": 5, "duplicate": False, "error": None}
    # Same batch_id again: acknowledged, flagged, not counted twice.
    assert out["duplicate"] == {"accepted": 5, "duplicate": True, "error": None}
    assert out["outcomes"] == {"accepted": 3, "duplicate": False, "error": None}
    # A malformed batch is INVALID_ARGUMENT (3) with a message naming the field.
    assert out["invalid"]["error"]["code"] == 3
    assert out["invalid"]["error"]["details"] == ("scores: 1 values, expected 2 (len(ids)) or none")

    # The engine saw them, exactly once, with the client's sample rate and features.
    report = agent.agent.engine.report("node-client")
    assert report is not None
    assert report["version"] == "v1"
    assert report["totals"]["rows"] == 5
    assert report["totals"]["batches"] == 1
    assert report["totals"]["outcomes"] == 3
    assert report["totals"]["estimated_predictions"] == 10.0  # sample_rate 0.5
    assert feature_types(report) == {
        "amount": "numeric",
        "merchant": "categorical",
    }
    assert report["segments"] == {"region=eu": 10.0}
    assert report["prediction"]["labels"] == {"fraud": 6.0, "ok": 4.0}
    assert report["window"]["latency_ms"]["count"] == 5
    assert report["window"]["score"]["count"] == 5

    # GetModelHealth, decoded by the Node client, is the same report.
    health = out["health"]["report"]
    assert health["model"] == "node-client"
    assert health["totals"]["rows"] == 5
    # int64 travels as a decimal string (a JS number would round it).
    assert int(out["health"]["window_start_unix_nano"]) == report["window"]["start_unix_nano"]
    assert int(out["health"]["window_end_unix_nano"]) == report["window"]["end_unix_nano"]
