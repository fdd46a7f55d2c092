"""Drift of live counts against a reference profile's bins: PSI, KS, JS, Wasserstein, chi-square.

Every function works on counts in the *same* bins (``NumericProfile.bin`` and
``CategoricalProfile.bin`` put live values in the reference's bins), so memory and
time are independent of traffic. The math and its error against the exact tests on
raw data are documented in docs/drift.md.

    psi(ref.psi_counts, live.psi_counts)                        # 0.02
    ks_binned(ref.cdf_counts, live.cdf_counts)                  # (statistic, p_value)
    evaluate_feature(ref, live).to_dict()                       # {"method": "wasserstein", ...}
    DriftBaseline(reference.features).evaluate(window_bins)     # every feature at once
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt
from scipy.special import chdtrc, kolmogorov, rel_entr

from agent.engine.reference import (
    CategoricalBins,
    CategoricalProfile,
    FeatureProfile,
    NumericBins,
    NumericProfile,
)

DriftMethod = Literal["psi", "ks", "wasserstein", "jensenshannon", "chisquare"]
DRIFT_METHODS: tuple[str, ...] = get_args(DriftMethod)
FeatureKind = Literal["numeric", "categorical"]
# Evidently's defaults: p-value thresholds for the tests, distance thresholds otherwise.
# Evidently's JS threshold (0.1) is on scipy's natural-log distance; ours is base 2 (in
# [0, 1]), which is the natural-log distance / sqrt(ln 2): the same decision is 0.1201.
JS_BASE2_THRESHOLD = round(0.1 / math.sqrt(math.log(2.0)), 4)
DEFAULT_THRESHOLDS: Mapping[str, float] = MappingProxyType(
    {
        "psi": 0.1,
        "ks": 0.05,
        "wasserstein": 0.1,
        "jensenshannon": JS_BASE2_THRESHOLD,
        "chisquare": 0.05,
    }
)
# Methods whose decision is ``p_value < threshold`` (the others: ``score >= threshold``).
TEST_METHODS = frozenset({"ks", "chisquare"})
SMALL_REFERENCE_ROWS = 1000
DISCRETE_MAX_UNIQUE = 5
PSI_EPS = 1e-4
# Evidently's floor for the Wasserstein norm, so a constant reference feature stays finite.
WASSERSTEIN_MIN_STD = 1e-3
_LN2 = math.log(2.0)

Counts = npt.NDArray[np.int64] | npt.NDArray[np.float64]
Matrix = npt.NDArray[np.float64]


# --- the methods on one pair of count vectors -----------------------------------------------


def psi(ref_counts: Counts, cur_counts: Counts, eps: float = PSI_EPS) -> float:
    """Population stability index, ``sum((q - p) * ln(q / p))`` over bins.

    Proportions are floored at ``eps`` (Evidently's smoothing) so an empty bin on either
    side gives a large but finite term. ``psi(x, x) == 0``; >= 0.1 is Evidently's drift.
    """
    p, q = _pair(ref_counts, cur_counts)
    if eps <= 0:
        raise ValueError(f"eps: must be > 0, got {eps}")
    return float(_psi_rows(p, q, p.sum(1), q.sum(1), eps)[0])


def psi_p_value(psi: float, n_ref: int, n_cur: int, bins: int) -> float:
    """P(PSI >= psi) if both samples came from one distribution.

    PSI is the symmetric KL divergence; to second order it is ``sum((q-p)^2 / p)``, so
    ``PSI / (1/n + 1/m)`` is asymptotically chi-square with ``bins - 1`` degrees of freedom.
    ``bins`` counts the bins holding values in either sample.
    """
    if n_ref < 1 or n_cur < 1:
        raise ValueError(f"n_ref, n_cur: both samples need values, got {n_ref} and {n_cur}")
    if psi < 0:
        raise ValueError(f"psi: must be >= 0, got {psi}")
    return float(
        _psi_p_rows(
            np.array([psi]), np.array([float(n_ref)]), np.array([float(n_cur)]), np.array([bins])
        )[0]
    )


def ks_binned(ref_counts: Counts, cur_counts: Counts) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and p-value from counts in the same bins.

    The statistic is the largest gap between the cumulative proportions at the bin edges
    (never above the exact one; short of it by at most the largest bin's mass). The
    p-value is the asymptotic Kolmogorov distribution at ``sqrt(n*m/(n+m)) * D``.
    """
    p, q = _pair(ref_counts, cur_counts)
    d, pv = _ks_rows(np.cumsum(p, 1), np.cumsum(q, 1), p.sum(1), q.sum(1))
    return float(d[0]), float(pv[0])


def js_distance(ref_counts: Counts, cur_counts: Counts) -> float:
    """Jensen-Shannon distance, base 2: 0 for identical proportions, 1 for disjoint ones."""
    p, q = _pair(ref_counts, cur_counts)
    return float(_js_rows(p, q, p.sum(1), q.sum(1))[0])


def chi_square(
    ref_counts: Counts, cur_counts: Counts, *, correction: bool = True
) -> tuple[float, float]:
    """Chi-square test of homogeneity on the 2 x K table (reference, current) x bins.

    As ``scipy.stats.chi2_contingency``: bins empty in both samples are dropped, and
    Yates' correction applies only with one degree of freedom (two bins).
    """
    p, q = _pair(ref_counts, cur_counts)
    stat, pv = _chi_rows(p, q, correction)
    return float(stat[0]), float(pv[0])


def wasserstein_normed(
    cdf_edges: npt.NDArray[np.float64],
    ref_counts: Counts,
    cur_counts: Counts,
    ref_std: float,
    ref_tails: tuple[float | None, float | None],
    cur_tails: tuple[float | None, float | None] | None = None,
) -> float:
    """Wasserstein-1 distance from binned data, divided by the reference std (Evidently's norm).

    W1 is the area between the two CDFs. Inside each bin values are taken as uniform, so
    both CDFs are piecewise linear between the edges. The first and last bins are open
    ended: each sample's tail mass is spread uniformly from the edge over twice the
    distance to its mean there (``*_tails``: means of the values in the first and last
    bins; None for an empty bin), which keeps its first moment exact. Without
    ``cur_tails`` the current tails are assumed shaped like the reference's.
    """
    edges = np.asarray(cdf_edges, dtype=np.float64)
    p, q = _pair(ref_counts, cur_counts)
    if edges.ndim != 1 or edges.size == 0 or p.shape[1] != edges.size + 1:
        raise ValueError(
            f"cdf_edges: expected {p.shape[1] - 1} edges (one fewer than counts), got {edges.size}"
        )
    first, last = float(edges[0]), float(edges[-1])
    ref_low, ref_high = _tail_ends(first, last, *ref_tails)
    cur_low, cur_high = (
        (ref_low, ref_high) if cur_tails is None else _tail_ends(first, last, *cur_tails)
    )
    w = _wasserstein_rows(
        edges[None, :],
        np.cumsum(p[:, :-1], 1) / p.sum(1)[:, None],
        np.cumsum(q[:, :-1], 1) / q.sum(1)[:, None],
        np.array([ref_low]),
        np.array([ref_high]),
        np.array([cur_low]),
        np.array([cur_high]),
    )
    return float(w[0]) / max(ref_std, WASSERSTEIN_MIN_STD)


def _tail_ends(
    first: float, last: float, below_mean: float | None, above_mean: float | None
) -> tuple[float, float]:
    """Where uniform tails with these means end (min/max guard against rounding past the edge)."""
    low = first if below_mean is None else min(2.0 * below_mean - first, first)
    high = last if above_mean is None else max(2.0 * above_mean - last, last)
    return low, high


# --- choosing a method, results -------------------------------------------------------------


def choose_method(kind: FeatureKind, reference_rows: int, n_unique: int) -> DriftMethod:
    """Evidently's default: tests for a small reference, distances for a large one.

    reference <= 1000 rows: numeric with > 5 distinct values -> ks, else chisquare
    (Evidently uses a z-test for binary features; chisquare is its equivalent there);
    larger: numeric with > 5 distinct values -> wasserstein, else jensenshannon.
    """
    if kind not in ("numeric", "categorical"):
        raise ValueError(f"kind: must be 'numeric' or 'categorical', got {kind!r}")
    continuous = kind == "numeric" and n_unique > DISCRETE_MAX_UNIQUE
    if reference_rows <= SMALL_REFERENCE_ROWS:
        return "ks" if continuous else "chisquare"
    return "wasserstein" if continuous else "jensenshannon"


def method_for(profile: FeatureProfile) -> DriftMethod:
    """The default method for a reference feature (``choose_method`` on its profile)."""
    if isinstance(profile, NumericProfile):
        return choose_method("numeric", profile.count, profile.distinct)
    return choose_method("categorical", profile.count, len(profile.categories))


@dataclass(frozen=True, slots=True)
class DriftResult:
    """One feature's drift: the decision method's score and verdict, plus PSI always.

    ``score`` is the method's statistic (KS D, chi-square, or the distance); the verdict is
    ``p_value < threshold`` for ks/chisquare and ``score >= threshold`` for the others.
    Undefined values (no reference or no current values) are None.

    >>> DriftResult("psi", 0.3, 0.001, 0.1, True, 0.3, 0.001).to_dict()["drifted"]
    True
    """

    method: DriftMethod
    score: float | None
    p_value: float | None
    threshold: float
    drifted: bool
    psi: float | None
    psi_p_value: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "score": _finite(self.score),
            "p_value": _finite(self.p_value),
            "threshold": self.threshold,
            "drifted": self.drifted,
            "psi": _finite(self.psi),
            "psi_p_value": _finite(self.psi_p_value),
        }


