"""Model performance from outcomes joined to their predictions: streaming, mergeable, bounded.

Keep one ``PerformanceTally`` per model version per window (performance belongs to the
window in which the outcome arrives) and merge windows into totals. Memory is fixed by
the configuration (classes, score bins, segments), never by traffic. Every metric's
definition, exactness and the cases where it is undefined (``None``) are in
docs/performance.md.

    perf = PerformanceTally(positive_class="fraud")
    perf.observe(JoinedPairs(actual_labels=["fraud", "ok"], predicted_labels=["fraud", "fraud"],
                             scores=np.array([0.9, 0.6]), label_delay_s=np.array([30.0, 4000.0])))
    perf.metrics()["accuracy"], perf.metrics()["roc_auc"]   # (0.5, 1.0)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.engine.columns import FloatArray
from agent.engine.histogram import FixedHistogram

OTHER = "other"  # the overflow bucket of classes and segments (as model.OTHER)
# The headline metrics of the report's ``performance`` section (exported as gauges and
# named in health events); the section has more (per class, calibration, delay).
HEADLINE_METRICS = (
    "accuracy",
    "f1_macro",
    "roc_auc",
    "log_loss",
    "brier",
    "mae",
    "rmse",
    "mape",
    "r2",
)
Metrics = dict[str, float | None]
IndexArray = npt.NDArray[np.intp]
BoolArray = npt.NDArray[np.bool_]

# float64 epsilon: scikit-learn's log_loss clip (since 1.5; formerly 1e-15) and MAPE floor.
EPS = float(np.finfo(np.float64).eps)


def _label_delay_bounds() -> tuple[float, ...]:
    # Renard R10 preferred numbers: ten per decade (ratio <= 1.28), readable as bucket bounds.
    mantissas = (1.0, 1.25, 1.6, 2.0, 2.5, 3.15, 4.0, 5.0, 6.3, 8.0)
    bounds = (round(m * 10.0**e, 6) for e in range(7) for m in mantissas)
    return tuple(b for b in bounds if b <= 3.15e6)


# Seconds, 1 s .. 3.15e6 s (36.5 days: beyond the 30 days any pending TTL is likely to keep).
LABEL_DELAY_BOUNDS_S = _label_delay_bounds()


def _defined(value: float) -> float | None:
    """JSON has no NaN or infinity: a metric that is not a finite number is undefined."""
    return value if math.isfinite(value) else None


def _float_column(
    field: str, values: FloatArray | Sequence[float] | None, rows: int
) -> FloatArray | None:
    if values is None:
        return None
    column = np.asarray(values, dtype=np.float64)
    if column.ndim != 1 or column.size != rows:
        raise ValueError(
            f"{field}: expected {rows} values (one per joined pair), got shape {column.shape}"
        )
    return column


@dataclass(frozen=True, slots=True)
class JoinedPairs:
    """N outcomes joined to their predictions, as columns; every given column has N rows.

    Classification pairs carry ``actual_labels``; regression pairs carry ``actual_values``
    and ``predicted_values``. ``label_delay_s`` is outcome time minus prediction time.

    >>> pairs = JoinedPairs(actual_values=np.array([3.0]), predicted_values=np.array([2.5]))
    >>> pairs.rows
    1
    """

    actual_labels: Sequence[str] | None = None
    predicted_labels: Sequence[str] | None = None
    # The positive class's score in [0, 1]; NaN where a prediction carried none.
    scores: FloatArray | None = None
    # rows x len(class_names)
    probabilities: FloatArray | None = None
    class_names: Sequence[str] = ()
    actual_values: FloatArray | None = None
    predicted_values: FloatArray | None = None
    label_delay_s: FloatArray | None = None
    segment: str | None = None

    @property
    def rows(self) -> int:
        if self.actual_labels is not None:
            return len(self.actual_labels)
        if self.actual_values is not None:
            return len(self.actual_values)
        return 0


class ClassificationTally:
    """Classification performance: exact confusion counts, running losses, binned scores.

        tally = ClassificationTally(positive_class="fraud")
        tally.observe(["fraud", "ok"], ["fraud", "fraud"], scores=np.array([0.9, 0.6]))
        tally.metrics()["accuracy"], tally.per_class()["fraud"]["recall"]   # (0.5, 1.0)

    At most ``max_classes`` distinct labels get their own row and column; later ones
    share the ``"other"`` bucket (accuracy stays exact, per-class figures of "other" do not).
    """

    __slots__ = (
        "_binned",
        "_brier_n",
        "_brier_sum",
        "_confusion",
        "_ece",
        "_ece_edges",
        "_full",
        "_labels",
        "_log_loss_n",
        "_log_loss_sum",
        "_score_edges",
        "_slots",
        "_top_label",
        "correct",
        "count",
        "ece_bins",
        "labelled",
        "max_classes",
        "positive_class",
        "score_bins",
        "unscored",
    )

    def __init__(
        self,
        max_classes: int = 50,
        positive_class: str | None = None,
        score_bins: int = 100,
        ece_bins: int = 10,
    ) -> None:
        if max_classes < 1:
            raise ValueError(f"max_classes must be at least 1, got {max_classes}")
        if score_bins < 1:
            raise ValueError(f"score_bins must be at least 1, got {score_bins}")
        if ece_bins < 1:
            raise ValueError(f"ece_bins must be at least 1, got {ece_bins}")
        if positive_class == OTHER:
            raise ValueError(
                f"positive_class must not be {OTHER!r}: that name is the bucket of classes beyond max_classes"
            )
        self.max_classes = max_classes
        self.positive_class = positive_class
        self.score_bins = score_bins
        self.ece_bins = ece_bins
        # Slot 0 is "other"; labels get slots in order of first sight.
        self._labels: list[str] = [OTHER]
        self._slots: dict[str, int] = {OTHER: 0}
        self._full = False
        # Rows: actual label; columns: predicted label.
        self._confusion = np.zeros((1, 1), dtype=np.int64)
        if positive_class is not None:
            self._register([positive_class])
        self.count = 0
        self.labelled = 0
        self.correct = 0
        self.unscored = 0
        self._log_loss_sum = 0.0
        self._log_loss_n = 0
        self._brier_sum = 0.0
        self._brier_n = 0
        # (score bin, is positive) counts; bin i holds scores in (i/B, (i+1)/B], bin 0 also 0.
        self._binned = np.zeros((score_bins, 2), dtype=np.int64)
        # Rows: count, hits, sum of scores; per calibration bin (binary, then top-label).
        self._ece = np.zeros((3, ece_bins), dtype=np.float64)
        self._top_label = np.zeros((3, ece_bins), dtype=np.float64)
        self._score_edges = np.linspace(0.0, 1.0, score_bins + 1)[1:-1]
        self._ece_edges = np.linspace(0.0, 1.0, ece_bins + 1)[1:-1]

    # --- labels -> slots ---------------------------------------------------------------------

    def _register(self, labels: Sequence[str]) -> None:
        slots, names = self._slots, self._labels
        for label in labels:
            if label in slots:
                continue
            if len(names) > self.max_classes:
                self._full = True
                break
            slots[str(label)] = len(names)
            names.append(str(label))
        k = len(names)
        if self._confusion.shape[0] != k:
            grown = np.zeros((k, k), dtype=np.int64)
            old = self._confusion.shape[0]
            grown[:old, :old] = self._confusion
            self._confusion = grown

    def _codes(self, labels: Sequence[str]) -> IndexArray:
        """Each label's slot; unseen labels get one while slots last, then share "other" (0)."""
        slots = self._slots
        if not self._full:
            try:
                return np.array([slots[label] for label in labels], dtype=np.intp)
            except KeyError:
                self._register(sorted(set(labels) - slots.keys()))
        get = slots.get
        return np.array([get(label, 0) for label in labels], dtype=np.intp)

    def _resolve_positive(self, class_names: Sequence[str]) -> None:
        # Without configuration, the second of two probability columns is positive, as in sklearn.
        if self.positive_class is None and len(class_names) == 2 and class_names[1] != OTHER:
            self.positive_class = str(class_names[1])
            self._register([self.positive_class])

    def _is_positive(self, actual_labels: Sequence[str], actual: IndexArray) -> BoolArray:
        positive = self.positive_class
        slot = self._slots.get(positive) if positive is not None else None
        if slot is not None:
            return actual == slot
        return np.array([label == positive for label in actual_labels], dtype=np.bool_)

    def _columns(
        self, actual_labels: Sequence[str], actual: IndexArray, class_names: Sequence[str]
    ) -> IndexArray:
        """The probability column of each row's actual label; -1 if it is not a class name."""
        class_slots = self._codes(class_names)
        if np.all(class_slots != 0):
            lookup = np.full(len(self._labels), -1, dtype=np.intp)
            lookup[class_slots] = np.arange(class_slots.size)
            return lookup[actual]
        columns = {name: i for i, name in enumerate(class_names)}
        return np.array([columns.get(label, -1) for label in actual_labels], dtype=np.intp)

    # --- observing ---------------------------------------------------------------------------

    def observe(
        self,
        actual_labels: Sequence[str],
        predicted_labels: Sequence[str] | None = None,
        *,
        scores: FloatArray | None = None,
        probabilities: FloatArray | None = None,
        class_names: Sequence[str] = (),
    ) -> None:
        """Count one batch of joined pairs.

        Predicted labels come from ``predicted_labels``, else from the argmax of
        ``probabilities``. The binary score is ``scores``, else the positive class's
        probability column. NaN scores and rows of probabilities holding NaN are absent.
        """
        n = len(actual_labels)
        if predicted_labels is not None and len(predicted_labels) != n:
            raise ValueError(
                f"predicted_labels: expected {n} labels (one per actual label), got {len(predicted_labels)}"
            )
        score = _float_column("scores", scores, n)
        probs = self._probabilities(probabilities, class_names, n)
        if n == 0:
            return
        self.count += n
        actual = self._codes(actual_labels)
        valid: BoolArray | None = None  # rows of probabilities without NaN
        if probs is not None:
            self._resolve_positive(class_names)
            columns = self._columns(actual_labels, actual, class_names)
            valid = np.asarray(np.isfinite(probs).all(axis=1), dtype=np.bool_)
            self._observe_probabilities(probs, class_names, columns, valid)
        if predicted_labels is not None:
            predicted = self._codes(predicted_labels)
            self._count_labels(
                actual,
                predicted,
                lambda rows: sum(actual_labels[r] == predicted_labels[r] for r in rows.tolist()),
            )
        elif probs is not None and valid is not None:  # argmax of probabilities
            rows = np.flatnonzero(valid)
            top = probs[rows].argmax(axis=1)
            predicted = self._codes(class_names)[top]
            self._count_labels(
                actual[rows],
                predicted,
                lambda i: sum(
                    actual_labels[r] == class_names[t]
                    for r, t in zip(rows[i].tolist(), top[i].tolist(), strict=True)
                ),
            )
        positive = self.positive_class
        if score is None and probs is not None and positive is not None and positive in class_names:
            score = probs[:, list(class_names).index(positive)]
        if score is not None:
            finite = np.isfinite(score)
            if positive is None:
                # A score cannot be judged without knowing which class it is the score of.
                self.unscored += int(np.count_nonzero(finite))
                return
            hit = self._is_positive(actual_labels, actual)
            if not finite.all():
                score, hit = score[finite], hit[finite]
            self._observe_binary(np.clip(score, 0.0, 1.0), hit, losses=probs is None)

    @staticmethod
    def _probabilities(
        probabilities: FloatArray | None, class_names: Sequence[str], rows: int
    ) -> FloatArray | None:
        if probabilities is None:
            return None
        probs = np.asarray(probabilities, dtype=np.float64)
        if probs.ndim != 2 or probs.shape[0] != rows:
            raise ValueError(
                f"probabilities: expected {rows} rows x {len(class_names)} classes, got shape {probs.shape}"
            )
        if probs.shape[1] != len(class_names) or probs.shape[1] == 0:
            raise ValueError(
                f"class_names: expected one name per probability column ({probs.shape[1]}), got {len(class_names)}"
            )
        if len(set(class_names)) != len(class_names):
            raise ValueError(f"class_names: names must be distinct, got {list(class_names)}")
        return probs

    def _count_labels(
        self, actual: IndexArray, predicted: IndexArray, same_label: Callable[[IndexArray], int]
    ) -> None:
        k = len(self._labels)
        self._confusion += np.bincount(actual * k + predicted, minlength=k * k).reshape(k, k)
        agree = actual == predicted
        self.correct += int(np.count_nonzero(agree & (actual != 0)))
        # Two labels folded into "other" agree only if the strings do: accuracy stays exact.
        ambiguous = np.flatnonzero(agree & (actual == 0))
        if ambiguous.size:
            self.correct += same_label(ambiguous)
        self.labelled += int(actual.size)

    def _observe_probabilities(
        self, probs: FloatArray, class_names: Sequence[str], columns: IndexArray, valid: BoolArray
    ) -> None:
        if not valid.all():
            probs, columns = probs[valid], columns[valid]
        n = columns.size
        if n == 0:
            return
        rows = np.arange(n)
        known = columns >= 0
        p_actual = np.where(known, probs[rows, np.maximum(columns, 0)], 0.0)
        self._log_loss_sum += float(-np.log(np.clip(p_actual, EPS, 1 - EPS)).sum())
        self._log_loss_n += n
        residual = probs.copy()
        residual[rows[known], columns[known]] -= 1.0
        squared = float(np.einsum("ij,ij->", residual, residual))
        # scikit-learn's scale_by_half="auto": two classes give the binary Brier score.
        self._brier_sum += 0.5 * squared if len(class_names) < 3 else squared
        self._brier_n += n
        if len(class_names) >= 3:
            top = probs.argmax(axis=1)
            self._add_calibration(self._top_label, probs[rows, top], top == columns)

    def _observe_binary(self, score: FloatArray, hit: BoolArray, *, losses: bool) -> None:
        bins = np.searchsorted(self._score_edges, score, side="left")
        self._binned += np.bincount(bins * 2 + hit, minlength=2 * self.score_bins).reshape(-1, 2)
        self._add_calibration(self._ece, score, hit)
        if losses:  # from the score only when no probabilities gave them already
            p_actual = np.where(hit, score, 1.0 - score)
            self._log_loss_sum += float(-np.log(np.clip(p_actual, EPS, 1 - EPS)).sum())
            self._log_loss_n += score.size
            residual = score - hit
            self._brier_sum += float(residual @ residual)
            self._brier_n += score.size

    def _add_calibration(self, table: FloatArray, score: FloatArray, hit: BoolArray) -> None:
        # The bins of sklearn.calibration.calibration_curve(strategy="uniform").
        bins = np.searchsorted(self._ece_edges, score, side="left")
        size = self.ece_bins
        table[0] += np.bincount(bins, minlength=size)
        table[1] += np.bincount(bins, weights=hit, minlength=size)
        table[2] += np.bincount(bins, weights=score, minlength=size)

    # --- merging -----------------------------------------------------------------------------

    def merge(self, other: ClassificationTally) -> None:
        """Add ``other``'s counts; its labels take free slots, the rest join "other"."""
        if other is self:
            other = copy.deepcopy(other)
        if (other.score_bins, other.ece_bins) != (self.score_bins, self.ece_bins):
            raise ValueError(
                f"cannot merge tallies with different bins: score_bins {self.score_bins} vs "
                f"{other.score_bins}, ece_bins {self.ece_bins} vs {other.ece_bins}"
            )
        if other.positive_class is not None:
            if self.positive_class is None:
                self.positive_class = other.positive_class
                self._register([other.positive_class])
            elif self.positive_class != other.positive_class:
                raise ValueError(
                    f"cannot merge tallies with different positive_class: "
                    f"{self.positive_class!r} vs {other.positive_class!r}"
                )
        slots = self._codes(other._labels)
        np.add.at(self._confusion, (slots[:, None], slots[None, :]), other._confusion)
        self.count += other.count
        self.labelled += other.labelled
        self.correct += other.correct
        self.unscored += other.unscored
        self._log_loss_sum += other._log_loss_sum
        self._log_loss_n += other._log_loss_n
        self._brier_sum += other._brier_sum
        self._brier_n += other._brier_n
        self._binned += other._binned
        self._ece += other._ece
        self._top_label += other._top_label

    # --- metrics -----------------------------------------------------------------------------

    def _per_slot(self) -> tuple[IndexArray, FloatArray, FloatArray, FloatArray, IndexArray]:
        """Present slots (some actual or predicted count) with precision, recall, F1, support."""
        confusion = self._confusion
        tp = np.diag(confusion).astype(np.float64)
        support = confusion.sum(axis=1)
        predicted = confusion.sum(axis=0)
        present = np.flatnonzero(support + predicted)
        tp, support, predicted = tp[present], support[present], predicted[present]
        # scikit-learn's zero_division=0: a class never predicted has precision 0, not NaN.
        precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
        recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
        both = (support + predicted).astype(np.float64)
        f1 = np.divide(2.0 * tp, both, out=np.zeros_like(tp), where=both > 0)
        return present, precision, recall, f1, support

    def per_class(self) -> dict[str, dict[str, float]]:
        """Precision, recall, F1 and support of every label seen, sorted by label."""
        present, precision, recall, f1, support = self._per_slot()
        labels = self._labels
        rows = {
            labels[slot]: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, slot in enumerate(present.tolist())
        }
        return dict(sorted(rows.items()))

    def roc_auc(self) -> tuple[float | None, float | None]:
        """ROC AUC from the score bins and the bound on its distance to the exact AUC.

        Pairs of a positive and a negative in different bins are ordered exactly; pairs
        in the same bin count one half, which is what the bound adds up.
        """
        negatives = self._binned[:, 0].astype(np.float64)
        positives = self._binned[:, 1].astype(np.float64)
        n_neg, n_pos = float(negatives.sum()), float(positives.sum())
        if n_neg == 0 or n_pos == 0:
            return None, None
        pairs = n_neg * n_pos
        tied = float(positives @ negatives)
        below = np.cumsum(negatives) - negatives
        auc = (float(positives @ below) + 0.5 * tied) / pairs
        return min(max(auc, 0.0), 1.0), 0.5 * tied / pairs

    @staticmethod
    def _calibration_error(table: FloatArray) -> float | None:
        n = float(table[0].sum())
        # Sum over bins of |positive rate - mean score| x bin share = sum |hits - scores| / n.
        return float(np.abs(table[1] - table[2]).sum()) / n if n else None

    def metrics(self) -> Metrics:
        """Every metric by name; ``None`` where it is undefined (see docs/performance.md)."""
        present, precision, recall, f1, _ = self._per_slot()
        labelled = self.labelled
        auc, auc_bound = self.roc_auc()
        scored = int(self._binned.sum())
        ece = self._calibration_error(self._ece) if scored else None
        if ece is None:
            ece = self._calibration_error(self._top_label)
        return {
            "count": self.count,
            "labelled": labelled,
            "scored": scored,
            "accuracy": self.correct / labelled if labelled else None,
            "precision_macro": float(precision.mean()) if present.size else None,
            "recall_macro": float(recall.mean()) if present.size else None,
            "f1_macro": float(f1.mean()) if present.size else None,
            "log_loss": self._log_loss_sum / self._log_loss_n if self._log_loss_n else None,
            "brier": self._brier_sum / self._brier_n if self._brier_n else None,
            "roc_auc": auc,
            "roc_auc_error_bound": auc_bound,
            "ece": ece,
        }


