"""Memory under sustained load: RSS while 10 M prediction events arrive for 10 models.

Prints figures and a verdict against a bound (it is not a test). Batches of 1000 rows x 20
numeric features (plus scores, latencies, trace and span ids, one segment attribute) go
round-robin to 10 models, each judged against a reference. RSS is read from
/proc/<pid>/status (VmRSS; VmHWM is the peak) at 0, 10, 25, 50, 75 and 100 % of --events.
No tracemalloc unless asked for (it costs memory and time of its own).

    .venv/bin/python bench/memory.py --mode engine          # the Engine in this process
    .venv/bin/python bench/memory.py --mode agent           # the real agent, over gRPC
    .venv/bin/python bench/memory.py --mode agent --events 1000000 --quick   # smoke run

Modes:
  engine  ``Engine.observe_predictions`` in this process, references set per model, a
          simulated clock (100 k events/s) so windows roll every --window-s; every 100
          batches one model's report is built, every 1000 batches all snapshots (as the
          API and the exporters do).
  agent   the agent as bench/ingest.py serves it (``--serve agent``: gRPC ingest, engine,
          Prometheus reader, and the pending-prediction SQLite store, on by default), in a
          subprocess; --concurrency calls in flight; every prediction id is distinct, so
          predictions really pile up in the store (up to store.max_pending, then the
          oldest are evicted); each model's first 1000 rows become its reference (warm-up);
          windows of --window-s real seconds roll during the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.engine import Engine, ModelConfig, PredictionColumns, ReferenceProfile  # noqa: E402

CHECKPOINTS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
MB = 1e6  # figures in MB of 10^6 bytes (VmRSS is in KiB)
SIMULATED_EVENTS_PER_S = 100_000
REGIONS = ("eu", "us", "ap")


# --- data -------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One model's columns, built once and sent (or observed) many times."""

    model: str
    numbers: dict[str, np.ndarray]
    scores: np.ndarray
    latencies_ms: np.ndarray
    trace_ids: list[bytes]
    span_ids: list[bytes]
    region: str


def model_name(m: int) -> str:
    return f"mem-{m}"


def make_pool(args: argparse.Namespace, seed: int = 7) -> list[list[Batch]]:
    """``variants`` batches per model: each model's features have their own means."""
    rng = np.random.default_rng(seed)
    pool = []
    for m in range(args.models):
        batches = []
        for v in range(args.variants):
            rows = args.rows
            batches.append(
                Batch(
                    model_name(m),
                    {
                        f"f{j:02d}": rng.normal(m + j * 0.1, 1.0 + 0.05 * j, rows)
                        for j in range(args.features)
                    },
                    rng.random(rows),
                    rng.lognormal(2.0, 0.7, rows),
                    [rng.bytes(16) for _ in range(rows)],
                    [rng.bytes(8) for _ in range(rows)],
                    REGIONS[v % len(REGIONS)],
                )
            )
        pool.append(batches)
    return pool


def reference_for_model(m: int, args: argparse.Namespace) -> ReferenceProfile:
    rng = np.random.default_rng(100 + m)
    rows = 10_000
    return ReferenceProfile.from_columns(
        model_name(m),
        "v1",
        numbers={
            f"f{j:02d}": rng.normal(m + j * 0.1, 1.0 + 0.05 * j, rows) for j in range(args.features)
        },
        categories={},
        scores=rng.random(rows),
        source="file",
        created_unix_nano=time.time_ns(),
    )


# --- measuring --------------------------------------------------------------------------------


def proc_status(pid: int | str = "self") -> dict[str, float]:
    """VmRSS, VmHWM (peak RSS), RssAnon and RssFile of a process, in MB."""
    wanted = {"VmRSS", "VmHWM", "RssAnon", "RssFile"}
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            found[key] = int(value.split()[0]) * 1024 / MB
    return found


