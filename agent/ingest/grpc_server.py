"""The gRPC ingest server (grpc.aio): Ingest service, standard health service, reflection.

Handlers receive raw bytes (no deserializer), so the message size limit is
checked before parsing and answered with INVALID_ARGUMENT (a static limit),
and a malformed message is a clear INVALID_ARGUMENT rather than a transport error.

    server = IngestServer(settings.ingest, receiver, engine,
                          reference_uploads=uploads, admin_token=settings.api.admin_token)
    await server.start()      # server.port is the bound port (listen "127.0.0.1:0" picks one)
    await server.drain()      # new batches get UNAVAILABLE, health turns NOT_SERVING
    await server.stop(grace=5.0)
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import SecretStr

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb
from agent.config import MODEL_NAME_PATTERN, IngestSettings, is_loopback
from agent.engine import Engine
from agent.ingest.decode import RejectCode, Rejected
from agent.ingest.receiver import Ack, EventReceiver
from agent.references import ReferenceRejected, ReferenceUploads

log = logging.getLogger(__name__)

SERVICE = "mlsidecar.v1.Ingest"
STATUS = {
    RejectCode.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    RejectCode.BUSY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RejectCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}
# Messages beyond this reach no handler: gRPC itself refuses them (RESOURCE_EXHAUSTED).
HARD_SIZE_FACTOR = 4


def parse(message_type: type[Message], raw: bytes, field: str = "message") -> Any:
    try:
        return message_type.FromString(raw)
    except DecodeError as error:
        raise Rejected(
            "malformed", f"{field}: not a valid {message_type.__name__}: {error}"
        ) from None


def report_struct(report: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    json_format.ParseDict(report, struct)
    return struct


def _bearer_matches(metadata: Any, token: str) -> bool:
    supplied = dict(metadata or ()).get("authorization", "")
    return isinstance(supplied, str) and hmac.compare_digest(
        supplied.encode(), f"Bearer {token}".encode()
    )


def _model_refusal(model: str) -> str | None:
    if MODEL_NAME_PATTERN.fullmatch(model):
        return None
    return f"model: {model[:140]!r} does not match [A-Za-z0-9._-]{{1,128}}"


class IngestServicer:
    """The Ingest RPCs over raw bytes, delegating to an EventReceiver.

    State-changing RPCs (PutReference) need ``admin_token`` when it is set. Without one,
    they are refused on an ``open_listener`` (non-loopback, neither TLS nor token).
    """

    def __init__(
        self,
        receiver: EventReceiver,
        engine: Engine,
        *,
        reference_uploads: ReferenceUploads | None = None,
        admin_token: str | None = None,
        open_listener: bool = False,
    ) -> None:
        self._receiver = receiver
        self._engine = engine
        self._uploads = reference_uploads
        self._admin_token = admin_token
        self._open_listener = open_listener

    async def _accept_event(self, raw: bytes, method: str) -> Ack:
        self._receiver.admit(len(raw), method)
        event = self._parse_counted(pb.EventBatch, raw, method)
        which = event.WhichOneof("batch")
        if which == "predictions":
            return await self._receiver.accept_predictions(event.predictions, method=method)
        if which == "outcomes":
            return await self._receiver.accept_outcomes(event.outcomes, method=method)
        error = Rejected("empty_event", "batch: set predictions or outcomes")
        self._receiver.reject(method, error)
        raise error

    async def _submit(
        self,
        raw: bytes,
        context: grpc.aio.ServicerContext,
        message_type: type[Message],
        accept: Callable[..., Awaitable[Ack]],
        method: str,
    ) -> Any:
        try:
            self._receiver.admit(len(raw), method)
            ack = await accept(self._parse_counted(message_type, raw, method), method=method)
        except Rejected as error:
            await context.abort(STATUS[error.code], error.message)
        return pb.SubmitResponse(accepted=ack.accepted, duplicate=ack.duplicate)

    async def submit_predictions(self, raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await self._submit(
            raw, context, pb.PredictionBatch, self._receiver.accept_predictions, "SubmitPredictions"
        )

    async def submit_outcomes(self, raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await self._submit(
            raw, context, pb.OutcomeBatch, self._receiver.accept_outcomes, "SubmitOutcomes"
        )

    async def stream_events(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async for raw in requests:
            try:
                ack = await self._accept_event(raw, "StreamEvents")
            except Rejected as error:
                yield pb.SubmitResponse(
                    error=pb.Error(code=STATUS[error.code].value[0], message=error.message)
                )
                continue
            yield pb.SubmitResponse(accepted=ack.accepted, duplicate=ack.duplicate)

    async def get_model_health(self, raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            request = parse(pb.ModelHealthRequest, raw, "ModelHealthRequest")
        except Rejected as error:
            await context.abort(STATUS[error.code], error.message)
        if (refusal := _model_refusal(request.model)) is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal)
        report = self._engine.report(request.model, request.model_version or None)
        if report is None:
            version = f" version {request.model_version!r}" if request.model_version else ""
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"model {request.model!r}{version} has sent no events"
            )
            return None  # abort raises; this keeps the type checker informed
        return model_health_message(report)

    async def put_reference(self, raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        """Like PUT /v1/models/{model}/reference, through the same ``ReferenceUploads.put``."""
        await self._require_admin(context, "PutReference")
        uploads = self._uploads
        if uploads is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "references are not enabled")
            return None  # abort raises; this keeps the type checker informed
        try:
            uploads.check_size(len(raw), "message")  # before parsing, as for batches
            request = parse(pb.PutReferenceRequest, raw, "PutReferenceRequest")
            version = request.model_version if request.HasField("model_version") else None
            uploaded = await uploads.put(request.model, version, request.document, field="document")
        except (Rejected, ReferenceRejected) as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)
        return pb.PutReferenceResponse(
            model=uploaded.model,
            model_version=uploaded.version,
            id=uploaded.id,
            source=uploaded.source,
            rows=uploaded.rows,
            features=uploaded.features,
        )

    async def get_reference(self, raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        """Like GET /v1/models/{model}/reference; the document can be sent back to PutReference."""
        try:
            request = parse(pb.GetReferenceRequest, raw, "GetReferenceRequest")
        except Rejected as error:
            await context.abort(STATUS[error.code], error.message)
        if (refusal := _model_refusal(request.model)) is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal)
        version = request.model_version if request.HasField("model_version") else None
        profile = self._engine.reference(request.model, version)
        if profile is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"model {request.model!r} has no reference yet"
            )
            return None  # abort raises; this keeps the type checker informed
        # The bytes GET /v1/models/{model}/reference answers (starlette's JSON encoding).
        document = json.dumps(
            profile.to_dict(), ensure_ascii=False, allow_nan=False, separators=(",", ":")
        )
        return pb.GetReferenceResponse(
            model=profile.model,
            model_version=profile.version,
            id=profile.id,
            source=profile.source,
            rows=profile.rows,
            features=sorted(profile.features),
            document=document.encode(),
        )

    async def _require_admin(self, context: grpc.aio.ServicerContext, method: str) -> None:
        """Abort a state-changing call that lacks the admin token (or may not run at all)."""
        if self._admin_token is not None:
            if not _bearer_matches(context.invocation_metadata(), self._admin_token):
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"{method} needs the admin token (api.admin_token)",
                )
        elif self._open_listener:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} changes state, and this ingest listener accepts unauthenticated "
                "plaintext (a non-loopback address with ingest.insecure); set api.admin_token, "
                "or ingest.token or ingest.tls",
            )

    def _parse_counted(self, message_type: type[Message], raw: bytes, method: str) -> Any:
        try:
            return parse(message_type, raw, message_type.__name__)
        except Rejected as error:
            self._receiver.reject(method, error)
            raise

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(fn: Callable[..., Awaitable[Any]]) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=None, response_serializer=_serialize
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "SubmitPredictions": unary(self.submit_predictions),
                "SubmitOutcomes": unary(self.submit_outcomes),
                "GetModelHealth": unary(self.get_model_health),
                "PutReference": unary(self.put_reference),
                "GetReference": unary(self.get_reference),
                "StreamEvents": grpc.stream_stream_rpc_method_handler(
                    self.stream_events, request_deserializer=None, response_serializer=_serialize
                ),
            },
        )


def model_health_message(report: dict[str, Any]) -> Any:
    message = pb.ModelHealth(
        report=report_struct(report),
        window_start_unix_nano=report["window"]["start_unix_nano"],
        window_end_unix_nano=report["window"]["end_unix_nano"],
    )
    score = report["health"]["score"]
    if score is not None:
        message.health_score = score
    return message


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


class _BearerToken(grpc.aio.ServerInterceptor):
    """Require ``authorization: Bearer <token>``, one of ``tokens``, on every RPC but the
    health service. The admin token is among them: a call carries one authorization header,
    so a state-changing RPC could never be reached if it were refused here."""

    def __init__(self, tokens: list[str]) -> None:
        self._tokens = tokens

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.stream_stream_rpc_method_handler(deny)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith("/grpc.health.v1.Health/"):
            return await continuation(details)
        metadata = details.invocation_metadata
        # Every token is compared (no early exit), so timing does not tell which one matched.
        if any([_bearer_matches(metadata, token) for token in self._tokens]):
            return await continuation(details)
        return self._deny_stream if details.method.endswith("/StreamEvents") else self._deny


class IngestServer:
    """Owns the grpc.aio server; start/drain/stop in the agent's lifecycle.

    ``admin_token`` (``api.admin_token``) guards the state-changing RPCs, as it guards the
    state-changing endpoints of the admin API.
    """

    def __init__(
        self,
        settings: IngestSettings,
        receiver: EventReceiver,
        engine: Engine,
        *,
        reference_uploads: ReferenceUploads | None = None,
        admin_token: SecretStr | None = None,
    ) -> None:
        self.settings = settings
        self.receiver = receiver
        self._admin_token = None if admin_token is None else admin_token.get_secret_value()
        self.servicer = IngestServicer(
            receiver,
            engine,
            reference_uploads=reference_uploads,
            admin_token=self._admin_token,
            open_listener=not is_loopback(settings.host)
            and settings.tls is None
            and settings.token is None,
        )
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        s = self.settings
        hard_limit = max(s.max_message_bytes * HARD_SIZE_FACTOR, 4 * 1024 * 1024)
        interceptors = []
        if s.token is not None:
            tokens = [s.token.get_secret_value()]
            if self._admin_token is not None:
                tokens.append(self._admin_token)
            interceptors.append(_BearerToken(tokens))
        server = grpc.aio.server(
            interceptors=interceptors,
            maximum_concurrent_rpcs=s.max_in_flight,
            options=[
                ("grpc.max_receive_message_length", hard_limit),
                ("grpc.so_reuseport", 0),
            ],
        )
        server.add_generic_rpc_handlers((self.servicer.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if s.reflection:
            reflection.enable_server_reflection(
                (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )
        address = f"[{s.host}]:{s.port}" if ":" in s.host else f"{s.host}:{s.port}"
        if s.tls is not None:
            credentials = grpc.ssl_server_credentials(
                [(s.tls.key.read_bytes(), s.tls.cert.read_bytes())],
                root_certificates=s.tls.client_ca.read_bytes() if s.tls.client_ca else None,
                require_client_auth=s.tls.client_ca is not None,
            )
        try:  # grpcio raises RuntimeError when the address cannot be bound (older ones return 0)
            if s.tls is not None:
                port = server.add_secure_port(address, credentials)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if port == 0:
            raise OSError(f"ingest.listen: cannot bind {s.listen} (address in use?)")
        await server.start()
        self._server, self.port = server, port
        await self.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("gRPC ingest listening", extra={"address": f"{s.host}:{port}"})

    @property
    def serving(self) -> bool:
        return self._server is not None and not self.receiver.draining

    async def drain(self) -> None:
        """Refuse new batches (UNAVAILABLE) and report NOT_SERVING; in-flight ones finish."""
        self.receiver.draining = True
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