class RegressionTally:
    """Regression performance from running sums; R² from a mergeable mean and M2 (Chan et al.).

        tally = RegressionTally()
        tally.observe(predicted=np.array([2.5, 4.0]), actual=np.array([3.0, 4.0]))
        tally.metrics()["mae"]   # 0.25

    Pairs with a non-finite value are not counted (``nonfinite``); pairs whose actual is
    0 are left out of MAPE only (``mape_excluded``).
    """

    __slots__ = (
        "_m2_actual",
        "_mape_count",
        "_mean_actual",
        "_sum_abs_error",
        "_sum_ape",
        "_sum_error",
        "_sum_squared_error",
        "count",
        "mape_excluded",
        "nonfinite",
    )

    def __init__(self) -> None:
        self.count = 0
        self.nonfinite = 0
        self.mape_excluded = 0
        self._mean_actual = 0.0
        self._m2_actual = 0.0  # sum of squared deviations of actuals from their mean
        self._sum_abs_error = 0.0
        self._sum_squared_error = 0.0
        self._sum_error = 0.0
        self._sum_ape = 0.0
        self._mape_count = 0

    def observe(self, predicted: FloatArray, actual: FloatArray) -> None:
        """Count one batch of (predicted, actual) pairs."""
        actual_col = _float_column("actual", actual, len(actual))
        predicted_col = _float_column("predicted", predicted, len(actual))
        assert actual_col is not None and predicted_col is not None
        finite = np.isfinite(actual_col) & np.isfinite(predicted_col)
        n = int(np.count_nonzero(finite))
        if n != actual_col.size:
            self.nonfinite += actual_col.size - n
            actual_col, predicted_col = actual_col[finite], predicted_col[finite]
        if n == 0:
            return
        error = predicted_col - actual_col
        mean = float(actual_col.mean())
        deviation = actual_col - mean
        self._absorb(n, mean, float(deviation @ deviation))
        abs_error = np.abs(error)
        self._sum_abs_error += float(abs_error.sum())
        self._sum_squared_error += float(error @ error)
        self._sum_error += float(error.sum())
        nonzero = actual_col != 0
        kept = int(np.count_nonzero(nonzero))
        self.mape_excluded += n - kept
        if kept:
            if kept != n:
                abs_error, actual_col = abs_error[nonzero], actual_col[nonzero]
            # sklearn's floor on |actual| (float eps); a ratio past the float range is undefined.
            with np.errstate(over="ignore"):
                ape = abs_error / np.maximum(np.abs(actual_col), EPS)
            self._sum_ape += float(ape.sum())
            self._mape_count += kept

    def _absorb(self, n: int, mean: float, m2: float) -> None:
        # Chan, Golub & LeVeque's parallel update: no catastrophic cancellation at large offsets.
        total = self.count + n
        delta = mean - self._mean_actual
        self._mean_actual += delta * n / total
        self._m2_actual += m2 + delta * delta * self.count * n / total
        self.count = total

    def merge(self, other: RegressionTally) -> None:
        """Add ``other``'s pairs."""
        if other.count:
            self._absorb(other.count, other._mean_actual, other._m2_actual)
        self.nonfinite += other.nonfinite
        self.mape_excluded += other.mape_excluded
        self._sum_abs_error += other._sum_abs_error
        self._sum_squared_error += other._sum_squared_error
        self._sum_error += other._sum_error
        self._sum_ape += other._sum_ape
        self._mape_count += other._mape_count

    def r2(self) -> float | None:
        """1 - SSE / SST; None for fewer than 2 pairs or actuals that do not vary."""
        n = self.count
        # Constant actuals leave only rounding noise in M2, a few ulps of the mean per pair.
        noise = n * (64 * EPS * abs(self._mean_actual)) ** 2
        if n < 2 or self._m2_actual <= noise:
            return None
        return _defined(1.0 - self._sum_squared_error / self._m2_actual)

    def metrics(self) -> Metrics:
        """Every metric by name; ``None`` where it is undefined (see docs/performance.md)."""
        n = self.count
        return {
            "count": n,
            "nonfinite": self.nonfinite,
            "mape_excluded": self.mape_excluded,
            "mae": _defined(self._sum_abs_error / n) if n else None,
            "rmse": _defined(math.sqrt(self._sum_squared_error / n)) if n else None,
            "mape": _defined(self._sum_ape / self._mape_count) if self._mape_count else None,
            "r2": self.r2(),
            "bias": _defined(self._sum_error / n) if n else None,
        }


