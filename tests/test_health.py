"""The health score: default thresholds, reasons people can read, not-evaluated signals, and its properties."""

from __future__ import annotations

import dataclasses
import doctest
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import agent.engine.health as health_module
from agent.engine.health import HealthAssessment, HealthInputs, HealthPolicy, Limit, score_health

EVERYTHING_FINE = HealthInputs(
    drifted_features=0,
    total_features=20,
    dataset_drift=False,
    performance={"accuracy": 0.91, "f1_macro": 0.88},
    quality={"income": {"missing_ratio": 0.01, "unseen_ratio": None}},
    anomalies={"score": 0, "latency": 0},
    outcomes=500,
)


def judge(**changes) -> HealthAssessment:
    return score_health(dataclasses.replace(EVERYTHING_FINE, **changes))


def test_docstring_examples_run():
    result = doctest.testmod(health_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


# --- the issue's examples and the default thresholds ----------------------------------------


def test_reasons_read_like_the_issues_examples():
    assessment = judge(
        drifted_features=7,
        drift_psi={"age": 0.31},
        performance={"accuracy": 0.55},
        quality={"income": {"missing_ratio": 0.12}},
    )
    assert "drift: 7/20 features (PSI age=0.31)" in assessment.reasons
    assert "accuracy 0.55 < 0.60" in assessment.reasons
    assert "missing ratio income 12%" in assessment.reasons
    assert assessment.status == "degraded"


def test_everything_fine_is_a_hundred_and_healthy_with_no_reasons():
    assessment = score_health(EVERYTHING_FINE)
    assert (assessment.score, assessment.status, assessment.reasons) == (100, "healthy", [])
    assert assessment.penalties == {
        "drift": 0.0,
        "performance": 0.0,
        "quality": 0.0,
        "anomalies": 0.0,
    }


@pytest.mark.parametrize(
    ("changes", "status"),
    [
        ({"performance": {"accuracy": 0.61}}, "healthy"),
        ({"performance": {"accuracy": 0.60}}, "healthy"),
        ({"performance": {"accuracy": 0.59}}, "degraded"),
        ({"performance": {"accuracy": 0.50}}, "critical"),
        ({"performance": {"mape": 0.05}}, "healthy"),
        ({"performance": {"mape": 0.051}}, "degraded"),
        ({"performance": {"mape": 0.20}}, "critical"),
        ({"drifted_features": 9}, "healthy"),
        ({"drifted_features": 10}, "degraded"),
        ({"drifted_features": 15}, "critical"),
        ({"drifted_features": 2, "dataset_drift": True}, "degraded"),
        ({"quality": {"income": {"missing_ratio": 0.10}}}, "healthy"),
        ({"quality": {"income": {"missing_ratio": 0.11}}}, "degraded"),
        ({"quality": {"city": {"unseen_ratio": 0.5}}}, "critical"),
        ({"quality": {"zip": {"type_mismatch_ratio": 0.01}}}, "degraded"),
        ({"anomalies": {"latency": 2}}, "healthy"),
        ({"anomalies": {"latency": 2, "score": 1}}, "degraded"),
        ({"prediction_drift": True}, "degraded"),
    ],
)
def test_default_thresholds_set_the_status(changes, status):
    assert judge(**changes).status == status


def test_a_few_drifted_features_cost_points_and_say_so_without_degrading():
    assessment = judge(drifted_features=2, drift_psi={"age": 0.31, "income": 0.12})
    assert 90 <= assessment.score < 100
    assert assessment.status == "healthy"
    assert assessment.reasons == ["drift: 2/20 features (PSI age=0.31, income=0.12)"]


def test_dataset_drift_is_named_as_such_and_lists_the_most_drifted_features_first():
    psi = {"a": 0.12, "b": 0.5, "c": None, "d": 0.3, "e": 0.2}
    assessment = judge(drifted_features=11, drift_psi=psi)
    assert "dataset drift: 11/20 features (PSI b=0.50, d=0.30, e=0.20)" in assessment.reasons


def test_critical_findings_are_marked_and_compared_with_the_critical_threshold():
    assessment = judge(performance={"accuracy": 0.45})
    assert assessment.reasons == ["accuracy 0.45 ≤ 0.50 (critical)"]
    assert assessment.status == "critical"


def test_percent_metrics_and_near_misses_never_print_as_equal():
    assert judge(performance={"mape": 0.072}).reasons == ["MAPE 7.2% > 5%"]
    assert judge(performance={"mape": 0.05001}).reasons == ["MAPE 5.001% > 5%"]
    assert judge(performance={"accuracy": 0.5999}).reasons == ["accuracy 0.5999 < 0.6000"]


def test_reasons_are_ordered_by_the_points_they_cost():
    assessment = judge(
        drifted_features=3,
        performance={"accuracy": 0.55},
        quality={"income": {"missing_ratio": 0.2}},
        anomalies={"latency": 1},
    )
    assert assessment.reasons[0].startswith("accuracy")
    assert assessment.reasons[-1].startswith("anomalies: 1 (latency 1)")


def test_long_lists_of_findings_are_cut_with_a_count_of_the_rest():
    quality = {f"f{i:02d}": {"missing_ratio": 0.2 + i / 100} for i in range(10)}
    assessment = judge(quality=quality)
    quality_reasons = [r for r in assessment.reasons if "missing" in r or "more" in r]
    assert quality_reasons == [
        "missing ratio f09 29%",
        "missing ratio f08 28%",
        "missing ratio f07 27%",
        "data quality: 7 more not listed",
    ]


# --- not evaluated --------------------------------------------------------------------------


def test_nothing_evaluated_gives_no_score_and_says_why():
    assessment = score_health(HealthInputs(has_reference=False, outcomes=0))
    assert assessment.score is None
    assert assessment.status == "unknown"
    assert assessment.penalties == {}
    assert "no reference profile: drift and the reference checks are not evaluated" in (
        assessment.reasons
    )
    assert "no outcomes joined: performance not evaluated" in assessment.reasons


def test_missing_outcomes_and_reference_are_not_penalised():
    with_all = judge(performance={"accuracy": 0.9})
    without = judge(performance=None, outcomes=0, has_reference=False)
    assert without.score == with_all.score == 100
    assert without.status == "healthy"
    assert set(without.penalties) == {"quality", "anomalies"}
    assert "no outcomes joined: performance not evaluated" in without.reasons


def test_metrics_without_limits_are_reported_as_not_judged():
    assessment = judge(performance={"mae": 3.2, "rmse": 4.1})
    assert assessment.score == 100
    assert "performance: no limits set for mae, rmse" in assessment.reasons


def test_undefined_metric_values_are_skipped():
    assert judge(performance={"accuracy": math.nan, "mape": None}).score == 100


def test_unknown_features_and_notes_are_listed_but_cost_nothing():
    assessment = judge(unknown_features=["zip", "age2"], notes=["window has 40 rows"])
    assert assessment.score == 100
    assert assessment.reasons == [
        "unknown features (not in the reference): age2, zip",
        "window has 40 rows",
    ]


# --- policy ---------------------------------------------------------------------------------


def test_configured_limits_and_weights_change_the_verdict():
    policy = HealthPolicy(
        performance={"roc_auc": Limit.at_least(0.75, 0.65)}, performance_weight=80.0
    )
    inputs = dataclasses.replace(EVERYTHING_FINE, performance={"roc_auc": 0.70, "accuracy": 0.1})
    assessment = score_health(inputs, policy)
    assert assessment.reasons == ["ROC AUC 0.70 < 0.75"]
    assert assessment.penalties["performance"] == pytest.approx(80 * 0.75)
    assert assessment.score == 40


def test_a_weight_of_zero_costs_no_points_but_the_threshold_still_sets_the_status():
    assessment = score_health(
        dataclasses.replace(EVERYTHING_FINE, drifted_features=12), HealthPolicy(drift_weight=0)
    )
    assert (assessment.score, assessment.status) == (100, "degraded")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"drift_weight": -1.0}, "drift_weight=-1.0"),
        ({"quality_weight": math.nan}, "quality_weight=nan"),
        ({"dataset_drift_share": 0.8, "critical_drift_share": 0.7}, "dataset_drift_share=0.8"),
        ({"anomalies_degraded": 0}, "anomalies_degraded=0"),
        ({"max_reasons_per_signal": 0}, "max_reasons_per_signal=0"),
        ({"performance": {"accuracy": 0.6}}, r"performance\['accuracy'\]: expected a Limit"),
    ],
)
def test_bad_policies_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HealthPolicy(**kwargs)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Limit.at_least(0.6, 0.7), "critical=0.7 must be below degraded=0.6"),
        (lambda: Limit.at_most(0.05, 0.05), "critical=0.05 must be above degraded=0.05"),
        (lambda: Limit.at_most(0.05, math.inf), "must be finite"),
    ],
)
def test_bad_limits_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"drifted_features": 21}, "drifted_features=21 must be between 0 and total_features=20"),
        ({"total_features": None}, "give both or neither"),
        ({"quality": {"age": {"missing_ratio": 1.5}}}, r"quality\['age'\]\['missing_ratio'\]=1.5"),
        ({"anomalies": {"latency": -1}}, r"anomalies\['latency'\]=-1"),
    ],
)
def test_bad_inputs_are_refused_naming_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        judge(**changes)


