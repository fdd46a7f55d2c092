"""Columns handed to the engine: one batch of one model version, already validated.

Receivers (gRPC, HTTP) build these from wire messages; the engine only reads them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class PredictionColumns:
    """N predictions as columns; every non-empty column has ``len(ids)`` rows.

    >>> cols = PredictionColumns("churn", "v1", ids=["a", "b"], received_unix_nano=0,
    ...                          scores=np.array([0.2, 0.9]))
    >>> cols.rows
    2
    """

    model: str
    version: str
    ids: Sequence[str]
    received_unix_nano: int
    timestamps_unix_nano: IntArray | None = None
    numbers: dict[str, FloatArray] = field(default_factory=dict)
    categories: Mapping[str, Sequence[str]] = field(default_factory=dict)
    scores: FloatArray | None = None
    labels: Sequence[str] | None = None
    # rows x len(class_names)
    probabilities: FloatArray | None = None
    class_names: Sequence[str] = ()
    latencies_ms: FloatArray | None = None
    trace_ids: Sequence[bytes] | None = None
    span_ids: Sequence[bytes] | None = None
    attributes: dict[str, str] = field(default_factory=dict)
    # 1 / sample_rate: how many real predictions each row stands for.
    weight: float = 1.0

    @property
    def rows(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, slots=True)
class OutcomeColumns:
    """N outcomes (ground truth) for earlier predictions, joined by model + id."""

    model: str
    version: str
    ids: Sequence[str]
    received_unix_nano: int
    actual_values: FloatArray | None = None
    actual_labels: Sequence[str] | None = None
    timestamps_unix_nano: IntArray | None = None

    @property
    def rows(self) -> int:
        return len(self.ids)
