"""Durable state: the pending-prediction join store (SQLite; see docs/store.md).

writer = GroupCommitPendingPredictions(SqlitePendingPredictions(data_dir / "pending.db"))
store = AsyncPendingPredictions(writer)          # for the asyncio ingest path
await store.put(PendingBatch.from_columns(cols)); joined = await store.take(model, ids)
"""

from agent.store.pending import (
    AsyncPendingPredictions,
    CorruptStoreError,
    GroupCommitPendingPredictions,
    HeldOutcomes,
    JoinedPredictions,
    ModelVersion,
    OrphanOutcomes,
    PendingBatch,
    PendingPredictions,
    StoreClosedError,
    StoreError,
    StoreFullError,
    StoreInUseError,
    StoreSchemaError,
    StoreStats,
    TransactionalPendingPredictions,
)
from agent.store.sqlite import SCHEMA_VERSION, SqlitePendingPredictions

__all__ = [
    "SCHEMA_VERSION",
    "AsyncPendingPredictions",
    "CorruptStoreError",
    "GroupCommitPendingPredictions",
    "HeldOutcomes",
    "JoinedPredictions",
    "ModelVersion",
    "OrphanOutcomes",
    "PendingBatch",
    "PendingPredictions",
    "SqlitePendingPredictions",
    "StoreClosedError",
    "StoreError",
    "StoreFullError",
    "StoreInUseError",
    "StoreSchemaError",
    "StoreStats",
    "TransactionalPendingPredictions",
]
