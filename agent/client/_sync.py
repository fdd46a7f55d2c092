"""``SidecarClient``: the SDK for threaded model services (Flask, Django, plain scripts).

client = SidecarClient("127.0.0.1:4320", model="fraud", model_version="v1")
client.log_prediction(request_id, {"amount": 42.0}, score=0.12)
client.log_outcome(request_id, label="legit")             # later, when the truth is known
"""

from __future__ import annotations

import atexit
import functools
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import grpc

from agent._proto.mlsidecar.v1 import ingest_pb2_grpc as pb_grpc
from agent.client._batches import OUTCOMES, PREDICTIONS
from agent.client._core import ClientCore, log
from agent.client._delivery import Failure, Send, Sleep

# The sender packs in slices and offers the GIL to the model's threads between them, once
# per PAUSE_EVERY_S of packing: a model thread waits at most about that long (plus one
# slice). A pause costs ~0.1 ms of the sender's time (the kernel's timer slack), so pausing
# after every slice (10-20 us each for numpy columns) made packing five times slower.
PAUSE_EVERY_S = 100e-6
SLICE_PAUSE_S = 50e-6

# Reconnect quickly after the agent comes back (gRPC's default backoff grows to 120 s).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


def open_channel(target: str, credentials: Any) -> tuple[grpc.Channel, dict[str, Any]]:
    """A blocking channel to the agent and its submit calls by kind."""
    if credentials is not None:
        channel = grpc.secure_channel(target, credentials, CHANNEL_OPTIONS)
    else:
        channel = grpc.insecure_channel(target, CHANNEL_OPTIONS)
    stub = pb_grpc.IngestStub(channel)
    return channel, {PREDICTIONS: stub.SubmitPredictions, OUTCOMES: stub.SubmitOutcomes}


def drive(
    plan: Any,
    send: Callable[[Send], Any],
    wait: Callable[[float], Any],
    pause: Callable[[float], Any] = time.sleep,
) -> None:
    """Run a sender cycle's ops on this thread: packing slices, sends, sleeps.

    Between slices it ``pause``s (offers the GIL) once per ``PAUSE_EVERY_S`` of packing.
    """
    answer: Any = None
    clock = time.perf_counter
    paused = clock()
    try:
        while True:
            op = plan.send(answer)
            answer = None
            if op is None:
                if clock() - paused >= PAUSE_EVERY_S:
                    # Let the model's threads take the GIL. sleep(0) would not: this
                    # thread re-takes the GIL before a waiting thread wakes up, and the
                    # waiter then waits out the 5 ms switch interval.
                    pause(SLICE_PAUSE_S)
                    paused = clock()
                continue
            if isinstance(op, Send):
                answer = send(op)  # the RPC releases the GIL while it waits
            elif isinstance(op, Sleep):
                wait(op.seconds)
            paused = clock()
    except StopIteration:
        pass


def blocking_send(submit: dict[str, Any], op: Send, timeout: float, metadata: Any) -> Any:
    """One blocking RPC: the agent's answer, or a ``Failure`` with its status."""
    try:
        return submit[op.kind](op.batch, timeout=timeout, metadata=metadata)
    except grpc.RpcError as error:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return Failure(code, details or "")
    except ValueError as error:  # e.g. the channel was closed under us
        return Failure(grpc.StatusCode.CANCELLED, str(error))


def _close_at_exit(ref: weakref.ref[Any], timeout: float) -> None:
    """The exit hook of both clients: flush what is buffered (see ``close_at_exit``)."""
    client = ref()
    if client is not None:
        client.close_at_exit(timeout)


def register_exit_hook(client: Any, timeout: float) -> Callable[[], None]:
    """A hook of the client's own (unregister() removes every registration of a function)."""
    hook = functools.partial(_close_at_exit, weakref.ref(client), timeout)
    atexit.register(hook)
    return hook


class SidecarClient(ClientCore):
    """Sends predictions and outcomes to an mlsidecar agent from a background thread.

    with SidecarClient("127.0.0.1:4320", model="fraud", model_version="v1") as client:
        client.log_prediction("req-1", {"amount": 42.0, "merchant": "fuel"}, score=0.12)
    # leaving the block flushes (up to close_timeout_s) and stops the thread

    Calls never block on the network and never raise because the agent is down, slow or
    refusing: events wait in a bounded buffer (``max_buffer`` rows, oldest dropped first)
    and every event not delivered is counted in ``stats().dropped`` by reason.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:4320",
        model: str = "",
        model_version: str = "",
        **options: Any,
    ) -> None:
        super().__init__(target, model, model_version, **options)
        self._channel, self._submit = open_channel(target, self._credentials)
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._idle = threading.Condition()
        self._thread = threading.Thread(
            target=self._run, name=f"mlsidecar-client:{model}", daemon=True
        )
        self._thread.start()
        self._atexit = register_exit_hook(self, self.close_timeout_s)

    # -- public -------------------------------------------------------------------------------

    def flush(self, timeout: float = 5.0) -> bool:
        """Send everything buffered so far; True when nothing is left, False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            self._flush_waiters += 1
            try:
                self._wakeup.set()
                while self._buffer.rows or self._busy:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._thread.is_alive():
                        return False
                    if self._delivery.breaker_wait_s() > remaining:
                        return False  # the breaker stays open past the deadline: no hope
                    self._idle.wait(min(remaining, 0.05))
                return True
            finally:
                self._flush_waiters -= 1

    def close(self, timeout: float | None = None) -> None:
        """Flush for up to ``timeout`` s (``close_timeout_s``), then stop; rows left are dropped."""
        if self._closed:
            return
        timeout = self.close_timeout_s if timeout is None else timeout
        flushed = self.flush(timeout)
        self._closed = True
        # Whatever is still pending is given up: counted as dropped ("closed"), not awaited.
        self._delivery.abandon = True
        self._stopping.set()
        self._wakeup.set()
        self._thread.join(max(1.0, self.send_timeout_s + 1.0))
        self._channel.close()
        self._closed_with(flushed, timeout)

    def close_at_exit(self, timeout: float) -> None:
        self.close(timeout)

    def __enter__(self) -> SidecarClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the sender thread --------------------------------------------------------------------

    def _wake(self) -> None:
        self._wakeup.set()

    def _run(self) -> None:
        next_flush = time.monotonic() + self.flush_interval_s
        while not self._stopping.is_set():
            due, next_flush = self._sender_due(time.monotonic(), next_flush)
            if due:
                self._busy = True
                try:
                    self._drive(self._cycle())
                except Exception:  # the sender must outlive any bug in one batch
                    log.exception("mlsidecar client: sender error; batch dropped")
                finally:
                    self._busy = False
                continue
            with self._idle:
                self._idle.notify_all()
            self._wakeup.wait(max(0.0, next_flush - time.monotonic()))
            self._wakeup.clear()
        with self._idle:
            self._idle.notify_all()

    def _drive(self, plan: Any) -> None:
        drive(plan, self._send, self._stopping.wait)

    def _send(self, op: Send) -> Any:
        return blocking_send(self._submit, op, self.send_timeout_s, self._metadata)
