"""Drift methods on binned counts, against scipy's exact tests on the same data.

Tolerances (measured values in docs/drift.md):
- PSI, JS, chi-square and the KS p-value for a given statistic: exact (1e-9 or better);
- KS statistic from bins: never above the exact one, short of it by at most the largest
  ``min(p_i, q_i)`` over bins (the mass both samples have in one bin, ~1/100 with 100 bins);
- normed Wasserstein from 100 quantile bins: within 0.01 of the exact value for
  continuous data, 0.02 for discrete data or a 500-row reference.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats
from scipy.spatial.distance import jensenshannon

from agent.engine.drift import (
    DEFAULT_THRESHOLDS,
    DriftBaseline,
    DriftResult,
    chi_square,
    choose_method,
    dataset_drift,
    evaluate_feature,
    js_distance,
    ks_binned,
    method_for,
    psi,
    psi_p_value,
    wasserstein_normed,
)
from agent.engine.reference import CategoricalProfile, NumericProfile

# --- strategies -----------------------------------------------------------------------------


@st.composite
def count_pairs(draw, min_bins: int = 1, max_bins: int = 30):
    """Two count vectors over the same bins, each with at least one value."""
    k = draw(st.integers(min_bins, max_bins))
    counts = hnp.arrays(np.int64, k, elements=st.integers(0, 10_000))
    p = draw(counts.filter(lambda c: c.sum() > 0))
    q = draw(counts.filter(lambda c: c.sum() > 0))
    return p, q


samples = hnp.arrays(
    np.float64,
    st.integers(5, 400),
    elements=st.one_of(
        st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False),
        st.sampled_from([0.0, 1.0, 2.0]),  # ties
    ),
)


def psi_direct(p: np.ndarray, q: np.ndarray, eps: float = 1e-4) -> float:
    """PSI written out term by term on the same bins (the definition)."""
    total = 0.0
    for a, b in zip(p / p.sum(), q / q.sum(), strict=True):
        a, b = max(a, eps), max(b, eps)
        total += (b - a) * math.log(b / a)
    return total


def tail_means(b) -> tuple[float | None, float | None]:
    first, last = b.cdf_counts[0], b.cdf_counts[-1]
    return (b.below_sum / first if first else None, b.above_sum / last if last else None)


# --- PSI ------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(count_pairs())
def test_psi_equals_the_sum_written_out_over_the_same_bins(pair):
    p, q = pair
    assert psi(p, q) == pytest.approx(psi_direct(p, q), rel=1e-12, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(count_pairs(), st.integers(1, 50))
def test_psi_is_non_negative_and_zero_for_the_same_proportions(pair, scale):
    p, q = pair
    assert psi(p, q) >= 0.0
    assert psi(p, p) == 0.0
    assert psi(p, p * scale) == pytest.approx(0.0, abs=1e-12)


def test_psi_p_value_is_the_chi_square_tail_of_the_scaled_psi():
    value, n, m, bins = 0.02, 10_000, 2_000, 10
    expected = stats.chi2.sf(value / (1 / n + 1 / m), bins - 1)
    assert psi_p_value(value, n, m, bins) == pytest.approx(expected, rel=1e-12)
    assert psi_p_value(0.0, n, m, 1) == 1.0  # one occupied bin: nothing can differ
    with pytest.raises(ValueError, match="n_ref, n_cur"):
        psi_p_value(0.1, 0, 10, 10)


def test_psi_refuses_mismatched_or_empty_counts():
    with pytest.raises(ValueError, match="cur_counts: shape"):
        psi(np.array([1, 2]), np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="cur_counts: no values counted"):
        psi(np.array([1, 2]), np.array([0, 0]))
    with pytest.raises(ValueError, match="ref_counts: counts must be finite and >= 0"):
        psi(np.array([-1, 2]), np.array([1, 1]))


# --- Kolmogorov-Smirnov ---------------------------------------------------------------------


def binned_pair(a: np.ndarray, b: np.ndarray, cdf_bins: int = 100):
    profile = NumericProfile.from_values(a, cdf_bins=cdf_bins)
    return profile, profile.bin(b)


@settings(max_examples=100, deadline=None)
@given(samples, samples)
def test_binned_ks_is_the_exact_statistic_minus_at_most_one_bins_shared_mass(a, b):
    profile, live = binned_pair(a, b)
    d, _ = ks_binned(profile.cdf_counts, live.cdf_counts)
    exact = stats.ks_2samp(a, b, method="asymp").statistic
    p = profile.cdf_counts / profile.count
    q = live.cdf_counts / live.binned
    assert 0.0 <= d <= exact + 1e-12
    # Between two edges each CDF rises by its bin's mass: the gap can grow by the smaller one.
    assert exact - d <= np.max(np.minimum(p, q)) + 1e-12


def test_binned_ks_is_within_one_percent_of_exact_for_100_quantile_bins():
    worst = 0.0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        a, b = rng.normal(size=10_000), rng.normal(rng.uniform(0, 0.3), 1, size=2_000)
        profile, live = binned_pair(a, b)
        worst = max(
            worst,
            stats.ks_2samp(a, b, method="asymp").statistic
            - ks_binned(profile.cdf_counts, live.cdf_counts)[0],
        )
    assert 0.0 <= worst < 0.01


@settings(max_examples=100, deadline=None)
@given(samples, samples)
def test_ks_on_bins_at_every_observed_value_is_exact_and_its_p_value_is_kolmogorovs(a, b):
    # With an edge at every observed value, the binned CDFs are the empirical CDFs.
    edges = np.unique(np.concatenate([a, b]))
    ref = np.bincount(np.searchsorted(edges, a), minlength=edges.size + 1)
    cur = np.bincount(np.searchsorted(edges, b), minlength=edges.size + 1)
    d, p_value = ks_binned(ref, cur)
    exact = stats.ks_2samp(a, b, method="asymp")
    assert d == pytest.approx(exact.statistic, abs=1e-12)
    en = a.size * b.size / (a.size + b.size)
    assert p_value == pytest.approx(stats.kstwobign.sf(math.sqrt(en) * d), rel=1e-9, abs=1e-12)
    # scipy's "asymp" uses the one-sample finite-n law at round(en); the gap is O(1/sqrt(en)),
    # about 0.1 at en = 9.5 with heavy ties (found by hypothesis), so the constant is 0.5.
    assert abs(p_value - exact.pvalue) <= 0.5 / math.sqrt(en)


# --- Jensen-Shannon -------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(count_pairs())
def test_js_distance_equals_scipy_base_2_on_the_same_counts(pair):
    p, q = pair
    d = js_distance(p, q)
    assert d == pytest.approx(jensenshannon(p, q, base=2), abs=1e-9)
    assert 0.0 <= d <= 1.0
    assert d == js_distance(q, p)


def test_js_distance_is_one_for_disjoint_and_zero_for_equal_proportions():
    assert js_distance(np.array([5, 0]), np.array([0, 7])) == pytest.approx(1.0)
    assert js_distance(np.array([2, 4]), np.array([1, 2])) == 0.0


# --- chi-square -----------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(count_pairs(min_bins=2), st.booleans())
def test_chi_square_equals_scipy_contingency_test_on_the_same_table(pair, correction):
    p, q = pair
    table = np.array([p, q])
    table = table[:, table.sum(0) > 0]  # scipy refuses empty columns; we drop them
    stat, p_value = chi_square(p, q, correction=correction)
    if table.shape[1] < 2:
        assert (stat, p_value) == (0.0, 1.0)
        return
    expected = stats.chi2_contingency(table, correction=correction)
    assert stat == pytest.approx(expected.statistic, rel=1e-9, abs=1e-9)
    assert p_value == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-12)


# --- Wasserstein ----------------------------------------------------------------------------

SCENARIOS = {
    "normal, same": (lambda r: r.normal(size=5000), lambda r: r.normal(size=5000), 0.01),
    "normal, shift 0.5 sd": (
        lambda r: r.normal(size=10_000),
        lambda r: r.normal(0.5, 1, 2000),
        0.01,
    ),
    "normal, scale 1.5": (lambda r: r.normal(size=10_000), lambda r: r.normal(0, 1.5, 2000), 0.01),
    "normal, shift 3 sd": (lambda r: r.normal(size=10_000), lambda r: r.normal(3, 1, 2000), 0.01),
    "lognormal, shift": (
        lambda r: r.lognormal(size=10_000),
        lambda r: r.lognormal(0.2, 1, 2000),
        0.01,
    ),
    "integers 0..19 vs 0..21": (
        lambda r: r.integers(0, 20, 10_000).astype(float),
        lambda r: r.integers(0, 22, 2000).astype(float),
        0.02,
    ),
    "500-row reference": (lambda r: r.normal(size=500), lambda r: r.normal(0.5, 1, 500), 0.02),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_normed_wasserstein_from_bins_is_close_to_scipy_on_raw_data(name):
    make_ref, make_cur, tolerance = SCENARIOS[name]
    for seed in range(5):
        rng = np.random.default_rng(seed)
        a, b = make_ref(rng), make_cur(rng)
        profile, live = binned_pair(a, b)
        w = wasserstein_normed(
            profile.cdf_edges,
            profile.cdf_counts,
            live.cdf_counts,
            profile.std,
            (profile.below_mean, profile.above_mean),
            tail_means(live),
        )
        exact = stats.wasserstein_distance(a, b) / a.std()
        assert w == pytest.approx(exact, abs=tolerance), (name, seed)


@settings(max_examples=100, deadline=None)
@given(samples, samples)
def test_normed_wasserstein_is_non_negative_and_zero_against_itself(a, b):
    profile, live = binned_pair(a, b)
    tails = (profile.below_mean, profile.above_mean)
    w = wasserstein_normed(
        profile.cdf_edges, profile.cdf_counts, live.cdf_counts, profile.std, tails, tail_means(live)
    )
    assert w >= 0.0 and math.isfinite(w)
    assert wasserstein_normed(
        profile.cdf_edges, profile.cdf_counts, profile.cdf_counts, profile.std, tails, tails
    ) == pytest.approx(0.0, abs=1e-12)


# --- choosing a method ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "rows", "unique", "method"),
    [
        ("numeric", 1000, 6, "ks"),
        ("numeric", 1000, 5, "chisquare"),
        ("numeric", 1001, 6, "wasserstein"),
        ("numeric", 1001, 5, "jensenshannon"),
        ("categorical", 1000, 50, "chisquare"),
        ("categorical", 1000, 2, "chisquare"),
        ("categorical", 1001, 2, "jensenshannon"),
    ],
)
def test_default_method_follows_evidentlys_rule(kind, rows, unique, method):
    assert choose_method(kind, rows, unique) == method


def test_choose_method_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        choose_method("text", 10, 10)  # type: ignore[arg-type]


# --- evaluating features --------------------------------------------------------------------


def numeric_case(seed: int, n_ref: int, n_cur: int, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    profile = NumericProfile.from_values(rng.normal(size=n_ref))
    return profile, profile.bin(rng.normal(shift, 1, n_cur))


def categorical_case(seed: int, n_ref: int, n_cur: int, new: float = 0.0):
    rng = np.random.default_rng(seed)
    names = np.array([f"c{i}" for i in range(8)])
    weights = np.linspace(1, 2, 8) / np.linspace(1, 2, 8).sum()
    profile = CategoricalProfile.from_values(list(rng.choice(names, n_ref, p=weights)))
    live = list(rng.choice(names, n_cur, p=weights))
    live[: int(new * n_cur)] = ["brand-new"] * int(new * n_cur)
    return profile, profile.bin(live)


@pytest.mark.parametrize("method", ["psi", "ks", "wasserstein", "jensenshannon", "chisquare"])
def test_mean_shift_of_half_a_std_is_drift_for_every_method(method):
    profile, live = numeric_case(1, 5000, 5000, shift=0.5)
    result = evaluate_feature(profile, live, method=method)
    assert result.drifted and result.method == method
    assert result.psi is not None and result.psi > 0.1


@pytest.mark.parametrize("method", ["psi", "ks", "wasserstein", "jensenshannon", "chisquare"])
def test_two_samples_of_one_distribution_are_not_drift(method):
    profile, live = numeric_case(2, 5000, 5000)
    result = evaluate_feature(profile, live, method=method)
    assert not result.drifted, result


@pytest.mark.parametrize("method", ["psi", "jensenshannon", "chisquare"])
def test_a_new_category_is_drift_and_the_same_mix_is_not(method):
    profile, live = categorical_case(3, 5000, 5000, new=0.2)
    assert evaluate_feature(profile, live, method=method).drifted
    assert live.unseen == 1000
    profile, live = categorical_case(4, 5000, 5000)
    assert not evaluate_feature(profile, live, method=method).drifted


def test_p_value_tests_flag_about_five_percent_of_same_distribution_windows():
    seeds = range(200)
    flagged = {"ks": 0, "chisquare": 0, "psi_p": 0}
    for seed in seeds:
        profile, live = numeric_case(1000 + seed, 1000, 500)
        flagged["ks"] += evaluate_feature(profile, live, method="ks").drifted
        flagged["psi_p"] += evaluate_feature(profile, live).psi_p_value < 0.05  # type: ignore[operator]
        cat, cat_live = categorical_case(2000 + seed, 1000, 500)
        flagged["chisquare"] += evaluate_feature(cat, cat_live, method="chisquare").drifted
    rates = {k: v / len(seeds) for k, v in flagged.items()}
    assert all(rate < 0.10 for rate in rates.values()), rates
    assert rates["chisquare"] > 0.01 and rates["psi_p"] > 0.01, rates  # not vacuously quiet


def test_evaluate_feature_uses_the_default_method_and_threshold():
    profile, live = numeric_case(5, 5000, 500)
    result = evaluate_feature(profile, live)
    assert result.method == method_for(profile) == "wasserstein"
    assert result.threshold == DEFAULT_THRESHOLDS["wasserstein"] and result.p_value is None
    tails = (profile.below_mean, profile.above_mean)
    assert result.score == pytest.approx(
        wasserstein_normed(
            profile.cdf_edges,
            profile.cdf_counts,
            live.cdf_counts,
            profile.std,
            tails,
            tail_means(live),
        ),
        rel=1e-12,
    )
    assert result.psi == pytest.approx(psi(profile.psi_counts, live.psi_counts), rel=1e-12)
    small, small_live = numeric_case(5, 800, 500)
    ks = evaluate_feature(small, small_live)
    assert ks.method == "ks" and (ks.score, ks.p_value) == pytest.approx(
        ks_binned(small.cdf_counts, small_live.cdf_counts), rel=1e-12
    )
    assert evaluate_feature(profile, live, threshold=0.0).drifted


def test_a_feature_without_current_values_has_undefined_drift():
    profile, _ = numeric_case(6, 100, 10)
    result = evaluate_feature(profile, profile.bin(np.array([np.nan])))
    assert (result.score, result.p_value, result.psi, result.drifted) == (None, None, None, False)
    assert json.dumps(result.to_dict(), allow_nan=False)


def test_result_dict_is_json_without_nan():
    result = DriftResult("ks", 0.2, float("nan"), 0.05, False, float("inf"), 0.5)
    assert result.to_dict() == {
        "method": "ks",
        "score": 0.2,
        "p_value": None,
        "threshold": 0.05,
        "drifted": False,
        "psi": None,
        "psi_p_value": 0.5,
    }


def test_all_features_at_once_equal_one_at_a_time():
    rng = np.random.default_rng(8)
    profiles = {
        "wide": NumericProfile.from_values(rng.normal(size=4000)),
        "discrete": NumericProfile.from_values(rng.integers(0, 3, 4000).astype(float)),
        "small": NumericProfile.from_values(rng.normal(size=300)),
        "coarse": NumericProfile.from_values(rng.normal(size=4000), psi_bins=4, cdf_bins=20),
        "city": CategoricalProfile.from_values(list(rng.choice(["a", "b", "c"], 4000))),
        "tiny": CategoricalProfile.from_values(["x"] * 10 + ["y"] * 5),
        "absent": NumericProfile.from_values(rng.normal(size=100)),
        "all-missing": CategoricalProfile.from_values([""] * 10),
    }
    current = {
        "wide": profiles["wide"].bin(rng.normal(0.2, 1, 700)),  # type: ignore[union-attr]
        "discrete": profiles["discrete"].bin(rng.integers(0, 4, 700).astype(float)),  # type: ignore[union-attr]
        "small": profiles["small"].bin(rng.normal(size=300)),  # type: ignore[union-attr]
        "coarse": profiles["coarse"].bin(rng.normal(1, 1, 50)),  # type: ignore[union-attr]
        "city": profiles["city"].bin(list(rng.choice(["a", "b", "d"], 700))),  # type: ignore[union-attr]
        "tiny": profiles["tiny"].bin(["x", "y", "y"]),  # type: ignore[union-attr]
        "all-missing": profiles["all-missing"].bin(["a"]),  # type: ignore[union-attr]
    }
    methods = {"coarse": "chisquare", "tiny": "psi"}
    together = DriftBaseline(profiles, methods=methods).evaluate(current)  # type: ignore[arg-type]
    assert list(together) == list(profiles)
    for name, profile in profiles.items():
        alone = evaluate_feature(
            profile, current.get(name, profile.empty_bins()), method=methods.get(name)
        )  # type: ignore[arg-type]
        a, b = together[name].to_dict(), alone.to_dict()
        assert (a["method"], a["drifted"], a["threshold"]) == (
            b["method"],
            b["drifted"],
            b["threshold"],
        )
        for key in ("score", "p_value", "psi", "psi_p_value"):
            expected = None if b[key] is None else pytest.approx(b[key], rel=1e-12, abs=1e-300)
            assert a[key] == expected, (name, key)
    assert [together[n].method for n in ("wide", "discrete", "small", "city")] == [
        "wasserstein",
        "jensenshannon",
        "ks",
        "jensenshannon",
    ]
    assert together["absent"].score is None and together["all-missing"].score is None


def test_baseline_names_bad_overrides_and_mismatched_counts():
    profile, _ = numeric_case(9, 100, 10)
    cat = CategoricalProfile.from_values(["a", "b"])
    with pytest.raises(ValueError, match=re.escape("methods.nope: no such feature")):
        DriftBaseline({"x": profile}, methods={"nope": "ks"})
    with pytest.raises(ValueError, match=re.escape("methods.c: ks needs a numeric feature")):
        DriftBaseline({"c": cat}, methods={"c": "ks"})
    with pytest.raises(ValueError, match=re.escape("methods.x: 't' is not one of")):
        DriftBaseline({"x": profile}, methods={"x": "t"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=re.escape("thresholds.ks")):
        DriftBaseline({"x": profile}, thresholds={"ks": -1.0})
    other, _ = numeric_case(9, 100, 10)
    coarse = NumericProfile.from_values(np.arange(100.0), psi_bins=4, cdf_bins=8)
    with pytest.raises(ValueError, match="x: counts do not match"):
        DriftBaseline({"x": other}).evaluate({"x": coarse.bin(np.arange(5.0))})


# --- dataset drift --------------------------------------------------------------------------


def result(drifted: bool, score: float | None = 0.5) -> DriftResult:
    return DriftResult("psi", score, None, 0.1, drifted, score, None)


def test_dataset_drifts_when_the_share_of_drifted_features_reaches_the_threshold():
    assert dataset_drift([result(True), result(False)]) == (0.5, True)
    assert dataset_drift([result(True), result(False), result(False)]) == (
        pytest.approx(1 / 3),
        False,
    )
    assert dataset_drift([result(True), result(False), result(False)], share=0.3)[1]
    # Undefined features do not count either way.
    assert dataset_drift([result(True), result(False, None), result(False, None)]) == (1.0, True)
    assert dataset_drift([]) == (None, False)
    with pytest.raises(ValueError, match="share"):
        dataset_drift([], share=1.5)


def test_the_default_js_threshold_is_evidentlys_decision_in_base_2():
    """Evidently 0.7 calls scipy's jensenshannon without ``base`` (natural log) and flags
    at 0.1; the same pairs of distributions must be flagged by our base-2 distance."""
    rng = np.random.default_rng(8)
    flagged = 0
    for _ in range(500):  # pairs near each other: distances on both sides of the threshold
        p = rng.dirichlet(np.ones(10))
        q = rng.dirichlet(p * rng.uniform(5, 500) + 0.01)
        natural, base2 = jensenshannon(p, q), jensenshannon(p, q, base=2)
        if abs(natural - 0.1) > 1e-4:  # away from the rounding of the threshold
            assert (natural >= 0.1) == (base2 >= DEFAULT_THRESHOLDS["jensenshannon"])
            flagged += natural >= 0.1
    assert 50 < flagged < 450
    assert DEFAULT_THRESHOLDS["jensenshannon"] == 0.1201
