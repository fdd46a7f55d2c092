"""Data quality per feature: missing, non-finite, out-of-range, unseen categories, schema violations.

A ``QualityTally`` counts one span of rows (a window, or totals); windows merge
into totals. Counts are of rows, not weighted by the sample rate: ratios do not
depend on it. Every ratio is over the feature's rows in the span.

    tally = QualityTally({"age": "numeric", "city": "categorical"},
                         ranges={"age": (18.0, 90.0)},
                         known_categories={"city": frozenset({"paris", "rome"})})
    tally.observe(3, {"age": np.array([25.0, np.nan, 120.0])}, {"city": ["paris", "", "oslo"]})
    tally.report()["features"]["age"]["out_of_range"]   # 1
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np

from agent.engine.columns import FloatArray, IntArray

FeatureKind = Literal["numeric", "categorical"]
FEATURE_KINDS: frozenset[str] = frozenset({"numeric", "categorical"})
# Stands in for "no range": finite, so ±inf always falls outside it and the inf count can be subtracted.
_NO_LOW = float(np.finfo(np.float64).min)
_NO_HIGH = float(np.finfo(np.float64).max)
# Column layouts remembered at once; batches of one model almost always share one layout.
_MAX_PLANS = 16


class NumericCounts(NamedTuple):
    """Quality counts of a batch's numeric columns, counted by the caller: one entry per name."""

    names: tuple[str, ...]
    missing: IntArray
    nonfinite: IntArray
    out_of_range: IntArray


@dataclass(frozen=True, slots=True)
class ColumnCounts:
    """Quality counts of one column of one batch, for a caller that has counted it already.

    Reference binning counts missing, non-finite and out-of-range values as it bins;
    handing them over saves reading the column twice.

    >>> ColumnCounts.of_categories({"paris": 5, "": 2, "oslo": 1}, known={"paris", "rome"})
    ColumnCounts(missing=2, nonfinite=0, out_of_range=0, unseen=1)
    """

    missing: int = 0
    nonfinite: int = 0
    out_of_range: int = 0
    unseen: int = 0

    @classmethod
    def of_categories(cls, counts: Mapping[str, int], known: Iterable[str] | None) -> ColumnCounts:
        """From rows per category value (a ``Counter`` of the column); ``""`` is missing."""
        missing, unseen = _missing_and_unseen(
            counts, None if known is None else frozenset(known) - {""}
        )
        return cls(missing=missing, unseen=unseen)


@dataclass(slots=True)
class FeatureQuality:
    """Data-quality counts of one feature over a span of rows.

    ``missing`` counts NaN (numeric), ``""`` (categorical) and the rows of batches
    that did not send the feature at all (also counted in ``absent``). ``nonfinite``
    counts ±inf; ``out_of_range`` counts finite values outside the reference range.
    Checks that do not apply (no range known, no known categories) report ``None``.

    >>> q = FeatureQuality(rows=10, missing=1)
    >>> q.report()["missing_ratio"], q.report()["out_of_range"]
    (0.1, None)
    """

    rows: int = 0
    missing: int = 0
    absent: int = 0
    nonfinite: int = 0
    out_of_range: int = 0
    unseen: int = 0
    # Rows of batches that sent the feature with the other kind than the schema's.
    type_mismatch: int = 0
    checks_range: bool = False
    checks_categories: bool = False

    def add(self, counts: ColumnCounts) -> None:
        """Add one column's counts (its rows are counted by the caller)."""
        self.missing += counts.missing
        self.nonfinite += counts.nonfinite
        self.out_of_range += counts.out_of_range
        self.unseen += counts.unseen

    def merge(self, other: FeatureQuality) -> None:
        self.rows += other.rows
        self.missing += other.missing
        self.absent += other.absent
        self.nonfinite += other.nonfinite
        self.out_of_range += other.out_of_range
        self.unseen += other.unseen
        self.type_mismatch += other.type_mismatch
        self.checks_range |= other.checks_range
        self.checks_categories |= other.checks_categories

    def report(self) -> dict[str, int | float | None]:
        """Counts and ratios; a ratio is ``None`` without rows (JSON has no NaN)."""
        rows = self.rows

        def ratio(count: int | None) -> float | None:
            return None if count is None or rows == 0 else count / rows

        out_of_range = self.out_of_range if self.checks_range else None
        unseen = self.unseen if self.checks_categories else None
        return {
            "rows": rows,
            "missing": self.missing,
            "missing_ratio": ratio(self.missing),
            "absent": self.absent,
            "nonfinite": self.nonfinite,
            "nonfinite_ratio": ratio(self.nonfinite),
            "out_of_range": out_of_range,
            "out_of_range_ratio": ratio(out_of_range),
            "unseen": unseen,
            "unseen_ratio": ratio(unseen),
            "type_mismatch": self.type_mismatch,
            "type_mismatch_ratio": ratio(self.type_mismatch),
        }


