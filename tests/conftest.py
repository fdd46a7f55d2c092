"""Shared fixtures: a real Agent on free 127.0.0.1 ports, driven as a user would drive it.

def test_something(agent):             # started with default test settings
    stub = agent.stub()                 # sync gRPC IngestStub on a real channel
    httpx.get(agent.api_url + "/readyz")
    agent.metric_reader.get_metrics_data(); agent.spans.get_finished_spans()

def test_custom(start_agent):
    harness = start_agent(ingest={"max_rows_per_batch": 10})
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agent._proto.mlsidecar.v1 import ingest_pb2_grpc as pb_grpc
from agent.app import Agent
from agent.config import Settings

# Child agents keep their state here, not in the working tree.
SUBPROCESS_DATA_DIR = tempfile.mkdtemp(prefix="mlsidecar-children-")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def feature_types(report: dict[str, Any]) -> dict[str, str]:
    """Feature name -> "numeric" | "categorical", from a model health report."""
    return {name: feature["type"] for name, feature in report["features"].items()}


def agent_settings(**overrides: Any) -> Settings:
    """Loopback on ephemeral ports, no OTLP export unless a test asks for it."""
    overrides.setdefault("ingest", {}).setdefault("listen", "127.0.0.1:0")
    overrides.setdefault("api", {}).setdefault("listen", "127.0.0.1:0")
    overrides.setdefault("telemetry", {}).setdefault("otlp", False)
    overrides.setdefault("shutdown_timeout_s", 5)
    # Each agent gets its own state directory (references), removed with the test session.
    overrides.setdefault("store", {}).setdefault("data_dir", tempfile.mkdtemp(prefix="mlsidecar-"))
    return Settings.load(None, **overrides)


class AgentHarness:
    """Runs a real Agent on its own event loop thread, as a separate process would."""

    def __init__(self, settings: Settings, **agent_kwargs: Any) -> None:
        self.settings = settings
        self.metric_reader = InMemoryMetricReader()
        self.spans = InMemorySpanExporter()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._channels: list[grpc.Channel] = []

        async def build() -> Agent:
            return Agent(
                settings,
                metric_readers=[self.metric_reader],
                span_processors=[SimpleSpanProcessor(self.spans)],
                **agent_kwargs,
            )

        self.agent: Agent = self.run(build())

    def run(self, coroutine: Any, timeout: float = 30) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def start(self) -> AgentHarness:
        self.run(self.agent.start())
        return self

    @property
    def ingest_target(self) -> str:
        return f"127.0.0.1:{self.agent.ingest.port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.agent.api.port}"

    def channel(self, **options: Any) -> grpc.Channel:
        channel = grpc.insecure_channel(self.ingest_target, **options)
        self._channels.append(channel)
        return channel

    def stub(self) -> pb_grpc.IngestStub:
        return pb_grpc.IngestStub(self.channel())

    def stop(self) -> None:
        """Stop the agent and its loop; a second call does nothing."""
        if self.loop.is_closed():
            return
        for channel in self._channels:
            channel.close()
        try:
            self.run(self.agent.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


@pytest.fixture
def start_agent() -> Iterator[Callable[..., AgentHarness]]:
    harnesses: list[AgentHarness] = []

    def start(agent_kwargs: dict[str, Any] | None = None, **overrides: Any) -> AgentHarness:
        harness = AgentHarness(agent_settings(**overrides), **(agent_kwargs or {}))
        harnesses.append(harness)
        return harness.start()

    yield start
    for harness in harnesses:
        harness.stop()


@pytest.fixture
def agent(start_agent: Callable[..., AgentHarness]) -> AgentHarness:
    return start_agent()


@pytest.fixture(scope="module")
def module_agent() -> Iterator[AgentHarness]:
    """One default agent shared by all tests of a module, for many cheap read-mostly cases.

    State carries over between those tests: use distinct model names, and compare before
    and after (self-metrics, /v1/models) rather than absolute numbers.
    """
    harness = AgentHarness(agent_settings()).start()
    try:
        yield harness
    finally:
        harness.stop()


# -- `mlsidecar` as a child process (CLI and shutdown tests) ---------------------------------


def mlsidecar_command() -> str:
    """The installed console script next to this interpreter (.venv/bin/mlsidecar)."""
    import shutil
    import sys
    from pathlib import Path

    path = shutil.which("mlsidecar", path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail("console script 'mlsidecar' not found next to sys.executable; pip install -e .")
    return path


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment without OTEL_*/MLSIDECAR_* variables, plus ``extra``."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "MLSIDECAR_"))}
    env["MLSIDECAR_STORE__DATA_DIR"] = SUBPROCESS_DATA_DIR
    env.update(extra)
    return env


class AgentProcess:
    """``mlsidecar run`` as a child process; its JSON log lines on stderr are collected.

    proc = AgentProcess("--config", str(path)); proc.wait_started()  # proc.ingest_target
    returncode, seconds = proc.terminate()
    """

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        import subprocess

        command = [mlsidecar_command(), "run", "--ingest-listen", "127.0.0.1:0"]
        command += ["--api-listen", "127.0.0.1:0", *args]
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env if env is not None else subprocess_env(),
        )
        self.stderr_lines: list[str] = []
        self.stdout_lines: list[str] = []
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(
                target=self._read, args=(self.proc.stderr, self.stderr_lines), daemon=True
            ),
            threading.Thread(
                target=self._read, args=(self.proc.stdout, self.stdout_lines), daemon=True
            ),
        ]
        for reader in self._readers:
            reader.start()
        self.ingest_target = ""
        self.api_url = ""

    def _read(self, stream: Any, lines: list[str]) -> None:
        for line in stream:
            with self._changed:
                lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def logs(self) -> list[dict[str, Any]]:
        """The stderr lines that are JSON objects (the agent's structured logs)."""
        import json

        entries = []
        for line in list(self.stderr_lines):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    def wait_for_log(self, message: str, timeout: float = 60.0) -> dict[str, Any]:
        import time

        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for entry in self.logs():
                    if entry.get("message") == message:
                        return entry
                if self.proc.poll() is not None and not any(r.is_alive() for r in self._readers):
                    pytest.fail(
                        f"mlsidecar exited with {self.proc.returncode} before logging {message!r}:\n"
                        + "\n".join(self.stderr_lines[-30:])
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(
                        f"mlsidecar did not log {message!r} within {timeout}s:\n"
                        + "\n".join(self.stderr_lines[-30:])
                    )
                self._changed.wait(min(remaining, 0.5))

    def wait_started(self, timeout: float = 60.0) -> dict[str, Any]:
        entry = self.wait_for_log("mlsidecar started", timeout)
        self.ingest_target = entry["ingest"]
        self.api_url = f"http://{entry['api']}"
        return entry

    def terminate(self, timeout: float = 60.0) -> tuple[int, float]:
        """SIGTERM, then wait; returns (exit code, seconds from signal to exit)."""
        import signal
        import time

        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        returncode = self.proc.wait(timeout)
        elapsed = time.monotonic() - started
        for reader in self._readers:
            reader.join(10)
        return returncode, elapsed

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        for reader in self._readers:
            reader.join(10)


@pytest.fixture
def agent_process() -> Iterator[Callable[..., AgentProcess]]:
    """Start ``mlsidecar run`` children; any still running at teardown are killed."""
    started: list[AgentProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> AgentProcess:
        process = AgentProcess(*args, env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Any]:
    """A real redis-server (tests/redis_server.py) on a free port, stopped after the test."""
    from redis_server import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()
