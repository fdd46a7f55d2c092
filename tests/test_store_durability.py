"""What survives kill -9: a child process stores predictions (or joins them) and prints a
line after each call returns; the test SIGKILLs it mid-stream and reopens the file.

Every acknowledged put must be takeable after the kill, every acknowledged take must stay
taken, and a call in flight is all or nothing (never half a batch).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from agent.store import SqlitePendingPredictions

pytestmark = pytest.mark.slow

ROWS = 200
ACKS_BEFORE_KILL = 40

CHILD = r"""
import itertools, sys, threading
import numpy as np
from agent.store import GroupCommitPendingPredictions, PendingBatch, SqlitePendingPredictions

path, mode, synchronous, rows = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
store = SqlitePendingPredictions(path, synchronous=synchronous)
say = threading.Lock()

def batch(k):
    return PendingBatch(
        "churn", "v1", ids=[f"b{k}-{i}" for i in range(rows)], received_unix_nano=k,
        scores=k + np.arange(rows) / 1000, labels=[f"l{k}"] * rows,
        trace_ids=[(k + 1).to_bytes(16, "big")] * rows,
    )

def report(line):
    with say:
        print(line, flush=True)

if mode == "plain":
    for k in itertools.count():
        store.put(batch(k))
        report(f"acked {k}")
elif mode == "group":
    writer = GroupCommitPendingPredictions(store)
    def put_every(start):
        for k in itertools.count(start, 4):
            writer.put(batch(k))
            report(f"acked {k}")
    for start in range(4):
        threading.Thread(target=put_every, args=(start,)).start()
    threading.Event().wait()
elif mode == "take":
    for k in range(100):
        store.put(batch(k))
    report("stored 100")
    for k in itertools.count():
        store.take("churn", [f"b{k % 100}-{i}" for i in range(rows)])
        report(f"taken {k}")
"""


def run_until_killed(tmp_path: Path, mode: str, synchronous: str, prefix: str) -> list[int]:
    """Start the child, SIGKILL it after enough acknowledgements; the numbers it printed."""
    path = tmp_path / "pending.db"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), mode, synchronous, str(ROWS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    acked: list[int] = []
    assert child.stdout is not None
    try:
        deadline = time.monotonic() + 60
        for line in child.stdout:
            if line.startswith(prefix):
                acked.append(int(line.split()[1]))
            if len(acked) >= ACKS_BEFORE_KILL or time.monotonic() > deadline:
                break
        os.kill(child.pid, signal.SIGKILL)
        # Lines printed before the kill are acknowledgements too.
        rest, errors = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
    acked += [int(line.split()[1]) for line in rest.splitlines() if line.startswith(prefix)]
    assert child.returncode == -signal.SIGKILL, errors
    assert len(acked) >= ACKS_BEFORE_KILL, f"child acknowledged only {len(acked)}:\n{errors}"
    return acked


def batch_ids(k: int) -> list[str]:
    return [f"b{k}-{i}" for i in range(ROWS)]


@pytest.mark.parametrize(
    ("mode", "synchronous"),
    [("plain", "NORMAL"), ("group", "NORMAL"), ("group", "OFF"), ("plain", "FULL")],
)
def test_every_acknowledged_put_survives_kill_9(
    tmp_path: Path, mode: str, synchronous: str
) -> None:
    acked = run_until_killed(tmp_path, mode, synchronous, "acked")

    store = SqlitePendingPredictions(tmp_path / "pending.db")
    try:
        for k in sorted(acked):
            joined = store.take("churn", batch_ids(k))
            assert joined.found.all(), f"acknowledged batch {k} lost rows after kill -9"
            assert joined.scores.tolist() == (k + np.arange(ROWS) / 1000).tolist()
            assert set(joined.labels) == {f"l{k}"}
            assert joined.trace_id(0) == (k + 1).to_bytes(16, "big")
        # Batches in flight at the kill: each is there whole or not at all.
        in_flight = set(range(max(acked) + 8)) - set(acked)
        for k in in_flight:
            found = store.take("churn", batch_ids(k)).found
            assert found.all() or not found.any(), f"batch {k} is half stored"
        assert store.pending_count() == 0
    finally:
        store.close()


def test_every_acknowledged_take_stays_taken_after_kill_9(tmp_path: Path) -> None:
    taken = run_until_killed(tmp_path, "take", "NORMAL", "taken")
    last = max(taken)
    assert last < 100  # the kill came before the takes wrapped around

    store = SqlitePendingPredictions(tmp_path / "pending.db")
    try:
        for k in range(100):
            found = store.take("churn", batch_ids(k)).found
            if k in taken:
                assert not found.any(), f"acknowledged take of batch {k} undone by kill -9"
            elif k == last + 1:
                assert found.all() or not found.any(), "the take in flight is half done"
            else:
                assert found.all(), f"batch {k} was never taken but is gone"
    finally:
        store.close()
