"""The pending-prediction join store: put / take / expire / forget on real SQLite files.

Durability across kill -9 is in test_store_durability.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.engine.columns import OutcomeColumns, PredictionColumns
from agent.store import (
    AsyncPendingPredictions,
    CorruptStoreError,
    GroupCommitPendingPredictions,
    OrphanOutcomes,
    PendingBatch,
    SqlitePendingPredictions,
    StoreClosedError,
    StoreError,
    StoreFullError,
    StoreInUseError,
    StoreSchemaError,
)
from agent.store import sqlite as sqlite_store
from agent.store.sqlite import MIGRATIONS, SCHEMA_VERSION, IdIndex, hash_ids, migrate

SECOND = 1_000_000_000
DAY = 86400 * SECOND
NOW = 1_700_000_000 * SECOND


def make_batch(
    ids: list[str],
    *,
    model: str = "churn",
    version: str = "v1",
    received: int = NOW,
    **columns: Any,
) -> PendingBatch:
    """A batch with scores derived from the ids' position, unless given."""
    columns.setdefault("scores", np.linspace(0.0, 1.0, len(ids)))
    return PendingBatch(model, version, ids=ids, received_unix_nano=received, **columns)


def ids_of(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i}" for i in range(n)]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "data" / "pending.db"


@pytest.fixture
def store(db: Path) -> Iterator[SqlitePendingPredictions]:
    store = SqlitePendingPredictions(db)
    yield store
    store.close()


# -- put and take ---------------------------------------------------------------------------


def test_put_then_take_returns_every_field_of_the_prediction(
    store: SqlitePendingPredictions,
) -> None:
    trace = [bytes(range(i, i + 16)) for i in range(3)]
    span = [bytes(range(i, i + 8)) for i in range(3)]
    store.put(
        make_batch(
            ["a", "b", "c"],
            version="v7",
            received=NOW + 5,
            timestamps_unix_nano=np.array([NOW - 3, NOW - 2, NOW - 1]),
            scores=np.array([0.1, np.nan, 0.9]),
            labels=["yes", "no", "yes"],
            probabilities=np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8]]),
            class_names=("yes", "no"),
            trace_ids=trace,
            span_ids=span,
            attributes={"region": "eu", "tier": "gold"},
            weight=4.0,
        )
    )

    joined = store.take("churn", ["c", "a"])

    assert joined.found.tolist() == [True, True]
    assert joined.versions == ["v7", "v7"]
    assert joined.received_unix_nano.tolist() == [NOW + 5, NOW + 5]
    assert joined.timestamps_unix_nano.tolist() == [NOW - 1, NOW - 3]
    assert joined.scores.tolist() == [0.9, 0.1]
    assert joined.labels == ["yes", "yes"]
    assert joined.class_names == ("yes", "no")
    assert joined.probabilities is not None
    assert joined.probabilities.tolist() == [[0.2, 0.8], [0.9, 0.1]]
    assert [joined.trace_id(0), joined.trace_id(1)] == [trace[2], trace[0]]
    assert [joined.span_id(0), joined.span_id(1)] == [span[2], span[0]]
    assert [dict(a) for a in joined.attributes] == [{"region": "eu", "tier": "gold"}] * 2
    assert joined.weights.tolist() == [4.0, 4.0]


def test_a_nan_score_is_kept_as_nan(store: SqlitePendingPredictions) -> None:
    store.put(make_batch(["a"], scores=np.array([np.nan])))
    joined = store.take("churn", ["a"])
    assert joined.found[0] and np.isnan(joined.scores[0])


def test_take_of_unknown_ids_reports_them_as_orphans_with_fill_values(
    store: SqlitePendingPredictions,
) -> None:
    store.put(make_batch(["a"], labels=["x"], trace_ids=[b"\x01" * 16]))

    joined = store.take("churn", ["nope", "a", "never"])

    assert joined.found.tolist() == [False, True, False]
    assert joined.joined == 1
    assert np.isnan(joined.scores[[0, 2]]).all()
    assert [joined.labels[0], joined.versions[0]] == ["", ""]
    assert joined.trace_id(0) == b"" and joined.trace_id(1) == b"\x01" * 16
    assert joined.received_unix_nano[0] == 0 and joined.attributes[0] == {}


def test_take_for_a_model_never_seen_finds_nothing(store: SqlitePendingPredictions) -> None:
    joined = store.take("unknown-model", ["a", "b"])
    assert joined.found.tolist() == [False, False]


def test_take_answers_row_by_row_across_many_batches(store: SqlitePendingPredictions) -> None:
    for k in range(40):
        ids = ids_of(f"b{k}", 50)
        store.put(make_batch(ids, scores=np.array([k * 1000 + i for i in range(50)], float)))
    rng = np.random.default_rng(7)
    wanted = [f"b{k}-{i}" for k in range(40) for i in range(50)]
    rng.shuffle(wanted)

    joined = store.take("churn", wanted)

    assert joined.found.all()
    expected = [int(w[1:].split("-")[0]) * 1000 + int(w.split("-")[1]) for w in wanted]
    assert joined.scores.tolist() == expected
    assert store.pending_count() == 0


