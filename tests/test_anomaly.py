"""EWMA anomaly flags: warm-up, z-scores, skipped values, zero variance, and the bank of many streams."""

from __future__ import annotations

import doctest
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import agent.engine.anomaly as anomaly_module
from agent.engine.anomaly import AnomalyFlag, EwmaBank, EwmaDetector, ewma_alpha

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


def test_docstring_examples_run():
    result = doctest.testmod(anomaly_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


# --- smoothing factor -----------------------------------------------------------------------


@pytest.mark.parametrize("half_life", [1.0, 5.0, 20.0, 288.0])
def test_after_one_half_life_the_old_mean_keeps_half_its_weight(half_life):
    alpha = ewma_alpha(half_life=half_life)
    assert (1 - alpha) ** half_life == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 0.1, "half_life": 5}, "not both"),
        ({"alpha": 0.0}, "alpha=0.0"),
        ({"alpha": 1.5}, "alpha=1.5"),
        ({"half_life": -1.0}, "half_life=-1.0"),
        ({"warmup": 1}, "warmup=1"),
        ({"z_threshold": 0.0}, "z_threshold=0.0"),
        ({"min_std": -1.0}, "min_std=-1.0"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EwmaDetector(**kwargs)
    with pytest.raises(ValueError, match=message):
        EwmaBank(["a"], **kwargs)


@pytest.mark.parametrize("weight", [0.0, -1.0, math.nan, math.inf])
def test_a_weight_that_is_not_positive_is_refused(weight):
    with pytest.raises(ValueError, match="weight"):
        EwmaDetector().observe(1.0, weight)
    with pytest.raises(ValueError, match="weight"):
        EwmaBank(["a"]).observe([1.0], weight)


# --- warm-up and statistics -----------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 30), st.lists(finite, min_size=31, max_size=60))
def test_no_flag_during_warm_up_then_every_value_is_scored(warmup, values):
    detector = EwmaDetector(alpha=0.05, warmup=warmup)
    results = [detector.observe(v) for v in values]
    assert all(r is None for r in results[:warmup])
    assert all(isinstance(r, AnomalyFlag) for r in results[warmup:])


@settings(max_examples=50, deadline=None)
@given(st.lists(finite, min_size=2, max_size=15))
def test_the_start_is_a_plain_mean_and_variance_not_biased_to_the_first_value(values):
    # With alpha 0.05, 1/t stays above alpha for the first 20 values: equal weights.
    detector = EwmaDetector(alpha=0.05)
    for v in values:
        detector.observe(v)
    assert detector.mean == pytest.approx(np.mean(values), rel=1e-9, abs=1e-6)
    assert detector.var == pytest.approx(np.var(values), rel=1e-6, abs=1e-3)


def test_the_statistics_follow_the_ewma_recursion_once_past_the_start():
    alpha = 0.2
    rng = np.random.default_rng(3)
    values = rng.normal(10, 2, size=50)
    detector = EwmaDetector(alpha=alpha)
    for v in values:
        detector.observe(v)
    # Weights of the exact EWMA: (1-alpha)^age, with the first 1/alpha values averaged equally.
    start = int(1 / alpha)
    weights = np.array(
        [(1 - alpha) ** (len(values) - start)] * start
        + [alpha * (1 - alpha) ** age for age in range(len(values) - start - 1, -1, -1)]
    )
    weights[:start] /= start
    assert weights.sum() == pytest.approx(1.0)
    assert detector.mean == pytest.approx(float(weights @ values))


@settings(max_examples=50, deadline=None)
@given(st.lists(finite, min_size=20, max_size=40), finite)
def test_z_has_the_sign_of_the_values_distance_from_the_mean(values, value):
    detector = EwmaDetector(alpha=0.1, warmup=20)
    for v in values:
        detector.observe(v)
    mean = detector.mean
    flag = detector.observe(value)
    assert flag is not None
    if value > mean:
        assert flag.z > 0
    elif value < mean:
        assert flag.z < 0
    assert flag.flagged == (abs(flag.z) > 3.0)


def test_a_value_of_weight_two_moves_the_statistics_as_two_equal_values():
    rng = np.random.default_rng(5)
    once, twice = EwmaDetector(alpha=0.1), EwmaDetector(alpha=0.1)
    for v in rng.normal(size=40):
        once.observe(v)
        twice.observe(v)
    once.observe(4.0, weight=2)
    twice.observe(4.0)
    twice.observe(4.0)
    assert once.mean == pytest.approx(twice.mean)
    assert once.var == pytest.approx(twice.var)


# --- skipped values and zero variance -------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinite_values_are_skipped_without_touching_the_statistics(bad):
    detector = EwmaDetector(warmup=2)
    for v in (1.0, 2.0, 3.0):
        detector.observe(v)
    before = (detector.mean, detector.var, detector.observations)
    assert detector.observe(bad) is None
    assert (detector.mean, detector.var, detector.observations) == before
    assert detector.skipped == 1


def test_skipped_values_do_not_count_towards_warm_up():
    detector = EwmaDetector(warmup=3)
    for v in (1.0, math.nan, math.nan, 2.0):
        assert detector.observe(v) is None
    assert detector.observe(3.0) is None
    assert detector.observe(2.0) is not None


def test_a_constant_stream_scores_zero_and_its_first_change_is_flagged_with_infinite_z():
    detector = EwmaDetector(warmup=5)
    for _ in range(10):
        detector.observe(7.0)
    same = detector.observe(7.0)
    assert same is not None and same.z == 0.0 and not same.flagged
    moved = detector.observe(7.5)
    assert moved is not None and moved.z == math.inf and moved.flagged
    assert moved.to_dict()["z"] is None
    json.dumps(moved.to_dict(), allow_nan=False)


def test_a_std_floor_keeps_tiny_moves_of_a_constant_stream_quiet():
    detector = EwmaDetector(warmup=5, min_std=0.5)
    for _ in range(10):
        detector.observe(7.0)
    flag = detector.observe(7.5)
    assert flag is not None and flag.z == pytest.approx(1.0) and not flag.flagged


# --- detection ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(10))
def test_a_step_of_four_sigma_is_flagged_within_three_observations(seed):
    rng = np.random.default_rng(seed)
    detector = EwmaDetector()
    for v in rng.normal(size=200):
        detector.observe(v)
    flags = [detector.observe(v) for v in rng.normal(size=3) + 4.0]
    assert any(f is not None and f.flagged for f in flags)


def test_a_lasting_shift_becomes_the_new_normal():
    rng = np.random.default_rng(11)
    detector = EwmaDetector(half_life=10)
    for v in rng.normal(size=200):
        detector.observe(v)
    shifted = [detector.observe(v) for v in rng.normal(size=300) + 5.0]
    assert shifted[0] is not None and shifted[0].flagged
    late = [f for f in shifted[-100:] if f is not None and f.flagged]
    assert len(late) <= 2


@pytest.mark.parametrize("half_life", [10.0, 20.0, 50.0])
def test_stationary_gaussian_noise_is_flagged_less_than_one_percent_of_the_time(half_life):
    # The Gaussian tail beyond 3 sigma is 0.27 %; an estimated std adds a little.
    rng = np.random.default_rng(2024)
    detector = EwmaDetector(half_life=half_life)
    values = rng.normal(100.0, 15.0, size=20_000)
    scored = sum(detector.observe(v) is not None for v in values)
    rate = detector.anomalies / scored
    assert 0.001 < rate < 0.01


def test_report_counts_and_is_strict_json():
    detector = EwmaDetector(warmup=2)
    assert detector.report()["mean"] is None
    for v in (1.0, 2.0, math.nan, 50.0):
        detector.observe(v)
    report = detector.report()
    assert (report["observations"], report["skipped"], report["anomalies"]) == (3, 1, 1)
    assert report["warming_up"] is False
    json.dumps(report, allow_nan=False)


# --- the bank -------------------------------------------------------------------------------

stream_value = st.one_of(finite, st.just(math.nan))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda k: st.lists(st.lists(stream_value, min_size=k, max_size=k), min_size=1, max_size=40)
    ),
    st.integers(2, 6),
)
def test_each_stream_of_a_bank_behaves_as_its_own_detector(rows, warmup):
    k = len(rows[0])
    bank = EwmaBank([f"s{i}" for i in range(k)], alpha=0.2, warmup=warmup)
    detectors = [EwmaDetector(alpha=0.2, warmup=warmup) for _ in range(k)]
    for row in rows:
        flags = bank.observe(row)
        for i, value in enumerate(row):
            flag = detectors[i].observe(value)
            if flag is None:
                assert math.isnan(flags.z[i])
                assert not flags.flagged[i]
            else:
                assert flags.z[i] == pytest.approx(flag.z, rel=1e-9, abs=1e-9) or (
                    math.isinf(flag.z) and flags.z[i] == flag.z
                )
                assert bool(flags.flagged[i]) == flag.flagged
    for i, detector in enumerate(detectors):
        assert bank.observations[i] == detector.observations
        assert bank.skipped[i] == detector.skipped
        assert bank.anomalies[i] == detector.anomalies
        assert bank.mean[i] == pytest.approx(detector.mean, rel=1e-9, abs=1e-9)


