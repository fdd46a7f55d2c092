"""The egress proxy of a real Agent in front of a real upstream on 127.0.0.1 that fails on
command: forwarding, trace context, retries, timeouts, the breaker's 503, no open proxy,
and the admin API's /v1/breakers."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from conftest import AgentHarness
from metric_data import collected
from upstream_server import FlakyUpstream

ADMIN = "admin-secret"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture
def upstream() -> Iterator[FlakyUpstream]:
    with FlakyUpstream() as server:
        yield server


@pytest.fixture
def other() -> Iterator[FlakyUpstream]:
    """A second server the proxy must never reach (the SSRF target)."""
    with FlakyUpstream() as server:
        yield server


def proxied(
    start_agent: Callable[..., AgentHarness], upstream: FlakyUpstream, **policy: Any
) -> tuple[AgentHarness, str]:
    policy.setdefault("retries", {"max": 2, "base_s": 0.01, "jitter": 0})
    policy.setdefault("breaker", {"consecutive_failures": 3, "open_s": 30})
    harness = start_agent(
        api={"admin_token": ADMIN},
        upstream={
            "listen": "127.0.0.1:0",
            "policies": {"features": policy},
            "targets": {
                "features": {"url": upstream.url + "/base", "policy": "features"},
                "root": {"url": upstream.url},
                "hook": {"url": "http://user:hunter2@127.0.0.1:9/hook?x=1", "policy": "default"},
            },
        },
    )
    assert harness.agent.proxy is not None
    return harness, f"http://127.0.0.1:{harness.agent.proxy.port}/upstream/features"


def test_method_headers_body_and_query_are_forwarded_and_the_answer_comes_back(
    start_agent: Callable[..., AgentHarness], upstream: FlakyUpstream
) -> None:
    _, base = proxied(start_agent, upstream)
    response = httpx.put(
        base + "/v1/features/42?fields=a,b&fields=c",
        content=b'{"user": 42}',
        headers={"x-request-id": "r-1", "content-type": "application/json", "host": "evil.test"},
    )
    assert response.status_code == 200
    assert response.headers["x-upstream"] == "flaky"
    echoed = response.json()
    assert echoed["method"] == "PUT"
    assert echoed["path"] == "/base/v1/features/42"
    assert echoed["query"] == "fields=a,b&fields=c"
    assert echoed["body"] == '{"user": 42}'
    assert echoed["headers"]["x-request-id"] == "r-1"
    # The Host header names the upstream, never what the caller sent.
    assert echoed["headers"]["host"] == f"127.0.0.1:{upstream.port}"


def test_a_streamed_response_arrives_chunk_by_chunk(
    start_agent: Callable[..., AgentHarness], upstream: FlakyUpstream
) -> None:
    _, base = proxied(start_agent, upstream)
    url = base.replace("/features", "/root") + "/stream?chunks=4"
    arrivals: list[float] = []
    text = b""
    started = time.perf_counter()
    with httpx.stream("GET", url) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            arrivals.append(time.perf_counter() - started)
            text += chunk
    assert text == b"".join(f"chunk {i}\n".encode() for i in range(4))
    # The first chunk is passed on before the upstream has finished (4 x 50 ms apart).
    assert arrivals[0] < arrivals[-1] - 0.1


def test_w3c_trace_context_is_propagated_and_the_call_is_a_span_with_the_breaker_state(
    start_agent: Callable[..., AgentHarness], upstream: FlakyUpstream
) -> None:
    harness, base = proxied(start_agent, upstream)
    response = httpx.get(base + "/x", headers={"traceparent": TRACEPARENT})
    sent = response.json()["headers"]["traceparent"]
    assert sent.split("-")[1] == TRACE_ID
    deadline = time.monotonic() + 5
    # The span ends once the body is passed on, just after the caller has it.
    while not (spans := finished(harness, "upstream features")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(spans) == 1
    span = spans[0]
    assert format(span.context.trace_id, "032x") == TRACE_ID
    # The upstream sees the proxy's span as its parent.
    assert sent.split("-")[2] == format(span.context.span_id, "016x")
    assert span.attributes["mlsidecar.breaker.state"] == "closed"
    assert span.attributes["http.response.status_code"] == 200


def test_a_503_is_retried_and_the_retry_succeeds(
    start_agent: Callable[..., AgentHarness], upstream: FlakyUpstream
) -> None:
    harness, base = proxied(start_agent, upstream)
    upstream.fail_next(2, status=503)
    response = httpx.get(base + "/x")
    assert response.status_code == 200
    assert len(upstream.requests) == 3
    metrics = metric_points(harness)
    assert metrics[("mlsidecar.upstream.retries", (("upstream", "features"),))] == 2


def test_retries_give_up_after_max_and_pass_the_last_answer_on(
    start_agent: Callable[..., AgentHarness], upstream: FlakyUpstream
) -> None:
    _, base = proxied(start_agent, upstream, breaker=None)
    upstream.fail_next(5, status=502)
    assert httpx.get(base + "/x").status_code == 502
    assert len(upstream.requests) == 3


def test_a_slow_upstream_times_out_with_504(
    start_agent: Callable[..., AgentHarness], upstream: FlakyUpstream
) -> None:
    _, base = proxied(start_agent, upstream, timeout_s=0.2, retries=None)
    upstream.hang_next(1)
    started = time.perf_counter()
    response = httpx.get(base + "/x", timeout=10)
    assert time.perf_counter() - started < 1.5
    assert response.status_code == 504
    assert response.json()["error"]["reason"] == "timeout"


def test_an_open_breaker_answers_503_at_once_with_retry_after_and_names_upstream_and_state(
    start_agent: Callable[..., AgentHarness],
    upstream: FlakyUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent.upstream.breaker")
    harness, base = proxied(start_agent, upstream, retries=None)
    upstream.fail_next(3, status=500)
    for _ in range(3):
        assert httpx.get(base + "/x").status_code == 500
    seen = len(upstream.requests)
    started = time.perf_counter()
    response = httpx.get(base + "/x")
    assert time.perf_counter() - started < 0.2
    assert len(upstream.requests) == seen  # the upstream was not called
    assert response.status_code == 503
    assert 25 <= int(response.headers["retry-after"]) <= 30
    error = response.json()["error"]
    assert error["upstream"] == "features" and error["state"] == "open"
    assert error["reason"] == "breaker_open"
    # One log record for the one state change, naming the upstream.
    changes = [r for r in caplog.records if r.name == "agent.upstream.breaker"]
    assert [(r.upstream, r.breaker_from, r.breaker_to) for r in changes] == [  # type: ignore[attr-defined]
        ("features", "closed", "open")
    ]
    points = metric_points(harness)
    assert points[("mlsidecar.upstream.breaker.state", (("upstream", "features"),))] == 2
    state_changes = (("from", "closed"), ("to", "open"), ("upstream", "features"))
    assert points[("mlsidecar.upstream.breaker.state_changes", state_changes)] == 1
    outcomes = (("outcome", "error_status"), ("upstream", "features"))
    assert points[("mlsidecar.upstream.requests", outcomes)] == 3
    assert points[("mlsidecar.upstream.duration", outcomes)] == 3
    assert (
        points[
            (
                "mlsidecar.upstream.rejections",
                (("reason", "breaker_open"), ("upstream", "features")),
            )
        ]
        == 1
    )


def test_breakers_are_listed_and_reset_with_the_admin_token(
    start_agent: Callable[..., AgentHarness], upstream: FlakyUpstream
) -> None:
    harness, base = proxied(start_agent, upstream, retries=None)
    upstream.fail_next(3, status=500)
    for _ in range(3):
        httpx.get(base + "/x")
    listing = httpx.get(harness.api_url + "/v1/breakers").json()["breakers"]
    by_name = {row["upstream"]: row for row in listing}
    assert by_name["features"]["state"] == "open"
    assert by_name["hook"]["state"] == "closed"
    assert "hunter2" not in json.dumps(listing) and "127.0.0.1:9" not in json.dumps(listing)

    reset = harness.api_url + "/v1/breakers/features/reset"
    assert httpx.post(reset).status_code == 401
    assert httpx.post(reset, headers={"authorization": "Bearer wrong"}).status_code == 401
    done = httpx.post(reset, headers={"authorization": f"Bearer {ADMIN}"})
    assert done.status_code == 200 and done.json()["state"] == "closed"
    assert httpx.get(base + "/x").status_code == 200
    missing = httpx.post(
        harness.api_url + "/v1/breakers/nope/reset", headers={"authorization": f"Bearer {ADMIN}"}
    )
    assert missing.status_code == 404


@pytest.mark.parametrize(
    "path",
    [
        "/upstream/unknown/x",
        "/upstream/",
        "/elsewhere",
    ],
)
def test_only_configured_upstreams_are_reachable(
    start_agent: Callable[..., AgentHarness], upstream: FlakyUpstream, path: str
) -> None:
    harness, _ = proxied(start_agent, upstream)
    assert harness.agent.proxy is not None
    response = httpx.get(f"http://127.0.0.1:{harness.agent.proxy.port}{path}")
    assert response.status_code == 404
    assert upstream.requests == []


def raw_request(port: int, request_line: str, host: str) -> bytes:
    """Send a request line as is (httpx would normalise it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"{request_line}\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize(
    "target",
    [
        "/upstream/features/../hook/x",
        "/upstream/features/%2e%2e/%2e%2e/secret",
        "/upstream/features/..%2f..%2fsecret",
        "/upstream/features/a/./../../b",
    ],
)
def test_path_traversal_out_of_the_base_path_is_refused(
    start_agent: Callable[..., AgentHarness], upstream: FlakyUpstream, target: str
) -> None:
    harness, _ = proxied(start_agent, upstream)
    assert harness.agent.proxy is not None
    answer = raw_request(harness.agent.proxy.port, f"GET {target} HTTP/1.1", "127.0.0.1")
    assert answer.startswith(b"HTTP/1.1 400")
    assert upstream.requests == []