@dataclass(slots=True)
class _Plan:
    """What to do with each column of one batch layout (feature names and kinds)."""

    numeric_names: list[str] = field(default_factory=list)
    numeric: list[FeatureQuality] = field(default_factory=list)
    low: FloatArray = field(default_factory=lambda: np.empty(0))
    high: FloatArray = field(default_factory=lambda: np.empty(0))
    categorical: list[tuple[str, FeatureQuality, frozenset[str] | None]] = field(
        default_factory=list
    )
    mismatched: list[FeatureQuality] = field(default_factory=list)
    absent: list[FeatureQuality] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    # Columns not itemised: unknown features past max_unknown_features, or features past max_features.
    over_limit: int = 0
    # Per layout of handed-over NumericCounts: each numeric column's position in it, or -1.
    positions: dict[tuple[str, ...], IntArray] = field(default_factory=dict)

    def positions_in(self, names: tuple[str, ...]) -> IntArray:
        found = self.positions.get(names)
        if found is None:
            where = {n: i for i, n in enumerate(names)}
            found = np.array([where.get(n, -1) for n in self.numeric_names], dtype=np.int64)
            self.positions[names] = found
        return found


class QualityTally:
    """Data-quality counts of one model version over a span of rows, per feature.

    With a ``schema`` (from the reference), features outside it are counted as
    unknown (at most ``max_unknown_features`` names), and schema features absent
    from a batch count all its rows as missing. Without one (no reference yet),
    missing and non-finite values are counted for the first ``max_features`` features seen.

    >>> tally = QualityTally({"age": "numeric"}, ranges={"age": (18.0, 90.0)})
    >>> tally.observe(3, {"age": np.array([25.0, np.nan, 120.0]), "zip": np.zeros(3)}, {})
    >>> r = tally.report()
    >>> r["features"]["age"]["missing"], r["features"]["age"]["out_of_range"], r["unknown_features"]
    (1, 1, {'zip': 3})
    """

    __slots__ = (
        "_plans",
        "batches",
        "features",
        "known_categories",
        "max_features",
        "max_unknown_features",
        "over_limit_rows",
        "ranges",
        "rows",
        "schema",
        "unknown_features",
    )

    def __init__(
        self,
        schema: Mapping[str, FeatureKind] | None = None,
        ranges: Mapping[str, tuple[float, float]] | None = None,
        known_categories: Mapping[str, Iterable[str]] | None = None,
        *,
        max_unknown_features: int = 50,
        max_features: int = 1000,
    ) -> None:
        if max_unknown_features < 0:
            raise ValueError(f"max_unknown_features={max_unknown_features} must be ≥ 0")
        if max_features < 1:
            raise ValueError(f"max_features={max_features} must be ≥ 1")
        self.schema: dict[str, FeatureKind] | None = None
        if schema is not None:
            for name, kind in schema.items():
                if kind not in FEATURE_KINDS:
                    raise ValueError(
                        f"schema[{name!r}]: kind {kind!r} is not 'numeric' or 'categorical'"
                    )
            self.schema = dict(schema)
        self.ranges = _checked_ranges(ranges or {}, self.schema)
        self.known_categories = _checked_categories(known_categories or {}, self.schema)
        self.max_unknown_features = max_unknown_features
        self.max_features = max_features
        self.rows = 0
        self.batches = 0
        self.over_limit_rows = 0
        self.unknown_features: dict[str, int] = {}
        self.features: dict[str, FeatureQuality] = {}
        self._plans: dict[tuple[tuple[str, ...], tuple[str, ...]], _Plan] = {}
        if self.schema is not None:
            for name in self.schema:
                self._feature(name)

    @classmethod
    def empty_like(cls, other: QualityTally) -> QualityTally:
        """An empty tally with ``other``'s schema, ranges, known categories and limits."""
        tally = cls(
            max_unknown_features=other.max_unknown_features, max_features=other.max_features
        )
        # Validated already, and never mutated: share rather than copy.
        tally.schema = other.schema
        tally.ranges = other.ranges
        tally.known_categories = other.known_categories
        if tally.schema is not None:
            for name in tally.schema:
                tally._feature(name)
        return tally

    def _feature(self, name: str) -> FeatureQuality:
        quality = self.features.get(name)
        if quality is None:
            quality = self.features[name] = FeatureQuality(
                checks_range=name in self.ranges,
                checks_categories=name in self.known_categories,
            )
        return quality

    def observe(
        self,
        rows: int,
        numbers: Mapping[str, FloatArray],
        categories: Mapping[str, Sequence[str]],
        *,
        counted: Mapping[str, ColumnCounts] | None = None,
        numeric: NumericCounts | None = None,
    ) -> None:
        """Count one batch of ``rows`` rows; every column must hold ``rows`` values.

        ``counted`` (per column) and ``numeric`` (numeric columns as arrays) hold the
        counts of columns the caller has counted already (reference binning does):
        those columns are not read again.
        """
        if rows < 0:
            raise ValueError(f"rows={rows} must be ≥ 0")
        for name, values in numbers.items():
            if len(values) != rows:
                raise ValueError(f"numbers[{name!r}]: {len(values)} values, expected rows={rows}")
        for name, texts in categories.items():
            if len(texts) != rows:
                raise ValueError(f"categories[{name!r}]: {len(texts)} values, expected rows={rows}")
        if counted:
            _check_counted(counted, rows, numbers, categories)
        if numeric is not None:
            _check_numeric(numeric, numbers)
        self.batches += 1
        if rows == 0:
            return
        plan = self._plan(numbers, categories)
        self.rows += rows
        for quality in plan.absent:
            quality.rows += rows
            quality.missing += rows
            quality.absent += rows
        for quality in plan.mismatched:
            quality.rows += rows
            quality.type_mismatch += rows
        unknown = self.unknown_features
        for name in plan.unknown:
            unknown[name] = unknown.get(name, 0) + rows
        self.over_limit_rows += plan.over_limit * rows
        if plan.numeric:
            todo = _add_counted(plan, rows, counted, numeric)
            if todo:
                _count_numbers(
                    [plan.numeric[i] for i in todo],
                    [numbers[plan.numeric_names[i]] for i in todo],
                    plan.low[todo],
                    plan.high[todo],
                    rows,
                )
        for name, quality, known in plan.categorical:
            quality.rows += rows
            given = counted.get(name) if counted else None
            if given is not None:
                quality.add(given)
            else:
                missing, unseen = _count_categories(categories[name], known)
                quality.missing += missing
                quality.unseen += unseen

    def _plan(
        self, numbers: Mapping[str, FloatArray], categories: Mapping[str, Sequence[str]]
    ) -> _Plan:
        key = (tuple(numbers), tuple(categories))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            plan = self._plans[key] = self._make_plan(key[0], key[1])
        return plan

    def _make_plan(self, numeric: tuple[str, ...], categorical: tuple[str, ...]) -> _Plan:
        both = set(numeric).intersection(categorical)
        if both:
            raise ValueError(
                f"feature {sorted(both)[0]!r} is sent both as numbers and as categories"
            )
        plan = _Plan()
        schema = self.schema
        low: list[float] = []
        high: list[float] = []
        for name, kind in [(n, "numeric") for n in numeric] + [
            (n, "categorical") for n in categorical
        ]:
            expected = None if schema is None else schema.get(name)
            if schema is not None and expected is None:
                if name in self.unknown_features or (
                    len(self.unknown_features) + len(plan.unknown) < self.max_unknown_features
                ):
                    plan.unknown.append(name)
                else:
                    plan.over_limit += 1
                continue
            if (
                schema is None
                and name not in self.features
                and len(self.features) >= self.max_features
            ):
                plan.over_limit += 1
                continue
            quality = self._feature(name)
            if expected is not None and expected != kind:
                plan.mismatched.append(quality)
            elif kind == "numeric":
                plan.numeric_names.append(name)
                plan.numeric.append(quality)
                bounds = self.ranges.get(name)
                low.append(_NO_LOW if bounds is None else bounds[0])
                high.append(_NO_HIGH if bounds is None else bounds[1])
            else:
                plan.categorical.append((name, quality, self.known_categories.get(name)))
        plan.low = np.array(low, dtype=np.float64)
        plan.high = np.array(high, dtype=np.float64)
        if schema is not None:
            sent = set(numeric).union(categorical)
            plan.absent = [self.features[name] for name in schema if name not in sent]
        return plan

    def merge(self, other: QualityTally) -> None:
        """Add ``other``'s counts (a closed window into totals); both must share one schema."""
        if other.schema != self.schema:
            raise ValueError("cannot merge quality tallies with different schemas")
        self.rows += other.rows
        self.batches += other.batches
        self.over_limit_rows += other.over_limit_rows
        for name, quality in other.features.items():
            if (
                name not in self.features
                and self.schema is None
                and len(self.features) >= self.max_features
            ):
                self.over_limit_rows += quality.rows
                continue
            self._feature(name).merge(quality)
        unknown = self.unknown_features
        for name, rows in other.unknown_features.items():
            if name in unknown or len(unknown) < self.max_unknown_features:
                unknown[name] = unknown.get(name, 0) + rows
            else:
                self.over_limit_rows += rows
        # Limits may have changed what the plans decided: rebuild them on the next batch.
        self._plans.clear()

    def report(self) -> dict[str, Any]:
        """Counts and ratios per feature, and the schema violations. JSON-safe."""
        return {
            "rows": self.rows,
            "batches": self.batches,
            "features": {name: self.features[name].report() for name in sorted(self.features)},
            "unknown_features": dict(sorted(self.unknown_features.items())),
            "missing_features": sorted(n for n, q in self.features.items() if q.absent),
            "over_limit_rows": self.over_limit_rows,
        }