# --- properties -----------------------------------------------------------------------------

ratio = st.floats(0.0, 1.0)


@st.composite
def inputs(draw):
    total = draw(st.integers(1, 40))
    return HealthInputs(
        drifted_features=draw(st.integers(0, total)),
        total_features=total,
        dataset_drift=draw(st.none() | st.booleans()),
        drift_psi=draw(st.dictionaries(st.sampled_from("abcdef"), st.none() | ratio, max_size=4)),
        prediction_drift=draw(st.none() | st.booleans()),
        performance=draw(
            st.none()
            | st.fixed_dictionaries({}, optional={"accuracy": ratio, "mape": st.floats(0, 3)})
        ),
        quality=draw(
            st.none()
            | st.dictionaries(
                st.sampled_from(["age", "income", "city"]),
                st.fixed_dictionaries(
                    {}, optional={"missing_ratio": ratio, "unseen_ratio": st.none() | ratio}
                ),
                max_size=3,
            )
        ),
        anomalies=draw(
            st.none()
            | st.dictionaries(st.sampled_from(["score", "latency"]), st.integers(0, 20), max_size=2)
        ),
    )


@settings(max_examples=80, deadline=None)
@given(inputs())
def test_score_is_bounded_and_status_matches_findings(health_inputs):
    assessment = score_health(health_inputs)
    assert assessment.score is not None
    assert 0 <= assessment.score <= 100
    assert sum(assessment.penalties.values()) == pytest.approx(
        100 - assessment.score, abs=0.51
    ) or (assessment.score == 0)
    if assessment.status == "healthy":
        assert not any("critical" in r for r in assessment.reasons)
    json.dumps(assessment.to_dict(), allow_nan=False)


