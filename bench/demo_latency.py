"""The demo model service's request latency with and without the SDK. Prints figures.

    .venv/bin/python bench/demo_latency.py             # ~1 min
    .venv/bin/python bench/demo_latency.py --quick     # ~15 s, a smoke check

Four processes besides this one: a real agent (`mlsidecar run`) and three demo model
services (`mlsidecar demo-model`): "sdk" logs every request's predictions through the SDK
after the response is sent (as the demo does), "sdk-inline" logs them before responding
(--log-inline), "no-sdk" logs nothing (--no-sdk). All compute their features locally
(no feature store) unless --feature-store, so the only difference is the SDK. This
process sends POST /predict requests of --rows transactions, one at a time, in rounds
that rotate A B C C B A ... (interleaved, same run), and prints p50/p99 per mode, the
differences, the run-to-run spread (of the per-round p50s within one mode) and each
service's CPU time per request (the SDK's whole cost, sender thread included). Target
(issue 5): "sdk" - "no-sdk" < 5 % and within the spread. The last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MLSIDECAR = str(Path(sys.executable).parent / "mlsidecar")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(
    args: list[str], env: dict[str, str], cpus: set[int] | None = None
) -> subprocess.Popen[str]:
    """``mlsidecar ARGS``; ``cpus`` pins it (and every thread it starts) to those CPUs."""
    return subprocess.Popen(
        [MLSIDECAR, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
        preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
    )


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"nothing answered at {url} within {timeout:g}s")


def payload(rng: np.random.Generator, rows: int, counter: list[int]) -> dict[str, Any]:
    instances = []
    for _ in range(rows):
        counter[0] += 1
        instances.append(
            {
                "id": f"b-{counter[0]}",
                "amount": float(rng.lognormal(3.5, 0.8)),
                "hour": int(rng.integers(0, 24)),
                "merchant": ["grocery", "travel", "electronics", "fuel", "online"][
                    int(rng.integers(0, 5))
                ],
                "user_id": int(rng.integers(0, 5000)),
            }
        )
    return {"instances": instances}


def round_latencies(
    client: httpx.Client, url: str, requests: int, rows: int, rng: np.random.Generator,
    counter: list[int],
) -> np.ndarray:  # fmt: skip
    out = np.empty(requests)
    bodies = [payload(rng, rows, counter) for _ in range(requests)]
    for i, body in enumerate(bodies):
        started = time.perf_counter()
        response = client.post(url, json=body)
        out[i] = (time.perf_counter() - started) * 1000.0
        if response.status_code != 200:
            raise SystemExit(f"{url}: {response.status_code} {response.text[:200]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="rounds per mode (default 8)")
    parser.add_argument("--requests", type=int, default=300, help="requests per round")
    parser.add_argument("--rows", type=int, default=20, help="transactions per request")
    parser.add_argument("--warmup", type=int, default=200, help="requests before measuring")
    parser.add_argument("--quick", action="store_true", help="4 rounds of 100 requests")
    parser.add_argument(
        "--feature-store",
        action="store_true",
        help="fetch features from the demo feature store through the agent's egress proxy, "
        "as in `mlsidecar demo` (default: computed locally, the SDK is the only extra work)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="Linux, 2+ CPUs: both model services on CPU 0, the agent and this load generator "
        "on the others, so the agent's ingest work does not take the model's CPU (as when the "
        "sidecar has its own CPU request); the SDK's in-process cost is what remains",
    )
    args = parser.parse_args()
    model_cpus: set[int] | None = None
    other_cpus: set[int] | None = None
    if args.pin:
        available = sorted(os.sched_getaffinity(0))
        if len(available) < 2:
            raise SystemExit("--pin needs at least 2 CPUs")
        model_cpus, other_cpus = {available[0]}, set(available[1:])
        os.sched_setaffinity(0, other_cpus)
    if args.quick:
        args.rounds, args.requests, args.warmup = 4, 100, 50

    data_dir = tempfile.mkdtemp(prefix="mlsidecar-bench-demo-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "MLSIDECAR_"))}
    env.update(MLSIDECAR_STORE__DATA_DIR=data_dir, MLSIDECAR_TELEMETRY__OTLP="false")
    env["MLSIDECAR_LOGGING__LEVEL"] = "WARNING"
    ingest, api = free_port(), free_port()
    flags = {"sdk": [], "sdk-inline": ["--log-inline"], "no-sdk": ["--no-sdk"]}
    ports = {mode: free_port() for mode in flags}
    procs: list[subprocess.Popen[str]] = []
    agent_args = [
        "run",
        "--ingest-listen",
        f"127.0.0.1:{ingest}",
        "--api-listen",
        f"127.0.0.1:{api}",
    ]
    store_url: str | None = None
    if args.feature_store:  # as in `mlsidecar demo`: the store behind the agent's egress proxy
        store_port, proxy_port = free_port(), free_port()
        procs.append(
            start(["demo-feature-store", "--listen", f"127.0.0.1:{store_port}"], env, other_cpus)
        )
        config = Path(data_dir) / "agent.yaml"
        config.write_text(
            json.dumps(
                {"upstream": {"listen": f"127.0.0.1:{proxy_port}",
                              "targets": {"features": {"url": f"http://127.0.0.1:{store_port}"}}}}
            )
        )  # fmt: skip
        agent_args += ["--config", str(config)]
        store_url = f"http://127.0.0.1:{proxy_port}/upstream/features"
        wait_http(f"http://127.0.0.1:{store_port}/admin/status")
    procs.append(start(agent_args, env, other_cpus))
    wait_http(f"http://127.0.0.1:{api}/readyz")
    for mode, port in ports.items():
        model_args = [
            "demo-model",
            "--listen",
            f"127.0.0.1:{port}",
            "--sidecar",
            f"127.0.0.1:{ingest}",
        ]
        if store_url is not None:
            model_args += ["--feature-store-url", store_url]
        procs.append(start(model_args + flags[mode], env, model_cpus))
    try:
        for port in ports.values():
            wait_http(f"http://127.0.0.1:{port}/healthz")
        rng = np.random.default_rng(5)
        counter = [0]
        samples: dict[str, list[np.ndarray]] = {mode: [] for mode in flags}
        cpu: dict[str, float] = {}
        with httpx.Client(timeout=10.0, trust_env=False) as client:
            for port in ports.values():  # warm all (imports, caches, connection pools)
                round_latencies(client, f"http://127.0.0.1:{port}/predict", args.warmup,
                                args.rows, rng, counter)  # fmt: skip
            for mode, port in ports.items():
                cpu[mode] = -client.get(f"http://127.0.0.1:{port}/stats").json()["cpu_seconds"]
            modes = list(flags)
            order = modes + modes[::-1]  # A B C C B A: drift in load hits all alike
            for r in range(args.rounds * len(modes)):
                mode = order[r % len(order)]
                url = f"http://127.0.0.1:{ports[mode]}/predict"
                samples[mode].append(
                    round_latencies(client, url, args.requests, args.rows, rng, counter)
                )
            for mode, port in ports.items():
                cpu[mode] += client.get(f"http://127.0.0.1:{port}/stats").json()["cpu_seconds"]
        # The SDK sends its last rows on its flush timer (1 s): wait until the agent has
        # counted everything the SDKs say they sent, or 15 s.
        deadline = time.monotonic() + 15.0
        while True:
            stats = {
                mode: httpx.get(f"http://127.0.0.1:{ports[mode]}/stats").json()["sdk"]
                for mode in ("sdk", "sdk-inline")
            }
            report = httpx.get(f"http://127.0.0.1:{api}/v1/models/fraud-scorer/health").json()
            sent = sum(s["sent_predictions"] for s in stats.values())
            settled = all(s["buffered"] == 0 and s["sent_predictions"] > 0 for s in stats.values())
            if settled and report["totals"]["rows"] >= sent:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait(30)

    summary: dict[str, Any] = {"rows_per_request": args.rows, "requests_per_round": args.requests}
    summary["features"] = "feature store via the egress proxy" if store_url else "local"
    summary["pinned"] = args.pin
    print(f"demo model service (features: {summary['features']}), POST /predict of {args.rows} transactions, one at a time; "
          f"{args.rounds} rounds x {args.requests} requests per mode, interleaved ABCCBA"
          f"{'; models pinned to CPU 0, agent and load elsewhere' if args.pin else ''}")  # fmt: skip
    print(
        f"{'mode':<10} {'p50 ms':>8} {'p99 ms':>8} {'round p50 min..max':>20} {'spread':>8} {'CPU/req':>9}"
    )
    for mode, rounds in samples.items():
        everything = np.concatenate(rounds)
        p50s = np.array([np.percentile(r, 50) for r in rounds])
        spread = (p50s.max() - p50s.min()) / np.median(p50s) * 100
        summary[mode] = {
            "p50_ms": round(float(np.percentile(everything, 50)), 3),
            "p99_ms": round(float(np.percentile(everything, 99)), 3),
            "round_p50_min_ms": round(float(p50s.min()), 3),
            "round_p50_max_ms": round(float(p50s.max()), 3),
            "spread_pct": round(float(spread), 1),
            "cpu_us_per_request": round(cpu[mode] / (args.rounds * args.requests) * 1e6, 1),
        }
        s = summary[mode]
        print(f"{mode:<10} {s['p50_ms']:8.3f} {s['p99_ms']:8.3f} "
              f"{s['round_p50_min_ms']:9.3f}..{s['round_p50_max_ms']:<9.3f} "
              f"{s['spread_pct']:7.1f}% {s['cpu_us_per_request']:6.0f} µs")  # fmt: skip
    base = summary["no-sdk"]
    for mode in ("sdk", "sdk-inline"):
        diff50 = (summary[mode]["p50_ms"] / base["p50_ms"] - 1) * 100
        diff99 = (summary[mode]["p99_ms"] / base["p99_ms"] - 1) * 100
        spread = max(summary[mode]["spread_pct"], base["spread_pct"])
        summary[mode].update(
            diff_p50_pct=round(diff50, 1),
            diff_p99_pct=round(diff99, 1),
            within_spread=abs(diff50) <= spread,
            cpu_us_over_no_sdk=round(
                summary[mode]["cpu_us_per_request"] - base["cpu_us_per_request"], 1
            ),
        )
        print(f"{mode} - no-sdk: p50 {diff50:+.1f} %, p99 {diff99:+.1f} %; run-to-run spread "
              f"of round p50s up to {spread:.1f} % -> "
              f"{'within' if abs(diff50) <= spread else 'OUTSIDE'} the spread; CPU "
              f"{summary[mode]['cpu_us_over_no_sdk']:+.0f} µs per request")  # fmt: skip
    sdk = summary["sdk"]
    summary.update(
        within_spread=sdk["within_spread"],
        meets_target=abs(sdk["diff_p50_pct"]) < 5 and sdk["within_spread"],
        sdk_sent_predictions=sum(s["sent_predictions"] for s in stats.values()),
        sdk_dropped={mode: s["dropped"] for mode, s in stats.items() if s["dropped"]},
        agent_rows=report["totals"]["rows"],
        cpus=os.cpu_count(),
        load_1m=round(os.getloadavg()[0], 2),
        python=platform.python_version(),
    )
    print(f"target (sdk, as the demo logs: < 5 % and within the spread) "
          f"{'met' if summary['meets_target'] else 'NOT met'}")  # fmt: skip
    print(f"the SDKs sent {summary['sdk_sent_predictions']} predictions (dropped: "
          f"{summary['sdk_dropped'] or 'none'}); the agent counted {summary['agent_rows']}; "
          f"load average {summary['load_1m']} on {summary['cpus']} CPUs")  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
