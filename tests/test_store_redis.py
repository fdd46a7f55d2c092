"""The Redis pending store, against a real redis-server: the same answers as the SQLite
store, atomic takes across replicas, TTL / eviction / forget, and agents sharing one Redis.

Needs Debian's redis-server (`make system-deps` installs it).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis
from conftest import AgentHarness, agent_settings, free_port, mlsidecar_command, subprocess_env
from redis_server import RedisServer
from sklearn.metrics import accuracy_score
from test_outcome_join import MODEL, predictions, report

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb
from agent._proto.mlsidecar.v1 import ingest_pb2_grpc as pb_grpc
from agent.app import Agent
from agent.config import Settings
from agent.store import (
    JoinedPredictions,
    PendingBatch,
    SqlitePendingPredictions,
    StoreError,
    StoreFullError,
    StoreSchemaError,
)
from agent.store.redis import RedisPendingPredictions, RedisUnavailableError

SECOND = 1_000_000_000
DAY = 86400 * SECOND
NOW = 1_700_000_000 * SECOND
ENGINE = {"window_s": 1e9, "warmup_rows": 0}


@pytest.fixture
def open_store(redis_server: RedisServer) -> Iterator[Callable[..., RedisPendingPredictions]]:
    """Open stores (replicas) on the test's Redis; all closed at teardown."""
    opened: list[RedisPendingPredictions] = []

    def open_(**options: Any) -> RedisPendingPredictions:
        store = RedisPendingPredictions(redis_server.url, **options)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


def make_batch(
    ids: list[str], *, model: str = MODEL, version: str = "v1", received: int = NOW, **columns: Any
) -> PendingBatch:
    columns.setdefault("scores", np.linspace(0.0, 1.0, len(ids)))
    return PendingBatch(model, version, ids=ids, received_unix_nano=received, **columns)


def ids_of(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i}" for i in range(n)]


def assert_same_joined(redis_joined: JoinedPredictions, sqlite_joined: JoinedPredictions) -> None:
    a, b = redis_joined, sqlite_joined
    assert list(a.ids) == list(b.ids)
    assert a.found.tolist() == b.found.tolist()
    assert a.versions == b.versions
    assert a.received_unix_nano.tolist() == b.received_unix_nano.tolist()
    assert a.timestamps_unix_nano.tolist() == b.timestamps_unix_nano.tolist()
    np.testing.assert_array_equal(a.scores, b.scores)  # NaN == NaN here
    assert a.labels == b.labels
    assert a.class_names == b.class_names
    if b.probabilities is None:
        assert a.probabilities is None
    else:
        assert a.probabilities is not None
        np.testing.assert_array_equal(a.probabilities, b.probabilities)
    assert a.weights.tolist() == b.weights.tolist()
    assert a.trace_ids.tolist() == b.trace_ids.tolist()
    assert a.span_ids.tolist() == b.span_ids.tolist()
    assert [dict(x) for x in a.attributes] == [dict(x) for x in b.attributes]


def redis_bytes(client: redis.Redis, prefix: str) -> bytes:
    """Every key and value under ``prefix``, concatenated (to grep what is stored)."""
    out = []
    for key in client.scan_iter(f"{prefix}:*"):
        kind = client.type(key)
        out.append(key)
        if kind == b"hash":
            for field, value in client.hgetall(key).items():
                out += [field, value]
        elif kind == b"zset":
            out += client.zrange(key, 0, -1)
        elif kind == b"set":
            out += list(client.smembers(key))
        elif kind == b"string":
            out.append(client.get(key) or b"")
    return b"\0".join(out)


# -- the same answers as the SQLite store ---------------------------------------------------