@settings(max_examples=80, deadline=None)
@given(inputs(), st.data())
def test_more_drift_never_raises_the_score(health_inputs, data):
    total = health_inputs.total_features
    more = data.draw(st.integers(health_inputs.drifted_features, total))
    worse = dataclasses.replace(
        health_inputs,
        drifted_features=more,
        dataset_drift=data.draw(st.sampled_from([health_inputs.dataset_drift, True])),
        prediction_drift=data.draw(st.sampled_from([health_inputs.prediction_drift, True])),
    )
    before, after = score_health(health_inputs), score_health(worse)
    assert after.score <= before.score
    assert rank(after.status) >= rank(before.status)


@settings(max_examples=80, deadline=None)
@given(inputs(), ratio, st.integers(0, 10), st.floats(0, 1))
def test_worse_performance_quality_or_anomalies_never_raise_the_score(
    health_inputs, drop, extra_anomalies, missing_up
):
    performance = health_inputs.performance
    if performance is not None:
        performance = {
            name: (max(0.0, value - drop) if name == "accuracy" else value + drop)
            for name, value in performance.items()
        }
    quality = health_inputs.quality
    if quality is not None:
        quality = {
            feature: {
                check: (min(1.0, value + missing_up) if check == "missing_ratio" else value)
                for check, value in checks.items()
            }
            for feature, checks in quality.items()
        }
    anomalies = health_inputs.anomalies
    if anomalies is not None:
        anomalies = {**anomalies, "score": anomalies.get("score", 0) + extra_anomalies}
    worse = dataclasses.replace(
        health_inputs, performance=performance, quality=quality, anomalies=anomalies
    )
    before, after = score_health(health_inputs), score_health(worse)
    assert after.score <= before.score
    assert rank(after.status) >= rank(before.status)


@settings(max_examples=50, deadline=None)
@given(inputs())
def test_same_inputs_in_any_order_give_the_same_verdict(health_inputs):
    reordered = dataclasses.replace(
        health_inputs,
        drift_psi=dict(reversed(list(health_inputs.drift_psi.items()))),
        quality=None
        if health_inputs.quality is None
        else dict(reversed(list(health_inputs.quality.items()))),
    )
    assert score_health(reordered) == score_health(health_inputs)


def rank(status: str) -> int:
    return ["healthy", "degraded", "critical"].index(status)


def test_the_performance_metrics_a_limit_can_name_are_exactly_the_reports_numeric_ones():
    """A health limit on a metric the report does not have would never be judged."""
    import typing

    import numpy as np

    from agent.config import PerformanceMetric, Settings
    from agent.engine.performance import ClassificationTally, RegressionTally

    classification = ClassificationTally(positive_class="fraud")
    classification.observe(
        ["fraud", "ok", "ok"], ["fraud", "fraud", "ok"], scores=np.array([0.9, 0.6, 0.2])
    )
    regression = RegressionTally()
    regression.observe(predicted=np.array([2.5, 4.0]), actual=np.array([3.0, 4.0]))
    counts = {"count", "labelled", "scored", "nonfinite", "mape_excluded"}
    judged = {
        name
        for tally in (classification, regression)
        for name, value in tally.metrics().items()
        if name not in counts and not name.endswith("_error_bound") and isinstance(value, float)
    }
    assert set(typing.get_args(PerformanceMetric)) == judged
    with pytest.raises(ValueError, match=r"engine\.health\.performance\.acuracy"):
        Settings.load(None, engine={"health": {"performance": {"acuracy": None}}})
