"""EWMA anomaly flags: warm-up, z-scores, skipped values, zero variance, many streams at once.

The statistics are checked against ``explicit_ewma``, a plain-Python EWMA that gives each
value its weight outright, in exact arithmetic, rather than updating a running mean.
"""

from __future__ import annotations

import doctest
import json
import math
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import agent.engine.anomaly as anomaly_module
from agent.engine.anomaly import EwmaBank, ewma_alpha

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
# Multiples of 1/8: exact in binary, so the z-scores of the reference are well conditioned.
grid = st.integers(-8000, 8000).map(lambda i: i / 8)


def explicit_ewma(
    values: list[float], alpha: float, weights: list[float] | None = None
) -> list[tuple[float, float]]:
    """Mean and variance after each value. Value ``j`` enters with share
    ``a_j = max(1 - (1 - alpha)**w_j, w_j / (w_1 + ... + w_j))``, and each later value ``k``
    leaves it ``1 - a_k`` of its share; mean and variance are the weighted ones."""
    weights = weights or [1.0] * len(values)
    shares: list[Fraction] = []
    total = 0.0
    out = []
    for t, weight in enumerate(weights):
        total += weight
        shares.append(Fraction(max(1.0 - (1.0 - alpha) ** weight, weight / total)))
        kept = []
        for j in range(t + 1):
            share = shares[j]
            for later in shares[j + 1 : t + 1]:
                share *= 1 - later
            kept.append(share)
        xs = [Fraction(x) for x in values[: t + 1]]
        mean = sum(k * x for k, x in zip(kept, xs, strict=True))
        var = sum(k * (x - mean) ** 2 for k, x in zip(kept, xs, strict=True))
        out.append((float(mean), float(var)))
    return out


def expected_z(value: float, mean: float, var: float, min_std: float = 0.0) -> float:
    std = max(math.sqrt(var), min_std)
    if std == 0:
        return 0.0 if value == mean else math.copysign(math.inf, value - mean)
    return (value - mean) / std


def assert_same_z(actual: float, expected: float) -> None:
    if math.isinf(expected):
        assert actual == expected
    else:
        assert actual == pytest.approx(expected, rel=1e-7, abs=1e-9)


def one_stream(**kwargs: Any) -> EwmaBank:
    return EwmaBank(["x"], **kwargs)


def z_of(bank: EwmaBank, value: float, weight: float = 1.0) -> float:
    """The z-score a one-stream bank gives ``value`` (NaN: not scored)."""
    return float(bank.observe([value], weight).z[0])


