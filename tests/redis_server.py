"""A real redis-server for tests: on a free 127.0.0.1 port, in its own directory.

Used through the ``redis_server`` fixture in conftest.py (Debian's redis-server, installed by
``make system-deps``).
"""

from __future__ import annotations

import shutil
import subprocess
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