def _count_numbers(
    qualities: list[FeatureQuality],
    columns: list[FloatArray],
    low: FloatArray,
    high: FloatArray,
    rows: int,
) -> None:
    """Count numeric columns as one block: a few whole-block passes, then only the dirty columns."""
    block = np.array(columns, dtype=np.float64)  # features x rows
    for quality in qualities:
        quality.rows += rows
    # NaN propagates through min and max, and ±inf lies outside every (finite) bound.
    clean = (block.min(axis=1) >= low) & (block.max(axis=1) <= high)
    if clean.all():
        return
    dirty = np.flatnonzero(~clean)
    values = block[dirty]
    nans = np.isnan(values).sum(axis=1)
    # fmin/fmax skip NaN: columns whose only trouble is NaN stop here.
    settled = (np.fmin.reduce(values, axis=1) >= low[dirty]) & (
        np.fmax.reduce(values, axis=1) <= high[dirty]
    )
    for row, i, nan, done in zip(
        values, dirty.tolist(), nans.tolist(), settled.tolist(), strict=True
    ):
        quality = qualities[i]
        quality.missing += nan
        if done:
            continue
        bottom, top = low[i], high[i]
        inf = int(np.count_nonzero(np.isinf(row)))
        # NaN and ±inf are never inside the (finite) bounds: take them back out.
        inside = int(np.count_nonzero((row >= bottom) & (row <= top)))
        quality.nonfinite += inf
        quality.out_of_range += rows - inside - nan - inf


