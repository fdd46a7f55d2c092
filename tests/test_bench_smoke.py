"""The benchmarks still run: a small engine-memory run and our side of the peers bench.

They print figures rather than assert them; these only check that each exits 0 and prints
its table, verdict and JSON summary (the figures themselves are for bench/README.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def run_bench(*args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout.splitlines()


def test_memory_bench_in_engine_mode_prints_rss_per_checkpoint_and_a_verdict():
    lines = run_bench("bench/memory.py", "--mode", "engine", "--events", "200000")
    header = next(line for line in lines if "RSS MB" in line)
    assert header.split() == ["events", "RSS", "MB", "anon", "MB", "peak", "MB", "s", "events/s"]
    rows = [line.split()[0] for line in lines[lines.index(header) + 1 :][:6]]
    assert rows == ["0", "20,000", "50,000", "100,000", "150,000", "200,000"]
    assert any(line.startswith("growth 0.1 M -> 0.2 M events:") for line in lines)
    assert any(line.startswith("verdict: peak RSS") for line in lines)
    assert "counted: 200,000 events (verified)" in lines
    summary = json.loads(lines[-1])
    assert summary["bench"] == "memory" and summary["mode"] == "engine"
    assert [c["events"] for c in summary["checkpoints"]] == [
        0,
        20_000,
        50_000,
        100_000,
        150_000,
        200_000,
    ]
    assert all(c["rss_mb"] > 0 for c in summary["checkpoints"])
    assert summary["within_bound"] is True  # 200 k events stay far below 200 MB


def test_peers_bench_runs_our_side_alone_and_agrees_with_the_exact_drift_decisions():
    lines = run_bench("bench/peers.py", "--quick", "--ours-only")
    assert "peers: skipped (--ours-only)" in lines
    assert any("ours: Engine.observe_predictions" in line and "rows/s" in line for line in lines)
    assert any("ours: reference + count + report" in line for line in lines)
    assert any(line.split()[:3] == ["feature", "injected", "ours"] for line in lines)
    assert "  agreement on drifted or not: ours vs exact 20/20, ours vs injected 20/20" in lines
    summary = json.loads(lines[-1])
    assert summary["versions"] == {"whylogs": None, "evidently": None, "pandas": None}
    assert summary["profiling"]["rows"] == 20_000
    assert summary["profiling"]["ours_rows_per_s"] > 0
    (drift,) = summary["drift"]
    assert drift["rows"] == 10_000 and drift["ours_s"] > 0
    assert drift["agree_exact"] == drift["agree_injected"] == 20


def test_resources_bench_prints_ms_per_collection_for_every_case():
    lines = run_bench("bench/resources.py", "--n", "5")
    header = next(line for line in lines if line.startswith("case"))
    assert header.split() == ["case", "points", "median", "ms", "p90", "ms", "min", "ms"]
    summary = json.loads(lines[-1])
    assert summary["bench"] == "resources"
    assert set(summary["results"]) == {
        "sample only",
        "full, no host",
        "full",
        "full + sockets",
        "discovery",
    }
    assert all(r["median_ms"] > 0 for r in summary["results"].values())


def test_upstream_bench_prints_proxy_overhead_throughput_and_the_breaker_case():
    lines = run_bench("bench/upstream.py", "--quick")
    assert any(line.strip().startswith("added") for line in lines)
    summary = json.loads(lines[-1])
    assert summary["bench"] == "upstream"
    assert summary["throughput_rps"]["proxy"] > 0
    # 64 x 100 ms through one closed breaker overlap: far from pybreaker's 6.4 s.
    assert summary["breaker_64x100ms"]["adapter_alone_ms"] < 1000


def test_ingest_bench_sends_fresh_ids_and_joins_an_outcome_for_each_through_the_agent():
    lines = run_bench(
        "bench/ingest.py",
        "--quick",
        "--phases",
        "agent-columnar,agent-outcomes",
        "--rows",
        "200",
        "--features",
        "5",
    )
    summary = json.loads(lines[-1])
    phases = {p["phase"]: p for p in summary["phases"]}
    # "verified": the agent's own count (rows received, outcomes joined) covers every ack;
    # joins are only counted when each outcome finds its prediction pending, so the ids of
    # every prediction batch were new.
    assert phases["agent-columnar"]["verified"] is True
    assert phases["agent-outcomes"]["verified"] is True
    assert phases["agent-outcomes"]["events"] > 0
    assert any(line.startswith("outcome joins through the agent:") for line in lines)
    assert "meets_store_target" in summary


def test_client_bench_prints_call_percentiles_and_throughput_verified_by_the_agent():
    lines = run_bench("bench/client.py", "--quick", "--rate", "2000")
    header = next(line for line in lines if line.startswith("case"))
    assert header.split()[:3] == ["case", "calls", "p50"]
    assert any(line.startswith("throughput (one thread") for line in lines)
    assert "agent's own row count matches what the client sent: yes" in lines
    summary = json.loads(lines[-1])
    assert summary["bench"] == "client" and summary["verified"] is True
    call = summary["call"]
    assert call["calls"] == 2000 and 0 < call["p50_us"] <= call["p99_us"] <= call["max_us"]
    assert call["dropped"] == 0 and call["flushed"] is True
    assert summary["throughput"]["sent"] == 20_000
    assert summary["batch_form"]["sent"] == 20_000
