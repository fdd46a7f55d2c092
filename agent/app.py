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
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace import SpanProcessor
from prometheus_client import CollectorRegistry

from agent import __version__
from agent.api.app import AdminApi, build_app
from agent.config import Settings
from agent.engine import Engine, ModelConfig, MonitorConfig, ReferenceProfile
from agent.ingest.decode import Limits
from agent.ingest.grpc_server import IngestServer
from agent.ingest.join import OutcomeJoiner
from agent.ingest.receiver import EventReceiver
from agent.references import References
from agent.store import (
    AsyncPendingPredictions,
    GroupCommitPendingPredictions,
    OrphanOutcomes,
    SqlitePendingPredictions,
)
from agent.telemetry.providers import Telemetry

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
            ),
        )

    return config_for


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
        ingest = settings.ingest
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
        self.ingest = IngestServer(ingest, self.receiver, self.engine)
        app = build_app(
            settings.api,
            self.engine,
            self.receiver,
            readiness=self.readiness,
            prometheus_registry=self.prometheus_registry,
            references=self.references,
            install_reference=self.install_reference,
            forget_pending=None if self.joiner is None else self.joiner.forget,
            clock=clock,
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

    def _outcome_joiner(self, settings: Settings) -> OutcomeJoiner | None:
        store = settings.store
        if not store.pending:
            return None
        store.data_dir.mkdir(parents=True, exist_ok=True)
        pending = SqlitePendingPredictions(
            store.data_dir / "pending.db",
            ttl_s=store.pending_ttl_s,
            max_pending=store.max_pending,
            synchronous=store.synchronous,
            max_db_bytes=store.max_db_bytes,
        )
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

    def install_reference(self, profile: ReferenceProfile) -> None:
        """Store ``profile`` durably, then judge its model version against it."""
        self.references.save(profile)
        self.engine.set_reference(profile)

    def _persist_reference(self, profile: ReferenceProfile) -> None:
        """A warm-up reference is complete: write it off the event loop when one runs."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.references.save(profile)
            return
        task = loop.run_in_executor(None, self.references.save, profile)
        task.add_done_callback(_log_failure)

    def _observe_models(self, options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(len(self.engine.models()))

    def readiness(self) -> dict[str, bool]:
        return {
            "grpc_serving": self.ingest.serving,
            "telemetry_configured": self.telemetry.configured,
        }

    async def start(self) -> None:
        """Start ingest first, then the admin API; a failure stops what already started."""
        try:
            await self.ingest.start()
            await self.api.start()
        except BaseException:
            await self.ingest.stop(0)
            await self._close_store()
            # Nothing was accepted, so nothing needs flushing: do not wait on a Collector.
            self.telemetry.abort()
            self.telemetry.shutdown()
            raise
        if self.joiner is not None:
            self._expiry = asyncio.create_task(self._expire_periodically(), name="expire-pending")
        if self.telemetry.log_handler is not None:
            logging.getLogger().addHandler(self.telemetry.log_handler)
        self._started = True
        log.info(
            "mlsidecar started",
            extra={
                "version": __version__,
                "ingest": f"{self.ingest.settings.host}:{self.ingest.port}",
                "api": f"{self.api.settings.host}:{self.api.port}",
                "exporting": ",".join(self.telemetry.exporting) or "nothing",
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
        await self.api.stop()
        # Every acknowledged batch is in the store already; closing checkpoints the WAL.
        await self._close_store()
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