def evaluate_feature(
    profile: FeatureProfile,
    current: NumericBins | CategoricalBins,
    *,
    method: DriftMethod | None = None,
    threshold: float | None = None,
) -> DriftResult:
    """Drift of one feature's live counts (from ``profile.bin``, summed over a window).

    ``method`` defaults to ``method_for(profile)``, ``threshold`` to the method's default.
    """
    methods = {"feature": method} if method is not None else None
    thresholds: dict[str, float] | None = None
    if threshold is not None:
        thresholds = {method or method_for(profile): threshold}
    baseline = DriftBaseline({"feature": profile}, methods=methods, thresholds=thresholds)
    return baseline.evaluate({"feature": current})["feature"]


def dataset_drift(results: Iterable[DriftResult], share: float = 0.5) -> tuple[float | None, bool]:
    """Share of evaluated features that drifted, and whether it reaches ``share``.

    Features with an undefined score (no current values) are not counted.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share: must be in [0, 1], got {share}")
    evaluated = [r for r in results if r.score is not None]
    if not evaluated:
        return None, False
    drifted = sum(r.drifted for r in evaluated) / len(evaluated)
    return drifted, drifted >= share


class DriftBaseline:
    """A reference's features stacked once, so a window's drift is a few array operations.

    Rows are features; the reference side (proportions, logs, cumulative proportions,
    padded edges) is computed here, the current side per ``evaluate``.

        baseline = DriftBaseline(reference.features, methods={"age": "psi"})
        results = baseline.evaluate({"age": age_bins, "city": city_bins})
        results["age"].to_dict()
    """

    def __init__(
        self,
        profiles: Mapping[str, FeatureProfile],
        *,
        methods: Mapping[str, DriftMethod] | None = None,
        thresholds: Mapping[str, float] | None = None,
        eps: float = PSI_EPS,
    ) -> None:
        methods = methods or {}
        thresholds = thresholds or {}
        for name, chosen in methods.items():
            if name not in profiles:
                raise ValueError(f"methods.{name}: no such feature in the reference")
            if chosen not in DRIFT_METHODS:
                raise ValueError(f"methods.{name}: {chosen!r} is not one of {list(DRIFT_METHODS)}")
            if chosen in ("ks", "wasserstein") and not isinstance(profiles[name], NumericProfile):
                raise ValueError(f"methods.{name}: {chosen} needs a numeric feature")
        for key, value in thresholds.items():
            if key not in DRIFT_METHODS:
                raise ValueError(f"thresholds.{key}: not one of {list(DRIFT_METHODS)}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"thresholds.{key}: must be a finite number >= 0, got {value}")
        if eps <= 0:
            raise ValueError(f"eps: must be > 0, got {eps}")
        self.profiles = dict(profiles)
        self.methods: dict[str, DriftMethod] = {
            name: methods.get(name) or method_for(p) for name, p in profiles.items()
        }
        self.thresholds = {m: thresholds.get(m, DEFAULT_THRESHOLDS[m]) for m in DRIFT_METHODS}
        numeric = {
            n: p for n, p in profiles.items() if isinstance(p, NumericProfile) and p.count > 0
        }
        categorical = {
            n: p for n, p in profiles.items() if isinstance(p, CategoricalProfile) and p.count > 0
        }
        self._numeric = _NumericStack(numeric, self.methods, self.thresholds, eps)
        self._categorical = _CategoricalStack(categorical, self.methods, self.thresholds, eps)

    def evaluate(
        self, current: Mapping[str, NumericBins | CategoricalBins]
    ) -> dict[str, DriftResult]:
        """Drift of every reference feature; one absent from ``current`` (or empty) is undefined."""
        found = self._numeric.evaluate(current)
        found.update(self._categorical.evaluate(current))
        results = {}
        for name in self.profiles:
            result = found.get(name)
            if result is None:
                method = self.methods[name]
                result = DriftResult(method, None, None, self.thresholds[method], False, None, None)
            results[name] = result
        return results


# --- stacked evaluation ---------------------------------------------------------------------


class _Stack:
    """Features as rows of counts in "psi" bins (categories for categoricals), padded with 0.

    Zero padding in both samples changes no method: PSI, JS and chi-square terms of bins
    empty on both sides are 0, and cumulative proportions stay flat across them.
    """

    def __init__(
        self,
        names: list[str],
        counts: list[npt.NDArray[np.int64]],
        methods: Mapping[str, DriftMethod],
        thresholds: Mapping[str, float],
        eps: float,
    ) -> None:
        self.names = names
        self.eps = eps
        self.sizes = [c.size for c in counts]
        self.width = max(self.sizes, default=1)
        self.uniform = all(size == self.width for size in self.sizes)
        self.ref = _padded(counts, self.width)
        self.n = self.ref.sum(1).astype(np.float64)
        self.ref_p = np.maximum(self.ref / self.n[:, None], eps)
        self.ref_log_p = np.log(self.ref_p)
        self.methods: list[DriftMethod] = [methods[name] for name in names]
        self.thresholds = np.array([thresholds[m] for m in self.methods], dtype=np.float64)
        self.is_test = np.array([m in TEST_METHODS for m in self.methods], dtype=bool)
        self.wanted = set(self.methods)
        self.rows_of: dict[str, npt.NDArray[np.bool_]] = {
            m: np.array([x == m for x in self.methods], dtype=bool) for m in DRIFT_METHODS
        }

    def _selected(
        self, present: list[int], counts: list[npt.NDArray[np.int64]]
    ) -> tuple[npt.NDArray[np.intp] | slice, npt.NDArray[np.bool_] | None, Any, Any] | None:
        """Rows to evaluate (features sent, with values), the mask applied to ``present``
        (None when every feature is kept), their stacked current counts and row totals."""
        cur = _stacked(counts, self.width) if self.uniform else _padded(counts, self.width)
        m = cur.sum(1).astype(np.float64)
        keep = m > 0
        if len(present) == len(self.names) and keep.all():
            return slice(None), None, cur, m
        chosen = np.array(present, dtype=np.intp)[keep]
        if chosen.size == 0:
            return None
        return chosen, keep, cur[keep], m[keep]

    def _results(
        self,
        rows: npt.NDArray[np.intp] | slice,
        score: Matrix,
        p_value: Matrix,
        psi_values: Matrix,
        psi_p: Matrix,
    ) -> dict[str, DriftResult]:
        thresholds = self.thresholds[rows]
        drifted = np.where(self.is_test[rows], p_value < thresholds, score >= thresholds)
        index = range(len(self.names)) if isinstance(rows, slice) else rows.tolist()
        names, methods = self.names, self.methods
        return {
            names[i]: DriftResult(methods[i], s, None if math.isnan(p) else p, t, d, ps, pp)
            for i, s, p, t, d, ps, pp in zip(
                index,
                score.tolist(),
                p_value.tolist(),
                thresholds.tolist(),
                drifted.tolist(),
                psi_values.tolist(),
                psi_p.tolist(),
                strict=True,
            )
        }

    def _psi(
        self, rows: npt.NDArray[np.intp] | slice, cur: npt.NDArray[np.int64], m: Matrix
    ) -> tuple[Matrix, Matrix, Matrix, Matrix]:
        """PSI and its p-value; then score and p-value arrays that start as PSI's."""
        psi_values = _psi_rows_with_ref(
            self.ref_p[rows], self.ref_log_p[rows], cur / m[:, None], self.eps
        )
        occupied = np.count_nonzero((self.ref[rows] + cur) > 0, axis=1)
        psi_p = _psi_p_rows(psi_values, self.n[rows], m, occupied)
        # Distances have no p-value (NaN -> None); tests fill theirs in.
        p_value = np.where(self.rows_of["psi"][rows], psi_p, np.nan)
        return psi_values, psi_p, psi_values.copy(), p_value

    def _take(
        self, rows: npt.NDArray[np.intp] | slice, method: str, target: Matrix, values: Matrix
    ) -> None:
        mask = self.rows_of[method][rows]
        target[mask] = values[mask]