@dataclass
class Checkpoint:
    events: int
    rss_mb: float
    anon_mb: float
    peak_mb: float
    seconds: float  # since the first event
    events_per_s: float  # over the segment that ended here
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_batches(total_batches: int) -> list[int]:
    return sorted({round(f * total_batches) for f in CHECKPOINTS})


def read_checkpoint(
    pid: int | str, events: int, started: float, last: Checkpoint | None, **extra: Any
) -> Checkpoint:
    status = proc_status(pid)
    now = time.perf_counter() - started
    if last is None or now <= last.seconds:
        rate = math.nan
    else:
        rate = (events - last.events) / (now - last.seconds)
    return Checkpoint(
        events,
        status["VmRSS"],
        status.get("RssAnon", math.nan),
        status["VmHWM"],
        now,
        rate,
        dict(extra),
    )


def print_row(c: Checkpoint, extra_columns: list[str]) -> None:
    rate = "-" if math.isnan(c.events_per_s) else _si(c.events_per_s)
    cells = "".join(f"{_cell(c.extra.get(k)):>17}" for k in extra_columns)
    print(
        f"  {c.events:>12,}{c.rss_mb:>10.1f}{c.anon_mb:>10.1f}{c.peak_mb:>10.1f}"
        f"{c.seconds:>9.1f}{rate:>10}{cells}",
        flush=True,
    )


def print_header(extra_columns: list[str]) -> None:
    cells = "".join(f"{k:>17}" for k in extra_columns)
    print(
        f"  {'events':>12}{'RSS MB':>10}{'anon MB':>10}{'peak MB':>10}{'s':>9}{'events/s':>10}{cells}"
    )


def _si(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f}"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# --- engine mode ------------------------------------------------------------------------------


