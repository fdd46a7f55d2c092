"""The egress proxy: ``http://127.0.0.1:8321/upstream/<name>/<path>`` forwards to the
configured target ``<name>`` under its policy (timeout, retries, breaker, bulkhead).

    upstreams = Upstreams.from_settings(settings.upstream, redis_url=None)
    proxy = EgressProxy(settings.upstream, upstreams)
    await proxy.start()          # proxy.port is the bound port
    await proxy.stop()

Only configured targets are reachable: the path is appended to the target's base URL and
the result must stay on the target's scheme, host, port and base path; the caller's Host
header is never used. An open breaker answers 503 at once with Retry-After and a JSON body.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import random
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from agent.api.errors import error_response as _error
from agent.api.serve import HttpListener
from agent.config import UpstreamPolicy, UpstreamSettings
from agent.upstream.breaker import AsyncBreaker, BreakerOpen
from agent.upstream.policy import Bulkhead, BulkheadFull, build_breaker, retry_delays
from agent.upstream.telemetry import UpstreamTelemetry

log = logging.getLogger(__name__)

PREFIX = "/upstream/"
# Not forwarded: they describe this hop, not the request (RFC 9110 §7.6.1), or are recomputed.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
PROPAGATOR = TraceContextTextMapPropagator()


class UpstreamStatusError(Exception):
    """The upstream answered with a status the breaker counts as a failure (5xx)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status