class _NumericStack(_Stack):
    """Numeric features: psi bins, plus cdf bins padded *before* the overflow bin.

    With the overflow bin always last, the cumulative proportions at the padded columns
    repeat those at the last real edge, and the padded edges repeat that edge.
    """

    def __init__(
        self,
        profiles: Mapping[str, NumericProfile],
        methods: Mapping[str, DriftMethod],
        thresholds: Mapping[str, float],
        eps: float,
    ) -> None:
        plist = list(profiles.values())
        super().__init__(list(profiles), [p.psi_counts for p in plist], methods, thresholds, eps)
        self.cdf_sizes = [p.cdf_counts.size for p in plist]
        self.cdf_width = max(self.cdf_sizes, default=2)
        self.cdf_uniform = all(size == self.cdf_width for size in self.cdf_sizes)
        ref_cdf = _padded_before_last([p.cdf_counts for p in plist], self.cdf_width)
        self.ref_cum = np.cumsum(ref_cdf, 1) / self.n[:, None]
        edges = np.zeros((len(plist), self.cdf_width - 1))
        for i, p in enumerate(plist):
            edges[i, : p.cdf_edges.size] = p.cdf_edges
            edges[i, p.cdf_edges.size :] = p.cdf_edges[-1]
        self.edges = edges
        ends = [
            _tail_ends(p.cdf_edges[0], p.cdf_edges[-1], p.below_mean, p.above_mean) for p in plist
        ]
        self.ref_low = np.array([e[0] for e in ends], dtype=np.float64)
        self.ref_high = np.array([e[1] for e in ends], dtype=np.float64)
        self.norm = np.maximum(
            np.array([p.std for p in plist], dtype=np.float64), WASSERSTEIN_MIN_STD
        )

    def evaluate(
        self, current: Mapping[str, NumericBins | CategoricalBins]
    ) -> dict[str, DriftResult]:
        present: list[int] = []
        psi_counts: list[npt.NDArray[np.int64]] = []
        cdf_counts: list[npt.NDArray[np.int64]] = []
        tails: list[tuple[float, float]] = []
        for i, name in enumerate(self.names):
            bins = current.get(name)
            if not isinstance(bins, NumericBins):
                continue
            if bins.psi_counts.size != self.sizes[i] or bins.cdf_counts.size != self.cdf_sizes[i]:
                raise ValueError(f"{name}: counts do not match the reference's bins")
            present.append(i)
            psi_counts.append(bins.psi_counts)
            cdf_counts.append(bins.cdf_counts)
            tails.append((bins.below_sum, bins.above_sum))
        if not present:
            return {}
        selected = self._selected(present, psi_counts)
        if selected is None:
            return {}
        rows, keep, cur, m = selected
        cdf = (
            _stacked(cdf_counts, self.cdf_width)
            if self.cdf_uniform
            else _padded_before_last(cdf_counts, self.cdf_width)
        )
        if keep is not None:
            cdf = cdf[keep]
            tails = [t for t, k in zip(tails, keep.tolist(), strict=True) if k]
        n = self.n[rows]
        psi_values, psi_p, score, p_value = self._psi(rows, cur, m)
        wanted = self.wanted
        cur_cum = np.cumsum(cdf, 1) / m[:, None]  # int64 cumsum: twice as fast as float
        if "ks" in wanted:
            d, pv = _ks_cum_rows(self.ref_cum[rows], cur_cum, n, m)
            self._take(rows, "ks", score, d)
            self._take(rows, "ks", p_value, pv)
        if "wasserstein" in wanted:
            edges = self.edges[rows]
            first, last = edges[:, 0], edges[:, -1]
            sums = np.array(tails)
            below_n, above_n = cdf[:, 0], cdf[:, -1]
            # Tail mean t spread uniformly from the edge: the ramp ends at 2t - edge.
            cur_low = np.where(
                below_n > 0,
                np.minimum(2.0 * sums[:, 0] / np.maximum(below_n, 1) - first, first),
                first,
            )
            cur_high = np.where(
                above_n > 0,
                np.maximum(2.0 * sums[:, 1] / np.maximum(above_n, 1) - last, last),
                last,
            )
            w = _wasserstein_rows(
                edges,
                self.ref_cum[rows][:, :-1],
                cur_cum[:, :-1],
                self.ref_low[rows],
                self.ref_high[rows],
                cur_low,
                cur_high,
            )
            self._take(rows, "wasserstein", score, w / self.norm[rows])
        if "jensenshannon" in wanted:
            self._take(rows, "jensenshannon", score, _js_rows(self.ref[rows], cur, n, m))
        if "chisquare" in wanted:
            stat, pv = _chi_rows(self.ref[rows], cur, True)
            self._take(rows, "chisquare", score, stat)
            self._take(rows, "chisquare", p_value, pv)
        return self._results(rows, score, p_value, psi_values, psi_p)


