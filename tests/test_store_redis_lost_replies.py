"""The Redis pending store loses no join when a reply is lost: a real redis-server, and a real
TCP proxy (tests/redis_server.py ``ReplyLosingProxy``) between the store and Redis that
forwards every request but drops the replies, so a take script runs and its caller times out.

Every scenario ends with the same check: each outcome joined exactly once, nothing left
pending, nothing left claimed, and nothing given back later by claim recovery.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import redis
from redis_server import RedisServer, ReplyLosingProxy

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb
from agent.store import PendingBatch
from agent.store.redis import RedisPendingPredictions, RedisUnavailableError

SECOND = 1_000_000_000
DAY = 86400 * SECOND
NOW = 1_700_000_000 * SECOND
MODEL = "churn"
TIMEOUT_S = 0.3
CLAIM_TIMEOUT_S = 1.0


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[ReplyLosingProxy]:
    proxy = ReplyLosingProxy(redis_server.port)
    yield proxy
    proxy.close()


def open_store(port: int) -> RedisPendingPredictions:
    return RedisPendingPredictions(
        f"redis://127.0.0.1:{port}/0",
        ttl_s=86400,
        timeout_s=TIMEOUT_S,
        claim_timeout_s=CLAIM_TIMEOUT_S,
    )


def batch(ids: list[str]) -> PendingBatch:
    scores = np.arange(len(ids), dtype=np.float64) / len(ids)
    return PendingBatch(MODEL, "v1", ids=ids, received_unix_nano=NOW, scores=scores)


def joined_ids(store: RedisPendingPredictions, ids: list[str]) -> list[str]:
    joined = store.take(MODEL, ids)
    return [id_ for id_, found in zip(ids, joined.found.tolist(), strict=True) if found]


def assert_settled(
    store: RedisPendingPredictions,
    direct: RedisPendingPredictions,
    client: redis.Redis,
    ids: list[str],
) -> None:
    """Once ``store`` has swept (which sends its last acknowledgement): nothing claimed,
    nothing pending, and claim recovery has nothing to give back."""
    assert store.expire(NOW) == {}
    assert client.zcard("mlsidecar:claims") == 0
    recovered = direct.recovered_claims
    time.sleep(CLAIM_TIMEOUT_S + 0.1)
    assert direct.expire(NOW) == {}
    assert direct.recovered_claims == recovered
    assert direct.take(MODEL, ids).joined == 0
    assert direct.pending_count() == 0


def test_a_take_whose_reply_is_lost_gives_its_rows_back_and_the_retry_joins_them(
    redis_server: RedisServer, proxy: ReplyLosingProxy
) -> None:
    direct = open_store(redis_server.port)
    store = open_store(proxy.port)
    client = redis_server.client()
    ids = [f"p{i}" for i in range(200)]
    direct.put(batch(ids))

    proxy.withhold()
    with pytest.raises(RedisUnavailableError, match="joining 200 outcomes"):
        store.take(MODEL, ids)
    assert proxy.dropped >= 1
    # Redis ran the script: the rows are claimed, out of reach of other takes.
    assert client.zcard("mlsidecar:claims") == 1
    assert direct.take(MODEL, ids).joined == 0

    proxy.deliver()
    joined = store.take(MODEL, ids)  # the client's retry: the claim is given back first
    assert joined.found.all()
    assert joined.scores.tolist() == batch(ids).scores.tolist()  # type: ignore[union-attr]
    assert_settled(store, direct, client, ids)
    store.close()
    direct.close()


def test_a_connection_cut_after_the_script_ran_is_resent_with_the_same_claim(
    redis_server: RedisServer, proxy: ReplyLosingProxy
) -> None:
    """redis-py resends a command once on a broken connection: with the same claim id, the
    resent take returns the rows the first one claimed instead of finding none."""
    direct = open_store(redis_server.port)
    store = open_store(proxy.port)
    client = redis_server.client()
    ids = [f"p{i}" for i in range(50)]
    direct.put(batch(ids))

    proxy.cut_next_reply()
    assert store.take(MODEL, ids).found.all()
    assert proxy.dropped == 1
    assert_settled(store, direct, client, ids)
    store.close()
    direct.close()


def test_an_acknowledgement_lost_with_the_next_take_is_resent_and_nothing_joins_twice(
    redis_server: RedisServer, proxy: ReplyLosingProxy
) -> None:
    """A take's claim is acknowledged by the store's next call; when that call's reply is
    lost too, the acknowledgement is resent and the first rows are not given back."""
    direct = open_store(redis_server.port)
    store = open_store(proxy.port)
    client = redis_server.client()
    first, second = [f"a{i}" for i in range(50)], [f"b{i}" for i in range(50)]
    direct.put(batch(first + second))

    assert joined_ids(store, first) == first
    assert client.zcard("mlsidecar:claims") == 1  # to be acknowledged with the next call
    proxy.withhold()
    with pytest.raises(RedisUnavailableError):
        store.take(MODEL, second)
    proxy.deliver()
    assert joined_ids(store, second) == second
    assert_settled(store, direct, client, first + second)
    store.close()
    direct.close()


def test_an_agent_that_vanishes_with_a_claim_has_it_recovered_by_another_replica(
    redis_server: RedisServer, proxy: ReplyLosingProxy
) -> None:
    direct = open_store(redis_server.port)
    store = open_store(proxy.port)
    client = redis_server.client()
    ids = [f"p{i}" for i in range(100)]
    direct.put(batch(ids))

    proxy.withhold()
    with pytest.raises(RedisUnavailableError):
        store.take(MODEL, ids)
    proxy.close()  # the agent is gone with the claim it never got
    store.close()

    assert direct.expire(NOW) == {}  # not yet: the taker may still settle it
    assert direct.recovered_claims == 0
    assert direct.take(MODEL, ids).joined == 0
    time.sleep(CLAIM_TIMEOUT_S + 0.1)
    assert direct.expire(NOW) == {}
    assert direct.recovered_claims == 1
    assert direct.pending_count(MODEL) == 100
    assert joined_ids(direct, ids) == ids
    assert_settled(direct, direct, client, ids)
    direct.close()


def test_outcome_batches_retried_through_lost_replies_each_join_exactly_once(
    redis_server: RedisServer, proxy: ReplyLosingProxy
) -> None:
    """Twenty outcome batches, a fault on most of them (reply lost, connection cut, or the
    acknowledgement lost), each retried by its client until the store answers."""
    direct = open_store(redis_server.port)
    store = open_store(proxy.port)
    client = redis_server.client()
    all_ids = [f"p{i}" for i in range(2000)]
    for start in range(0, 2000, 500):
        direct.put(batch(all_ids[start : start + 500]))

    joins: list[str] = []
    failures = 0
    for k in range(20):
        wanted = [*all_ids[k * 100 : (k + 1) * 100], f"orphan-{k}"]
        fault = k % 4
        if fault == 1:
            proxy.withhold()
        elif fault == 2:
            proxy.cut_next_reply()
        elif fault == 3:
            proxy.withhold(after=1)
        for _attempt in range(3):
            try:
                joins += joined_ids(store, wanted)
                break
            except RedisUnavailableError:
                failures += 1
                proxy.deliver()
        else:
            pytest.fail(f"outcome batch {k} never went through")
        proxy.deliver()

    assert failures == 5  # one per withheld reply
    assert sorted(joins) == sorted(all_ids)  # every outcome joined, none twice
    assert_settled(store, direct, client, all_ids)
    store.close()
    direct.close()


def test_rows_given_back_keep_their_batch_so_they_still_expire_as_unmatched(
    redis_server: RedisServer, proxy: ReplyLosingProxy
) -> None:
    """The lost take emptied the batch; giving the rows back re-creates it (version, receipt
    time), except for an id re-sent meanwhile, whose newer prediction stands."""
    direct = open_store(redis_server.port)
    store = open_store(proxy.port)
    ids = [f"p{i}" for i in range(100)]
    direct.put(batch(ids))
    proxy.withhold()
    with pytest.raises(RedisUnavailableError):
        store.take(MODEL, ids)
    proxy.deliver()
    direct.put(PendingBatch(MODEL, "v2", ids=["p0"], received_unix_nano=NOW + 2 * DAY))

    assert store.take(MODEL, ["unknown"]).joined == 0  # gives the claim back first
    assert direct.expire(NOW) == {}
    assert direct.pending_by_version() == {(MODEL, "v1"): 99, (MODEL, "v2"): 1}
    assert direct.expire(NOW + DAY + SECOND) == {(MODEL, "v1"): 99}  # past the 1-day TTL
    assert direct.take(MODEL, ["p0"]).versions == ["v2"]
    store.close()
    direct.close()


def test_a_model_forgotten_while_a_take_is_unsettled_does_not_come_back(
    redis_server: RedisServer, proxy: ReplyLosingProxy
) -> None:
    direct = open_store(redis_server.port)
    store = open_store(proxy.port)
    ids = [f"p{i}" for i in range(100)]
    direct.put(batch(ids))
    proxy.withhold()
    with pytest.raises(RedisUnavailableError):
        store.take(MODEL, ids)
    proxy.deliver()
    assert direct.forget(MODEL) == 0  # the rows were claimed, so not pending

    assert store.take(MODEL, ids).joined == 0  # the give-back finds nothing to give
    assert direct.expire(NOW) == {}
    assert direct.pending_count() == 0
    assert redis_server.client().keys(f"mlsidecar:m:{MODEL}:*") == []
    store.close()
    direct.close()


def test_an_outcome_batch_refused_for_a_lost_reply_joins_exactly_once_when_resent(
    redis_server: RedisServer, proxy: ReplyLosingProxy, start_agent: Any
) -> None:
    """Through a real agent: its store reaches Redis through the proxy; the outcome batch
    whose take reply is lost gets UNAVAILABLE, and the client's resend (same batch_id)
    joins every prediction once: the report's joined count and accuracy are exact."""
    harness = start_agent(
        engine={"window_s": 1e9, "warmup_rows": 0},
        store={
            "backend": "redis",
            "redis": {"url": f"redis://127.0.0.1:{proxy.port}/0", "timeout_s": TIMEOUT_S},
        },
    )
    stub = harness.stub()
    ids = [f"p{i}" for i in range(300)]
    labels = ["yes" if i % 3 else "no" for i in range(300)]
    sent = pb.PredictionBatch(model=MODEL, ids=ids, labels=labels, batch_id="predictions-1")
    assert stub.SubmitPredictions(sent).accepted == 300
    actual = ["yes"] * 300  # so accuracy is the share of "yes" predictions: 200 / 300
    outcomes = pb.OutcomeBatch(model=MODEL, ids=ids, actual_labels=actual, batch_id="outcomes-1")

    proxy.withhold()
    with pytest.raises(grpc.RpcError) as refused:
        stub.SubmitOutcomes(outcomes)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    proxy.deliver()
    assert stub.SubmitOutcomes(outcomes).accepted == 300  # the client's resend

    report = httpx.get(f"{harness.api_url}/v1/models/{MODEL}/health").json()
    assert report["outcomes"]["joined"] == 300
    assert report["outcomes"]["pending"] == 0
    assert report["totals"]["outcomes"] == 300  # the refused first send is not counted
    assert report["performance"]["accuracy"] == pytest.approx(200 / 300)