def test_docstring_examples_run():
    result = doctest.testmod(anomaly_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


# --- smoothing factor and settings ----------------------------------------------------------


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
        EwmaBank(["a"], **kwargs)


@pytest.mark.parametrize("weight", [0.0, -1.0, math.nan, math.inf])
def test_a_weight_that_is_not_positive_is_refused(weight):
    with pytest.raises(ValueError, match="weight"):
        EwmaBank(["a"]).observe([1.0], weight)


def test_bad_input_is_refused_naming_it():
    with pytest.raises(ValueError, match="'a' appears more than once"):
        EwmaBank(["a", "b", "a"])
    bank = EwmaBank(["a", "b"])
    with pytest.raises(ValueError, match=r"values: shape \(3,\)"):
        bank.observe([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"values\['c'\]"):
        bank.observe_mapping({"c": 1.0})


# --- warm-up and statistics -----------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 30), st.lists(finite, min_size=31, max_size=60))
def test_no_flag_during_warm_up_then_every_value_is_scored(warmup, values):
    bank = one_stream(alpha=0.05, warmup=warmup)
    zs = [z_of(bank, v) for v in values]
    assert all(math.isnan(z) for z in zs[:warmup])
    assert not any(math.isnan(z) for z in zs[warmup:])


@settings(max_examples=50, deadline=None)
@given(st.lists(finite, min_size=2, max_size=15))
def test_the_start_is_a_plain_mean_and_variance_not_biased_to_the_first_value(values):
    # With alpha 0.05, 1/t stays above alpha for the first 20 values: equal weights.
    bank = one_stream(alpha=0.05)
    for v in values:
        bank.observe([v])
    assert bank.mean[0] == pytest.approx(np.mean(values), rel=1e-9, abs=1e-6)
    assert bank.var[0] == pytest.approx(np.var(values), rel=1e-6, abs=1e-3)


def test_the_statistics_follow_the_ewma_recursion_once_past_the_start():
    alpha = 0.2
    rng = np.random.default_rng(3)
    values = rng.normal(10, 2, size=50)
    bank = one_stream(alpha=alpha)
    for v in values:
        bank.observe([v])
    # Weights of the exact EWMA: (1-alpha)^age, with the first 1/alpha values averaged equally.
    start = int(1 / alpha)
    weights = np.array(
        [(1 - alpha) ** (len(values) - start)] * start
        + [alpha * (1 - alpha) ** age for age in range(len(values) - start - 1, -1, -1)]
    )
    weights[:start] /= start
    assert weights.sum() == pytest.approx(1.0)
    assert bank.mean[0] == pytest.approx(float(weights @ values))


@settings(max_examples=60, deadline=None)
@given(st.lists(grid, min_size=1, max_size=40), st.integers(2, 6), st.sampled_from([0.1, 0.2, 0.5]))
def test_every_z_score_mean_and_variance_match_the_explicit_ewma(values, warmup, alpha):
    bank = one_stream(alpha=alpha, warmup=warmup)
    expected = explicit_ewma(values, alpha)
    for t, value in enumerate(values):
        flags = bank.observe([value])
        if t < warmup:
            assert math.isnan(flags.z[0]) and not flags.flagged[0]
        else:
            z = expected_z(value, *expected[t - 1])
            assert_same_z(float(flags.z[0]), z)
            if not math.isclose(abs(z), 3.0, rel_tol=1e-6):
                assert bool(flags.flagged[0]) == (abs(z) > 3.0)
        assert bank.mean[0] == pytest.approx(expected[t][0], rel=1e-9, abs=1e-9)
        assert bank.var[0] == pytest.approx(expected[t][1], rel=1e-7, abs=1e-9)


@settings(max_examples=50, deadline=None)
@given(st.lists(finite, min_size=20, max_size=40), finite)
def test_z_has_the_sign_of_the_values_distance_from_the_mean(values, value):
    bank = one_stream(alpha=0.1, warmup=20)
    for v in values:
        bank.observe([v])
    mean = bank.mean[0]
    flags = bank.observe([value])
    z = float(flags.z[0])
    if value > mean:
        assert z > 0
    elif value < mean:
        assert z < 0
    assert bool(flags.flagged[0]) == (abs(z) > 3.0)


def test_a_value_of_weight_two_moves_the_statistics_as_two_equal_values():
    rng = np.random.default_rng(5)
    once, twice = one_stream(alpha=0.1), one_stream(alpha=0.1)
    for v in rng.normal(size=40):
        once.observe([v])
        twice.observe([v])
    once.observe([4.0], 2)
    twice.observe([4.0])
    twice.observe([4.0])
    assert once.mean[0] == pytest.approx(twice.mean[0])
    assert once.var[0] == pytest.approx(twice.var[0])


def test_weights_per_stream_match_the_explicit_ewma():
    bank = EwmaBank(["a", "b"], alpha=0.1, warmup=2)
    rows = [([1.0, 5.0], [1.0, 3.0]), ([2.0, 6.0], [2.0, 0.5]), ([9.0, 4.0], [1.5, 1.5])]
    for values, weights in rows[:2]:
        bank.observe(values, weights)
    bank.observe(rows[2][0], 1.5)  # one weight for every stream
    for i in range(2):
        values = [row[0][i] for row in rows]
        weights = [row[1][i] for row in rows]
        mean, var = explicit_ewma(values, 0.1, weights)[-1]
        assert bank.mean[i] == pytest.approx(mean)
        assert bank.var[i] == pytest.approx(var)


# --- skipped values and zero variance -------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinite_values_are_skipped_without_touching_the_statistics(bad):
    bank = one_stream(warmup=2)
    for v in (1.0, 2.0, 3.0):
        bank.observe([v])
    before = (bank.mean[0], bank.var[0], bank.observations[0])
    flags = bank.observe([bad])
    assert math.isnan(flags.z[0]) and not flags.flagged[0]
    assert (bank.mean[0], bank.var[0], bank.observations[0]) == before
    assert bank.skipped[0] == 1


def test_skipped_values_do_not_count_towards_warm_up():
    bank = one_stream(warmup=3)
    for v in (1.0, math.nan, math.nan, 2.0, 3.0):
        assert math.isnan(z_of(bank, v))
    assert not math.isnan(z_of(bank, 2.0))


def test_a_constant_stream_scores_zero_and_its_first_change_is_flagged_with_infinite_z():
    bank = one_stream(warmup=5)
    for _ in range(10):
        bank.observe([7.0])
    same = bank.observe([7.0])
    assert same.z[0] == 0.0 and not same.flagged[0]
    moved = bank.observe([7.5])
    assert moved.z[0] == math.inf and moved.flagged[0]
    assert moved.to_dict()["x"] is None
    json.dumps(moved.to_dict(), allow_nan=False)


def test_a_std_floor_keeps_tiny_moves_of_a_constant_stream_quiet():
    bank = one_stream(warmup=5, min_std=0.5)
    for _ in range(10):
        bank.observe([7.0])
    flags = bank.observe([7.5])
    assert flags.z[0] == pytest.approx(1.0) and not flags.flagged[0]


# --- detection ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(10))
def test_a_step_of_four_sigma_is_flagged_within_three_observations(seed):
    rng = np.random.default_rng(seed)
    bank = one_stream()
    for v in rng.normal(size=200):
        bank.observe([v])
    flags = [bank.observe([v]) for v in rng.normal(size=3) + 4.0]
    assert any(f.flagged[0] for f in flags)


def test_a_lasting_shift_becomes_the_new_normal():
    rng = np.random.default_rng(11)
    bank = one_stream(half_life=10)
    for v in rng.normal(size=200):
        bank.observe([v])
    shifted = [bool(bank.observe([v]).flagged[0]) for v in rng.normal(size=300) + 5.0]
    assert shifted[0]
    assert sum(shifted[-100:]) <= 2


@pytest.mark.parametrize("half_life", [10.0, 20.0, 50.0])
def test_stationary_gaussian_noise_is_flagged_less_than_one_percent_of_the_time(half_life):
    # The Gaussian tail beyond 3 sigma is 0.27 %; an estimated std adds a little.
    # Eight independent streams at once: 8 x 2 500 values.
    rng = np.random.default_rng(2024)
    bank = EwmaBank([f"s{i}" for i in range(8)], half_life=half_life)
    for values in rng.normal(100.0, 15.0, size=(2_500, 8)):
        bank.observe(values)
    rate = bank.anomalies.sum() / (bank.observations - bank.warmup).sum()
    assert 0.001 < rate < 0.01


# --- many streams ---------------------------------------------------------------------------

stream_value = st.one_of(grid, st.just(math.nan))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda k: st.lists(st.lists(stream_value, min_size=k, max_size=k), min_size=1, max_size=30)
    ),
    st.integers(2, 6),
)
def test_each_stream_is_its_own_ewma_of_its_finite_values(rows, warmup):
    k = len(rows[0])
    bank = EwmaBank([f"s{i}" for i in range(k)], alpha=0.2, warmup=warmup)
    zs = np.array([bank.observe(row).z for row in rows])
    for i in range(k):
        column = [row[i] for row in rows]
        seen = [v for v in column if not math.isnan(v)]
        expected = explicit_ewma(seen, 0.2)
        scored = 0
        for t, value in enumerate(column):
            if math.isnan(value):
                assert math.isnan(zs[t, i])
                continue
            if scored < warmup:
                assert math.isnan(zs[t, i])
            else:
                assert_same_z(float(zs[t, i]), expected_z(value, *expected[scored - 1]))
            scored += 1
        assert bank.observations[i] == len(seen)
        assert bank.skipped[i] == len(column) - len(seen)
        if seen:
            assert bank.mean[i] == pytest.approx(expected[-1][0], rel=1e-9, abs=1e-9)
            assert bank.var[i] == pytest.approx(expected[-1][1], rel=1e-7, abs=1e-9)


def test_the_flagged_streams_are_named_and_the_report_is_strict_json():
    bank = EwmaBank(["score", "latency"], alpha=0.1, warmup=3)
    assert bank.report()["score"]["mean"] is None
    for means in ([0.2, 10.0], [0.21, 11.0], [0.19, 9.0]):
        bank.observe(means)
    flags = bank.observe_mapping({"latency": 80.0})
    assert flags.flagged_names() == ["latency"]
    assert flags.to_dict()["score"] is None  # not sent: skipped
    report = bank.report()
    assert (report["latency"]["observations"], report["latency"]["anomalies"]) == (4, 1)
    assert report["latency"]["warming_up"] is False
    assert (report["score"]["observations"], report["score"]["skipped"]) == (3, 1)
    json.dumps(report, allow_nan=False)
    json.dumps(flags.to_dict(), allow_nan=False)
