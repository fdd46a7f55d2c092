"""Outcomes join their predictions by id through the durable pending store, end to end."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from conftest import AgentHarness, agent_settings, subprocess_env
from sklearn.metrics import accuracy_score, mean_absolute_error

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb
from agent._proto.mlsidecar.v1 import ingest_pb2_grpc as pb_grpc

MODEL = "churn"
ENGINE = {"window_s": 1e9, "warmup_rows": 0}


def predictions(ids: list[str], seed: int = 1) -> tuple[pb.PredictionBatch, list[str]]:
    rng = np.random.default_rng(seed)
    scores = rng.random(len(ids))
    labels = np.where(scores >= 0.5, "yes", "no").tolist()
    batch = pb.PredictionBatch(
        model=MODEL, model_version="v1", ids=ids, scores=scores, labels=labels
    )
    return batch, labels


def report(api_url: str) -> dict[str, Any]:
    response = httpx.get(f"{api_url}/v1/models/{MODEL}/health")
    assert response.status_code == 200, response.text
    return response.json()


def test_outcomes_join_their_predictions_and_accuracy_matches_sklearn(start_agent):
    harness = start_agent(engine=ENGINE)
    stub = harness.stub()
    ids = [f"p{i}" for i in range(400)]
    batch, predicted = predictions(ids)
    stub.SubmitPredictions(batch)
    rng = np.random.default_rng(2)
    actual = rng.choice(["yes", "no"], 300).tolist()
    ack = stub.SubmitOutcomes(pb.OutcomeBatch(model=MODEL, ids=ids[:300], actual_labels=actual))
    assert ack.accepted == 300

    rep = report(harness.api_url)
    assert rep["outcomes"]["joined"] == 300
    assert rep["outcomes"]["pending"] == 100
    performance = rep["performance"]
    assert performance["kind"] == "classification"
    assert performance["accuracy"] == pytest.approx(accuracy_score(actual, predicted[:300]))
    assert rep["outcomes"]["label_delay_s"]["count"] == 300
    # A prediction joins once: the same outcomes again find nothing pending.
    stub.SubmitOutcomes(pb.OutcomeBatch(model=MODEL, ids=ids[:10], actual_labels=actual[:10]))
    assert report(harness.api_url)["outcomes"]["joined"] == 300


def test_regression_outcomes_give_mae_against_the_scores(start_agent):
    harness = start_agent(engine=ENGINE)
    stub = harness.stub()
    ids = [f"r{i}" for i in range(200)]
    batch, _ = predictions(ids, seed=3)
    stub.SubmitPredictions(batch)
    actual = np.random.default_rng(4).random(200)
    stub.SubmitOutcomes(pb.OutcomeBatch(model=MODEL, ids=ids, actual_values=actual))

    performance = report(harness.api_url)["performance"]
    assert performance["kind"] == "regression"
    assert performance["mae"] == pytest.approx(mean_absolute_error(actual, list(batch.scores)))


def test_an_outcome_arriving_before_its_prediction_joins_when_the_prediction_comes(start_agent):
    harness = start_agent(engine=ENGINE)
    stub = harness.stub()
    stub.SubmitOutcomes(pb.OutcomeBatch(model=MODEL, ids=["early"], actual_labels=["yes"]))
    assert report(harness.api_url)["outcomes"]["joined"] == 0
    batch, _ = predictions(["early", "other"])
    stub.SubmitPredictions(batch)
    rep = report(harness.api_url)
    assert rep["outcomes"]["joined"] == 1
    assert rep["outcomes"]["pending"] == 1


def test_pending_predictions_survive_a_restart_and_still_join(tmp_path):
    settings = agent_settings(engine=ENGINE, store={"data_dir": str(tmp_path)})
    first = AgentHarness(settings).start()
    ids = [f"k{i}" for i in range(50)]
    first.stub().SubmitPredictions(predictions(ids)[0])
    first.stop()

    second = AgentHarness(agent_settings(engine=ENGINE, store={"data_dir": str(tmp_path)})).start()
    try:
        stub = second.stub()
        stub.SubmitOutcomes(pb.OutcomeBatch(model=MODEL, ids=ids, actual_labels=["yes"] * 50))
        stub.SubmitPredictions(predictions(["fresh"])[0])  # the model is known again
        assert report(second.api_url)["outcomes"]["joined"] == 50
    finally:
        second.stop()


def test_forgetting_a_model_drops_its_pending_predictions(start_agent):
    harness = start_agent(engine=ENGINE)
    harness.stub().SubmitPredictions(predictions(["a", "b", "c"])[0])
    response = httpx.delete(f"{harness.api_url}/v1/models/{MODEL}")
    assert response.json()["forgotten_pending"] == 3


@pytest.mark.slow
def test_acknowledged_predictions_join_after_the_agent_is_killed_with_sigkill(
    agent_process, tmp_path
):
    env = subprocess_env(
        MLSIDECAR_STORE__DATA_DIR=str(tmp_path),
        MLSIDECAR_TELEMETRY__OTLP="false",
        MLSIDECAR_ENGINE__WARMUP_ROWS="0",
    )
    first = agent_process(env=env)
    first.wait_started()
    acked: list[str] = []
    with grpc.insecure_channel(first.ingest_target) as channel:
        stub = pb_grpc.IngestStub(channel)
        for n in range(20):
            ids = [f"b{n}-{i}" for i in range(100)]
            assert stub.SubmitPredictions(predictions(ids, seed=n)[0]).accepted == 100
            acked += ids
    first.kill()  # SIGKILL: no shutdown, no flush
    assert first.proc.returncode == -9

    second = agent_process(env=env)
    second.wait_started()
    with grpc.insecure_channel(second.ingest_target) as channel:
        stub = pb_grpc.IngestStub(channel)
        stub.SubmitOutcomes(
            pb.OutcomeBatch(model=MODEL, ids=acked, actual_labels=["yes"] * len(acked))
        )
        stub.SubmitPredictions(predictions(["after"])[0])
    rep = report(second.api_url)
    assert rep["outcomes"]["joined"] == len(acked) == 2000
    assert rep["outcomes"]["pending"] == 1


def test_copies_of_a_batch_sent_at_once_are_stored_and_counted_once(start_agent):
    """A client that times out and retries can have two copies in flight at the same time."""
    harness = start_agent(engine=ENGINE)
    batch, _ = predictions([f"c{i}" for i in range(500)])
    batch.batch_id = "retry-me"

    async def send_copies() -> list[pb.SubmitResponse]:
        async with grpc.aio.insecure_channel(harness.ingest_target) as channel:
            stub = pb_grpc.IngestStub(channel)
            return list(await asyncio.gather(*(stub.SubmitPredictions(batch) for _ in range(8))))

    acks = asyncio.run(send_copies())
    assert [a.accepted for a in acks] == [500] * 8
    assert sorted(a.duplicate for a in acks) == [False] + [True] * 7
    rep = report(harness.api_url)
    assert rep["totals"]["rows"] == 500
    assert rep["outcomes"]["pending"] == 500