class _CategoricalStack(_Stack):
    """Categorical features: counts per reference category, then "other"."""

    def __init__(
        self,
        profiles: Mapping[str, CategoricalProfile],
        methods: Mapping[str, DriftMethod],
        thresholds: Mapping[str, float],
        eps: float,
    ) -> None:
        super().__init__(
            list(profiles), [p.counts for p in profiles.values()], methods, thresholds, eps
        )

    def evaluate(
        self, current: Mapping[str, NumericBins | CategoricalBins]
    ) -> dict[str, DriftResult]:
        present: list[int] = []
        counts: list[npt.NDArray[np.int64]] = []
        for i, name in enumerate(self.names):
            bins = current.get(name)
            if not isinstance(bins, CategoricalBins):
                continue
            if bins.counts.size != self.sizes[i]:
                raise ValueError(f"{name}: counts do not match the reference's categories")
            present.append(i)
            counts.append(bins.counts)
        if not present:
            return {}
        selected = self._selected(present, counts)
        if selected is None:
            return {}
        rows, _, cur, m = selected
        n = self.n[rows]
        psi_values, psi_p, score, p_value = self._psi(rows, cur, m)
        methods = self.wanted
        if "jensenshannon" in methods:
            self._take(rows, "jensenshannon", score, _js_rows(self.ref[rows], cur, n, m))
        if "chisquare" in methods:
            stat, pv = _chi_rows(self.ref[rows], cur, True)
            self._take(rows, "chisquare", score, stat)
            self._take(rows, "chisquare", p_value, pv)
        return self._results(rows, score, p_value, psi_values, psi_p)


