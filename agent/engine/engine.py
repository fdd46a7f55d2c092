"""The engine: per model-version state behind one lock. Columns in, numbers out.

engine = Engine(lambda model: ModelConfig(), max_models=100, clock=time.time_ns)
engine.observe_predictions(cols)
engine.report("churn")["totals"]["rows"]
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from agent.engine.columns import OutcomeColumns, PredictionColumns
from agent.engine.model import ModelConfig, ModelSnapshot, ModelState
from agent.engine.performance import JoinedPairs
from agent.engine.reference import ReferenceProfile

ReferenceLookup = Callable[[str, str], ReferenceProfile | None]


class ModelLimitError(ValueError):
    """A new model version would exceed the configured ``max_models``."""


class Engine:
    """Tracks every model version the agent has seen, up to ``max_models``.

    Ingest calls ``observe_*`` from the event loop; exporters call ``snapshots``
    from their own threads, hence the lock (held for microseconds, never across I/O).
    """

    def __init__(
        self,
        config_for: Callable[[str], ModelConfig],
        *,
        max_models: int,
        clock: Callable[[], int],
        reference_for: ReferenceLookup | None = None,
        on_reference: Callable[[ReferenceProfile], None] | None = None,
    ) -> None:
        """``reference_for`` finds a stored reference for a new model version;
        ``on_reference`` is told of each reference built from warm-up traffic (to persist it).
        """
        self._config_for = config_for
        # Pending predictions per (model, version), from the join store when there is one.
        self.pending_for: Callable[[str, str], int] | None = None
        self._reference_for = reference_for
        self._on_reference = on_reference
        self._max_models = max_models
        self._clock = clock
        self._lock = threading.Lock()
        self._states: dict[tuple[str, str], ModelState] = {}
        self._latest_version: dict[str, str] = {}

    def _state(self, model: str, version: str, now: int) -> ModelState:
        key = (model, version)
        state = self._states.get(key)
        if state is None:
            if len(self._states) >= self._max_models:
                raise ModelLimitError(
                    f"model {model!r} version {version!r}: the agent already tracks "
                    f"{len(self._states)} model versions (ingest.max_models={self._max_models})"
                )
            reference = None if self._reference_for is None else self._reference_for(model, version)
            state = ModelState(model, version, self._config_for(model), now, reference)
            self._states[key] = state
        self._latest_version[model] = version
        return state

    def observe_predictions(self, cols: PredictionColumns) -> None:
        with self._lock:
            state = self._state(cols.model, cols.version, cols.received_unix_nano)
            state.observe_predictions(cols)
            built, state.monitor.new_reference = state.monitor.new_reference, None
        if built is not None and self._on_reference is not None:
            self._on_reference(built)

    def set_reference(self, reference: ReferenceProfile) -> None:
        """Judge ``reference.model`` / ``reference.version`` against ``reference`` from now on."""
        with self._lock:
            state = self._state(reference.model, reference.version, self._clock())
            state.monitor.set_reference(reference)

    def reference(self, model: str, version: str | None = None) -> ReferenceProfile | None:
        with self._lock:
            version = self._latest_version.get(model) if version is None else version
            state = None if version is None else self._states.get((model, version))
            return None if state is None else state.monitor.reference

    def observe_joined(self, model: str, version: str, pairs: JoinedPairs) -> None:
        """Outcomes joined to their predictions (by the caller, from the pending store)."""
        with self._lock:
            state = self._state(model, version, self._clock())
            state._roll(self._clock())
            state.monitor.observe_joined(pairs)

    def count_outcome_misses(
        self, model: str, version: str, *, orphaned: int = 0, unmatched: int = 0
    ) -> None:
        """Outcomes with no known prediction (orphaned); predictions never joined (unmatched)."""
        with self._lock:
            state = self._states.get((model, version))
            if state is None:  # e.g. an outcome batch without a version: the latest one
                latest = self._latest_version.get(model)
                state = None if latest is None else self._states.get((model, latest))
            if state is not None:
                state.monitor.orphaned += orphaned
                state.monitor.unmatched += unmatched

    def observe_outcomes(self, cols: OutcomeColumns) -> None:
        with self._lock:
            self._outcome_state(cols).observe_outcomes(cols)

    def admit_outcomes(self, cols: OutcomeColumns) -> None:
        """Raise ``ModelLimitError`` now if counting ``cols`` would need a model version past
        the limit; counts nothing. Ingest calls it before the join and counts after it, so a
        batch refused by the pending store and sent again is counted once."""
        with self._lock:
            self._outcome_state(cols)

    def _outcome_state(self, cols: OutcomeColumns) -> ModelState:
        version = cols.version
        if not version:
            # Outcomes often carry no version: count them with the model's latest one
            # rather than inventing a "" version (their joins go by the prediction's).
            version = self._latest_version.get(cols.model, "")
        return self._state(cols.model, version, cols.received_unix_nano)

    def models(self) -> list[dict[str, object]]:
        with self._lock:
            return [
                {
                    "model": s.model,
                    "version": s.version,
                    "latest": self._latest_version.get(s.model) == s.version,
                    "rows": s.totals.rows,
                    "outcomes": s.totals.outcomes,
                }
                for s in self._states.values()
            ]

    def forget(self, model: str) -> list[str]:
        """Drop every version of ``model``; returns the versions that were tracked."""
        with self._lock:
            versions = [v for (m, v) in self._states if m == model]
            for version in versions:
                del self._states[(model, version)]
            self._latest_version.pop(model, None)
            return versions

    def report(self, model: str, version: str | None = None) -> dict[str, Any] | None:
        """The health report of ``model`` (its latest version by default), or None if unknown."""
        with self._lock:
            if version is None:
                version = self._latest_version.get(model)
                if version is None:
                    return None
            state = self._states.get((model, version))
            report = None if state is None else state.report(self._clock())
        if report is not None and self.pending_for is not None:
            report["outcomes"]["pending"] = self.pending_for(model, version)
        return report

    def snapshots(self) -> list[ModelSnapshot]:
        with self._lock:
            now = self._clock()
            return [state.snapshot(now) for state in self._states.values()]
