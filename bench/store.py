"""Pending-store throughput: puts (group commit vs one commit per batch), joins, size.

Prints figures (it is not a test). Every phase uses a fresh SQLite file in a temporary
directory (``--dir`` to choose the disk) and batches built before the clock starts:
1000 rows of a uuid id, timestamp, score, label, 2-class probabilities, trace and span
id, plus one segment attribute — everything a prediction keeps for its outcome.

    .venv/bin/python bench/store.py                  # all phases, ~1-2 min
    .venv/bin/python bench/store.py --quick          # smaller counts, ~20 s (puts stay
                                                     # below a WAL checkpoint: flattering)
    .venv/bin/python bench/store.py --phases put,join --synchronous NORMAL,FULL
    .venv/bin/python bench/store.py --backend redis  # the Redis store, on a redis-server
                                                     # the bench starts (and flushes) itself

Phases:
    put      rows/s of 1000-row puts from --concurrency threads through the writer thread:
             one commit per batch (max_group=1) vs group commit, for each synchronous mode;
             plus one thread calling the store directly (no writer thread)
    join     joins/s of 1000-id takes: outcomes in prediction order, and scattered at
             random over 100 and 1000 pending batches
    size     file bytes and index bytes per million pending rows; reopen (index rebuild);
             with Redis: the server's used_memory per million pending rows
    churn    steady state at max_pending: every put evicts the oldest batch
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.store import (  # noqa: E402
    GroupCommitPendingPredictions,
    PendingBatch,
    SqlitePendingPredictions,
)
from agent.store.redis import RedisPendingPredictions  # noqa: E402

MODEL = "bench"
PHASES = ("put", "join", "size", "churn")
GROUPS = (("per-batch commit", 1), ("group commit", 1024))


def redis_memory(args: argparse.Namespace) -> int:
    """The bench Redis's used_memory (0 for SQLite)."""
    if args.backend != "redis":
        return 0
    return int(redis.Redis.from_url(args.redis_url).info("memory")["used_memory"])


def make_batches(count: int, rows: int, seed: int, start: int = 0) -> list[PendingBatch]:
    rng = np.random.default_rng(seed)
    batches = []
    for k in range(start, start + count):
        scores = rng.random(rows)
        batches.append(
            PendingBatch(
                MODEL,
                "v1",
                ids=[str(uuid.UUID(int=int(x))) for x in rng.integers(0, 2**63, rows)],
                received_unix_nano=1_700_000_000_000_000_000 + k,
                timestamps_unix_nano=np.full(rows, 1_700_000_000_000_000_000 + k, np.int64),
                scores=scores,
                labels=["fraud" if s > 0.5 else "legit" for s in scores],
                probabilities=np.column_stack([scores, 1 - scores]),
                class_names=("fraud", "legit"),
                trace_ids=[rng.bytes(16) for _ in range(rows)],
                span_ids=[rng.bytes(8) for _ in range(rows)],
                attributes={"region": "eu-west"},
            )
        )
    return batches


