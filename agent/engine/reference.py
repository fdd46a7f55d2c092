"""Reference profiles: the bins and summary statistics live data is compared against.

A profile keeps bin edges, counts and summary statistics, never raw feature values.
Numeric bins follow OpenTelemetry's explicit-bucket convention (as ``FixedHistogram``):
bin ``i`` holds ``edges[i-1] < v <= edges[i]``, bin 0 is the underflow ``v <= edges[0]``
and the last bin the overflow ``v > edges[-1]``, so there are ``len(edges) + 1`` bins
(``np.searchsorted(edges, v, side="left")`` is the bin of ``v``).

    ref = ReferenceProfile.from_columns("churn", "v1", numbers={"age": ages},
                                        categories={"city": cities}, source="file",
                                        created_unix_nano=now)
    live = ref.features["age"].bin(batch_ages)      # counts in the reference's bins
    ReferenceProfile.from_dict(json.loads(json.dumps(ref.to_dict()))) == ref   # True
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, get_args

import numpy as np

from agent.engine.columns import FloatArray, IntArray, PredictionColumns

REFERENCE_SCHEMA_VERSION = 1
ReferenceSource = Literal["file", "upload", "warmup"]
REFERENCE_SOURCES: tuple[str, ...] = get_args(ReferenceSource)
DEFAULT_PSI_BINS = 10
DEFAULT_CDF_BINS = 100
DEFAULT_TOP_K = 50
# Evidently and NannyML treat an empty category like a missing value; so do we.
MISSING_CATEGORY = ""


_NO_PROBES = np.empty(0, dtype=np.float64)
_LARGEST = float(np.finfo(np.float64).max)


class NumericBins(NamedTuple):
    """A column of live values counted into a ``NumericProfile``'s bins.

    ``psi_counts`` and ``cdf_counts`` hold finite values only; NaN is ``missing``,
    ±inf is ``nonfinite``; ``out_of_range`` counts finite values outside the reference
    [min, max]; ``below_sum``/``above_sum`` sum the values in the first and last cdf
    bins, whose means place the tails for the Wasserstein distance.
    """

    psi_counts: IntArray
    cdf_counts: IntArray
    missing: int
    nonfinite: int
    out_of_range: int
    below_sum: float = 0.0
    above_sum: float = 0.0

    @property
    def binned(self) -> int:
        """Values counted into bins (finite, not missing)."""
        return int(self.cdf_counts.sum())

    def merged(self, other: NumericBins) -> NumericBins:
        """These counts plus ``other``'s (a window adding one batch)."""
        return NumericBins(
            self.psi_counts + other.psi_counts,
            self.cdf_counts + other.cdf_counts,
            self.missing + other.missing,
            self.nonfinite + other.nonfinite,
            self.out_of_range + other.out_of_range,
            self.below_sum + other.below_sum,
            self.above_sum + other.above_sum,
        )


class CategoricalBins(NamedTuple):
    """A column of live labels counted into a ``CategoricalProfile``'s buckets.

    ``counts`` has one entry per reference category plus a final "other" bucket, which
    also receives the ``unseen`` labels (not among the reference's top-K categories).
    Missing labels (empty string or None) are counted apart, never bucketed.
    """

    counts: IntArray
    missing: int
    unseen: int

    @property
    def binned(self) -> int:
        """Labels counted into buckets (all but the missing)."""
        return int(self.counts.sum())

    def merged(self, other: CategoricalBins) -> CategoricalBins:
        return CategoricalBins(
            self.counts + other.counts, self.missing + other.missing, self.unseen + other.unseen
        )


