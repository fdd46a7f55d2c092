"""The client never hurts the model service: the agent down, hung, killed and restarted.

The agent is a real ``mlsidecar run`` child process on a fixed loopback port, so it can
be started late, frozen (SIGSTOP: it accepts connections and answers nothing), killed
with -9 and started again on the same port. The caller's thread logs throughout; each
test records the longest ``log_prediction`` call and checks that no exception escaped.

The bound these tests check is loose on purpose (a call never waits for the network,
so it stays far below ``send_timeout_s``); the per-call figures are bench/client.py's.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import httpx
import pytest
from conftest import AgentProcess, free_port

from agent.client import SidecarClient

pytestmark = pytest.mark.slow

# Short timers so that a test sees the breaker open and close within a second or two.
RESILIENT = {
    "flush_interval_s": 0.05,
    "batch_rows": 50,
    "max_buffer": 2000,
    "send_timeout_s": 0.5,
    "backoff_s": 0.02,
    "max_backoff_s": 0.1,
    "breaker_fail_max": 2,
    "breaker_reset_s": 0.3,
}
# Far below send_timeout_s: a call that waited for the network would take at least that.
CALL_BOUND_S = 0.25


class Caller:
    """The model service's side: logs predictions and remembers the slowest call."""

    def __init__(self, client: SidecarClient) -> None:
        self.client = client
        self.worst_s = 0.0
        self.calls = 0
        self.breaker_states: set[str] = set()

    def log_for(self, seconds: float, prefix: str, rate: float = 1000.0) -> list[str]:
        ids: list[str] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            prediction_id = f"{prefix}{len(ids)}"
            started = time.perf_counter()
            self.client.log_prediction(prediction_id, {"x": 1.0, "city": "oslo"}, score=0.4)
            self.worst_s = max(self.worst_s, time.perf_counter() - started)
            ids.append(prediction_id)
            self.calls += 1
            if len(ids) % 50 == 0:
                self.breaker_states.add(self.client.stats().breaker_state)
            time.sleep(1 / rate)
        return ids


def start_agent_on(agent_process: Any, port: int) -> AgentProcess:
    process = agent_process("--ingest-listen", f"127.0.0.1:{port}")
    process.wait_started()
    return process


def health(process: AgentProcess, model: str) -> dict[str, Any]:
    response = httpx.get(f"{process.api_url}/v1/models/{model}/health", timeout=5)
    assert response.status_code == 200, response.text
    return response.json()


def breaker_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "circuit breaker" in r.getMessage()]


def test_agent_down_from_the_start_then_started_late(agent_process, caplog):
    caplog.set_level(logging.INFO, logger="agent.client")
    port = free_port()
    client = SidecarClient(f"127.0.0.1:{port}", model="late", **RESILIENT)
    caller = Caller(client)

    caller.log_for(1.5, "down-")  # nobody listens on the port
    down = client.stats()
    assert down.breaker_state == "open"
    assert down.sent_predictions == 0
    lines = breaker_lines(caplog)
    assert lines and len(lines) <= 2 * (1.5 / RESILIENT["breaker_reset_s"]) + 2  # per change

    agent = start_agent_on(agent_process, port)
    after = caller.log_for(0.5, "up-")
    assert client.flush(10) is True
    stats = client.stats()
    client.close(2)

    print(f"{caller.calls} calls, the slowest took {caller.worst_s * 1e6:.0f} µs")
    assert caller.worst_s < CALL_BOUND_S, f"a call took {caller.worst_s * 1000:.1f} ms"
    assert stats.breaker_state == "closed"
    assert lines[0].endswith("closed -> open")
    assert breaker_lines(caplog)[-1].endswith("half-open -> closed")
    rows = health(agent, "late")["totals"]["rows"]
    assert rows == stats.sent_predictions >= len(after)
    # Everything logged is accounted for: sent, or dropped with a reason.
    assert stats.sent_predictions + stats.dropped_total == caller.calls
    assert stats.dropped.get("buffer_full", 0) + stats.dropped.get("unavailable", 0) > 0


def test_agent_killed_mid_run_and_restarted_on_the_same_port(agent_process):
    port = free_port()
    first = start_agent_on(agent_process, port)
    client = SidecarClient(f"127.0.0.1:{port}", model="restarted", **RESILIENT)
    caller = Caller(client)

    before = caller.log_for(0.3, "before-")
    assert client.flush(10)
    assert health(first, "restarted")["totals"]["rows"] == len(before)
    sent_to_first = client.stats().sent_predictions

    first.proc.send_signal(signal.SIGKILL)
    first.kill()
    caller.log_for(1.0, "during-")
    assert client.stats().breaker_state == "open"

    second = start_agent_on(agent_process, port)
    after = caller.log_for(0.5, "after-")
    for prediction_id in after:
        client.log_outcome(prediction_id, value=1.0)
    assert client.flush(10)
    stats = client.stats()
    client.close(2)

    print(f"{caller.calls} calls, the slowest took {caller.worst_s * 1e6:.0f} µs")
    assert caller.worst_s < CALL_BOUND_S, f"a call took {caller.worst_s * 1000:.1f} ms"
    assert stats.breaker_state == "closed"
    report = health(second, "restarted")
    assert report["totals"]["rows"] == stats.sent_predictions - sent_to_first
    assert report["outcomes"]["joined"] == len(after)  # new events flow after recovery
    assert stats.sent_predictions + stats.dropped_total == caller.calls


def test_a_hung_agent_costs_the_caller_nothing_and_the_breaker_opens(agent_process):
    """SIGSTOP freezes the agent: the kernel still accepts connections, nothing answers."""
    port = free_port()
    agent = start_agent_on(agent_process, port)
    client = SidecarClient(f"127.0.0.1:{port}", model="hung", **RESILIENT)
    caller = Caller(client)
    caller.log_for(0.2, "warm-")
    assert client.flush(10)

    os.kill(agent.proc.pid, signal.SIGSTOP)
    try:
        caller.log_for(1.5, "frozen-")
        frozen = client.stats()
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)
    assert frozen.breaker_state == "open"
    assert frozen.dropped.get("deadline_exceeded", 0) > 0

    after = caller.log_for(0.3, "thawed-")
    assert client.flush(10)
    stats = client.stats()
    client.close(2)
    print(f"{caller.calls} calls, the slowest took {caller.worst_s * 1e6:.0f} µs")
    assert caller.worst_s < CALL_BOUND_S, f"a call took {caller.worst_s * 1000:.1f} ms"
    assert stats.breaker_state == "closed"
    assert health(agent, "hung")["totals"]["rows"] == stats.sent_predictions >= len(after)


def test_unavailable_batches_wait_and_retry_until_a_restarted_agent_takes_them(agent_process):
    port = free_port()
    first = start_agent_on(agent_process, port)
    client = SidecarClient(f"127.0.0.1:{port}", model="drained", **{**RESILIENT, "max_retries": 50})
    caller = Caller(client)
    caller.log_for(0.2, "a-")
    assert client.flush(10)
    returncode, _ = first.terminate()
    assert returncode == 0
    pending = caller.log_for(0.3, "b-")  # nobody takes these yet: they wait and retry
    second = start_agent_on(agent_process, port)
    assert client.flush(10)
    stats = client.stats()
    client.close(2)
    assert stats.retries > 0 and stats.dropped == {}
    assert health(second, "drained")["totals"]["rows"] == len(pending)
