"""Performance of joined pairs against scikit-learn on the same pairs, and as a streaming tally.

Exact metrics agree with scikit-learn to 1e-9; binned ROC AUC stays within the bound it
reports; merging tallies or splitting a stream into other batches changes nothing; undefined
metrics are None, never NaN, never an exception.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    log_loss,
    mean_absolute_error,
    mean_absolute_percentage_error,
    mean_squared_error,
    precision_recall_fscore_support,
    r2_score,
    roc_auc_score,
)

from agent.engine.performance import (
    EPS,
    LABEL_DELAY_BOUNDS_S,
    OTHER,
    ClassificationTally,
    JoinedPairs,
    LabelDelay,
    PerformanceTally,
    RegressionTally,
)

EXACT = 1e-9

# --- helpers --------------------------------------------------------------------------------


def same_metrics(got: dict, expected: dict) -> None:
    """Same keys; counts equal; floats equal up to summation order; None where None."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if value is None:
            assert got[key] is None, key
        else:
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def binary_stream(n: int, seed: int = 0) -> tuple[list[str], list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    positive = rng.random(n) < 0.3
    scores = np.clip(0.35 * positive + 0.65 * rng.random(n), 0.0, 1.0)
    actual = np.where(positive, "fraud", "ok").tolist()
    predicted = np.where(scores > 0.5, "fraud", "ok").tolist()
    return actual, predicted, scores


def multiclass_stream(
    n: int, names: list[str], seed: int = 0
) -> tuple[list[str], list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    actual_idx = rng.integers(0, len(names), n)
    logits = rng.normal(size=(n, len(names)))
    logits[np.arange(n), actual_idx] += 1.0  # better than chance, still wrong often
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    actual = [names[i] for i in actual_idx]
    predicted = [names[i] for i in probs.argmax(axis=1)]
    return actual, predicted, probs


def ece_reference(hit: np.ndarray, score: np.ndarray, n_bins: int = 10) -> float:
    """ECE from sklearn's reliability diagram: sum |positive rate - mean score| x bin share."""
    prob_true, prob_pred = calibration_curve(hit, score, n_bins=n_bins, strategy="uniform")
    bins = np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], score)
    counts = np.bincount(bins, minlength=n_bins)
    counts = counts[counts > 0]
    return float(np.sum(np.abs(prob_true - prob_pred) * counts / score.size))


def split(n: int, cuts: list[int]) -> list[slice]:
    edges = [0, *sorted({c % (n + 1) for c in cuts}), n]
    return [slice(a, b) for a, b in itertools.pairwise(edges)]


# --- classification against scikit-learn ----------------------------------------------------


def test_accuracy_and_per_class_precision_recall_f1_match_sklearn() -> None:
    names = ["ant", "bee", "cat", "dog", "eel"]
    actual, predicted, _ = multiclass_stream(3000, names[:4])
    predicted[:40] = ["eel"] * 40  # a class that is predicted but never actual
    tally = ClassificationTally()
    tally.observe(actual, predicted)

    metrics = tally.metrics()
    assert metrics["accuracy"] == pytest.approx(accuracy_score(actual, predicted), abs=EXACT)
    labels = sorted(set(actual) | set(predicted))
    precision, recall, f1, support = precision_recall_fscore_support(
        actual, predicted, labels=labels, average=None, zero_division=0
    )
    per_class = tally.per_class()
    assert list(per_class) == labels
    for i, label in enumerate(labels):
        assert per_class[label]["precision"] == pytest.approx(precision[i], abs=EXACT)
        assert per_class[label]["recall"] == pytest.approx(recall[i], abs=EXACT)
        assert per_class[label]["f1"] == pytest.approx(f1[i], abs=EXACT)
        assert per_class[label]["support"] == support[i]
    macro = precision_recall_fscore_support(actual, predicted, average="macro", zero_division=0)
    assert metrics["precision_macro"] == pytest.approx(macro[0], abs=EXACT)
    assert metrics["recall_macro"] == pytest.approx(macro[1], abs=EXACT)
    assert metrics["f1_macro"] == pytest.approx(macro[2], abs=EXACT)


