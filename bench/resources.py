"""What one resource collection costs: milliseconds per scrape, median of N.

Prints figures (it is not a test). A real "model service" child (Python, 64 MiB, asleep)
is found by its command line; the cgroup is this machine's when it is cgroup v2, else a
fabricated v2 tree in a temporary directory (said in the output: the files are then
read from tmpfs or disk like the real ones, but their values are invented).

    .venv/bin/python bench/resources.py              # N=200 per case, ~30 s
    .venv/bin/python bench/resources.py --n 50

Cases (each a full ``MetricReader.collect`` through an InMemoryMetricReader, so the SDK's
own aggregation is included, unless said otherwise):
    sample only        ResourceMonitor.sample(): reading /proc for both processes + cgroup
    full, no host      own + model + cgroup + filesystem instruments
    full               + the instrumentor's system.* host metrics (the default)
    full + sockets     + system.network.connections (psutil.net_connections; off by default)
    discovery          one look for the model by cmdline pattern (walks /proc; every
                       discovery_interval_s, in a thread, only while the model is missing)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from agent.config import ResourcesSettings
from agent.resources import ResourceMonitor
from agent.resources.discovery import ModelProcess

MAX_AGE_S = 0.05  # one sample per collection; the bench waits it out between collections
CHILD = 'import time\nb = b"x" * (64 << 20)\nprint("ready", flush=True)\ntime.sleep(3600)'


def fabricated_cgroup(directory: Path) -> Path:
    files = {
        "cgroup.controllers": "cpuset cpu io memory pids",
        "memory.current": str(300 << 20),
        "memory.max": str(512 << 20),
        "cpu.max": "50000 100000",
        "cpu.stat": "usage_usec 123456789\nuser_usec 100000000\nsystem_usec 23456789\n"
        "nr_periods 1000\nnr_throttled 12\nthrottled_usec 345678\n",
    }
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def timed(run: Callable[[], Any], n: int, pause_s: float) -> dict[str, float]:
    run()  # warm: imports, first /proc reads, first CPU baseline
    times = []
    for _ in range(n):
        time.sleep(pause_s)
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p90_ms": times[int(len(times) * 0.9) - 1],
        "min_ms": times[0],
    }


def monitor(settings: ResourcesSettings) -> tuple[ResourceMonitor, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    resource_monitor = ResourceMonitor(
        settings, MeterProvider(metric_readers=[reader]), max_age_s=MAX_AGE_S
    )
    assert resource_monitor.model is not None
    assert resource_monitor.model.discover() is not None, "the model child was not found"
    return resource_monitor, reader


def points(reader: InMemoryMetricReader) -> int:
    data = reader.get_metrics_data()
    assert data is not None
    return sum(
        len(metric.data.data_points)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="collections per case")
    args = parser.parse_args()

    marker = f"--bench-model-{uuid.uuid4().hex}"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, marker], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    real_root = Path("/sys/fs/cgroup")
    with tempfile.TemporaryDirectory(prefix="mlsidecar-bench-cgroup-") as tmp:
        if (real_root / "cgroup.controllers").is_file():
            cgroup_root, cgroup_note = real_root, f"this machine's cgroup v2 ({real_root})"
        else:
            cgroup_root = fabricated_cgroup(Path(tmp))
            cgroup_note = f"FABRICATED v2 files in {tmp} (this machine has no cgroup v2)"
        base = {
            "cgroup_root": str(cgroup_root),
            "model": {"cmdline": marker, "memory_limit_bytes": 1 << 30, "cpu_limit_cores": 1},
        }
        try:
            results: dict[str, dict[str, float]] = {}
            pointsof: dict[str, int] = {}
            sampler, _ = monitor(ResourcesSettings(**base, host=False))
            results["sample only"] = timed(lambda: sampler.sample(fresh=True), args.n, 0)
            for case, extra in (
                ("full, no host", {"host": False}),
                ("full", {}),
                ("full + sockets", {"network_connections": True}),
            ):
                _, reader = monitor(ResourcesSettings(**base, **extra))
                pointsof[case] = points(reader)
                results[case] = timed(reader.collect, args.n, MAX_AGE_S * 1.2)
            finder = ModelProcess(ResourcesSettings(**base).model, own_pid=os.getpid())
            results["discovery"] = timed(finder.find, max(args.n // 4, 10), 0)
        finally:
            child.kill()
            child.wait()

    processes = len(psutil.pids())
    print(
        f"resources bench: {platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"
    )
    print(f"cgroup: {cgroup_note}; model: a 64 MiB Python child; {processes} processes in /proc")
    print(f"{'case':<16} {'points':>7} {'median ms':>10} {'p90 ms':>8} {'min ms':>8}")
    for case, figures in results.items():
        shown = str(pointsof.get(case, "-"))
        print(
            f"{case:<16} {shown:>7} {figures['median_ms']:>10.2f} "
            f"{figures['p90_ms']:>8.2f} {figures['min_ms']:>8.2f}"
        )
    print(
        json.dumps(
            {
                "bench": "resources",
                "n": args.n,
                "cpus": os.cpu_count(),
                "processes": processes,
                "cgroup": "real" if cgroup_root == real_root else "fabricated",
                "points": pointsof,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
