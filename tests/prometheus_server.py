"""A real Prometheus for tests: Debian's ``prometheus`` on a free 127.0.0.1 port.

Used by tests/test_prometheus_scrape.py and tests/test_dashboards_live.py (``make test``
installs the package with ``make system-deps``; without it these tests fail, saying so).

    with PrometheusServer(tmp_path, ["127.0.0.1:9464"], rule_files=[...]) as prometheus:
        prometheus.wait_for_value('sum(ml_predictions_total)', 200)
        prometheus.range("up", start, end)      # series with a real value over the run
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import free_port


class PrometheusServer:
    """``prometheus`` scraping ``targets`` (job ``mlsidecar``) and evaluating rules every second."""

    def __init__(
        self, directory: Path, targets: str | list[str], *, rule_files: Sequence[Path] = ()
    ) -> None:
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
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [
                {
                    "job_name": "mlsidecar",
                    "static_configs": [
                        {"targets": [targets] if isinstance(targets, str) else targets}
                    ],
                }
            ],
        }
        config_file = directory / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = directory / "prometheus.log"
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def __enter__(self) -> PrometheusServer:
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

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

    def api(self, path: str, **params: Any) -> Any:
        """``GET /api/v1/<path>``'s data; a failed call fails the test with Prometheus' error."""
        body = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10).json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expression: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expression)["result"])

    def range(self, expression: str, start: float, end: float) -> list[dict[str, Any]]:
        """Series of a range query, keeping only those with a real (non-NaN) value."""
        data = self.api("query_range", query=expression, start=start, end=end, step="1s")
        return [
            series
            for series in data["result"]
            if any(v not in ("NaN", "+Inf", "-Inf") for _, v in series["values"])
        ]

    def wait_for_value(self, expression: str, expected: float, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(expression)
            if result and float(result[0]["value"][1]) == expected:
                return
            time.sleep(0.25)
        targets = self.api("targets")
        pytest.fail(
            f"{expression} is {result}, not {expected}, after {timeout}s; "
            f"targets: {targets['activeTargets']}"
        )

    def stop(self) -> None:
        """Stop the server; a second call does nothing."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        if not self.log.closed:
            self.log.close()
