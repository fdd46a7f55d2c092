"""HTTP ingest holds at most ``api.max_ingest_in_flight`` bodies at once, against a real agent
on loopback: real concurrent HTTP requests, two of them holding their slot by sending their
body slowly (raw sockets), a flood refused with 429 + Retry-After before any body is read.
"""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from metric_data import data_points

from agent.config import ApiSettings


def body(batch: str) -> bytes:
    return json.dumps({"model": "slow", "ids": [f"{batch}-1", f"{batch}-2"]}).encode()


def start_request(port: int, payload: bytes, *, send: int, length: int | None = None) -> Any:
    """A POST /v1/predictions whose headers and first ``send`` body bytes are sent; the rest
    is sent by ``finish``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (
        "POST /v1/predictions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(payload) if length is None else length}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload[:send])
    return sock


def finish(sock: socket.socket, payload: bytes, sent: int) -> tuple[int, dict[str, Any]]:
    """Send the rest of the body; the response's status and JSON body."""
    sock.sendall(payload[sent:])
    return read_response(sock)


def read_response(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers["content-length"])
    while len(rest) < length:
        rest += sock.recv(65536)
    sock.close()
    return int(lines[0].split()[1]), json.loads(rest[:length]) | {"_headers": headers}


def rejected_busy(harness: Any) -> Counter[str]:
    """Batches refused as too_many_in_flight, by rpc.method, from the self-metrics."""
    counts: Counter[str] = Counter()
    for point in data_points(harness.metric_reader, "mlsidecar.ingest.batches"):
        if point.attributes.get("error.type") == "too_many_in_flight":
            counts[str(point.attributes["rpc.method"])] += point.value
    return counts


def test_bodies_beyond_the_limit_are_refused_429_with_retry_after_before_being_read(
    start_agent: Any,
) -> None:
    harness = start_agent(api={"max_ingest_in_flight": 2})
    port = harness.agent.api.port
    url = harness.api_url
    slow = [body("a"), body("b")]
    held = [start_request(port, payload, send=5) for payload in slow]

    # Both slow requests hold their slot once the agent has started reading them.
    deadline = time.monotonic() + 10
    while True:
        probe = httpx.post(url + "/v1/predictions", content=body("probe"), timeout=10)
        if probe.status_code == 429:
            break
        assert probe.status_code == 200, probe.text
        assert time.monotonic() < deadline, "the slow requests never took their slots"
        time.sleep(0.05)

    # A flood of concurrent requests: every one is refused at once.
    def post(i: int) -> httpx.Response:
        return httpx.post(url + "/v1/outcomes", content=b"{}" * 1000, timeout=10)

    with ThreadPoolExecutor(12) as pool:
        flood = list(pool.map(post, range(12)))
    assert [r.status_code for r in flood] == [429] * 12
    for response in flood:
        assert response.headers["retry-after"] == "1"
        error = response.json()["error"]
        assert error["code"] == "RESOURCE_EXHAUSTED"
        assert error["reason"] == "too_many_in_flight"
        assert "api.max_ingest_in_flight" in error["message"]

    # Refused before reading: a request announcing 1 GiB and sending none of it is answered
    # 429 (reading it would have refused it as message_too_large, or waited for the body).
    unread = start_request(port, b"", send=0, length=1 << 30)
    status, answer = read_response(unread)
    assert status == 429
    assert answer["error"]["reason"] == "too_many_in_flight"

    # The held requests complete normally, and their slots are free again.
    for sock, payload in zip(held, slow, strict=True):
        status, answer = finish(sock, payload, 5)
        assert status == 200
        assert answer["accepted"] == 2
    after = httpx.post(url + "/v1/predictions", content=body("after"), timeout=10)
    assert after.status_code == 200, after.text

    busy = rejected_busy(harness)
    assert busy["http:/v1/outcomes"] == 12
    assert busy["http:/v1/predictions"] >= 2  # the probe and the unread request


def test_max_ingest_in_flight_must_be_positive_and_defaults_to_eight() -> None:
    assert ApiSettings().max_ingest_in_flight == 8
    with pytest.raises(ValueError, match="max_ingest_in_flight"):
        ApiSettings(max_ingest_in_flight=0)