def scenario(
    store: RedisPendingPredictions | SqlitePendingPredictions,
) -> list[Any]:
    """Puts (duplicates, two versions, class orders, missing columns), takes, eviction,
    expiry and forget; returns everything the store answered, in order."""
    rng = np.random.default_rng(11)
    answers: list[Any] = []
    a_ids = ids_of("p", 1000)
    scores = rng.random(1000)
    scores[::7] = np.nan
    store.put(
        make_batch(
            a_ids,
            timestamps_unix_nano=NOW - np.arange(1000, dtype=np.int64),
            scores=scores,
            labels=[f"l{i % 3}é" for i in range(1000)],
            probabilities=np.column_stack([scores, 1 - scores]),
            class_names=("yes", "no"),
            trace_ids=[rng.bytes(16) if i % 5 else b"" for i in range(1000)],
            span_ids=[rng.bytes(8) if i % 5 else b"" for i in range(1000)],
            attributes={"region": "eu"},
            weight=2.0,
        )
    )
    # p-900..p-999 re-sent under v2 (replace), with classes in another order plus one more.
    b_ids = ids_of("p", 1000)[900:] + ids_of("q", 400)
    store.put(
        make_batch(
            b_ids,
            version="v2",
            received=NOW + SECOND,
            probabilities=rng.dirichlet(np.ones(3), 500),
            class_names=("no", "yes", "maybe"),
            attributes={"region": "us"},
        )
    )
    # Repeated ids within a batch (the later row wins); no optional columns at all.
    store.put(PendingBatch(MODEL, "v1", ids=["r-1", "r-2", "r-1"], received_unix_nano=NOW + SECOND))
    store.put(make_batch(a_ids[:300], model="fraud", received=NOW + SECOND, labels=["x"] * 300))
    answers.append(sorted(store.pending_by_version().items()))

    wanted = [*a_ids[850:950], *b_ids[350:450], "nope", "r-1", "r-2", "r-1", "p-3"]
    wanted += ["p-3", *rng.choice(a_ids, 200, replace=False).tolist()]
    answers.append(store.take(MODEL, wanted))
    answers.append(store.take("fraud", ["p-1", "p-2", "q-1"]))
    answers.append(sorted(store.pending_by_version().items()))

    # Over max_pending (2500): the oldest whole batches go, counted at the next expire.
    store.put(make_batch(ids_of("e", 1500), version="v3", received=NOW + 2 * SECOND))
    answers.append(sorted(store.pending_by_version().items()))
    answers.append(store.expire(NOW + DAY // 2))
    answers.append(store.expire(NOW + DAY // 2))
    # Past the TTL (one day) for the batches received before NOW + 1.5 s.
    answers.append(store.expire(NOW + DAY + 3 * SECOND // 2))
    answers.append(sorted(store.pending_by_version().items()))
    answers.append(store.take(MODEL, ids_of("e", 1500)[::3]))
    answers.append(store.forget("fraud"))
    answers.append(store.take("fraud", a_ids[:300]))
    answers.append(sorted(store.pending_by_version().items()))
    stats = store.stats()
    answers.append((stats.pending, stats.batches, stats.evicted, stats.expired, stats.replaced))
    return answers


def test_the_same_scenario_gives_the_same_answers_as_the_sqlite_store(
    open_store: Callable[..., RedisPendingPredictions], tmp_path: Path
) -> None:
    sqlite = SqlitePendingPredictions(tmp_path / "pending.db", ttl_s=86400, max_pending=2500)
    try:
        expected = scenario(sqlite)
    finally:
        sqlite.close()
    answers = scenario(open_store(ttl_s=86400, max_pending=2500))

    assert len(answers) == len(expected)
    joins = 0
    for got, want in zip(answers, expected, strict=True):
        if isinstance(want, JoinedPredictions):
            assert_same_joined(got, want)
            joins += want.joined
        else:
            assert got == want
    # The scenario really exercised joins, eviction, expiry and replacement.
    assert joins > 500
    assert expected[5] and not expected[6] and expected[7]  # evicted, none, expired
    assert expected[-1][4] > 100  # replaced


# -- semantics, one at a time ---------------------------------------------------------------


def test_a_batch_of_ten_thousand_rows_is_stored_and_taken_in_one_call_each(
    open_store: Callable[..., RedisPendingPredictions], redis_server: RedisServer
) -> None:
    ids = [f"row-{i:05d}-é" for i in range(10_000)]  # the ingest limit, non-ASCII ids
    scores = np.random.default_rng(3).random(10_000)
    store = open_store()
    client = redis_server.client()
    client.config_resetstat()

    store.put(make_batch(ids, scores=scores, labels=[f"label-{i % 7}" for i in range(10_000)]))
    joined = store.take(MODEL, ids[::-1])

    assert joined.found.all()
    assert joined.scores.tolist() == scores[::-1].tolist()
    assert joined.labels == [f"label-{i % 7}" for i in range(9_999, -1, -1)]
    assert client.info("commandstats")["cmdstat_evalsha"]["calls"] == 2  # one round trip each
    # The take's claim is acknowledged with the store's next call (here the expire sweep).
    assert client.zcard("mlsidecar:claims") == 1
    store.expire(NOW)
    assert client.zcard("mlsidecar:claims") == 0


def test_a_duplicate_id_from_another_replica_replaces_the_older_prediction(
    open_store: Callable[..., RedisPendingPredictions],
) -> None:
    first, second = open_store(ttl_s=86400), open_store(ttl_s=86400)
    first.put(make_batch(["a", "b"], version="v1", scores=np.array([0.1, 0.2])))
    second.put(make_batch(["a"], version="v2", scores=np.array([0.9]), received=NOW + 1))

    joined = first.take(MODEL, ["a", "b"])

    assert joined.versions == ["v2", "v1"]
    assert joined.scores.tolist() == [0.9, 0.2]
    assert second.stats().replaced == 1
    # The replaced row is not unmatched: nothing is left to expire.
    assert first.expire(NOW + 2 * DAY) == {}
    assert first.pending_count() == 0


def test_two_replicas_taking_the_same_ids_at_once_join_each_exactly_once(
    open_store: Callable[..., RedisPendingPredictions],
) -> None:
    replicas = [open_store(), open_store()]
    all_ids = [f"id-{i}" for i in range(10_000)]
    for k in range(20):
        replicas[0].put(make_batch(all_ids[k * 500 : (k + 1) * 500], received=NOW + k))
    found: list[list[str]] = [[], []]
    start = threading.Barrier(2)

    def take_all(r: int) -> None:
        order = np.random.default_rng(r).permutation(len(all_ids))
        start.wait()
        for lo in range(0, len(order), 250):
            ids = [all_ids[i] for i in order[lo : lo + 250]]
            joined = replicas[r].take(MODEL, ids)
            found[r] += [ids[i] for i in np.flatnonzero(joined.found)]

    threads = [threading.Thread(target=take_all, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert not set(found[0]) & set(found[1])
    assert sorted(found[0] + found[1]) == sorted(all_ids)
    assert found[0] and found[1]  # both really raced
    assert replicas[1].expire(NOW) == {}
    assert replicas[1].pending_count() == 0 and replicas[1].stats().batches == 0


def test_expired_predictions_count_as_unmatched_per_version_once_across_replicas(
    open_store: Callable[..., RedisPendingPredictions], redis_server: RedisServer
) -> None:
    first, second = open_store(ttl_s=86400), open_store(ttl_s=86400)
    first.put(make_batch(ids_of("a", 300), version="v1", received=NOW))
    first.put(make_batch(ids_of("b", 200), version="v2", received=NOW + 10 * SECOND))
    first.put(make_batch(ids_of("c", 100), version="v1", received=NOW + 2 * DAY))
    assert first.take(MODEL, ids_of("a", 50)).joined == 50

    assert second.expire(NOW + DAY + 5 * SECOND) == {(MODEL, "v1"): 250}
    assert first.expire(NOW + DAY + 5 * SECOND) == {}  # counted once, by whoever came first
    assert first.expire(NOW + DAY + 11 * SECOND) == {(MODEL, "v2"): 200}

    assert first.take(MODEL, ["a-60", "b-0"]).joined == 0
    assert first.pending_count(MODEL, "v1") == 100 and first.pending_count(MODEL, "v2") == 0
    # Expiry removed the stored rows too, not just the counts.
    assert redis_server.client().hlen(f"mlsidecar:m:{MODEL}:ids") == 100


def test_max_pending_evicts_the_oldest_batches_and_another_replica_counts_them(
    open_store: Callable[..., RedisPendingPredictions],
) -> None:
    first, second = open_store(max_pending=250), open_store(max_pending=250)
    first.put(make_batch(ids_of("a", 100), version="v1", received=NOW))
    first.put(make_batch(ids_of("b", 100), version="v2", received=NOW + 1))
    second.put(make_batch(ids_of("c", 100), version="v1", received=NOW + 2))

    assert second.pending_count() == 200
    assert second.stats().evicted == 100
    assert first.take(MODEL, ids_of("a", 100)).joined == 0
    assert first.expire(NOW) == {(MODEL, "v1"): 100}
    assert second.expire(NOW) == {}
    assert first.take(MODEL, ids_of("b", 100) + ids_of("c", 100)).joined == 200


def test_forget_drops_a_model_and_its_uncounted_evictions(
    open_store: Callable[..., RedisPendingPredictions], redis_server: RedisServer
) -> None:
    store = open_store(max_pending=300, ttl_s=86400)
    store.put(make_batch(ids_of("a", 100), model="churn", received=NOW))
    store.put(make_batch(ids_of("a", 150), model="fraud", received=NOW + 1))
    store.put(make_batch(ids_of("b", 100), model="churn", received=NOW + 2))  # evicts churn a-*

    assert store.forget("churn") == 100
    client = redis_server.client()
    batches = client.zrange("mlsidecar:batches", 0, -1)
    assert [m[16:] for m in batches] == [b"fraud"]  # the sweep will not meet churn's batches
    assert store.take("churn", ids_of("b", 100)).joined == 0
    assert store.pending_count("churn") == 0 and store.pending_count("fraud") == 150
    # Neither the forgotten rows nor the eviction before the forget count as unmatched.
    assert store.expire(NOW + 2 * DAY) == {("fraud", "v1"): 150}
    assert [k for k in client.scan_iter("mlsidecar:*") if b"churn" in k] == []


def test_pending_count_needs_no_round_trip_and_every_expire_refreshes_it(
    open_store: Callable[..., RedisPendingPredictions], redis_server: RedisServer
) -> None:
    first = open_store()
    second = open_store()  # opened before the puts: its counts are stale until it calls Redis
    first.put(make_batch(ids_of("a", 30), version="v1"))
    first.put(make_batch(ids_of("b", 20), version="v2"))
    first.put(make_batch(ids_of("a", 5), model="fraud"))
    assert second.pending_count() == 0
    assert second.expire(NOW) == {}
    assert second.pending_count() == 55
    assert second.pending_count(MODEL) == 50
    assert second.pending_count(MODEL, "v2") == 20
    assert second.pending_count("fraud", "v2") == 0

    redis_server.stop()
    # Cached: a report can still be built while Redis is away.
    assert first.pending_count(MODEL, "v1") == 30
    assert first.stats().pending == 55


def test_a_prefix_holding_another_schema_version_is_refused(
    open_store: Callable[..., RedisPendingPredictions], redis_server: RedisServer
) -> None:
    client = redis_server.client()
    client.set("old:schema", "2")
    with pytest.raises(StoreSchemaError, match=r"'old' are schema version 2, .* understands 1"):
        RedisPendingPredictions(redis_server.url, key_prefix="old")

    store = open_store(key_prefix="live")
    store.put(make_batch(["a"]))
    client.set("live:schema", "3")  # e.g. a newer mlsidecar took the prefix over
    with pytest.raises(StoreSchemaError, match="schema version 3"):
        store.put(make_batch(["b"]))
    with pytest.raises(StoreSchemaError):
        store.take(MODEL, ["a"])
    assert client.hkeys(f"live:m:{MODEL}:ids") == [b"a"]  # the refused calls changed nothing
    # Another prefix on the same Redis is another store.
    assert open_store(key_prefix="other").take(MODEL, ["a"]).joined == 0


def test_redis_at_maxmemory_refuses_a_put_as_store_full_and_still_joins(
    open_store: Callable[..., RedisPendingPredictions], redis_server: RedisServer
) -> None:
    store = open_store()
    store.put(make_batch(ids_of("a", 1000)))
    client = redis_server.client()
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 64 * 1024)

    refused = -1
    for k in range(50):  # ~100 KB of rows each
        try:
            store.put(make_batch(ids_of(f"big{k}", 1000), labels=["x" * 60] * 1000))
        except StoreFullError as error:
            assert "maxmemory" in str(error)
            refused = k
            break
    assert refused >= 0
    assert store.take(MODEL, ids_of(f"big{refused}", 1000)).joined == 0  # nothing of it stored
    assert store.take(MODEL, ids_of("a", 1000)).joined == 1000  # takes free memory: allowed


def test_an_unreachable_redis_fails_the_open_naming_host_and_port_but_not_the_password() -> None:
    port = free_port()
    with pytest.raises(RedisUnavailableError) as caught:
        RedisPendingPredictions(f"redis://app:hunter2-secret@127.0.0.1:{port}/0", timeout_s=1)
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    assert isinstance(caught.value, StoreError) and isinstance(caught.value, OSError)


def test_calls_fail_while_redis_is_down_and_work_again_when_it_is_back(tmp_path: Path) -> None:
    """With appendonly + appendfsync always, an acknowledged put also survives the restart."""
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    store = RedisPendingPredictions(server.url, timeout_s=1)
    try:
        store.put(make_batch(ids_of("a", 100)))
        server.stop()
        with pytest.raises(RedisUnavailableError, match=f"127.0.0.1:{server.port}"):
            store.put(make_batch(ids_of("b", 100)))
        with pytest.raises(RedisUnavailableError):
            store.take(MODEL, ["a-1"])

        server.start()
        store.put(make_batch(ids_of("c", 100)))
        assert store.take(
            MODEL, ids_of("a", 100) + ids_of("b", 100) + ids_of("c", 100)
        ).found.tolist() == ([True] * 100 + [False] * 100 + [True] * 100)
    finally:
        store.close()
        server.stop()


# -- agents sharing one Redis ---------------------------------------------------------------


def redis_store_settings(server: RedisServer, **extra: Any) -> dict[str, Any]:
    return {
        "backend": "redis",
        "redis": {"url": server.url, "key_prefix": "agents", "timeout_s": 1},
        **extra,
    }


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        time.sleep(0.05)


def test_outcomes_sent_to_another_replica_join_predictions_sent_to_the_first(
    start_agent: Callable[..., AgentHarness], redis_server: RedisServer
) -> None:
    store = redis_store_settings(redis_server, expire_interval_s=0.2)
    first = start_agent(engine=ENGINE, store=dict(store))
    second = start_agent(engine=ENGINE, store=dict(store))
    ids = [f"p{i}" for i in range(400)]
    batch, predicted = predictions(ids)
    batch.features.add(name="plan", categories=pb.CategoryValues(values=["FEATURE-XYZ"] * 400))
    assert first.stub().SubmitPredictions(batch).accepted == 400
    second.stub().SubmitPredictions(predictions(["seen-here"])[0])  # replica 2 knows the model
    actual = np.random.default_rng(2).choice(["yes", "no"], 300).tolist()

    ack = second.stub().SubmitOutcomes(
        pb.OutcomeBatch(model=MODEL, ids=ids[:300], actual_labels=actual)
    )

    assert ack.accepted == 300
    rep = report(second.api_url)
    assert rep["outcomes"]["joined"] == 300
    assert rep["outcomes"]["pending"] == 101
    assert rep["performance"]["accuracy"] == pytest.approx(accuracy_score(actual, predicted[:300]))
    assert report(first.api_url)["outcomes"]["joined"] == 0
    # The first replica's pending count follows, from its periodic refresh.
    wait_for(lambda: report(first.api_url)["outcomes"]["pending"] == 101)
    stored = redis_bytes(redis_server.client(), "agents")
    assert b"p350" in stored and b"FEATURE-XYZ" not in stored  # outputs kept, features never


@pytest.mark.slow
def test_acknowledged_predictions_join_after_an_agent_is_killed_with_sigkill(
    agent_process: Callable[..., Any], redis_server: RedisServer
) -> None:
    env = subprocess_env(
        MLSIDECAR_TELEMETRY__OTLP="false",
        MLSIDECAR_ENGINE__WARMUP_ROWS="0",
        MLSIDECAR_STORE__BACKEND="redis",
        MLSIDECAR_STORE__REDIS__URL=redis_server.url,
    )
    first = agent_process(env=env)
    first.wait_started()
    acked: list[str] = []
    with grpc.insecure_channel(first.ingest_target) as channel:
        stub = pb_grpc.IngestStub(channel)
        for n in range(10):
            ids = [f"b{n}-{i}" for i in range(100)]
            assert stub.SubmitPredictions(predictions(ids, seed=n)[0]).accepted == 100
            acked += ids
    first.kill()
    assert first.proc.returncode == -9

    second = agent_process(env=env)
    second.wait_started()
    with grpc.insecure_channel(second.ingest_target) as channel:
        stub = pb_grpc.IngestStub(channel)
        stub.SubmitPredictions(predictions(["after"])[0])
        stub.SubmitOutcomes(
            pb.OutcomeBatch(model=MODEL, ids=acked, actual_labels=["yes"] * len(acked))
        )
    rep = report(second.api_url)
    assert rep["outcomes"]["joined"] == len(acked) == 1000
    assert rep["outcomes"]["pending"] == 1


def test_a_prediction_batch_is_refused_unavailable_while_redis_is_down_then_accepted(
    start_agent: Callable[..., AgentHarness], redis_server: RedisServer
) -> None:
    harness = start_agent(engine=ENGINE, store=redis_store_settings(redis_server))
    stub = harness.stub()
    stub.SubmitPredictions(predictions(["before"])[0])
    batch, _ = predictions([f"d{i}" for i in range(50)], seed=5)
    batch.batch_id = "while-down"

    redis_server.stop()
    with pytest.raises(grpc.RpcError) as refused:
        stub.SubmitPredictions(batch)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "127.0.0.1" in (refused.value.details() or "")
    assert report(harness.api_url)["totals"]["rows"] == 1  # not counted, not acknowledged

    redis_server.start()
    ack = stub.SubmitPredictions(batch)  # the client's retry of the same batch
    assert (ack.accepted, ack.duplicate) == (50, False)
    stub.SubmitOutcomes(
        pb.OutcomeBatch(model=MODEL, ids=list(batch.ids), actual_labels=["no"] * 50)
    )
    rep = report(harness.api_url)
    assert rep["totals"]["rows"] == 51
    assert rep["outcomes"]["joined"] == 50


# -- configuration and secrets --------------------------------------------------------------


def test_backend_redis_needs_a_url_and_reads_it_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLSIDECAR_STORE__BACKEND", "redis")
    with pytest.raises(ValueError, match=r"store\.redis\.url is required"):
        Settings.load(None)
    monkeypatch.setenv("MLSIDECAR_STORE__REDIS__URL", "redis://10.0.0.7:6380/2")
    monkeypatch.setenv("MLSIDECAR_STORE__REDIS__KEY_PREFIX", "fraud")
    store = Settings.load(None).store
    assert store.backend == "redis" and store.redis.key_prefix == "fraud"
    assert store.redis.url is not None
    assert store.redis.url.get_secret_value() == "redis://10.0.0.7:6380/2"
    assert Settings.load(None).store.redis.timeout_s == 2.0


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [mlsidecar_command(), *args], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.slow
def test_the_redis_password_never_shows_in_config_show_errors_or_logs(
    agent_process: Callable[..., Any], tmp_path: Path
) -> None:
    password = "pw-Zq81-never-print-me"
    server = RedisServer(tmp_path / "redis", password=password).start()
    try:
        env = subprocess_env(
            MLSIDECAR_TELEMETRY__OTLP="false",
            MLSIDECAR_STORE__BACKEND="redis",
            MLSIDECAR_STORE__REDIS__URL=server.url,
            MLSIDECAR_STORE__EXPIRE_INTERVAL_S="0.2",
        )
        shown = run_cli("config", "show", env=env)
        as_json = run_cli("config", "show", "--format", "json", env=env)
        assert shown.returncode == 0 and as_json.returncode == 0, shown.stderr + as_json.stderr
        url = json.loads(as_json.stdout)["store"]["redis"]["url"]
        assert url == f"redis://:**********@127.0.0.1:{server.port}/0"
        assert password not in shown.stdout + as_json.stdout

        bad = run_cli(
            "config", "show", env={**env, "MLSIDECAR_STORE__REDIS__URL": f"http://:{password}@x"}
        )
        assert bad.returncode == 2 and "store.redis.url" in bad.stderr
        assert password not in bad.stdout + bad.stderr

        agent = agent_process("--log-level", "DEBUG", env=env)
        started = agent.wait_started()
        assert started["pending_store"] == f"redis://127.0.0.1:{server.port}/0"
        with grpc.insecure_channel(agent.ingest_target) as channel:
            pb_grpc.IngestStub(channel).SubmitPredictions(predictions(["a", "b"])[0])
        server.stop()  # store calls now fail, and the failures are logged
        agent.wait_for_log("expiring pending predictions failed")
        assert agent.terminate()[0] == 0
        logs = "\n".join(agent.stderr_lines + agent.stdout_lines)
        assert f"127.0.0.1:{server.port}" in logs and password not in logs

        listen = ("--ingest-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0")
        down = run_cli("run", *listen, env=env)  # Redis is still stopped
        assert down.returncode == 1
        assert f"cannot reach Redis at 127.0.0.1:{server.port}" in down.stderr
        assert password not in down.stdout + down.stderr

        server.start()
        wrong = server.url.replace(password, "wrong-pw-Zq81")
        with pytest.raises(RedisUnavailableError, match="refused the credentials") as denied:
            RedisPendingPredictions(wrong)
        assert "wrong-pw" not in str(denied.value)
    finally:
        server.stop()


def test_a_redis_that_is_down_at_start_stops_the_agent_from_starting() -> None:
    port = free_port()
    settings = agent_settings(
        store={"backend": "redis", "redis": {"url": f"redis://:s3cr3t@127.0.0.1:{port}/0"}}
    )
    with pytest.raises(RedisUnavailableError) as caught:
        Agent(settings)
    assert f"cannot reach Redis at 127.0.0.1:{port}" in str(caught.value)
    assert "s3cr3t" not in str(caught.value)
