"""The per-segment performance gauge, the label-delay histogram and the firing-alerts gauge.

Each test drives a real in-process agent through its real gRPC ingest (predictions kept
pending, outcomes joined by id) and reads what its metric readers receive, then checks
the figures against an independent computation of the same input: scikit-learn for the
per-segment performance, ``np.histogram`` for the label-delay buckets.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from conftest import AgentHarness
from metric_data import collected
from opentelemetry.sdk.metrics.export import HistogramDataPoint, Metric
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb
from agent.engine.performance import LABEL_DELAY_BOUNDS_S

MODEL = "churn"
# One long window, so a window boundary never passes mid-test.
ENGINE = {"window_s": 1e9, "min_window_rows": 10}
REGIONS = ("eu", "us")


def metrics(harness: AgentHarness, name: str) -> list[Metric]:
    return [metric for metric in collected(harness.metric_reader) if metric.name == name]


def points(harness: AgentHarness, name: str) -> dict[tuple[tuple[str, Any], ...], float]:
    return {
        tuple(sorted(point.attributes.items())): point.value
        for metric in metrics(harness, name)
        for point in metric.data.data_points
    }


def send_classified(
    harness: AgentHarness, region: str, rng: np.random.Generator, rows: int, start: int
) -> dict[str, np.ndarray]:
    """One batch of predictions of ``region`` and their outcomes; returns what was sent."""
    ids = [f"{region}-{start + i}" for i in range(rows)]
    scores = rng.random(rows)
    predicted = np.where(scores >= 0.5, "churn", "stay")
    # Right about 70 % of the time in eu, 40 % in us: the segments differ.
    right = rng.random(rows) < (0.7 if region == "eu" else 0.4)
    actual = np.where(right, predicted, np.where(predicted == "churn", "stay", "churn"))
    stub = harness.stub()
    stub.SubmitPredictions(
        pb.PredictionBatch(
            model=MODEL,
            model_version="v1",
            ids=ids,
            scores=scores.tolist(),
            labels=predicted.tolist(),
            attributes={"region": region},
        )
    )
    stub.SubmitOutcomes(
        pb.OutcomeBatch(model=MODEL, model_version="v1", ids=ids, actual_labels=actual.tolist())
    )
    return {"scores": scores, "predicted": predicted, "actual": actual}


def test_segment_performance_gauges_equal_scikit_learn_per_segment(start_agent):
    harness = start_agent(engine=ENGINE, models={MODEL: {"positive_class": "churn"}})
    rng = np.random.default_rng(11)
    sent: dict[str, list[dict[str, np.ndarray]]] = {region: [] for region in REGIONS}
    for batch in range(3):
        for region in REGIONS:
            sent[region].append(send_classified(harness, region, rng, 150, batch * 1000))
    gauges = points(harness, "ml.model.segment.performance")
    base = (("ml.model.name", MODEL), ("ml.model.version", "v1"))
    for region in REGIONS:
        scores = np.concatenate([b["scores"] for b in sent[region]])
        predicted = np.concatenate([b["predicted"] for b in sent[region]])
        actual = np.concatenate([b["actual"] for b in sent[region]])

        def gauge(metric: str, region: str = region) -> float:
            key = (*base, ("ml.metric", metric), ("ml.segment", f"region={region}"))
            return gauges[tuple(sorted(key))]

        assert gauge("accuracy") == pytest.approx(accuracy_score(actual, predicted), abs=1e-12)
        assert gauge("f1_macro") == pytest.approx(
            f1_score(actual, predicted, average="macro"), abs=1e-12
        )
        # ROC AUC from 100 score bins: within the bound the engine reports.
        assert gauge("roc_auc") == pytest.approx(roc_auc_score(actual == "churn", scores), abs=0.01)
    # Only headline metrics, only the two named segments: bounded by configuration.
    segments = {dict(key)["ml.segment"] for key in gauges}
    assert segments == {"region=eu", "region=us"}
    assert {dict(key)["ml.metric"] for key in gauges} <= {
        "accuracy", "f1_macro", "roc_auc", "log_loss", "brier", "mae", "rmse", "mape", "r2",
    }  # fmt: skip
    # The overall gauge is unchanged: one series per metric, no segment label.
    overall = points(harness, "ml.model.performance")
    accuracy = overall[tuple(sorted((*base, ("ml.metric", "accuracy"))))]
    everything = [b for region in REGIONS for b in sent[region]]
    assert accuracy == pytest.approx(
        accuracy_score(
            np.concatenate([b["actual"] for b in everything]),
            np.concatenate([b["predicted"] for b in everything]),
        ),
        abs=1e-12,
    )


def test_segments_beyond_max_segments_share_other(start_agent):
    harness = start_agent(engine={**ENGINE, "max_segments": 2})
    rng = np.random.default_rng(5)
    for i, region in enumerate(("eu", "us", "apac", "latam")):
        ids = [f"{region}-{j}" for j in range(20)]
        stub = harness.stub()
        stub.SubmitPredictions(
            pb.PredictionBatch(
                model=MODEL, ids=ids, labels=["a"] * 20, attributes={"region": region}
            )
        )
        actual = np.where(rng.random(20) < 0.25 * (i + 1), "a", "b").tolist()
        stub.SubmitOutcomes(pb.OutcomeBatch(model=MODEL, ids=ids, actual_labels=actual))
    segments = {dict(key)["ml.segment"] for key in points(harness, "ml.model.segment.performance")}
    assert segments == {"region=eu", "region=us", "other"}


def test_label_delay_histogram_buckets_equal_np_histogram_of_the_delays(start_agent):
    harness = start_agent(engine=ENGINE)
    rng = np.random.default_rng(2)
    rows = 500
    # Log-uniform from 0.3 s to 40 days: below the first bound, across all, above the last.
    delays_ns = (10 ** rng.uniform(np.log10(0.3), np.log10(40 * 86400), rows) * 1e9).astype(
        np.int64
    )
    predicted_at = time.time_ns() - 50 * 86400 * 10**9 + rng.integers(0, 10**9, rows)
    ids = [f"p{i}" for i in range(rows)]
    stub = harness.stub()
    stub.SubmitPredictions(
        pb.PredictionBatch(
            model=MODEL,
            ids=ids,
            timestamps_unix_nano=predicted_at.tolist(),
            scores=rng.random(rows).tolist(),
        )
    )
    # Two outcome batches: the histogram is cumulative.
    for part in (slice(0, 200), slice(200, rows)):
        stub.SubmitOutcomes(
            pb.OutcomeBatch(
                model=MODEL,
                ids=ids[part],
                actual_values=rng.random(rows)[part].tolist(),
                timestamps_unix_nano=(predicted_at + delays_ns)[part].tolist(),
            )
        )
    (metric,) = metrics(harness, "ml.outcome.label_delay")
    assert metric.unit == "s"
    (point,) = metric.data.data_points
    assert isinstance(point, HistogramDataPoint)
    assert dict(point.attributes) == {"ml.model.name": MODEL, "ml.model.version": ""}
    delays = delays_ns / 1e9
    edges = [0.0, *LABEL_DELAY_BOUNDS_S, float(delays.max()) + 1]
    expected, _ = np.histogram(delays, bins=edges)
    assert list(point.explicit_bounds) == list(LABEL_DELAY_BOUNDS_S)
    assert list(point.bucket_counts) == expected.tolist()
    assert point.count == rows
    assert point.sum == pytest.approx(float(delays.sum()), rel=1e-12)
    assert (point.min, point.max) == pytest.approx((delays.min(), delays.max()), rel=1e-12)
    # The report's summary reads the same histogram.
    report = harness.agent.engine.report(MODEL, "")
    assert report is not None
    assert report["outcomes"]["label_delay_s"]["count"] == rows


def test_firing_alerts_gauge_is_one_while_firing_and_zero_once_resolved(start_agent):
    rule = {"signal": "performance.accuracy", "op": "<", "threshold": 0.5, "severity": "critical"}
    harness = start_agent(
        engine=ENGINE,
        alerts={"default_rules": False, "interval_s": 3600, "rules": {"accuracy-low": rule}},
    )
    agent = harness.agent
    stub = harness.stub()

    def judge(ids: list[str], predicted: str, actual: str) -> dict[Any, float]:
        n = len(ids)
        stub.SubmitPredictions(pb.PredictionBatch(model=MODEL, ids=ids, labels=[predicted] * n))
        stub.SubmitOutcomes(pb.OutcomeBatch(model=MODEL, ids=ids, actual_labels=[actual] * n))
        harness.run(agent.evaluate_alerts())
        return points(harness, "mlsidecar.alerts.firing")

    key = tuple(
        sorted(
            {
                "alertname": "accuracy-low",
                "severity": "critical",
                "ml.model.name": MODEL,
                "ml.model.version": "",
            }.items()
        )
    )
    assert points(harness, "mlsidecar.alerts.firing") == {}  # nothing has fired yet
    # All wrong: accuracy 0, the rule (no for_s) fires at the first evaluation.
    assert judge([f"a{i}" for i in range(10)], "yes", "no") == {key: 1}
    # Thirty right: accuracy 0.75, resolved; the series stays, at 0.
    assert judge([f"b{i}" for i in range(30)], "yes", "yes") == {key: 0}
    assert agent.alerts is not None and agent.alerts.listing()["recent"][0]["state"] == "resolved"
    # A model version no longer reported takes its series with it (bounded).
    assert agent.alerts.evaluate([]) == []
    assert points(harness, "mlsidecar.alerts.firing") == {}