def _stacked(counts: list[npt.NDArray[np.int64]], width: int) -> npt.NDArray[np.int64]:
    # Equal-length rows: concatenate is a third of np.stack's cost for 20 short rows.
    return np.concatenate(counts).reshape(len(counts), width)


def _padded(counts: list[npt.NDArray[np.int64]], width: int) -> npt.NDArray[np.int64]:
    out = np.zeros((len(counts), width), dtype=np.int64)
    for i, c in enumerate(counts):
        out[i, : c.size] = c
    return out


def _padded_before_last(counts: list[npt.NDArray[np.int64]], width: int) -> npt.NDArray[np.int64]:
    out = np.zeros((len(counts), width), dtype=np.int64)
    for i, c in enumerate(counts):
        out[i, : c.size - 1] = c[:-1]
        out[i, -1] = c[-1]
    return out


# --- row-wise math: each row of a matrix is one feature -------------------------------------


def _psi_rows(p: Matrix, q: Matrix, n: Matrix, m: Matrix, eps: float) -> Matrix:
    ps = np.maximum(p / n[:, None], eps)
    return _psi_rows_with_ref(ps, np.log(ps), q / m[:, None], eps)


def _psi_rows_with_ref(ps: Matrix, log_ps: Matrix, q: Matrix, eps: float) -> Matrix:
    qs = np.maximum(q, eps)
    # Each term is >= 0 (q - p and ln q - ln p share a sign); rounding cannot make it negative.
    return np.sum((qs - ps) * (np.log(qs) - log_ps), axis=1)


