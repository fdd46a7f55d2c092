"""A real HTTP/1.1 upstream on 127.0.0.1 that fails on command, for breaker and proxy tests.

    with FlakyUpstream() as upstream:          # upstream.url, upstream.requests
        upstream.fail_next(2, status=503)      # the next two answer 503
        upstream.delay_s = 0.1                 # every answer waits 100 ms
        upstream.hang_next(1)                  # the next one waits 5 s more

Every request is recorded (method, path, query, headers, body); the answer echoes them
as JSON, or streams ``/stream?chunks=N`` as N chunks 50 ms apart. It runs on asyncio in
its own thread, so a hundred slow answers at once cost no thread each.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.parse
from dataclasses import dataclass


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


REASONS = {200: "OK", 500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


class FlakyUpstream:
    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.delay_s = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self._failures: list[int] = []
        self._hangs = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0
        self.url = ""

    def fail_next(self, count: int, status: int = 503) -> None:
        with self._lock:
            self._failures.extend([status] * count)

    def hang_next(self, count: int) -> None:
        with self._lock:
            self._hangs += count

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length") or 0))
        parts = urllib.parse.urlsplit(target)
        seen = Seen(method, parts.path, parts.query, headers, body)
        with self._lock:
            self.requests.append(seen)
            status = self._failures.pop(0) if self._failures else 200
            hang = self._hangs > 0
            self._hangs -= hang
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s + (5.0 if hang else 0.0))
            if parts.path == "/stream":
                chunks = int(urllib.parse.parse_qs(parts.query)["chunks"][0])
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                )
                for i in range(chunks):
                    data = f"chunk {i}\n".encode()
                    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.05)
                writer.write(b"0\r\n\r\n")
                await writer.drain()
                return True
            payload = json.dumps(
                {
                    "method": method,
                    "path": parts.path,
                    "query": parts.query,
                    "headers": headers,
                    "body": body.decode(errors="replace"),
                }
            ).encode()
            writer.write(
                f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n"
                f"content-type: application/json\r\nx-upstream: flaky\r\n"
                f"content-length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
            return True
        finally:
            with self._lock:
                self.in_flight -= 1

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=512)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> FlakyUpstream:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
