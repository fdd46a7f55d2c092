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
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agent._proto.mlsidecar.v1 import ingest_pb2_grpc as pb_grpc
from agent.app import Agent
from agent.config import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def agent_settings(**overrides: Any) -> Settings:
    """Loopback on ephemeral ports, no OTLP export unless a test asks for it."""
    overrides.setdefault("ingest", {}).setdefault("listen", "127.0.0.1:0")
    overrides.setdefault("api", {}).setdefault("listen", "127.0.0.1:0")
    overrides.setdefault("telemetry", {}).setdefault("otlp", False)
    overrides.setdefault("shutdown_timeout_s", 5)
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