def test_absolute_urls_and_host_headers_cannot_redirect_the_proxy(
    start_agent: Callable[..., AgentHarness], upstream: FlakyUpstream, other: FlakyUpstream
) -> None:
    harness, _ = proxied(start_agent, upstream)
    port = harness.agent.proxy.port if harness.agent.proxy else 0
    elsewhere = f"127.0.0.1:{other.port}"
    # An absolute URL in the path stays a path below the target.
    answer = raw_request(port, f"GET /upstream/features/http://{elsewhere}/x HTTP/1.1", elsewhere)
    assert answer.startswith(b"HTTP/1.1 200")
    answer = raw_request(port, f"GET /upstream/features//{elsewhere}/x HTTP/1.1", elsewhere)
    assert answer.startswith(b"HTTP/1.1 200")
    # An absolute-form request line (as sent to a forward proxy) is not a way out either.
    answer = raw_request(port, f"GET http://{elsewhere}/x HTTP/1.1", elsewhere)
    assert answer.startswith(b"HTTP/1.1 404")
    assert other.requests == []
    assert [r.headers["host"] for r in upstream.requests] == [f"127.0.0.1:{upstream.port}"] * 2
    assert upstream.requests[0].path == f"/base/http://{elsewhere}/x"


def test_target_urls_are_secrets_in_config_show(
    start_agent: Callable[..., AgentHarness], upstream: FlakyUpstream
) -> None:
    harness, _ = proxied(start_agent, upstream)
    shown = json.dumps(harness.settings.redacted())
    assert "hunter2" not in shown
    assert "http://user:**********@127.0.0.1:9/hook?x=1" in shown