def run_engine(args: argparse.Namespace) -> tuple[list[Checkpoint], dict[str, Any]]:
    pool = make_pool(args)
    references = {model_name(m): reference_for_model(m, args) for m in range(args.models)}
    now = [time.time_ns()]
    step_ns = int(args.rows / SIMULATED_EVENTS_PER_S * 1e9)
    config = ModelConfig(window_ns=int(args.window_s * 1e9))
    engine = Engine(
        lambda model: config,
        max_models=100,
        clock=lambda: now[0],
        reference_for=lambda model, version: references.get(model),
    )
    ids = [f"id-{i:06d}" for i in range(args.rows)]  # the engine keeps no ids
    total = math.ceil(args.events / args.rows)
    marks = checkpoint_batches(total)
    columns = ["py heap MB"] if args.tracemalloc else []
    if args.tracemalloc:
        tracemalloc.start()
    print_header(columns)

    def extra() -> dict[str, Any]:
        if not args.tracemalloc:
            return {}
        current, _ = tracemalloc.get_traced_memory()
        return {"py heap MB": current / MB}

    started = time.perf_counter()
    points = [read_checkpoint("self", 0, started, None, **extra())]
    print_row(points[-1], columns)
    reports = snapshots = 0
    k = 0
    for mark in marks[1:]:
        while k < mark:
            m = k % args.models
            batch = pool[m][(k // args.models) % args.variants]
            now[0] += step_ns
            engine.observe_predictions(
                PredictionColumns(
                    batch.model,
                    "v1",
                    ids=ids,
                    received_unix_nano=now[0],
                    numbers=batch.numbers,
                    scores=batch.scores,
                    latencies_ms=batch.latencies_ms,
                    trace_ids=batch.trace_ids,
                    span_ids=batch.span_ids,
                    attributes={"region": batch.region},
                )
            )
            k += 1
            if k % 100 == 0:
                engine.report(model_name((k // 100) % args.models))
                reports += 1
            if k % 1000 == 0:
                engine.snapshots()
                snapshots += 1
        points.append(read_checkpoint("self", k * args.rows, started, points[-1], **extra()))
        print_row(points[-1], columns)
    counted = sum(int(row["rows"]) for row in engine.models())  # type: ignore[call-overload]
    report = engine.report(model_name(0))
    assert report is not None and report["reference"] is not None
    info = {
        "counted": counted,
        "verified": counted == total * args.rows,
        "reports": reports,
        "snapshots": snapshots,
        "simulated_s": round(total * step_ns / 1e9, 1),
        "windows_closed": total * step_ns // config.window_ns,
    }
    print(
        f"references set for {len(references)} models; {info['windows_closed']} windows of "
        f"{args.window_s:g} s (simulated) closed; {reports} reports, {snapshots} snapshots"
    )
    return points, info


# --- agent mode -------------------------------------------------------------------------------


class AgentProcess:
    """The agent as ``bench/ingest.py --serve agent`` runs it, with its files under ``tmp``."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        env = dict(os.environ)
        # agent_settings() puts data_dir (references, pending.db) in a mkdtemp: here, under tmp.
        env["TMPDIR"] = str(tmp)
        env["MLSIDECAR_ENGINE__WINDOW_S"] = str(args.window_s)
        env.setdefault("MLSIDECAR_LOGGING__LEVEL", "WARNING")
        # As the image and the Helm chart run it (Dockerfile, helm/mlsidecar): measure that.
        env.setdefault("MALLOC_ARENA_MAX", "2")
        self.malloc_arena_max = env["MALLOC_ARENA_MAX"]
        if args.max_pending is not None:
            env["MLSIDECAR_STORE__MAX_PENDING"] = str(args.max_pending)
        self.tmp = tmp
        self.log = (tmp / "agent.log").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "ingest.py"), "--serve", "agent"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            cwd=ROOT,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the agent exited with {self.proc.wait()}: {self.log_tail()}")
        info = json.loads(line)
        self.pid = self.proc.pid
        self.target = f"127.0.0.1:{info['port']}"

    def store_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.tmp.rglob("pending.db*") if p.is_file())

    def log_tail(self) -> str:
        self.log.flush()
        return (self.tmp / "agent.log").read_text()[-2000:]

    def close(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def encoded_pool(pool: list[list[Batch]]) -> list[list[bytes]]:
    """Every batch without ids, serialised once; ids and batch_id are appended per send.

    Protobuf concatenation merges messages: repeated fields append, so ``rest + ids`` is
    one PredictionBatch with the columns of ``rest`` and the ids of the second part.
    """
    from agent._proto.mlsidecar.v1 import ingest_pb2 as pb

    return [
        [
            pb.PredictionBatch(
                model=b.model,
                model_version="v1",
                features=[
                    pb.Column(name=name, numbers=pb.NumberValues(values=values))
                    for name, values in b.numbers.items()
                ],
                scores=b.scores,
                latencies_ms=b.latencies_ms,
                trace_ids=b.trace_ids,
                span_ids=b.span_ids,
                attributes={"region": b.region},
            ).SerializeToString()
            for b in batches
        ]
        for batches in pool
    ]


async def drive_agent(
    args: argparse.Namespace, agent: AgentProcess, pool: list[list[bytes]]
) -> tuple[list[Checkpoint], dict[str, Any]]:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from agent._proto.mlsidecar.v1 import ingest_pb2 as pb

    options = [
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.max_receive_message_length", 64 << 20),
    ]
    channel = grpc.aio.insecure_channel(agent.target, options=options)
    await asyncio.wait_for(channel.channel_ready(), 15)
    submit = channel.unary_unary(
        "/mlsidecar.v1.Ingest/SubmitPredictions",
        request_serializer=None,
        response_deserializer=pb.SubmitResponse.FromString,
    )
    health = channel.unary_unary(
        "/mlsidecar.v1.Ingest/GetModelHealth",
        request_serializer=pb.ModelHealthRequest.SerializeToString,
        response_deserializer=pb.ModelHealth.FromString,
    )
    suffixes = [f"-{i:05d}" for i in range(args.rows)]

    def message(k: int) -> bytes:
        m = k % args.models
        head = pb.PredictionBatch(ids=[f"{k:09d}{s}" for s in suffixes], batch_id=f"b{k}")
        return pool[m][(k // args.models) % args.variants] + head.SerializeToString()

    async def model_report(m: int) -> dict[str, Any] | None:
        try:
            reply = await health(pb.ModelHealthRequest(model=model_name(m)), timeout=30)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return MessageToDict(reply.report)

    async def extra() -> dict[str, Any]:
        await asyncio.sleep(args.settle_s)  # let the store's writer catch up before reading
        report = await model_report(0)
        pending = None
        if report is not None:
            pending = report.get("outcomes", {}).get("pending")
        return {
            "pending (mem-0)": None if pending is None else int(pending),
            "store MB": agent.store_bytes() / MB,
        }

    columns = ["pending (mem-0)", "store MB"]
    total = math.ceil(args.events / args.rows)
    marks = checkpoint_batches(total)
    print_header(columns)
    started = time.perf_counter()
    points = [read_checkpoint(agent.pid, 0, started, None, **await extra())]
    # The clock starts with the first event, not before the idle reading.
    started, points[0].seconds = time.perf_counter(), 0.0
    print_row(points[-1], columns)
    sent = [0]
    accepted = [0]
    for mark in marks[1:]:

        async def worker(mark: int = mark) -> None:
            while sent[0] < mark:
                k = sent[0]
                sent[0] += 1
                reply = await submit(message(k), timeout=120)
                accepted[0] += reply.accepted

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        events = accepted[0]
        segment_end = time.perf_counter()
        more = await extra()
        point = read_checkpoint(agent.pid, events, started, points[-1], **more)
        # The rate is over sending only, not the settle pause.
        if not math.isnan(point.events_per_s):
            point.events_per_s = (events - points[-1].events) / (
                segment_end - started - points[-1].seconds
            )
        points.append(point)
        print_row(point, columns)
    counted = with_reference = with_closed_window = 0
    for m in range(args.models):
        report = await model_report(m)
        if report is None:
            continue
        counted += int(report["totals"]["rows"])
        with_reference += report.get("reference") is not None
        with_closed_window += report.get("previous") is not None
    await channel.close()
    print(
        f"models with a reference: {with_reference}/{args.models}, with a closed window: "
        f"{with_closed_window}/{args.models} (about {points[-1].seconds / args.window_s:.0f} "
        f"windows of {args.window_s:g} s rolled)"
    )
    return points, {
        "accepted": accepted[0],
        "counted": counted,
        "verified": counted == accepted[0] == total * args.rows,
        "models_with_reference": with_reference,
        "models_with_closed_window": with_closed_window,
        "max_pending": args.max_pending,
    }


def run_agent(args: argparse.Namespace) -> tuple[list[Checkpoint], dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="mlsidecar-bench-memory-"))
    agent = None
    try:
        pool = encoded_pool(make_pool(args))
        agent = AgentProcess(args, tmp)
        print(
            f"  agent pid {agent.pid} at {agent.target}, files under {tmp}, "
            f"MALLOC_ARENA_MAX={agent.malloc_arena_max or '(glibc default)'}",
            flush=True,
        )
        points, info = asyncio.run(drive_agent(args, agent, pool))
        info["malloc_arena_max"] = agent.malloc_arena_max
        info["store_mb_at_end"] = round(agent.store_bytes() / MB, 1)
        return points, info
    except BaseException:
        if agent is not None:
            print(f"agent log:\n{agent.log_tail()}", file=sys.stderr)
        raise
    finally:
        if agent is not None:
            agent.close()
        shutil.rmtree(tmp, ignore_errors=True)


# --- report -----------------------------------------------------------------------------------


def verdict(points: list[Checkpoint], args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS against --bound-mb; growth from the half-way checkpoint to the last."""
    half = min(points[1:], key=lambda c: abs(c.events - points[-1].events / 2))
    last = points[-1]
    growth = last.rss_mb - half.rss_mb
    growth_pct = growth / half.rss_mb * 100
    peak = max(c.peak_mb for c in points)
    within = peak <= args.bound_mb
    flat = growth_pct <= args.flat_pct
    print(
        f"growth {half.events / 1e6:g} M -> {last.events / 1e6:g} M events: "
        f"{growth:+.1f} MB ({growth_pct:+.1f} %)"
    )
    print(
        f"verdict: peak RSS {peak:.1f} MB {'<=' if within else '>'} {args.bound_mb:g} MB: "
        f"{'within the bound' if within else 'OVER the bound'}; growth from "
        f"{half.events / 1e6:g} M to {last.events / 1e6:g} M {growth_pct:+.1f} % "
        f"{'<=' if flat else '>'} {args.flat_pct:g} %: {'flat' if flat else 'GROWING'}"
    )
    return {
        "growth_mb": round(growth, 2),
        "growth_pct": round(growth_pct, 2),
        "peak_mb": round(peak, 1),
        "within_bound": within,
        "flat": flat,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", choices=("engine", "agent"), default="engine")
    p.add_argument("--events", type=int, default=10_000_000, help="prediction events in all")
    p.add_argument("--models", type=int, default=10)
    p.add_argument("--rows", type=int, default=1000, help="rows per batch")
    p.add_argument("--features", type=int, default=20, help="numeric features per row")
    p.add_argument("--variants", type=int, default=4, help="distinct batches per model")
    p.add_argument(
        "--window-s", type=float, default=5.0, help="engine window (simulated in engine mode)"
    )
    p.add_argument("--concurrency", type=int, default=8, help="agent mode: calls in flight")
    p.add_argument(
        "--max-pending", type=int, help="agent mode: store.max_pending (default: the agent's)"
    )
    p.add_argument(
        "--settle-s", type=float, default=1.0, help="agent mode: pause before each reading"
    )
    p.add_argument("--bound-mb", type=float, default=200.0, help="the RSS bound of the verdict")
    p.add_argument("--flat-pct", type=float, default=5.0, help="growth that still counts as flat")
    p.add_argument(
        "--tracemalloc",
        action="store_true",
        help="engine mode: also the Python heap traced since the first event (slower)",
    )
    p.add_argument(
        "--quick", action="store_true", help="shorter pauses and windows, for a smoke run"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.settle_s = min(args.settle_s, 0.2)
        args.window_s = min(args.window_s, 1.0)
    if min(args.events, args.models, args.rows, args.features, args.variants, args.concurrency) < 1:
        p.error("--events, --models, --rows, --features, --variants, --concurrency must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load = os.getloadavg()
    print(
        f"memory bench ({args.mode}): {args.events:,} events, {args.models} models, "
        f"{args.rows} rows x {args.features} features per batch, window {args.window_s:g} s; "
        f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} cpus, "
        f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        flush=True,
    )
    runner: Callable[[argparse.Namespace], tuple[list[Checkpoint], dict[str, Any]]]
    runner = run_engine if args.mode == "engine" else run_agent
    points, info = runner(args)
    summary = verdict(points, args)
    print(
        f"counted: {info.get('counted', 0):,} events"
        f" ({'verified' if info.get('verified') else 'NOT verified'})"
    )
    line = {
        "bench": "memory",
        "mode": args.mode,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, Python {platform.python_version()}",
        "events": args.events,
        "models": args.models,
        "rows": args.rows,
        "features": args.features,
        "window_s": args.window_s,
        "bound_mb": args.bound_mb,
        **summary,
        **info,
        "checkpoints": [{k: _json_number(v) for k, v in asdict(c).items()} for c in points],
    }
    print(json.dumps(line, allow_nan=False))


def _json_number(value: Any) -> Any:
    """Rounded floats; NaN (no rate for the first checkpoint) as null."""
    if isinstance(value, float):
        return round(value, 2) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_number(v) for k, v in value.items()}
    return value


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
