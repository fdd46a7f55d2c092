"""A real redis-server for tests: on a free 127.0.0.1 port, in its own directory.

Used through the ``redis_server`` fixture in conftest.py (Debian's redis-server, installed by
``make system-deps``).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis
from conftest import free_port


class RedisServer:
    """redis-server on a free 127.0.0.1 port, in its own directory; restartable on that port.

    server = RedisServer(tmp_path).start()      # server.url, server.client()
    server.stop(); server.start()               # same port (data kept only with appendonly)
    """

    def __init__(
        self, directory: Path, *, password: str | None = None, appendonly: bool = False
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run `make system-deps` (Debian package)")
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.password = password
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password)

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--dir", str(self.directory), "--save", ""]
        if self.appendonly:
            command += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            command += ["--appendonly", "no"]
        if self.password:
            command += ["--requirepass", self.password]
        log = (self.directory / "redis.log").open("ab")
        self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client().ping():
                    return self
            except redis.exceptions.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = (self.directory / "redis.log").read_text(errors="replace")
                pytest.fail(f"redis-server did not answer PING on port {self.port}:\n{text}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


class ReplyLosingProxy:
    """A TCP proxy on 127.0.0.1 in front of a Redis that forwards every request but can lose
    the replies: the script runs in Redis and its caller never hears back (a timeout, or a
    connection cut), which is what a network fault looks like to the store.

    proxy = ReplyLosingProxy(server.port)        # connect the store to proxy.port
    proxy.withhold(after=1)                      # pass one more reply chunk, drop the rest
    proxy.cut_next_reply(); proxy.deliver(); proxy.close()
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._passes: int | None = None  # reply chunks still let through; None = all
        self._cut = False
        self._sockets: list[socket.socket] = []
        self.dropped = 0  # reply chunks lost so far
        threading.Thread(target=self._accept, daemon=True).start()

    def withhold(self, after: int = 0) -> None:
        """Let ``after`` more reply chunks through, then drop every reply."""
        with self._lock:
            self._passes = after

    def deliver(self) -> None:
        """Pass every reply again."""
        with self._lock:
            self._passes = None

    def cut_next_reply(self) -> None:
        """Drop the next reply and close that client connection (a reset after the request)."""
        with self._lock:
            self._cut = True

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            _hang_up(*self._sockets)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # Redis is down: so is the connection through the proxy
                _hang_up(client)
                continue
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._replies, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _requests(client: socket.socket, upstream: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                upstream.sendall(data)
        _hang_up(client, upstream)

    def _replies(self, upstream: socket.socket, client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                with self._lock:
                    cut, self._cut = self._cut, False
                    lose = cut or self._passes == 0
                    if not lose and self._passes is not None:
                        self._passes -= 1
                    if lose:
                        self.dropped += 1
                if cut:
                    break
                if not lose:
                    client.sendall(data)
        _hang_up(client, upstream)


def _hang_up(*sockets: socket.socket) -> None:
    # shutdown() first: close() alone does not wake a thread blocked in recv() on the socket,
    # so the peer would not see the connection end.
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()
