"""A real Prometheus (Debian package) scrapes a running agent's /metrics.

``make test`` installs the ``prometheus`` package (``make system-deps``); without
it these tests fail, saying so, rather than skip silently (tests/prometheus_server.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_server import PrometheusServer

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb
from agent.engine.drift import psi
from agent.engine.reference import NumericProfile, ReferenceProfile

pytestmark = pytest.mark.slow


@pytest.fixture
def prometheus(tmp_path: Path, agent: Any) -> Iterator[PrometheusServer]:
    with PrometheusServer(tmp_path, f"127.0.0.1:{agent.agent.api.port}") as server:
        yield server


def batch(n: int, seed: int) -> pb.PredictionBatch:
    return pb.PredictionBatch(
        model="m",
        model_version="v1",
        ids=[f"{seed}-{i}" for i in range(n)],
        latencies_ms=[float(i % 50) for i in range(n)],
        scores=[(i % 10) / 10 for i in range(n)],
    )


def test_prometheus_scrapes_the_prediction_count(agent, prometheus):
    stub = agent.stub()
    assert stub.SubmitPredictions(batch(137, seed=1)).accepted == 137

    prometheus.wait_for_value('sum(ml_predictions_total{ml_model_name="m"})', 137)
    prometheus.wait_for_value('sum(ml_prediction_duration_seconds_count{ml_model_name="m"})', 137)
    (up,) = prometheus.query('up{job="mlsidecar"}')
    assert up["value"][1] == "1"

    assert stub.SubmitPredictions(batch(63, seed=2)).accepted == 63
    prometheus.wait_for_value('sum(ml_predictions_total{ml_model_name="m"})', 200)
    prometheus.wait_for_value('sum(mlsidecar_ingest_rows_total{mlsidecar_kind="prediction"})', 200)
    (series,) = prometheus.query('ml_predictions_total{ml_model_name="m"}')
    assert series["metric"]["ml_model_version"] == "v1"
    assert series["metric"]["job"] == "mlsidecar"


# The fleet-wide PSI of docs/metrics.md (lifetime form): every replica's counters of one
# reference added per bin, against the reference's proportions, floored at 1e-4.
FLEET_SHARE = """
  sum by (ml_model_name, ml_feature_name, ml_reference_id, ml_bin) (ml_feature_psi_bin_values_total)
/ ignoring (ml_bin) group_left
  sum by (ml_model_name, ml_feature_name, ml_reference_id) (ml_feature_psi_bin_values_total)
"""
FLEET_REFERENCE = """
max by (ml_model_name, ml_feature_name, ml_reference_id, ml_bin) (ml_feature_psi_bin_reference)
"""
FLEET_PSI = f"""
sum by (ml_model_name, ml_feature_name, ml_reference_id) (
    (clamp_min({FLEET_SHARE}, 1e-4) - clamp_min({FLEET_REFERENCE}, 1e-4))
  * ln(clamp_min({FLEET_SHARE}, 1e-4) / clamp_min({FLEET_REFERENCE}, 1e-4))
)
"""


def test_fleet_psi_in_promql_adds_the_bins_of_replicas_sharing_a_reference(start_agent, tmp_path):
    rng = np.random.default_rng(4)
    reference = ReferenceProfile.from_columns(
        "m",
        "",
        numbers={"x": rng.normal(0.0, 1.0, 5000)},
        categories={},
        source="file",
        created_unix_nano=0,
    )
    path = tmp_path / "reference.json"
    path.write_text(json.dumps(reference.to_dict()))
    replicas = [start_agent(models={"m": {"reference": str(path)}}) for _ in range(2)]
    sent = []
    for shift, replica in zip((0.3, 1.2), replicas, strict=True):
        values = rng.normal(shift, 1.0, 800)
        sent.append(values)
        replica.stub().SubmitPredictions(
            pb.PredictionBatch(
                model="m",
                model_version="v1",
                ids=[f"{shift}-{i}" for i in range(800)],
                features=[pb.Column(name="x", numbers=pb.NumberValues(values=values))],
            )
        )
    # What the fleet saw, binned by the reference: the PSI the query must give.
    profile = reference.features["x"]
    assert isinstance(profile, NumericProfile)
    expected = psi(profile.psi_counts, profile.bin(np.concatenate(sent)).psi_counts)

    with PrometheusServer(tmp_path, [f"127.0.0.1:{r.agent.api.port}" for r in replicas]) as server:
        server.wait_for_value(
            'count(count by (instance) (ml_feature_psi_bin_values_total{ml_model_name="m"}))', 2
        )
        server.wait_for_value('sum(ml_feature_psi_bin_values_total{ml_model_name="m"})', 1600)
        (series,) = server.query(FLEET_PSI)
        # The file's reference, bound to version v1 by each replica: one id for both.
        ids = {
            httpx.get(f"{r.api_url}/v1/models/m/health").json()["reference"]["id"] for r in replicas
        }
        assert ids == {series["metric"]["ml_reference_id"]}
        assert float(series["value"][1]) == pytest.approx(expected, rel=1e-9)
        # Each replica alone sees a different drift: the fleet figure is not either one's.
        alone = [psi(profile.psi_counts, profile.bin(v).psi_counts) for v in sent]
        assert all(abs(a - expected) > 0.01 for a in alone)