@contextmanager
def fresh_dir(base: str | None) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mlsidecar-bench-store-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def redis_server(base: str | None) -> Iterator[str]:
    """A throwaway redis-server (no persistence) on a free loopback port; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("--backend redis needs redis-server: run `make system-deps`")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with fresh_dir(base) as directory:
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
        proc = subprocess.Popen(
            [*command, "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
        )
        url = f"redis://127.0.0.1:{port}/0"
        try:
            client = redis.Redis.from_url(url)
            for _ in range(500):
                try:
                    client.ping()
                    break
                except redis.exceptions.ConnectionError:
                    time.sleep(0.02)
            yield url
        finally:
            proc.terminate()
            proc.wait(10)


def open_store(args: argparse.Namespace, directory: Path, **options: Any) -> Any:
    """An empty store of ``--backend``: a SQLite file in ``directory``, or the bench's Redis
    (flushed first)."""
    if args.backend == "redis":
        options.pop("synchronous", None)
        redis.Redis.from_url(args.redis_url).flushdb()
        return RedisPendingPredictions(args.redis_url, **options)
    return SqlitePendingPredictions(directory / "pending.db", **options)


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def report(results: list[dict[str, Any]], **row: Any) -> None:
    results.append(row)
    figures = "  ".join(
        f"{key}={value:,.1f}"
        if isinstance(value, float) and value < 100
        else f"{key}={value:,.0f}"
        if isinstance(value, float | int)
        else f"{key}={value}"
        for key, value in row.items()
        if key != "phase"
    )
    print(f"  {row['phase']:<6} {figures}", flush=True)


def phase_put(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    batches = make_batches(args.batches, args.rows, seed=1)
    rows = args.batches * args.rows
    redis_backend = args.backend == "redis"
    # Redis: one script per call, whatever the group; "synchronous" is the server's business.
    groups = (("writer thread", 1024),) if redis_backend else GROUPS
    for synchronous in ["-"] if redis_backend else args.synchronous:
        for label, group in groups:
            with fresh_dir(args.dir) as directory:
                store = open_store(args, directory, synchronous=synchronous, max_pending=10**9)
                writer = GroupCommitPendingPredictions(store, max_group=group)
                latencies: list[float] = []

                def put(batch: PendingBatch, writer: Any = writer, out: Any = latencies) -> None:
                    started = time.perf_counter()
                    writer.put(batch)
                    out.append(time.perf_counter() - started)

                with ThreadPoolExecutor(args.concurrency) as pool:

                    def run(pool: ThreadPoolExecutor = pool) -> None:
                        list(pool.map(put, batches))

                    wall, cpu = timed(run)
                writer.close()
                p50, p99 = np.percentile(latencies, [50, 99]) * 1e3
            report(
                results,
                phase="put",
                mode=f"{label} ({synchronous}, {args.concurrency} threads)",
                rows_per_s=rows / wall,
                batches_per_s=args.batches / wall,
                commits=writer.commits,
                cpu_us_per_1000_rows=cpu / rows * 1e9,
                ack_ms_p50=round(float(p50), 1),
                ack_ms_p99=round(float(p99), 1),
                ack_ms_max=round(max(latencies) * 1e3, 1),
            )
        with fresh_dir(args.dir) as directory:
            store = open_store(args, directory, synchronous=synchronous, max_pending=10**9)

            def direct(store: Any = store) -> None:
                for batch in batches:
                    store.put(batch)

            wall, cpu = timed(direct)
            store.close()
        report(
            results,
            phase="put",
            mode=f"direct, one thread ({synchronous})",
            rows_per_s=rows / wall,
            batches_per_s=args.batches / wall,
            commits=args.batches,
            cpu_us_per_1000_rows=cpu / rows * 1e9,
        )


def phase_join(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    for spread in ("in order", *args.scatter):
        pending = args.batches if spread == "in order" else int(spread)
        batches = make_batches(pending, args.rows, seed=2)
        with fresh_dir(args.dir) as directory:
            store = open_store(args, directory, max_pending=10**9)
            for batch in batches:
                store.put(batch)
            if args.backend == "sqlite":
                store.checkpoint()  # the puts' WAL is theirs to pay for, not the joins'
            if spread == "in order":
                takes = [list(batch.ids) for batch in batches]
            else:
                ids = [i for batch in batches for i in batch.ids]
                np.random.default_rng(3).shuffle(ids)
                # Join at most --batches outcome batches: enough for a stable rate.
                ids = ids[: args.batches * args.rows]
                takes = [ids[i : i + args.rows] for i in range(0, len(ids), args.rows)]
            joined = 0

            def run(store: Any = store, takes: list[list[str]] = takes) -> None:
                nonlocal joined
                for ids in takes:
                    joined += store.take(MODEL, ids).joined

            wall, cpu = timed(run)
            store.close()
        assert joined == sum(map(len, takes)), "a take missed pending predictions"
        label = spread if spread == "in order" else f"scattered over {pending} batches"
        report(
            results,
            phase="join",
            mode=f"{args.rows}-id takes, {label}",
            joins_per_s=joined / wall,
            takes_per_s=len(takes) / wall,
            cpu_us_per_1000_joins=cpu / joined * 1e9,
        )


def phase_size(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    total = args.pending
    chunk = 100
    with fresh_dir(args.dir) as directory:
        path = directory / "pending.db"
        store = open_store(args, directory, max_pending=10**9)
        before = redis_memory(args)
        for start in range(0, total // args.rows, chunk):
            count = min(chunk, total // args.rows - start)
            for batch in make_batches(count, args.rows, seed=start, start=start):
                store.put(batch)
        stats = store.stats()
        store.close()  # checkpoints the WAL into the file
        # Redis: the memory the server grew by; SQLite: the file.
        redis_backend = args.backend == "redis"
        file_bytes = redis_memory(args) - before if redis_backend else path.stat().st_size
        opened: list[Any] = []
        wall, _ = timed(
            lambda: opened.append(
                RedisPendingPredictions(args.redis_url)
                if redis_backend
                else SqlitePendingPredictions(path)
            )
        )
        assert opened[0].pending_count() == stats.pending
        opened[0].close()
    per_million = 1e6 / stats.pending
    report(
        results,
        phase="size",
        pending=stats.pending,
        file_mb_per_million=file_bytes * per_million / 1e6,
        bytes_per_row=file_bytes / stats.pending,
        index_mb_per_million=stats.index_bytes * per_million / 1e6,
        reopen_s_per_million=round(wall * per_million, 2),
    )


def phase_churn(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    cap = args.churn_pending
    warm = make_batches(cap // args.rows, args.rows, seed=4)
    batches = make_batches(args.batches, args.rows, seed=5, start=len(warm))
    with fresh_dir(args.dir) as directory:
        store = open_store(args, directory, max_pending=cap)
        for batch in warm:
            store.put(batch)

        def run(store: Any = store) -> None:
            for batch in batches:
                store.put(batch)

        wall, cpu = timed(run)
        stats = store.stats()
        store.close()
    rows = args.batches * args.rows
    report(
        results,
        phase="churn",
        mode=f"direct puts at max_pending={cap:,}",
        rows_per_s=rows / wall,
        evicted=stats.evicted,
        cpu_us_per_1000_rows=cpu / rows * 1e9,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000, help="rows per batch")
    parser.add_argument("--batches", type=int, default=300, help="batches per measured phase")
    parser.add_argument("--concurrency", type=int, default=8, help="threads putting at once")
    parser.add_argument("--synchronous", default="NORMAL,FULL,OFF")
    parser.add_argument("--scatter", default="100,1000", help="pending batches to scatter over")
    parser.add_argument("--pending", type=int, default=1_000_000, help="rows for the size phase")
    parser.add_argument("--churn-pending", type=int, default=200_000)
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--dir", default=None, help="directory for the files (default: tmp)")
    parser.add_argument("--backend", choices=["sqlite", "redis"], default="sqlite")
    parser.add_argument("--quick", action="store_true", help="smaller counts")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.pending, args.churn_pending = 100, 200_000, 50_000
        args.scatter = "100"
    args.synchronous = args.synchronous.split(",")
    args.scatter = [s for s in args.scatter.split(",") if s]
    phases = args.phases.split(",")
    unknown = set(phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; choose from {', '.join(PHASES)}")

    with contextlib.ExitStack() as stack:
        if args.backend == "redis":
            args.redis_url = stack.enter_context(redis_server(args.dir))
            server = redis.Redis.from_url(args.redis_url).info("server")["redis_version"]
            backend = f"Redis {server} (redis-py {redis.__version__})"
        else:
            backend = f"SQLite {__import__('sqlite3').sqlite_version}"
        load = os.getloadavg()
        print(
            f"pending store bench: {platform.python_implementation()} "
            f"{platform.python_version()}, {os.cpu_count()} CPUs, "
            f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {backend}, "
            f"{args.rows} rows/batch",
            flush=True,
        )
        results: list[dict[str, Any]] = []
        runners = {"put": phase_put, "join": phase_join, "size": phase_size, "churn": phase_churn}
        for phase in phases:
            runners[phase](args, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
