"""Ingest throughput: the real agent against a bare gRPC "decode to numpy" ceiling.

Prints figures (it is not a test). Every phase sends pre-serialised messages
from ``--concurrency`` grpc.aio calls in flight to a server in another process
(the agent: real ``Agent`` with gRPC ingest, engine, telemetry and Prometheus
reader; or the bare servicer: parse + ``np.array`` per packed column, nothing
else), so client and server do not share one GIL.

    .venv/bin/python bench/ingest.py                 # ~5 s per phase
    .venv/bin/python bench/ingest.py --quick         # ~1 s per phase
    .venv/bin/python bench/ingest.py --in-process    # servers on a thread of this process
    .venv/bin/python bench/ingest.py --serve agent   # only a server (e.g. under py-spy)
    .venv/bin/python bench/ingest.py --agent-target 127.0.0.1:4320 --phases agent-columnar

Phases (events = prediction rows; every batch carries new prediction ids):
    ceiling-columnar  bare servicer, columnar batches (rows x features)
    agent-columnar    the agent, the same bytes (pending store on: every id is kept for a join)
    agent-outcomes    the agent, outcome batches for the ids agent-columnar sent, newest first:
                      every outcome row joins its prediction (events = joins)
    ceiling-rows      bare servicer, row-form batches (parse only)
    agent-rows        the agent, row-form batches (PredictionEvent)
    ceiling-unary     bare servicer, one event per call
    agent-unary       the agent, one event per call
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb  # noqa: E402

SUBMIT = "/mlsidecar.v1.Ingest/SubmitPredictions"
SUBMIT_OUTCOMES = "/mlsidecar.v1.Ingest/SubmitOutcomes"
HEALTH = "/mlsidecar.v1.Ingest/GetModelHealth"
MODEL = "bench"
PHASES = (
    "ceiling-columnar",
    "agent-columnar",
    "agent-outcomes",
    "ceiling-rows",
    "agent-rows",
    "ceiling-unary",
    "agent-unary",
)
TARGET_EVENTS_PER_S = 1_000_000
TARGET_RATIO = 0.25
# Issue 3: through the agent with the pending store on, these 2 cores shared with the client.
TARGET_STORE_EVENTS_PER_S = 300_000
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


# --- messages ---------------------------------------------------------------------------------


# Every id of a template starts with PLACEHOLDER; each send stamps a batch number of the
# same width over it, so the bytes stay valid protobuf and every batch has new ids.
PLACEHOLDER = b"#########"


def _ids(form: str, rows: int) -> list[str]:
    return [f"{PLACEHOLDER.decode()}{form}{i:07d}" for i in range(rows)]


class IdStamper:
    """Serialised batches with fresh ids: ``next()`` stamps the next batch number into them.

    stamper = IdStamper(columnar_batch(1000, 20).SerializeToString())
    raw = stamper.next()        # ids '000000000c0000000', ... then '000000001c...'
    """

    def __init__(self, template: bytes) -> None:
        self.parts = template.split(PLACEHOLDER)
        self.sent = 0

    def stamp(self, n: int) -> bytes:
        return (b"%09d" % n).join(self.parts)

    def next(self) -> bytes | None:
        raw = self.stamp(self.sent)
        self.sent += 1
        return raw


class OutcomeSource:
    """Outcome batches for the prediction batches a stamper has sent, newest first, once each."""

    def __init__(self, predictions: IdStamper, template: bytes) -> None:
        self.predictions = predictions
        self.outcomes = IdStamper(template)
        self.taken = 0

    def next(self) -> bytes | None:
        if self.taken >= self.predictions.sent:
            return None  # every prediction batch sent so far has its outcomes
        self.taken += 1
        return self.outcomes.stamp(self.predictions.sent - self.taken)


def columnar_batch(rows: int, features: int, seed: int = 1, form: str = "c") -> pb.PredictionBatch:
    """``rows`` predictions with ``features`` numeric columns, scores, latencies and trace ids."""
    rng = np.random.default_rng(seed)
    return pb.PredictionBatch(
        model=MODEL,
        model_version="v1",
        ids=_ids(form, rows),
        features=[
            pb.Column(name=f"f{j:02d}", numbers=pb.NumberValues(values=rng.normal(j, 1.0, rows)))
            for j in range(features)
        ],
        scores=rng.random(rows),
        latencies_ms=rng.lognormal(2.0, 0.7, rows),
        trace_ids=[rng.bytes(16) for _ in range(rows)],
        span_ids=[rng.bytes(8) for _ in range(rows)],
        attributes={"region": "eu"},
    )


def row_batch(rows: int, features: int, seed: int = 2) -> pb.PredictionBatch:
    """The same content in the row form (PredictionEvent per row)."""
    rng = np.random.default_rng(seed)
    values = rng.normal(0.0, 1.0, (rows, features))
    names = [f"f{j:02d}" for j in range(features)]
    return pb.PredictionBatch(
        model=MODEL,
        model_version="v1",
        events=[
            pb.PredictionEvent(
                id=f"{PLACEHOLDER.decode()}r{i:07d}",
                numbers=dict(zip(names, values[i].tolist(), strict=True)),
                score=float(rng.random()),
                latency_ms=float(rng.lognormal(2.0, 0.7)),
                trace_id=rng.bytes(16),
                span_id=rng.bytes(8),
            )
            for i in range(rows)
        ],
        attributes={"region": "eu"},
    )


def outcome_batch(rows: int, seed: int = 4) -> pb.OutcomeBatch:
    """Actual values for the ``rows`` predictions of one columnar batch."""
    rng = np.random.default_rng(seed)
    return pb.OutcomeBatch(
        model=MODEL, model_version="v1", ids=_ids("c", rows), actual_values=rng.random(rows)
    )


# --- servers ----------------------------------------------------------------------------------


def _to_numpy(values: Any) -> np.ndarray:
    """The quickest copy of a packed double field: np.array has a fixed cost of a few µs."""
    n = len(values)
    if n <= 32:
        return np.fromiter(values, dtype=np.float64, count=n)
    return np.array(values, dtype=np.float64)


class BareServicer:
    """The transport ceiling: parse, turn each packed column into numpy, acknowledge."""

    def __init__(self) -> None:
        self.rows = 0

    async def submit(self, raw: bytes, context: Any) -> bytes:
        batch = pb.PredictionBatch.FromString(raw)
        if batch.events:
            n = len(batch.events)
        else:
            n = len(batch.ids)
            for column in batch.features:
                _to_numpy(column.numbers.values)
            _to_numpy(batch.scores)
            _to_numpy(batch.latencies_ms)
        self.rows += n
        return pb.SubmitResponse(accepted=n).SerializeToString()

    async def health(self, raw: bytes, context: Any) -> bytes:
        message = pb.ModelHealth()
        message.report.update({"totals": {"rows": self.rows}})
        return message.SerializeToString()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "mlsidecar.v1.Ingest",
            {
                "SubmitPredictions": grpc.unary_unary_rpc_method_handler(self.submit),
                "GetModelHealth": grpc.unary_unary_rpc_method_handler(self.health),
            },
        )


async def start_bare() -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((BareServicer().handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def agent_settings() -> Any:
    """As tests/conftest.py builds them: loopback ephemeral ports, no OTLP, Prometheus on."""
    from agent.config import Settings

    return Settings.load(
        None,
        ingest={"listen": "127.0.0.1:0", "max_rows_per_batch": 100_000},
        api={"listen": "127.0.0.1:0", "prometheus": True},
        telemetry={"otlp": False},
        # References built during the run are written here, not into the working tree.
        store={"data_dir": tempfile.mkdtemp(prefix="mlsidecar-bench-")},
        shutdown_timeout_s=5,
    )


async def serve(kind: str, ready: Callable[[int], None], stop: asyncio.Event) -> None:
    if kind == "agent":
        from agent.app import Agent

        agent = Agent(agent_settings())
        await agent.start()
        assert agent.ingest.port is not None
        ready(agent.ingest.port)
        try:
            await stop.wait()
        finally:
            await agent.stop()
    else:
        server, port = await start_bare()
        ready(port)
        try:
            await stop.wait()
        finally:
            await server.stop(1)


def serve_forever(kind: str) -> None:
    """``--serve KIND``: print ``{"port": N}`` and serve until stdin closes."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def ready(port: int) -> None:
            print(json.dumps({"port": port, "pid": os.getpid()}), flush=True)

        def wait_stdin() -> None:
            sys.stdin.read()
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=wait_stdin, daemon=True).start()
        await serve(kind, ready, stop)

    asyncio.run(main())