def _add_counted(
    plan: _Plan,
    rows: int,
    counted: Mapping[str, ColumnCounts] | None,
    numeric: NumericCounts | None,
) -> list[int]:
    """Add the handed-over counts of the plan's numeric columns; returns those left to count."""
    at = None if numeric is None else plan.positions_in(numeric.names)
    todo: list[int] = []
    if counted or at is None or at.min(initial=0) < 0:
        for i, (name, quality) in enumerate(zip(plan.numeric_names, plan.numeric, strict=True)):
            given = counted.get(name) if counted else None
            if given is not None:
                quality.rows += rows
                quality.add(given)
            elif at is None or at[i] < 0:
                todo.append(i)
            else:
                quality.rows += rows
    else:  # the usual batch: reference binning counted every numeric column
        for quality in plan.numeric:
            quality.rows += rows
    if numeric is not None and at is not None:
        # Most batches are clean: only columns with something to count are visited.
        dirty = np.flatnonzero(numeric.missing + numeric.nonfinite + numeric.out_of_range)
        if dirty.size:
            index = {p: i for i, p in enumerate(at.tolist()) if p >= 0}
            for p in dirty.tolist():
                k = index.get(p)
                if k is None or (counted and plan.numeric_names[k] in counted):
                    continue
                quality = plan.numeric[k]
                quality.missing += int(numeric.missing[p])
                quality.nonfinite += int(numeric.nonfinite[p])
                quality.out_of_range += int(numeric.out_of_range[p])
    return todo