def test_partial_take_leaves_the_rest_pending(store: SqlitePendingPredictions) -> None:
    store.put(make_batch(ids_of("p", 10), labels=[f"l{i}" for i in range(10)]))

    first = store.take("churn", ["p-3", "p-7"])
    rest = store.take("churn", ids_of("p", 10))

    assert first.found.all()
    assert rest.found.tolist() == [i not in (3, 7) for i in range(10)]
    assert rest.labels == [f"l{i}" if i not in (3, 7) else "" for i in range(10)]
    assert store.pending_count() == 0
    assert store.stats().batches == 0


def test_a_prediction_joins_only_one_outcome(store: SqlitePendingPredictions) -> None:
    store.put(make_batch(["a", "b"]))
    assert store.take("churn", ["a"]).found.tolist() == [True]
    assert store.take("churn", ["a", "b"]).found.tolist() == [False, True]


def test_an_id_repeated_in_one_take_joins_once(store: SqlitePendingPredictions) -> None:
    store.put(make_batch(["a", "b"]))
    joined = store.take("churn", ["a", "a", "b"])
    assert joined.found.tolist() == [True, False, True]
    assert store.pending_count() == 0


def test_joined_rows_split_by_version_and_segment(store: SqlitePendingPredictions) -> None:
    store.put(make_batch(["a", "b"], version="v1", attributes={"region": "eu"}))
    store.put(make_batch(["c"], version="v2", attributes={"region": "us"}))
    store.put(make_batch(["d"], version="v1"))

    joined = store.take("churn", ["c", "a", "zz", "d", "b"])
    groups = {(v, s): rows.tolist() for v, s, rows in joined.groups("region")}

    assert groups == {("v2", "us"): [0], ("v1", "eu"): [1, 4], ("v1", None): [3]}
    assert {v: rows.tolist() for v, _, rows in joined.groups()} == {"v2": [0], "v1": [1, 3, 4]}


def test_columns_not_sent_come_back_as_fill_values(store: SqlitePendingPredictions) -> None:
    store.put(PendingBatch("churn", "v1", ids=["a"], received_unix_nano=NOW))
    joined = store.take("churn", ["a"])
    assert joined.found[0]
    assert np.isnan(joined.scores[0]) and joined.labels == [""]
    assert joined.probabilities is None and joined.class_names == ()
    assert joined.timestamps_unix_nano[0] == 0 and joined.trace_id(0) == b""


def test_empty_trace_and_span_ids_mean_none(store: SqlitePendingPredictions) -> None:
    store.put(make_batch(["a", "b"], trace_ids=[b"", b"\x02" * 16], span_ids=[b"\x03" * 8, b""]))
    joined = store.take("churn", ["a", "b"])
    assert [joined.trace_id(0), joined.trace_id(1)] == [b"", b"\x02" * 16]
    assert [joined.span_id(0), joined.span_id(1)] == [b"\x03" * 8, b""]


def test_probabilities_of_batches_with_other_class_orders_align_by_class_name(
    store: SqlitePendingPredictions,
) -> None:
    store.put(make_batch(["a"], probabilities=np.array([[0.7, 0.3]]), class_names=("cat", "dog")))
    store.put(
        make_batch(
            ["b"], probabilities=np.array([[0.1, 0.6, 0.3]]), class_names=("dog", "cat", "eel")
        )
    )
    store.put(make_batch(["c"]))

    joined = store.take("churn", ["a", "b", "c"])

    assert joined.class_names == ("cat", "dog", "eel")
    assert joined.probabilities is not None
    np.testing.assert_array_equal(
        joined.probabilities, [[0.7, 0.3, np.nan], [0.6, 0.1, 0.3], [np.nan] * 3]
    )


def test_non_ascii_ids_and_labels_round_trip(store: SqlitePendingPredictions) -> None:
    ids = ["café-1", "日本-2", "plain", "emoji-🙂"]
    store.put(make_batch(ids, labels=["é", "", "ascii", "🙂🙂"]))

    joined = store.take("churn", list(reversed(ids)))

    assert joined.found.all()
    assert joined.labels == ["🙂🙂", "ascii", "", "é"]


def test_the_same_id_in_two_models_is_two_predictions(store: SqlitePendingPredictions) -> None:
    store.put(make_batch(["a"], model="churn", scores=np.array([0.1])))
    store.put(make_batch(["a"], model="fraud", scores=np.array([0.9])))

    assert store.take("fraud", ["a"]).scores.tolist() == [0.9]
    assert store.take("churn", ["a"]).scores.tolist() == [0.1]


