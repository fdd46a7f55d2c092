"""OTEL_SDK_DISABLED=true turns OpenTelemetry off (no-op providers, as the specification
says); the agent must say so rather than report telemetry as configured: in its start-up
log, on /readyz and in `mlsidecar health`. It stays ready, since the switch is deliberate.
A real `mlsidecar run` child process, and an in-process agent for the exporter wiring.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import httpx
import pytest
from conftest import mlsidecar_command, subprocess_env

from agent.telemetry.providers import sdk_disabled


def test_a_disabled_sdk_is_reported_as_exporting_nothing_yet_ready(agent_process: Any) -> None:
    env = subprocess_env() | {"OTEL_SDK_DISABLED": "true", "MLSIDECAR_TELEMETRY__OTLP": "true"}
    process = agent_process(env=env)
    started = process.wait_started()
    assert started["exporting"] == "nothing (OTEL_SDK_DISABLED=true)"
    warning = process.wait_for_log(
        "OTEL_SDK_DISABLED=true: OpenTelemetry is off, so no metrics (OTLP or /metrics), "
        "traces or logs are produced; ingest, health reports and alerts still work"
    )
    assert warning["level"] == "WARNING"

    # Ingest still works, yet nothing is recorded: /metrics holds no sample at all.
    posted = httpx.post(
        f"{process.api_url}/v1/predictions", json={"model": "m", "ids": ["a"], "scores": [0.2]}
    )
    assert posted.json() == {"accepted": 1, "duplicate": False}
    samples = [
        line
        for line in httpx.get(f"{process.api_url}/metrics").text.splitlines()
        if line and not line.startswith("#")
    ]
    assert samples == []

    ready = httpx.get(f"{process.api_url}/readyz")
    assert ready.status_code == 200
    expected = {"grpc_serving": True, "telemetry_configured": False, "telemetry_disabled": True}
    assert ready.json()["checks"] == expected

    health = subprocess.run(
        [mlsidecar_command(), "health", "--api", process.api_url.removeprefix("http://")],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
    )
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout)["checks"] == expected
    assert process.terminate()[0] == 0


def test_without_the_variable_telemetry_is_configured_and_not_marked_disabled(
    agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks = httpx.get(f"{agent.api_url}/readyz").json()["checks"]
    assert checks == {"grpc_serving": True, "telemetry_configured": True}
    assert agent.agent.telemetry.describe() == "prometheus"
    for value, disabled in (("true", True), (" TRUE ", True), ("false", False), ("", False)):
        monkeypatch.setenv("OTEL_SDK_DISABLED", value)
        assert sdk_disabled() is disabled


def test_an_in_process_agent_with_the_sdk_disabled_builds_no_otlp_exporter(
    start_agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    harness = start_agent(telemetry={"otlp": True})
    telemetry = harness.agent.telemetry
    assert telemetry.disabled and not telemetry.configured
    assert telemetry.exporting == []
    assert telemetry.log_handler is None  # no OTLP log exporter was built
    assert harness.agent.readiness()["telemetry_disabled"] is True