def test_binary_log_loss_and_brier_from_the_positive_score_match_sklearn() -> None:
    actual, predicted, scores = binary_stream(5000)
    tally = ClassificationTally(positive_class="fraud")
    tally.observe(actual, predicted, scores=scores)

    metrics = tally.metrics()
    positive = np.array(actual) == "fraud"  # a 1-D y_prob is the score of the label 1
    assert metrics["log_loss"] == pytest.approx(log_loss(positive, scores), abs=EXACT)
    assert metrics["brier"] == pytest.approx(
        brier_score_loss(actual, scores, pos_label="fraud"), abs=EXACT
    )


def test_multiclass_log_loss_and_brier_from_probabilities_match_sklearn() -> None:
    names = ["ant", "bee", "cat", "dog"]  # sorted: sklearn's column order
    actual, _, probs = multiclass_stream(4000, names, seed=1)
    tally = ClassificationTally()
    tally.observe(actual, None, probabilities=probs, class_names=names)

    metrics = tally.metrics()
    assert metrics["log_loss"] == pytest.approx(log_loss(actual, probs, labels=names), abs=EXACT)
    # sklearn's multiclass Brier: sum over classes, not halved (scale_by_half="auto").
    assert metrics["brier"] == pytest.approx(
        brier_score_loss(actual, probs, labels=names), abs=EXACT
    )
    argmax = [names[i] for i in probs.argmax(axis=1)]
    assert metrics["accuracy"] == pytest.approx(accuracy_score(actual, argmax), abs=EXACT)
    assert metrics["f1_macro"] == pytest.approx(
        precision_recall_fscore_support(actual, argmax, average="macro", zero_division=0)[2],
        abs=EXACT,
    )


def test_two_class_probabilities_give_the_binary_figures_of_their_positive_column() -> None:
    actual, predicted, scores = binary_stream(2000, seed=2)
    from_probs = ClassificationTally()  # positive: the second of two class names, as sklearn
    from_probs.observe(
        actual,
        predicted,
        probabilities=np.column_stack([1 - scores, scores]),
        class_names=["ok", "fraud"],
    )
    from_score = ClassificationTally(positive_class="fraud")
    from_score.observe(actual, predicted, scores=scores)

    assert from_probs.positive_class == "fraud"
    same_metrics(from_probs.metrics(), from_score.metrics())
    assert from_probs.metrics()["brier"] == pytest.approx(
        brier_score_loss(actual, scores, pos_label="fraud"), abs=EXACT
    )


def test_log_loss_clips_a_certain_wrong_prediction_as_sklearn_does() -> None:
    actual = ["fraud", "ok", "ok"]
    scores = np.array([0.0, 1.0, 0.2])
    tally = ClassificationTally(positive_class="fraud")
    tally.observe(actual, scores=scores)

    expected = log_loss([1, 0, 0], scores)
    assert tally.metrics()["log_loss"] == pytest.approx(expected, abs=EXACT)
    assert expected == pytest.approx((2 * -math.log(EPS) - math.log(0.8)) / 3)


def test_an_actual_label_outside_class_names_has_probability_zero() -> None:
    tally = ClassificationTally()
    tally.observe(
        ["cat", "eel"],
        None,
        probabilities=np.array([[0.5, 0.5], [0.5, 0.5]]),
        class_names=["cat", "dog"],
    )

    metrics = tally.metrics()
    assert metrics["log_loss"] == pytest.approx((math.log(2) - math.log(EPS)) / 2)
    assert metrics["accuracy"] == 0.5


def test_binned_roc_auc_equals_the_exact_auc_of_scores_rounded_to_their_bins() -> None:
    actual, predicted, scores = binary_stream(5000, seed=3)
    tally = ClassificationTally(positive_class="fraud", score_bins=100)
    tally.observe(actual, predicted, scores=scores)

    bins = np.searchsorted(np.linspace(0, 1, 101)[1:-1], scores)
    positive = np.array(actual) == "fraud"
    assert tally.metrics()["roc_auc"] == pytest.approx(roc_auc_score(positive, bins), abs=EXACT)