def test_bank_weights_per_stream_match_detectors():
    bank = EwmaBank(["a", "b"], alpha=0.1, warmup=2)
    a, b = EwmaDetector(alpha=0.1, warmup=2), EwmaDetector(alpha=0.1, warmup=2)
    for values, weights in [([1.0, 5.0], [1.0, 3.0]), ([2.0, 6.0], [2.0, 0.5]), ([9.0, 4.0], 1.5)]:
        bank.observe(values, weights)
        w = np.broadcast_to(weights, 2)
        a.observe(values[0], float(w[0]))
        b.observe(values[1], float(w[1]))
    assert bank.mean.tolist() == pytest.approx([a.mean, b.mean])
    assert bank.var.tolist() == pytest.approx([a.var, b.var])


def test_bank_names_the_flagged_streams_and_reports_json():
    bank = EwmaBank(["score", "latency"], alpha=0.1, warmup=3)
    for means in ([0.2, 10.0], [0.21, 11.0], [0.19, 9.0]):
        bank.observe(means)
    flags = bank.observe_mapping({"latency": 80.0})
    assert flags.flagged_names() == ["latency"]
    assert flags.to_dict()["score"] is None  # not sent: skipped
    assert bank.report()["latency"]["anomalies"] == 1
    assert bank.report()["score"]["skipped"] == 1
    json.dumps(bank.report(), allow_nan=False)
    json.dumps(flags.to_dict(), allow_nan=False)


def test_bank_refuses_bad_input_naming_it():
    with pytest.raises(ValueError, match="'a' appears more than once"):
        EwmaBank(["a", "b", "a"])
    bank = EwmaBank(["a", "b"])
    with pytest.raises(ValueError, match=r"values: shape \(3,\)"):
        bank.observe([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"values\['c'\]"):
        bank.observe_mapping({"c": 1.0})