class ServerProcess:
    """A server in a child process (its own GIL), stopped by closing its stdin."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{kind} server exited with {self.proc.wait()}")
        info = json.loads(line)
        self.target = f"127.0.0.1:{info['port']}"
        self.pid: int | None = info["pid"]

    def cpu_seconds(self) -> float:
        return _proc_cpu_seconds(self.proc.pid)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class ServerThread:
    """A server on an event loop thread of this process (shares the client's GIL)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.pid = None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        ports: list[int] = []
        self._stop = asyncio.Event()

        async def start() -> None:
            started = asyncio.Event()

            def ready(port: int) -> None:
                ports.append(port)
                started.set()

            self._task = asyncio.ensure_future(serve(kind, ready, self._stop))
            await started.wait()

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)
        self.target = f"127.0.0.1:{ports[0]}"

    def cpu_seconds(self) -> float:
        return float("nan")  # not separable from the client's

    def close(self) -> None:
        async def stop() -> None:
            self._stop.set()
            await self._task

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class ExternalServer:
    def __init__(self, kind: str, target: str) -> None:
        self.kind, self.target, self.pid = kind, target, None

    def cpu_seconds(self) -> float:
        return float("nan")

    def close(self) -> None:
        pass


def _proc_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    ticks = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks / os.sysconf("SC_CLK_TCK")


