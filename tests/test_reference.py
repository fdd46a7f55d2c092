"""Reference profiles: quantile bins, top-K categories, binning of live data, JSON, warm-up.

Bins follow OpenTelemetry's explicit-bucket convention: bin ``i`` holds
``edges[i-1] < v <= edges[i]``; bin 0 is the underflow, the last bin the overflow.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.engine.columns import PredictionColumns
from agent.engine.reference import (
    CategoricalProfile,
    NumericBins,
    NumericProfile,
    ReferenceBuilder,
    ReferenceProfile,
)

# --- exact references -----------------------------------------------------------------------


def numpy_bins(values: np.ndarray, edges: np.ndarray) -> list[int]:
    """Counts of the finite values per bin, one searchsorted per value (the definition)."""
    finite = values[np.isfinite(values)]
    idx = np.searchsorted(edges, finite, side="left")
    return np.bincount(idx, minlength=edges.size + 1).tolist()


def round_trip(ref: ReferenceProfile) -> ReferenceProfile:
    return ReferenceProfile.from_dict(json.loads(json.dumps(ref.to_dict(), allow_nan=False)))


def reference(**kwargs) -> ReferenceProfile:
    kwargs.setdefault("categories", {})
    kwargs.setdefault("source", "file")
    kwargs.setdefault("created_unix_nano", 1_700_000_000 * 10**9)
    return ReferenceProfile.from_columns("churn", "v1", **kwargs)


# --- strategies -----------------------------------------------------------------------------

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
anything = st.one_of(finite, st.just(np.nan), st.just(np.inf), st.just(-np.inf))
# Few distinct values too, so ties and discrete features are exercised.
reference_values = st.one_of(
    hnp.arrays(np.float64, st.integers(1, 300), elements=finite),
    hnp.arrays(np.float64, st.integers(1, 300), elements=st.sampled_from([0.0, 1.0, 2.5, 7.0])),
)
live_values = hnp.arrays(np.float64, st.integers(0, 300), elements=anything)
bins_strategy = st.sampled_from([(10, 100), (4, 8), (3, 10), (2, 2)])
labels = st.lists(st.sampled_from(["a", "b", "c", "d", "e", "", "f"]), min_size=0, max_size=200)


# --- numeric profiles -----------------------------------------------------------------------


def test_quantile_edges_give_equal_mass_bins_for_continuous_data():
    p = NumericProfile.from_values(np.arange(10_000.0))
    assert p.psi_counts.tolist() == [1000] * 10
    assert p.cdf_counts.tolist() == [100] * 100
    assert p.psi_edges.size == 9 and p.cdf_edges.size == 99


def test_edges_are_observed_values_and_psi_edges_are_cdf_edges():
    values = np.random.default_rng(3).lognormal(size=5003)
    p = NumericProfile.from_values(values)
    assert np.isin(p.cdf_edges, values).all()
    assert np.isin(p.psi_edges, p.cdf_edges).all()
    q = np.arange(1, 100) / 100
    assert p.cdf_edges.tolist() == np.quantile(values, q, method="inverted_cdf").tolist()


def test_discrete_feature_gets_one_bin_per_value_with_empty_overflow():
    values = np.repeat([0.0, 1.0, 2.0], [300, 400, 300])
    p = NumericProfile.from_values(values)
    assert p.psi_edges.tolist() == [0.0, 1.0, 2.0]
    assert p.psi_counts.tolist() == [300, 400, 300, 0]
    assert p.distinct == 3


def test_constant_feature_has_one_edge_and_everything_in_the_first_bin():
    p = NumericProfile.from_values(np.full(50, 4.2))
    assert p.psi_edges.tolist() == [4.2] and p.psi_counts.tolist() == [50, 0]
    assert p.std == pytest.approx(0.0, abs=1e-12) and p.above_mean is None


def test_summary_statistics_are_those_of_the_finite_values():
    values = np.array([1.0, 2.0, np.nan, 4.0, np.inf, -np.inf, 8.0, np.nan])
    p = NumericProfile.from_values(values)
    finite_values = np.array([1.0, 2.0, 4.0, 8.0])
    assert (p.count, p.missing, p.nonfinite, p.distinct) == (4, 2, 2, 4)
    assert p.mean == finite_values.mean() and p.std == finite_values.std()
    assert (p.min, p.max) == (1.0, 8.0)


def test_feature_without_finite_values_has_no_edges_and_null_statistics():
    p = NumericProfile.from_values(np.array([np.nan, np.nan]))
    assert p.psi_edges.size == 0 and p.psi_counts.tolist() == [0]
    assert (p.mean, p.std, p.min, p.max, p.count, p.missing) == (None, None, None, None, 0, 2)
    live = p.bin(np.array([1.0, 2.0]))
    assert live.out_of_range == 2 and live.psi_counts.tolist() == [2]


@settings(max_examples=100, deadline=None)
@given(reference_values, live_values, bins_strategy)
def test_live_values_are_counted_exactly_as_one_searchsorted_per_value(ref, live, bins):
    p = NumericProfile.from_values(ref, psi_bins=bins[0], cdf_bins=bins[1])
    b = p.bin(live)
    fin = live[np.isfinite(live)]
    assert b.psi_counts.tolist() == numpy_bins(live, p.psi_edges)
    assert b.cdf_counts.tolist() == numpy_bins(live, p.cdf_edges)
    assert b.binned == fin.size == int(b.psi_counts.sum())
    assert b.missing == int(np.isnan(live).sum())
    assert b.nonfinite == int(np.isinf(live).sum())
    assert b.out_of_range == int(((fin < p.min) | (fin > p.max)).sum())
    idx = np.searchsorted(p.cdf_edges, fin, side="left")
    assert b.below_sum == pytest.approx(fin[idx == 0].sum(), rel=1e-12, abs=1e-6)
    assert b.above_sum == pytest.approx(fin[idx == p.cdf_edges.size].sum(), rel=1e-12, abs=1e-6)


@settings(max_examples=100, deadline=None)
@given(reference_values, bins_strategy)
def test_reference_binned_into_its_own_profile_gives_its_counts(ref, bins):
    p = NumericProfile.from_values(ref, psi_bins=bins[0], cdf_bins=bins[1])
    b = p.bin(ref)
    assert b.psi_counts.tolist() == p.psi_counts.tolist()
    assert b.cdf_counts.tolist() == p.cdf_counts.tolist()
    assert b.out_of_range == 0
    assert p.count == int(p.psi_counts.sum()) == int(p.cdf_counts.sum()) == ref.size
    assert np.all(np.diff(p.psi_edges) > 0) and np.all(np.diff(p.cdf_edges) > 0)


@settings(max_examples=60, deadline=None)
@given(reference_values, live_values, live_values)
def test_bins_of_two_batches_merge_to_the_bins_of_both(ref, a, b):
    p = NumericProfile.from_values(ref)
    merged = p.bin(a).merged(p.bin(b))
    whole = p.bin(np.concatenate([a, b]))
    assert merged.psi_counts.tolist() == whole.psi_counts.tolist()
    assert merged.cdf_counts.tolist() == whole.cdf_counts.tolist()
    assert merged[2:5] == whole[2:5]  # missing, nonfinite, out_of_range
    assert merged.below_sum == pytest.approx(whole.below_sum, rel=1e-9, abs=1e-6)
    assert merged.above_sum == pytest.approx(whole.above_sum, rel=1e-9, abs=1e-6)
    assert p.empty_bins().merged(whole).cdf_counts.tolist() == whole.cdf_counts.tolist()


def test_binning_accepts_integer_and_float32_columns():
    p = NumericProfile.from_values(np.arange(100.0))
    assert p.bin(np.arange(100)).psi_counts.tolist() == p.psi_counts.tolist()
    assert p.bin(np.arange(100, dtype=np.float32)).psi_counts.tolist() == p.psi_counts.tolist()


def test_numeric_profile_refuses_counts_that_do_not_match_its_edges():
    good = NumericProfile.from_values(np.arange(10.0), psi_bins=2, cdf_bins=2).to_dict()
    with pytest.raises(ValueError, match="psi_counts: expected 2 counts"):
        NumericProfile.from_dict({**good, "psi_counts": [5, 3, 2]})
    with pytest.raises(ValueError, match="cdf_counts: they sum to 9, but count is 10"):
        NumericProfile.from_dict({**good, "cdf_counts": [5, 4]})
    with pytest.raises(ValueError, match="psi_edges: must be strictly increasing"):
        NumericProfile.from_dict({**good, "psi_edges": [3.0, 3.0], "psi_counts": [5, 0, 5]})


# --- categorical profiles -------------------------------------------------------------------


def test_top_k_categories_break_ties_by_name_and_fold_the_rest_into_other():
    values = ["b", "a", "c", "c", "d", "a", "b", "", None, "e"]
    p = CategoricalProfile.from_values(values, top_k=3)
    assert p.categories == ("a", "b", "c")  # a, b, c tie at 2; d, e at 1 go to "other"
    assert p.counts.tolist() == [2, 2, 2, 2]
    assert (p.count, p.missing) == (8, 2)


def test_live_labels_outside_the_top_k_are_unseen_and_counted_as_other():
    p = CategoricalProfile.from_values(["a", "a", "b"])
    b = p.bin(["a", "z", "", None, "b", "z"])
    assert b.counts.tolist() == [1, 1, 2]
    assert (b.missing, b.unseen, b.binned) == (2, 2, 4)


@settings(max_examples=100, deadline=None)
@given(labels.filter(lambda v: any(x for x in v)), labels, st.integers(1, 6))
def test_label_counts_sum_to_the_labels_that_are_not_missing(ref, live, top_k):
    p = CategoricalProfile.from_values(ref, top_k=top_k)
    b = p.bin(live)
    present = [x for x in live if x]
    assert b.binned == len(present) and b.missing == len(live) - len(present)
    assert b.unseen == sum(1 for x in present if x not in p.categories)
    for i, c in enumerate(p.categories):
        assert b.counts[i] == present.count(c)
    assert p.bin(ref).counts[: len(p.categories)].tolist() == p.counts[:-1].tolist()
    assert len(p.categories) <= top_k and int(p.counts.sum()) == p.count


def test_categorical_profile_refuses_duplicate_or_empty_categories():
    with pytest.raises(ValueError, match="categories: must be unique"):
        CategoricalProfile(("a", "a"), np.array([1, 1, 0]), count=2, missing=0)
    with pytest.raises(ValueError, match="categories: must be non-empty strings"):
        CategoricalProfile(("a", ""), np.array([1, 1, 0]), count=2, missing=0)


# --- reference profiles ---------------------------------------------------------------------


def sample_reference(rows: int = 2000, seed: int = 0, **kwargs) -> ReferenceProfile:
    rng = np.random.default_rng(seed)
    ages = rng.normal(40, 12, rows)
    ages[::97] = np.nan
    return reference(
        numbers={"age": ages, "income": rng.lognormal(10, 1, rows)},
        categories={"city": [f"c{i}" for i in rng.integers(0, 80, rows)]},
        scores=rng.random(rows),
        labels=list(rng.choice(["yes", "no"], rows)),
        **kwargs,
    )


def test_reference_round_trips_through_json_with_the_same_id():
    ref = sample_reference()
    again = round_trip(ref)
    assert again == ref and again.id == ref.id
    assert again.to_dict() == ref.to_dict()
    assert len(ref.id) == 16 and int(ref.id, 16) >= 0


@settings(max_examples=40, deadline=None)
@given(reference_values, labels.filter(lambda v: len(v) > 0), st.integers(0, 2**62))
def test_any_reference_round_trips_and_keeps_its_id(numbers, cats, created):
    rows = min(numbers.size, len(cats))
    ref = reference(
        numbers={"x": numbers[:rows]},
        categories={"k": cats[:rows]},
        created_unix_nano=created,
        psi_bins=4,
        cdf_bins=12,
    )
    again = round_trip(ref)
    assert again == ref and again.id == ref.id


def test_id_depends_on_content_not_on_creation_time_or_source():
    a = sample_reference(source="file", created_unix_nano=1)
    b = sample_reference(source="warmup", created_unix_nano=2)
    c = sample_reference(seed=1)
    assert a.id == b.id
    assert a.id != c.id
    assert a.id != sample_reference(psi_bins=5).id


def test_schema_lists_each_feature_type():
    assert sample_reference().schema() == {
        "age": "numeric",
        "city": "categorical",
        "income": "numeric",
    }


def test_profile_keeps_edges_and_counts_not_raw_values():
    rows = 50_000
    ref = sample_reference(rows=rows)
    text = json.dumps(ref.to_dict())
    # 4 numeric columns x (9 + 99 edges + counts) and 50 + 2 categories: independent of rows.
    assert len(text) < 40_000
    assert len(ref.features["city"].categories) == 50  # top-K of 80 cities


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.pop("schema_version"), "schema_version"),
        (lambda d: d.update(schema_version=2), "schema_version: 2 is not supported"),
        (lambda d: d.update(source="ftp"), "source: must be one of"),
        (lambda d: d.update(model=""), "model: must be a non-empty string"),
        (lambda d: d.update(rows=-1), "rows: must be an integer >= 0"),
        (lambda d: d.update(rows=True), "rows: must be an integer"),
        (lambda d: d.update(rows=d["rows"] + 1), "features.age: count"),
        (lambda d: d.update(features=[]), "features: must be an object"),
        (lambda d: d["features"]["age"].update(type="text"), "features.age.type"),
        (lambda d: d["features"]["age"]["psi_counts"].append(0), "features.age.psi_counts"),
        (lambda d: d["features"]["age"].update(mean="40"), "features.age.mean"),
        (lambda d: d["features"]["age"].update(std=-1.0), "features.age.std"),
        (lambda d: d["features"]["age"].update(below_mean=None), "features.age.below_mean"),
        (lambda d: d["features"]["city"]["counts"].pop(), "features.city.counts"),
        (lambda d: d["features"]["city"].update(categories="abc"), "features.city.categories"),
        (lambda d: d["scores"].update(count=1.5), "scores.count"),
        (lambda d: d["labels"].update(missing=-3), "labels.missing"),
        (lambda d: d["scores"].update(type="categorical"), "scores.type"),
        (
            lambda d: d["features"]["age"]["cdf_counts"].__setitem__(0, 10**6),
            "features.age.cdf_counts",
        ),
        (lambda d: d.update(id="0123456789abcdef"), "id: '0123456789abcdef' does not match"),
    ],
)
def test_from_dict_names_the_field_that_is_wrong(change, field):
    data = json.loads(json.dumps(sample_reference().to_dict()))
    change(data)
    with pytest.raises(ValueError, match=re.escape(field)):
        ReferenceProfile.from_dict(data)


def test_from_dict_accepts_a_profile_without_id():
    data = sample_reference().to_dict()
    del data["id"]
    assert ReferenceProfile.from_dict(data).id == sample_reference().id


def test_from_columns_refuses_ambiguous_or_ragged_columns():
    with pytest.raises(ValueError, match=re.escape("features.x: given as both")):
        reference(numbers={"x": np.arange(3.0)}, categories={"x": ["a", "b", "c"]})
    with pytest.raises(ValueError, match=re.escape("features.y: has 2 rows, other columns have 3")):
        reference(numbers={"x": np.arange(3.0)}, categories={"y": ["a", "b"]})
    with pytest.raises(ValueError, match="features: a reference needs at least one column"):
        reference(numbers={})
    with pytest.raises(ValueError, match="psi_bins"):
        reference(numbers={"x": np.arange(3.0)}, psi_bins=1)


# --- warm-up --------------------------------------------------------------------------------


def batch(rows: int, start: int, *, numbers=None, categories=None, **kwargs) -> PredictionColumns:
    return PredictionColumns(
        "churn",
        "v1",
        ids=[f"p{start + i}" for i in range(rows)],
        received_unix_nano=start,
        numbers=numbers or {},
        categories=categories or {},
        **kwargs,
    )


def test_warmup_keeps_the_first_rows_and_builds_the_same_profile_as_the_columns():
    rng = np.random.default_rng(7)
    ages, scores = rng.normal(40, 10, 2500), rng.random(2500)
    cities = [f"c{i}" for i in rng.integers(0, 9, 2500)]
    warmup = ReferenceBuilder("churn", "v1", rows=2200)
    taken = []
    for start in range(0, 2500, 1000):
        end = start + 1000
        taken.append(
            warmup.add(
                batch(
                    min(end, 2500) - start,
                    start,
                    numbers={"age": ages[start:end]},
                    categories={"city": cities[start:end]},
                    scores=scores[start:end],
                    labels=["yes"] * (min(end, 2500) - start),
                )
            )
        )
    assert taken == [1000, 1000, 200] and warmup.full
    assert warmup.add(batch(5, 9999, numbers={"age": np.ones(5)})) == 0
    built = warmup.build(created_unix_nano=5)
    direct = reference(
        numbers={"age": ages[:2200]},
        categories={"city": cities[:2200]},
        scores=scores[:2200],
        labels=["yes"] * 2200,
    )
    assert built.id == direct.id and built.source == "warmup" and built.rows == 2200


def test_warmup_counts_a_feature_absent_from_some_batches_as_missing():
    warmup = ReferenceBuilder("churn", "v1", rows=100)
    warmup.add(batch(10, 0, numbers={"a": np.ones(10)}))
    warmup.add(batch(10, 10, numbers={"b": np.ones(10)}, categories={"k": ["x"] * 10}))
    warmup.add(batch(10, 20, numbers={"a": np.ones(10)}))
    ref = warmup.build(created_unix_nano=0)
    assert ref.rows == 30
    a, b, k = ref.features["a"], ref.features["b"], ref.features["k"]
    assert isinstance(a, NumericProfile) and isinstance(b, NumericProfile)
    assert (a.count, a.missing) == (20, 10)
    assert (b.count, b.missing) == (10, 20)
    assert isinstance(k, CategoricalProfile) and (k.count, k.missing) == (10, 20)


def test_warmup_refuses_a_feature_that_changes_type_or_another_model():
    warmup = ReferenceBuilder("churn", "v1", rows=100)
    warmup.add(batch(2, 0, numbers={"a": np.ones(2)}))
    with pytest.raises(ValueError, match=re.escape("features.a: sent as categorical")):
        warmup.add(batch(2, 2, categories={"a": ["x", "y"]}))
    assert warmup.rows == 2
    with pytest.raises(ValueError, match="version"):
        warmup.add(PredictionColumns("churn", "v2", ids=["z"], received_unix_nano=0))
    with pytest.raises(ValueError, match="rows: no predictions"):
        ReferenceBuilder("churn", "v1", rows=10).build(created_unix_nano=0)


def test_bins_tuple_reads_by_name():
    b = NumericProfile.from_values(np.arange(10.0)).bin(np.array([1.0, np.nan]))
    assert isinstance(b, NumericBins) and b.missing == 1 and b.binned == 1