def _psi_p_rows(psi_values: Matrix, n: Matrix, m: Matrix, bins: npt.NDArray[np.int64]) -> Matrix:
    dof = np.asarray(bins, dtype=np.float64) - 1.0
    x = psi_values / (1.0 / n + 1.0 / m)
    # One occupied bin: both samples agree completely, PSI is 0.
    return np.where(dof >= 1.0, chdtrc(np.maximum(dof, 1.0), x), 1.0)


def _ks_rows(ref_cum: Matrix, cur_cum: Matrix, n: Matrix, m: Matrix) -> tuple[Matrix, Matrix]:
    return _ks_cum_rows(ref_cum / n[:, None], cur_cum / m[:, None], n, m)


def _ks_cum_rows(ref_cdf: Matrix, cur_cdf: Matrix, n: Matrix, m: Matrix) -> tuple[Matrix, Matrix]:
    d = np.max(np.abs(ref_cdf - cur_cdf), axis=1)
    return d, kolmogorov(np.sqrt(n * m / (n + m)) * d)


def _js_rows(ref: Counts, cur: Counts, n: Matrix, m: Matrix) -> Matrix:
    p = ref / n[:, None]
    q = cur / m[:, None]
    mid = (p + q) / 2.0
    div = (rel_entr(p, mid).sum(1) + rel_entr(q, mid).sum(1)) / (2.0 * _LN2)
    return np.sqrt(np.clip(div, 0.0, 1.0))