@pytest.mark.parametrize(
    "make_scores",
    [
        lambda rng, y: np.clip(0.35 * y + 0.65 * rng.random(y.size), 0, 1),  # uniform overlap
        lambda rng, y: 1 / (1 + np.exp(-(rng.normal(size=y.size) + 1.5 * y))),  # logistic
        lambda rng, y: rng.beta(1 + 4 * y, 8, size=y.size),  # rare, small scores
    ],
    ids=["uniform", "logistic", "skewed-beta"],
)
def test_binned_roc_auc_is_within_1e_3_of_sklearn_on_raw_scores_with_100_bins(make_scores) -> None:
    rng = np.random.default_rng(4)
    positive = rng.random(20_000) < 0.2
    scores = make_scores(rng, positive.astype(float))
    tally = ClassificationTally(positive_class="y")
    tally.observe(np.where(positive, "y", "n").tolist(), scores=scores)

    metrics = tally.metrics()
    error = abs(metrics["roc_auc"] - roc_auc_score(positive, scores))
    assert error <= metrics["roc_auc_error_bound"]
    assert error < 1e-3


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.floats(0.0, 1.0, allow_nan=False)), min_size=2, max_size=80
    ),
    st.sampled_from([1, 3, 10, 100]),
)
def test_binned_roc_auc_never_strays_beyond_its_reported_bound(rows, score_bins) -> None:
    positive = np.array([p for p, _ in rows])
    scores = np.array([s for _, s in rows])
    tally = ClassificationTally(positive_class="y", score_bins=score_bins)
    tally.observe(np.where(positive, "y", "n").tolist(), scores=scores)

    metrics = tally.metrics()
    if positive.all() or not positive.any():
        assert metrics["roc_auc"] is None and metrics["roc_auc_error_bound"] is None
    else:
        exact = roc_auc_score(positive, scores)
        assert abs(metrics["roc_auc"] - exact) <= metrics["roc_auc_error_bound"] + 1e-12


def test_expected_calibration_error_matches_sklearns_reliability_diagram() -> None:
    actual, predicted, scores = binary_stream(5000, seed=5)
    tally = ClassificationTally(positive_class="fraud", ece_bins=10)
    tally.observe(actual, predicted, scores=scores)

    positive = (np.array(actual) == "fraud").astype(float)
    assert tally.metrics()["ece"] == pytest.approx(ece_reference(positive, scores), abs=EXACT)


def test_multiclass_calibration_error_is_top_label_confidence_against_correctness() -> None:
    names = ["ant", "bee", "cat"]
    actual, predicted, probs = multiclass_stream(3000, names, seed=6)
    tally = ClassificationTally()
    tally.observe(actual, predicted, probabilities=probs, class_names=names)

    correct = (np.array(predicted) == np.array(actual)).astype(float)
    metrics = tally.metrics()
    assert metrics["ece"] == pytest.approx(ece_reference(correct, probs.max(axis=1)), abs=EXACT)
    assert metrics["roc_auc"] is None  # ROC AUC is binary only


def test_scores_outside_0_1_are_clipped_into_it() -> None:
    clipped = ClassificationTally(positive_class="y")
    clipped.observe(["y", "n", "y"], scores=np.array([1.7, -0.3, 0.4]))
    inside = ClassificationTally(positive_class="y")
    inside.observe(["y", "n", "y"], scores=np.array([1.0, 0.0, 0.4]))

    same_metrics(clipped.metrics(), inside.metrics())


def test_nan_scores_and_nan_probability_rows_are_absent_from_score_metrics() -> None:
    tally = ClassificationTally(positive_class="y")
    tally.observe(
        ["y", "n", "y", "n"], ["y", "n", "n", "n"], scores=np.array([0.9, np.nan, 0.6, 0.2])
    )
    probs = ClassificationTally()
    probs.observe(
        ["a", "b", "c"],
        None,
        probabilities=np.array([[0.7, 0.2, 0.1], [np.nan, 0.5, 0.5], [0.1, 0.1, 0.8]]),
        class_names=["a", "b", "c"],
    )

    metrics = tally.metrics()
    assert (metrics["count"], metrics["labelled"], metrics["scored"]) == (4, 4, 3)
    assert metrics["log_loss"] == pytest.approx(log_loss([1, 1, 0], [0.9, 0.6, 0.2]), abs=EXACT)
    assert metrics["accuracy"] == 0.75
    assert probs.metrics()["labelled"] == 2  # no argmax for the row holding NaN
    assert probs.metrics()["log_loss"] == pytest.approx(-(math.log(0.7) + math.log(0.8)) / 2)


def test_scores_without_a_known_positive_class_are_counted_as_unscored() -> None:
    tally = ClassificationTally()
    tally.observe(["fraud", "ok"], ["fraud", "ok"], scores=np.array([0.9, np.nan]))

    metrics = tally.metrics()
    assert tally.unscored == 1
    assert metrics["roc_auc"] is None and metrics["brier"] is None and metrics["log_loss"] is None
    assert metrics["accuracy"] == 1.0


