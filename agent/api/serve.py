"""An HTTP listener for an ASGI app inside the agent's event loop (admin API, egress proxy).

listener = HttpListener(app, settings.api, key="api.listen", what="admin API")
await listener.start()      # bound (ephemeral port resolved) and serving
listener.port
await listener.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn

from agent.config import Listener


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the agent's loop: the agent, not uvicorn, owns signal handling."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpListener:
    """Binds ``settings.listen`` (TLS / mTLS from ``settings.tls``) and serves ``app``."""

    def __init__(
        self,
        app: Any,
        settings: Listener,
        *,
        key: str,
        what: str,
        backlog: int = 128,
        graceful_shutdown_s: int | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self._key = key  # the config key named when binding fails
        self._what = what
        self._backlog = backlog
        self._graceful_shutdown_s = graceful_shutdown_s
        self.port: int | None = None
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    def _socket(self) -> socket.socket:
        s = self.settings
        family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say so, and
        # without it every response waits ~40 ms for a delayed ACK (Nagle).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((s.host, s.port))
        except OSError as error:
            sock.close()
            raise OSError(f"{self._key}: cannot bind {s.listen}: {error.strerror}") from None
        sock.listen(self._backlog)
        sock.setblocking(False)
        return sock

    async def start(self) -> None:
        sock = self._socket()
        self.port = sock.getsockname()[1]
        tls = self.settings.tls
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=self._graceful_shutdown_s,
            ssl_certfile=str(tls.cert) if tls else None,
            ssl_keyfile=str(tls.key) if tls else None,
            ssl_ca_certs=str(tls.client_ca) if tls and tls.client_ca else None,
            ssl_cert_reqs=2 if tls and tls.client_ca else 0,
        )
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError(f"{self._what} stopped during start-up")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
            self._server = None