# --- clients ----------------------------------------------------------------------------------


@dataclass
class PhaseResult:
    phase: str
    rows_per_batch: int
    batches: int
    events: int
    seconds: float
    events_per_s: float
    batches_per_s: float
    server_cpu: float  # server CPU seconds per wall second (1.0 = one core)
    client_cpu: float
    verified: bool | None  # the server's own count agrees with the acknowledgements

    @property
    def events_per_server_cpu_s(self) -> float:
        """Events per second of server CPU: less sensitive to CPU taken by other processes."""
        return self.events_per_s / self.server_cpu if self.server_cpu > 0 else math.nan


async def server_rows(channel: grpc.aio.Channel, outcomes: bool = False) -> int:
    """The agent's own count: prediction rows received, or outcomes joined."""
    call = channel.unary_unary(
        HEALTH,
        request_serializer=None,
        response_deserializer=pb.ModelHealth.FromString,
    )
    try:
        reply = await call(pb.ModelHealthRequest(model=MODEL).SerializeToString(), timeout=10)
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:  # the agent has not seen the model yet
            return 0
        raise
    if outcomes:
        outcomes_report = reply.report.fields.get("outcomes")
        if outcomes_report is None or "joined" not in outcomes_report.struct_value:
            return 0
        return int(outcomes_report.struct_value["joined"])
    return int(reply.report["totals"]["rows"])


