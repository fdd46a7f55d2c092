"""A window's numeric features counted into their reference bins together, in place.

``NumericProfile.bin`` counts one column; a batch of 20 columns through it costs 20
times the Python around one sort. ``NumericTally`` stacks the columns of a batch,
sorts every row in one call, searches each row's probes (``NumericProfile._probes``)
and turns everything after that search into matrix operations on the whole batch,
accumulating into the window's counts in place. ``NumericTally.bins()`` gives the
same ``NumericBins`` per feature as merging ``NumericProfile.bin`` over the batches.

    tally = NumericTally(NumericBlock({"age": age_profile, "income": income_profile}))
    counts = tally.observe({"age": ages, "income": incomes}, rows=1000)  # quality counts
    tally.bins()["age"].psi_counts
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from agent.engine.quality import NumericCounts
from agent.engine.reference import NumericBins, NumericProfile

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
_MAX_PLANS = 64


@dataclass(frozen=True, slots=True, eq=False)
class _Group:
    """Features whose probes have one layout (same numbers of psi and cdf edges)."""

    names: tuple[str, ...]
    probes: FloatArray  # features x probes, rows as NumericProfile._probes
    has_range: npt.NDArray[np.bool_]  # the reference has finite values (a min and max)
    cdf_end: int  # per-bin counts [0, cdf_end) are the cdf bins
    psi_start: int  # [psi_start, psi_end) the psi bins
    psi_end: int


class NumericBlock:
    """The numeric features of one reference, grouped by bin layout (usually one group)."""

    def __init__(self, profiles: Mapping[str, NumericProfile]) -> None:
        layouts: dict[tuple[int, int], list[str]] = {}
        for name, profile in profiles.items():
            layouts.setdefault((profile.cdf_edges.size, profile.psi_edges.size), []).append(name)
        self.groups: list[_Group] = []
        self.where: dict[str, tuple[int, int]] = {}  # name -> (group, row)
        for (cdf, psi), names in layouts.items():
            k = cdf + 2  # -inf, cdf edges, largest: cdf + 1 bins between them
            self.groups.append(
                _Group(
                    tuple(names),
                    np.stack([profiles[n]._probes for n in names]),
                    np.array([profiles[n].min is not None for n in names]),
                    cdf_end=k - 1,
                    psi_start=k,
                    psi_end=k + psi + 1,
                )
            )
            for row, name in enumerate(names):
                self.where[name] = (len(self.groups) - 1, row)


class _Plan(NamedTuple):
    """Which rows of each group a batch with these columns fills, and in which order."""

    # Per group with columns in the batch: (group index, row selector, column names).
    parts: tuple[tuple[int, slice | IntArray, tuple[str, ...]], ...]
    names: tuple[str, ...]


class _Sums:
    """One group's running counts; every field has one row per feature of the group."""

    __slots__ = ("above", "below", "per_bin", "rows", "tails", "total")

    def __init__(self, group: _Group) -> None:
        n = len(group.names)
        # Differences of consecutive probe hits: the cdf and psi bins (and a few unused).
        self.per_bin = np.zeros((n, group.probes.shape[1] - 1), dtype=np.int64)
        # Values <= -inf, <= largest finite, < reference min, <= reference max, not NaN.
        self.tails = np.zeros((n, 5), dtype=np.int64)
        self.rows = np.zeros(n, dtype=np.int64)
        self.below = np.zeros(n)
        self.above = np.zeros(n)
        self.total = np.zeros(n)  # of the finite values


