"""A window's numeric features binned together equal each column binned on its own.

``NumericTally`` (agent.engine.binning) is the engine's fast path; ``NumericProfile.bin``
is the per-column definition it must reproduce: for any references (with ties, constant
or empty columns, several bin layouts) and any batches (NaN, ±inf, out-of-range values,
features missing from some batches), the counts are equal and the tail sums agree to
rounding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.engine.binning import NumericBlock, NumericTally
from agent.engine.columns import PredictionColumns
from agent.engine.monitor import ModelMonitor, MonitorConfig
from agent.engine.reference import NumericBins, NumericProfile, ReferenceProfile

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
anything = st.one_of(finite, st.just(np.nan), st.just(np.inf), st.just(-np.inf))
reference_column = st.one_of(
    hnp.arrays(np.float64, st.integers(0, 200), elements=finite),
    hnp.arrays(np.float64, st.integers(1, 200), elements=st.sampled_from([0.0, 1.0, 2.5])),
    hnp.arrays(np.float64, st.integers(1, 50), elements=anything),
)
layouts = st.sampled_from([(10, 100), (4, 8), (2, 2)])


@st.composite
def scenario(draw):
    names = draw(st.lists(st.sampled_from("abcdef"), min_size=1, max_size=6, unique=True))
    profiles = {}
    for name in names:
        psi, cdf = draw(layouts)
        profiles[name] = NumericProfile.from_values(
            draw(reference_column), psi_bins=psi, cdf_bins=cdf
        )
    batches = []
    for _ in range(draw(st.integers(1, 4))):
        rows = draw(st.integers(0, 60))
        # Some features absent, and one the reference does not know.
        present = draw(st.lists(st.sampled_from([*names, "zz"]), unique=True, max_size=7))
        batches.append(
            {
                n: draw(hnp.arrays(np.float64, rows, elements=anything))
                for n in draw(st.permutations(present))
            }
        )
    return profiles, batches


def merged_by_column(profiles, batches) -> dict[str, NumericBins]:
    out: dict[str, NumericBins] = {}
    for batch in batches:
        for name, values in batch.items():
            if name in profiles and values.size:
                b = profiles[name].bin(values)
                out[name] = b if name not in out else out[name].merged(b)
    return out


def assert_same(got: NumericBins, want: NumericBins, name: str) -> None:
    assert got.psi_counts.tolist() == want.psi_counts.tolist(), name
    assert got.cdf_counts.tolist() == want.cdf_counts.tolist(), name
    assert (got.missing, got.nonfinite, got.out_of_range) == (
        want.missing,
        want.nonfinite,
        want.out_of_range,
    ), name
    for a, b in ((got.below_sum, want.below_sum), (got.above_sum, want.above_sum)):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6), (name, a, b)


@settings(max_examples=300, deadline=None)
@given(scenario())
def test_tally_equals_each_column_binned_on_its_own(case):
    profiles, batches = case
    tally = NumericTally(NumericBlock(profiles))
    for batch in batches:
        rows = len(next(iter(batch.values()))) if batch else 0
        counts = tally.observe(batch, rows)
        known = [n for n in batch if n in profiles]
        if counts is None:
            assert rows == 0 or not known
            continue
        # The quality counts handed over are this batch's, column by column.
        assert sorted(counts.names) == sorted(known)
        for i, name in enumerate(counts.names):
            b = profiles[name].bin(batch[name])
            assert (
                int(counts.missing[i]),
                int(counts.nonfinite[i]),
                int(counts.out_of_range[i]),
            ) == (b.missing, b.nonfinite, b.out_of_range), name
    want = merged_by_column(profiles, batches)
    got = tally.bins()
    assert set(got) == set(want)
    for name in want:
        assert_same(got[name], want[name], name)


def test_features_with_different_bin_layouts_form_separate_groups():
    rng = np.random.default_rng(3)
    profiles = {
        "fine": NumericProfile.from_values(rng.normal(size=1000), psi_bins=10, cdf_bins=100),
        "coarse": NumericProfile.from_values(rng.normal(size=1000), psi_bins=4, cdf_bins=8),
        "fine2": NumericProfile.from_values(rng.normal(size=1000), psi_bins=10, cdf_bins=100),
        "constant": NumericProfile.from_values(np.full(100, 3.0)),
    }
    block = NumericBlock(profiles)
    assert sorted(len(g.names) for g in block.groups) == [1, 1, 2]
    tally = NumericTally(block)
    batch = {n: rng.normal(size=500) for n in profiles}
    tally.observe(batch, 500)
    for name, bins in tally.bins().items():
        assert_same(bins, profiles[name].bin(batch[name]), name)


def test_a_feature_never_sent_has_no_bins():
    profiles = {n: NumericProfile.from_values(np.arange(100.0)) for n in ("a", "b")}
    tally = NumericTally(NumericBlock(profiles))
    assert tally.observe({"b": np.arange(10.0), "other": np.zeros(10)}, 10) is not None
    assert set(tally.bins()) == {"b"}
    assert tally.observe({"other": np.zeros(10)}, 10) is None


@pytest.mark.parametrize("rows", [1, 1000])
def test_out_of_range_infinities_and_nan_are_counted_apart(rows):
    profile = NumericProfile.from_values(np.linspace(0.0, 1.0, 101))
    values = np.full(rows, 0.5)
    values[0] = {1: np.nan, 1000: -np.inf}[rows]
    if rows > 1:
        values[1:4] = [np.nan, np.inf, 2.0]
    tally = NumericTally(NumericBlock({"x": profile}))
    counts = tally.observe({"x": values}, rows)
    assert counts is not None
    want = profile.bin(values)
    assert (counts.missing[0], counts.nonfinite[0], counts.out_of_range[0]) == (
        want.missing,
        want.nonfinite,
        want.out_of_range,
    )
    assert_same(tally.bins()["x"], want, "x")


def test_merged_tallies_equal_one_tally_of_both_spans():
    rng = np.random.default_rng(5)
    profiles = {n: NumericProfile.from_values(rng.normal(size=500)) for n in ("a", "b")}
    block = NumericBlock(profiles)
    first, second, both = NumericTally(block), NumericTally(block), NumericTally(block)
    batches = [{n: rng.normal(0.5, 2.0, size=300) for n in profiles} for _ in range(2)]
    batches[1]["a"][:3] = [np.nan, np.inf, -np.inf]
    first.observe(batches[0], 300)
    second.observe(batches[1], 300)
    for batch in batches:
        both.observe(batch, 300)
    first.merge(second)
    for name, bins in both.bins().items():
        assert_same(first.bins()[name], bins, name)
    with pytest.raises(ValueError, match="different reference blocks"):
        first.merge(NumericTally(NumericBlock(profiles)))


def test_psi_bins_count_every_window_since_the_reference_and_restart_with_a_new_one():
    rng = np.random.default_rng(9)
    monitor = ModelMonitor("m", "v1", MonitorConfig(warmup_rows=0))

    def ref(seed: int) -> ReferenceProfile:
        r = np.random.default_rng(seed)
        return ReferenceProfile.from_columns(
            "m",
            "v1",
            numbers={"x": r.normal(size=2000)},
            categories={"c": r.choice(["a", "b"], 2000).tolist()},
            source="file",
            created_unix_nano=0,
        )

    def batch(rows: int) -> PredictionColumns:
        return PredictionColumns(
            "m",
            "v1",
            ids=[str(i) for i in range(rows)],
            received_unix_nano=0,
            numbers={"x": rng.normal(size=rows)},
            categories={"c": rng.choice(["a", "b", "z"], rows).tolist()},
        )

    monitor.set_reference(ref(1))
    monitor.observe_predictions(batch(400))
    monitor.roll()
    monitor.observe_predictions(batch(100))
    series = {s.feature: s for s in monitor.psi_bins()}
    assert int(series["x"].counts.sum()) == 500
    assert series["c"].labels == ("a", "b", "__other__")
    assert int(series["c"].counts.sum()) == 500 and int(series["c"].counts[-1]) > 0
    assert series["x"].reference_proportions.sum() == pytest.approx(1.0)

    monitor.set_reference(ref(2))
    monitor.observe_predictions(batch(50))
    series = {s.feature: s for s in monitor.psi_bins()}
    assert int(series["x"].counts.sum()) == 50
    assert monitor.reference is not None
    assert series["x"].reference_id == monitor.reference.id != ref(1).id


@settings(max_examples=200, deadline=None)
@given(scenario())
def test_means_are_the_means_of_the_finite_values_counted(case):
    profiles, batches = case
    tally = NumericTally(NumericBlock(profiles))
    finite: dict[str, list[float]] = {}
    for batch in batches:
        rows = len(next(iter(batch.values()))) if batch else 0
        tally.observe(batch, rows)
        for name, values in batch.items():
            if name in profiles:
                finite.setdefault(name, []).extend(values[np.isfinite(values)].tolist())
    want = {n: float(np.mean(v)) for n, v in finite.items() if v}
    got = tally.means()
    assert got.keys() == want.keys()
    for name, mean in want.items():
        assert math.isclose(got[name], mean, rel_tol=1e-9, abs_tol=1e-6), (name, got[name], mean)


def test_a_jump_in_a_feature_mean_is_flagged_as_an_anomaly_of_that_feature():
    rng = np.random.default_rng(12)
    reference = ReferenceProfile.from_columns(
        "m",
        "v1",
        numbers={"x": rng.normal(size=5000), "y": rng.normal(size=5000)},
        categories={},
        source="file",
        created_unix_nano=0,
    )
    monitor = ModelMonitor("m", "v1", MonitorConfig(warmup_rows=0), reference)

    def window(x_shift: float) -> list[str]:
        monitor.observe_predictions(
            PredictionColumns(
                "m",
                "v1",
                ids=[str(i) for i in range(500)],
                received_unix_nano=0,
                numbers={"x": rng.normal(x_shift, 1, 500), "y": rng.normal(size=500)},
            )
        )
        monitor.roll({"traffic.rows": 500.0})
        return monitor.report(min_rows=100)["anomalies"]["flagged_last_window"]

    quiet = [window(0.0) for _ in range(12)]
    # The detector's false-alarm rate is small but not zero (y may flag once by chance).
    assert not any("feature.x.mean" in q for q in quiet), quiet
    assert "feature.x.mean" in window(1.0)
    streams = monitor.report(min_rows=100)["anomalies"]["streams"]
    assert {"feature.x.mean", "feature.y.mean", "score.mean"} <= streams.keys()
