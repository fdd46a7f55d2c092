"""ML health through the real agent: references (warm-up, upload, file, restart), drift, health."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import AgentHarness, agent_settings
from metric_data import data_points

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb
from agent.engine import ReferenceProfile
from agent.references import References

MODEL = "credit"
# One long window, so a window boundary never passes mid-test.
ENGINE = {"window_s": 1e9, "min_window_rows": 200, "warmup_rows": 1000}


class Traffic:
    """Batches of a two-feature credit model; ``shift`` moves income by that many std."""

    def __init__(self, seed: int = 1) -> None:
        self.rng = np.random.default_rng(seed)
        self.next_id = 0

    def batch(self, rows: int = 500, *, shift: float = 0.0) -> pb.PredictionBatch:
        rng = self.rng
        ids = [f"p{self.next_id + i}" for i in range(rows)]
        self.next_id += rows
        return pb.PredictionBatch(
            model=MODEL,
            model_version="v1",
            ids=ids,
            features=[
                pb.Column(
                    name="income",
                    numbers=pb.NumberValues(values=rng.normal(50 + 10 * shift, 10, rows)),
                ),
                pb.Column(name="age", numbers=pb.NumberValues(values=rng.normal(40, 12, rows))),
                pb.Column(
                    name="region",
                    categories=pb.CategoryValues(values=rng.choice(["n", "s", "e"], rows).tolist()),
                ),
            ],
            scores=rng.beta(2, 5, rows),
        )


def report(harness: AgentHarness) -> dict[str, Any]:
    response = httpx.get(f"{harness.api_url}/v1/models/{MODEL}/health")
    assert response.status_code == 200, response.text
    return response.json()


def drifted(rep: dict[str, Any]) -> dict[str, bool]:
    return {
        name: feature["drift"]["drifted"]
        for name, feature in rep["features"].items()
        if "drift" in feature
    }


def test_the_first_predictions_become_the_reference_and_it_survives_a_restart(
    start_agent, tmp_path
):
    traffic = Traffic()
    harness = start_agent(engine=ENGINE, store={"data_dir": str(tmp_path)})
    stub = harness.stub()
    stub.SubmitPredictions(traffic.batch(600))
    assert report(harness)["reference"] is None
    assert report(harness)["warmup"] == {"rows": 600, "target": 1000}
    stub.SubmitPredictions(traffic.batch(600))

    reference = report(harness)["reference"]
    assert reference["source"] == "warmup"
    assert reference["rows"] == 1000
    assert reference["features"] == 3
    saved = list((tmp_path / "references" / MODEL / "v1").glob("*.json"))
    assert len(saved) == 1 and reference["id"] in saved[0].name
    harness.stop()

    restarted = AgentHarness(
        agent_settings(engine=ENGINE, store={"data_dir": str(tmp_path)})
    ).start()
    try:
        restarted.stub().SubmitPredictions(traffic.batch(300))
        again = report(restarted)
        assert again["reference"]["id"] == reference["id"]
        assert again["warmup"] is None  # no second warm-up after a restart
    finally:
        restarted.stop()


def test_a_shifted_feature_is_flagged_and_the_health_score_says_why(start_agent):
    traffic = Traffic()
    harness = start_agent(engine=ENGINE)
    stub = harness.stub()
    stub.SubmitPredictions(traffic.batch(1000))  # the warm-up reference
    stub.SubmitPredictions(traffic.batch(1000, shift=1.0))

    rep = report(harness)
    assert rep["evaluated_window"] == "current"
    assert drifted(rep) == {"income": True, "age": False, "region": False}
    income = rep["features"]["income"]["drift"]
    assert income["psi"] > 0.2
    assert rep["dataset_drift"]["share"] == pytest.approx(1 / 3)
    assert rep["dataset_drift"]["drifted"] is False
    assert rep["health"]["score"] < 100
    assert any(
        reason.startswith("drift: 1/3 features (PSI income=") for reason in rep["health"]["reasons"]
    )
    # The same report over gRPC.
    health = stub.GetModelHealth(pb.ModelHealthRequest(model=MODEL))
    assert health.health_score == rep["health"]["score"]


def test_the_same_distribution_is_not_flagged(start_agent):
    traffic = Traffic(seed=3)
    harness = start_agent(engine=ENGINE)
    stub = harness.stub()
    stub.SubmitPredictions(traffic.batch(1000))
    for _ in range(4):
        stub.SubmitPredictions(traffic.batch(500))

    rep = report(harness)
    assert drifted(rep) == {"income": False, "age": False, "region": False}
    assert rep["dataset_drift"]["drifted"] is False
    assert rep["prediction"]["drift"]["drifted"] is False
    assert rep["health"]["status"] == "healthy"


def test_an_uploaded_sample_becomes_the_reference_and_can_be_read_back(start_agent):
    harness = start_agent(engine={**ENGINE, "warmup_rows": 0}, api={"admin_token": "adm1n"})
    rng = np.random.default_rng(5)
    body = {
        "features": {
            "income": rng.normal(50, 10, 2000).tolist(),
            "age": [None, *rng.normal(40, 12, 1999).tolist()],
            "region": rng.choice(["n", "s", "e"], 2000).tolist(),
        },
        "scores": rng.beta(2, 5, 2000).tolist(),
    }
    url = f"{harness.api_url}/v1/models/{MODEL}/reference?version=v1"
    assert httpx.put(url, json=body).status_code == 401  # admin endpoint
    response = httpx.put(url, json=body, headers={"authorization": "Bearer adm1n"})
    assert response.status_code == 200, response.text
    uploaded = response.json()
    assert (uploaded["source"], uploaded["rows"]) == ("upload", 2000)
    assert uploaded["features"] == ["age", "income", "region"]

    stored = httpx.get(url).json()
    assert stored["id"] == uploaded["id"]
    assert stored["features"]["age"]["missing"] == 1
    profile = ReferenceProfile.from_dict(stored)  # the same document `reference build` writes
    assert profile.id == uploaded["id"]

    harness.stub().SubmitPredictions(Traffic().batch(500, shift=2.0))
    assert drifted(report(harness))["income"] is True


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"features": {"age": [1, "x"]}}, "features.age"),
        ({"features": {"age": [1, 2], "b": [1]}}, "features"),
        ({"features": {}}, "features"),
        ({"feature": {"age": [1]}}, "feature"),
        ({"features": {"age": [1, 2]}, "scores": ["a", "b"]}, "scores"),
        ([1, 2], "body"),
    ],
)
def test_a_bad_reference_upload_is_refused_naming_the_field(start_agent, body, field):
    harness = start_agent(engine=ENGINE)
    response = httpx.put(f"{harness.api_url}/v1/models/{MODEL}/reference?version=v1", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith(field)
    assert httpx.get(f"{harness.api_url}/v1/models/{MODEL}/reference?version=v1").status_code == 404


def reference_file(tmp_path: Path, model: str = MODEL) -> Path:
    rng = np.random.default_rng(9)
    profile = ReferenceProfile.from_columns(
        model,
        "",
        numbers={"income": rng.normal(50, 10, 3000), "age": rng.normal(40, 12, 3000)},
        categories={"region": rng.choice(["n", "s", "e"], 3000).tolist()},
        source="file",
        created_unix_nano=0,
    )
    path = tmp_path / "reference.json"
    path.write_text(json.dumps(profile.to_dict()))
    return path


def test_a_reference_file_from_config_is_used_from_the_first_batch(start_agent, tmp_path):
    path = reference_file(tmp_path)
    harness = start_agent(engine=ENGINE, models={MODEL: {"reference": str(path)}})
    harness.stub().SubmitPredictions(Traffic().batch(400, shift=1.5))
    rep = report(harness)
    assert rep["reference"]["source"] == "file"
    assert rep["warmup"] is None
    assert drifted(rep)["income"] is True


def test_a_reference_file_for_another_model_is_a_config_error_naming_the_key(tmp_path):
    path = reference_file(tmp_path, model="other-model")
    settings = agent_settings(models={MODEL: {"reference": str(path)}})
    with pytest.raises(ValueError, match=f"models.{MODEL}.reference"):
        References(settings)


def test_forgetting_a_model_removes_its_stored_references(start_agent, tmp_path):
    harness = start_agent(engine=ENGINE, store={"data_dir": str(tmp_path)})
    harness.stub().SubmitPredictions(Traffic().batch(1000))
    assert report(harness)["reference"] is not None
    response = httpx.delete(f"{harness.api_url}/v1/models/{MODEL}")
    assert response.json()["forgotten_references"] == 1
    assert not (tmp_path / "references" / MODEL).exists()


def gauge_points(harness: AgentHarness, name: str) -> dict[tuple[tuple[str, Any], ...], float]:
    return {
        tuple(sorted(point.attributes.items())): point.value
        for point in data_points(harness.metric_reader, name)
    }


def test_drift_and_health_are_exported_as_otel_gauges_matching_the_report(start_agent):
    traffic = Traffic()
    harness = start_agent(engine=ENGINE)
    stub = harness.stub()
    stub.SubmitPredictions(traffic.batch(1000))
    stub.SubmitPredictions(traffic.batch(1000, shift=1.0))
    rep = report(harness)

    base = (("ml.model.name", MODEL), ("ml.model.version", "v1"))
    psi = gauge_points(harness, "ml.feature.drift.psi")
    assert psi == {
        tuple(sorted((*base, ("ml.feature.name", name)))): feature["drift"]["psi"]
        for name, feature in rep["features"].items()
    }
    drifted_gauge = gauge_points(harness, "ml.feature.drifted")
    assert drifted_gauge[tuple(sorted((*base, ("ml.feature.name", "income"))))] == 1
    assert gauge_points(harness, "ml.model.health.score") == {base: rep["health"]["score"]}
    assert gauge_points(harness, "ml.dataset.drift.share") == {base: rep["dataset_drift"]["share"]}
    # No outcomes joined yet: no performance series rather than NaN ones.
    assert gauge_points(harness, "ml.model.performance") == {}


def test_a_version_with_characters_outside_model_names_still_gets_a_reference(
    start_agent, tmp_path
):
    harness = start_agent(engine=ENGINE, store={"data_dir": str(tmp_path)})
    batch = Traffic().batch(1000)
    batch.model_version = "v1+build/7"
    assert harness.stub().SubmitPredictions(batch).accepted == 1000
    rep = httpx.get(f"{harness.api_url}/v1/models/{MODEL}/health").json()
    assert rep["reference"]["source"] == "warmup"
    assert rep["version"] == "v1+build/7"


def test_a_corrupt_stored_reference_is_skipped_not_fatal(start_agent, tmp_path):
    harness = start_agent(engine=ENGINE, store={"data_dir": str(tmp_path)})
    harness.stub().SubmitPredictions(Traffic().batch(1000))
    harness.stop()
    (saved,) = (tmp_path / "references" / MODEL / "v1").glob("*.json")
    saved.write_text("{broken")
    restarted = AgentHarness(
        agent_settings(engine=ENGINE, store={"data_dir": str(tmp_path)})
    ).start()
    try:
        assert restarted.stub().SubmitPredictions(Traffic(seed=2).batch(600)).accepted == 600
        assert report(restarted)["warmup"] == {"rows": 600, "target": 1000}
    finally:
        restarted.stop()


def test_psi_bin_counters_and_reference_proportions_reproduce_the_reported_psi(start_agent):
    traffic = Traffic()
    harness = start_agent(engine=ENGINE)
    stub = harness.stub()
    stub.SubmitPredictions(traffic.batch(1000))  # the warm-up: becomes the reference
    stub.SubmitPredictions(traffic.batch(700, shift=1.0))
    stub.SubmitPredictions(traffic.batch(300, shift=1.0))
    rep = report(harness)
    ref_id = rep["reference"]["id"]

    counts = gauge_points(harness, "ml.feature.psi.bin.values")
    shares = gauge_points(harness, "ml.feature.psi.bin.reference")
    assert counts.keys() == shares.keys()
    per_feature: dict[str, dict[str, tuple[float, float]]] = {}
    for key, count in counts.items():
        attributes = dict(key)
        assert attributes["ml.reference.id"] == ref_id
        per_feature.setdefault(attributes["ml.feature.name"], {})[attributes["ml.bin"]] = (
            count,
            shares[key],
        )
    assert set(per_feature) == {"income", "age", "region"}
    assert len(per_feature["income"]) == 10  # psi_bins
    assert set(per_feature["region"]) == {"n", "s", "e", "__other__"}
    for name, bins in per_feature.items():
        live = np.array([c for c, _ in bins.values()])
        expected = np.array([s for _, s in bins.values()])
        assert live.sum() == 1000, name  # every row since the reference, in one bin
        assert expected.sum() == pytest.approx(1.0), name
        # The documented PromQL: proportions floored at 1e-4, sum((q - p) * ln(q / p)).
        p = np.maximum(expected, 1e-4)
        q = np.maximum(live / live.sum(), 1e-4)
        assert float(np.sum((q - p) * np.log(q / p))) == pytest.approx(
            rep["features"][name]["drift"]["psi"], rel=1e-9
        ), name


def test_an_overflowing_segment_set_is_a_gauge_and_one_warning(start_agent, caplog):
    harness = start_agent(engine={**ENGINE, "max_segments": 2})
    stub = harness.stub()
    traffic = Traffic()
    for region in ("eu", "us", "apac", "latam"):
        batch = traffic.batch(50)
        batch.attributes["region"] = region
        stub.SubmitPredictions(batch)
    base = (("ml.model.name", MODEL), ("ml.model.version", "v1"))
    with caplog.at_level("WARNING", logger="agent.telemetry.engine_metrics"):
        for _ in range(3):  # several collections: the warning is logged once
            overflow = gauge_points(harness, "mlsidecar.engine.overflow")
    assert overflow == {tuple(sorted((*base, ("mlsidecar.overflow", "segments")))): 1}
    warnings = [r.getMessage() for r in caplog.records if "other" in r.getMessage()]
    assert warnings == [
        f"model {MODEL} version v1: more distinct segments than the agent keeps; the rest "
        "are counted as 'other' (limits: docs/metrics.md#cardinality)"
    ]
    assert gauge_points(harness, "ml.predictions")  # the counts are still there


def test_joins_quality_and_anomalies_are_exported_as_the_report_counts_them(start_agent):
    harness = start_agent(engine=ENGINE)
    stub = harness.stub()
    traffic = Traffic()
    stub.SubmitPredictions(traffic.batch(1000))  # the warm-up: becomes the reference
    batch = traffic.batch(400)
    batch.features[1].numbers.values[:20] = [float("inf")] * 20  # age: 5 % non-finite
    batch.features[1].numbers.values[20:30] = [500.0] * 10  # and 10 out of range
    stub.SubmitPredictions(batch)
    ids = list(batch.ids)
    stub.SubmitOutcomes(
        pb.OutcomeBatch(model=MODEL, ids=[*ids[:150], "nobody"], actual_values=[0.5] * 151)
    )
    rep = report(harness)
    base = (("ml.model.name", MODEL), ("ml.model.version", "v1"))

    assert rep["outcomes"]["joined"] == 150
    assert gauge_points(harness, "ml.outcomes.joined") == {base: 150}
    assert gauge_points(harness, "ml.predictions.pending") == {base: rep["outcomes"]["pending"]}
    assert rep["outcomes"]["pending"] == 1400 - 150
    assert gauge_points(harness, "ml.outcomes.orphaned") == {base: rep["outcomes"]["orphaned"]}
    assert gauge_points(harness, "ml.predictions.unmatched") == {base: 0}
    age = tuple(sorted((*base, ("ml.feature.name", "age"))))
    quality = rep["features"]["age"]["quality"]
    # The window holds the warm-up's 1000 rows and this batch's 400.
    assert quality["nonfinite_ratio"] == pytest.approx(20 / 1400)
    assert quality["out_of_range_ratio"] > 0
    assert gauge_points(harness, "ml.feature.nonfinite.ratio")[age] == quality["nonfinite_ratio"]
    assert (
        gauge_points(harness, "ml.feature.out_of_range.ratio")[age] == quality["out_of_range_ratio"]
    )
    streams = rep["anomalies"]["streams"]
    anomalies = gauge_points(harness, "ml.anomalies")
    assert {dict(k)["ml.anomaly.stream"] for k in anomalies} == set(streams)
    assert "feature.age.mean" in streams