async def drive(
    target: str,
    source: Callable[[], bytes | None],
    *,
    method: str = SUBMIT,
    concurrency: int,
    channels: int,
    warmup: float,
    seconds: float,
    cpu_of_server: Callable[[], float],
) -> tuple[int, int, float, float, float, int | None]:
    """Keep ``concurrency`` calls in flight for warmup + seconds; count what was acknowledged.

    ``source`` gives each call's message, None when it has no more (the phase ends early).
    """
    outcomes = method == SUBMIT_OUTCOMES
    chans = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(channels)]
    try:
        for chan in chans:
            await asyncio.wait_for(chan.channel_ready(), 10)
        calls = [
            chan.unary_unary(
                method, request_serializer=None, response_deserializer=pb.SubmitResponse.FromString
            )
            for chan in chans
        ]
        before: int | None
        try:
            before = await server_rows(chans[0], outcomes)
        except grpc.aio.AioRpcError:
            before = None
        counting = False
        stop = False
        acked = [0, 0]  # events, batches while counting

        async def worker(i: int) -> None:
            call = calls[i % len(calls)]
            while not stop:
                raw = source()
                if raw is None:
                    return
                reply = await call(raw, timeout=30)
                if counting:
                    acked[0] += reply.accepted
                    acked[1] += 1

        workers = [asyncio.ensure_future(worker(i)) for i in range(concurrency)]
        await asyncio.sleep(warmup)
        counting = True
        t0, c0, s0 = time.perf_counter(), time.process_time(), cpu_of_server()
        running = asyncio.gather(*workers)
        with contextlib.suppress(TimeoutError):  # or sooner, when the source runs dry
            await asyncio.wait_for(asyncio.shield(running), seconds)
        counting = False
        elapsed = time.perf_counter() - t0
        client_cpu = (time.process_time() - c0) / elapsed
        server_cpu = (cpu_of_server() - s0) / elapsed
        stop = True
        await running
        after = await server_rows(chans[0], outcomes) if before is not None else None
        grown = None if before is None or after is None else after - before
        return acked[0], acked[1], elapsed, server_cpu, client_cpu, grown
    finally:
        for chan in chans:
            await chan.close()


def run_phase(
    phase: str,
    server: Any,
    source: Callable[[], bytes | None],
    rows: int,
    args: argparse.Namespace,
) -> PhaseResult:
    events, batches, elapsed, server_cpu, client_cpu, grown = asyncio.run(
        drive(
            server.target,
            source,
            method=SUBMIT_OUTCOMES if phase.endswith("outcomes") else SUBMIT,
            concurrency=args.concurrency,
            channels=args.channels,
            warmup=args.warmup,
            seconds=args.seconds,
            cpu_of_server=server.cpu_seconds,
        )
    )
    # The server counted everything sent, warm-up included: at least what was acknowledged.
    verified = None if grown is None else grown >= events and grown % rows == 0
    return PhaseResult(
        phase,
        rows,
        batches,
        events,
        elapsed,
        events / elapsed,
        batches / elapsed,
        server_cpu,
        client_cpu,
        verified,
    )


# --- report -----------------------------------------------------------------------------------


def _si(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f}"


def _cpu(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}"


def summarise(results: list[PhaseResult]) -> dict[str, Any]:
    by = {r.phase: r for r in results}
    summary: dict[str, Any] = {k.replace("-", "_"): round(r.events_per_s) for k, r in by.items()}
    for form in ("columnar", "rows", "unary"):
        agent, ceiling = by.get(f"agent-{form}"), by.get(f"ceiling-{form}")
        if agent is not None and ceiling is not None:
            summary[f"ratio_{form}"] = round(agent.events_per_s / ceiling.events_per_s, 3)
            per_cpu = agent.events_per_server_cpu_s / ceiling.events_per_server_cpu_s
            if not math.isnan(per_cpu):
                summary[f"ratio_{form}_per_server_cpu"] = round(per_cpu, 3)
    agent = by.get("agent-columnar")
    if agent is not None:
        summary["meets_target"] = agent.events_per_s >= TARGET_EVENTS_PER_S and (
            summary.get("ratio_columnar", 1.0) >= TARGET_RATIO
        )
        summary["meets_store_target"] = agent.events_per_s >= TARGET_STORE_EVENTS_PER_S
    return summary