def test_labels_beyond_max_classes_share_other_while_accuracy_stays_exact() -> None:
    actual = ["a", "b", "c", "d", "e", "e", "d"]
    predicted = ["a", "b", "c", "e", "e", "d", "d"]
    tally = ClassificationTally(max_classes=3)
    tally.observe(actual, predicted)

    per_class = tally.per_class()
    assert set(per_class) == {"a", "b", "c", OTHER}
    assert per_class[OTHER]["support"] == 4
    # d->e and e->d are both other->other in the confusion counts, yet they are errors.
    assert tally.metrics()["accuracy"] == pytest.approx(accuracy_score(actual, predicted))


def test_the_positive_class_keeps_its_own_slot_when_classes_overflow() -> None:
    tally = ClassificationTally(max_classes=2, positive_class="z")
    tally.observe(["a", "b", "c", "z"], ["a", "b", "c", "z"], scores=np.array([0.1, 0.2, 0.3, 0.9]))

    assert "z" in tally.per_class()
    assert tally.metrics()["roc_auc"] == 1.0


def test_an_empty_tally_reports_every_metric_as_undefined() -> None:
    metrics = ClassificationTally().metrics()

    assert metrics["count"] == 0
    undefined = {k: v for k, v in metrics.items() if k not in ("count", "labelled", "scored")}
    assert undefined and all(v is None for v in undefined.values())
    assert ClassificationTally().per_class() == {}


def test_roc_auc_is_undefined_without_both_classes_and_no_metric_is_nan() -> None:
    tally = ClassificationTally(positive_class="y")
    tally.observe(["y", "y"], ["y", "n"], scores=np.array([0.8, 0.3]))

    metrics = tally.metrics()
    assert metrics["roc_auc"] is None
    assert metrics["ece"] is not None and metrics["brier"] is not None
    json.dumps(metrics, allow_nan=False)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_classes": 0}, "max_classes"),
        ({"score_bins": 0}, "score_bins"),
        ({"ece_bins": 0}, "ece_bins"),
        ({"positive_class": OTHER}, "positive_class"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        ClassificationTally(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"predicted_labels": ["a"]}, "predicted_labels"),
        ({"scores": np.array([0.5])}, "scores"),
        ({"probabilities": np.ones((2, 3)) / 3, "class_names": ["a", "b"]}, "class_names"),
        ({"probabilities": np.ones((3, 2)) / 2, "class_names": ["a", "b"]}, "probabilities"),
        ({"probabilities": np.ones((2, 2)) / 2, "class_names": ["a", "a"]}, "class_names"),
    ],
)
def test_columns_of_the_wrong_shape_are_refused_naming_the_column(kwargs, field) -> None:
    tally = ClassificationTally()
    with pytest.raises(ValueError, match=field):
        tally.observe(["a", "b"], **kwargs)
    assert tally.count == 0


def test_tallies_with_different_bins_or_positive_classes_do_not_merge() -> None:
    with pytest.raises(ValueError, match="score_bins"):
        ClassificationTally(score_bins=10).merge(ClassificationTally(score_bins=20))
    with pytest.raises(ValueError, match="positive_class"):
        ClassificationTally(positive_class="a").merge(ClassificationTally(positive_class="b"))


# --- classification as a stream -------------------------------------------------------------

LABELS = ["a", "b", "c", "d"]
score_or_nan = st.one_of(st.floats(0.0, 1.0), st.just(math.nan))
binary_rows = st.lists(
    st.tuples(st.sampled_from(["y", "n"]), st.sampled_from(["y", "n"]), score_or_nan), max_size=60
)
weights = st.lists(st.floats(0.01, 1.0), min_size=3, max_size=3)
multiclass_rows = st.lists(
    st.tuples(st.sampled_from([*LABELS, "e"]), st.sampled_from(LABELS), weights), max_size=60
)


def observe_binary(tally: ClassificationTally, rows: list) -> None:
    if rows:
        actual, predicted, scores = zip(*rows, strict=True)
        tally.observe(list(actual), list(predicted), scores=np.array(scores, dtype=float))


