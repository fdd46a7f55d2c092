"""QualityTally against a value-at-a-time reference, and its schema rules.

Missing: NaN (numeric), "" (categorical), or the feature absent from a batch. Non-finite:
±inf. Out of range: finite values outside the reference [min, max]. Unseen: non-empty
categories outside the known set. Type mismatch: a feature sent as the other kind.
"""

from __future__ import annotations

import doctest
import json
import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import agent.engine.quality as quality_module
from agent._proto.mlsidecar.v1 import ingest_pb2
from agent.engine.quality import ColumnCounts, FeatureQuality, QualityTally

# --- reference ------------------------------------------------------------------------------


def reference_numeric(values: list[float], bounds: tuple[float, float] | None) -> dict[str, int]:
    """Counts of one numeric column, one value at a time."""
    counts = {"missing": 0, "nonfinite": 0, "out_of_range": 0}
    for x in values:
        if math.isnan(x):
            counts["missing"] += 1
        elif math.isinf(x):
            counts["nonfinite"] += 1
        elif bounds is not None and not bounds[0] <= x <= bounds[1]:
            counts["out_of_range"] += 1
    return counts


def reference_categorical(values: list[str], known: set[str] | None) -> dict[str, int]:
    counts = {"missing": 0, "unseen": 0}
    for text in values:
        if text == "":
            counts["missing"] += 1
        elif known is not None and text not in known:
            counts["unseen"] += 1
    return counts


def features(tally: QualityTally) -> dict[str, dict]:
    return tally.report()["features"]


# --- strategies -----------------------------------------------------------------------------

BOUNDS = (-10.0, 10.0)
numeric_value = st.one_of(
    st.floats(min_value=-100, max_value=100, allow_nan=False),
    st.sampled_from([BOUNDS[0], BOUNDS[1], math.nan, math.inf, -math.inf]),
)
category = st.sampled_from(["", "a", "b", "c", "zz", "new"])
KNOWN = {"a", "b", "c"}


@st.composite
def batches(draw, max_batches: int = 6):
    """Batches over numeric x, y and categorical city, town: each may be absent from a batch."""
    result = []
    for _ in range(draw(st.integers(1, max_batches))):
        rows = draw(st.integers(0, 30))
        numbers = {
            name: np.array(draw(st.lists(numeric_value, min_size=rows, max_size=rows)))
            for name in ("x", "y")
            if draw(st.booleans())
        }
        categories = {
            name: draw(st.lists(category, min_size=rows, max_size=rows))
            for name in ("city", "town")
            if draw(st.booleans())
        }
        result.append((rows, numbers, categories))
    return result


SCHEMA = {"x": "numeric", "y": "numeric", "city": "categorical", "town": "categorical"}


def schema_tally() -> QualityTally:
    # x has a range, y none; city has known categories, town none.
    return QualityTally(SCHEMA, ranges={"x": BOUNDS}, known_categories={"city": KNOWN})


# --- counts against the reference -----------------------------------------------------------


def test_docstring_examples_run():
    result = doctest.testmod(quality_module, extraglobs={"np": np})
    assert result.attempted > 0
    assert result.failed == 0


@settings(max_examples=100, deadline=None)
@given(batches())
def test_counts_match_a_value_at_a_time_reference(data):
    tally = schema_tally()
    expected = {name: Counter() for name in SCHEMA}
    for rows, numbers, categories in data:
        tally.observe(rows, numbers, categories)
        for name in SCHEMA:
            expected[name]["rows"] += rows
            if name in numbers:
                expected[name].update(
                    reference_numeric(numbers[name].tolist(), BOUNDS if name == "x" else None)
                )
            elif name in categories:
                expected[name].update(
                    reference_categorical(categories[name], KNOWN if name == "city" else None)
                )
            else:  # absent from the batch: every row is missing
                expected[name]["missing"] += rows
                expected[name]["absent"] += rows
    got = features(tally)
    for name in SCHEMA:
        for key in ("rows", "missing", "absent", "nonfinite"):
            assert got[name][key] == expected[name][key], (name, key)
    assert got["x"]["out_of_range"] == expected["x"]["out_of_range"]
    assert got["city"]["unseen"] == expected["city"]["unseen"]


@settings(max_examples=100, deadline=None)
@given(batches(), st.integers(0, 6))
def test_windows_merged_into_totals_equal_one_tally_of_every_batch(data, cut):
    whole, first, second = schema_tally(), schema_tally(), schema_tally()
    for i, batch in enumerate(data):
        whole.observe(*batch)
        (first if i < cut else second).observe(*batch)
    totals = QualityTally.empty_like(first)
    totals.merge(first)
    totals.merge(second)
    assert totals.report() == whole.report()


def test_boundaries_of_the_reference_range_are_in_range():
    tally = QualityTally({"age": "numeric"}, ranges={"age": (18.0, 90.0)})
    tally.observe(4, {"age": np.array([18.0, 90.0, 17.999, 90.001])}, {})
    assert features(tally)["age"]["out_of_range"] == 2