def report(runs: dict[str, list[PhaseResult]], args: argparse.Namespace) -> None:
    """The table of medians, ratios, the spread of repeated runs, then one JSON line."""
    results = [median_result(rs) for rs in runs.values()]
    print()
    print(
        f"{'phase':<18}{'rows/batch':>11}{'events/s':>12}{'batches/s':>11}"
        f"{'server cpu':>12}{'client cpu':>12}{'ev/server-cpu-s':>17}{'verified':>10}"
    )
    for r in results:
        per_cpu = r.events_per_server_cpu_s
        print(
            f"{r.phase:<18}{r.rows_per_batch:>11}{_si(r.events_per_s):>12}"
            f"{r.batches_per_s:>11.0f}{_cpu(r.server_cpu):>12}{_cpu(r.client_cpu):>12}"
            f"{'-' if math.isnan(per_cpu) else _si(per_cpu):>17}"
            f"{'-' if r.verified is None else ('yes' if r.verified else 'NO'):>10}"
        )
    summary = summarise(results)
    for form in ("columnar", "rows", "unary"):
        if f"ratio_{form}" in summary:
            cpu_ratio = summary.get(f"ratio_{form}_per_server_cpu")
            extra = "" if cpu_ratio is None else f" (per server CPU-second: {cpu_ratio:.1%})"
            print(f"agent / ceiling ({form}): {summary[f'ratio_{form}']:.1%}{extra}")
    if "meets_target" in summary:
        print(
            f"target (agent columnar >= {_si(TARGET_EVENTS_PER_S)} events/s and >= "
            f"{TARGET_RATIO:.0%} of the ceiling): {'met' if summary['meets_target'] else 'NOT met'}"
        )
        print(
            f"target (agent columnar with the pending store >= {_si(TARGET_STORE_EVENTS_PER_S)} "
            f"events/s): {'met' if summary['meets_store_target'] else 'NOT met'}"
        )
    if "agent_outcomes" in summary:
        print(f"outcome joins through the agent: {_si(summary['agent_outcomes'])}/s")
    spreads: dict[str, float] = {}
    if args.repeat > 1:
        print(f"runs ({args.repeat} per phase, interleaved; the table shows the median run):")
        for phase, rs in runs.items():
            rates = [r.events_per_s for r in rs]
            spreads[phase] = (max(rates) - min(rates)) / statistics.median(rates)
            print(
                f"  {phase:<18} {', '.join(_si(x) for x in rates)} "
                f"(spread {spreads[phase]:.0%} of the median)"
            )
    line = {
        "bench": "ingest",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, Python {platform.python_version()}",
        "mode": "in-process" if args.in_process else "subprocess",
        "concurrency": args.concurrency,
        "channels": args.channels,
        "rows": args.rows,
        "row_form_rows": args.row_form_rows,
        "features": args.features,
        "seconds": args.seconds,
        "repeat": args.repeat,
        **summary,
        "runs": {phase: [round(r.events_per_s) for r in rs] for phase, rs in runs.items()},
        "spread": {phase: round(x, 3) for phase, x in spreads.items()},
        "phases": [
            {
                **asdict(r),
                "server_cpu": _finite(r.server_cpu),
                "client_cpu": _finite(r.client_cpu),
                "events_per_server_cpu_s": _finite(r.events_per_server_cpu_s),
            }
            for r in results
        ],
    }
    print(json.dumps(line, allow_nan=False, default=_json_default))


def _json_default(value: Any) -> Any:
    raise TypeError(f"not JSON-serialisable: {value!r}")