class LabelDelay:
    """How long outcomes take to arrive: a histogram of seconds from prediction to outcome.

        delay = LabelDelay()
        delay.observe(np.array([12.0, 3600.0, 86400.0]))
        delay.summary()["p50"]   # within one bucket (<= 28 %) of the true median

    Negative delays (outcome stamped before its prediction: clock skew) are counted in
    the lowest bucket and in ``negative``.
    """

    __slots__ = ("histogram", "negative")

    def __init__(self, bounds_s: Sequence[float] = LABEL_DELAY_BOUNDS_S) -> None:
        self.histogram = FixedHistogram(bounds_s)
        self.negative = 0

    def observe(self, delays_s: FloatArray) -> None:
        delays = _float_column("label_delay_s", delays_s, len(delays_s))
        assert delays is not None
        self.negative += int(np.count_nonzero(delays < 0))
        self.histogram.add(delays)

    def merge(self, other: LabelDelay) -> None:
        self.histogram.merge(other.histogram)
        self.negative += other.negative

    def summary(self) -> dict[str, float | None]:
        h = self.histogram
        return {
            "count": h.count,
            "negative": self.negative,
            "p50": h.quantile(0.5),
            "p90": h.quantile(0.9),
            "max": h.max if h.count else None,
        }


class _SegmentTally:
    """The pairs of one segment: classification and/or regression, as the pairs carry."""

    __slots__ = ("classification", "count", "regression")

    def __init__(self) -> None:
        self.count = 0
        self.classification: ClassificationTally | None = None
        self.regression: RegressionTally | None = None

    def observe(
        self, pairs: JoinedPairs, new_classification: Callable[[], ClassificationTally]
    ) -> None:
        if pairs.actual_labels is not None:
            if self.classification is None:
                self.classification = new_classification()
            self.classification.observe(
                pairs.actual_labels,
                pairs.predicted_labels,
                scores=pairs.scores,
                probabilities=pairs.probabilities,
                class_names=pairs.class_names,
            )
        if pairs.actual_values is not None and pairs.predicted_values is not None:
            if self.regression is None:
                self.regression = RegressionTally()
            self.regression.observe(pairs.predicted_values, pairs.actual_values)
        self.count += pairs.rows

    def merge(self, other: _SegmentTally) -> None:
        self.count += other.count
        if other.classification is not None:
            if self.classification is None:
                self.classification = copy.deepcopy(other.classification)
            else:
                self.classification.merge(other.classification)
        if other.regression is not None:
            if self.regression is None:
                self.regression = copy.deepcopy(other.regression)
            else:
                self.regression.merge(other.regression)

    def metrics(self) -> Metrics:
        metrics: Metrics = {}
        if self.classification is not None:
            metrics.update(self.classification.metrics())
        if self.regression is not None:
            metrics.update(self.regression.metrics())
        metrics["count"] = self.count
        return metrics


