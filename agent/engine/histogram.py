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
import numpy.typing as npt

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

    __slots__ = (
        "_ex_span",
        "_ex_time",
        "_ex_trace",
        "_ex_value",
        "bounds",
        "count",
        "counts",
        "max",
        "min",
        "nonfinite_count",
        "sum",
    )

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
        self._no_exemplars()

    def _no_exemplars(self) -> None:
        # Per bucket, its exemplar's fields (trace None: no exemplar), kept as arrays so
        # that a batch updates every bucket in a few vector operations; allocated with the
        # first exemplar (most batch histograms never get one).
        self._ex_value: FloatArray | None = None
        self._ex_time: npt.NDArray[np.int64] | None = None
        self._ex_trace: npt.NDArray[np.object_] | None = None
        self._ex_span: npt.NDArray[np.object_] | None = None

    def _exemplar_arrays(
        self,
    ) -> tuple[FloatArray, npt.NDArray[np.int64], npt.NDArray[np.object_], npt.NDArray[np.object_]]:
        if (
            self._ex_value is None
            or self._ex_time is None
            or self._ex_trace is None
            or self._ex_span is None
        ):
            n = self.counts.size
            self._ex_value = np.zeros(n)
            self._ex_time = np.zeros(n, dtype=np.int64)
            self._ex_trace = np.full(n, None, dtype=object)
            self._ex_span = np.full(n, None, dtype=object)
        return self._ex_value, self._ex_time, self._ex_trace, self._ex_span

    @property
    def exemplars(self) -> list[Exemplar | None]:
        """Per bucket, the newest traced row counted in it (None if none)."""
        if self._ex_trace is None:
            return [None] * self.counts.size
        value, when, trace, span = self._exemplar_arrays()
        return [
            None if trace is None else Exemplar(value, time, trace, span)
            for value, time, trace, span in zip(
                value.tolist(), when.tolist(), trace.tolist(), span.tolist(), strict=True
            )
        ]

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
        h._no_exemplars()
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
        originals = (positions if rows is None else rows[positions]).tolist()
        traces = [trace_ids[row] for row in originals]
        spans = [span_ids[row] for row in originals] if span_ids else [b""] * len(originals)
        traced = [bool(t) for t in traces]
        if not all(traced):
            keep = np.array(traced)
            buckets, positions = buckets[keep], positions[keep]
            traces = [t for t, k in zip(traces, traced, strict=True) if k]
            spans = [s for s, k in zip(spans, traced, strict=True) if k]
        if not traces:
            return
        ex_value, ex_time, ex_trace, ex_span = self._exemplar_arrays()
        ex_value[buckets] = values[positions]
        ex_time[buckets] = time_unix_nano
        ex_trace[buckets] = _objects(traces)
        ex_span[buckets] = _objects(spans)

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
        if other._ex_trace is None:
            return
        theirs = other._exemplar_arrays()
        newer = theirs[2] != None  # noqa: E711 (elementwise, on an object array)
        for mine, their in zip(self._exemplar_arrays(), theirs, strict=True):
            mine[newer] = their[newer]

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


def _objects(items: list[bytes]) -> npt.NDArray[np.object_]:
    """A 1-D object array of ``items`` (np.array would make a bytes array of them)."""
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out