def test_a_batch_from_prediction_columns_keeps_outputs_not_features(
    store: SqlitePendingPredictions,
) -> None:
    cols = PredictionColumns(
        "churn",
        "v2",
        ids=["a", "b"],
        received_unix_nano=NOW,
        numbers={"age": np.array([31.0, 40.0])},
        categories={"city": ["Oslo", "Rome"]},
        scores=np.array([0.25, 0.75]),
        labels=["stay", "leave"],
        attributes={"region": "eu"},
        weight=2.0,
    )
    store.put(PendingBatch.from_columns(cols))

    joined = store.take("churn", ["b"])

    assert (joined.scores[0], joined.labels[0], joined.versions[0]) == (0.75, "leave", "v2")
    assert joined.weights[0] == 2.0 and dict(joined.attributes[0]) == {"region": "eu"}
    store.put(PendingBatch.from_columns(cols))  # the whole batch again, still pending
    files = [store.path, Path(f"{store.path}-wal")]
    content = b"".join(path.read_bytes() for path in files if path.exists())
    assert b"leave" in content  # outputs are stored ...
    assert b"Oslo" not in content and b"Rome" not in content  # ... feature values never


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"scores": np.array([0.1])}, "scores has 1 values, expected 2"),
        ({"labels": ["x"]}, "labels has 1 values, expected 2"),
        ({"probabilities": np.ones((2, 3)), "class_names": ("a", "b")}, "shape (2, 3)"),
        ({"weight": 0.0}, "weight 0.0 must be positive"),
    ],
)
def test_a_malformed_batch_is_refused_naming_model_and_column(
    columns: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match="model 'churn'") as raised:
        PendingBatch("churn", "v1", ids=["a", "b"], received_unix_nano=NOW, **columns)
    assert message in str(raised.value)


def test_trace_ids_of_the_wrong_size_are_refused_naming_the_row(
    store: SqlitePendingPredictions,
) -> None:
    with pytest.raises(ValueError, match="row 1: 3 bytes, expected 16"):
        store.put(make_batch(["a", "b"], trace_ids=[b"", b"abc"]))
    assert store.pending_count() == 0


def test_a_batch_larger_than_one_stored_row_is_split_and_joins_whole(
    store: SqlitePendingPredictions, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "MAX_STORED_ROWS", 64)
    ids = ids_of("big", 150)
    store.put(make_batch(ids, labels=[str(i) for i in range(150)]))

    assert store.stats().batches == 3
    joined = store.take("churn", ids[::-1])
    assert joined.found.all()
    assert joined.labels == [str(i) for i in reversed(range(150))]


# -- duplicates -----------------------------------------------------------------------------


def test_a_duplicate_id_replaces_the_older_prediction(store: SqlitePendingPredictions) -> None:
    store.put(make_batch(["a", "b"], version="v1", scores=np.array([0.1, 0.2])))
    store.put(make_batch(["a"], version="v2", scores=np.array([0.9])))

    assert store.pending_count() == 2
    assert store.stats().replaced == 1
    joined = store.take("churn", ["a", "b"])
    assert joined.scores.tolist() == [0.9, 0.2]
    assert joined.versions == ["v2", "v1"]
    assert store.take("churn", ["a"]).found.tolist() == [False]


def test_a_duplicate_id_within_one_batch_keeps_the_later_row(
    store: SqlitePendingPredictions,
) -> None:
    store.put(make_batch(["a", "b", "a"], scores=np.array([0.1, 0.2, 0.3])))

    assert store.pending_count() == 2
    joined = store.take("churn", ["a", "b"])
    assert joined.scores.tolist() == [0.3, 0.2]
    assert store.stats().batches == 0


def test_a_replaced_prediction_stays_replaced_after_reopen(db: Path) -> None:
    store = SqlitePendingPredictions(db)
    store.put(make_batch(["a", "b"], scores=np.array([0.1, 0.2])))
    store.put(make_batch(["a"], scores=np.array([0.9])))
    store.close()

    store = SqlitePendingPredictions(db)
    try:
        assert store.pending_count() == 2
        assert store.take("churn", ["a", "b"]).scores.tolist() == [0.9, 0.2]
    finally:
        store.close()


# -- expiry, eviction, forget ---------------------------------------------------------------


def test_expire_counts_predictions_past_the_ttl_as_unmatched_per_model_and_version(
    db: Path,
) -> None:
    store = SqlitePendingPredictions(db, ttl_s=3600)
    try:
        store.put(make_batch(ids_of("old", 3), version="v1", received=NOW))
        store.put(make_batch(ids_of("old2", 2), model="fraud", version="v9", received=NOW + 1))
        store.put(make_batch(ids_of("new", 4), version="v1", received=NOW + 3000 * SECOND))
        store.take("churn", ["old-0"])

        unmatched = store.expire(NOW + 3601 * SECOND + 1)

        assert unmatched == {("churn", "v1"): 2, ("fraud", "v9"): 2}
        assert store.pending_count() == 4
        assert store.take("churn", ["old-1", "new-0"]).found.tolist() == [False, True]
        assert store.expire(NOW + 3601 * SECOND + 1) == {}
        assert store.stats().expired == 4
    finally:
        store.close()


def test_expire_keeps_predictions_within_the_ttl(store: SqlitePendingPredictions) -> None:
    store.put(make_batch(ids_of("a", 5), received=NOW))
    assert store.expire(NOW + 7 * DAY - 1) == {}
    assert store.pending_count() == 5
    assert store.expire(NOW + 7 * DAY + 1) == {("churn", "v1"): 5}


def test_max_pending_evicts_the_oldest_batches_and_reports_them_as_unmatched(db: Path) -> None:
    store = SqlitePendingPredictions(db, max_pending=25)
    try:
        for k in range(4):
            store.put(make_batch(ids_of(f"b{k}", 10), version=f"v{k}"))

        assert store.pending_count() == 20
        assert store.take("churn", ["b0-0", "b1-0", "b3-9"]).found.tolist() == [False, False, True]
        assert store.expire(NOW) == {("churn", "v0"): 10, ("churn", "v1"): 10}
        assert store.stats().evicted == 20
    finally:
        store.close()


