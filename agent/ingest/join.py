"""The outcome join: predictions kept pending in the durable store, outcomes matched by id.

Orchestrated here, outside the engine (which stays pure): ingest stores each accepted
prediction batch before acknowledging it, takes the predictions an outcome batch names,
and hands joined pairs to the engine per model version.

    joiner = OutcomeJoiner(engine, store, OrphanOutcomes(grace_s=60))
    await joiner.keep_pending(cols)         # before the ack: durable once this returns
    late = await joiner.release_held(cols)  # outcomes that arrived before these predictions
    joined = await joiner.join(outcomes)    # joined pairs -> engine; the rest are held briefly
    joined.trace_id(0), joined.span_id(0)   # the model request of outcome 0's prediction
    await joiner.expire(now)                # unmatched predictions, orphaned outcomes -> engine
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from agent.engine import Engine, JoinedPairs, OutcomeColumns, PredictionColumns
from agent.engine.model import segment_key
from agent.store import AsyncPendingPredictions, JoinedPredictions, OrphanOutcomes, PendingBatch


class OutcomeJoiner:
    """Joins outcomes to pending predictions and feeds the engine's performance tallies."""

    def __init__(
        self, engine: Engine, store: AsyncPendingPredictions, orphans: OrphanOutcomes
    ) -> None:
        self.engine = engine
        self.store = store
        self.orphans = orphans

    async def keep_pending(self, cols: PredictionColumns) -> None:
        await self.store.put(PendingBatch.from_columns(cols))

    async def release_held(self, cols: PredictionColumns) -> JoinedPredictions | None:
        """Outcomes held because their prediction had not arrived: join them now.

        Returns the predictions they joined, or None when no outcome was waiting for these.
        """
        late = self.orphans.match(cols.model, cols.ids)  # no copy: usually nothing is held
        if late.rows == 0:
            return None
        joined = await self.store.take(late.model, late.ids)
        self._observe(
            joined,
            late.actual_values if np.isfinite(late.actual_values).any() else None,
            late.actual_labels if any(late.actual_labels) else None,
            np.where(
                late.timestamps_unix_nano > 0, late.timestamps_unix_nano, late.received_unix_nano
            ),
        )
        return joined

    async def join(self, outcomes: OutcomeColumns) -> JoinedPredictions:
        """Join ``outcomes`` to their predictions; returns them, row i answering outcome i
        (``found`` marks the rows that joined; the others are held as orphans)."""
        joined = await self.store.take(outcomes.model, list(outcomes.ids))
        at = (
            outcomes.timestamps_unix_nano
            if outcomes.timestamps_unix_nano is not None
            else np.full(outcomes.rows, outcomes.received_unix_nano, dtype=np.int64)
        )
        self._observe(joined, outcomes.actual_values, outcomes.actual_labels, at)
        if joined.joined < outcomes.rows:
            self.orphans.hold(outcomes, ~joined.found)
        return joined

    def _observe(
        self,
        joined: JoinedPredictions,
        actual_values: np.ndarray | None,
        actual_labels: Sequence[str] | None,
        outcome_unix_nano: np.ndarray,
    ) -> None:
        predicted_at = np.where(
            joined.timestamps_unix_nano > 0, joined.timestamps_unix_nano, joined.received_unix_nano
        )
        for version, segment, rows in _by_segment(joined):
            scores = joined.scores[rows]
            has_scores = bool(np.isfinite(scores).any())
            labels = [joined.labels[i] for i in rows]
            delay = (outcome_unix_nano[rows] - predicted_at[rows]) / 1e9
            if actual_labels is not None:
                pairs = JoinedPairs(
                    actual_labels=[actual_labels[i] for i in rows],
                    predicted_labels=labels if any(labels) else None,
                    scores=scores if has_scores else None,
                    probabilities=None
                    if joined.probabilities is None
                    else joined.probabilities[rows],
                    class_names=joined.class_names,
                    label_delay_s=delay,
                    segment=segment,
                )
            elif actual_values is not None and has_scores:
                pairs = JoinedPairs(
                    actual_values=np.asarray(actual_values, dtype=np.float64)[rows],
                    predicted_values=scores,
                    label_delay_s=delay,
                    segment=segment,
                )
            else:  # an outcome with neither kind of value for these predictions: nothing to judge
                continue
            self.engine.observe_joined(joined.model, version, pairs)

    async def expire(self, now_unix_nano: int) -> None:
        """Predictions past their TTL never joined (unmatched); held outcomes past their grace
        never found a prediction (orphaned)."""
        for (model, version), count in (await self.store.expire(now_unix_nano)).items():
            self.engine.count_outcome_misses(model, version, unmatched=count)
        for (model, version), count in self.orphans.expire(now_unix_nano).items():
            self.engine.count_outcome_misses(model, version, orphaned=count)

    async def forget(self, model: str) -> int:
        self.orphans.forget(model)
        return await self.store.forget(model)


def _by_segment(joined: JoinedPredictions) -> Iterator[tuple[str, str, np.ndarray]]:
    """The found rows by model version and segment (the prediction batch's attributes, as
    the engine keys prediction segments), so performance is tallied per segment too."""
    for version, _, rows in joined.groups():
        keys: dict[int, str] = {}  # rows of one batch share one attributes mapping
        split: dict[str, list[int]] = {}
        for row in rows.tolist():
            attributes: Mapping[str, str] = joined.attributes[row]
            key = keys.get(id(attributes))
            if key is None:
                key = keys[id(attributes)] = segment_key(attributes)
            split.setdefault(key, []).append(row)
        if len(split) == 1:
            yield version, next(iter(split)), rows
            continue
        for key, part in split.items():
            yield version, key, np.array(part, dtype=rows.dtype)