@dataclass(frozen=True, slots=True, eq=False)
class NumericProfile:
    """Quantile bins and summary statistics of a numeric reference column.

    >>> p = NumericProfile.from_values(np.arange(1000.0), psi_bins=4, cdf_bins=8)
    >>> p.psi_edges.tolist(), p.psi_counts.tolist()
    ([249.0, 499.0, 749.0], [250, 250, 250, 250])
    >>> p.bin(np.array([-5.0, 300.0, np.nan])).psi_counts.tolist()
    [1, 1, 0, 0]
    """

    psi_edges: FloatArray
    psi_counts: IntArray
    cdf_edges: FloatArray
    cdf_counts: IntArray
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    # Means of the values in the first and last cdf bins (the tails; None when empty).
    below_mean: float | None
    above_mean: float | None
    count: int
    missing: int
    nonfinite: int
    # Distinct finite values: the default drift method treats <= 5 as discrete.
    distinct: int
    # What ``bin`` searches for in a sorted column: -inf, cdf edges, the largest finite
    # float, then the same around the psi edges, then -inf, largest float, just below
    # min, max, +inf (so that differences count bins, infinities and out-of-range values).
    _probes: FloatArray = field(init=False, repr=False, default_factory=lambda: _NO_PROBES)

    def __post_init__(self) -> None:
        for name in ("psi", "cdf"):
            edges = _frozen(np.asarray(getattr(self, f"{name}_edges"), dtype=np.float64))
            counts = _frozen(np.asarray(getattr(self, f"{name}_counts"), dtype=np.int64))
            if edges.ndim != 1 or not np.all(np.isfinite(edges)):
                raise ValueError(f"{name}_edges: must be a list of finite numbers")
            if edges.size > 1 and not np.all(edges[1:] > edges[:-1]):
                raise ValueError(f"{name}_edges: must be strictly increasing")
            if counts.shape != (edges.size + 1,):
                raise ValueError(
                    f"{name}_counts: expected {edges.size + 1} counts (len({name}_edges) + 1), got {counts.size}"
                )
            if np.any(counts < 0):
                raise ValueError(f"{name}_counts: counts must be >= 0")
            if int(counts.sum()) != self.count:
                raise ValueError(
                    f"{name}_counts: they sum to {int(counts.sum())}, but count is {self.count}"
                )
            object.__setattr__(self, f"{name}_edges", edges)
            object.__setattr__(self, f"{name}_counts", counts)
        for name in ("count", "missing", "nonfinite", "distinct"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.distinct > self.count:
            raise ValueError(f"distinct: {self.distinct} exceeds count {self.count}")
        stats = (self.mean, self.std, self.min, self.max)
        if self.count == 0:
            if any(s is not None for s in stats):
                raise ValueError("mean: mean, std, min and max must be null when count is 0")
        else:
            for name, value in zip(("mean", "std", "min", "max"), stats, strict=True):
                if value is None or not math.isfinite(value):
                    raise ValueError(f"{name}: must be a finite number when count > 0")
            assert self.min is not None and self.max is not None and self.std is not None
            if self.min > self.max:
                raise ValueError(f"min: {self.min} is greater than max {self.max}")
            if self.std < 0:
                raise ValueError(f"std: must be >= 0, got {self.std}")
        for name, n in (("below_mean", self.cdf_counts[0]), ("above_mean", self.cdf_counts[-1])):
            value = getattr(self, name)
            if (value is None) != (n == 0):
                raise ValueError(f"{name}: must be null exactly when its cdf bin is empty")
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name}: must be a finite number")
        low = -math.inf if self.min is None else math.nextafter(self.min, -math.inf)
        high = _LARGEST if self.max is None else self.max
        probes = np.concatenate(
            (
                [-math.inf],
                self.cdf_edges,
                [_LARGEST, -math.inf],
                self.psi_edges,
                [_LARGEST, -math.inf, _LARGEST, low, high, math.inf],
            )
        )
        object.__setattr__(self, "_probes", _frozen(probes))

    @classmethod
    def from_values(
        cls,
        values: FloatArray,
        *,
        psi_bins: int = DEFAULT_PSI_BINS,
        cdf_bins: int = DEFAULT_CDF_BINS,
    ) -> NumericProfile:
        """Profile a reference column: quantile edges from its finite values, then counts."""
        _check_bins(psi_bins, cdf_bins)
        v = np.asarray(values, dtype=np.float64).ravel()
        nan = np.isnan(v)
        finite_mask = np.isfinite(v)
        finite = v[finite_mask]
        missing = int(np.count_nonzero(nan))
        nonfinite = v.size - finite.size - missing
        if finite.size == 0:
            empty = np.empty(0, dtype=np.float64)
            zero = np.zeros(1, dtype=np.int64)
            return cls(
                empty,
                zero,
                empty,
                zero,
                mean=None,
                std=None,
                min=None,
                max=None,
                below_mean=None,
                above_mean=None,
                count=0,
                missing=missing,
                nonfinite=nonfinite,
                distinct=0,
            )
        ordered = np.sort(finite)
        psi_edges = np.unique(_quantile_edges(ordered, psi_bins))
        cdf_edges = np.unique(_quantile_edges(ordered, cdf_bins))
        # Counts from the sorted column: one search per edge, not per value (4x faster).
        cdf_counts = _sorted_counts(ordered, cdf_edges)
        psi_counts = _sorted_counts(ordered, psi_edges)
        # The tails in their original order, so their means (and the id) do not depend on it.
        below = finite[finite <= cdf_edges[0]]
        above = finite[finite > cdf_edges[-1]]
        return cls(
            psi_edges,
            psi_counts,
            cdf_edges,
            cdf_counts,
            mean=float(finite.mean()),
            std=float(finite.std()),  # population std (ddof=0), as Evidently norms Wasserstein
            min=float(finite.min()),
            max=float(finite.max()),
            below_mean=float(below.mean()) if below.size else None,
            above_mean=float(above.mean()) if above.size else None,
            count=int(finite.size),
            missing=missing,
            nonfinite=nonfinite,
            distinct=int(np.count_nonzero(ordered[1:] != ordered[:-1])) + 1,
        )

    def empty_bins(self) -> NumericBins:
        """No values yet: the starting point of a window."""
        return NumericBins(
            np.zeros(self.psi_counts.size, dtype=np.int64),
            np.zeros(self.cdf_counts.size, dtype=np.int64),
            0,
            0,
            0,
        )

    def bin(self, values: FloatArray) -> NumericBins:
        """Count a column of live values into this profile's psi and cdf bins (vectorised).

        The column is sorted once, then one ``searchsorted`` of every edge into it
        yields both binnings, the out-of-range and non-finite counts (NaN sorts last),
        which is about twice as fast as searching each value among the edges.
        """
        s = np.sort(np.asarray(values, dtype=np.float64))
        n = s.size
        if n == 0:
            return self.empty_bins()
        at_most = np.searchsorted(s, self._probes, side="right")  # values <= each probe
        k = self.cdf_edges.size + 2
        j = k + self.psi_edges.size + 2
        first, finite_end, below_min, up_to_max, not_nan = at_most[j:].tolist()
        count = finite_end - first
        if count == 0:
            b = self.empty_bins()
            return b._replace(missing=n - not_nan, nonfinite=not_nan - count)
        below_end, above_start = int(at_most[1]), int(at_most[k - 2])
        per_bin = at_most[1:] - at_most[:-1]  # one subtraction serves both binnings
        return NumericBins(
            per_bin[k : j - 1],
            per_bin[: k - 1],
            missing=n - not_nan,
            nonfinite=not_nan - count,
            out_of_range=count
            if self.min is None
            else (below_min - first) + (finite_end - up_to_max),
            below_sum=float(s[first:below_end].sum()),
            above_sum=float(s[above_start:finite_end].sum()),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "numeric",
            "psi_edges": self.psi_edges.tolist(),
            "psi_counts": self.psi_counts.tolist(),
            "cdf_edges": self.cdf_edges.tolist(),
            "cdf_counts": self.cdf_counts.tolist(),
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
            "below_mean": self.below_mean,
            "above_mean": self.above_mean,
            "count": self.count,
            "missing": self.missing,
            "nonfinite": self.nonfinite,
            "distinct": self.distinct,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NumericProfile:
        """Validate and load what ``to_dict`` wrote; ValueError names the offending field."""
        _check_type(data, "numeric")
        return cls(
            psi_edges=_number_list(data, "psi_edges"),
            psi_counts=_count_list(data, "psi_counts"),
            cdf_edges=_number_list(data, "cdf_edges"),
            cdf_counts=_count_list(data, "cdf_counts"),
            mean=_optional_number(data, "mean"),
            std=_optional_number(data, "std"),
            min=_optional_number(data, "min"),
            max=_optional_number(data, "max"),
            below_mean=_optional_number(data, "below_mean"),
            above_mean=_optional_number(data, "above_mean"),
            count=_count(data, "count"),
            missing=_count(data, "missing"),
            nonfinite=_count(data, "nonfinite"),
            distinct=_count(data, "distinct"),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NumericProfile):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True, eq=False)
