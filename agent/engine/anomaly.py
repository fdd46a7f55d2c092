"""Anomaly flags: z-scores of streams of aggregates against their rolling (EWMA) mean and std.

Feed one aggregate per stream per batch or per window (mean score, mean latency, a
feature's mean). Each value is scored against the statistics of the values *before*
it, then folded in, so the baseline adapts: a lasting shift is flagged for a few
observations and then becomes the new normal (how many depends on ``alpha``).

    bank = EwmaBank(["score.mean", "latency.mean"], half_life=12, z_threshold=3.0, warmup=6)
    flags = bank.observe([window_mean_score, window_mean_latency_ms])  # z NaN while warming up
    flags.flagged_names()  # ['latency.mean']

Weights: a value that stands for ``w`` observations (e.g. ``w`` windows elapsed)
moves the statistics as ``w`` identical observations would: ``alpha_w = 1 - (1 - alpha)**w``.
The first observations are averaged with equal weights (``alpha_t = max(alpha_w, w / total
weight)``), so the start is not biased towards the first value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from agent.engine.columns import FloatArray, IntArray

BoolArray = npt.NDArray[np.bool_]
DEFAULT_HALF_LIFE = 20.0


def ewma_alpha(alpha: float | None = None, half_life: float | None = None) -> float:
    """The EWMA smoothing factor, given directly or as a half-life in observations.

    >>> ewma_alpha(half_life=1.0)
    0.5
    >>> ewma_alpha()  # the default half-life of 20 observations
    0.034...
    """
    if alpha is not None and half_life is not None:
        raise ValueError("give alpha or half_life, not both")
    if alpha is not None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha={alpha} must be in (0, 1]")
        return float(alpha)
    if half_life is None:
        half_life = DEFAULT_HALF_LIFE
    if not (math.isfinite(half_life) and half_life > 0):
        raise ValueError(f"half_life={half_life} must be a positive number of observations")
    # After half_life observations, the old mean keeps half its weight.
    return 1.0 - 0.5 ** (1.0 / half_life)


@dataclass(frozen=True, slots=True)
class BankFlags:
    """One observation of every stream of an ``EwmaBank``.

    ``z`` is NaN where a stream was not scored (warming up, or its value was
    NaN/inf) and ±inf where its std was zero and the value moved.
    """

    names: tuple[str, ...]
    z: FloatArray
    flagged: BoolArray

    def flagged_names(self) -> list[str]:
        return [self.names[i] for i in np.flatnonzero(self.flagged).tolist()]

    def to_dict(self) -> dict[str, float | None]:
        """Stream → z, JSON-safe (not scored or infinite: None)."""
        return {
            name: (z if math.isfinite(z) else None)
            for name, z in zip(self.names, self.z.tolist(), strict=True)
        }


class EwmaBank:
    """Rolling EWMA mean and variance of each of several streams, with z-score flags past
    warm-up; one array of values (one per stream) per observation.

    Each stream is independent: its own warm-up, statistics and counts. A NaN or infinite
    value is skipped (neither scored nor folded in, nor counted towards warm-up). With a
    zero std (a so-far constant stream), a value equal to the mean has z 0 and any other
    value z ±inf, flagged: a constant signal that changes is news.

    >>> bank = EwmaBank(["age", "income"], alpha=0.1, warmup=3)
    >>> for means in ([40.0, 50e3], [41.0, 51e3], [39.0, 49e3]):
    ...     _ = bank.observe(means)
    >>> bank.observe([40.5, 90e3]).flagged_names()
    ['income']
    """

    __slots__ = (
        "alpha",
        "anomalies",
        "index",
        "mean",
        "min_std",
        "names",
        "observations",
        "skipped",
        "total_weight",
        "var",
        "warmup",
        "z_threshold",
    )

    def __init__(
        self,
        names: Sequence[str],
        *,
        alpha: float | None = None,
        half_life: float | None = None,
        z_threshold: float = 3.0,
        warmup: int = 20,
        min_std: float = 0.0,
    ) -> None:
        self.names = tuple(names)
        if len(set(self.names)) != len(self.names):
            duplicates = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ValueError(f"names: {duplicates[0]!r} appears more than once")
        self.index = {name: i for i, name in enumerate(self.names)}
        self.alpha = ewma_alpha(alpha, half_life)
        if not (math.isfinite(z_threshold) and z_threshold > 0):
            raise ValueError(f"z_threshold={z_threshold} must be a positive number")
        if warmup < 2:
            # Scoring needs a spread, and a spread needs two values.
            raise ValueError(f"warmup={warmup} must be ≥ 2 observations")
        if not (math.isfinite(min_std) and min_std >= 0):
            raise ValueError(f"min_std={min_std} must be a number ≥ 0")
        self.z_threshold = float(z_threshold)
        self.warmup = warmup
        # A floor under the std, in the stream's unit: differences below it are never news.
        self.min_std = float(min_std)
        k = len(self.names)
        self.mean: FloatArray = np.zeros(k)
        self.var: FloatArray = np.zeros(k)
        self.total_weight: FloatArray = np.zeros(k)
        self.observations: IntArray = np.zeros(k, dtype=np.int64)
        self.skipped: IntArray = np.zeros(k, dtype=np.int64)
        self.anomalies: IntArray = np.zeros(k, dtype=np.int64)

    def observe(self, values: npt.ArrayLike, weight: float | npt.ArrayLike = 1.0) -> BankFlags:
        """Score one value per stream (in ``names`` order), then fold them in."""
        v = np.asarray(values, dtype=np.float64)
        if v.shape != self.mean.shape:
            raise ValueError(
                f"values: shape {v.shape}, expected ({len(self.names)},) (one per name)"
            )
        unit = isinstance(weight, int | float) and weight == 1.0
        if not unit:
            w = np.broadcast_to(np.asarray(weight, dtype=np.float64), v.shape)
            if not (np.isfinite(w).all() and (w > 0).all()):
                raise ValueError("weight must be positive numbers")
        ok = np.isfinite(v)
        all_ok = bool(ok.all())
        diff = v - self.mean
        scored = self.observations >= self.warmup
        if not all_ok:
            # Skipped streams: diff 0 and weight 0 leave their mean and variance as they were.
            diff[~ok] = 0.0
            scored &= ok
            self.skipped += ~ok
        std = np.sqrt(self.var)
        if self.min_std:
            np.maximum(std, self.min_std, out=std)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = diff / std
        zero = std == 0
        if zero.any():
            # Zero std: no move is z 0, any move ±inf.
            z[zero] = np.where(diff[zero] == 0, 0.0, np.copysign(np.inf, diff[zero]))
        if not scored.all():
            z[~scored] = np.nan
        flagged = np.abs(z) > self.z_threshold  # NaN compares False: unscored never flags
        self.anomalies += flagged
        if unit and all_ok:
            self.total_weight += 1.0
            a = np.maximum(self.alpha, 1.0 / self.total_weight)
        else:
            w = np.where(ok, 1.0 if unit else w, 0.0)
            self.total_weight += w
            alpha = np.where(w == 1.0, self.alpha, 1.0 - (1.0 - self.alpha) ** w)
            with np.errstate(divide="ignore", invalid="ignore"):
                a = np.where(ok, np.maximum(alpha, w / self.total_weight), 0.0)
        increment = a * diff
        self.mean += increment
        self.var = (1.0 - a) * (self.var + diff * increment)
        self.observations += ok
        return BankFlags(self.names, z, flagged)

    def observe_mapping(self, values: Mapping[str, float], weight: float = 1.0) -> BankFlags:
        """Like ``observe``, by name; names not given are skipped, unknown names refused."""
        v = np.full(len(self.names), np.nan)
        for name, value in values.items():
            i = self.index.get(name)
            if i is None:
                raise ValueError(f"values[{name!r}]: not a stream of this bank")
            v[i] = value
        return self.observe(v, weight)

    def report(self) -> dict[str, dict[str, float | int | None]]:
        """Per stream: rolling statistics and counts, JSON-safe."""
        std = np.maximum(np.sqrt(self.var), self.min_std)
        return {
            name: {
                "mean": float(self.mean[i]) if self.observations[i] else None,
                "std": float(std[i]) if self.observations[i] else None,
                "observations": int(self.observations[i]),
                "skipped": int(self.skipped[i]),
                "anomalies": int(self.anomalies[i]),
                "warming_up": bool(self.observations[i] < self.warmup),
            }
            for i, name in enumerate(self.names)
        }