class NumericTally:
    """The counts of one window (or any span) of the block's features. Not thread-safe."""

    def __init__(self, block: NumericBlock) -> None:
        self.block = block
        self._sums = [_Sums(g) for g in block.groups]
        self._plans: dict[tuple[str, ...], _Plan] = {}

    def _plan(self, names: tuple[str, ...]) -> _Plan:
        plan = self._plans.get(names)
        if plan is None:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            rows: dict[int, list[tuple[int, str]]] = {}
            for name in names:
                at = self.block.where.get(name)
                if at is not None:
                    rows.setdefault(at[0], []).append((at[1], name))
            parts = []
            for g, members in rows.items():
                members.sort()
                index = np.array([r for r, _ in members], dtype=np.int64)
                group_size = len(self.block.groups[g].names)
                whole = index.size == group_size  # sorted and unique: every row, in order
                selector: slice | IntArray = slice(None) if whole else index
                parts.append((g, selector, tuple(n for _, n in members)))
            plan = self._plans[names] = _Plan(
                tuple(parts), tuple(n for part in parts for n in part[2])
            )
        return plan

    def observe(self, numbers: Mapping[str, FloatArray], rows: int) -> NumericCounts | None:
        """Count a batch's columns of the block's features (``rows`` values each).

        Returns their missing, non-finite and out-of-range counts for data quality,
        or None when the batch has none of the block's features.
        """
        plan = self._plan(tuple(numbers))
        if not plan.parts or rows == 0:
            return None
        counts = [self._observe_group(g, sel, names, numbers, rows) for g, sel, names in plan.parts]
        if len(counts) == 1:
            return NumericCounts(plan.names, *counts[0])
        missing, nonfinite, out_of_range = (np.concatenate(c) for c in zip(*counts, strict=True))
        return NumericCounts(plan.names, missing, nonfinite, out_of_range)

    def _observe_group(
        self,
        g: int,
        sel: slice | IntArray,
        names: tuple[str, ...],
        numbers: Mapping[str, FloatArray],
        rows: int,
    ) -> tuple[IntArray, IntArray, IntArray]:
        group = self.block.groups[g]
        sums = self._sums[g]
        # One spare column per row: reduceat below needs an index past each row's end.
        values = np.empty((len(names), rows + 1))
        np.stack([numbers[name] for name in names], out=values[:, :rows])
        values[:, rows] = 0.0
        values[:, :rows].sort(axis=1)  # NaN last
        probes = group.probes[sel]
        hits = np.empty(probes.shape, dtype=np.int64)  # values <= each probe
        for r in range(len(names)):
            hits[r] = values[r, :rows].searchsorted(probes[r], side="right")
        sums.per_bin[sel] += hits[:, 1:] - hits[:, :-1]
        j = group.psi_end + 1
        tails = hits[:, j:]
        sums.tails[sel] += tails
        sums.rows[sel] += rows
        first, finite_end, below_min, up_to_max, not_nan = tails.T
        finite = finite_end - first
        at = np.arange(len(names))
        # Sums of the values in the first and last cdf bins (finite, so [first, below_end)
        # and [above_start, finite_end)), by one reduceat over the flattened rows.
        bounds = np.stack((first, hits[:, 1], hits[:, group.cdf_end - 1], finite_end), axis=1)
        bounds += (at * (rows + 1))[:, None]
        with np.errstate(invalid="ignore"):  # spans between the pairs may add inf and -inf
            sums_at = np.add.reduceat(values.ravel(), bounds.ravel())
        empty = bounds[:, 0::2] == bounds[:, 1::2]
        tail_sums = np.where(empty, 0.0, sums_at.reshape(-1, 2, 2)[:, :, 0])
        sums.below[sel] += tail_sums[:, 0]
        sums.above[sel] += tail_sums[:, 1]
        if group.cdf_end > 1:  # the values between the tails, at the odd position between them
            middle = np.where(bounds[:, 1] < bounds[:, 2], sums_at[1::4], 0.0)
            sums.total[sel] += tail_sums[:, 0] + middle + tail_sums[:, 1]
        else:  # one cdf bin: both tails are every finite value
            sums.total[sel] += tail_sums[:, 0]
        missing = rows - not_nan
        out_of_range = np.where(
            group.has_range[sel], (below_min - first) + (finite_end - up_to_max), finite
        )
        return missing, not_nan - finite, out_of_range

    def merge(self, other: NumericTally) -> None:
        """Add ``other``'s counts (a closed window into a longer span); same block only."""
        if other.block is not self.block:
            raise ValueError("cannot merge tallies of different reference blocks")
        for mine, theirs in zip(self._sums, other._sums, strict=True):
            mine.per_bin += theirs.per_bin
            mine.tails += theirs.tails
            mine.rows += theirs.rows
            mine.below += theirs.below
            mine.above += theirs.above
            mine.total += theirs.total

    def means(self) -> dict[str, float]:
        """Per feature with finite values counted, the mean of those values."""
        out: dict[str, float] = {}
        for group, sums in zip(self.block.groups, self._sums, strict=True):
            finite = sums.tails[:, 1] - sums.tails[:, 0]
            for r in np.flatnonzero(finite).tolist():
                out[group.names[r]] = float(sums.total[r] / finite[r])
        return out

    def psi_counts(self) -> dict[str, IntArray]:
        """Per feature of the block, its counts in the psi bins (zeros if never seen)."""
        return {
            name: sums.per_bin[r, group.psi_start : group.psi_end].copy()
            for group, sums in zip(self.block.groups, self._sums, strict=True)
            for r, name in enumerate(group.names)
        }

    def bins(self) -> dict[str, NumericBins]:
        """Per feature seen so far: its counts, as merging ``NumericProfile.bin`` would give."""
        out: dict[str, NumericBins] = {}
        for group, sums in zip(self.block.groups, self._sums, strict=True):
            for r in np.flatnonzero(sums.rows).tolist():
                first, finite_end, below_min, up_to_max, not_nan = sums.tails[r].tolist()
                finite = finite_end - first
                out[group.names[r]] = NumericBins(
                    sums.per_bin[r, group.psi_start : group.psi_end].copy(),
                    sums.per_bin[r, : group.cdf_end].copy(),
                    missing=int(sums.rows[r]) - not_nan,
                    nonfinite=not_nan - finite,
                    out_of_range=(below_min - first) + (finite_end - up_to_max)
                    if group.has_range[r]
                    else finite,
                    below_sum=float(sums.below[r]),
                    above_sum=float(sums.above[r]),
                )
        return out