def _finite(x: float) -> float | None:
    return x if x == x else None


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per phase")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each")
    p.add_argument("--concurrency", type=int, default=8, help="calls in flight")
    p.add_argument("--channels", type=int, default=1, help="gRPC channels (connections)")
    p.add_argument("--rows", type=int, default=1000, help="rows per columnar batch")
    p.add_argument("--row-form-rows", type=int, default=100, help="rows per row-form batch")
    p.add_argument("--features", type=int, default=20, help="numeric features per row")
    p.add_argument("--repeat", type=int, default=1, help="run every phase N times, report medians")
    p.add_argument("--quick", action="store_true", help="1 s phases, 0.3 s warm-up")
    p.add_argument("--in-process", action="store_true", help="servers on a thread of this process")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of phases")
    p.add_argument("--agent-target", help="use a running agent at host:port")
    p.add_argument("--bare-target", help="use a running bare server at host:port")
    p.add_argument("--serve", choices=("agent", "bare"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup = 1.0, 0.3
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        p.error(f"unknown phases: {sorted(unknown)}; choose from {', '.join(PHASES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.serve:  # bench/memory.py serves the agent this way, with the default max_pending
        serve_forever(args.serve)
        return
    # Room for every prediction of a long run (outcomes must find them all pending); the
    # agent's servers inherit it, in a subprocess or in this process.
    os.environ.setdefault("MLSIDECAR_STORE__MAX_PENDING", "50000000")
    messages = {
        "columnar": (columnar_batch(args.rows, args.features), args.rows),
        "rows": (row_batch(args.row_form_rows, args.features), args.row_form_rows),
        "unary": (columnar_batch(1, args.features, seed=3, form="u"), 1),
    }
    payload = {form: (m.SerializeToString(), n) for form, (m, n) in messages.items()}
    print(
        f"ingest bench: {os.cpu_count()} cpus, concurrency {args.concurrency}, "
        f"{args.seconds:g} s per phase, servers {'in-process' if args.in_process else 'in subprocesses'}"
    )
    for form, (raw, n) in payload.items():
        print(
            f"  {form:<9} {n:>6} rows x {args.features} features, {len(raw):>8} bytes per message"
        )
    outcome_template = outcome_batch(args.rows).SerializeToString()
    # One stamper per server and form, so each server sees every id once; agent-outcomes
    # answers what agent-columnar has sent.
    stampers: dict[str, IdStamper] = {}

    def source(kind: str, form: str) -> tuple[Callable[[], bytes | None], int]:
        if form == "outcomes":
            predictions = stampers.setdefault(f"{kind}-columnar", IdStamper(payload["columnar"][0]))
            outcomes = OutcomeSource(predictions, outcome_template)
            return outcomes.next, args.rows
        raw, n = payload[form]
        return stampers.setdefault(f"{kind}-{form}", IdStamper(raw)).next, n

    servers: dict[str, Any] = {}

    def server(kind: str) -> Any:
        if kind not in servers:
            external = args.agent_target if kind == "agent" else args.bare_target
            if external:
                servers[kind] = ExternalServer(kind, external)
            elif args.in_process:
                servers[kind] = ServerThread(kind)
            else:
                servers[kind] = ServerProcess(kind)
        return servers[kind]

    runs: dict[str, list[PhaseResult]] = {}
    try:
        for _ in range(args.repeat):
            for phase in args.phases:
                kind, form = phase.split("-")
                next_message, n = source(kind, form)
                result = run_phase(
                    phase, server("bare" if kind == "ceiling" else kind), next_message, n, args
                )
                runs.setdefault(phase, []).append(result)
                print(
                    f"  {phase:<18} {_si(result.events_per_s):>9} events/s (server cpu "
                    f"{_cpu(result.server_cpu)}, client cpu {_cpu(result.client_cpu)})",
                    flush=True,
                )
    finally:
        for s in servers.values():
            s.close()
    report(runs, args)


def median_result(results: list[PhaseResult]) -> PhaseResult:
    """The median run (the lower of the middle two for an even count), verified if all were."""
    ordered = sorted(results, key=lambda r: r.events_per_s)
    mid = ordered[(len(ordered) - 1) // 2]
    verified = [r.verified for r in results]
    mid.verified = None if None in verified else all(v for v in verified if v is not None)
    return mid


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