def finished(harness: AgentHarness, name: str) -> list[Any]:
    return [s for s in harness.spans.get_finished_spans() if s.name == name]


def metric_points(harness: AgentHarness) -> dict[tuple[str, tuple[tuple[str, Any], ...]], Any]:
    return {
        (metric.name, tuple(sorted((point.attributes or {}).items()))): getattr(
            point, "value", getattr(point, "count", None)
        )
        for metric in collected(harness.metric_reader)
        for point in metric.data.data_points
    }


def test_the_agents_own_calls_post_json_through_the_same_policy(
    start_agent: Callable[..., AgentHarness], upstream: FlakyUpstream
) -> None:
    from agent.upstream.proxy import ForwardError

    harness = start_agent(
        upstream={
            "listen": "127.0.0.1:0",
            "policies": {"hooks": {"retries": None, "breaker": {"consecutive_failures": 1}}},
            "targets": {
                "am": {"url": upstream.url + "/", "policy": "hooks"},
                "slack": {"url": upstream.url + "/services/T0/B0/x?token=t1"},
            },
        }
    )
    proxy = harness.agent.proxy
    assert proxy is not None
    assert harness.run(proxy.post_json("am", "api/v2/alerts", [{"labels": {"a": "1"}}])) == 200
    # An empty path is the target's URL itself, its query kept.
    assert harness.run(proxy.post_json("slack", "", {"text": "hi"})) == 200
    first, second = upstream.requests
    assert (first.method, first.path, json.loads(first.body)) == (
        "POST",
        "/api/v2/alerts",
        [{"labels": {"a": "1"}}],
    )
    assert (second.path, second.query) == ("/services/T0/B0/x", "token=t1")
    assert second.headers["content-type"] == "application/json"
    upstream.fail_next(1, status=503)
    assert harness.run(proxy.post_json("am", "api/v2/alerts", [])) == 503
    with pytest.raises(ForwardError, match="is open"):
        harness.run(proxy.post_json("am", "api/v2/alerts", []))