class ForwardError(Exception):
    """The call could not be completed: ``status`` and ``reason`` are what the caller gets."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclass
class Upstream:
    """One target with its policy parts."""

    name: str
    base_url: httpx.URL
    policy: UpstreamPolicy
    breaker: AsyncBreaker | None
    bulkhead: Bulkhead | None

    def url_for(self, path: str, query: bytes) -> httpx.URL:
        """``path`` below the base URL; ``ForwardError`` (400) if it would leave it."""
        decoded = urllib.parse.unquote(path)
        if any(segment in (".", "..") for segment in decoded.split("/")) or "\\" in decoded:
            raise ForwardError(400, "invalid_path", f"path {path[:200]!r} has . or .. segments")
        base_path, _, base_query = self.base_url.raw_path.partition(b"?")
        # An empty path is the target URL itself (a webhook's full URL), no slash added.
        full_path = base_path if not path else base_path.rstrip(b"/") + b"/" + path.encode()
        query = b"&".join(q for q in (base_query, query) if q)
        url = self.base_url.copy_with(raw_path=full_path + (b"?" + query if query else b""))
        if (url.scheme, url.host, url.port) != (
            self.base_url.scheme,
            self.base_url.host,
            self.base_url.port,
        ):
            raise ForwardError(400, "invalid_path", f"path {path[:200]!r} leaves upstream")
        return url


class Upstreams:
    """The configured targets by name; one breaker and bulkhead each."""

    def __init__(self, upstreams: dict[str, Upstream], telemetry: UpstreamTelemetry) -> None:
        self.by_name = upstreams
        self.telemetry = telemetry
        telemetry.states = self._states

    @classmethod
    def from_settings(
        cls,
        settings: UpstreamSettings,
        *,
        redis_url: str | None = None,
        telemetry: UpstreamTelemetry | None = None,
    ) -> Upstreams:
        telemetry = telemetry or UpstreamTelemetry()
        upstreams: dict[str, Upstream] = {}
        for name, target in settings.targets.items():
            policy = settings.policies[target.policy]
            breaker = (
                None
                if policy.breaker is None
                else build_breaker(
                    name,
                    policy.breaker,
                    redis_url=redis_url,
                    key_prefix=settings.key_prefix,
                    listeners=[telemetry.listener],
                )
            )
            bulkhead = (
                None
                if policy.bulkhead is None
                else Bulkhead(
                    name,
                    max_in_flight=policy.bulkhead.max_in_flight,
                    max_pending=policy.bulkhead.max_pending,
                )
            )
            upstreams[name] = Upstream(
                name, httpx.URL(target.url.get_secret_value()), policy, breaker, bulkhead
            )
        return cls(upstreams, telemetry)

    def _states(self) -> Iterator[tuple[str, str]]:
        for name, upstream in self.by_name.items():
            if upstream.breaker is not None:
                yield name, upstream.breaker.last_state

    async def listing(self) -> list[dict[str, Any]]:
        """Every upstream with a breaker, for ``GET /v1/breakers``."""
        rows = []
        for name, upstream in sorted(self.by_name.items()):
            if upstream.breaker is None:
                continue
            snapshot = await upstream.breaker.snapshot()
            rows.append({"upstream": name, **snapshot})
        return rows


def forwarded_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    connection = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.decode("latin-1").split(",")
    }
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in headers
        if (lower := name.decode("latin-1").lower()) not in HOP_BY_HOP and lower not in connection
    ]


class EgressProxy:
    """The proxy's ASGI app and its own uvicorn listener."""

    def __init__(
        self,
        settings: UpstreamSettings,
        upstreams: Upstreams,
        *,
        client: httpx.AsyncClient | None = None,
        random: Any = random.random,
    ) -> None:
        self.settings = settings
        self.upstreams = upstreams
        self.telemetry = upstreams.telemetry
        self._client = client or httpx.AsyncClient(
            timeout=None,
            follow_redirects=False,
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
            trust_env=False,
        )
        self._random = random
        # `proxy-authorization`, not `authorization`: that one belongs to the upstream.
        self._token = None if settings.token is None else settings.token.get_secret_value()
        self.port: int | None = None
        # A stop waits 5 s for calls in flight (a slow stream), then cuts them.
        self._listener = HttpListener(
            self,
            settings,
            key="upstream.listen",
            what="egress proxy",
            backlog=1024,
            graceful_shutdown_s=5,
        )

    # -- the ASGI app ----------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if self._token is not None and not _proxy_token_matches(scope, self._token):
            refusal = _error(
                407,
                "UNAUTHENTICATED",
                "token",
                "missing or wrong proxy-authorization: Bearer <upstream.token>",
            )
            await refusal(scope, receive, send)
            return
        result = await self.handle(Request(scope, receive))
        if isinstance(result, Response):
            await result(scope, receive, send)
            return
        exchange, span = result
        # Straight to ASGI, not StreamingResponse: repeated headers (set-cookie) stay
        # repeated, and no task group per response.
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": exchange.response.status_code,
                    "headers": [
                        (k, v)
                        for k, v in exchange.response.headers.raw
                        if k.lower().decode("latin-1") not in HOP_BY_HOP
                    ],
                }
            )
            async for chunk in exchange.response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await exchange.aclose()
            span.end()

    async def handle(self, request: Request) -> Response | tuple[Exchange, Any]:
        """An error response, or the upstream's answer with its body still to stream."""
        raw_path = request.scope.get("raw_path") or request.scope["path"].encode()
        path = raw_path.decode("latin-1")
        if not path.startswith(PREFIX):
            return _error(404, "NOT_FOUND", "no_route", "the proxy serves /upstream/<name>/<path>")
        name, _, rest = path[len(PREFIX) :].partition("/")
        upstream = self.upstreams.by_name.get(urllib.parse.unquote(name))
        if upstream is None:
            return _error(
                404, "NOT_FOUND", "unknown_upstream", f"no upstream {name[:100]!r} is configured"
            )
        try:
            url = upstream.url_for(rest, request.scope.get("query_string", b""))
        except ForwardError as error:
            return _error(error.status, "INVALID_ARGUMENT", error.reason, str(error))
        try:
            body = await _read_body(request, self.settings.max_body_bytes)
        except ForwardError as error:
            return _error(error.status, "INVALID_ARGUMENT", error.reason, str(error))
        headers = forwarded_headers(request.scope["headers"])
        context = PROPAGATOR.extract({k.lower(): v for k, v in headers})
        with self.telemetry.tracer.start_as_current_span(
            f"upstream {upstream.name}",
            context=context,
            kind=SpanKind.CLIENT,
            attributes={
                "mlsidecar.upstream": upstream.name,
                "http.request.method": request.method,
                "server.address": upstream.base_url.host,
            },
            end_on_exit=False,
        ) as span:
            carrier: dict[str, str] = {}
            PROPAGATOR.inject(carrier)
            if carrier:
                headers = [(k, v) for k, v in headers if k.lower() not in carrier] + list(
                    carrier.items()
                )
            started = time.perf_counter()
            try:
                exchange = await self.forward(upstream, request.method, url, headers, body)
            except ForwardError as error:
                self._finish(span, upstream, error.reason, started, error.status)
                span.end()
                return self._refusal(upstream, error)
            outcome = "success" if exchange.response.status_code < 500 else "error_status"
            self._finish(span, upstream, outcome, started, exchange.response.status_code)
        return exchange, span

    def _finish(
        self, span: Any, upstream: Upstream, outcome: str, started: float, status: int
    ) -> None:
        seconds = time.perf_counter() - started
        rejected = outcome in ("breaker_open", "bulkhead_full")
        self.telemetry.request(upstream.name, outcome, None if rejected else seconds)
        span.set_attribute("http.response.status_code", status)
        span.set_attribute("mlsidecar.upstream.outcome", outcome)
        if upstream.breaker is not None:
            span.set_attribute("mlsidecar.breaker.state", upstream.breaker.last_state)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, outcome))

    def _refusal(self, upstream: Upstream, error: ForwardError) -> JSONResponse:
        headers = {}
        body: dict[str, Any] = {
            "code": "UNAVAILABLE" if error.status == 503 else "UPSTREAM_FAILED",
            "reason": error.reason,
            "message": str(error),
            "upstream": upstream.name,
        }
        if isinstance(error.__cause__, BreakerOpen):
            body["state"] = error.__cause__.state
            body["retry_after_s"] = round(error.__cause__.retry_after_s, 3)
            headers["retry-after"] = str(max(math.ceil(error.__cause__.retry_after_s), 1))
        elif error.reason == "bulkhead_full":
            headers["retry-after"] = "1"
        return JSONResponse({"error": body}, status_code=error.status, headers=headers)

    # -- the guarded call ------------------------------------------------------------------

    async def post_json(self, target: str, path: str, payload: Any) -> int:
        """POST ``payload`` as JSON to ``path`` below ``target``'s URL under its policy, for
        the agent's own calls (alert channels); the answer's status. Raises ``ForwardError``
        when the breaker or bulkhead refuses, on a timeout or when unreachable.

            status = await proxy.post_json("alertmanager", "api/v2/alerts", [alert])
        """
        upstream = self.upstreams.by_name.get(target)
        if upstream is None:
            raise ForwardError(404, "unknown_upstream", f"no upstream {target!r} is configured")
        url = upstream.url_for(path, b"")
        headers = [("content-type", "application/json")]
        with self.telemetry.tracer.start_as_current_span(
            f"upstream {upstream.name}",
            kind=SpanKind.CLIENT,
            attributes={"mlsidecar.upstream": upstream.name, "http.request.method": "POST"},
        ) as span:
            carrier: dict[str, str] = {}
            PROPAGATOR.inject(carrier)
            started = time.perf_counter()
            body = json.dumps(payload).encode()
            try:
                exchange = await self.forward(
                    upstream, "POST", url, headers + list(carrier.items()), body
                )
            except ForwardError as error:
                self._finish(span, upstream, error.reason, started, error.status)
                raise
            try:
                await exchange.response.aread()
            finally:
                await exchange.aclose()
            status = exchange.response.status_code
            self._finish(
                span, upstream, "success" if status < 500 else "error_status", started, status
            )
            return status

    async def forward(
        self,
        upstream: Upstream,
        method: str,
        url: httpx.URL,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> Exchange:
        """Send under the policy; the response's body is still to be read (``Exchange``)."""
        stack = contextlib.AsyncExitStack()
        try:
            if upstream.bulkhead is not None:
                await stack.enter_async_context(upstream.bulkhead)
            response = await self._attempts(upstream, method, url, headers, body)
        except BulkheadFull as error:
            await stack.aclose()
            raise ForwardError(503, "bulkhead_full", str(error)) from error
        except BaseException:
            await stack.aclose()
            raise
        return Exchange(response, stack)

    async def _attempts(
        self,
        upstream: Upstream,
        method: str,
        url: httpx.URL,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> httpx.Response:
        policy = upstream.policy
        retries = policy.retries
        delays = iter(retry_delays(retries, self._random) if retries is not None else ())
        while True:
            try:
                response = await self._attempt(upstream, method, url, headers, body)
            except ForwardError as error:
                retryable = retries is not None and retries.on_error
                if error.reason == "breaker_open" or not retryable:
                    raise
                delay = next(delays, None)
                if delay is None:
                    raise
            else:
                if retries is None or response.status_code not in retries.on_status:
                    return response
                delay = next(delays, None)
                if delay is None:
                    return response
                await response.aclose()
            self.telemetry.retries.add(1, {"upstream": upstream.name})
            await asyncio.sleep(delay)

    async def _attempt(
        self,
        upstream: Upstream,
        method: str,
        url: httpx.URL,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> httpx.Response:
        breaker = upstream.breaker
        ticket = None
        if breaker is not None:
            try:
                ticket = await breaker.admit()
            except BreakerOpen as error:
                raise ForwardError(503, "breaker_open", str(error)) from error
        request = self._client.build_request(method, url, headers=headers, content=body or None)
        try:
            async with asyncio.timeout(upstream.policy.timeout_s):
                response = await self._client.send(request, stream=True)
        except TimeoutError as error:
            if breaker is not None and ticket is not None:
                await breaker.failed(ticket, error)
            raise ForwardError(
                504,
                "timeout",
                f"upstream {upstream.name!r} did not answer within {upstream.policy.timeout_s:g} s",
            ) from error
        except httpx.TransportError as error:
            if breaker is not None and ticket is not None:
                await breaker.failed(ticket, error)
            raise ForwardError(
                502, "unreachable", f"upstream {upstream.name!r}: {type(error).__name__}"
            ) from error
        except BaseException:
            if breaker is not None and ticket is not None:
                await breaker.release(ticket)
            raise
        if breaker is not None and ticket is not None:
            if response.status_code >= 500:
                await breaker.failed(ticket, UpstreamStatusError(response.status_code))
            else:
                await breaker.succeeded(ticket)
        return response

    # -- the listener ----------------------------------------------------------------------

    async def start(self) -> None:
        await self._listener.start()
        self.port = self._listener.port
        s = self.settings
        log.info(
            "egress proxy listening",
            extra={"address": f"{s.host}:{self.port}", "upstreams": len(self.upstreams.by_name)},
        )

    async def stop(self) -> None:
        await self._listener.stop()
        await self._client.aclose()


@dataclass
class Exchange:
    """A response whose body is still to be streamed, and what to release afterwards."""

    response: httpx.Response
    resources: contextlib.AsyncExitStack

    async def aclose(self) -> None:
        try:
            await self.response.aclose()
        finally:
            await self.resources.aclose()


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    too_large = ForwardError(413, "body_too_large", f"request body over {limit} bytes")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _proxy_token_matches(scope: Scope, token: str) -> bool:
    supplied = next(
        (value for name, value in scope["headers"] if name.lower() == b"proxy-authorization"),
        b"",
    )
    return hmac.compare_digest(supplied, f"Bearer {token}".encode())
