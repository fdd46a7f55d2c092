"""FixedHistogram against OpenTelemetry's explicit-bucket semantics, a pure-Python reference and numpy.

Bucket ``i`` counts ``bounds[i-1] < x <= bounds[i]``; the last bucket is the overflow above
``bounds[-1]``. NaN and ±inf are counted apart (``nonfinite_count``), never bucketed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.engine import Exemplar, FixedHistogram

# --- reference ------------------------------------------------------------------------------


def reference_bucket(x: float, bounds: list[float]) -> int:
    """The OTel explicit-bucket index of a finite value, one comparison at a time."""
    for i, upper in enumerate(bounds):
        if x <= upper:  # bounds[i-1] < x (else an earlier bucket matched) and x <= bounds[i]
            return i
    return len(bounds)


def reference_counts(values: list[float], bounds: list[float]) -> list[int]:
    counts = [0] * (len(bounds) + 1)
    for x in values:
        if math.isfinite(x):
            counts[reference_bucket(x, bounds)] += 1
    return counts


def numpy_counts(values: np.ndarray, bounds: list[float]) -> list[int]:
    finite = values[np.isfinite(values)]
    # right=True: bins[i-1] < x <= bins[i], the same convention.
    idx = np.digitize(finite, np.asarray(bounds, dtype=np.float64), right=True)
    return np.bincount(idx, minlength=len(bounds) + 1).tolist()


def filled(bounds: list[float], values: list[float], **kwargs) -> FixedHistogram:
    h = FixedHistogram(bounds)
    h.add(np.asarray(values, dtype=np.float64), **kwargs)
    return h


def state(h: FixedHistogram) -> tuple:
    """Everything but the float sum, which may differ in the last bits with summation order."""
    return (h.counts.tolist(), h.count, h.nonfinite_count, h.min, h.max)


# --- strategies -----------------------------------------------------------------------------

finite_floats = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False, allow_infinity=False)
bounds_strategy = st.lists(finite_floats, min_size=1, max_size=12, unique=True).map(sorted)


@st.composite
def bounds_and_values(draw, min_size: int = 0, nonfinite: bool = True):
    """Bounds, and values that often sit exactly on a bound (the edge that matters)."""
    bounds = draw(bounds_strategy)
    element = st.one_of(finite_floats, st.sampled_from(bounds))
    if nonfinite:
        element = st.one_of(element, st.sampled_from([math.nan, math.inf, -math.inf]))
    values = draw(st.lists(element, min_size=min_size, max_size=200))
    return bounds, values


# --- bucket semantics -----------------------------------------------------------------------


def test_docstring_example():
    h = filled([1.0, 10.0], [0.5, 3.0, 50.0, math.nan])
    assert h.counts.tolist() == [1, 1, 1]
    assert h.nonfinite_count == 1


def test_a_value_equal_to_a_bound_belongs_to_the_bucket_it_closes():
    h = filled([0.0, 1.0, 2.0], [0.0, 1.0, 2.0, 2.0000001, -0.0, 1e-300])
    # (-inf, 0] holds 0.0 and -0.0; (0, 1] holds 1e-300 and 1.0; (1, 2] holds 2.0; (2, inf) the rest
    assert h.counts.tolist() == [2, 2, 1, 1]


def test_infinities_and_nan_are_not_bucketed():
    h = filled([1.0], [math.inf, -math.inf, math.nan, 1.0, 5.0])
    assert h.counts.tolist() == [1, 1]
    assert h.count == 2
    assert h.nonfinite_count == 3
    assert (h.min, h.max, h.sum) == (1.0, 5.0, 6.0)


def test_only_nonfinite_values_leave_the_statistics_empty():
    h = filled([1.0], [math.nan, math.inf])
    assert h.count == 0 and h.nonfinite_count == 2
    assert h.counts.tolist() == [0, 0]
    assert h.mean() is None and h.quantile(0.5) is None
    assert h.summary() == {
        "count": 0,
        "nonfinite": 2,
        "mean": None,
        "min": None,
        "p50": None,
        "p90": None,
        "p99": None,
        "max": None,
    }


def test_an_empty_column_changes_nothing():
    h = FixedHistogram([1.0])
    h.add(np.array([], dtype=np.float64), trace_ids=[])
    assert state(h) == ([0, 0], 0, 0, math.inf, -math.inf)


@given(bounds_and_values())
def test_bucket_counts_match_the_reference_and_numpy(case):
    bounds, values = case
    h = filled(bounds, values)
    expected = reference_counts(values, bounds)
    assert h.counts.tolist() == expected
    assert numpy_counts(np.asarray(values, dtype=np.float64), bounds) == expected


@given(bounds_and_values())
def test_count_sum_min_max_cover_the_finite_values(case):
    bounds, values = case
    h = filled(bounds, values)
    finite = [x for x in values if math.isfinite(x)]
    assert h.count == len(finite) == int(h.counts.sum())
    assert h.nonfinite_count == len(values) - len(finite)
    if finite:
        assert h.min == min(finite)
        assert h.max == max(finite)
        assert h.sum == pytest.approx(math.fsum(finite), rel=1e-9, abs=1e-9 * len(finite) * 1e9)
        assert h.mean() == pytest.approx(h.sum / h.count)
    else:
        assert (h.min, h.max, h.sum) == (math.inf, -math.inf, 0.0)


@given(bounds_and_values(), st.integers(min_value=1, max_value=5))
def test_adding_in_pieces_equals_adding_at_once(case, pieces):
    bounds, values = case
    whole = filled(bounds, values)
    parts = FixedHistogram(bounds)
    for chunk in np.array_split(np.asarray(values, dtype=np.float64), pieces):
        parts.add(chunk)
    assert state(parts) == state(whole)
    assert parts.sum == pytest.approx(whole.sum, rel=1e-9, abs=1e-3)


# --- merge ----------------------------------------------------------------------------------


@st.composite
def three_columns(draw):
    bounds = draw(bounds_strategy)
    element = st.one_of(
        finite_floats, st.sampled_from(bounds), st.sampled_from([math.nan, math.inf])
    )
    columns = [draw(st.lists(element, max_size=60)) for _ in range(3)]
    return bounds, columns


@given(three_columns())
def test_merge_is_associative(case):
    bounds, (a, b, c) = case

    left = filled(bounds, a)  # (a + b) + c
    left.merge(filled(bounds, b))
    left.merge(filled(bounds, c))

    bc = filled(bounds, b)  # a + (b + c)
    bc.merge(filled(bounds, c))
    right = filled(bounds, a)
    right.merge(bc)

    assert state(left) == state(right)
    assert left.sum == pytest.approx(right.sum, rel=1e-9, abs=1e-3)


@given(three_columns())
def test_merge_equals_observing_the_concatenation(case):
    bounds, (a, b, _) = case
    n = len(a) + len(b)
    trace_ids = [i.to_bytes(16, "big") for i in range(1, n + 1)]
    span_ids = [i.to_bytes(8, "big") for i in range(1, n + 1)]

    merged = filled(bounds, a, trace_ids=trace_ids[: len(a)], span_ids=span_ids[: len(a)])
    merged.merge(filled(bounds, b, trace_ids=trace_ids[len(a) :], span_ids=span_ids[len(a) :]))
    at_once = filled(bounds, a + b, trace_ids=trace_ids, span_ids=span_ids)

    assert state(merged) == state(at_once)
    assert merged.sum == pytest.approx(at_once.sum, rel=1e-9, abs=1e-3)
    # Every row is traced, so the newest row of each bucket is its exemplar either way.
    assert merged.exemplars == at_once.exemplars


def test_merge_refuses_other_bounds():
    with pytest.raises(ValueError, match="different bounds"):
        FixedHistogram([1.0, 2.0]).merge(FixedHistogram([1.0, 3.0]))


def test_merging_equal_bounds_from_separate_lists_works():
    a, b = filled([1.0, 2.0], [0.5]), filled([1, 2], [1.5])  # ints are the same bounds
    a.merge(b)
    assert a.counts.tolist() == [1, 1, 0]


def test_empty_like_shares_bounds_and_starts_empty():
    h = filled([1.0, 2.0], [0.5, 5.0], trace_ids=[b"\x01" * 16, b"\x02" * 16])
    e = FixedHistogram.empty_like(h)
    assert e.bounds is h.bounds
    assert state(e) == ([0, 0, 0], 0, 0, math.inf, -math.inf)
    assert e.exemplars == [None, None, None]
    e.add(np.array([1.5]))
    assert h.counts.tolist() == [1, 0, 1], "the original is untouched"


@pytest.mark.parametrize("bounds", [[2.0, 1.0], [1.0, 1.0], [0.0, 5.0, 3.0]])
def test_bounds_must_increase_strictly(bounds):
    with pytest.raises(ValueError, match="strictly increasing"):
        FixedHistogram(bounds)


@pytest.mark.parametrize("bounds", [[0.1, float("nan"), 0.9], [float("inf")], [-float("inf"), 1.0]])
def test_bounds_must_be_finite(bounds):
    with pytest.raises(ValueError, match="finite"):
        FixedHistogram(bounds)


# --- quantiles ------------------------------------------------------------------------------


def bucket_edges(h: FixedHistogram, i: int) -> tuple[float, float]:
    """The closed range an estimate in bucket ``i`` may take (clipped to the observed range)."""
    bounds = h.bounds.tolist()
    lower = h.min if i == 0 else max(bounds[i - 1], h.min)
    upper = h.max if i == len(bounds) else min(bounds[i], h.max)
    return lower, upper


@settings(max_examples=200)
@given(
    bounds_and_values(min_size=1, nonfinite=False),
    st.one_of(st.sampled_from([0.01, 0.25, 0.5, 0.9, 0.99, 1.0]), st.floats(0.001, 1.0)),
)
def test_quantile_lies_in_the_bucket_of_the_true_quantile(case, q):
    bounds, values = case
    h = filled(bounds, values)
    ordered = sorted(values)
    # The k-th smallest value, k = ceil(q * n): the first bucket whose cumulative count
    # reaches q * n holds it.
    k = max(math.ceil(q * len(values)), 1)
    true = ordered[k - 1]
    bucket = reference_bucket(true, bounds)
    lower, upper = bucket_edges(h, bucket)
    estimate = h.quantile(q)
    assert estimate is not None
    assert lower <= estimate <= upper
    assert h.min <= estimate <= h.max
    assert lower <= true <= upper


@given(bounds_and_values(min_size=1, nonfinite=False))
def test_quantile_extremes_are_the_observed_range(case):
    bounds, values = case
    h = filled(bounds, values)
    assert h.quantile(0.0) == min(values)
    assert h.quantile(1.0) == max(values)


@given(bounds_and_values(min_size=1, nonfinite=False))
def test_quantiles_are_monotonic(case):
    bounds, values = case
    h = filled(bounds, values)
    estimates = [h.quantile(q) for q in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)]
    assert estimates == sorted(estimates)


def test_quantile_interpolates_inside_a_bucket():
    h = filled([10.0, 20.0], [11.0, 12.0, 13.0, 19.0])  # all in (10, 20]
    # lower edge max(10, min=11), upper edge min(20, max=19): p50 halfway through 4 rows
    assert h.quantile(0.5) == pytest.approx(11.0 + (19.0 - 11.0) * 0.5)
    assert h.summary()["p50"] == h.quantile(0.5)


@pytest.mark.parametrize("q", [-0.01, 1.01, math.nan])
def test_quantile_outside_zero_one_is_an_error(q):
    with pytest.raises(ValueError, match="outside"):
        filled([1.0], [0.5]).quantile(q)


# --- exemplars ------------------------------------------------------------------------------


@st.composite
def traced_rows(draw):
    bounds, values = draw(bounds_and_values(min_size=1))
    n = len(values)
    traced = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    trace_ids = [(i + 1).to_bytes(16, "big") if t else b"" for i, t in enumerate(traced)]
    span_ids = [(i + 1).to_bytes(8, "big") if t else b"" for i, t in enumerate(traced)]
    return bounds, values, trace_ids, span_ids


@given(traced_rows())
def test_exemplars_are_rows_of_their_bucket(case):
    bounds, values, trace_ids, span_ids = case
    h = filled(bounds, values, time_unix_nano=42, trace_ids=trace_ids, span_ids=span_ids)

    for bucket, exemplar in enumerate(h.exemplars):
        rows = [
            i
            for i, x in enumerate(values)
            if math.isfinite(x) and reference_bucket(x, bounds) == bucket
        ]
        # The bucket's newest row becomes its exemplar when that row carries a trace id.
        if not rows or not trace_ids[rows[-1]]:
            assert exemplar is None
            continue
        row = rows[-1]
        assert exemplar == Exemplar(values[row], 42, trace_ids[row], span_ids[row])


def test_exemplar_rows_stay_aligned_when_nonfinite_rows_are_dropped():
    values = [math.nan, 0.5, math.inf, 5.0, math.nan, 0.7]
    trace_ids = [bytes([i + 1]) * 16 for i in range(6)]
    span_ids = [bytes([i + 1]) * 8 for i in range(6)]
    h = filled([1.0], values, time_unix_nano=7, trace_ids=trace_ids, span_ids=span_ids)
    assert h.exemplars == [
        Exemplar(0.7, 7, trace_ids[5], span_ids[5]),
        Exemplar(5.0, 7, trace_ids[3], span_ids[3]),
    ]


def test_exemplars_without_span_ids_have_an_empty_span():
    h = filled([1.0], [0.5], trace_ids=[b"\x09" * 16])
    assert h.exemplars[0] == Exemplar(0.5, 0, b"\x09" * 16, b"")
    assert h.exemplars[1] is None


def test_a_newer_batch_replaces_exemplars_only_where_it_has_traced_rows():
    h = filled([1.0], [0.5, 2.0], trace_ids=[b"\x01" * 16, b"\x02" * 16])
    h.add(np.array([0.6, 3.0]), trace_ids=[b"\x03" * 16, b""])
    assert [e.trace_id if e else None for e in h.exemplars] == [b"\x03" * 16, b"\x02" * 16]
