"""The agent's OpenTelemetry pipelines: one MeterProvider, TracerProvider and LoggerProvider.

Built from parts passed in, never from globals, so tests can add in-memory
readers and exporters and assert on what was really produced:

    telemetry = Telemetry(settings.telemetry, engine, clock=time.time_ns,
                          extra_metric_readers=[InMemoryMetricReader()])
    meter = telemetry.meter_provider.get_meter("mlsidecar")

Standard OTEL_* variables win over the YAML ``telemetry`` section:
OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_EXPORTER_OTLP_[signal_]ENDPOINT,
OTEL_EXPORTER_OTLP_[signal_]PROTOCOL, OTEL_EXPORTER_OTLP_HEADERS, OTEL_METRIC_EXPORT_INTERVAL,
OTEL_SDK_DISABLED, OTEL_{TRACES,METRICS,LOGS}_EXPORTER=none.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExporter
from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    MeterProvider,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from agent import __version__
from agent.config import TelemetrySettings
from agent.engine import Engine
from agent.telemetry.engine_metrics import EngineMetricsProducer, inject_engine_metrics
from agent.telemetry.events import EVENTS_LOGGER

log = logging.getLogger(__name__)

SIGNALS = ("traces", "metrics", "logs")
# Resource attributes shown as labels on every /metrics series (k8s_namespace_name, ...), the
# ones dashboards filter on; the rest stay on target_info.
PROMOTED_RESOURCE_ATTRIBUTES = frozenset(
    {"service.name", "service.version", "k8s.namespace.name", "k8s.pod.name", "k8s.node.name"}
)
CUMULATIVE_ONLY: dict[type, AggregationTemporality] = {
    instrument: AggregationTemporality.CUMULATIVE
    for instrument in (
        Counter,
        UpDownCounter,
        Histogram,
        ObservableCounter,
        ObservableUpDownCounter,
        ObservableGauge,
    )
}


def otlp_protocol(settings: TelemetrySettings, signal: str) -> str:
    env = os.environ
    return (
        env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or settings.protocol
    )


def otlp_endpoint(settings: TelemetrySettings, signal: str) -> str | None:
    """The endpoint to pass to the exporter; None lets the exporter read OTEL_* itself."""
    env = os.environ
    if env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    ):
        return None
    protocol = otlp_protocol(settings, signal)
    if protocol == "grpc":
        return settings.endpoint or "http://127.0.0.1:4317"
    base = settings.endpoint or "http://127.0.0.1:4318"
    return f"{base.rstrip('/')}/v1/{signal}"


def sdk_disabled() -> bool:
    """OTEL_SDK_DISABLED=true: the SDK's providers hand out no-op meters, tracers and loggers
    (as the specification says), so nothing is recorded or exported, /metrics included."""
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def otlp_enabled(settings: TelemetrySettings, signal: str) -> bool:
    if sdk_disabled():
        return False
    if os.environ.get(f"OTEL_{signal.upper()}_EXPORTER", "").lower() == "none":
        return False
    wanted = {"traces": settings.traces, "metrics": True, "logs": settings.logs}[signal]
    return settings.otlp and wanted


def build_resource(settings: TelemetrySettings) -> Resource:
    """service.name is the monitored model service's, so ML signals sit with it in Tempo."""
    attributes: dict[str, Any] = {
        "service.name": settings.service_name,
        **settings.resource_attributes,
    }
    attributes.update(OTELResourceDetector().detect().attributes)  # OTEL_RESOURCE_ATTRIBUTES wins
    if os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = os.environ["OTEL_SERVICE_NAME"]
    attributes.setdefault("telemetry.distro.name", "mlsidecar")
    attributes.setdefault("telemetry.distro.version", __version__)
    return Resource.create(attributes)


def _exporter_kwargs(settings: TelemetrySettings, signal: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"endpoint": otlp_endpoint(settings, signal)}
    if settings.headers and not os.environ.get("OTEL_EXPORTER_OTLP_HEADERS"):
        kwargs["headers"] = {k: v.get_secret_value() for k, v in settings.headers.items()}
    return kwargs


def _otlp_exporter(settings: TelemetrySettings, signal: str) -> Any:
    kwargs = _exporter_kwargs(settings, signal)
    grpc = otlp_protocol(settings, signal) == "grpc"
    if signal == "metrics":
        if grpc:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # type: ignore[assignment]
                OTLPMetricExporter,
            )
        # Engine points are cumulative; the SDK's instruments must agree whatever
        # OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE says.
        return OTLPMetricExporter(**kwargs, preferred_temporality=CUMULATIVE_ONLY)
    if signal == "traces":
        if grpc:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
                OTLPSpanExporter,
            )
        return OTLPSpanExporter(**kwargs)
    if grpc:
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
    else:
        from opentelemetry.exporter.otlp.proto.http._log_exporter import (  # type: ignore[assignment]
            OTLPLogExporter,
        )
    return OTLPLogExporter(**kwargs)


def export_interval_ms(settings: TelemetrySettings) -> float:
    raw = os.environ.get("OTEL_METRIC_EXPORT_INTERVAL")
    if raw:
        try:
            return float(raw)
        except ValueError:
            log.warning("ignoring OTEL_METRIC_EXPORT_INTERVAL=%r: not a number", raw)
    return float(settings.metric_export_interval_ms)


