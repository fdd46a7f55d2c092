"""``AsyncSidecarClient``: the SDK for asyncio services (FastAPI, aiohttp), with a task.

client = AsyncSidecarClient("127.0.0.1:4320", model="fraud", model_version="v1")
client.log_prediction(request_id, features, score=score)   # sync, non-blocking
await client.close()                                        # in the app's shutdown
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

import grpc
import grpc.aio

from agent._proto.mlsidecar.v1 import ingest_pb2_grpc as pb_grpc
from agent.client._batches import OUTCOMES, PREDICTIONS
from agent.client._core import ClientCore, log
from agent.client._delivery import Failure, Send, Sleep
from agent.client._sync import (
    CHANNEL_OPTIONS,
    blocking_send,
    drive,
    open_channel,
    register_exit_hook,
)


class AsyncSidecarClient(ClientCore):
    """The same calls and guarantees as ``SidecarClient``; the sender is an asyncio task.

    async with AsyncSidecarClient("127.0.0.1:4320", model="fraud") as client:
        client.log_prediction("req-1", {"amount": 42.0}, score=0.12)   # no await
    # flush(), close() are coroutines; the task starts with the first call inside a loop

    ``log_*`` may also be called from other threads. Packing yields to the event loop
    between columns, so request handlers keep their latency. ``await client.close()`` on
    shutdown; a client never closed is flushed at interpreter exit over a blocking
    channel (no loop runs by then), for up to ``close_timeout_s``.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:4320",
        model: str = "",
        model_version: str = "",
        **options: Any,
    ) -> None:
        super().__init__(target, model, model_version, **options)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._task: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None
        self._submit: dict[str, Any] = {}
        self._wakeup: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None
        self._needs_start = True  # the first log_* call inside a loop starts the task
        self._atexit = register_exit_hook(self, self.close_timeout_s)

    # -- public -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the sender task on the running loop (done by the first call anyway)."""
        self._start()

    async def flush(self, timeout: float = 5.0) -> bool:
        """Send everything buffered so far; True when nothing is left, False on timeout."""
        self._start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._flush_waiters += 1
        try:
            self._wake()
            while self._buffer.rows or self._busy:
                if loop.time() >= deadline or self._task is None or self._task.done():
                    return False
                if self._delivery.breaker_wait_s() > deadline - loop.time():
                    return False  # the breaker stays open past the deadline: no hope
                await asyncio.sleep(0.005)
            return True
        finally:
            self._flush_waiters -= 1

    async def close(self, timeout: float | None = None) -> None:
        """Flush for up to ``timeout`` s (``close_timeout_s``), then stop; rows left are dropped."""
        if self._closed:
            return
        timeout = self.close_timeout_s if timeout is None else timeout
        flushed = await self.flush(timeout)
        self._closed = True
        self._delivery.abandon = True
        if self._stopping is not None and self._wakeup is not None:
            self._stopping.set()
            self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task), self.send_timeout_s + 1.0)
            if not self._task.done():
                self._task.cancel()
        if self._channel is not None:
            await self._channel.close()
        self._closed_with(flushed, timeout)

    def close_at_exit(self, timeout: float) -> None:
        """The exit hook: the loop is gone, so send what is left from this thread."""
        if self._closed:
            return
        self._closed = True
        if self._buffer.rows:
            channel, submit = open_channel(self.target, self._credentials)
            deadline = time.monotonic() + timeout

            def send(op: Send) -> Any:
                left = max(0.05, min(self.send_timeout_s, deadline - time.monotonic()))
                return blocking_send(submit, op, left, self._metadata)

            def wait(seconds: float) -> None:
                time.sleep(max(0.0, min(seconds, deadline - time.monotonic())))

            try:
                while self._buffer.rows and time.monotonic() < deadline:
                    drive(self._cycle(), send, wait)
            finally:
                channel.close()
        left = self._buffer.drain_all()
        if left:
            self._counters.drop(left, "closed", "the client was never closed; exit flush timed out")

    async def __aenter__(self) -> AsyncSidecarClient:
        self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the sender task ----------------------------------------------------------------------

    def _start(self) -> None:
        if self._task is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not in a loop yet: the first call made inside one starts the task
        self._loop = loop
        self._loop_thread = threading.get_ident()
        if self._credentials is not None:
            self._channel = grpc.aio.secure_channel(self.target, self._credentials, CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(self.target, CHANNEL_OPTIONS)
        stub = pb_grpc.IngestStub(self._channel)
        self._submit = {PREDICTIONS: stub.SubmitPredictions, OUTCOMES: stub.SubmitOutcomes}
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task = loop.create_task(self._run(), name=f"mlsidecar-client:{self.model}")

    def _wake(self) -> None:
        if self._task is None:
            self._start()
        loop, wakeup = self._loop, self._wakeup
        if loop is None or wakeup is None:
            return
        if threading.get_ident() == self._loop_thread:
            wakeup.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(wakeup.set)

    def _poke(self) -> None:
        self._start()
        self._needs_start = self._task is None and not self._closed

    async def _run(self) -> None:
        assert self._wakeup is not None and self._stopping is not None
        loop = asyncio.get_running_loop()
        next_flush = loop.time() + self.flush_interval_s
        while not self._stopping.is_set():
            due, next_flush = self._sender_due(loop.time(), next_flush)
            if due:
                self._busy = True
                try:
                    await self._drive(self._cycle())
                except Exception:  # the sender must outlive any bug in one batch
                    log.exception("mlsidecar client: sender error; batch dropped")
                finally:
                    self._busy = False
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), max(0.0, next_flush - loop.time()))
            self._wakeup.clear()

    async def _drive(self, plan: Any) -> None:
        assert self._stopping is not None
        answer: Any = None
        try:
            while True:
                op = plan.send(answer)
                answer = None
                if op is None:
                    await asyncio.sleep(0)  # let request handlers run between slices
                elif isinstance(op, Send):
                    answer = await self._send(op)
                elif isinstance(op, Sleep):
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), op.seconds)
        except StopIteration:
            pass

    async def _send(self, op: Send) -> Any:
        try:
            return await self._submit[op.kind](
                op.batch, timeout=self.send_timeout_s, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            return Failure(error.code(), error.details() or "")
        except grpc.aio.UsageError as error:  # the channel was closed under us
            return Failure(grpc.StatusCode.CANCELLED, str(error))
