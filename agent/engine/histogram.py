"""Fixed-bucket histograms filled a whole column at a time.

Buckets follow OpenTelemetry's explicit-bucket convention: bucket ``i`` holds
values ``v`` with ``bounds[i-1] < v <= bounds[i]``; the last bucket is the
overflow above ``bounds[-1]``. NaN and ±inf are not bucketed; they are counted
in ``nonfinite_count`` (missing and non-finite values are data-quality signals).

    h = FixedHistogram([1.0, 10.0])
    h.add(np.array([0.5, 3.0, 50.0, np.nan]))
    h.counts.tolist(), h.nonfinite_count   # ([1, 1, 1], 1)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from agent.engine.columns import FloatArray


@dataclass(frozen=True, slots=True)
class Exemplar:
    """One row that landed in a bucket, with the trace of the request that produced it."""

    value: float
    time_unix_nano: int
    trace_id: bytes
    span_id: bytes


class FixedHistogram:
    """Counts, sum, min and max of a numeric column over fixed bucket bounds."""

    __slots__ = ("bounds", "count", "counts", "exemplars", "max", "min", "nonfinite_count", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        if not all(math.isfinite(b) for b in bounds):
            raise ValueError(f"bucket bounds must be finite numbers: {list(bounds)}")
        if any(b >= a for a, b in zip(bounds[1:], bounds, strict=False)):
            raise ValueError(f"bucket bounds not in strictly increasing order: {list(bounds)}")
        self.bounds = np.asarray(bounds, dtype=np.float64)
        self.counts = np.zeros(len(bounds) + 1, dtype=np.int64)
        self.count = 0
        self.nonfinite_count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.exemplars: list[Exemplar | None] = [None] * (len(bounds) + 1)

    @classmethod
    def empty_like(cls, other: FixedHistogram) -> FixedHistogram:
        """An empty histogram with ``other``'s bounds (shared, not copied: bounds never change)."""
        h = cls.__new__(cls)
        h.bounds = other.bounds
        h.counts = np.zeros(other.counts.size, dtype=np.int64)
        h.count = 0
        h.nonfinite_count = 0
        h.sum = 0.0
        h.min = math.inf
        h.max = -math.inf
        h.exemplars = [None] * other.counts.size
        return h

    def add(
        self,
        values: FloatArray,
        *,
        time_unix_nano: int = 0,
        trace_ids: Sequence[bytes] | None = None,
        span_ids: Sequence[bytes] | None = None,
    ) -> None:
        """Count a column of values; rows with a trace id may become bucket exemplars."""
        size = values.size
        if size == 0:
            return
        finite = np.isfinite(values)
        n_valid = int(np.count_nonzero(finite))
        rows: np.ndarray | None = None  # the original row of each counted value, if some were not
        if n_valid != size:
            self.nonfinite_count += size - n_valid
            if n_valid == 0:
                return
            rows = np.flatnonzero(finite)
            values = values[rows]
        idx = np.searchsorted(self.bounds, values, side="left")
        self.counts += np.bincount(idx, minlength=self.counts.size)
        self.count += n_valid
        self.sum += float(values.sum())
        low, high = float(values.min()), float(values.max())
        if low < self.min:
            self.min = low
        if high > self.max:
            self.max = high
        if trace_ids:
            self._keep_exemplars(values, idx, rows, time_unix_nano, trace_ids, span_ids)

    def _keep_exemplars(
        self,
        values: FloatArray,
        idx: np.ndarray,
        rows: np.ndarray | None,
        time_unix_nano: int,
        trace_ids: Sequence[bytes],
        span_ids: Sequence[bytes] | None,
    ) -> None:
        # The last row of each bucket replaces that bucket's exemplar if it carries a trace id.
        last = np.full(self.counts.size, -1, dtype=np.intp)
        np.maximum.at(last, idx, np.arange(idx.size, dtype=np.intp))
        buckets = np.flatnonzero(last >= 0)
        positions = last[buckets]
        originals = positions if rows is None else rows[positions]
        for bucket, value, row in zip(
            buckets.tolist(), values[positions].tolist(), originals.tolist(), strict=True
        ):
            trace_id = trace_ids[row]
            if trace_id:
                span_id = span_ids[row] if span_ids else b""
                self.exemplars[bucket] = Exemplar(value, time_unix_nano, trace_id, span_id)

    def merge(self, other: FixedHistogram) -> None:
        """Add ``other``'s counts; its exemplars replace this one's (it is the newer)."""
        if other.bounds is not self.bounds and not np.array_equal(self.bounds, other.bounds):
            raise ValueError("cannot merge histograms with different bounds")
        self.counts += other.counts
        self.count += other.count
        self.nonfinite_count += other.nonfinite_count
        self.sum += other.sum
        if other.min < self.min:
            self.min = other.min
        if other.max > self.max:
            self.max = other.max
        for i, ex in enumerate(other.exemplars):
            if ex is not None:
                self.exemplars[i] = ex

    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None

    def quantile(self, q: float) -> float | None:
        """Estimate the q-quantile by linear interpolation inside its bucket.

        The first bucket's lower edge is the observed min and the overflow
        bucket's upper edge the observed max, so estimates stay in [min, max].
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile q={q} is outside [0, 1]")
        if self.count == 0:
            return None
        target = q * self.count
        cumulative = np.cumsum(self.counts)
        i = int(np.searchsorted(cumulative, target, side="left"))
        i = min(i, self.counts.size - 1)
        lower = self.min if i == 0 else max(float(self.bounds[i - 1]), self.min)
        upper = self.max if i == self.bounds.size else min(float(self.bounds[i]), self.max)
        below = float(cumulative[i - 1]) if i > 0 else 0.0
        in_bucket = float(self.counts[i])
        if in_bucket == 0:
            return lower
        fraction = (target - below) / in_bucket
        if fraction >= 1.0:
            return upper
        if fraction <= 0.0:
            return lower
        # Rounding must not carry the estimate out of its bucket (quantiles stay monotonic).
        return min(max(lower + (upper - lower) * fraction, lower), upper)

    def summary(self) -> dict[str, float | int | None]:
        return {
            "count": self.count,
            "nonfinite": self.nonfinite_count,
            "mean": self.mean(),
            "min": self.min if self.count else None,
            "p50": self.quantile(0.5),
            "p90": self.quantile(0.9),
            "p99": self.quantile(0.99),
            "max": self.max if self.count else None,
        }
