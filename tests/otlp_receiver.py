"""Loopback OTLP receivers for tests: what an OpenTelemetry Collector would receive.

No Collector binary is available on the test machines, so these stand in for
one. They are built from the official ``opentelemetry-proto`` service
definitions (gRPC) and message types (HTTP), so whatever the agent's real
exporters send is decoded exactly as a Collector would decode it.

    with OtlpGrpcReceiver() as collector:            # 127.0.0.1:<free port>
        settings = {"telemetry": {"otlp": True, "endpoint": collector.endpoint}}
        ...
        collector.wait_for(lambda: collector.metric_value("ml.predictions") == 10)

``OtlpHttpReceiver`` does the same for ``http/protobuf`` (POST /v1/metrics, /v1/traces,
/v1/logs with a protobuf body).
"""

from __future__ import annotations

import gzip
import http.server
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric, ResourceMetrics
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, kind)


def attributes(pairs: Iterator[KeyValue] | Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in pairs}


class _Store:
    """Every export request received, in order; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.metric_requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.trace_requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.log_requests: list[logs_service_pb2.ExportLogsServiceRequest] = []
        self.paths: list[str] = []

    def add(self, kind: str, request: Any, path: str = "") -> None:
        with self._lock:
            getattr(self, f"{kind}_requests").append(request)
            if path:
                self.paths.append(path)

    # -- views -------------------------------------------------------------------------------

    def resource_metrics(self) -> list[ResourceMetrics]:
        with self._lock:
            return [rm for r in self.metric_requests for rm in r.resource_metrics]

    def resource_spans(self) -> list[ResourceSpans]:
        with self._lock:
            return [rs for r in self.trace_requests for rs in r.resource_spans]

    def resource_logs(self) -> list[ResourceLogs]:
        with self._lock:
            return [rl for r in self.log_requests for rl in r.resource_logs]

    def metrics(self, name: str) -> list[Metric]:
        """Every received data set of metric ``name``, oldest first."""
        return [
            m
            for rm in self.resource_metrics()
            for sm in rm.scope_metrics
            for m in sm.metrics
            if m.name == name
        ]

    def metric_value(self, name: str, **attrs: Any) -> float | None:
        """The latest exported value of a Sum metric, summed over points matching ``attrs``.

        Cumulative temporality: the latest export carries the running total.
        """
        received = self.metrics(name)
        if not received:
            return None
        points = received[-1].sum.data_points
        total = 0.0
        for point in points:
            point_attrs = attributes(point.attributes)
            if all(point_attrs.get(k) == v for k, v in attrs.items()):
                total += point.as_double if point.HasField("as_double") else point.as_int
        return total

    def gauge_values(self, name: str) -> list[float]:
        """Every exported point of gauge ``name``, oldest first."""
        return [
            point.as_double if point.HasField("as_double") else point.as_int
            for metric in self.metrics(name)
            for point in metric.gauge.data_points
        ]

    def spans(self, name: str | None = None) -> list[Span]:
        return [
            span
            for rs in self.resource_spans()
            for ss in rs.scope_spans
            for span in ss.spans
            if name is None or span.name == name
        ]

    def log_records(self) -> list[LogRecord]:
        return [
            rec for rl in self.resource_logs() for sl in rl.scope_logs for rec in sl.log_records
        ]

    def wait_for(self, condition: Callable[[], Any], timeout: float = 30.0) -> Any:
        """Poll ``condition`` until it is truthy; fail with what was received otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            result = condition()
            if result:
                return result
            if time.monotonic() > deadline:
                names = sorted(
                    {
                        m.name
                        for rm in self.resource_metrics()
                        for sm in rm.scope_metrics
                        for m in sm.metrics
                    }
                )
                raise AssertionError(
                    f"condition not met within {timeout}s; received {len(self.metric_requests)} "
                    f"metric, {len(self.trace_requests)} trace and {len(self.log_requests)} log "
                    f"export requests; metric names: {names}"
                )
            time.sleep(0.05)


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, store: _Store) -> None:
        self._store = store

    def Export(self, request: Any, context: Any) -> Any:
        self._store.add("metric", request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, store: _Store) -> None:
        self._store = store

    def Export(self, request: Any, context: Any) -> Any:
        self._store.add("trace", request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _LogsService(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, store: _Store) -> None:
        self._store = store

    def Export(self, request: Any, context: Any) -> Any:
        self._store.add("log", request)
        return logs_service_pb2.ExportLogsServiceResponse()


class OtlpGrpcReceiver(_Store):
    """An OTLP/gRPC endpoint on 127.0.0.1 (metrics, traces, logs services)."""

    def __init__(self) -> None:
        super().__init__()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(
            _MetricsService(self), self._server
        )
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_LogsService(self), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpGrpcReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(0).wait(5)

    def __enter__(self) -> OtlpGrpcReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_HTTP_PATHS: dict[str, tuple[str, Any, Any]] = {
    "/v1/metrics": (
        "metric",
        metrics_service_pb2.ExportMetricsServiceRequest,
        metrics_service_pb2.ExportMetricsServiceResponse,
    ),
    "/v1/traces": (
        "trace",
        trace_service_pb2.ExportTraceServiceRequest,
        trace_service_pb2.ExportTraceServiceResponse,
    ),
    "/v1/logs": (
        "log",
        logs_service_pb2.ExportLogsServiceRequest,
        logs_service_pb2.ExportLogsServiceResponse,
    ),
}


class OtlpHttpReceiver(_Store):
    """An OTLP/HTTP (binary protobuf) endpoint on 127.0.0.1."""

    def __init__(self) -> None:
        super().__init__()
        store = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                route = _HTTP_PATHS.get(self.path)
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if route is None or self.headers.get("content-type") != "application/x-protobuf":
                    self.send_error(404 if route is None else 415)
                    return
                kind, request_type, response_type = route
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                store.add(kind, request_type.FromString(body), self.path)
                payload = response_type().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> OtlpHttpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> OtlpHttpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
