"""Graceful shutdown of ``mlsidecar run``: SIGTERM mid-stream loses no acknowledged batch.

The agent runs as a child process exporting OTLP/gRPC to a loopback receiver
(``tests/otlp_receiver.py``; no Collector binary is available here). The metric
export interval is far longer than the test, so the only metrics the receiver
gets are those of the final flush on shutdown: that flush must carry every
acknowledged row, and nothing that was not acknowledged.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from conftest import free_port
from otlp_receiver import OtlpGrpcReceiver

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb
from agent._proto.mlsidecar.v1 import ingest_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

MODEL = "fraud"
ROWS_PER_BATCH = 50
SHUTDOWN_TIMEOUT_S = 4
# Process start-up and interpreter exit on a busy 2-core machine, on top of the deadline.
EXIT_SLACK_S = 5
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


@pytest.fixture
def collector() -> Iterator[OtlpGrpcReceiver]:
    with OtlpGrpcReceiver() as receiver:
        yield receiver


def write_config(
    tmp_path: Path, endpoint: str, shutdown_timeout_s: float = SHUTDOWN_TIMEOUT_S, **telemetry: Any
) -> Path:
    path = tmp_path / "mlsidecar.yaml"
    config = {
        "shutdown_timeout_s": shutdown_timeout_s,
        "telemetry": {
            "otlp": True,
            "endpoint": endpoint,
            "protocol": "grpc",
            "metric_export_interval_ms": 600_000,  # only the final flush exports metrics
            "traces": False,
            "logs": False,
            **telemetry,
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


class Streamer(threading.Thread):
    """Streams prediction batches with up to ``window`` unacknowledged, counting acked rows.

    Stops sending once a response carries an error (the agent is draining) and
    then lets the stream end; an RpcError ending it is recorded.
    """

    def __init__(self, target: str, window: int = 8) -> None:
        super().__init__(daemon=True)
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.IngestStub(self.channel)
        self.window = threading.Semaphore(window)
        self.stop_sending = threading.Event()
        self.sent = 0
        self.acked_rows = 0
        self.acked_batches = 0
        self.errors: list[pb.Error] = []
        self.end: grpc.StatusCode | None = None  # None: the stream ended normally
        self._lock = threading.Lock()

    def requests(self) -> Iterator[pb.EventBatch]:
        while not self.stop_sending.is_set():
            if not self.window.acquire(timeout=0.1):
                continue
            i = self.sent
            self.sent += 1
            yield pb.EventBatch(
                predictions=pb.PredictionBatch(
                    model=MODEL,
                    batch_id=f"b{i}",
                    ids=[f"{i}-{j}" for j in range(ROWS_PER_BATCH)],
                    scores=[j / ROWS_PER_BATCH for j in range(ROWS_PER_BATCH)],
                )
            )

    def run(self) -> None:
        try:
            for response in self.stub.StreamEvents(self.requests()):
                if response.HasField("error"):
                    self.errors.append(response.error)
                    self.stop_sending.set()
                else:
                    with self._lock:
                        self.acked_rows += response.accepted
                        self.acked_batches += 1
                self.window.release()
        except grpc.RpcError as error:
            self.end = error.code()
        finally:
            self.stop_sending.set()
            self.channel.close()

    def wait_for_acked_batches(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.acked_batches < n:
            assert self.is_alive(), f"the stream ended early: {self.end}, {self.errors}"
            assert time.monotonic() < deadline, f"only {self.acked_batches} batches acked"
            time.sleep(0.02)


def exported_predictions(collector: OtlpGrpcReceiver) -> Any:
    return collector.metric_value("ml.predictions", **{"ml.model.name": MODEL})


def test_sigterm_mid_stream_loses_no_acknowledged_batch(tmp_path, collector, agent_process):
    process = agent_process("--config", str(write_config(tmp_path, collector.endpoint)))
    process.wait_started()
    streamer = Streamer(process.ingest_target)
    streamer.start()
    streamer.wait_for_acked_batches(20)
    assert exported_predictions(collector) is None, "nothing is exported before the final flush"

    returncode, seconds = process.terminate()
    streamer.join(30)

    assert not streamer.is_alive(), "the stream did not end after SIGTERM"
    assert returncode == 0, "\n".join(process.stderr_lines[-30:])
    assert seconds < SHUTDOWN_TIMEOUT_S + EXIT_SLACK_S, f"exit took {seconds:.1f}s"
    # The stream ended: refused messages (UNAVAILABLE, in-stream) or the server closed it.
    assert all(e.code == UNAVAILABLE and "shutting down" in e.message for e in streamer.errors)
    assert streamer.errors or streamer.end in (
        None,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
    ), streamer.end
    assert streamer.acked_rows == streamer.acked_batches * ROWS_PER_BATCH >= 20 * ROWS_PER_BATCH
    # The final flush carried exactly the acknowledged rows: none lost, none extra.
    exported = collector.wait_for(lambda: exported_predictions(collector), timeout=10)
    assert exported == streamer.acked_rows
    assert len(collector.metric_requests) >= 1
    messages = [entry["message"] for entry in process.logs()]
    assert messages[-1] == "mlsidecar stopped", messages[-5:]
    assert "telemetry flush overran the shutdown deadline; dropping the rest" not in messages
    # The final flush says the agent stopped on purpose (MLSidecarStoppedReporting's cue).
    assert collector.gauge_values("mlsidecar.running") == [0]


def test_an_agent_killed_ends_its_running_series_on_1(tmp_path, collector, agent_process):
    """kill -9 leaves no final flush: the last point a Collector got says "running", which
    is how Prometheus tells a dead sidecar from one stopped gracefully."""
    config = write_config(tmp_path, collector.endpoint, metric_export_interval_ms=200)
    process = agent_process("--config", str(config))
    process.wait_started()
    collector.wait_for(lambda: collector.gauge_values("mlsidecar.running"), timeout=20)
    process.kill()
    points = collector.gauge_values("mlsidecar.running")
    assert points and set(points) == {1}, points


def test_after_sigterm_new_batches_get_unavailable(tmp_path, collector, agent_process):
    process = agent_process("--config", str(write_config(tmp_path, collector.endpoint)))
    process.wait_started()
    with grpc.insecure_channel(process.ingest_target) as channel:
        stub = pb_grpc.IngestStub(channel)
        assert stub.SubmitPredictions(pb.PredictionBatch(model=MODEL, ids=["a"])).accepted == 1

        returncode, _ = process.terminate()

        # Whether it is the draining agent or a closed port answering, the status is the same:
        # UNAVAILABLE, which clients retry elsewhere or later.
        with pytest.raises(grpc.RpcError) as raised:
            stub.SubmitPredictions(pb.PredictionBatch(model=MODEL, ids=["b"]), timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert returncode == 0
    assert collector.wait_for(lambda: exported_predictions(collector), timeout=10) == 1


def test_sigterm_with_the_collector_down_still_exits_within_the_deadline(tmp_path, agent_process):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens: every export is refused
    config = write_config(tmp_path, down, shutdown_timeout_s=2, traces=True, logs=True)
    process = agent_process("--config", str(config))
    process.wait_started()
    with grpc.insecure_channel(process.ingest_target) as channel:
        stub = pb_grpc.IngestStub(channel)
        assert stub.SubmitPredictions(pb.PredictionBatch(model=MODEL, ids=["a"])).accepted == 1

    returncode, seconds = process.terminate()

    assert returncode == 0, "\n".join(process.stderr_lines[-30:])
    # Left alone, the exporters' retries (1 s, 2 s, 4 s backoff, up to a 10 s timeout, one
    # signal after the other) kept the process alive for 15-30 s.
    assert seconds < 2 + 4, f"exit took {seconds:.1f}s with shutdown_timeout_s=2"
    messages = [entry["message"] for entry in process.logs()]
    assert "telemetry flush overran the shutdown deadline; dropping the rest" in messages
    assert "mlsidecar stopped" in messages
