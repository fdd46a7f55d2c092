"""The demo's parts as their own commands, for docker-compose and Kubernetes.

    mlsidecar demo-feature-store --listen 127.0.0.1:8090
    mlsidecar demo-model --listen 127.0.0.1:8080 --sidecar 127.0.0.1:4320 \\
        --feature-store-url http://127.0.0.1:8321/upstream/features
    mlsidecar demo-traffic --target http://127.0.0.1:8080 --sidecar 127.0.0.1:4320 --speed 10

Each runs until SIGINT/SIGTERM (demo-traffic: until --duration or the story's end) and
exits 0; a bad option exits 2 with one line naming it. They listen on loopback unless
given ``--insecure`` (they have no authentication of their own). Heavy imports happen when
a command runs, not when the CLI builds its parser.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import is_loopback, split_host_port
from agent.ingest_connection import add_connection_arguments

Handler = Callable[[argparse.Namespace], int]
WILDCARDS = ("", "0.0.0.0", "::")
EXIT_USAGE = 2  # as agent.cli: bad usage


def listen_address(
    value: str,
    flag: str,
    *,
    insecure: bool,
    what: str,
    remedy: str = "add --insecure to serve it there anyway (e.g. in a container)",
) -> tuple[str, int]:
    """(host, port) of a demo part's listen address; ValueError naming ``flag`` when it is
    not HOST:PORT, or not a loopback address without ``insecure`` (as the agent's listeners
    need ``insecure: true`` for plaintext without a token on a non-loopback address)."""
    try:
        host, port = split_host_port(value)
    except ValueError as error:
        raise ValueError(f"{flag}: {error} (expected HOST:PORT, e.g. 127.0.0.1:8080)") from None
    if not is_loopback(host) and not insecure:
        raise ValueError(
            f"{flag}: {value!r} is not a loopback address and the {what} has no "
            f"authentication; {remedy}"
        )
    return host, port


def _target(value: str, flag: str) -> str:
    """An agent address to connect to, checked: ValueError naming ``flag``."""
    try:
        split_host_port(value)
    except ValueError as error:
        raise ValueError(f"{flag}: {error}") from None
    return value


def connect_address(host: str, port: int) -> str:
    """HOST:PORT to connect to a listener bound to ``host``: a wildcard means this machine's
    loopback; an IPv6 address gets its brackets (``[::1]:8080``)."""
    if host in WILDCARDS:
        host = "::1" if host == "::" else "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _usage_error(error: ValueError) -> int:
    print(f"mlsidecar: {error}", file=sys.stderr, flush=True)
    return EXIT_USAGE


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
    m.add_argument("--log-inline", action="store_true",
                   help="log each request's predictions before responding (default: after "
                        "the response is sent, so logging is not in the caller's latency)")  # fmt: skip
    m.add_argument("--proxy-token-file", type=Path, metavar="PATH",
                   help="file holding the agent's upstream.token, sent to the egress proxy "
                        "as proxy-authorization")  # fmt: skip
    _insecure_argument(m, "the model service")
    add_connection_arguments(m, tls=False)
    m.set_defaults(handler=model)

    s = commands.add_parser("demo-feature-store", help="the demo model's upstream feature store")
    s.add_argument("--listen", default="127.0.0.1:8090", metavar="HOST:PORT",
                   help="address to serve on (default 127.0.0.1:8090)")  # fmt: skip
    _insecure_argument(s, "the feature store")
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
    add_connection_arguments(t, tls=False)
    t.set_defaults(handler=traffic)


def _insecure_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--insecure", action="store_true",
        help=f"allow a non-loopback --listen (e.g. 0.0.0.0:8080 in a container): {what} "
             "has no authentication",
    )  # fmt: skip


def _token(args: argparse.Namespace, sidecar: str) -> str | None:
    """The ingest token of --token-file / $MLSIDECAR_TOKEN (ValueError naming the flag)."""
    from agent.ingest_connection import ingest_connection

    return ingest_connection(args, sidecar).token


def _proxy_token(path: Path | None) -> str | None:
    if path is None:
        return None
    from agent.client.credentials import CredentialsError, read_token

    try:
        return read_token(path)
    except CredentialsError as error:
        raise ValueError(f"--proxy-token-file: {error.reason}") from None


def _bound(host: str, port: int) -> str:
    """Say where a wildcard listener is bound: the URL printed is the loopback one."""
    if host not in WILDCARDS:
        return ""
    return f" (listening on {'[::]' if host == '::' else host}:{port})"


def _stop_on_signals(stop: asyncio.Event) -> None:
    import logging

    for name in ("httpx", "httpcore"):  # one INFO line per request is noise here
        logging.getLogger(name).setLevel(logging.WARNING)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def serve_model(args: argparse.Namespace) -> int:
    from agent.demo.model import ModelService

    try:
        host, _ = listen_address(
            args.listen, "--listen", insecure=args.insecure, what="demo model service"
        )
        token = _token(args, _target(args.sidecar, "--sidecar"))
        proxy_token = _proxy_token(args.proxy_token_file)
    except ValueError as error:
        return _usage_error(error)
    service = ModelService(
        listen=args.listen,
        sidecar=args.sidecar,
        feature_store_url=args.feature_store_url,
        log_predictions=not args.no_sdk,
        log_inline=args.log_inline,
        sidecar_token=token,
        proxy_token=proxy_token,
        insecure=args.insecure,
    )
    await service.start()
    stop = asyncio.Event()
    _stop_on_signals(stop)
    assert service.port is not None
    logged = "nowhere (--no-sdk)" if args.no_sdk else args.sidecar
    if token is not None and not args.no_sdk:
        logged += " with a token"  # which one is never printed
    print(
        f"demo model service on http://{connect_address(host, service.port)}"
        f"{_bound(host, service.port)} (POST /predict, GET /healthz, GET /stats); "
        f"predictions logged to {logged}; features from "
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
    from agent.demo.featurestore import FeatureStore

    try:
        host, _ = listen_address(
            args.listen, "--listen", insecure=args.insecure, what="demo feature store"
        )
    except ValueError as error:
        return _usage_error(error)
    listener = await FeatureStore().serve(args.listen, "--listen")
    stop = asyncio.Event()
    _stop_on_signals(stop)
    assert listener.port is not None
    print(
        f"demo feature store on http://{connect_address(host, listener.port)}"
        f"{_bound(host, listener.port)} (POST /features, PUT /admin/failing, GET /admin/status)",
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
    token = None
    if not args.no_outcomes:
        try:
            token = _token(args, _target(args.sidecar, "--sidecar"))
        except ValueError as error:
            return _usage_error(error)
    try:
        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as http:
            (await http.get(f"{target}/healthz")).raise_for_status()
    except httpx.HTTPError as error:
        print(f"mlsidecar: no demo model service answering at {target}: {error}", file=sys.stderr)
        return 1
    traffic = Traffic(
        target,
        sidecar=None if args.no_outcomes else args.sidecar,
        sidecar_token=token,
        speed=args.speed,
        seed=args.seed,
        rate=args.rate,
        feature_store=args.feature_store,
    )
    duration = STORY_S / args.speed if args.duration is None else args.duration
    print(
        f"demo traffic to {target}: {traffic.rows_per_s:g} transactions/s in requests of "
        f"{traffic.batch_rows}, speed {args.speed:g}, seed {args.seed}, for {duration:g}s; "
        f"outcomes to {'nowhere' if args.no_outcomes else args.sidecar}"
        f"{' with a token' if token else ''}",
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
