"""Client SDK cost: per-call overhead of ``log_prediction`` and throughput to a real agent.

Prints figures (it is not a test). The agent is ``mlsidecar run`` in a child process on
loopback ports, so the client's process holds only the model service's side: the
caller's thread and the SDK's background sender.

    .venv/bin/python bench/client.py                 # 5 s per phase
    .venv/bin/python bench/client.py --quick         # ~1 s per phase, for a smoke check
    .venv/bin/python bench/client.py --rate 5000 --features 20 --seconds 10
    .venv/bin/python bench/client.py --agent-target 127.0.0.1:4320   # an agent already running

Phases:
    call-overhead   log_prediction at --rate calls/s (a paced loop, as requests arrive),
                    a --features dict per call, sender running: p50/p90/p99/p99.9/max in µs
    call-in-span    the same inside an active OTel span (the trace ids are read per call)
    call-agent-down the same with nobody listening on the target: the breaker opens, the
                    buffer fills and drops its oldest rows; the caller's cost must not grow
    throughput      log_prediction as fast as one thread can, then flush: events/s the
                    agent acknowledged
    batch-form      log_predictions with numpy columns (1000 rows), then flush: events/s

``paced_call_latencies`` and ``percentiles_us`` are reusable (e.g. by a demo-model
latency comparison).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.client import SidecarClient  # noqa: E402

MODEL = "bench-client"
TARGET_P50_US = 10.0
TARGET_P99_US = 50.0


# --- reusable measurement -----------------------------------------------------------------


def paced_call_latencies(call: Callable[[int], Any], rate: float, seconds: float) -> np.ndarray:
    """Call ``call(i)`` at ``rate`` calls/s for ``seconds``; each call's duration in ns.

    Pacing sleeps between calls (as a service waits for requests) and does not burst to
    catch up when it falls behind, so the rate is a ceiling.
    """
    n = max(1, int(rate * seconds))
    durations = np.empty(n, dtype=np.int64)
    interval = 1.0 / rate
    clock = time.perf_counter_ns
    next_at = time.perf_counter()
    for i in range(n):
        delay = next_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        else:
            next_at = time.perf_counter()
        started = clock()
        call(i)
        durations[i] = clock() - started
        next_at += interval
    return durations


def percentiles_us(durations_ns: np.ndarray) -> dict[str, float]:
    """p50, p90, p99, p99.9 and max of durations, in microseconds."""
    us = durations_ns / 1000.0
    p50, p90, p99, p999 = np.percentile(us, [50, 90, 99, 99.9])
    return {
        "p50_us": float(p50),
        "p90_us": float(p90),
        "p99_us": float(p99),
        "p999_us": float(p999),
        "max_us": float(us.max()),
        "calls": len(us),
    }


# --- the agent --------------------------------------------------------------------------------


class AgentChild:
    """``mlsidecar run`` on free loopback ports; ``target`` is its gRPC ingest address."""

    def __init__(self) -> None:
        command = [
            str(Path(sys.executable).parent / "mlsidecar"),
            "run",
            "--ingest-listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "MLSIDECAR_"))}
        env["MLSIDECAR_STORE__DATA_DIR"] = str(
            Path("/tmp") / f"mlsidecar-bench-client-{os.getpid()}"
        )
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.target = ""
        self.api = ""
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 60
        for line in self.proc.stderr:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("message") == "mlsidecar started":
                self.target, self.api = entry["ingest"], entry["api"]
                break
            if time.monotonic() > deadline:
                break
        if not self.target:
            self.close()
            raise RuntimeError("the agent did not start")

    def rows(self, model: str) -> int:
        import urllib.request

        with urllib.request.urlopen(f"http://{self.api}/v1/models/{model}/health", timeout=10) as r:
            return int(json.load(r)["totals"]["rows"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# --- phases -----------------------------------------------------------------------------------


def feature_rows(n: int, features: int, seed: int = 1) -> list[dict[str, float]]:
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(n, features))
    names = [f"f{j}" for j in range(features)]
    return [dict(zip(names, row.tolist(), strict=True)) for row in values]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def call_overhead(
    target: str,
    model: str,
    rate: float,
    seconds: float,
    features: int,
    in_span: bool,
    max_buffer: int = 100_000,
) -> dict[str, Any]:
    rows = feature_rows(1024, features)
    client = SidecarClient(target, model=model, max_buffer=max_buffer)
    span_cm: Any = None
    if in_span:
        from opentelemetry.sdk.trace import TracerProvider

        span_cm = TracerProvider().get_tracer("bench").start_as_current_span("predict")
        span_cm.__enter__()
    try:
        # warm-up: the first batches, connections and allocations
        paced_call_latencies(
            lambda i: client.log_prediction(f"w{i}", rows[i & 1023], score=0.5), rate, 0.3
        )
        gc.collect()
        durations = paced_call_latencies(
            lambda i: client.log_prediction(f"c{i}", rows[i & 1023], score=0.5, latency_ms=3.0),
            rate,
            seconds,
        )
    finally:
        if span_cm is not None:
            span_cm.__exit__(None, None, None)
    flushed = client.flush(30 if max_buffer == 100_000 else 0.1)
    stats = client.stats()
    client.close(5 if flushed else 0.1)
    result = percentiles_us(durations)
    result.update(
        rate=rate,
        features=features,
        in_span=in_span,
        flushed=flushed,
        sent=stats.sent_predictions,
        dropped=stats.dropped_total,
        batches=stats.sent_batches,
        breaker=stats.breaker_state,
    )
    return result


def throughput(target: str, model: str, events: int, features: int) -> dict[str, Any]:
    rows = feature_rows(1024, features)
    client = SidecarClient(target, model=model, max_buffer=events + 1, batch_rows=2000)
    started = time.perf_counter()
    for i in range(events):
        client.log_prediction(f"t{i}", rows[i & 1023], score=0.5)
    enqueued = time.perf_counter() - started
    flushed = client.flush(120)
    elapsed = time.perf_counter() - started
    stats = client.stats()
    client.close(5)
    return {
        "events": events,
        "features": features,
        "enqueue_per_s": events / enqueued,
        "delivered_per_s": stats.sent_predictions / elapsed,
        "seconds": elapsed,
        "sent": stats.sent_predictions,
        "dropped": stats.dropped_total,
        "batches": stats.sent_batches,
        "flushed": flushed,
    }


def batch_form(target: str, model: str, events: int, features: int) -> dict[str, Any]:
    rng = np.random.default_rng(2)
    rows = 1000
    columns = {f"f{j}": rng.normal(size=rows) for j in range(features)}
    scores = rng.random(rows)
    client = SidecarClient(target, model=model, max_buffer=events + rows)
    started = time.perf_counter()
    for b in range(events // rows):
        ids = [f"b{b}-{i}" for i in range(rows)]
        client.log_predictions(ids, columns, scores=scores)
    flushed = client.flush(120)
    elapsed = time.perf_counter() - started
    stats = client.stats()
    client.close(5)
    return {
        "events": (events // rows) * rows,
        "delivered_per_s": stats.sent_predictions / elapsed,
        "sent": stats.sent_predictions,
        "dropped": stats.dropped_total,
        "flushed": flushed,
    }


# --- report -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=5000.0, help="calls/s (default 5000)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per paced phase")
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--events", type=int, default=200_000, help="throughput phases")
    parser.add_argument("--quick", action="store_true", help="1 s phases, 20 k events")
    parser.add_argument("--agent-target", help="use a running agent (rows not verified)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.events = 1.0, 20_000
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    agent = None if args.agent_target else AgentChild()
    target = args.agent_target or (agent.target if agent else "")
    print(
        f"client bench: {platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, agent {target}"
    )
    try:
        calls = call_overhead(target, MODEL, args.rate, args.seconds, args.features, False)
        span = call_overhead(target, MODEL + "-span", args.rate, args.seconds, args.features, True)
        down = call_overhead(
            f"127.0.0.1:{free_port()}",
            MODEL + "-down",
            args.rate,
            args.seconds,
            args.features,
            False,
            max_buffer=2_000,
        )
        through = throughput(target, MODEL + "-tp", args.events, args.features)
        batched = batch_form(target, MODEL + "-batch", args.events, args.features)
        verified = None
        if agent is not None:
            verified = (
                agent.rows(MODEL) == calls["sent"]
                and agent.rows(MODEL + "-tp") == (through["sent"])
            )
    finally:
        if agent is not None:
            agent.close()

    print()
    print(f"log_prediction at {args.rate:,.0f} calls/s, {args.features}-feature dict, sender on:")
    print(
        f"{'case':<14} {'calls':>8} {'p50 µs':>8} {'p90 µs':>8} {'p99 µs':>8} {'p99.9 µs':>9} {'max µs':>9}"
    )
    for name, r in (("plain", calls), ("in OTel span", span), ("agent down", down)):
        print(
            f"{name:<14} {r['calls']:>8,} {r['p50_us']:>8.1f} {r['p90_us']:>8.1f} "
            f"{r['p99_us']:>8.1f} {r['p999_us']:>9.1f} {r['max_us']:>9.1f}"
        )
    meets = calls["p50_us"] < TARGET_P50_US and calls["p99_us"] < TARGET_P99_US
    print(
        f"agent down: breaker {down['breaker']}, {down['dropped']:,} dropped (counted), "
        f"{down['sent']} sent; the caller's worst call {down['max_us']:.0f} µs"
    )
    print(
        f"target p50 < {TARGET_P50_US:.0f} µs, p99 < {TARGET_P99_US:.0f} µs: "
        f"{'met' if meets else 'NOT met'}"
    )
    print()
    print(
        f"throughput (one thread, {args.features} features): enqueue "
        f"{through['enqueue_per_s']:,.0f} calls/s; delivered {through['delivered_per_s']:,.0f} "
        f"events/s ({through['sent']:,} sent, {through['dropped']:,} dropped, "
        f"{through['batches']} batches)"
    )
    print(
        f"batch form (log_predictions, 1000 rows x {args.features}): delivered "
        f"{batched['delivered_per_s']:,.0f} events/s ({batched['sent']:,} sent)"
    )
    if verified is not None:
        print(f"agent's own row count matches what the client sent: {'yes' if verified else 'NO'}")
    summary = {
        "bench": "client",
        "call": calls,
        "call_in_span": span,
        "call_agent_down": down,
        "throughput": through,
        "batch_form": batched,
        "meets_call_target": meets,
        "verified": verified,
        "load": os.getloadavg()[0],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
