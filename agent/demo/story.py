"""``mlsidecar demo``: the agent, a feature store, the model service and the traffic, in one process.

    settings = demo_settings(loaded, speed=10)      # short windows, fast alerts, a temp data dir
    code = asyncio.run(run_story(settings, DemoOptions(speed=10, seed=7, duration=30)))

Everything listens on 127.0.0.1; ports not given are chosen free. The story's phases are in
``agent.demo.traffic.PHASES``; a summary line is printed every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from agent.config import (
    AlertRuleSettings,
    BreakerPolicy,
    ModelSettings,
    RetryPolicy,
    Settings,
    UpstreamPolicy,
    UpstreamTarget,
)
from agent.demo.featurestore import FeatureStore
from agent.demo.model import ModelService
from agent.demo.parts import connect_address, listen_address
from agent.demo.traffic import PHASES, STORY_S, Traffic
from agent.demo.world import MODEL, VERSION

if TYPE_CHECKING:
    from agent.app import Agent

log = logging.getLogger(__name__)
FEATURES_TARGET = "features"
FEATURES_POLICY = "demo-features"
# Story seconds, divided by --speed: the engine window, the breaker's open time, alert timing.
WINDOW_STORY_S = 20.0
BREAKER_OPEN_STORY_S = 10.0
BREAKER_ALERT_FOR_STORY_S = 10.0
ALERT_INTERVAL_STORY_S = 5.0
DEMO_FEATURES = ("amount", "hour", "merchant", "account_age_days")
DRIFT_PSI = 0.2  # "drifted" at PSI >= 0.2; the drifting amount reaches ~1.5
DEMO_LOOPBACK_ONLY = (
    "`mlsidecar demo` serves on this machine only; run the part on its own to expose it "
    "(`mlsidecar demo-model --insecure`, `mlsidecar demo-feature-store --insecure`)"
)


@dataclass(frozen=True, slots=True)
class DemoOptions:
    speed: float = 1.0
    seed: int = 7
    duration: float | None = None  # wall seconds; default: the whole story
    rate: float = 50.0  # transactions per story second
    every: float | None = None  # seconds between summary lines
    model_listen: str = "127.0.0.1:0"
    feature_store_listen: str = "127.0.0.1:0"


def demo_settings(settings: Settings, *, speed: float) -> Settings:
    """Time-scale what the user's config leaves unset, so every signal shows within a phase."""
    if "window_s" not in settings.engine.model_fields_set:
        settings.engine.window_s = max(1.0, WINDOW_STORY_S / speed)
    if "interval_s" not in settings.alerts.model_fields_set:
        settings.alerts.interval_s = min(15.0, max(0.5, ALERT_INTERVAL_STORY_S / speed))
    if "breaker-open" not in settings.alerts.rules:
        settings.alerts.rules["breaker-open"] = AlertRuleSettings(
            signal="breakers.*.open",
            op="==",
            threshold=1,
            for_s=BREAKER_ALERT_FOR_STORY_S / speed,
            severity="warning",
            annotations={"summary": "an upstream's breaker has been open a while"},
        )
    if MODEL not in settings.models:
        # PSI on every feature: a p-value test on 1,000-row windows flags ~5 % of healthy
        # windows per feature (more for the integer hour), too noisy for a story.
        settings.models[MODEL] = ModelSettings(
            drift_methods=dict.fromkeys(DEMO_FEATURES, "psi"), positive_class="fraud"
        )
    if "drift_thresholds" not in settings.engine.model_fields_set:
        settings.engine.drift_thresholds = {"psi": DRIFT_PSI}
    if "listen" not in settings.upstream.model_fields_set:
        settings.upstream.listen = "127.0.0.1:0"  # the demo's proxy: a free port
    settings.upstream.policies.setdefault(
        FEATURES_POLICY,
        UpstreamPolicy(
            timeout_s=1.0,
            retries=RetryPolicy(max=1, base_s=0.02, max_s=0.1),
            breaker=BreakerPolicy(
                consecutive_failures=5, open_s=max(0.5, BREAKER_OPEN_STORY_S / speed)
            ),
        ),
    )
    return settings