class PerformanceTally:
    """Performance of one model version over one span of time, overall and per segment.

        perf = PerformanceTally(positive_class="fraud", max_segments=20)
        perf.observe(JoinedPairs(actual_labels=["fraud"], predicted_labels=["ok"], segment="region=eu"))
        perf.report()["segments"]["region=eu"]["accuracy"]   # 0.0

    Pairs with ``actual_labels`` count as classification, pairs with ``actual_values``
    and ``predicted_values`` as regression. The first ``max_segments`` segment keys get
    their own tally; later keys share ``"other"``. Each batch is counted once, in its
    segment's tally; the overall figures merge the segments when asked for.
    """

    __slots__ = (
        "_classification_settings",
        "_segments",
        "label_delay",
        "max_segments",
        "segments_overflowed",
    )

    def __init__(
        self,
        *,
        positive_class: str | None = None,
        max_classes: int = 50,
        score_bins: int = 100,
        ece_bins: int = 10,
        max_segments: int = 20,
    ) -> None:
        if max_segments < 0:
            raise ValueError(f"max_segments must not be negative, got {max_segments}")
        ClassificationTally(max_classes, positive_class, score_bins, ece_bins)  # validates now
        self._classification_settings = (max_classes, positive_class, score_bins, ece_bins)
        self.max_segments = max_segments
        self.segments_overflowed = False
        # "" holds the pairs that carry no segment.
        self._segments: dict[str, _SegmentTally] = {}
        self.label_delay = LabelDelay()

    def _new_classification(self) -> ClassificationTally:
        return ClassificationTally(*self._classification_settings)

    def _segment(self, key: str) -> _SegmentTally:
        segments = self._segments
        part = segments.get(key)
        if part is None:
            named = sum(1 for k in segments if k not in ("", OTHER))
            if key not in ("", OTHER) and named >= self.max_segments:
                self.segments_overflowed = True
                return self._segment(OTHER)
            part = segments[key] = _SegmentTally()
        return part

    def observe(self, pairs: JoinedPairs) -> None:
        """Count one batch of joined pairs (of one segment, or of none)."""
        has_labels = pairs.actual_labels is not None
        has_values = pairs.actual_values is not None and pairs.predicted_values is not None
        if not (has_labels or has_values):
            raise ValueError(
                "pairs: expected actual_labels (classification) or actual_values with "
                "predicted_values (regression)"
            )
        if pairs.label_delay_s is not None and len(pairs.label_delay_s) != pairs.rows:
            raise ValueError(
                f"label_delay_s: expected {pairs.rows} values (one per joined pair), got {len(pairs.label_delay_s)}"
            )
        self._segment(pairs.segment or "").observe(pairs, self._new_classification)
        if pairs.label_delay_s is not None:
            self.label_delay.observe(pairs.label_delay_s)

    def merge(self, other: PerformanceTally) -> None:
        """Add ``other``'s pairs (e.g. a closed window into the totals)."""
        if other is self:
            other = copy.deepcopy(other)
        for key, part in other._segments.items():
            self._segment(key).merge(part)
        self.segments_overflowed |= other.segments_overflowed
        self.label_delay.merge(other.label_delay)

    def _overall(self) -> _SegmentTally:
        parts = list(self._segments.values())
        if len(parts) == 1:
            return parts[0]
        total = _SegmentTally()
        for part in parts:
            total.merge(part)
        return total

    @property
    def kind(self) -> str | None:
        """What the pairs were: "classification", "regression", "mixed", or None (no pairs yet)."""
        parts = self._segments.values()
        labels = any(part.classification is not None for part in parts)
        values = any(part.regression is not None for part in parts)
        if labels and values:
            return "mixed"
        return "classification" if labels else "regression" if values else None

    def metrics(self) -> Metrics:
        """Overall metrics by name (classification or regression ones, as observed)."""
        return self._overall().metrics()

    def per_class(self) -> dict[str, dict[str, float]]:
        classification = self._overall().classification
        return {} if classification is None else classification.per_class()

    def segment_metrics(self) -> dict[str, Metrics]:
        """Metrics of every named segment (pairs without a segment count only overall)."""
        return {key: part.metrics() for key, part in sorted(self._segments.items()) if key}

    def report(self) -> dict[str, Any]:
        """The report's ``performance`` section: metrics, ``per_class`` and ``segments``."""
        overall = self._overall()
        classification = overall.classification
        return {
            "kind": self.kind,
            **overall.metrics(),
            "per_class": {} if classification is None else classification.per_class(),
            "segments": self.segment_metrics(),
        }