def _check_numeric(numeric: NumericCounts, numbers: Mapping[str, FloatArray]) -> None:
    """Cheap shape checks of handed-over counts (their values are the binning's own)."""
    sizes = {len(numeric.names), numeric.missing.size}
    sizes |= {numeric.nonfinite.size, numeric.out_of_range.size}
    if len(sizes) != 1:
        raise ValueError(
            f"numeric: counts of {len(numeric.names)} columns, arrays of sizes {sizes}"
        )
    if not numbers.keys() >= set(numeric.names):
        missing = sorted(set(numeric.names) - numbers.keys())
        raise ValueError(f"numeric[{missing[0]!r}]: the batch has no numeric column {missing[0]!r}")


def _check_counted(
    counted: Mapping[str, ColumnCounts],
    rows: int,
    numbers: Mapping[str, FloatArray],
    categories: Mapping[str, Sequence[str]],
) -> None:
    for name, counts in counted.items():
        if name not in numbers and name not in categories:
            raise ValueError(f"counted[{name!r}]: the batch has no column {name!r}")
        parts = (counts.missing, counts.nonfinite, counts.out_of_range, counts.unseen)
        if min(parts) < 0 or sum(parts) > rows:
            raise ValueError(
                f"counted[{name!r}]: {counts} must be counts ≥ 0 adding up to at most rows={rows}"
            )


def _count_categories(texts: Sequence[str], known: frozenset[str] | None) -> tuple[int, int]:
    """Missing (``""``) and unseen values of one column, in one pass when all is well."""
    if known is not None:
        # One C-level pass that stops at the first stranger ("" is never known).
        if known.issuperset(texts):
            return 0, 0
        return _missing_and_unseen(Counter(texts), known)
    if "" not in texts:
        return 0, 0
    return sum(map(operator.not_, texts)), 0


def _missing_and_unseen(counts: Mapping[str, int], known: frozenset[str] | None) -> tuple[int, int]:
    missing = counts.get("", 0)
    if known is None:
        return missing, 0
    return missing, sum(n for text, n in counts.items() if text and text not in known)


def _checked_ranges(
    ranges: Mapping[str, tuple[float, float]], schema: Mapping[str, FeatureKind] | None
) -> dict[str, tuple[float, float]]:
    checked: dict[str, tuple[float, float]] = {}
    for name, bounds in ranges.items():
        if schema is not None and schema.get(name) != "numeric":
            raise ValueError(
                f"ranges[{name!r}]: the schema has no numeric feature {name!r} (it says {schema.get(name)!r})"
            )
        low, high = float(bounds[0]), float(bounds[1])
        if not (np.isfinite(low) and np.isfinite(high)):
            raise ValueError(f"ranges[{name!r}]: bounds must be finite numbers, got {bounds!r}")
        if low > high:
            raise ValueError(f"ranges[{name!r}]: min {low} is greater than max {high}")
        checked[name] = (low, high)
    return checked


def _checked_categories(
    known: Mapping[str, Iterable[str]], schema: Mapping[str, FeatureKind] | None
) -> dict[str, frozenset[str]]:
    checked: dict[str, frozenset[str]] = {}
    for name, values in known.items():
        if schema is not None and schema.get(name) != "categorical":
            raise ValueError(
                f"known_categories[{name!r}]: the schema has no categorical feature {name!r} (it says {schema.get(name)!r})"
            )
        if isinstance(values, str):
            raise ValueError(
                f"known_categories[{name!r}]: expected a set of categories, got the string {values!r}"
            )
        # "" is missing, never a category: keeping it out lets issuperset() fail fast on it.
        checked[name] = frozenset(values) - {""}
    return checked