def _fmt(value: Any, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def summary_line(
    elapsed: float,
    traffic: dict[str, Any],
    report: dict[str, Any] | None,
    breakers: list[dict[str, Any]],
    firing: list[str],
) -> str:
    """One line: phase and progress, traffic, drift, accuracy, health, breaker, alerts."""
    head = (
        f"[{elapsed:6.1f}s] phase {traffic['phase_index'] + 1}/{len(PHASES)} "
        f"{traffic['phase']:<16} {traffic['progress'] * 100:3.0f}%"
    )
    if report is None:
        return f"{head} | waiting for the first predictions"
    features = report.get("features") or {}
    psi = ((features.get("amount") or {}).get("drift") or {}).get("psi")
    health = report.get("health") or {}
    breaker = ", ".join(f"{b['upstream']} {b['state']}" for b in breakers) or "-"
    return (
        f"{head} | {report['model']}@{report['version']}: {report['totals']['rows']} predictions, "
        f"{report['totals']['outcomes']} outcomes | amount PSI {_fmt(psi)}, drifted share "
        f"{_fmt((report.get('dataset_drift') or {}).get('share'))} | accuracy "
        f"{_fmt((report.get('performance') or {}).get('accuracy'))} | health "
        f"{_fmt(health.get('score'), '.0f')} ({health.get('status', '-')}) | breaker {breaker} | "
        f"alerts: {', '.join(firing) or 'none'}"
    )


def _banner(
    agent: Agent, model: ModelService, store_url: str, proxy_port: int, o: DemoOptions
) -> str:
    settings = agent.settings
    api = f"http://{settings.api.host}:{agent.api.port}"
    otlp = ", ".join(
        e.removeprefix("otlp-") for e in agent.telemetry.exporting if e.startswith("otlp")
    )
    duration = STORY_S / o.speed if o.duration is None else o.duration
    timeline, start = [], 0.0
    for i, phase in enumerate(PHASES, 1):
        timeline.append(f"    {i}. {start / o.speed:6.1f}s  {phase.name:<16} {phase.description}")
        start += phase.seconds
    return "\n".join(
        [
            f"mlsidecar demo: agent ingest on {settings.ingest.host}:{agent.ingest.port}, "
            f"admin API on {api}",
            f"  model health:  {api}/v1/models/{MODEL}/health",
            f"  metrics:       {api}/metrics",
            f"  alerts:        {api}/v1/alerts",
            f"  breakers:      {api}/v1/breakers",
            f"  API docs:      {api}/docs",
            f"  model service: http://127.0.0.1:{model.port}/predict (FastAPI, {MODEL}@{VERSION})",
            f"  feature store: {store_url} via the egress proxy "
            f"http://127.0.0.1:{proxy_port}/upstream/{FEATURES_TARGET}",
            f"  OTLP export:   {otlp or 'off (set OTEL_EXPORTER_OTLP_ENDPOINT to send to a Collector)'}",
            f"  story at speed {o.speed:g} ({STORY_S / o.speed:g}s), seed {o.seed}:",
            *timeline,
            f"  Ctrl-C stops; runs for {duration:g}s",
        ]
    )


def _secret(value: SecretStr | None) -> str | None:
    return None if value is None else value.get_secret_value()


def _check_listens(options: DemoOptions) -> None:
    """The demo's own parts serve this machine only (the banner's URLs are loopback ones);
    to expose one, run it on its own (``mlsidecar demo-model --insecure``)."""
    from agent.cli import ConfigError

    for value, flag, what in (
        (options.model_listen, "--model-listen", "demo model service"),
        (options.feature_store_listen, "--feature-store-listen", "demo feature store"),
    ):
        try:
            listen_address(value, flag, insecure=False, what=what, remedy=DEMO_LOOPBACK_ONLY)
        except ValueError as error:
            raise ConfigError(str(error)) from None


async def run_story(settings: Settings, options: DemoOptions) -> int:
    """Start everything, tell the story, stop everything (in reverse); returns the exit code."""
    from agent.cli import build_agent

    # One INFO line per HTTP request would bury the summary lines.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    speed = options.speed
    duration = STORY_S / speed if options.duration is None else options.duration
    every = options.every if options.every is not None else min(5.0, max(1.0, 5.0 / speed))
    _check_listens(options)
    temp_dir: str | None = None
    if "data_dir" not in settings.store.model_fields_set:
        # A fresh state per demo: no reference or alert left over from an earlier run.
        temp_dir = tempfile.mkdtemp(prefix="mlsidecar-demo-")
        settings.store.data_dir = Path(temp_dir)

    store = FeatureStore()
    store_listener = await store.serve(options.feature_store_listen, "--feature-store-listen")
    store_url = f"http://127.0.0.1:{store_listener.port}"
    settings.upstream.targets[FEATURES_TARGET] = UpstreamTarget(
        url=store_url, policy=FEATURES_POLICY
    )
    agent = None
    model = None
    try:
        agent = build_agent(settings)
        await agent.start()
        assert agent.proxy is not None and agent.proxy.port is not None
        proxy_port = agent.proxy.port
        ingest = connect_address(settings.ingest.host, agent.ingest.port)
        model = ModelService(
            listen=options.model_listen,
            sidecar=ingest,
            feature_store_url=(
                f"http://{connect_address(settings.upstream.host, proxy_port)}"
                f"/upstream/{FEATURES_TARGET}"
            ),
            sidecar_token=_secret(settings.ingest.token),
            proxy_token=_secret(settings.upstream.token),
        )
        await model.start()
        print(_banner(agent, model, store_url, proxy_port, options), flush=True)
        traffic = Traffic(
            f"http://127.0.0.1:{model.port}",
            sidecar=ingest,
            sidecar_token=_secret(settings.ingest.token),
            speed=speed,
            seed=options.seed,
            rate=options.rate,
            feature_store=store_url,
        )
        await _tell(agent, traffic, duration, every)
        print(
            f"demo finished: sent {traffic.sent_predictions} predictions and "
            f"{traffic.sent_outcomes} outcomes ({traffic.failed_requests} failed batches); "
            f"feature store lookups {store.lookups}, refused {store.refused}; "
            f"model fallbacks {model.fallbacks}",
            flush=True,
        )
    finally:
        if model is not None:
            await model.stop()
        if agent is not None:
            await agent.stop()
        await store_listener.stop()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
    return 0


async def _tell(agent: Agent, traffic: Traffic, duration: float, every: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sender = asyncio.create_task(traffic.run(stop, duration), name="demo-traffic")
    started = time.monotonic()
    try:
        while not stop.is_set() and not sender.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(sender), every)
            breakers = [] if agent.upstreams is None else await agent.upstreams.listing()
            firing = (
                []
                if agent.alerts is None
                else sorted(
                    {a["rule"] for a in agent.alerts.listing()["active"] if a["state"] == "firing"}
                )
            )
            line = summary_line(
                time.monotonic() - started,
                traffic.status(),
                agent.engine.report(MODEL, VERSION),
                breakers,
                firing,
            )
            print(line, flush=True)
    finally:
        stop.set()
        await sender
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