def observe_multiclass(tally: ClassificationTally, rows: list) -> None:
    if rows:
        actual, predicted, w = zip(*rows, strict=True)
        probs = np.array(w) / np.sum(w, axis=1, keepdims=True)
        tally.observe(list(actual), list(predicted), probabilities=probs, class_names=LABELS[:3])


@settings(max_examples=60, deadline=None)
@given(binary_rows, binary_rows)
def test_merging_binary_tallies_equals_observing_both_streams(first, second) -> None:
    a, b, both = (ClassificationTally(positive_class="y") for _ in range(3))
    observe_binary(a, first)
    observe_binary(b, second)
    observe_binary(both, first + second)
    a.merge(b)

    same_metrics(a.metrics(), both.metrics())
    assert a.per_class() == both.per_class()


@settings(max_examples=60, deadline=None)
@given(multiclass_rows, multiclass_rows)
def test_merging_multiclass_tallies_equals_observing_both_streams(first, second) -> None:
    a, b, both = ClassificationTally(), ClassificationTally(), ClassificationTally()
    observe_multiclass(a, first)
    observe_multiclass(b, second)
    observe_multiclass(both, first + second)
    a.merge(b)

    same_metrics(a.metrics(), both.metrics())
    assert a.per_class() == both.per_class()


@settings(max_examples=60, deadline=None)
@given(binary_rows, multiclass_rows, st.lists(st.integers(0, 60), max_size=6))
def test_splitting_a_stream_into_other_batches_gives_the_same_metrics(binary, multi, cuts) -> None:
    whole_binary, split_binary = (
        ClassificationTally(positive_class="y"),
        ClassificationTally(positive_class="y"),
    )
    whole_multi, split_multi = ClassificationTally(), ClassificationTally()
    observe_binary(whole_binary, binary)
    observe_multiclass(whole_multi, multi)
    for part in split(len(binary), cuts):
        observe_binary(split_binary, binary[part])
    for part in split(len(multi), cuts):
        observe_multiclass(split_multi, multi[part])

    same_metrics(split_binary.metrics(), whole_binary.metrics())
    same_metrics(split_multi.metrics(), whole_multi.metrics())


def test_a_tally_merged_into_itself_counts_twice() -> None:
    actual, predicted, scores = binary_stream(100)
    tally = ClassificationTally(positive_class="fraud")
    tally.observe(actual, predicted, scores=scores)
    before = tally.metrics()
    tally.merge(tally)

    after = tally.metrics()
    assert after["count"] == 2 * before["count"]
    assert after["accuracy"] == before["accuracy"] and after["roc_auc"] == before["roc_auc"]


# --- regression -----------------------------------------------------------------------------


def test_regression_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(7)
    actual = rng.normal(50, 10, 5000)
    actual[:25] = 0.0  # zeros: left out of MAPE only
    predicted = actual + rng.normal(1.0, 3.0, actual.size)
    tally = RegressionTally()
    tally.observe(predicted, actual)

    metrics = tally.metrics()
    nonzero = actual != 0
    assert metrics["count"] == 5000 and metrics["mape_excluded"] == 25
    assert metrics["mae"] == pytest.approx(mean_absolute_error(actual, predicted), abs=EXACT)
    assert metrics["rmse"] == pytest.approx(
        math.sqrt(mean_squared_error(actual, predicted)), abs=EXACT
    )
    assert metrics["mape"] == pytest.approx(
        mean_absolute_percentage_error(actual[nonzero], predicted[nonzero]), rel=EXACT
    )
    assert metrics["r2"] == pytest.approx(r2_score(actual, predicted), abs=EXACT)
    assert metrics["bias"] == pytest.approx(np.mean(predicted - actual), abs=EXACT)


def test_r2_stays_exact_for_actuals_offset_by_1e9() -> None:
    rng = np.random.default_rng(8)
    actual = 1e9 + rng.normal(0, 1, 20_000)
    predicted = actual + rng.normal(0, 0.5, actual.size)
    tally = RegressionTally()
    for part in np.array_split(np.arange(actual.size), 37):
        tally.observe(predicted[part], actual[part])

    # Naive sums (sum y^2 - n mean^2) lose every digit here: y^2 ~ 1e18, variance ~ 1.
    assert tally.metrics()["r2"] == pytest.approx(r2_score(actual, predicted), abs=EXACT)


