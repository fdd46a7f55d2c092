"""A real Prometheus (Debian package) scrapes a running agent's /metrics.

``make test`` installs the ``prometheus`` package (``make system-deps``); without
it these tests fail, saying so, rather than skip silently.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import free_port

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb

pytestmark = pytest.mark.slow


class Prometheus:
    """A ``prometheus`` server process scraping one target every second."""

    def __init__(self, tmp_path: Path, target: str) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail(
                "the 'prometheus' binary is not installed: run `make system-deps` "
                "(apt-get install prometheus), which `make test` does"
            )
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "scrape_configs": [
                {"job_name": "mlsidecar", "static_configs": [{"targets": [target]}]}
            ],
        }
        config_file = tmp_path / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = (tmp_path / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.log_path = tmp_path / "prometheus.log"

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-3000:]

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"prometheus not ready within {timeout}s:\n{self.output()}")

    def query(self, expression: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expression}, timeout=5)
        body = response.json()
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def wait_for_value(self, expression: str, expected: float, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(expression)
            if result and float(result[0]["value"][1]) == expected:
                return
            time.sleep(0.25)
        targets = httpx.get(f"{self.url}/api/v1/targets", timeout=5).json()["data"]
        pytest.fail(
            f"{expression} is {result}, not {expected}, after {timeout}s; "
            f"targets: {targets['activeTargets']}"
        )

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(15)
        self.log.close()


@pytest.fixture
def prometheus(tmp_path: Path, agent: Any) -> Iterator[Prometheus]:
    server = Prometheus(tmp_path, f"127.0.0.1:{agent.agent.api.port}")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def batch(n: int, seed: int) -> pb.PredictionBatch:
    return pb.PredictionBatch(
        model="m",
        model_version="v1",
        ids=[f"{seed}-{i}" for i in range(n)],
        latencies_ms=[float(i % 50) for i in range(n)],
        scores=[(i % 10) / 10 for i in range(n)],
    )


def test_prometheus_scrapes_the_prediction_count(agent, prometheus):
    stub = agent.stub()
    assert stub.SubmitPredictions(batch(137, seed=1)).accepted == 137

    prometheus.wait_for_value('sum(ml_predictions_total{ml_model_name="m"})', 137)
    prometheus.wait_for_value('sum(ml_prediction_duration_seconds_count{ml_model_name="m"})', 137)
    (up,) = prometheus.query('up{job="mlsidecar"}')
    assert up["value"][1] == "1"

    assert stub.SubmitPredictions(batch(63, seed=2)).accepted == 63
    prometheus.wait_for_value('sum(ml_predictions_total{ml_model_name="m"})', 200)
    prometheus.wait_for_value('sum(mlsidecar_ingest_rows_total{mlsidecar_kind="prediction"})', 200)
    (series,) = prometheus.query('ml_predictions_total{ml_model_name="m"}')
    assert series["metric"]["ml_model_version"] == "v1"
    assert series["metric"]["job"] == "mlsidecar"
