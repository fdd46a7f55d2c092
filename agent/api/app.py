"""The admin HTTP API: health, readiness, model reports, HTTP JSON ingest, /metrics.

api = AdminApi(settings.api, engine, receiver, readiness=agent.readiness,
               tracer_provider=tp, meter_provider=mp, prometheus_registry=registry)
await api.start()     # api.port is the bound port
await api.stop()
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from google.protobuf import json_format
from google.protobuf.message import Message
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from agent import __version__
from agent._proto.mlsidecar.v1 import ingest_pb2 as pb
from agent.alerts.api import add_alert_routes
from agent.alerts.manager import Alerts
from agent.api.errors import error_response as _error
from agent.api.serve import HttpListener
from agent.config import MODEL_NAME_PATTERN, ApiSettings
from agent.engine import Engine
from agent.ingest.decode import RejectCode, Rejected
from agent.ingest.receiver import EventReceiver
from agent.references import ReferenceRejected, References, ReferenceUploads

if TYPE_CHECKING:
    from agent.upstream.proxy import Upstreams

log = logging.getLogger(__name__)

HTTP_STATUS = {RejectCode.INVALID: 400, RejectCode.BUSY: 429, RejectCode.UNAVAILABLE: 503}
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
# Seconds a client refused for too many HTTP ingest bodies in flight should wait.
RETRY_AFTER_S = 1


class IngestSlots:
    """At most ``limit`` HTTP ingest requests at once (event-loop only, so no lock).

    slots = IngestSlots(8)
    if not slots.acquire(): refuse()     # 429 before reading the body
    try: ... finally: slots.release()
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"api.max_ingest_in_flight must be at least 1, got {limit}")
        self.limit = limit
        self.in_flight = 0

    def acquire(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1


async def read_bounded(request: Request, limit: int, refuse: Callable[[int], None]) -> bytes:
    """The request body, or ``refuse(size)`` (which raises) as soon as it is over ``limit``:
    by its Content-Length before reading, else while streaming; never held whole."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        refuse(int(declared))
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            refuse(size)
        chunks.append(chunk)
    return b"".join(chunks)


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "a string" if isinstance(value, str) else "an array"


def _bearer_matches(request: Request, token: str) -> bool:
    supplied = request.headers.get("authorization", "")
    return hmac.compare_digest(supplied.encode(), f"Bearer {token}".encode())


def build_app(
    settings: ApiSettings,
    engine: Engine,
    receiver: EventReceiver,
    *,
    readiness: Callable[[], dict[str, bool]],
    prometheus_registry: CollectorRegistry | None = None,
    references: References | None = None,
    reference_uploads: ReferenceUploads | None = None,
    resources: Callable[[], dict[str, Any]] | None = None,
    forget_pending: Callable[[str], Awaitable[int]] | None = None,
    alerts: Alerts | None = None,
    upstreams: Upstreams | None = None,
) -> FastAPI:
    app = FastAPI(
        title="mlsidecar admin API",
        version=__version__,
        description="Health of the agent and of the models it watches; HTTP JSON ingest.",
    )

    if settings.token is not None:
        # The admin token is the stronger credential: a request carries one authorization
        # header, so the admin endpoints could never be reached if it were not accepted here.
        tokens = [settings.token.get_secret_value()]
        if settings.admin_token is not None:
            tokens.append(settings.admin_token.get_secret_value())

        @app.middleware("http")
        async def require_token(request: Request, call_next: Any) -> Any:
            if request.url.path in OPEN_PATHS or any(_bearer_matches(request, t) for t in tokens):
                return await call_next(request)
            return _error(401, "UNAUTHENTICATED", "token", "missing or wrong bearer token")

    def admin_refusal(request: Request) -> JSONResponse | None:
        if settings.admin_token is None or _bearer_matches(
            request, settings.admin_token.get_secret_value()
        ):
            return None
        return _error(
            401,
            "UNAUTHENTICATED",
            "admin_token",
            "this endpoint needs the admin token (api.admin_token)",
        )

    @app.get("/healthz", tags=["agent"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process is up and its event loop answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["agent"])
    async def readyz() -> JSONResponse:
        """Readiness: gRPC ingest is serving and telemetry exporters are configured (or
        telemetry is off on purpose: ``telemetry_disabled``, from OTEL_SDK_DISABLED=true)."""
        checks = readiness()
        waived = {"telemetry_configured"} if checks.get("telemetry_disabled") else set()
        ready = all(ok for name, ok in checks.items() if name not in waived)
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "checks": checks},
            status_code=200 if ready else 503,
        )

    @app.get("/v1/models", tags=["models"])
    async def list_models() -> dict[str, Any]:
        """Every model version the agent has seen."""
        return {"models": engine.models()}

    @app.get("/v1/models/{model}/health", tags=["models"])
    async def model_health(
        model: str, version: str | None = Query(None, description="default: latest version seen")
    ) -> JSONResponse:
        """The model's health report (docs/health-report.md), same as gRPC GetModelHealth."""
        if not MODEL_NAME_PATTERN.fullmatch(model):
            return _error(
                400,
                "INVALID_ARGUMENT",
                "invalid_model",
                f"model: {model[:140]!r} does not match [A-Za-z0-9._-]{{1,128}}",
            )
        report = engine.report(model, version)
        if report is None:
            suffix = f" version {version!r}" if version else ""
            return _error(
                404, "NOT_FOUND", "unknown_model", f"model {model!r}{suffix} has sent no events"
            )
        return JSONResponse(report)

    @app.delete("/v1/models/{model}", tags=["models"])
    async def forget_model(model: str, request: Request) -> JSONResponse:
        """Forget a model: all its versions' state. Needs the admin token when one is set."""
        if (refusal := admin_refusal(request)) is not None:
            return refusal
        if (refusal := invalid_model(model)) is not None:
            return refusal
        removed = engine.forget(model)
        references_removed = 0
        if references is not None:
            references_removed = await asyncio.to_thread(references.store.forget, model)
        pending_removed = 0 if forget_pending is None else await forget_pending(model)
        if not removed and not references_removed and not pending_removed:
            return _error(404, "NOT_FOUND", "unknown_model", f"model {model!r} is not tracked")
        return JSONResponse(
            {
                "model": model,
                "forgotten_versions": removed,
                "forgotten_references": references_removed,
                "forgotten_pending": pending_removed,
            }
        )

    def invalid_model(model: str) -> JSONResponse | None:
        if MODEL_NAME_PATTERN.fullmatch(model):
            return None
        return _error(
            400,
            "INVALID_ARGUMENT",
            "invalid_model",
            f"model: {model[:140]!r} does not match [A-Za-z0-9._-]{{1,128}}",
        )

    @app.get("/v1/models/{model}/reference", tags=["references"])
    async def get_reference(
        model: str, version: str | None = Query(None, description="default: latest version seen")
    ) -> JSONResponse:
        """The reference profile drift is judged against (bin edges and counts, no raw values)."""
        if (refusal := invalid_model(model)) is not None:
            return refusal
        profile = engine.reference(model, version)
        if profile is None:
            return _error(404, "NOT_FOUND", "no_reference", f"model {model!r} has no reference yet")
        return JSONResponse(profile.to_dict())

    @app.put("/v1/models/{model}/reference", tags=["references"])
    async def put_reference(
        model: str,
        request: Request,
        version: str | None = Query(None, description="default: latest version seen, else ''"),
    ) -> JSONResponse:
        """Upload a reference: a `mlsidecar reference build` file, or raw sample columns
        `{"features": {"age": [..], "city": [..]}, "scores": [..], "labels": [..]}`.
        Needs the admin token when one is set. Same code path as gRPC PutReference."""
        if (refusal := admin_refusal(request)) is not None:
            return refusal
        if reference_uploads is None:
            return _error(501, "UNIMPLEMENTED", "no_reference_store", "references are not enabled")
        try:
            body = await read_bounded(
                request,
                reference_uploads.max_bytes,
                lambda size: reference_uploads.check_size(size, "body"),
            )
            uploaded = await reference_uploads.put(model, version, body)
        except ReferenceRejected as error:
            return _error(400, "INVALID_ARGUMENT", error.reason, error.message)
        return JSONResponse(uploaded.to_dict())

    ingest_slots = IngestSlots(settings.max_ingest_in_flight)

    async def ingest(request: Request, message_type: type[Message], accept: Any) -> JSONResponse:
        method = "http:" + request.url.path
        if not ingest_slots.acquire():
            # Refused before the body is read: a flood of large bodies cannot pile up.
            busy = Rejected(
                "too_many_in_flight",
                f"{ingest_slots.limit} HTTP ingest bodies are already being read or processed "
                "(api.max_ingest_in_flight); retry after Retry-After seconds, or send over gRPC",
                RejectCode.BUSY,
            )
            receiver.reject(method, busy)
            response = _error(HTTP_STATUS[busy.code], busy.code.value, busy.reason, busy.message)
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
            return response
        try:
            return await ingest_admitted(request, message_type, accept, method)
        finally:
            ingest_slots.release()

    async def ingest_admitted(
        request: Request, message_type: type[Message], accept: Any, method: str
    ) -> JSONResponse:
        try:
            body = await read_bounded(
                request,
                receiver.max_message_bytes,
                lambda size: receiver.admit(size, method),
            )
            receiver.admit(len(body), method)  # also refuses while draining
            try:
                if not body.strip():
                    raise ValueError("the body is empty; send a JSON object")
                document = json.loads(body)
                if not isinstance(document, dict):
                    raise TypeError(f"expected a JSON object, got {_json_kind(document)}")
                message = json_format.ParseDict(document, message_type())
            except (json_format.ParseError, ValueError, TypeError, AttributeError) as error:
                rejected = Rejected(
                    "malformed", f"body: not a valid {message_type.__name__}: {error}"
                )
                receiver.reject(method, rejected)
                raise rejected from None
            ack = await accept(message, method=method)
        except Rejected as error:
            return _error(HTTP_STATUS[error.code], error.code.value, error.reason, error.message)
        return JSONResponse({"accepted": ack.accepted, "duplicate": ack.duplicate})

    @app.post("/v1/predictions", tags=["ingest"])
    async def post_predictions(request: Request) -> JSONResponse:
        """A PredictionBatch in protobuf JSON form (same fields and validation as gRPC)."""
        return await ingest(request, pb.PredictionBatch, receiver.accept_predictions)

    @app.post("/v1/outcomes", tags=["ingest"])
    async def post_outcomes(request: Request) -> JSONResponse:
        """An OutcomeBatch in protobuf JSON form (same fields and validation as gRPC)."""
        return await ingest(request, pb.OutcomeBatch, receiver.accept_outcomes)

    @app.get("/v1/resources", tags=["agent"])
    def resource_readings() -> JSONResponse:
        """The model process (pid, up, restarts, CPU and memory against its limits), the
        sidecar's process and cgroup, GPUs, and what is unreadable and why (docs/resources.md).
        A plain ``def``: reading /proc runs in the thread pool, not on the event loop."""
        if resources is None:
            return _error(404, "NOT_FOUND", "resources", "resources.enabled is false")
        return JSONResponse(resources())

    if prometheus_registry is not None:
        registry = prometheus_registry

        @app.get("/metrics", tags=["agent"], include_in_schema=False)
        def metrics(request: Request) -> Response:
            encoder, content_type = choose_encoder(request.headers.get("accept", ""))
            return Response(encoder(registry), media_type=content_type)

    if alerts is not None:
        add_alert_routes(app, alerts, admin_refusal)

    if upstreams is not None:
        from agent.upstream.api import add_breaker_routes  # only with upstream targets

        add_breaker_routes(app, upstreams, admin_refusal)
    else:

        @app.get("/v1/breakers", tags=["upstream"])
        def no_breakers() -> dict[str, Any]:
            """No upstream targets are configured: no breakers."""
            return {"breakers": []}

    return app


class AdminApi:
    """Owns the uvicorn server for the admin app."""

    def __init__(
        self,
        settings: ApiSettings,
        app: FastAPI,
        *,
        tracer_provider: Any = None,
        meter_provider: Any = None,
    ) -> None:
        self.settings = settings
        self.app = app
        FastAPIInstrumentor.instrument_app(
            app,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            excluded_urls="healthz,readyz,metrics",
        )
        self._listener = HttpListener(app, settings, key="api.listen", what="admin API")

    @property
    def port(self) -> int | None:
        return self._listener.port

    async def start(self) -> None:
        await self._listener.start()
        s = self.settings
        log.info("admin API listening", extra={"address": f"{s.host}:{self.port}"})

    async def stop(self) -> None:
        await self._listener.stop()
