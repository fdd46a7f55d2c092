"""Engine and per-model state: windows, totals, limits, versions, segments, weights, reports.

Time is injected: windows are decided by each batch's receipt time and the clock.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from agent.config import Settings
from agent.engine import (
    Engine,
    ModelConfig,
    ModelLimitError,
    OutcomeColumns,
    PredictionColumns,
)
from agent.engine.monitor import MonitorConfig
from agent.engine.reference import ReferenceProfile

S = 10**9
WINDOW = 60 * S
T0 = 1_700_000_000 * S - (1_700_000_000 * S) % WINDOW  # a window boundary


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def make_engine(clock: Clock | None = None, max_models: int = 10, **config) -> Engine:
    config.setdefault("window_ns", WINDOW)
    cfg = ModelConfig(**config)
    return Engine(lambda model: cfg, max_models=max_models, clock=clock or Clock())


def preds(
    n: int,
    at: int,
    *,
    model: str = "m",
    version: str = "v1",
    weight: float = 1.0,
    attributes: dict[str, str] | None = None,
    **columns,
) -> PredictionColumns:
    columns.setdefault("scores", np.linspace(0.05, 0.95, n))
    columns.setdefault("latencies_ms", np.full(n, 12.0))
    return PredictionColumns(
        model=model,
        version=version,
        ids=[f"{at}-{i}" for i in range(n)],
        received_unix_nano=at,
        attributes=attributes or {},
        weight=weight,
        **columns,
    )


def outcomes(
    n: int, at: int, *, model: str = "m", version: str = "v1", **columns
) -> OutcomeColumns:
    return OutcomeColumns(
        model=model,
        version=version,
        ids=[f"o-{i}" for i in range(n)],
        received_unix_nano=at,
        **columns,
    )


# --- windows --------------------------------------------------------------------------------


def test_windows_are_aligned_to_the_epoch():
    clock = Clock(T0 + 37 * S)
    engine = make_engine(clock)
    engine.observe_predictions(preds(3, T0 + 37 * S))
    window = engine.report("m")["window"]
    assert window["start_unix_nano"] == T0
    assert window["end_unix_nano"] == T0 + WINDOW
    assert window["start_unix_nano"] % WINDOW == 0
    assert window["count"] == 3
    assert engine.report("m")["previous"] is None


def test_a_window_tumbles_and_the_closed_one_is_reported_as_previous():
    clock = Clock(T0 + 5 * S)
    engine = make_engine(clock, min_window_rows=4)
    engine.observe_predictions(preds(3, T0 + 5 * S))
    engine.observe_predictions(preds(2, T0 + 59 * S))
    clock.now = T0 + WINDOW + 1 * S
    engine.observe_predictions(preds(7, T0 + WINDOW + 1 * S))

    report = engine.report("m")
    previous, window = report["previous"], report["window"]
    assert (previous["start_unix_nano"], previous["end_unix_nano"]) == (T0, T0 + WINDOW)
    assert previous["count"] == 5
    assert previous["closed"] is True
    assert previous["complete"] is True  # 5 rows >= min_window_rows
    assert previous["latency_ms"]["count"] == 5
    assert window["start_unix_nano"] == T0 + WINDOW
    assert window["count"] == 7
    assert window["closed"] is False
    assert window["complete"] is True  # live, and >= min_window_rows
    assert report["totals"]["rows"] == 12
    assert report["totals"]["batches"] == 3


def test_the_window_end_belongs_to_the_next_window():
    clock = Clock(T0)
    engine = make_engine(clock)
    engine.observe_predictions(preds(1, T0))
    clock.now = T0 + WINDOW  # exactly the end: a new window
    engine.observe_predictions(preds(2, T0 + WINDOW))
    report = engine.report("m")
    assert report["window"]["start_unix_nano"] == T0 + WINDOW
    assert (report["window"]["count"], report["previous"]["count"]) == (2, 1)


def test_the_report_rolls_the_window_by_the_clock_without_traffic():
    clock = Clock(T0 + S)
    engine = make_engine(clock, min_window_rows=1)
    engine.observe_predictions(preds(4, T0 + S))
    clock.now = T0 + WINDOW + 2 * S
    report = engine.report("m")
    assert report["window"]["count"] == 0
    assert report["window"]["complete"] is False  # live and empty
    assert report["window"]["latency_ms"]["count"] == 0
    assert report["previous"]["count"] == 4
    assert report["totals"]["rows"] == 4


def test_after_idle_windows_the_previous_window_is_the_empty_one_before_now():
    clock = Clock(T0 + S)
    engine = make_engine(clock)
    engine.observe_predictions(preds(4, T0 + S))
    later = T0 + 5 * WINDOW + 3 * S
    clock.now = later
    engine.observe_predictions(preds(1, later))
    report = engine.report("m")
    assert report["window"]["start_unix_nano"] == T0 + 5 * WINDOW
    assert report["previous"]["start_unix_nano"] == T0 + 4 * WINDOW
    assert report["previous"]["count"] == 0
    assert report["totals"]["rows"] == 5


def test_live_window_is_incomplete_until_min_window_rows():
    clock = Clock(T0)
    engine = make_engine(clock, min_window_rows=10)
    engine.observe_predictions(preds(9, T0))
    assert engine.report("m")["window"]["complete"] is False
    engine.observe_predictions(preds(1, T0 + S))
    assert engine.report("m")["window"]["complete"] is True


def test_outcomes_count_in_the_window_and_totals():
    clock = Clock(T0)
    engine = make_engine(clock)
    engine.observe_predictions(preds(3, T0))
    engine.observe_outcomes(outcomes(2, T0 + S, actual_labels=["a", "b"]))
    clock.now = T0 + WINDOW
    engine.observe_outcomes(outcomes(1, T0 + WINDOW, actual_values=np.array([0.3])))
    report = engine.report("m")
    assert report["totals"]["outcomes"] == 3
    assert report["previous"]["outcomes"] == 2
    assert report["window"]["outcomes"] == 1
    snapshot = engine.snapshots()[0]
    assert snapshot.outcome_labels == {"a": 1.0, "b": 1.0}
    assert snapshot.totals.outcomes == 3


# --- totals, histograms, weights --------------------------------------------------------------


def test_totals_and_histograms_accumulate_across_batches():
    clock = Clock(T0)
    engine = make_engine(clock, latency_bounds_ms=(10.0, 100.0))
    engine.observe_predictions(preds(2, T0, latencies_ms=np.array([5.0, 50.0])))
    engine.observe_predictions(preds(2, T0 + S, latencies_ms=np.array([500.0, math.nan])))
    totals = engine.snapshots()[0].totals
    assert totals.rows == 4
    assert totals.batches == 2
    assert totals.latency.counts.tolist() == [1, 1, 1]
    assert totals.latency.nonfinite_count == 1
    assert (totals.latency.min, totals.latency.max, totals.latency.sum) == (5.0, 500.0, 555.0)
    window = engine.report("m")["window"]["latency_ms"]
    assert (window["count"], window["nonfinite"], window["min"], window["max"]) == (
        3,
        1,
        5.0,
        500.0,
    )


def test_window_and_totals_histograms_hold_the_same_batch_exemplars():
    clock = Clock(T0)
    engine = make_engine(clock, latency_bounds_ms=(10.0,))
    trace = [bytes([1]) * 16, bytes([2]) * 16]
    span = [bytes([1]) * 8, bytes([2]) * 8]
    engine.observe_predictions(
        preds(2, T0, latencies_ms=np.array([5.0, 50.0]), trace_ids=trace, span_ids=span)
    )
    state = engine._states[("m", "v1")]
    assert state.totals.latency.exemplars == state.current.latency.exemplars
    assert [e.trace_id for e in state.totals.latency.exemplars] == trace
    assert [e.time_unix_nano for e in state.totals.scores.exemplars if e] == [T0, T0]


def test_sample_rate_weight_scales_estimated_predictions_not_rows():
    clock = Clock(T0)
    engine = make_engine(clock)
    engine.observe_predictions(preds(10, T0, weight=4.0))  # sample_rate 0.25
    engine.observe_predictions(preds(5, T0 + S))
    report = engine.report("m")
    assert report["totals"]["rows"] == 15
    assert report["totals"]["estimated_predictions"] == 45.0
    assert report["window"]["count"] == 15
    assert report["window"]["estimated_predictions"] == 45.0
    assert report["segments"] == {"": 45.0}


def test_labels_are_counted_weighted_and_bounded_by_max_classes():
    clock = Clock(T0)
    engine = make_engine(clock, max_classes=2)
    engine.observe_predictions(preds(4, T0, labels=["c", "a", "b", "a"], weight=2.0))
    # Distinct labels are taken in sorted order: a and b fit, c folds into "other".
    assert engine.report("m")["prediction"]["labels"] == {"a": 4.0, "b": 2.0, "other": 2.0}
    engine.observe_predictions(preds(2, T0 + S, labels=["b", "z"]))
    assert engine.report("m")["prediction"]["labels"] == {"a": 4.0, "b": 3.0, "other": 3.0}


def test_features_are_listed_by_type():
    clock = Clock(T0)
    engine = make_engine(clock)
    engine.observe_predictions(
        preds(2, T0, numbers={"x": np.array([1.0, 2.0])}, categories={"c": ["u", "v"]})
    )
    features = engine.report("m")["features"]
    assert {name: f["type"] for name, f in features.items()} == {
        "c": "categorical",
        "x": "numeric",
    }


# --- segments -------------------------------------------------------------------------------


def test_segments_are_bounded_by_max_segments_and_overflow_into_other():
    clock = Clock(T0)
    engine = make_engine(clock, max_segments=3)
    for i, region in enumerate(["eu", "us", "eu", "apac", "sa", "af", "us"]):
        engine.observe_predictions(preds(2, T0 + i, attributes={"region": region}))
    segments = engine.report("m")["segments"]
    assert segments == {
        "region=eu": 4.0,
        "region=us": 4.0,
        "region=apac": 2.0,
        "other": 4.0,  # sa and af: keys beyond max_segments
    }
    assert sum(segments.values()) == engine.report("m")["totals"]["estimated_predictions"]


def test_segment_keys_are_sorted_attribute_pairs():
    clock = Clock(T0)
    engine = make_engine(clock)
    engine.observe_predictions(preds(1, T0, attributes={"tier": "gold", "region": "eu"}))
    engine.observe_predictions(preds(1, T0, attributes={"region": "eu", "tier": "gold"}))
    assert engine.report("m")["segments"] == {"region=eu,tier=gold": 2.0}


# --- models, versions, limits -----------------------------------------------------------------


def test_max_models_counts_model_versions_and_raises_model_limit_error():
    clock = Clock(T0)
    engine = make_engine(clock, max_models=2)
    engine.observe_predictions(preds(1, T0, model="a", version="v1"))
    engine.observe_predictions(preds(1, T0, model="a", version="v2"))
    with pytest.raises(ModelLimitError, match=r"'b'.*max_models=2"):
        engine.observe_predictions(preds(1, T0, model="b"))
    with pytest.raises(ModelLimitError):
        engine.observe_outcomes(outcomes(1, T0, model="b", actual_values=np.array([1.0])))
    assert issubclass(ModelLimitError, ValueError)
    # Known versions keep working; the refused model left no trace.
    engine.observe_predictions(preds(1, T0 + S, model="a", version="v1"))
    assert engine.report("b") is None
    assert sorted((m["model"], m["version"], m["rows"]) for m in engine.models()) == [
        ("a", "v1", 2),
        ("a", "v2", 1),
    ]


def test_forget_drops_every_version_and_frees_capacity():
    clock = Clock(T0)
    engine = make_engine(clock, max_models=2)
    engine.observe_predictions(preds(1, T0, model="a", version="v1"))
    engine.observe_predictions(preds(1, T0, model="a", version="v2"))
    assert sorted(engine.forget("a")) == ["v1", "v2"]
    assert engine.report("a") is None
    assert engine.models() == []
    assert engine.forget("a") == []
    engine.observe_predictions(preds(3, T0 + S, model="b"))
    engine.observe_predictions(preds(1, T0 + S, model="a", version="v3"))
    assert engine.report("a")["totals"]["rows"] == 1  # starts afresh
    assert engine.report("a")["version"] == "v3"


def test_report_picks_the_most_recently_seen_version_unless_asked():
    clock = Clock(T0)
    engine = make_engine(clock)
    engine.observe_predictions(preds(1, T0, version="v1"))
    engine.observe_predictions(preds(2, T0 + 1, version="v2"))
    assert engine.report("m")["version"] == "v2"
    engine.observe_predictions(preds(3, T0 + 2, version="v1"))
    assert engine.report("m")["version"] == "v1"
    assert engine.report("m")["totals"]["rows"] == 4
    assert engine.report("m", "v2")["totals"]["rows"] == 2
    assert engine.report("m", "v9") is None
    assert engine.report("unknown") is None
    latest = {m["version"]: m["latest"] for m in engine.models()}
    assert latest == {"v1": True, "v2": False}


def test_outcomes_also_mark_the_latest_version():
    clock = Clock(T0)
    engine = make_engine(clock)
    engine.observe_predictions(preds(1, T0, version="v1"))
    engine.observe_outcomes(outcomes(1, T0 + 1, version="v0", actual_values=np.array([1.0])))
    assert engine.report("m")["version"] == "v0"


def test_snapshots_are_copies():
    clock = Clock(T0)
    engine = make_engine(clock)
    engine.observe_predictions(preds(2, T0, attributes={"r": "x"}, labels=["a", "b"]))
    clock.now = T0 + 7 * S
    snap = engine.snapshots()[0]
    before = copy.deepcopy((snap.totals.rows, snap.totals.latency.counts.tolist(), snap.segments))
    engine.observe_predictions(preds(5, T0 + 8 * S, attributes={"r": "x"}))
    assert (snap.totals.rows, snap.totals.latency.counts.tolist(), snap.segments) == before
    assert (snap.model, snap.version, snap.start_unix_nano) == ("m", "v1", T0)
    assert snap.totals.end_unix_nano == T0 + 7 * S
    assert snap.labels == {"a": 1.0, "b": 1.0}


# --- the report -----------------------------------------------------------------------------


def test_report_is_json_serialisable_with_nan_and_infinite_inputs():
    clock = Clock(T0)
    engine = make_engine(clock)
    engine.observe_predictions(
        preds(
            3,
            T0,
            scores=np.array([math.nan, math.nan, math.nan]),
            latencies_ms=np.array([math.inf, -math.inf, math.nan]),
            numbers={"x": np.array([math.nan, math.inf, 1.0])},
        )
    )
    clock.now = T0 + WINDOW
    report = engine.report("m")
    text = json.dumps(report, allow_nan=False)  # raises on NaN or infinity
    assert json.loads(text) == report
    assert report["window"]["score"]["mean"] is None
    assert report["previous"]["latency_ms"] == {
        "count": 0,
        "nonfinite": 3,
        "mean": None,
        "min": None,
        "p50": None,
        "p90": None,
        "p99": None,
        "max": None,
    }
    assert report["previous"]["score"]["nonfinite"] == 3


def test_report_shape_and_times():
    clock = Clock(T0 + 2 * S)
    engine = make_engine(clock)
    engine.observe_predictions(preds(2, T0 + S))
    report = engine.report("m")
    assert set(report) == {
        "schema_version",
        "model",
        "version",
        "generated",
        "first_seen",
        "last_seen",
        "window",
        "previous",
        "totals",
        "reference",
        "warmup",
        "evaluated_window",
        "features",
        "unknown_features",
        "missing_features",
        "segments",
        "prediction",
        "dataset_drift",
        "performance",
        "performance_totals",
        "outcomes",
        "anomalies",
        "long_windows",
        "health",
    }
    assert set(report["prediction"]) == {"labels", "drift", "class_drift"}
    assert report["schema_version"] == 1
    assert report["first_seen"] == report["last_seen"]
    assert report["generated"].endswith("Z")
    assert report["window"]["start"].endswith(":00Z")
    assert report["health"]["score"] is None
    json.dumps(report, allow_nan=False)


def test_a_closed_window_with_too_few_rows_is_not_complete():
    clock = Clock(T0 + 5 * S)
    engine = make_engine(clock, min_window_rows=4)
    engine.observe_predictions(preds(2, T0 + 5 * S))
    clock.now = T0 + WINDOW + 1 * S
    engine.observe_predictions(preds(1, T0 + WINDOW + 1 * S))
    previous = engine.report("m")["previous"]
    assert (previous["closed"], previous["count"], previous["complete"]) == (True, 2, False)


# --- long windows ---------------------------------------------------------------------------


def test_long_windows_judge_drift_over_whole_base_windows_and_tumble():
    """Base window 60 s, a long window of 180 s: drift that is too small to show in any one
    base window's few rows is judged on the long window's bins, which add up every base
    window closed in it plus the live one, and start afresh at each 180 s boundary."""
    rng = np.random.default_rng(2)
    reference = ReferenceProfile.from_columns(
        "m",
        "v1",
        numbers={"x": rng.normal(0, 1, 5000)},
        categories={"c": rng.choice(["a", "b"], 5000).tolist()},
        source="file",
        created_unix_nano=0,
    )
    start = T0 - T0 % (3 * WINDOW)  # a long window boundary
    clock = Clock(start)
    monitor = MonitorConfig(warmup_rows=0, long_windows_ns=(3 * WINDOW,))
    engine = make_engine(clock, min_window_rows=150, monitor=monitor)
    engine.set_reference(reference)

    def send(at: int, n: int, shift: float) -> None:
        clock.now = at
        engine.observe_predictions(
            preds(
                n,
                at,
                numbers={"x": rng.normal(shift, 1, n)},
                categories={"c": rng.choice(["a", "b"], n).tolist()},
            )
        )

    # Three base windows of 100 drifted rows: each below min_window_rows, together 300.
    for k in range(3):
        send(start + k * WINDOW + S, 100, 2.0)
    (long,) = engine.report("m")["long_windows"]
    assert long["length_s"] == 180
    assert long["evaluated_window"] == "current"
    assert long["rows"] == 300
    assert long["start_unix_nano"] == start and long["end_unix_nano"] == start + 3 * WINDOW
    assert long["features"]["x"]["drifted"] is True
    assert long["features"]["c"]["drifted"] is False
    assert long["dataset_drift"] == {"share": 0.5, "drifted": True}
    # The base window alone holds too few rows to judge.
    assert engine.report("m")["evaluated_window"] is None

    # The next long window: few rows so far, so the closed one is the one judged.
    send(start + 3 * WINDOW + S, 50, 0.0)
    (long,) = engine.report("m")["long_windows"]
    assert long["evaluated_window"] == "previous"
    assert (long["start_unix_nano"], long["rows"]) == (start, 300)
    # Enough undrifted rows in the new long window: it is judged, and does not drift.
    send(start + 4 * WINDOW + S, 200, 0.0)
    (long,) = engine.report("m")["long_windows"]
    assert long["evaluated_window"] == "current"
    assert (long["start_unix_nano"], long["rows"]) == (start + 3 * WINDOW, 250)
    assert long["features"]["x"]["drifted"] is False

    # Long windows pass with no traffic: nothing closed recently enough to judge.
    send(start + 12 * WINDOW + S, 10, 0.0)
    (long,) = engine.report("m")["long_windows"]
    assert long["evaluated_window"] is None


def test_long_windows_must_be_multiples_of_every_base_window():
    with pytest.raises(
        ValueError, match=r"engine.long_windows_s\[0\]: 450 s must be a multiple of engine.window_s"
    ):
        Settings(engine={"window_s": 300, "long_windows_s": [450]})
    with pytest.raises(ValueError, match=r"models.fast.window_s \(7 s\)"):
        Settings(engine={"long_windows_s": [3600]}, models={"fast": {"window_s": 7}})
    assert Settings(engine={"long_windows_s": [3600, 900]}).engine.long_windows_s == [3600, 900]


def test_overflowed_names_the_bounded_sets_that_folded_keys_into_other():
    clock = Clock(T0)
    engine = make_engine(clock, max_segments=1, max_classes=2)
    engine.observe_predictions(preds(3, T0, labels=["a", "b", "a"], attributes={"r": "eu"}))
    (snap,) = engine.snapshots()
    assert snap.overflowed == ()
    engine.observe_predictions(preds(2, T0, labels=["c", "a"], attributes={"r": "us"}))
    (snap,) = engine.snapshots()
    assert snap.overflowed == ("segments", "classes")
    assert snap.segments == {"r=eu": 3.0, "other": 2.0}


def test_exemplars_are_refreshed_from_at_most_one_traced_batch_per_second():
    clock = Clock(T0)
    engine = make_engine(clock)

    def traced(at: int, tag: int) -> PredictionColumns:
        return preds(3, at, trace_ids=[bytes([tag]) * 16] * 3, span_ids=[bytes([tag]) * 8] * 3)

    def exemplar_traces() -> set[bytes]:
        (snap,) = engine.snapshots()
        return {e.trace_id for e in snap.totals.latency.exemplars if e is not None}

    engine.observe_predictions(preds(3, T0))  # untraced: does not use up the second
    engine.observe_predictions(traced(T0 + 1, 1))
    engine.observe_predictions(traced(T0 + S // 2, 2))  # within the second: counted only
    assert exemplar_traces() == {bytes([1]) * 16}
    engine.observe_predictions(traced(T0 + S + 1, 3))
    assert exemplar_traces() == {bytes([3]) * 16}
    (snap,) = engine.snapshots()
    assert snap.totals.latency.count == 12