def test_eviction_is_global_oldest_first_across_models(db: Path) -> None:
    store = SqlitePendingPredictions(db, max_pending=10)
    try:
        store.put(make_batch(ids_of("x", 6), model="churn"))
        store.put(make_batch(ids_of("y", 6), model="fraud"))

        assert store.pending_count("churn") == 0
        assert store.pending_count("fraud") == 6
        assert store.expire(NOW) == {("churn", "v1"): 6}
    finally:
        store.close()


def test_evicted_and_expired_predictions_stay_gone_after_reopen(db: Path) -> None:
    store = SqlitePendingPredictions(db, max_pending=15, ttl_s=60)
    store.put(make_batch(ids_of("a", 10), received=NOW))
    store.put(make_batch(ids_of("b", 10), received=NOW + 30 * SECOND))
    store.put(make_batch(ids_of("c", 5), received=NOW + 90 * SECOND))
    store.expire(NOW + 91 * SECOND)
    store.close()

    store = SqlitePendingPredictions(db, max_pending=15, ttl_s=60)
    try:
        assert store.pending_count() == 5
        found = store.take("churn", ["a-0", "b-0", "c-0"]).found.tolist()
        assert found == [False, False, True]
    finally:
        store.close()


def test_forget_drops_only_that_model_without_counting_it_unmatched(
    store: SqlitePendingPredictions,
) -> None:
    store.put(make_batch(ids_of("a", 5), model="churn"))
    store.put(make_batch(ids_of("a", 3), model="fraud"))

    assert store.forget("churn") == 5

    assert store.pending_count("churn") == 0
    assert store.pending_count("fraud") == 3
    assert store.take("churn", ["a-0"]).found.tolist() == [False]
    assert store.expire(NOW + 8 * DAY) == {("fraud", "v1"): 3}


def test_a_forgotten_model_can_start_again(store: SqlitePendingPredictions) -> None:
    store.put(make_batch(["a"], scores=np.array([0.1])))
    store.forget("churn")
    store.put(make_batch(["a"], scores=np.array([0.5])))
    assert store.take("churn", ["a"]).scores.tolist() == [0.5]


# -- persistence and files ------------------------------------------------------------------


def test_pending_predictions_survive_close_and_reopen(db: Path) -> None:
    store = SqlitePendingPredictions(db)
    store.put(make_batch(ids_of("a", 6), labels=list("uvwxyz"), trace_ids=[b"\x07" * 16] * 6))
    store.put(make_batch(ids_of("b", 3), model="fraud", version="v3"))
    store.take("churn", ["a-1", "a-4"])
    store.close()

    store = SqlitePendingPredictions(db)
    try:
        assert store.pending_count() == 7
        assert store.pending_by_version() == {("churn", "v1"): 4, ("fraud", "v3"): 3}
        joined = store.take("churn", ids_of("a", 6))
        assert joined.found.tolist() == [True, False, True, True, False, True]
        assert [joined.labels[i] for i in (0, 2, 3, 5)] == list("uwxz")
        assert joined.trace_id(0) == b"\x07" * 16
        assert store.take("fraud", ids_of("b", 3)).versions == ["v3"] * 3
    finally:
        store.close()


def test_a_second_store_on_the_same_file_is_refused(store: SqlitePendingPredictions) -> None:
    with pytest.raises(StoreInUseError, match=str(store.path)) as raised:
        SqlitePendingPredictions(store.path, lock_timeout_s=0.1)
    assert "in use by another process" in str(raised.value)


def test_a_file_that_is_not_a_database_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "pending.db"
    path.write_bytes(b"this is not sqlite " * 200)
    with pytest.raises(CorruptStoreError, match=str(path)):
        SqlitePendingPredictions(path)


def test_another_programs_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER)")
    conn.close()
    with pytest.raises(CorruptStoreError, match="not an mlsidecar pending store"):
        SqlitePendingPredictions(path)