def test_pairs_with_a_non_finite_value_are_counted_apart() -> None:
    tally = RegressionTally()
    tally.observe(np.array([1.0, np.nan, 3.0, 4.0]), np.array([1.5, 2.0, np.inf, 5.0]))

    metrics = tally.metrics()
    assert (metrics["count"], metrics["nonfinite"]) == (2, 2)
    assert metrics["mae"] == pytest.approx(0.75)


def test_regression_metrics_are_undefined_without_pairs_and_r2_without_variance() -> None:
    empty = RegressionTally().metrics()
    constant = RegressionTally()
    for _ in range(7):
        constant.observe(np.array([0.3, 0.1, 0.2]), np.full(3, 0.1))
    zeros = RegressionTally()
    zeros.observe(np.array([1.0]), np.array([0.0]))

    assert {k: v for k, v in empty.items() if v is not None} == {
        "count": 0,
        "nonfinite": 0,
        "mape_excluded": 0,
    }
    assert constant.metrics()["r2"] is None  # sklearn says 0.0 here (force_finite)
    assert constant.metrics()["mae"] == pytest.approx(0.1)
    assert zeros.metrics()["mape"] is None and zeros.metrics()["mape_excluded"] == 1


def test_regression_columns_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="predicted"):
        RegressionTally().observe(np.array([1.0, 2.0]), np.array([1.0]))


regression_rows = st.lists(
    st.tuples(
        st.floats(-1e6, 1e6, allow_nan=False),
        st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.just(0.0), st.just(math.nan)),
    ),
    max_size=60,
)


def observe_regression(tally: RegressionTally, rows: list) -> None:
    if rows:
        predicted, actual = zip(*rows, strict=True)
        tally.observe(np.array(predicted), np.array(actual))


def same_regression(got: dict, expected: dict) -> None:
    # R² divides by the spread of the actuals: compare it relative to that, not to its value.
    assert got.keys() == expected.keys()
    for key in expected:
        if expected[key] is None or got[key] is None:
            assert got[key] is None and expected[key] is None, key
        else:
            assert got[key] == pytest.approx(expected[key], rel=1e-7, abs=1e-6), key


@settings(max_examples=80, deadline=None)
@given(regression_rows, regression_rows, st.lists(st.integers(0, 60), max_size=6))
def test_merging_or_splitting_regression_streams_changes_nothing(first, second, cuts) -> None:
    a, b, both, batched = RegressionTally(), RegressionTally(), RegressionTally(), RegressionTally()
    observe_regression(a, first)
    observe_regression(b, second)
    observe_regression(both, first + second)
    for part in split(len(first + second), cuts):
        observe_regression(batched, (first + second)[part])
    a.merge(b)

    same_regression(a.metrics(), both.metrics())
    same_regression(batched.metrics(), both.metrics())


# --- label delay ----------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(st.lists(st.floats(1.0, 3e6), min_size=1, max_size=200), st.sampled_from([0.5, 0.9]))
def test_label_delay_quantiles_are_within_one_bucket_of_the_true_quantile(delays, q) -> None:
    values = np.array(delays)
    delay = LabelDelay()
    delay.observe(values)

    estimate = delay.summary()["p50" if q == 0.5 else "p90"]
    truth = float(np.quantile(values, q, method="inverted_cdf"))
    # One bucket spans a ratio of at most 1.28 (R10 preferred numbers).
    assert abs(estimate - truth) <= 0.28 * truth + 1e-9
    assert delay.summary()["max"] == values.max()


def test_label_delay_buckets_are_ten_per_decade_from_1_s_past_30_days() -> None:
    bounds = np.array(LABEL_DELAY_BOUNDS_S)
    assert bounds[0] == 1.0 and bounds[-1] >= 30 * 86400
    assert np.all(bounds[1:] / bounds[:-1] <= 1.28)


def test_negative_label_delays_are_counted_as_clock_skew() -> None:
    delay = LabelDelay()
    delay.observe(np.array([-2.0, 5.0, 60.0]))
    other = LabelDelay()
    other.observe(np.array([-1.0]))
    delay.merge(other)

    summary = delay.summary()
    assert (summary["count"], summary["negative"], summary["max"]) == (4, 2, 60.0)
    assert LabelDelay().summary() == {
        "count": 0,
        "negative": 0,
        "p50": None,
        "p90": None,
        "max": None,
    }


# --- the façade -----------------------------------------------------------------------------