class CategoricalProfile:
    """The top-K categories of a reference column with their counts, plus "other".

    >>> p = CategoricalProfile.from_values(["a", "b", "a", "c", ""], top_k=2)
    >>> p.categories, p.counts.tolist(), p.missing
    (('a', 'b'), [2, 1, 1], 1)
    >>> p.bin(["a", "z", "", "a"]).counts.tolist()
    [2, 0, 1]
    """

    categories: tuple[str, ...]
    # One count per category, then the "other" bucket (categories beyond the top K).
    counts: IntArray
    count: int
    missing: int
    _index: dict[str, int] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        categories = tuple(self.categories)
        if not all(isinstance(c, str) and c != MISSING_CATEGORY for c in categories):
            raise ValueError("categories: must be non-empty strings")
        if len(set(categories)) != len(categories):
            raise ValueError("categories: must be unique")
        counts = _frozen(np.asarray(self.counts, dtype=np.int64))
        if counts.shape != (len(categories) + 1,):
            raise ValueError(
                f"counts: expected {len(categories) + 1} counts (one per category and 'other'), got {counts.size}"
            )
        if np.any(counts < 0):
            raise ValueError("counts: counts must be >= 0")
        if int(counts.sum()) != self.count:
            raise ValueError(f"counts: they sum to {int(counts.sum())}, but count is {self.count}")
        for name in ("count", "missing"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        object.__setattr__(self, "categories", categories)
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(categories)})

    @classmethod
    def from_values(
        cls, values: Sequence[str | None], *, top_k: int = DEFAULT_TOP_K
    ) -> CategoricalProfile:
        """Profile a reference column; ties in count are broken by category name."""
        if top_k < 1:
            raise ValueError(f"top_k: must be >= 1, got {top_k}")
        counted = Counter(values)
        missing = counted.pop(MISSING_CATEGORY, 0) + counted.pop(None, 0)
        ranked = sorted(counted.items(), key=lambda kv: (-kv[1], str(kv[0])))
        top = ranked[:top_k]
        other = sum(c for _, c in ranked[top_k:])
        return cls(
            tuple(str(k) for k, _ in top),
            np.array([c for _, c in top] + [other], dtype=np.int64),
            count=sum(counted.values()),
            missing=missing,
        )

    def empty_bins(self) -> CategoricalBins:
        return CategoricalBins(np.zeros(self.counts.size, dtype=np.int64), 0, 0)

    def bin(self, values: Sequence[str | None]) -> CategoricalBins:
        """Count a column of live labels into this profile's buckets.

        Counter (C-implemented) does the per-row work; Python then touches each
        distinct label once, which is fast for the low-cardinality columns drift watches.
        """
        index = self._index
        other = len(index)
        counts = [0] * (other + 1)
        missing = unseen = 0
        for label, n in Counter(values).items():
            i = index.get(label)  # type: ignore[arg-type]
            if i is not None:
                counts[i] += n
            elif label is None or label == MISSING_CATEGORY:
                missing += n
            else:
                counts[other] += n
                unseen += n
        return CategoricalBins(np.array(counts, dtype=np.int64), missing, unseen)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "categorical",
            "categories": list(self.categories),
            "counts": self.counts.tolist(),
            "count": self.count,
            "missing": self.missing,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CategoricalProfile:
        """Validate and load what ``to_dict`` wrote; ValueError names the offending field."""
        _check_type(data, "categorical")
        categories = data.get("categories")
        if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
            raise ValueError("categories: must be a list of strings")
        return cls(
            tuple(categories),
            _count_list(data, "counts"),
            count=_count(data, "count"),
            missing=_count(data, "missing"),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CategoricalProfile):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