def _chi_rows(ref: Counts, cur: Counts, correction: bool) -> tuple[Matrix, Matrix]:
    p, q = ref.astype(np.float64), cur.astype(np.float64)
    total = p + q
    n, m = p.sum(1)[:, None], q.sum(1)[:, None]
    share_ref = n / (n + m)
    exp_ref = total * share_ref
    exp_cur = total - exp_ref
    occupied = total > 0
    dof = np.count_nonzero(occupied, axis=1) - 1
    if correction and np.any(dof == 1):
        # Yates: move each observed count 0.5 towards its expectation (not past it).
        yates = (dof == 1)[:, None]
        p = np.where(yates, p + np.sign(exp_ref - p) * np.minimum(0.5, np.abs(exp_ref - p)), p)
        q = np.where(yates, q + np.sign(exp_cur - q) * np.minimum(0.5, np.abs(exp_cur - q)), q)
    terms = np.zeros_like(total)
    np.divide((p - exp_ref) ** 2, exp_ref, out=terms, where=occupied)
    cur_terms = np.zeros_like(total)
    np.divide((q - exp_cur) ** 2, exp_cur, out=cur_terms, where=occupied)
    stat = terms.sum(1) + cur_terms.sum(1)
    p_value = np.where(dof >= 1, chdtrc(np.maximum(dof, 1), stat), 1.0)
    return stat, p_value