def test_labels_make_classification_and_values_make_regression() -> None:
    labels = PerformanceTally(positive_class="y")
    labels.observe(
        JoinedPairs(
            actual_labels=["y", "n"], predicted_labels=["y", "y"], scores=np.array([0.8, 0.6])
        )
    )
    values = PerformanceTally()
    values.observe(
        JoinedPairs(actual_values=np.array([1.0, 2.0]), predicted_values=np.array([1.5, 2.0]))
    )

    assert labels.kind == "classification" and labels.metrics()["accuracy"] == 0.5
    assert values.kind == "regression" and values.metrics()["mae"] == 0.25
    assert "accuracy" not in values.metrics() and PerformanceTally().kind is None
    with pytest.raises(ValueError, match="actual_labels"):
        labels.observe(JoinedPairs(predicted_labels=["y"]))
    with pytest.raises(ValueError, match="label_delay_s"):
        labels.observe(JoinedPairs(actual_labels=["y"], label_delay_s=np.array([1.0, 2.0])))


def test_overall_metrics_over_segments_equal_one_unsegmented_stream() -> None:
    actual, predicted, scores = binary_stream(3000, seed=9)
    segmented = PerformanceTally(positive_class="fraud")
    plain = PerformanceTally(positive_class="fraud")
    for i, part in enumerate(np.array_split(np.arange(3000), 30)):
        rows = part.tolist()
        pairs = {
            "actual_labels": [actual[r] for r in rows],
            "predicted_labels": [predicted[r] for r in rows],
            "scores": scores[part],
        }
        segmented.observe(JoinedPairs(**pairs, segment=f"region={i % 3}"))
        plain.observe(JoinedPairs(**pairs))

    same_metrics(segmented.metrics(), plain.metrics())
    assert set(segmented.segment_metrics()) == {"region=0", "region=1", "region=2"}
    assert plain.segment_metrics() == {}
    assert segmented.metrics()["roc_auc"] == pytest.approx(
        roc_auc_score(np.array(actual) == "fraud", scores), abs=1e-3
    )


def test_segments_beyond_max_segments_share_other() -> None:
    perf = PerformanceTally(max_segments=2)
    for segment in ["eu", "us", "apac", "latam", "eu"]:
        perf.observe(JoinedPairs(actual_labels=["a"], predicted_labels=["a"], segment=segment))

    counts = {k: m["count"] for k, m in perf.segment_metrics().items()}
    assert counts == {"eu": 2, "us": 1, OTHER: 2}
    assert perf.segments_overflowed and perf.metrics()["count"] == 5


def test_merging_windows_into_totals_equals_observing_every_pair_in_the_totals() -> None:
    actual, predicted, scores = binary_stream(600, seed=10)
    delays = np.geomspace(1, 1e5, 600)
    totals, direct = (
        PerformanceTally(positive_class="fraud"),
        PerformanceTally(positive_class="fraud"),
    )
    for window in np.array_split(np.arange(600), 4):
        tally = PerformanceTally(positive_class="fraud")
        for j, part in enumerate(np.array_split(window, 5)):
            rows = part.tolist()
            pairs = JoinedPairs(
                actual_labels=[actual[r] for r in rows],
                predicted_labels=[predicted[r] for r in rows],
                scores=scores[part],
                label_delay_s=delays[part],
                segment=f"s{j % 2}",
            )
            tally.observe(pairs)
            direct.observe(pairs)
        totals.merge(tally)

    same_metrics(totals.metrics(), direct.metrics())
    assert totals.segment_metrics().keys() == direct.segment_metrics().keys()
    assert totals.label_delay.summary() == direct.label_delay.summary()


def test_the_report_is_json_without_nan_and_carries_per_class_figures() -> None:
    perf = PerformanceTally(positive_class="y")
    perf.observe(
        JoinedPairs(
            actual_labels=["y", "y"],
            predicted_labels=["y", "n"],
            scores=np.array([0.9, np.nan]),
            segment="eu",
        )
    )

    report = json.loads(json.dumps(perf.report(), allow_nan=False))
    assert report["kind"] == "classification"
    assert report["roc_auc"] is None  # no negatives
    assert report["per_class"]["y"] == {
        "precision": 1.0,
        "recall": 0.5,
        "f1": pytest.approx(2 / 3),
        "support": 2,
    }
    assert report["segments"]["eu"]["accuracy"] == 0.5
