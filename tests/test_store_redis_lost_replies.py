"""The Redis pending store loses no join when a reply is lost: a real redis-server, and a real
TCP proxy (tests/redis_server.py ``ReplyLosingProxy``) between the store and Redis that
forwards every request but drops the replies, so a take script runs and its caller times out.

Every scenario ends with the same check: each outcome joined exactly once, nothing left
pending, nothing left claimed, and nothing given back later by claim recovery.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass
class Stores:
    """One Redis seen two ways: ``store`` through the reply-losing proxy, ``direct`` not."""

    direct: RedisPendingPredictions
    store: RedisPendingPredictions
    client: redis.Redis
    proxy: ReplyLosingProxy

    def pending(self, rows: int, prefix: str = "p") -> list[str]:
        """``rows`` predictions put straight into Redis, pending for outcomes; their ids."""
        ids = [f"{prefix}{i}" for i in range(rows)]
        self.direct.put(batch(ids))
        return ids

    def assert_settled(
        self, ids: list[str], swept_by: RedisPendingPredictions | None = None
    ) -> None:
        """Once ``swept_by`` (the proxied store) has swept, which sends its last
        acknowledgement: nothing claimed, nothing pending, and claim recovery has nothing
        to give back."""
        direct = self.direct
        assert (swept_by or self.store).expire(NOW) == {}
        assert self.client.zcard("mlsidecar:claims") == 0
        recovered = direct.recovered_claims
        time.sleep(CLAIM_TIMEOUT_S + 0.1)
        assert direct.expire(NOW) == {}
        assert direct.recovered_claims == recovered
        assert direct.take(MODEL, ids).joined == 0
        assert direct.pending_count() == 0

    def take_with_reply_lost(self, ids: list[str], *, then_deliver: bool = True) -> None:
        """A take through the proxy whose reply is withheld (so it times out); Redis ran the
        script and claimed the rows. ``then_deliver``: let replies through again."""
        self.proxy.withhold()
        with pytest.raises(RedisUnavailableError, match=f"joining {len(ids)} outcomes"):
            self.store.take(MODEL, ids)
        if then_deliver:
            self.proxy.deliver()


@pytest.fixture
def stores(redis_server: RedisServer, proxy: ReplyLosingProxy) -> Iterator[Stores]:
    both = Stores(
        open_store(redis_server.port), open_store(proxy.port), redis_server.client(), proxy
    )
    yield both
    both.store.close()  # idempotent: a test may have closed it already
    both.direct.close()


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


def test_a_take_whose_reply_is_lost_gives_its_rows_back_and_the_retry_joins_them(
    stores: Stores,
) -> None:
    direct, store = stores.direct, stores.store
    ids = stores.pending(200)

    stores.proxy.withhold()
    with pytest.raises(RedisUnavailableError, match="joining 200 outcomes"):
        store.take(MODEL, ids)
    assert stores.proxy.dropped >= 1
    # Redis ran the script: the rows are claimed, out of reach of other takes.
    assert stores.client.zcard("mlsidecar:claims") == 1
    assert direct.take(MODEL, ids).joined == 0

    stores.proxy.deliver()
    joined = store.take(MODEL, ids)  # the client's retry: the claim is given back first
    assert joined.found.all()
    assert joined.scores.tolist() == batch(ids).scores.tolist()  # type: ignore[union-attr]
    stores.assert_settled(ids)


def test_a_connection_cut_after_the_script_ran_is_resent_with_the_same_claim(
    stores: Stores,
) -> None:
    """redis-py resends a command once on a broken connection: with the same claim id, the
    resent take returns the rows the first one claimed instead of finding none."""
    ids = stores.pending(50)
    stores.proxy.cut_next_reply()
    assert stores.store.take(MODEL, ids).found.all()
    assert stores.proxy.dropped == 1
    stores.assert_settled(ids)


def test_an_acknowledgement_lost_with_the_next_take_is_resent_and_nothing_joins_twice(
    stores: Stores,
) -> None:
    """A take's claim is acknowledged by the store's next call; when that call's reply is
    lost too, the acknowledgement is resent and the first rows are not given back."""
    first, second = stores.pending(50, "a"), stores.pending(50, "b")

    assert joined_ids(stores.store, first) == first
    assert stores.client.zcard("mlsidecar:claims") == 1  # acknowledged with the next call
    stores.take_with_reply_lost(second)
    assert joined_ids(stores.store, second) == second
    stores.assert_settled(first + second)


def test_an_agent_that_vanishes_with_a_claim_has_it_recovered_by_another_replica(
    stores: Stores,
) -> None:
    direct = stores.direct
    ids = stores.pending(100)
    stores.take_with_reply_lost(ids, then_deliver=False)
    stores.proxy.close()  # the agent is gone with the claim it never got
    stores.store.close()

    assert direct.expire(NOW) == {}  # not yet: the taker may still settle it
    assert direct.recovered_claims == 0
    assert direct.take(MODEL, ids).joined == 0
    time.sleep(CLAIM_TIMEOUT_S + 0.1)
    assert direct.expire(NOW) == {}
    assert direct.recovered_claims == 1
    assert direct.pending_count(MODEL) == 100
    assert joined_ids(direct, ids) == ids
    stores.assert_settled(ids, swept_by=direct)


def test_outcome_batches_retried_through_lost_replies_each_join_exactly_once(
    stores: Stores,
) -> None:
    """Twenty outcome batches, a fault on most of them (reply lost, connection cut, or the
    acknowledgement lost), each retried by its client until the store answers."""
    proxy = stores.proxy
    all_ids = [id_ for part in range(4) for id_ in stores.pending(500, f"p{part}-")]

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
                joins += joined_ids(stores.store, wanted)
                break
            except RedisUnavailableError:
                failures += 1
                proxy.deliver()
        else:
            pytest.fail(f"outcome batch {k} never went through")
        proxy.deliver()

    assert failures == 5  # one per withheld reply
    assert sorted(joins) == sorted(all_ids)  # every outcome joined, none twice
    stores.assert_settled(all_ids)


def test_rows_given_back_keep_their_batch_so_they_still_expire_as_unmatched(
    stores: Stores,
) -> None:
    """The lost take emptied the batch; giving the rows back re-creates it (version, receipt
    time), except for an id re-sent meanwhile, whose newer prediction stands."""
    direct = stores.direct
    ids = stores.pending(100)
    stores.take_with_reply_lost(ids)
    direct.put(PendingBatch(MODEL, "v2", ids=["p0"], received_unix_nano=NOW + 2 * DAY))

    assert stores.store.take(MODEL, ["unknown"]).joined == 0  # gives the claim back first
    assert direct.expire(NOW) == {}
    assert direct.pending_by_version() == {(MODEL, "v1"): 99, (MODEL, "v2"): 1}
    assert direct.expire(NOW + DAY + SECOND) == {(MODEL, "v1"): 99}  # past the 1-day TTL
    assert direct.take(MODEL, ["p0"]).versions == ["v2"]


def test_a_model_forgotten_while_a_take_is_unsettled_does_not_come_back(stores: Stores) -> None:
    direct = stores.direct
    ids = stores.pending(100)
    stores.take_with_reply_lost(ids)
    assert direct.forget(MODEL) == 0  # the rows were claimed, so not pending

    assert stores.store.take(MODEL, ids).joined == 0  # the give-back finds nothing to give
    assert direct.expire(NOW) == {}
    assert direct.pending_count() == 0
    assert stores.client.keys(f"mlsidecar:m:{MODEL}:*") == []


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