def _wasserstein_rows(
    edges: Matrix,
    ref_cdf: Matrix,
    cur_cdf: Matrix,
    ref_low: Matrix,
    ref_high: Matrix,
    cur_low: Matrix,
    cur_high: Matrix,
) -> Matrix:
    """Area between two piecewise-linear CDFs known at the same edges.

    ``*_cdf[:, i]`` is the cumulative proportion at ``edges[:, i]``; each sample's first
    bin ramps up from its low end, its last bin up to 1 at its high end.
    """
    diff = ref_cdf - cur_cdf
    inner = _area_between_lines(diff[:, :-1], diff[:, 1:], np.diff(edges, axis=1)).sum(1)
    first, last = edges[:, 0], edges[:, -1]
    below = _tail_area(ref_cdf[:, 0], cur_cdf[:, 0], first - ref_low, first - cur_low)
    above = _tail_area(1.0 - ref_cdf[:, -1], 1.0 - cur_cdf[:, -1], ref_high - last, cur_high - last)
    return np.asarray(below + inner + above)


def _area_between_lines(d0: Matrix, d1: Matrix, width: Matrix) -> Matrix:
    """Integral of |d| over a segment where d goes linearly from d0 to d1."""
    a0, a1 = np.abs(d0), np.abs(d1)
    same_sign = d0 * d1 >= 0
    crossing = np.zeros_like(d0)
    np.divide(d0 * d0 + d1 * d1, 2.0 * (a0 + a1), out=crossing, where=~same_sign)
    return width * np.where(same_sign, (a0 + a1) / 2.0, crossing)


def _tail_area(ref_mass: Matrix, cur_mass: Matrix, ref_len: Matrix, cur_len: Matrix) -> Matrix:
    """Area between two ramps that fall from ``*_mass`` at distance 0 to 0 at ``*_len``.

    The ramp that ends first splits the tail: on [0, short] both are linear; beyond it
    only the longer ramp is left, a triangle.
    """
    short = np.minimum(ref_len, cur_len)
    long = np.maximum(ref_len, cur_len)
    ref_at = ref_mass * (1.0 - _ratio(short, ref_len))
    cur_at = cur_mass * (1.0 - _ratio(short, cur_len))
    d_at = ref_at - cur_at
    return (
        _area_between_lines(ref_mass - cur_mass, d_at, short) + np.abs(d_at) * (long - short) / 2.0
    )


def _ratio(a: Matrix, b: Matrix) -> Matrix:
    # a <= b; a zero-length ramp is a step, already down at its end (ratio 1).
    out = np.ones_like(a)
    np.divide(a, b, out=out, where=b > 0)
    return out


# --- helpers --------------------------------------------------------------------------------


def _pair(ref_counts: Counts, cur_counts: Counts) -> tuple[Matrix, Matrix]:
    p = np.asarray(ref_counts, dtype=np.float64)
    q = np.asarray(cur_counts, dtype=np.float64)
    if p.ndim != 1 or q.shape != p.shape:
        raise ValueError(f"cur_counts: shape {q.shape} differs from ref_counts {p.shape}")
    for name, c in (("ref_counts", p), ("cur_counts", q)):
        if not np.all(np.isfinite(c)) or np.any(c < 0):
            raise ValueError(f"{name}: counts must be finite and >= 0")
        if not c.sum() > 0:
            raise ValueError(f"{name}: no values counted")
    return p[None, :], q[None, :]


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None
