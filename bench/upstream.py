"""Egress proxy overhead and breaker concurrency. Prints figures (it is not a test).

    .venv/bin/python bench/upstream.py              # ~30 s
    .venv/bin/python bench/upstream.py --quick      # ~8 s, a smoke check

Phases (the upstream, the proxy and the client are three processes):
    latency     one request at a time, alternating direct and through the proxy
                (/upstream/<name>/...): p50 and p99 of each, and the latency the proxy adds
    throughput  --concurrency keep-alive connections for --seconds: requests/s direct and
                through the proxy, in the same run
    breaker     64 concurrent calls through one closed AsyncBreaker to an upstream that
                answers in 100 ms: wall time (pybreaker's call() would take 64 x 100 ms)

The proxy runs the real EgressProxy with the default policy (breaker on, retries on).
The last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BODY = b'{"features": [1.0, 2.0, 3.0], "user": 42}'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the upstream: asyncio HTTP/1.1, answers 256 bytes, /slow waits 100 ms -----------------


async def serve_upstream(port: int) -> None:
    payload = b"x" * 256

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                if b" /slow" in head.split(b"\r\n", 1)[0]:
                    await asyncio.sleep(0.1)
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                    b"content-length: 256\r\n\r\n" + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


async def serve_proxy(port: int, upstream_port: int) -> None:
    from agent.config import UpstreamSettings
    from agent.upstream import EgressProxy, Upstreams

    settings = UpstreamSettings(
        listen=f"127.0.0.1:{port}",
        targets={"model": {"url": f"http://127.0.0.1:{upstream_port}"}},  # type: ignore[dict-item]
    )
    proxy = EgressProxy(settings, Upstreams.from_settings(settings))
    await proxy.start()
    await asyncio.Event().wait()


def wait_for(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server on {port} exited {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"server on {port} did not start")


# -- the client ----------------------------------------------------------------------------


def one(conn: http.client.HTTPConnection, path: str) -> float:
    started = time.perf_counter()
    conn.request("POST", path, body=BODY, headers={"content-type": "application/json"})
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        raise SystemExit(f"{path}: status {response.status}")
    return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def latency(upstream: int, proxy: int, requests: int) -> dict[str, float]:
    direct = http.client.HTTPConnection("127.0.0.1", upstream)
    proxied = http.client.HTTPConnection("127.0.0.1", proxy)
    for _ in range(200):  # warm-up
        one(direct, "/predict")
        one(proxied, "/upstream/model/predict")
    d: list[float] = []
    p: list[float] = []
    for _ in range(requests):
        d.append(one(direct, "/predict"))
        p.append(one(proxied, "/upstream/model/predict"))
    ms = 1000.0
    result = {
        "direct_p50_ms": percentile(d, 0.5) * ms,
        "direct_p99_ms": percentile(d, 0.99) * ms,
        "proxy_p50_ms": percentile(p, 0.5) * ms,
        "proxy_p99_ms": percentile(p, 0.99) * ms,
    }
    result["added_p50_ms"] = result["proxy_p50_ms"] - result["direct_p50_ms"]
    result["added_p99_ms"] = result["proxy_p99_ms"] - result["direct_p99_ms"]
    return result


def throughput(port: int, path: str, concurrency: int, seconds: float) -> float:
    counts = [0] * concurrency
    stop = time.perf_counter() + seconds

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port)
        while time.perf_counter() < stop:
            one(conn, path)
            counts[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def breaker_concurrency(upstream: int) -> dict[str, float]:
    import httpx

    from agent.config import BreakerPolicy
    from agent.upstream import build_breaker

    async def run() -> dict[str, float]:
        guard = build_breaker("bench", BreakerPolicy())
        url = f"http://127.0.0.1:{upstream}/slow"
        started = time.perf_counter()
        await asyncio.gather(*(guard.call(asyncio.sleep, 0.1) for _ in range(64)))
        alone = time.perf_counter() - started
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits) as http_client:
            started = time.perf_counter()
            await asyncio.gather(*(http_client.get(url) for _ in range(64)))
            direct = time.perf_counter() - started
            started = time.perf_counter()
            await asyncio.gather(*(guard.call(http_client.get, url) for _ in range(64)))
            guarded = time.perf_counter() - started
        return {
            "adapter_alone_ms": alone * 1000,
            "http_direct_ms": direct * 1000,
            "http_through_breaker_ms": guarded * 1000,
        }

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-proxy", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        asyncio.run(serve_upstream(args.serve_upstream))
        return
    if args.serve_proxy:
        asyncio.run(serve_proxy(*args.serve_proxy))
        return
    if args.quick:
        args.requests, args.seconds = 500, 1.5

    upstream_port, proxy_port = free_port(), free_port()
    me = [sys.executable, __file__]
    procs = [
        subprocess.Popen([*me, "--serve-upstream", str(upstream_port)]),
        subprocess.Popen([*me, "--serve-proxy", str(proxy_port), str(upstream_port)]),
    ]
    try:
        wait_for(upstream_port, procs[0])
        wait_for(proxy_port, procs[1])
        print(f"python {platform.python_version()}, {os.cpu_count()} cores; 3 processes")
        lat = latency(upstream_port, proxy_port, args.requests)
        print(f"\nlatency, one request at a time, {args.requests} each (ms):")
        print(f"  {'':8} {'p50':>8} {'p99':>8}")
        print(f"  {'direct':8} {lat['direct_p50_ms']:8.3f} {lat['direct_p99_ms']:8.3f}")
        print(f"  {'proxy':8} {lat['proxy_p50_ms']:8.3f} {lat['proxy_p99_ms']:8.3f}")
        print(f"  {'added':8} {lat['added_p50_ms']:8.3f} {lat['added_p99_ms']:8.3f}")
        direct_rps = throughput(upstream_port, "/predict", args.concurrency, args.seconds)
        proxy_rps = throughput(
            proxy_port, "/upstream/model/predict", args.concurrency, args.seconds
        )
        print(f"\nthroughput, {args.concurrency} connections, {args.seconds:g} s each:")
        print(f"  direct {direct_rps:10,.0f} requests/s")
        print(f"  proxy  {proxy_rps:10,.0f} requests/s")
        brk = breaker_concurrency(upstream_port)
        print("\nbreaker: 64 concurrent calls, 100 ms each, one closed breaker:")
        print(f"  adapter alone (asyncio.sleep)   {brk['adapter_alone_ms']:7.0f} ms")
        print(f"  HTTP direct (no breaker)        {brk['http_direct_ms']:7.0f} ms")
        print(f"  HTTP through the breaker        {brk['http_through_breaker_ms']:7.0f} ms")
        print("  (pybreaker's call() serialises: 64 x 100 ms = 6400 ms)")
        summary: dict[str, Any] = {
            "bench": "upstream",
            "latency": {k: round(v, 3) for k, v in lat.items()},
            "throughput_rps": {"direct": round(direct_rps), "proxy": round(proxy_rps)},
            "breaker_64x100ms": {k: round(v, 1) for k, v in brk.items()},
        }
        print(json.dumps(summary))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