def test_infinities_count_as_non_finite_not_out_of_range():
    tally = QualityTally({"age": "numeric"}, ranges={"age": (18.0, 90.0)})
    tally.observe(4, {"age": np.array([math.inf, -math.inf, math.nan, 50.0])}, {})
    age = features(tally)["age"]
    assert (age["nonfinite"], age["out_of_range"], age["missing"]) == (2, 0, 1)
    assert age["nonfinite_ratio"] == 0.5


def test_a_column_of_only_nan_is_all_missing_and_nothing_else():
    tally = QualityTally({"age": "numeric"}, ranges={"age": (0.0, 1.0)})
    tally.observe(3, {"age": np.full(3, np.nan)}, {})
    age = features(tally)["age"]
    assert (age["missing"], age["nonfinite"], age["out_of_range"]) == (3, 0, 0)


def test_ratios_are_over_the_features_rows():
    tally = QualityTally({"income": "numeric"})
    tally.observe(100, {"income": np.r_[np.full(12, np.nan), np.ones(88)]}, {})
    assert features(tally)["income"]["missing_ratio"] == pytest.approx(0.12)


# --- schema violations ----------------------------------------------------------------------


def test_schema_feature_absent_from_a_batch_counts_all_its_rows_missing():
    tally = QualityTally({"age": "numeric", "city": "categorical"})
    tally.observe(10, {"age": np.ones(10)}, {})
    tally.observe(5, {"age": np.ones(5)}, {"city": ["a"] * 5})
    report = tally.report()
    city = report["features"]["city"]
    assert (city["rows"], city["missing"], city["absent"]) == (15, 10, 10)
    assert report["missing_features"] == ["city"]


def test_features_outside_the_schema_are_counted_as_unknown_by_rows():
    tally = QualityTally({"age": "numeric"})
    tally.observe(3, {"age": np.ones(3), "zip": np.ones(3)}, {"team": ["a", "b", "c"]})
    tally.observe(2, {"age": np.ones(2), "zip": np.ones(2)}, {})
    report = tally.report()
    assert report["unknown_features"] == {"team": 3, "zip": 5}
    assert "zip" not in report["features"]


def test_unknown_feature_names_are_bounded_and_the_rest_counted_over_limit():
    tally = QualityTally({"age": "numeric"}, max_unknown_features=2)
    extra = {f"f{i}": np.ones(4) for i in range(5)}
    tally.observe(4, {"age": np.ones(4), **extra}, {})
    tally.observe(4, {"age": np.ones(4), **extra}, {})
    report = tally.report()
    assert report["unknown_features"] == {"f0": 8, "f1": 8}
    assert report["over_limit_rows"] == 3 * 8


@pytest.mark.parametrize(
    ("schema_kind", "numbers", "categories"),
    [
        ("categorical", {"zip": np.ones(4)}, {}),
        ("numeric", {}, {"zip": ["75001"] * 4}),
    ],
)
def test_a_feature_sent_as_the_other_kind_is_a_type_mismatch(schema_kind, numbers, categories):
    tally = QualityTally({"zip": schema_kind})
    tally.observe(4, numbers, categories)
    zip_code = features(tally)["zip"]
    assert (zip_code["rows"], zip_code["type_mismatch"], zip_code["missing"]) == (4, 4, 0)
    assert zip_code["type_mismatch_ratio"] == 1.0
    assert tally.report()["missing_features"] == []


def test_checks_without_a_reference_value_report_none_not_zero():
    tally = QualityTally({"age": "numeric", "city": "categorical"})
    tally.observe(2, {"age": np.ones(2)}, {"city": ["a", "b"]})
    age, city = features(tally)["age"], features(tally)["city"]
    assert age["out_of_range"] is None and age["out_of_range_ratio"] is None
    assert city["unseen"] is None and city["unseen_ratio"] is None


def test_a_tally_without_rows_has_no_ratios():
    q = FeatureQuality().report()
    assert q["rows"] == 0
    assert q["missing_ratio"] is None and q["type_mismatch_ratio"] is None


# --- categorical inputs ---------------------------------------------------------------------


def test_categories_from_a_protobuf_repeated_field_are_counted():
    """Ingest hands over the upb container itself, which has no .count()."""
    message = ingest_pb2.CategoryValues(values=["paris", "", "oslo", "rome"])
    parsed = ingest_pb2.CategoryValues.FromString(message.SerializeToString())
    tally = QualityTally({"city": "categorical"}, known_categories={"city": {"paris", "rome"}})
    tally.observe(4, {}, {"city": parsed.values})
    city = features(tally)["city"]
    assert (city["missing"], city["unseen"]) == (1, 1)
    no_reference = QualityTally()
    no_reference.observe(4, {}, {"city": parsed.values})
    assert features(no_reference)["city"]["missing"] == 1


