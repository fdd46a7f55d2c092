"""Wiring: builds every component from config, starts them in order, stops them in reverse.

    agent = Agent(Settings.load(Path("mlsidecar.yaml")))
    await agent.start()
    ...                      # agent.ingest.port, agent.api.port
    await agent.stop()       # drain -> finish in-flight -> stop servers -> flush telemetry

``run_until_signalled`` is what ``mlsidecar run`` uses: SIGTERM/SIGINT begin a
graceful stop bounded by ``shutdown_timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace import SpanProcessor
from prometheus_client import CollectorRegistry

from agent import __version__
from agent.alerts import Alerts
from agent.alerts.channels import (
    AlertmanagerChannel,
    Channel,
    HttpChannel,
    LogChannel,
    WebhookChannel,
)
from agent.alerts.rules import configured_rules
from agent.api.app import AdminApi, build_app
from agent.config import HealthLimit, HealthSettings, Settings, StoreSettings
from agent.engine import Engine, ModelConfig, MonitorConfig, ReferenceProfile
from agent.engine.health import HealthPolicy, Limit
from agent.ingest.decode import Limits
from agent.ingest.grpc_server import IngestServer
from agent.ingest.join import OutcomeJoiner
from agent.ingest.receiver import EventReceiver
from agent.references import References, ReferenceUploads
from agent.resources import ResourceMonitor
from agent.store import (
    AsyncPendingPredictions,
    GroupCommitPendingPredictions,
    OrphanOutcomes,
    SqlitePendingPredictions,
)
from agent.telemetry.events import HealthEventLog, HealthEvents, poll_health_events
from agent.telemetry.providers import Telemetry

if TYPE_CHECKING:
    from agent.store.redis import RedisPendingPredictions
    from agent.upstream import EgressProxy, Upstreams

log = logging.getLogger(__name__)


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("saving a reference failed", exc_info=future.exception())


def model_config_resolver(settings: Settings) -> Callable[[str], ModelConfig]:
    """Per-model engine config: ``models.<name>`` overrides over the ``engine`` section."""
    engine = settings.engine

    def config_for(model: str) -> ModelConfig:
        override = settings.for_model(model)
        window_s = override.window_s or engine.window_s
        anomaly = settings.anomaly_for(model)
        return ModelConfig(
            window_ns=int(window_s * 1e9),
            min_window_rows=engine.min_window_rows,
            latency_bounds_ms=tuple(engine.latency_buckets_ms),
            score_bounds=tuple(override.score_buckets or engine.score_buckets),
            max_segments=engine.max_segments,
            monitor=MonitorConfig(
                psi_bins=engine.psi_bins,
                cdf_bins=engine.cdf_bins,
                top_k=engine.top_k,
                # A reference file replaces the warm-up window.
                warmup_rows=0 if override.reference else engine.warmup_rows,
                long_windows_ns=tuple(sorted({int(s * 1e9) for s in engine.long_windows_s})),
                drift_methods=dict(override.drift_methods),
                drift_thresholds={str(k): v for k, v in engine.drift_thresholds.items()},
                drift_share=engine.drift_share,
                positive_class=override.positive_class,
                max_segments=engine.max_segments,
                health=health_policy(settings.health_for(model)),
                anomaly_half_life=anomaly.half_life,
                anomaly_z=anomaly.z,
                anomaly_warmup=anomaly.warmup,
            ),
        )

    return config_for


def health_policy(health: HealthSettings) -> HealthPolicy:
    """The engine's policy for validated ``engine.health`` settings (a model's, merged)."""

    def limits(section: Iterable[tuple[str, HealthLimit | None]]) -> dict[str, Limit]:
        # A metric set to null is not judged.
        return {
            name: Limit(limit.degraded, limit.critical, limit.higher_is_better)
            for name, limit in section
            if limit is not None
        }

    return HealthPolicy(
        drift_weight=health.weights["drift"],
        performance_weight=health.weights["performance"],
        quality_weight=health.weights["quality"],
        anomaly_weight=health.weights["anomalies"],
        dataset_drift_share=health.drift.degraded_share,
        critical_drift_share=health.drift.critical_share,
        prediction_drift_degrades=health.drift.prediction_drift_degrades,
        performance=limits(health.performance.items()),
        quality=limits(health.quality.items()),
        anomalies_degraded=health.anomalies.degraded,
        anomalies_critical=health.anomalies.critical,
        max_reasons_per_signal=health.max_reasons_per_signal,
    )


def pending_store(store: StoreSettings) -> SqlitePendingPredictions | RedisPendingPredictions:
    """The pending-prediction store ``store.backend`` names, opened (Redis: reached and its
    schema checked, so an unreachable server fails the start with its host:port)."""
    if store.backend == "redis":
        # Imported here: redis-py costs ~0.3 s of start-up to agents that do not use it.
        from agent.store.redis import DEFAULT_CLAIM_TIMEOUT_S, RedisPendingPredictions

        if store.redis.url is None:  # refused by StoreSettings already
            raise ValueError("store.redis.url is required when store.backend is redis")
        return RedisPendingPredictions(
            store.redis.url.get_secret_value(),
            key_prefix=store.redis.key_prefix,
            ttl_s=store.pending_ttl_s,
            max_pending=store.max_pending,
            timeout_s=store.redis.timeout_s,
            # A take is acknowledged by the next take or expire sweep: recover its claim only
            # well after that, or rows already joined would be given back.
            claim_timeout_s=max(
                DEFAULT_CLAIM_TIMEOUT_S, 6 * store.expire_interval_s, 10 * store.redis.timeout_s
            ),
        )
    store.data_dir.mkdir(parents=True, exist_ok=True)
    return SqlitePendingPredictions(
        store.data_dir / "pending.db",
        ttl_s=store.pending_ttl_s,
        max_pending=store.max_pending,
        synchronous=store.synchronous,
        max_db_bytes=store.max_db_bytes,
    )


class Agent:
    """The whole sidecar. Extra readers/processors/exporters are for tests and embedding."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], int] = time.time_ns,
        metric_readers: Sequence[MetricReader] = (),
        span_processors: Sequence[SpanProcessor] = (),
        **exporters: Any,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self.references = References(settings)
        self.engine = Engine(
            model_config_resolver(settings),
            max_models=settings.ingest.max_models,
            clock=clock,
            reference_for=self.references.lookup,
            on_reference=self._persist_reference,
        )
        self.prometheus_registry = (
            CollectorRegistry(auto_describe=False) if settings.api.prometheus else None
        )
        self.telemetry = Telemetry(
            settings.telemetry,
            self.engine,
            clock=clock,
            prometheus_registry=self.prometheus_registry,
            extra_metric_readers=metric_readers,
            extra_span_processors=span_processors,
            **exporters,
        )
        meter = self.telemetry.meter_provider.get_meter("mlsidecar", __version__)
        tracer = self.telemetry.tracer_provider.get_tracer("mlsidecar", __version__)
        meter.create_observable_gauge(
            "mlsidecar.models",
            callbacks=[self._observe_models],
            unit="{model}",
            description="Model versions the agent tracks.",
        )
        meter.create_observable_gauge(
            "mlsidecar.running",
            callbacks=[self._observe_running],
            unit="",
            description="1 while the agent runs; 0 in the final export of a graceful stop, so "
            "a series that ends on 1 belongs to an agent that died.",
        )
        # The pod's resources and the model process, read when a reader collects.
        self.resources = (
            ResourceMonitor(settings.resources, self.telemetry.meter_provider)
            if settings.resources.enabled
            else None
        )
        ingest = settings.ingest
        # Where pending predictions are kept (a file, or Redis without credentials).
        self.pending_store_location = "off"
        self.joiner = self._outcome_joiner(settings)
        self.receiver = EventReceiver(
            self.engine,
            Limits(ingest.max_rows_per_batch, ingest.max_features, ingest.max_message_bytes),
            meter=meter,
            tracer=tracer,
            clock=clock,
            dedup_window_s=ingest.dedup_window_s,
            dedup_max_batches=ingest.dedup_max_batches,
            joiner=self.joiner,
        )
        # One upload path for HTTP PUT and gRPC PutReference.
        self.reference_uploads = ReferenceUploads(
            self.references,
            install=self.install_reference,
            latest_version=self.latest_version,
            max_bytes=ingest.max_message_bytes,
            clock=clock,
        )
        self.ingest = IngestServer(
            ingest,
            self.receiver,
            self.engine,
            reference_uploads=self.reference_uploads,
            admin_token=settings.api.admin_token,
        )
        # Alerts on the health reports' signals; state under the data dir survives restarts.
        self.alerts = (
            Alerts(
                configured_rules(settings.alerts),
                clock=clock,
                state_path=settings.store.data_dir / "alerts.json",
                history=settings.alerts.history,
            )
            if settings.alerts.enabled
            else None
        )
        self._alerting: asyncio.Task[None] | None = None
        if self.alerts is not None:
            # The agent's own alerts as a metric, for dashboards (docs/metrics.md).
            meter.create_observable_gauge(
                "mlsidecar.alerts.firing",
                callbacks=[self._observe_firing_alerts],
                unit="",
                description="The agent's alert instances firing, per rule and model version "
                "(0 once resolved).",
            )
        # Breaker-guarded upstream targets and the egress proxy, only when some are configured
        # (imported then: pybreaker brings redis-py, ~24 MB of memory, along).
        self.upstreams: Upstreams | None = None
        self.proxy: EgressProxy | None = None
        if settings.upstream.targets:
            from agent.upstream import EgressProxy, Upstreams, UpstreamTelemetry

            self.upstreams = Upstreams.from_settings(
                settings.upstream,
                redis_url=settings.upstream_redis_url(),
                telemetry=UpstreamTelemetry(meter, tracer),
            )
            self.proxy = EgressProxy(settings.upstream, self.upstreams)
        app = build_app(
            settings.api,
            self.engine,
            self.receiver,
            readiness=self.readiness,
            prometheus_registry=self.prometheus_registry,
            references=self.references,
            reference_uploads=self.reference_uploads,
            resources=None if self.resources is None else self.resources.report,
            forget_pending=None if self.joiner is None else self.joiner.forget,
            alerts=self.alerts,
            upstreams=self.upstreams,
        )
        self.api = AdminApi(
            settings.api,
            app,
            tracer_provider=self.telemetry.tracer_provider,
            meter_provider=self.telemetry.meter_provider,
        )
        self._started = False
        self._expiry: asyncio.Task[None] | None = None
        self._store_closed = False
        # Health events: one log record per change of a model's health, never per evaluation.
        self.health_events = HealthEvents(
            max_versions=ingest.max_models, max_features=ingest.max_features
        )
        self.health_event_log = HealthEventLog(self.telemetry.logger_provider, clock=clock)
        self._events: asyncio.Task[None] | None = None
        self.alert_channels: dict[str, Channel] = {"log": LogChannel(self.health_event_log)}
        for name, channel in settings.alerts.channels.items():
            # What waits to be sent survives a restart, next to the alerts' state.
            outbox = settings.store.data_dir / "alert-outbox" / f"{name}.json"
            self.alert_channels[name] = (
                AlertmanagerChannel(
                    name,
                    self.post_upstream,
                    channel.upstream,
                    interval_s=settings.alerts.interval_s,
                    outbox_path=outbox,
                )
                if channel.type == "alertmanager"
                else WebhookChannel(
                    name,
                    self.post_upstream,
                    channel.upstream,
                    channel.path,
                    channel.format,
                    outbox_path=outbox,
                )
            )

    def _outcome_joiner(self, settings: Settings) -> OutcomeJoiner | None:
        store = settings.store
        if not store.pending:
            return None
        pending = pending_store(store)
        self.pending_store_location = str(pending.path)
        async_store = AsyncPendingPredictions(GroupCommitPendingPredictions(pending))
        self.engine.pending_for = async_store.pending_count
        return OutcomeJoiner(
            self.engine,
            async_store,
            OrphanOutcomes(grace_s=store.orphan_grace_s, max_held=store.max_orphans),
        )

    async def _expire_periodically(self) -> None:
        assert self.joiner is not None
        while True:
            await asyncio.sleep(self.settings.store.expire_interval_s)
            try:
                await self.joiner.expire(self._clock())
            except Exception:
                log.exception("expiring pending predictions failed")

    async def _emit_health_events_periodically(self) -> None:
        """Every ``telemetry.events_interval_s``, log what changed in the models' health.

        Its own task, not a metric reader's callback, so each change is logged once
        however many readers collect, and also with OTLP off.
        """
        while True:
            await asyncio.sleep(self.settings.telemetry.events_interval_s)
            try:
                await asyncio.to_thread(
                    poll_health_events, self.engine, self.health_events, self.health_event_log
                )
            except Exception:
                log.exception("evaluating health events failed")

    async def _evaluate_alerts_periodically(self) -> None:
        """Every ``alerts.interval_s``: judge the rules on every model version's report and
        send what fired or resolved. Reports are built off the event loop."""
        assert self.alerts is not None
        while True:
            await asyncio.sleep(self.settings.alerts.interval_s)
            try:
                await self.evaluate_alerts()
            except Exception:
                log.exception("evaluating alerts failed")

    async def evaluate_alerts(self) -> int:
        """One evaluation of the alert rules; returns the notifications sent."""
        if self.alerts is None:
            return 0
        listing = [] if self.upstreams is None else await self.upstreams.listing()
        breakers = {
            b["upstream"]: {"state": b["state"], "open": int(b["state"] == "open")} for b in listing
        }
        reports = await asyncio.to_thread(self._latest_reports, breakers)
        notifications = self.alerts.evaluate(reports)
        for channel in self.alert_channels.values():
            if isinstance(channel, HttpChannel):
                await channel.flush()  # what failed last time goes first
        for notification in notifications:
            for name in notification.channels:
                try:
                    await self.alert_channels[name].send(notification)
                except Exception:
                    log.exception("alert channel %s failed", name)
        return len(notifications)

    async def post_upstream(self, upstream: str, path: str, payload: Any) -> int:
        """POST ``payload`` as JSON to ``path`` below an upstream target, under its policy
        (timeout, retries, breaker) and with its metrics and span: the agent's own egress."""
        if self.proxy is None:
            raise LookupError(f"upstream {upstream!r}: no upstream.targets are configured")
        return await self.proxy.post_json(upstream, path, payload)

    def _latest_reports(self, breakers: dict[str, Any]) -> list[dict[str, Any]]:
        """Every model version's health report, then the agent's own (resources, breakers)."""
        reports: list[dict[str, Any]] = []
        for tracked in self.engine.models():
            report = self.engine.report(str(tracked["model"]), str(tracked["version"]))
            if report is not None:
                reports.append(report)
        resources = {} if self.resources is None else self.resources.report()
        reports.append({"model": "", "version": "", "resources": resources, "breakers": breakers})
        return reports

    def install_reference(self, profile: ReferenceProfile) -> None:
        """Store ``profile`` durably, then judge its model version against it."""
        self.references.save(profile)
        self.engine.set_reference(profile)

    def latest_version(self, model: str) -> str | None:
        """The version ``model`` sent last, or None if it has sent nothing."""
        for tracked in self.engine.models():
            if tracked["model"] == model and tracked["latest"]:
                return str(tracked["version"])
        return None

    def _persist_reference(self, profile: ReferenceProfile) -> None:
        """A warm-up reference is complete: write it off the event loop when one runs."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.references.save(profile)
            return
        task = loop.run_in_executor(None, self.references.save, profile)
        task.add_done_callback(_log_failure)

    def _observe_running(self, options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(1 if self._started else 0)

    def _observe_models(self, options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(len(self.engine.models()))

    def _observe_firing_alerts(self, options: CallbackOptions) -> Iterable[Observation]:
        assert self.alerts is not None
        for (rule, model, version, severity), count in sorted(self.alerts.firing().items()):
            attributes = {"alertname": rule, "severity": severity}
            if model:  # the agent's own alerts (resources, breakers) name no model
                attributes |= {"ml.model.name": model, "ml.model.version": version}
            yield Observation(count, attributes)

    def readiness(self) -> dict[str, bool]:
        checks = {
            "grpc_serving": self.ingest.serving,
            "telemetry_configured": self.telemetry.configured,
        }
        if self.telemetry.disabled:
            # Off on purpose (OTEL_SDK_DISABLED=true): said so, and not a reason to be unready.
            checks["telemetry_disabled"] = True
        return checks

    async def start(self) -> None:
        """Start ingest first, then the admin API; a failure stops what already started."""
        try:
            await self.ingest.start()
            await self.api.start()
            if self.proxy is not None:
                await self.proxy.start()
        except BaseException:
            await self.api.stop()
            await self.ingest.stop(0)
            await self._close_store()
            # Nothing was accepted, so nothing needs flushing: do not wait on a Collector.
            self.telemetry.abort()
            self.telemetry.shutdown()
            raise
        if self.joiner is not None:
            self._expiry = asyncio.create_task(self._expire_periodically(), name="expire-pending")
        if self.resources is not None:
            await self.resources.start()
        if self.telemetry.log_handler is not None:
            logging.getLogger().addHandler(self.telemetry.log_handler)
        if self.settings.telemetry.events_interval_s > 0:
            self._events = asyncio.create_task(
                self._emit_health_events_periodically(), name="health-events"
            )
        if self.alerts is not None:
            self._alerting = asyncio.create_task(
                self._evaluate_alerts_periodically(), name="alerts"
            )
        self._started = True
        log.info(
            "mlsidecar started",
            extra={
                "version": __version__,
                "ingest": f"{self.ingest.settings.host}:{self.ingest.port}",
                "api": f"{self.api.settings.host}:{self.api.port}",
                "exporting": self.telemetry.describe(),
                "pending_store": self.pending_store_location,
            },
        )

    async def stop(self) -> None:
        """Drain, let in-flight batches finish, stop servers, flush telemetry; bounded."""
        if not self._started:
            return
        self._started = False
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        log.info("mlsidecar stopping", extra={"deadline_s": self.settings.shutdown_timeout_s})
        await self.ingest.drain()
        # Leave at least a third of the deadline to flush telemetry.
        grace = max(self.settings.shutdown_timeout_s * 2 / 3, 0.1)
        await self.ingest.stop(grace)
        if self.proxy is not None:
            await self.proxy.stop()
        await self.api.stop()
        if self.resources is not None:
            await self.resources.stop()
        # Every acknowledged batch is in the store already; closing checkpoints the WAL.
        await self._close_store()
        for task in (self._events, self._alerting):
            if task is not None:
                task.cancel()
        self._events = self._alerting = None
        remaining = max(deadline - time.monotonic(), 0.1)
        try:
            await asyncio.wait_for(asyncio.to_thread(self.telemetry.shutdown), remaining)
        except TimeoutError:
            log.error("telemetry flush overran the shutdown deadline; dropping the rest")
            # The flush thread cannot be cancelled; stopping its exporters ends it, so
            # the process (asyncio.run joins that thread) exits within the deadline.
            self.telemetry.abort()
        log.info("mlsidecar stopped")

    async def _close_store(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self.joiner is not None and not self._store_closed:
            self._store_closed = True
            await self.joiner.store.close()

    async def run_until_signalled(self) -> None:
        """Start, then stop gracefully on SIGTERM or SIGINT."""
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_requested.set)
        try:
            await self.start()
            await stop_requested.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop()
