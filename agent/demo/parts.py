"""The demo's parts as their own commands, for docker-compose and Kubernetes.

    mlsidecar demo-feature-store --listen 127.0.0.1:8090
    mlsidecar demo-model --listen 127.0.0.1:8080 --sidecar 127.0.0.1:4320 \\
        --feature-store-url http://127.0.0.1:8321/upstream/features
    mlsidecar demo-traffic --target http://127.0.0.1:8080 --sidecar 127.0.0.1:4320 --speed 10

Each runs until SIGINT/SIGTERM (demo-traffic: until --duration or the story's end) and
exits 0. Heavy imports happen when a command runs, not when the CLI builds its parser.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

Handler = Callable[[argparse.Namespace], int]


def add_part_commands(
    commands: Any, *, model: Handler, traffic: Handler, feature_store: Handler
) -> None:
    """Add demo-model, demo-traffic and demo-feature-store to the CLI's subcommands."""
    m = commands.add_parser("demo-model", help="the demo fraud model service (FastAPI + SDK)")
    m.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="address to serve on (default 127.0.0.1:8080)")  # fmt: skip
    m.add_argument("--sidecar", default="127.0.0.1:4320", metavar="HOST:PORT",
                   help="the agent's gRPC ingest (default 127.0.0.1:4320)")  # fmt: skip
    m.add_argument("--feature-store-url", metavar="URL",
                   help="feature store base URL, normally through the agent's egress proxy: "
                        "http://127.0.0.1:8321/upstream/features (default: none, features "
                        "computed locally)")  # fmt: skip
    m.add_argument("--no-sdk", action="store_true",
                   help="do not log predictions (for the latency benchmark)")  # fmt: skip
    m.set_defaults(handler=model)

    s = commands.add_parser("demo-feature-store", help="the demo model's upstream feature store")
    s.add_argument("--listen", default="127.0.0.1:8090", metavar="HOST:PORT",
                   help="address to serve on (default 127.0.0.1:8090)")  # fmt: skip
    s.set_defaults(handler=feature_store)

    t = commands.add_parser("demo-traffic", help="send the demo story's traffic to a model service")
    t.add_argument("--target", required=True, metavar="URL",
                   help="the demo model service, e.g. http://127.0.0.1:8080")  # fmt: skip
    t.add_argument("--sidecar", default="127.0.0.1:4320", metavar="HOST:PORT",
                   help="agent gRPC ingest the outcomes go to (default 127.0.0.1:4320)")  # fmt: skip
    t.add_argument("--no-outcomes", action="store_true", help="send no outcomes")
    t.add_argument("--feature-store", metavar="URL",
                   help="the feature store's own URL, to stage its outage (optional)")  # fmt: skip
    t.add_argument("--speed", type=float, default=1.0, help="story time per second")
    t.add_argument("--seed", type=int, default=7, help="random seed")
    t.add_argument("--rate", type=float, default=50.0, help="transactions per story second")
    t.add_argument("--duration", type=float,
                   help="stop after this many seconds (default: the whole story)")  # fmt: skip
    t.add_argument("--every", type=float, default=5.0, help="seconds between status lines")
    t.set_defaults(handler=traffic)


def _stop_on_signals(stop: asyncio.Event) -> None:
    import logging

    for name in ("httpx", "httpcore"):  # one INFO line per request is noise here
        logging.getLogger(name).setLevel(logging.WARNING)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def serve_model(args: argparse.Namespace) -> int:
    from agent.demo.model import ModelService

    service = ModelService(
        listen=args.listen,
        sidecar=args.sidecar,
        feature_store_url=args.feature_store_url,
        log_predictions=not args.no_sdk,
    )
    await service.start()
    stop = asyncio.Event()
    _stop_on_signals(stop)
    host = args.listen.rsplit(":", 1)[0]
    print(
        f"demo model service on http://{host}:{service.port} (POST /predict, GET /healthz, "
        f"GET /stats); predictions logged to "
        f"{'nowhere (--no-sdk)' if args.no_sdk else args.sidecar}; features from "
        f"{args.feature_store_url or 'local computation'}",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await service.stop()
    print(f"demo model service stopped: {service.stats()}", flush=True)
    return 0


async def serve_feature_store(args: argparse.Namespace) -> int:
    from agent.api.serve import HttpListener
    from agent.config import Listener
    from agent.demo.featurestore import FeatureStore

    store = FeatureStore()
    listener = HttpListener(
        store.app(),
        Listener(listen=args.listen, insecure=True),
        key="--listen",
        what="demo feature store",
    )
    await listener.start()
    stop = asyncio.Event()
    _stop_on_signals(stop)
    host = args.listen.rsplit(":", 1)[0]
    print(
        f"demo feature store on http://{host}:{listener.port} (POST /features, "
        "PUT /admin/failing, GET /admin/status)",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await listener.stop()
    return 0


async def send_traffic(args: argparse.Namespace) -> int:
    import httpx

    from agent.demo.traffic import STORY_S, Traffic

    target = args.target.rstrip("/")
    try:
        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as http:
            (await http.get(f"{target}/healthz")).raise_for_status()
    except httpx.HTTPError as error:
        print(f"mlsidecar: no demo model service answering at {target}: {error}", file=sys.stderr)
        return 1
    traffic = Traffic(
        target,
        sidecar=None if args.no_outcomes else args.sidecar,
        speed=args.speed,
        seed=args.seed,
        rate=args.rate,
        feature_store=args.feature_store,
    )
    duration = STORY_S / args.speed if args.duration is None else args.duration
    print(
        f"demo traffic to {target}: {traffic.rows_per_s:g} transactions/s in requests of "
        f"{traffic.batch_rows}, speed {args.speed:g}, seed {args.seed}, for {duration:g}s; "
        f"outcomes to {'nowhere' if args.no_outcomes else args.sidecar}",
        flush=True,
    )
    stop = asyncio.Event()
    _stop_on_signals(stop)
    sender = asyncio.create_task(traffic.run(stop, duration))
    started = time.monotonic()
    try:
        while not sender.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(sender), args.every)
            status = traffic.status()
            print(
                f"[{time.monotonic() - started:6.1f}s] phase {status['phase_index'] + 1} "
                f"{status['phase']} {status['progress'] * 100:.0f}%: "
                f"{status['sent_predictions']} predictions, {status['sent_outcomes']} outcomes, "
                f"{status['failed_requests']} failed requests",
                flush=True,
            )
    finally:
        stop.set()
        await sender
    print(
        f"demo traffic finished: sent {traffic.sent_predictions} predictions and "
        f"{traffic.sent_outcomes} outcomes ({traffic.failed_requests} failed requests)",
        flush=True,
    )
    return 0