def test_calls_after_close_raise_store_closed_error(db: Path) -> None:
    store = SqlitePendingPredictions(db)
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreClosedError, match=str(db)):
        store.put(make_batch(["a"]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ttl_s": 0}, "ttl_s must be a positive"),
        ({"max_pending": 0}, "max_pending must be at least 1"),
        ({"synchronous": "SOMETIMES"}, "synchronous must be one of OFF, NORMAL, FULL, EXTRA"),
        ({"max_db_bytes": 10}, "max_db_bytes must be at least"),
    ],
)
def test_bad_settings_are_refused_with_the_reason(
    db: Path, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        SqlitePendingPredictions(db, **kwargs)


def test_pending_counts_by_model_and_version(store: SqlitePendingPredictions) -> None:
    store.put(make_batch(ids_of("a", 3), version="v1"))
    store.put(make_batch(ids_of("b", 2), version="v2"))
    store.put(make_batch(ids_of("c", 4), model="fraud", version="v1"))
    assert store.pending_count() == 9
    assert store.pending_count("churn") == 5
    assert store.pending_count("churn", "v2") == 2
    assert store.pending_count(version="v1") == 7


def test_stats_report_sizes_and_counts(store: SqlitePendingPredictions) -> None:
    store.put(make_batch(ids_of("a", 100)))
    stats = store.stats()
    assert (stats.pending, stats.batches) == (100, 1)
    assert stats.index_bytes > 0 and stats.file_bytes > 0


# -- schema versions, migrations, corruption ------------------------------------------------


def _version_in_file(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT version FROM schema_version").fetchone()[0])
    finally:
        conn.close()


def test_a_new_file_gets_the_current_schema_version(store: SqlitePendingPredictions) -> None:
    store.close()
    assert _version_in_file(store.path) == SCHEMA_VERSION


def test_a_version_0_file_is_upgraded_on_open(tmp_path: Path) -> None:
    # A file left by an interrupted first start: the version table exists, nothing else.
    path = tmp_path / "pending.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (0)")
    conn.close()

    store = SqlitePendingPredictions(path)
    store.put(make_batch(["a"]))
    store.close()

    assert _version_in_file(path) == SCHEMA_VERSION
    reopened = SqlitePendingPredictions(path)
    assert reopened.take("churn", ["a"]).found.tolist() == [True]
    reopened.close()


def test_migrations_apply_in_order_and_keep_pending_predictions(tmp_path: Path) -> None:
    path = tmp_path / "pending.db"
    store = SqlitePendingPredictions(path)
    store.put(make_batch(ids_of("a", 3)))
    store.close()
    applied: list[str] = []

    def v2_add_note(conn: sqlite3.Connection) -> None:
        applied.append("v2")
        conn.execute("ALTER TABLE batches ADD COLUMN note TEXT")

    def v3_fill_note(conn: sqlite3.Connection) -> None:
        applied.append("v3")
        conn.execute("UPDATE batches SET note = 'migrated'")

    with sqlite3.connect(path, isolation_level=None) as conn:
        assert migrate(conn, str(path), (*MIGRATIONS, v2_add_note, v3_fill_note)) == 3
        assert applied == ["v2", "v3"]
        assert conn.execute("SELECT note, remaining FROM batches").fetchall() == [("migrated", 3)]
        assert migrate(conn, str(path), (*MIGRATIONS, v2_add_note, v3_fill_note)) == 3
        assert applied == ["v2", "v3"]  # nothing runs twice
    conn.close()
    assert _version_in_file(path) == 3


def test_a_failing_migration_leaves_the_file_at_the_last_good_version(tmp_path: Path) -> None:
    path = tmp_path / "pending.db"
    SqlitePendingPredictions(path).close()

    def v2_broken(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE batches ADD COLUMN half_done TEXT")
        conn.execute("SELECT * FROM no_such_table")

    conn = sqlite3.connect(path, isolation_level=None)
    with pytest.raises(StoreSchemaError, match=r"from schema version 1 to 2 failed") as raised:
        migrate(conn, str(path), (*MIGRATIONS, v2_broken))
    assert str(path) in str(raised.value)
    columns = [row[1] for row in conn.execute("PRAGMA table_info(batches)")]
    conn.close()
    assert "half_done" not in columns
    assert _version_in_file(path) == 1


def test_a_file_from_a_newer_mlsidecar_is_refused_naming_file_and_versions(db: Path) -> None:
    SqlitePendingPredictions(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    conn.close()

    with pytest.raises(StoreSchemaError) as raised:
        SqlitePendingPredictions(db)

    message = str(raised.value)
    assert str(db) in message
    assert (
        f"schema version 99 is newer than this mlsidecar understands (up to {SCHEMA_VERSION})"
        in message
    )


def _update(path: Path, sql: str, *params: Any) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(sql, params)
    conn.close()


def _first_chunk(path: Path) -> bytes:
    conn = sqlite3.connect(path)
    try:
        return bytes(conn.execute("SELECT data FROM chunks ORDER BY chunk_key").fetchone()[0])
    finally:
        conn.close()


def test_a_garbled_chunk_is_reported_at_open_naming_file_batch_and_model(db: Path) -> None:
    store = SqlitePendingPredictions(db)
    store.put(make_batch(ids_of("a", 4)))
    store.close()
    _update(db, "UPDATE chunks SET data = ?", b"garbage")

    with pytest.raises(CorruptStoreError) as raised:
        SqlitePendingPredictions(db)

    message = str(raised.value)
    assert str(db) in message and "batch 1 (rows from 0) of model 'churn'" in message
    assert "move the file away" in message


def test_a_flipped_byte_in_a_stored_chunk_is_caught_by_its_crc(db: Path) -> None:
    store = SqlitePendingPredictions(db)
    store.put(make_batch(ids_of("a", 4), scores=np.array([0.1, 0.2, 0.3, 0.4])))
    store.close()
    data = bytearray(_first_chunk(db))
    data[-5] ^= 0x40  # inside the last score: the ids still read fine
    _update(db, "UPDATE chunks SET data = ?", bytes(data))

    with pytest.raises(CorruptStoreError, match="CRC mismatch"):
        SqlitePendingPredictions(db)


def test_corrupt_batch_metadata_is_reported_at_take_and_nothing_is_removed(db: Path) -> None:
    store = SqlitePendingPredictions(db)
    store.put(make_batch(ids_of("a", 4)))
    store.close()
    _update(db, "UPDATE batches SET meta = '{not json'")

    store = SqlitePendingPredictions(db)
    try:
        with pytest.raises(
            CorruptStoreError, match=r"batch 1 of model 'churn' is unreadable: meta"
        ):
            store.take("churn", ["a-0"])
        assert store.pending_count() == 4
    finally:
        store.close()


def test_metadata_that_disagrees_with_the_stored_columns_is_refused_at_take(db: Path) -> None:
    store = SqlitePendingPredictions(db)
    store.put(make_batch(["a"], probabilities=np.array([[0.3, 0.7]]), class_names=("x", "y")))
    store.close()
    _update(db, 'UPDATE batches SET meta = replace(meta, \'"x","y"\', \'"x","y","z"\')')

    store = SqlitePendingPredictions(db)
    try:
        with pytest.raises(CorruptStoreError, match="probabilities: not 24 bytes a row"):
            store.take("churn", ["a"])
        assert store.pending_count() == 1
    finally:
        store.close()


def test_a_payload_in_a_future_format_names_the_format_version(db: Path) -> None:
    store = SqlitePendingPredictions(db)
    store.put(make_batch(ids_of("a", 2)))
    store.close()
    data = _first_chunk(db)
    _update(db, "UPDATE chunks SET data = ?", data[:4] + b"\x09" + data[5:])

    with pytest.raises(CorruptStoreError, match="payload format 9 is not one this mlsidecar reads"):
        SqlitePendingPredictions(db)


def test_rows_spread_over_many_chunks_join_and_reload(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "CHUNK_BYTES", 200)  # a few rows to a chunk
    store = SqlitePendingPredictions(db)
    ids = ids_of("c", 50)
    store.put(make_batch(ids, labels=[f"l{i}" for i in range(50)], trace_ids=[b"\x05" * 16] * 50))
    picked = ids[3:50:7]
    assert store.take("churn", picked).labels == [f"l{i}" for i in range(3, 50, 7)]
    store.close()

    monkeypatch.setattr(sqlite_store, "CHUNK_BYTES", 15_800)  # the file says how it was chunked
    store = SqlitePendingPredictions(db)
    try:
        rest = [i for i in ids if i not in picked]
        joined = store.take("churn", rest)
        assert joined.found.all()
        assert joined.labels == [f"l{int(i[2:])}" for i in rest]
        assert joined.trace_id(len(rest) - 1) == b"\x05" * 16
    finally:
        store.close()


# -- full disk ------------------------------------------------------------------------------


def test_a_full_store_raises_store_full_error_and_keeps_what_was_stored(db: Path) -> None:
    # max_db_bytes sets SQLite's max_page_count: the same SQLITE_FULL as a full disk.
    store = SqlitePendingPredictions(db, max_db_bytes=256 * 1024)
    acked: list[list[str]] = []
    with pytest.raises(StoreFullError) as raised:
        for k in range(1000):
            ids = ids_of(f"b{k}", 200)
            store.put(make_batch(ids, labels=["label"] * 200, trace_ids=[b"\x01" * 16] * 200))
            acked.append(ids)
    assert str(db) in str(raised.value) and "full" in str(raised.value)
    assert len(acked) >= 3
    assert store.pending_count() == 200 * len(acked)
    # Room freed by joins is reused: the store keeps working after the error.
    assert store.take("churn", acked.pop(0)).found.all()
    store.close()

    store = SqlitePendingPredictions(db, max_db_bytes=256 * 1024)
    try:
        assert store.pending_count() == 200 * len(acked)
        for ids in acked:
            assert store.take("churn", ids).found.all()
    finally:
        store.close()


# -- group commit, threads, asyncio ---------------------------------------------------------


@pytest.fixture
def writer(db: Path) -> Iterator[GroupCommitPendingPredictions]:
    writer = GroupCommitPendingPredictions(SqlitePendingPredictions(db))
    yield writer
    writer.close()


def _hold_writer(writer: GroupCommitPendingPredictions) -> threading.Event:
    """Block the writer thread until the returned event is set (so calls queue up)."""
    release = threading.Event()
    started = threading.Event()

    def wait(_: Any) -> None:
        started.set()
        release.wait(10)

    writer.submit(wait)
    assert started.wait(10)
    return release


def test_puts_queued_while_the_writer_is_busy_share_one_commit(
    writer: GroupCommitPendingPredictions,
) -> None:
    release = _hold_writer(writer)
    futures = [
        writer.submit(lambda s, k=k: s.put(make_batch(ids_of(f"b{k}", 5)))) for k in range(20)
    ]
    commits = writer.commits
    release.set()
    for future in futures:
        future.result(10)

    assert writer.commits == commits + 2  # the held call's group, then all 20 puts together
    assert writer.pending_count() == 100


def test_a_failing_call_in_a_group_undoes_only_itself(
    writer: GroupCommitPendingPredictions,
) -> None:
    release = _hold_writer(writer)
    # Fails after its batch row is written (while packing the trace ids): a savepoint undoes it.
    bad = make_batch(["bad-1", "bad-2"], trace_ids=[b"", b"abc"])

    before = writer.submit(lambda s: s.put(make_batch(["ok-1"])))
    failing = writer.submit(lambda s: s.put(bad))
    after = writer.submit(lambda s: s.put(make_batch(["ok-2"])))
    commits = writer.commits
    release.set()

    before.result(10)
    after.result(10)
    with pytest.raises(ValueError, match="expected 16"):
        failing.result(10)
    assert writer.commits == commits + 2  # the held call's group, then the three together
    assert writer.pending_count() == 2
    joined = writer.take("churn", ["ok-1", "bad-1", "ok-2"])
    assert joined.found.tolist() == [True, False, True]


def test_a_full_store_inside_a_group_keeps_memory_and_file_in_agreement(db: Path) -> None:
    writer = GroupCommitPendingPredictions(SqlitePendingPredictions(db, max_db_bytes=256 * 1024))
    small = [ids_of(f"s{k}", 5) for k in range(3)]
    huge = make_batch(ids_of("huge", 5000), labels=["x" * 40] * 5000)
    release = _hold_writer(writer)
    futures = [
        writer.submit(lambda s: s.put(make_batch(small[0]))),
        writer.submit(lambda s: s.put(huge)),
        writer.submit(lambda s: s.put(make_batch(small[1]))),
    ]
    release.set()
    results = []
    for future in futures:
        try:
            future.result(10)
            results.append("stored")
        except StoreError as error:
            results.append(type(error).__name__)
    # SQLite rolls the whole commit back on SQLITE_FULL: the others get a retriable error
    # of the same kind (or, were only the big one undone, are stored).
    assert results[1] == "StoreFullError"
    assert set(results) <= {"StoreFullError", "stored"}
    for ids, result in zip(small, results[::2], strict=False):
        if result != "stored":
            writer.put(make_batch(ids))  # the retry the error asks for
    writer.put(make_batch(small[2]))  # the store goes on after the error
    in_memory = writer.pending_count()
    writer.close()

    reopened = SqlitePendingPredictions(db)
    try:
        assert in_memory == reopened.pending_count() == 15
        for ids in small:
            assert reopened.take("churn", ids).found.all()
        assert not reopened.take("churn", ids_of("huge", 5000)).found.any()
    finally:
        reopened.close()


def test_concurrent_puts_and_takes_lose_and_duplicate_nothing(
    writer: GroupCommitPendingPredictions,
) -> None:
    batches = [ids_of(f"t{t}b{k}", 50) for t in range(4) for k in range(25)]
    taken: list[str] = []
    done = threading.Event()

    def put_all(part: list[list[str]]) -> None:
        for ids in part:
            writer.put(make_batch(ids))

    def take_all() -> None:
        wanted = [i for ids in batches for i in ids]
        while not done.is_set() or wanted:
            joined = writer.take("churn", wanted[:500])
            got = [i for i, f in zip(wanted[:500], joined.found, strict=True) if f]
            taken.extend(got)
            wanted = [i for i in wanted if i not in set(got)]
            if done.is_set() and not joined.found.any() and writer.pending_count() == 0:
                break

    putters = [threading.Thread(target=put_all, args=(batches[t::4],)) for t in range(4)]
    taker = threading.Thread(target=take_all)
    for thread in [*putters, taker]:
        thread.start()
    for thread in putters:
        thread.join(60)
    done.set()
    taker.join(60)

    assert not taker.is_alive()
    assert sorted(taken) == sorted(i for ids in batches for i in ids)
    assert writer.pending_count() == 0


def test_calls_after_the_writer_closed_are_refused(db: Path) -> None:
    writer = GroupCommitPendingPredictions(SqlitePendingPredictions(db))
    writer.put(make_batch(["a"]))
    writer.close()
    with pytest.raises(StoreClosedError):
        writer.put(make_batch(["b"]))
    reopened = SqlitePendingPredictions(db)  # close() released the file
    assert reopened.pending_count() == 1
    reopened.close()


def test_async_calls_run_on_the_writer_thread_and_leave_the_loop_free(db: Path) -> None:
    async def scenario() -> tuple[list[bool], int, set[str]]:
        writer = GroupCommitPendingPredictions(SqlitePendingPredictions(db), name="store-writer")
        store = AsyncPendingPredictions(writer)
        threads: set[str] = set()
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        release = _hold_writer(writer)  # the store is "slow": the loop must keep running
        put = asyncio.ensure_future(store.put(make_batch(["a", "b"])))
        await asyncio.sleep(0.05)
        assert not put.done()
        ticks_while_blocked = ticks
        release.set()
        await put
        await asyncio.wrap_future(
            writer.submit(lambda s: threads.add(threading.current_thread().name))
        )
        joined = await store.take("churn", ["b", "x"])
        ticker.cancel()
        await store.close()
        return joined.found.tolist(), ticks_while_blocked, threads

    found, ticks, threads = asyncio.run(scenario())
    assert found == [True, False]
    assert ticks > 10
    assert threads == {"store-writer"}


# -- the in-memory index --------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["put", "remove", "expire"]),
            st.lists(st.integers(0, 300), min_size=1, max_size=40, unique=True),
        ),
        max_size=40,
    )
)
def test_the_id_index_behaves_like_a_dict(ops: list[tuple[str, list[int]]]) -> None:
    index = IdIndex()
    model: dict[int, int] = {}
    batch = 0
    for op, ids in ops:
        keys = hash_ids([f"id{i}" for i in ids])
        if op == "put":
            batch += 1
            locs = (batch << sqlite_store.ROW_BITS) | np.arange(len(ids))
            change = index.put(keys, locs)
            replaced = sorted(model[i] for i in ids if i in model)
            assert sorted(change.replaced_locs.tolist()) == replaced
            model.update(zip(ids, locs.tolist(), strict=True))
        elif op == "remove":
            slots, locs = index.find(keys)
            index.remove(slots[locs >= 0])
            for i in ids:
                model.pop(i, None)
        else:  # expire every batch below the median one still alive
            if model:
                low = sorted(loc >> sqlite_store.ROW_BITS for loc in model.values())[
                    len(model) // 2
                ]
                index.low_water = max(index.low_water, low)
                model = {i: loc for i, loc in model.items() if loc >> sqlite_store.ROW_BITS >= low}
        everything = list(range(301))
        _, locs = index.find(hash_ids([f"id{i}" for i in everything]))
        assert locs.tolist() == [model.get(i, -1) for i in everything]
    assert index.live_count() == len(model)