def _exported_through_the_bridge(record: logging.LogRecord) -> bool:
    """Which Python log records the OTLP log handler exports.

    Not the exporters' own warnings (say, the Collector is down): exporting them through
    the exporter that is failing feeds itself. Not the JSON-log copy of a health event:
    ``HealthEventLog`` has already written that event to the LoggerProvider.
    """
    return not record.name.startswith("opentelemetry") and record.name != EVENTS_LOGGER


class Telemetry:
    """Owns the three providers; ``shutdown`` flushes everything they hold."""

    def __init__(
        self,
        settings: TelemetrySettings,
        engine: Engine,
        *,
        clock: Callable[[], int],
        prometheus_registry: Any | None = None,
        extra_metric_readers: Sequence[MetricReader] = (),
        extra_span_processors: Sequence[SpanProcessor] = (),
        metric_exporter: MetricExporter | None = None,
        span_exporter: SpanExporter | None = None,
        log_exporter: LogRecordExporter | None = None,
    ) -> None:
        self.settings = settings
        # Read once, as the providers below read it once when they are built.
        self.disabled = sdk_disabled()
        if self.disabled:
            log.warning(
                "OTEL_SDK_DISABLED=true: OpenTelemetry is off, so no metrics (OTLP or /metrics), "
                "traces or logs are produced; ingest, health reports and alerts still work"
            )
        self.resource = build_resource(settings)
        self.engine_metrics = EngineMetricsProducer(engine, self.resource, clock)
        self.exporting: list[str] = []
        self._exporters: list[Any] = []  # push exporters, for abort()

        readers: list[MetricReader] = list(extra_metric_readers)
        if metric_exporter is None and otlp_enabled(settings, "metrics"):
            metric_exporter = _otlp_exporter(settings, "metrics")
        if metric_exporter is not None:
            self._exporters.append(metric_exporter)
            readers.append(
                PeriodicExportingMetricReader(
                    metric_exporter, export_interval_millis=export_interval_ms(settings)
                )
            )
            self.exporting.append("otlp-metrics")
        if prometheus_registry is not None:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader

            # The resource attributes dashboards filter on become labels of every series, as
            # the Collector's resource_to_telemetry_conversion makes them (docs/metrics.md).
            readers.append(
                PrometheusMetricReader(
                    registry=prometheus_registry,
                    resource_attribute_filter=PROMOTED_RESOURCE_ATTRIBUTES.__contains__,
                )
            )
            self.exporting.append("prometheus")
        for reader in readers:
            inject_engine_metrics(reader, self.engine_metrics)
        self.metric_readers = readers
        self.meter_provider = MeterProvider(resource=self.resource, metric_readers=readers)

        self.tracer_provider = TracerProvider(resource=self.resource)
        for processor in extra_span_processors:
            self.tracer_provider.add_span_processor(processor)
        if span_exporter is None and otlp_enabled(settings, "traces"):
            span_exporter = _otlp_exporter(settings, "traces")
        if span_exporter is not None:
            self._exporters.append(span_exporter)
            self.tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
            self.exporting.append("otlp-traces")

        self.logger_provider = LoggerProvider(resource=self.resource)
        if log_exporter is None and otlp_enabled(settings, "logs"):
            log_exporter = _otlp_exporter(settings, "logs")
        self.log_handler: logging.Handler | None = None
        if log_exporter is not None:
            self._exporters.append(log_exporter)
            self.logger_provider.add_log_record_processor(BatchLogRecordProcessor(log_exporter))
            self.log_handler = LoggingHandler(logger_provider=self.logger_provider)
            self.log_handler.addFilter(_exported_through_the_bridge)
            self.exporting.append("otlp-logs")
        if self.disabled:  # the paths exist, but the no-op SDK feeds them nothing
            self.exporting = []

    @property
    def configured(self) -> bool:
        """True when at least one metrics path (OTLP push or Prometheus pull) exists and the
        SDK is on: with OTEL_SDK_DISABLED=true the readers exist but never get a point."""
        return bool(self.metric_readers) and not self.disabled

    def describe(self) -> str:
        """What is exported, for the start-up log: "otlp-metrics,prometheus", "nothing"."""
        if self.disabled:
            return "nothing (OTEL_SDK_DISABLED=true)"
        return ",".join(self.exporting) or "nothing"

    def force_flush(self, timeout_millis: int = 5_000) -> None:
        self.tracer_provider.force_flush(timeout_millis)
        self.meter_provider.force_flush(timeout_millis)
        self.logger_provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Export what is held, then stop: spans first, then metrics, then logs."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
        if self.log_handler is not None:
            logging.getLogger().removeHandler(self.log_handler)
        self.logger_provider.shutdown()

    def abort(self) -> None:
        """Stop the push exporters now: retries give up and later exports are dropped.

        For a ``shutdown`` that overran its deadline (say the Collector is down): the
        exporters would otherwise keep retrying for their own timeouts, one signal
        after another, and keep the process alive well past ``shutdown_timeout_s``.
        """
        for exporter in self._exporters:
            try:
                exporter.shutdown()
            except Exception:
                log.debug("exporter shutdown failed", exc_info=True)