@settings(max_examples=60, deadline=None)
@given(batches(), st.data())
def test_counts_handed_over_by_the_caller_give_the_same_report_as_reading_the_columns(data, draw):
    read, handed = schema_tally(), schema_tally()
    for rows, numbers, categories in data:
        read.observe(rows, numbers, categories)
        counted = {}
        columns = sorted({*numbers, *categories})
        chosen = draw.draw(st.sets(st.sampled_from(columns))) if columns else set()
        for name in chosen:
            if name in numbers:
                c = reference_numeric(numbers[name].tolist(), BOUNDS if name == "x" else None)
                counted[name] = ColumnCounts(**c)
            else:
                known = KNOWN if name == "city" else None
                counted[name] = ColumnCounts.of_categories(Counter(categories[name]), known)
        handed.observe(rows, numbers, categories, counted=counted)
    assert handed.report() == read.report()


def test_empty_string_in_the_known_categories_still_counts_as_missing():
    tally = QualityTally({"city": "categorical"}, known_categories={"city": {"", "a"}})
    tally.observe(3, {}, {"city": ["", "a", "b"]})
    city = features(tally)["city"]
    assert (city["missing"], city["unseen"]) == (1, 1)


# --- without a reference --------------------------------------------------------------------


def test_without_a_schema_missing_and_non_finite_are_counted_per_seen_feature():
    tally = QualityTally()
    tally.observe(3, {"age": np.array([1.0, np.nan, np.inf])}, {"city": ["a", "", ""]})
    report = tally.report()
    assert report["features"]["age"]["missing"] == 1
    assert report["features"]["age"]["nonfinite"] == 1
    assert report["features"]["city"]["missing"] == 2
    assert report["unknown_features"] == {} and report["missing_features"] == []


def test_without_a_schema_the_number_of_features_is_bounded():
    tally = QualityTally(max_features=3)
    tally.observe(2, {f"f{i}": np.ones(2) for i in range(5)}, {})
    tally.observe(2, {f"f{i}": np.ones(2) for i in range(5)}, {})
    report = tally.report()
    assert sorted(report["features"]) == ["f0", "f1", "f2"]
    assert report["over_limit_rows"] == 2 * 2 * 2


def test_merging_without_a_schema_keeps_the_feature_bound():
    first, second = QualityTally(max_features=2), QualityTally(max_features=2)
    first.observe(1, {"a": np.ones(1), "b": np.ones(1)}, {})
    second.observe(1, {"c": np.ones(1)}, {})
    first.merge(second)
    assert sorted(first.report()["features"]) == ["a", "b"]
    assert first.report()["over_limit_rows"] == 1


def test_many_column_layouts_are_all_counted():
    """Plans are cached per layout; a stream of changing layouts must still count right."""
    tally = QualityTally({f"f{i}": "numeric" for i in range(40)})
    for i in range(40):
        tally.observe(2, {f"f{i}": np.array([np.nan, 1.0])}, {})
    f7 = features(tally)["f7"]
    assert (f7["rows"], f7["missing"], f7["absent"]) == (80, 79, 78)


def test_report_is_strict_json():
    tally = schema_tally()
    tally.observe(2, {"x": np.array([np.nan, np.inf])}, {"city": ["", "zz"]})
    json.dumps(tally.report(), allow_nan=False)
    json.dumps(QualityTally().report(), allow_nan=False)


# --- refusing bad input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schema": {"age": "float"}}, "schema['age']"),
        ({"schema": {"age": "numeric"}, "ranges": {"age": (5.0, 1.0)}}, "ranges['age']: min 5.0"),
        ({"schema": {"age": "numeric"}, "ranges": {"age": (0.0, math.inf)}}, "ranges['age']"),
        ({"schema": {"city": "categorical"}, "ranges": {"city": (0, 1)}}, "ranges['city']"),
        ({"schema": {"age": "numeric"}, "known_categories": {"age": {"a"}}}, "known_categories"),
        ({"known_categories": {"city": "paris"}}, "the string 'paris'"),
        ({"max_unknown_features": -1}, "max_unknown_features"),
        ({"max_features": 0}, "max_features"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        QualityTally(**kwargs)


def test_a_column_of_the_wrong_length_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"numbers\['age'\]: 2 values, expected rows=3"):
        QualityTally().observe(3, {"age": np.ones(2)}, {})
    with pytest.raises(ValueError, match=r"categories\['city'\]"):
        QualityTally().observe(3, {}, {"city": ["a"]})


def test_a_feature_sent_as_both_kinds_is_refused():
    with pytest.raises(ValueError, match="'age' is sent both"):
        QualityTally().observe(1, {"age": np.ones(1)}, {"age": ["a"]})


def test_handed_over_counts_that_cannot_be_are_refused():
    with pytest.raises(ValueError, match=r"counted\['city'\]: ColumnCounts\(missing=4"):
        QualityTally().observe(3, {}, {"city": ["a"] * 3}, counted={"city": ColumnCounts(4)})
    with pytest.raises(ValueError, match=r"counted\['age'\]: the batch has no column 'age'"):
        QualityTally().observe(3, {}, {"city": ["a"] * 3}, counted={"age": ColumnCounts()})


def test_tallies_with_different_schemas_do_not_merge():
    with pytest.raises(ValueError, match="different schemas"):
        QualityTally({"a": "numeric"}).merge(QualityTally({"b": "numeric"}))