FeatureProfile = NumericProfile | CategoricalProfile


@dataclass(frozen=True, slots=True, eq=False)
class ReferenceProfile:
    """What a model version's live traffic is compared against; ``id`` is a content hash.

    >>> ref = ReferenceProfile.from_columns("churn", "v1", numbers={"age": np.arange(50.0)},
    ...     categories={}, source="file", created_unix_nano=0)
    >>> ref.rows, ref.features["age"].count, len(ref.id)
    (50, 50, 16)
    """

    model: str
    version: str
    source: ReferenceSource
    created_unix_nano: int
    rows: int
    features: Mapping[str, FeatureProfile]
    scores: NumericProfile | None = None
    labels: CategoricalProfile | None = None
    schema_version: int = REFERENCE_SCHEMA_VERSION
    # sha256 of the canonical JSON of the content (all but id, created and source).
    id: str = field(init=False, default="")

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model: must be a non-empty string")
        if not isinstance(self.version, str):
            raise ValueError("version: must be a string")
        if self.source not in REFERENCE_SOURCES:
            raise ValueError(
                f"source: must be one of {list(REFERENCE_SOURCES)}, got {self.source!r}"
            )
        if self.schema_version != REFERENCE_SCHEMA_VERSION:
            raise ValueError(
                f"schema_version: {self.schema_version} is not supported (this agent reads {REFERENCE_SCHEMA_VERSION})"
            )
        if self.created_unix_nano < 0:
            raise ValueError(f"created_unix_nano: must be >= 0, got {self.created_unix_nano}")
        if self.rows < 1:
            raise ValueError(f"rows: a reference needs at least one row, got {self.rows}")
        features = dict(self.features)
        columns: list[tuple[str, FeatureProfile | None]] = [
            *((f"features.{n}", p) for n, p in features.items()),
            ("scores", self.scores),
            ("labels", self.labels),
        ]
        for path, profile in columns:
            if profile is None:
                continue
            seen = profile.count + profile.missing
            if isinstance(profile, NumericProfile):
                seen += profile.nonfinite
            if seen != self.rows:
                raise ValueError(
                    f"{path}: count + missing{' + nonfinite' if isinstance(profile, NumericProfile) else ''} is {seen}, but the reference has {self.rows} rows"
                )
        if self.scores is not None and not isinstance(self.scores, NumericProfile):
            raise ValueError("scores: must be a numeric profile")
        if self.labels is not None and not isinstance(self.labels, CategoricalProfile):
            raise ValueError("labels: must be a categorical profile")
        object.__setattr__(self, "features", features)
        content = json.dumps(
            self._content(), sort_keys=True, separators=(",", ":"), allow_nan=False
        )
        object.__setattr__(self, "id", hashlib.sha256(content.encode()).hexdigest()[:16])

    @classmethod
    def from_columns(
        cls,
        model: str,
        version: str,
        *,
        numbers: Mapping[str, FloatArray],
        categories: Mapping[str, Sequence[str | None]],
        scores: FloatArray | None = None,
        labels: Sequence[str | None] | None = None,
        source: ReferenceSource,
        created_unix_nano: int,
        psi_bins: int = DEFAULT_PSI_BINS,
        cdf_bins: int = DEFAULT_CDF_BINS,
        top_k: int = DEFAULT_TOP_K,
    ) -> ReferenceProfile:
        """Profile whole reference columns (a training-data file, an upload of raw samples)."""
        _check_bins(psi_bins, cdf_bins)
        if top_k < 1:
            raise ValueError(f"top_k: must be >= 1, got {top_k}")
        both = sorted(set(numbers) & set(categories))
        if both:
            raise ValueError(
                f"features.{both[0]}: given as both a numeric and a categorical column"
            )
        lengths: dict[str, int] = {f"features.{n}": len(v) for n, v in numbers.items()}
        lengths.update({f"features.{n}": len(v) for n, v in categories.items()})
        if scores is not None:
            lengths["scores"] = len(scores)
        if labels is not None:
            lengths["labels"] = len(labels)
        if not lengths:
            raise ValueError("features: a reference needs at least one column")
        rows = max(lengths.values())
        for path, n in lengths.items():
            if n != rows:
                raise ValueError(f"{path}: has {n} rows, other columns have {rows}")
        features: dict[str, FeatureProfile] = {}
        for name, values in numbers.items():
            features[name] = NumericProfile.from_values(
                values, psi_bins=psi_bins, cdf_bins=cdf_bins
            )
        for name, labels_of in categories.items():
            features[name] = CategoricalProfile.from_values(labels_of, top_k=top_k)
        return cls(
            model,
            version,
            source,
            created_unix_nano,
            rows,
            dict(sorted(features.items())),
            scores=None
            if scores is None
            else NumericProfile.from_values(scores, psi_bins=psi_bins, cdf_bins=cdf_bins),
            labels=None if labels is None else CategoricalProfile.from_values(labels, top_k=top_k),
        )

    def _content(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "model": self.model,
            "version": self.version,
            "rows": self.rows,
            "features": {name: p.to_dict() for name, p in self.features.items()},
            "scores": None if self.scores is None else self.scores.to_dict(),
            "labels": None if self.labels is None else self.labels.to_dict(),
        }

    def schema(self) -> dict[str, str]:
        """Feature name -> "numeric" | "categorical"."""
        return {
            name: "numeric" if isinstance(p, NumericProfile) else "categorical"
            for name, p in self.features.items()
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe and versioned: the file ``mlsidecar reference build`` writes."""
        return {
            "id": self.id,
            "source": self.source,
            "created_unix_nano": self.created_unix_nano,
            **self._content(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReferenceProfile:
        """Validate and load a profile; ValueError names the offending field.

        A given ``id`` must match the content (it is a hash of it); it may be left out.
        """
        if not isinstance(data, Mapping):
            raise ValueError("reference: must be a JSON object")
        schema_version = data.get("schema_version")
        if type(schema_version) is not int:
            raise ValueError("schema_version: must be an integer")
        for key in ("model", "version", "source"):
            if not isinstance(data.get(key), str):
                raise ValueError(f"{key}: must be a string")
        raw_features = data.get("features")
        if not isinstance(raw_features, Mapping):
            raise ValueError("features: must be an object of feature name -> profile")
        features: dict[str, FeatureProfile] = {}
        for name, raw in raw_features.items():
            features[name] = _at(f"features.{name}", _feature_from_dict, raw)
        scores = data.get("scores")
        labels = data.get("labels")
        profile = cls(
            model=data["model"],
            version=data["version"],
            source=data["source"],
            created_unix_nano=_count(data, "created_unix_nano"),
            rows=_count(data, "rows"),
            features=features,
            scores=None if scores is None else _at("scores", NumericProfile.from_dict, scores),
            labels=None if labels is None else _at("labels", CategoricalProfile.from_dict, labels),
            schema_version=schema_version,
        )
        given = data.get("id")
        if given is not None and given != profile.id:
            raise ValueError(
                f"id: {given!r} does not match the content (hash {profile.id!r}); the file was changed after it was built"
            )
        return profile

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ReferenceProfile):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


class ReferenceBuilder:
    """The first ``rows`` live predictions of a model version, kept to become its reference.

    Memory is bounded by ``rows`` (from config): at most that many raw values per column,
    held only until ``build`` turns them into edges and counts.

        warmup = ReferenceBuilder("churn", "v1", rows=10_000)
        warmup.add(cols)            # per batch, until warmup.full
        ref = warmup.build(created_unix_nano=now)
    """

    def __init__(
        self,
        model: str,
        version: str,
        *,
        rows: int,
        psi_bins: int = DEFAULT_PSI_BINS,
        cdf_bins: int = DEFAULT_CDF_BINS,
        top_k: int = DEFAULT_TOP_K,
    ) -> None:
        if rows < 1:
            raise ValueError(f"rows: the warm-up window needs at least one row, got {rows}")
        _check_bins(psi_bins, cdf_bins)
        if top_k < 1:
            raise ValueError(f"top_k: must be >= 1, got {top_k}")
        self.model = model
        self.version = version
        self.capacity = rows
        self.psi_bins = psi_bins
        self.cdf_bins = cdf_bins
        self.top_k = top_k
        self.rows = 0
        self._numbers: dict[str, FloatArray] = {}
        self._categories: dict[str, list[str | None]] = {}
        self._scores: FloatArray | None = None
        self._labels: list[str | None] | None = None

    @property
    def full(self) -> bool:
        return self.rows >= self.capacity

    def add(self, cols: PredictionColumns) -> int:
        """Keep the batch's rows while there is room; returns how many rows were taken.

        A feature absent from some batches is missing in those rows.
        """
        if cols.model != self.model:
            raise ValueError(f"model: batch is for {cols.model!r}, warm-up for {self.model!r}")
        if cols.version != self.version:
            raise ValueError(
                f"version: batch is for {cols.version!r}, warm-up for {self.version!r}"
            )
        for name in cols.numbers:
            if name in self._categories or name in cols.categories:
                raise ValueError(f"features.{name}: sent as numeric, earlier as categorical")
        for name in cols.categories:
            if name in self._numbers:
                raise ValueError(f"features.{name}: sent as categorical, earlier as numeric")
        take = min(cols.rows, self.capacity - self.rows)
        if take <= 0:
            return 0
        start, stop = self.rows, self.rows + take
        for name, values in cols.numbers.items():
            self._numeric_column(name)[start:stop] = values[:take]
        for name, labels in cols.categories.items():
            column = self._categories.get(name)
            if column is None:
                column = self._categories[name] = [MISSING_CATEGORY] * start
            column.extend(labels[:take])
        if cols.scores is not None:
            if self._scores is None:
                self._scores = np.full(self.capacity, np.nan)
            self._scores[start:stop] = cols.scores[:take]
        if cols.labels is not None:
            if self._labels is None:
                self._labels = [MISSING_CATEGORY] * start
            self._labels.extend(cols.labels[:take])
        self.rows = stop
        # Columns absent from this batch stay aligned: their rows are missing.
        for column in self._categories.values():
            column.extend([MISSING_CATEGORY] * (stop - len(column)))
        if self._labels is not None:
            self._labels.extend([MISSING_CATEGORY] * (stop - len(self._labels)))
        return take

    def _numeric_column(self, name: str) -> FloatArray:
        column = self._numbers.get(name)
        if column is None:
            # NaN = missing, for the rows before the feature first appeared (and after, if absent).
            column = self._numbers[name] = np.full(self.capacity, np.nan)
        return column

    def build(self, created_unix_nano: int) -> ReferenceProfile:
        """The reference profile of the rows kept so far (source "warmup")."""
        if self.rows == 0:
            raise ValueError(f"rows: no predictions of {self.model!r} {self.version!r} seen yet")
        n = self.rows
        return ReferenceProfile.from_columns(
            self.model,
            self.version,
            numbers={name: column[:n] for name, column in self._numbers.items()},
            categories=self._categories,
            scores=None if self._scores is None else self._scores[:n],
            labels=self._labels,
            source="warmup",
            created_unix_nano=created_unix_nano,
            psi_bins=self.psi_bins,
            cdf_bins=self.cdf_bins,
            top_k=self.top_k,
        )


# --- helpers --------------------------------------------------------------------------------


def _quantile_edges(ordered: FloatArray, bins: int) -> FloatArray:
    """The i/bins quantiles (i = 1..bins-1): the smallest values with >= i/bins of the mass at or below.

    Observed values (numpy's "inverted_cdf"), so a discrete feature gets one bin per value;
    ranks in integers, so quantiles shared by two bin counts (10 | 100) are the same value.
    """
    n = ordered.size
    ranks = (np.arange(1, bins, dtype=np.int64) * n + bins - 1) // bins  # ceil(i * n / bins)
    return ordered[ranks - 1]


def _check_bins(psi_bins: int, cdf_bins: int) -> None:
    if psi_bins < 2:
        raise ValueError(f"psi_bins: must be >= 2, got {psi_bins}")
    if cdf_bins < 2:
        raise ValueError(f"cdf_bins: must be >= 2, got {cdf_bins}")


def _frozen(a: np.ndarray) -> np.ndarray:
    if a.flags.writeable:
        a = a.copy()
        a.flags.writeable = False
    return a


def _sorted_counts(ordered: FloatArray, edges: FloatArray) -> IntArray:
    """Counts of the sorted values per bin ``edges[i-1] < v <= edges[i]`` (plus the overflow)."""
    at_most = np.searchsorted(ordered, edges, side="right")
    return np.diff(at_most, prepend=0, append=ordered.size).astype(np.int64)


def _at(path: str, load: Any, raw: Any) -> Any:
    """``load(raw)`` with ``path`` prefixed to the field a ValueError names."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: must be an object")
    try:
        return load(raw)
    except ValueError as e:
        raise ValueError(f"{path}.{e}") from None


def _feature_from_dict(raw: Mapping[str, Any]) -> FeatureProfile:
    kind = raw.get("type")
    if kind == "numeric":
        return NumericProfile.from_dict(raw)
    if kind == "categorical":
        return CategoricalProfile.from_dict(raw)
    raise ValueError(f"type: must be 'numeric' or 'categorical', got {kind!r}")


def _check_type(data: Mapping[str, Any], kind: str) -> None:
    if data.get("type", kind) != kind:
        raise ValueError(f"type: expected {kind!r}, got {data.get('type')!r}")


def _count(data: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = data.get(key, default)
    if type(value) is not int or value < 0:
        raise ValueError(f"{key}: must be an integer >= 0, got {value!r}")
    return value


def _optional_number(data: Mapping[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ValueError(f"{key}: must be a finite number or null, got {value!r}")
    return float(value)


def _number_list(data: Mapping[str, Any], key: str) -> FloatArray:
    value = data.get(key)
    if not isinstance(value, list) or not all(type(x) in (int, float) for x in value):
        raise ValueError(f"{key}: must be a list of numbers")
    return np.asarray(value, dtype=np.float64)


def _count_list(data: Mapping[str, Any], key: str) -> IntArray:
    value = data.get(key)
    if not isinstance(value, list) or not all(type(x) is int and x >= 0 for x in value):
        raise ValueError(f"{key}: must be a list of integers >= 0")
    return np.asarray(value, dtype=np.int64)
