"""Engine throughput: columnar batches through ``Engine.observe_predictions``, no I/O.

Prints figures (it is not a test). Every phase feeds the same pre-built batches
(``--rows`` x ``--features`` numeric columns, scores, latencies, trace ids) to one
``Engine`` in this process, with the clock advancing as if the events came at
``--rate`` (1 M/s by default: a window rolls every 5 minutes of that, exemplars refresh
once a second), and reports events per CPU second (one core):

    ceiling         the irreducible part of drift binning: one ``np.sort`` per column
    foundation      an engine with no reference and no warm-up (totals, windows, histograms)
    drift+quality   a reference is set: every column binned for PSI and the CDF methods,
                    quality counted, prediction drift binned (the default agent path)

    .venv/bin/python bench/engine.py                  # ~3 s per phase, 3 repeats
    .venv/bin/python bench/engine.py --quick          # ~0.5 s per phase, 1 repeat
    .venv/bin/python bench/engine.py --profile        # cProfile of the drift+quality phase
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.engine import Engine  # noqa: E402
from agent.engine.columns import PredictionColumns  # noqa: E402
from agent.engine.model import ModelConfig  # noqa: E402
from agent.engine.monitor import MonitorConfig  # noqa: E402
from agent.engine.reference import ReferenceProfile  # noqa: E402

TARGET_EVENTS_PER_S = 3_000_000
MODEL = "bench"
WINDOW_S = 300.0


def batches(count: int, rows: int, features: int, *, shift: float = 0.0) -> list[PredictionColumns]:
    """``count`` distinct batches; ``shift`` moves every feature's mean (drift)."""
    rng = np.random.default_rng(7)
    out = []
    for i in range(count):
        out.append(
            PredictionColumns(
                MODEL,
                "v1",
                ids=[f"{i}-{j}" for j in range(rows)],
                received_unix_nano=0,
                numbers={
                    f"f{k}": rng.normal(loc=shift + k, scale=1.0 + k / 10, size=rows)
                    for k in range(features)
                },
                scores=rng.random(rows),
                latencies_ms=rng.gamma(2.0, 5.0, size=rows),
                trace_ids=[rng.bytes(16) for _ in range(rows)],
                span_ids=[rng.bytes(8) for _ in range(rows)],
                attributes={"region": "eu"},
            )
        )
    return out


def reference(rows: int, features: int, monitor: MonitorConfig) -> ReferenceProfile:
    rng = np.random.default_rng(11)
    return ReferenceProfile.from_columns(
        MODEL,
        "v1",
        numbers={
            f"f{k}": rng.normal(loc=k, scale=1.0 + k / 10, size=rows) for k in range(features)
        },
        categories={},
        scores=rng.random(rows),
        source="file",
        created_unix_nano=0,
        psi_bins=monitor.psi_bins,
        cdf_bins=monitor.cdf_bins,
        top_k=monitor.top_k,
    )


def engine_phase(
    with_reference: bool, args: argparse.Namespace
) -> Callable[[PredictionColumns], None]:
    monitor = MonitorConfig(warmup_rows=0)
    config = ModelConfig(window_ns=int(WINDOW_S * 1e9), monitor=monitor)
    now = [0]
    engine = Engine(lambda _m: config, max_models=10, clock=lambda: now[0])
    if with_reference:
        engine.set_reference(reference(50_000, args.features, monitor))
    step = int(args.rows / args.rate * 1e9)  # the simulated clock, per batch

    def observe(cols: PredictionColumns) -> None:
        now[0] += step
        # Bench only: restamp the frozen batch in place (dataclasses.replace would cost
        # ~20 µs a batch, charged to the engine).
        object.__setattr__(cols, "received_unix_nano", now[0])
        engine.observe_predictions(cols)

    return observe


def ceiling_phase(_args: argparse.Namespace) -> Callable[[PredictionColumns], None]:
    def observe(cols: PredictionColumns) -> None:
        for values in cols.numbers.values():
            np.sort(values)

    return observe


def measure(
    observe: Callable[[PredictionColumns], None], data: list[PredictionColumns], seconds: float
) -> float:
    """Events per CPU second of this process over at least ``seconds`` of CPU (after one
    warm-up pass). CPU time, not wall time: on a shared machine the engine's own cost is
    what is measured (it runs on one thread; a busy neighbour still costs it cache)."""
    for cols in data:
        observe(cols)
    events = 0
    start = time.process_time()
    while True:
        for cols in data:
            observe(cols)
            events += cols.rows
        elapsed = time.process_time() - start
        if elapsed >= seconds:
            return events / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000, help="rows per batch")
    parser.add_argument("--features", type=int, default=20, help="numeric features")
    parser.add_argument(
        "--rate", type=float, default=1e6, help="events/s the simulated clock assumes"
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per phase")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of all phases; medians")
    parser.add_argument("--quick", action="store_true", help="0.5 s per phase, one round")
    parser.add_argument("--profile", action="store_true", help="cProfile the drift+quality phase")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.repeat = 0.5, 1
    load = os.getloadavg()
    print(
        f"engine bench: {platform.python_implementation()} {platform.python_version()}, "
        f"numpy {np.__version__}, {os.cpu_count()} CPUs, load {load[0]:.2f} {load[1]:.2f} "
        f"{load[2]:.2f}; batches of {args.rows} rows x {args.features} numeric features",
        flush=True,
    )
    data = batches(20, args.rows, args.features)
    phases: dict[str, Callable[[], Callable[[PredictionColumns], None]]] = {
        "ceiling": lambda: ceiling_phase(args),
        "foundation": lambda: engine_phase(False, args),
        "drift+quality": lambda: engine_phase(True, args),
    }
    if args.profile:
        observe = phases["drift+quality"]()
        profiler = cProfile.Profile()
        profiler.runcall(measure, observe, data, args.seconds)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
        return
    rates: dict[str, list[float]] = {name: [] for name in phases}
    for _ in range(args.repeat):  # interleaved rounds: a noisy neighbour hits every phase
        for name, make in phases.items():
            rates[name].append(measure(make(), data, args.seconds))
    ceiling = statistics.median(rates["ceiling"])
    print(f"{'phase':<15} {'events/s':>12} {'µs/batch':>10} {'of ceiling':>11}  rounds")
    for name, values in rates.items():
        rate = statistics.median(values)
        spread = ", ".join(f"{v / 1e6:.2f}M" for v in values)
        print(
            f"{name:<15} {rate:>12,.0f} {args.rows / rate * 1e6:>10.1f} "
            f"{rate / ceiling:>10.1%}  {spread}"
        )
    full = statistics.median(rates["drift+quality"])
    verdict = "meets" if full >= TARGET_EVENTS_PER_S else "misses"
    print(
        f"drift+quality: {full / 1e6:.2f} M events/s {verdict} the target of "
        f"{TARGET_EVENTS_PER_S / 1e6:.0f} M events/s on one core ({full / TARGET_EVENTS_PER_S:.0%})"
    )


if __name__ == "__main__":
    main()
