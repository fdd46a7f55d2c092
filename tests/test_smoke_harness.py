import httpx

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb


def test_agent_accepts_a_batch_and_reports_it(agent):
    ack = agent.stub().SubmitPredictions(
        pb.PredictionBatch(model="m", ids=["a", "b"], scores=[0.1, 0.9])
    )
    assert ack.accepted == 2
    models = httpx.get(agent.api_url + "/v1/models").json()["models"]
    assert [(m["model"], m["rows"]) for m in models] == [("m", 2)]