def test_the_id_index_grows_and_keeps_every_entry() -> None:
    index = IdIndex()
    keys = hash_ids([f"k{i}" for i in range(50_000)])
    for start in range(0, 50_000, 1000):
        index.put(keys[start : start + 1000], np.arange(start, start + 1000))
    _, locs = index.find(keys)
    assert locs.tolist() == list(range(50_000))
    assert index.capacity >= 50_000 / IdIndex.MAX_LOAD


def test_undo_restores_the_index_exactly() -> None:
    index = IdIndex()
    index.put(hash_ids(["a", "b"]), np.array([1, 2]))
    change = index.put(hash_ids(["b", "c"]), np.array([3, 4]))
    index.undo(change)
    _, locs = index.find(hash_ids(["a", "b", "c"]))
    assert locs.tolist() == [1, 2, -1]


# -- orphan outcomes ------------------------------------------------------------------------


def outcomes(ids: list[str], *, received: int = NOW, model: str = "churn") -> OutcomeColumns:
    return OutcomeColumns(
        model,
        "v1",
        ids=ids,
        received_unix_nano=received,
        actual_values=np.arange(len(ids), dtype=float),
        actual_labels=[f"y{i}" for i in range(len(ids))],
    )


def test_an_orphan_outcome_is_released_when_its_prediction_arrives() -> None:
    orphans = OrphanOutcomes(grace_s=60)
    orphans.hold(outcomes(["a", "b", "c"]), np.array([True, False, True]))

    late = orphans.match("churn", ["x", "c"])

    assert late.ids == ["c"] and late.actual_labels == ["y2"]
    assert late.actual_values.tolist() == [2.0] and late.received_unix_nano.tolist() == [NOW]
    assert orphans.held_count("churn") == 1
    assert orphans.match("churn", ["c"]).rows == 0