def test_with_a_token_callers_must_send_proxy_authorization_and_authorization_passes_on(
    start_agent: Callable[..., AgentHarness], upstream: FlakyUpstream
) -> None:
    harness = start_agent(
        upstream={
            "listen": "127.0.0.1:0",
            "token": "proxy-secret",
            "targets": {"features": {"url": upstream.url}},
        }
    )
    assert harness.agent.proxy is not None
    url = f"http://127.0.0.1:{harness.agent.proxy.port}/upstream/features/x"
    assert httpx.get(url).status_code == 407
    assert httpx.get(url, headers={"proxy-authorization": "Bearer wrong"}).status_code == 407
    assert upstream.requests == []
    response = httpx.get(
        url,
        headers={"proxy-authorization": "Bearer proxy-secret", "authorization": "Bearer up"},
    )
    assert response.status_code == 200
    sent = response.json()["headers"]
    assert sent["authorization"] == "Bearer up" and "proxy-authorization" not in sent


def test_a_body_over_max_body_bytes_is_refused_with_413(
    start_agent: Callable[..., AgentHarness], upstream: FlakyUpstream
) -> None:
    harness = start_agent(
        upstream={
            "listen": "127.0.0.1:0",
            "max_body_bytes": 1024,
            "targets": {"features": {"url": upstream.url}},
        }
    )
    assert harness.agent.proxy is not None
    url = f"http://127.0.0.1:{harness.agent.proxy.port}/upstream/features/x"
    assert httpx.post(url, content=b"x" * 1024).status_code == 200
    assert httpx.post(url, content=b"x" * 1025).status_code == 413

    def chunks() -> Iterator[bytes]:  # no content-length: counted as it arrives
        yield from [b"x" * 600, b"x" * 600]

    assert httpx.post(url, content=chunks()).status_code == 413
    assert len(upstream.requests) == 1