def test_orphans_still_unmatched_after_the_grace_period_are_counted_per_model() -> None:
    orphans = OrphanOutcomes(grace_s=60)
    orphans.hold(outcomes(["a", "b"], received=NOW), np.array([True, True]))
    orphans.hold(outcomes(["d"], model="fraud"), np.array([True]))
    orphans.hold(outcomes(["c"], received=NOW + 30 * SECOND), np.array([True]))

    assert orphans.expire(NOW + 59 * SECOND) == {}
    assert orphans.expire(NOW + 61 * SECOND) == {("churn", "v1"): 2, ("fraud", "v1"): 1}
    assert orphans.held_count() == 1
    assert orphans.expire(NOW + 91 * SECOND) == {("churn", "v1"): 1}


def test_the_orphan_hold_is_bounded_and_counts_what_it_drops() -> None:
    orphans = OrphanOutcomes(grace_s=60, max_held=3)
    orphans.hold(outcomes(ids_of("o", 5)), np.ones(5, dtype=bool))

    assert orphans.held_count() == 3
    assert orphans.match("churn", ["o-0", "o-1", "o-4"]).ids == ["o-4"]
    assert orphans.expire(NOW) == {("churn", "v1"): 2}


def test_a_resent_orphan_outcome_replaces_the_held_one() -> None:
    orphans = OrphanOutcomes()
    orphans.hold(outcomes(["a"]), np.array([True]))
    orphans.hold(outcomes(["a"], received=NOW + SECOND), np.array([True]))
    assert orphans.held_count() == 1
    assert orphans.match("churn", ["a"]).received_unix_nano.tolist() == [NOW + SECOND]
    assert orphans.expire(NOW + SECOND) == {("churn", "v1"): 1}  # the replaced one


def test_forgetting_a_model_drops_its_held_orphans() -> None:
    orphans = OrphanOutcomes()
    orphans.hold(outcomes(["a", "b"]), np.array([True, True]))
    assert orphans.forget("churn") == 2
    assert orphans.held_count() == 0 and orphans.expire(NOW + DAY) == {}


def test_matching_a_model_without_orphans_is_free_of_per_id_work() -> None:
    orphans = OrphanOutcomes()
    orphans.hold(outcomes(["a"], model="fraud"), np.array([True]))
    ids = ids_of("x", 100_000)
    started = time.perf_counter()
    assert orphans.match("churn", ids).rows == 0
    assert time.perf_counter() - started < 0.005


def test_store_errors_name_the_file(db: Path) -> None:
    error = StoreFullError(str(db), "full")
    assert isinstance(error, StoreError) and str(error) == f"pending store {db}: full"
