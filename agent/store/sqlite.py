"""SQLite pending store: packed rows per prediction batch, an in-memory id index.

    store = SqlitePendingPredictions(Path("/var/lib/mlsidecar/pending.db"), ttl_s=7 * 86400)
    store.put(PendingBatch("churn", "v1", ids=["a", "b"], received_unix_nano=now,
                           scores=np.array([0.2, 0.9])))
    joined = store.take("churn", ["a", "x"])      # joined.found == [True, False]

Durable state is two tables: ``batches`` (one small mutable row per batch: counts, a
bitmap of the rows already taken, what all rows share) and ``chunks`` (immutable: the
ids and packed outputs of as many rows as fit one page). The id -> (batch, row) index
lives in memory (16 bytes a slot, numpy) and is rebuilt from the stored ids on open: an
on-disk id B-tree dirties about one page per inserted id, which measured 14-31 k rows/s
at 0.25-1 M pending (docs/store.md).

One writer: use the instance from one thread at a time (``GroupCommitPendingPredictions``
runs it on its own thread); ``pending_count`` and ``stats`` are safe from any thread. The
file is locked for the life of the instance (``StoreInUseError`` for a second opener).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import sqlite3
import struct
import threading
import types
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt

from agent.store.pending import (
    CorruptStoreError,
    IntArray,
    JoinedPredictions,
    ModelVersion,
    PendingBatch,
    StoreClosedError,
    StoreError,
    StoreFullError,
    StoreInUseError,
    StoreSchemaError,
    StoreStats,
    scatter,
)

UIntArray = npt.NDArray[np.uint64]
T = TypeVar("T")
Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

# A location is batch_key << ROW_BITS | row; larger batches are stored as several rows.
ROW_BITS = 20
MAX_STORED_ROWS = 1 << ROW_BITS
ROW_MASK = MAX_STORED_ROWS - 1
# "MLSC": marks the file as ours (PRAGMA application_id), so a foreign database is refused.
APPLICATION_ID = 0x4D4C5343
DEFAULT_TTL_S = 7 * 86400.0
DEFAULT_MAX_PENDING = 1_000_000
PAGE_SIZE = 16384
_SQL_CHUNK = 500  # bound parameters per IN (...) list
_EVICT_CHUNK = 64


# -- schema and migrations ------------------------------------------------------------------

Migration = Callable[[sqlite3.Connection], None]


def _v1_batches_and_chunks(conn: sqlite3.Connection) -> None:
    conn.execute(
        """CREATE TABLE batches (
            batch_key INTEGER PRIMARY KEY,   -- arrival order; expiry and eviction go oldest first
            model TEXT NOT NULL,
            version TEXT NOT NULL,
            received_unix_nano INTEGER NOT NULL,
            rows INTEGER NOT NULL,
            remaining INTEGER NOT NULL,      -- rows not yet taken, replaced or dropped
            taken BLOB,                      -- bitmap (little-endian bit order), NULL = none
            meta TEXT NOT NULL               -- JSON: weight, class_names, attributes, chunk_rows
        )"""
    )
    conn.execute(
        """CREATE TABLE chunks (
            chunk_key INTEGER PRIMARY KEY,   -- batch_key << 20 | first row; written once
            data BLOB NOT NULL
        )"""
    )


# MIGRATIONS[i] upgrades a file from schema version i to i + 1 (0: empty file).
MIGRATIONS: tuple[Migration, ...] = (_v1_batches_and_chunks,)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    """The schema version recorded in the file (0 for a new, empty file)."""
    has_table = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if not has_table:
        return 0
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return 0 if row is None else int(row[0])


def migrate(
    conn: sqlite3.Connection, path: str, migrations: Sequence[Migration] = MIGRATIONS
) -> int:
    """Bring the file to ``len(migrations)``, one transaction per step; returns the version.

    A file newer than this build is refused rather than guessed at.
    """
    current = schema_version(conn)
    target = len(migrations)
    if current > target:
        raise StoreSchemaError(
            path,
            f"schema version {current} is newer than this mlsidecar understands "
            f"(up to {target}); run a newer mlsidecar, or move the file away to start empty",
        )
    for version in range(current, target):
        try:
            conn.execute("BEGIN IMMEDIATE")
            if version == 0:
                conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                conn.execute("DELETE FROM schema_version")
                conn.execute("INSERT INTO schema_version VALUES (0)")
            migrations[version](conn)
            conn.execute("UPDATE schema_version SET version = ?", (version + 1,))
            conn.execute("COMMIT")
        except sqlite3.Error as error:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if _primary_code(error) == sqlite3.SQLITE_BUSY:
                raise _translate(error, path, "migrating") from error
            raise StoreSchemaError(
                path, f"migration from schema version {version} to {version + 1} failed: {error}"
            ) from error
    return target


# -- payload codec --------------------------------------------------------------------------

# A batch's rows are stored in chunks of about CHUNK_BYTES: as many rows as fit one 16 KiB
# page (no overflow chain), so joining one row reads one page rather than the whole batch
# (scattered joins: docs/store.md). The row count follows the batch's bytes per row.
CHUNK_BYTES = 15_800
PAYLOAD_FORMAT = 1
_CHUNK_MAGIC = b"MLSK"
# magic, format, section flags, rows, CRC-32 of everything after this header
_CHUNK_HEADER = struct.Struct("<4sBBxxII")
# Sections in storage order; a chunk holds those its flags name. ids are always there.
_IDS, _TIMESTAMPS, _SCORES, _LABELS, _PROBABILITIES, _TRACE_IDS, _SPAN_IDS = (
    1 << i for i in range(7)
)
_SECTION_NAMES = {
    _IDS: "ids",
    _TIMESTAMPS: "timestamps",
    _SCORES: "scores",
    _LABELS: "labels",
    _PROBABILITIES: "probabilities",
    _TRACE_IDS: "trace_ids",
    _SPAN_IDS: "span_ids",
}


def encode_strings(values: Sequence[str]) -> tuple[bytes, IntArray]:
    """(UTF-8 bytes of ``values`` joined, the cumulative end offset of each, in bytes)."""
    n = len(values)
    text = "".join(values)
    if text.isascii():
        data = text.encode("ascii")
        lengths = np.fromiter(map(len, values), dtype=np.int64, count=n)
    else:
        encoded = [value.encode("utf-8", "surrogatepass") for value in values]
        data = b"".join(encoded)
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=n)
    return data, np.cumsum(lengths)


def _string_section(data: bytes, ends: IntArray, lo: int, hi: int) -> bytes:
    """Rows [lo, hi) as uint32 end offsets relative to the chunk, then their bytes."""
    start = int(ends[lo - 1]) if lo else 0
    end = int(ends[hi - 1])
    if end - start >= 1 << 32:
        raise ValueError(f"{hi - lo} strings take {end - start} bytes, over 4 GiB per chunk")
    return (ends[lo:hi] - start).astype("<u4").tobytes() + data[start:end]


def _fixed_bytes(values: Sequence[bytes], size: int) -> bytes:
    """``values`` (each ``size`` bytes or empty) as one rows x size block; empty -> zeros."""
    joined = b"".join(values)
    if len(joined) == size * len(values):
        return joined
    for row, value in enumerate(values):
        if len(value) not in (0, size):
            raise ValueError(f"row {row}: {len(value)} bytes, expected {size} (or empty)")
    zero = bytes(size)
    return b"".join(value or zero for value in values)


def encode_chunks(batch: PendingBatch, lo: int, hi: int) -> tuple[int, list[bytes]]:
    """Rows [lo, hi) of ``batch`` as (rows per chunk, chunks): each a header, section
    lengths and sections (raw little-endian arrays; strings as offsets + UTF-8), CRC-checked."""
    # (flag, bytes of the whole column, bytes per row or the string end offsets), flag order
    parts: list[tuple[int, bytes, int | IntArray]] = []
    ids, id_ends = encode_strings(batch.ids[lo:hi])
    parts.append((_IDS, ids, id_ends))
    if batch.timestamps_unix_nano is not None:
        parts.append((_TIMESTAMPS, _le(batch.timestamps_unix_nano[lo:hi], "<i8"), 8))
    if batch.scores is not None:
        parts.append((_SCORES, _le(batch.scores[lo:hi], "<f8"), 8))
    if batch.labels is not None:
        parts.append((_LABELS, *encode_strings(batch.labels[lo:hi])))
    if batch.probabilities is not None:
        width = 8 * len(batch.class_names)
        parts.append((_PROBABILITIES, _le(batch.probabilities[lo:hi], "<f8"), width))
    if batch.trace_ids is not None:
        parts.append((_TRACE_IDS, _fixed_bytes(batch.trace_ids[lo:hi], 16), 16))
    if batch.span_ids is not None:
        parts.append((_SPAN_IDS, _fixed_bytes(batch.span_ids[lo:hi], 8), 8))
    flags = sum(flag for flag, _, _ in parts)
    row_bytes = sum(
        len(data) + 4 * (hi - lo) if not isinstance(shape, int) else shape * (hi - lo)
        for _, data, shape in parts
    ) / max(hi - lo, 1)
    chunk_rows = int(min(max(CHUNK_BYTES // max(row_bytes, 1), 1), MAX_STORED_ROWS))
    chunks = []
    for a in range(0, hi - lo, chunk_rows):
        b = min(a + chunk_rows, hi - lo)
        sections = [
            data[a * shape : b * shape]
            if isinstance(shape, int)
            else _string_section(data, shape, a, b)
            for _, data, shape in parts
        ]
        body = struct.pack(f"<{len(sections)}I", *map(len, sections)) + b"".join(sections)
        header = _CHUNK_HEADER.pack(_CHUNK_MAGIC, PAYLOAD_FORMAT, flags, b - a, zlib.crc32(body))
        chunks.append(header + body)
    return chunk_rows, chunks


def _le(values: Any, dtype: str) -> bytes:
    return np.ascontiguousarray(values, dtype=dtype).tobytes()


class StoredStrings:
    """Strings of one chunk, decoded on demand: row i is the UTF-8 bytes
    ``blob[base + ends[i - 1] : base + ends[i]]``."""

    __slots__ = ("_ascii_text", "base", "blob", "ends")

    def __init__(self, blob: bytes, base: int, ends: npt.NDArray[np.uint32]) -> None:
        self.blob = blob
        self.base = base
        self.ends = ends
        self._ascii_text: str | None = None

    def __len__(self) -> int:
        return len(self.ends)

    def _text(self) -> str | None:
        """The whole text when it is ASCII (byte offsets are then character offsets)."""
        if self._ascii_text is None:
            raw = self.blob[self.base : self.base + (int(self.ends[-1]) if len(self.ends) else 0)]
            if raw.isascii():
                self._ascii_text = raw.decode("ascii")
        return self._ascii_text

    def pick(self, rows: IntArray) -> list[str]:
        ends = self.ends[rows].tolist()
        starts = np.where(rows > 0, self.ends[rows - 1], 0).tolist()
        # Decoding the whole text once beats one decode per row when many rows are wanted.
        text = self._text() if len(rows) * 8 >= len(self) else None
        if text is not None:
            return [text[a:b] for a, b in zip(starts, ends, strict=True)]
        data = memoryview(self.blob)[self.base :]
        return [str(data[a:b], "utf-8", "surrogatepass") for a, b in zip(starts, ends, strict=True)]

    def all(self) -> list[str]:
        return self.pick(np.arange(len(self)))


def _strings(blob: bytes, offset: int, n: int, end: int, what: str) -> StoredStrings:
    """n uint32 byte offsets at ``offset``, then the UTF-8 bytes up to ``end``."""
    base = offset + 4 * n
    if end < base or end > len(blob):
        raise ValueError(f"{what}: {end - offset} bytes cannot hold {n} offsets")
    ends = np.frombuffer(blob, dtype="<u4", count=n, offset=offset)
    # Only the total is checked (the CRC covers the rest).
    if n and int(ends[-1]) != end - base:
        raise ValueError(f"{what}: offsets do not match the {end - base} bytes of text")
    return StoredStrings(blob, base, ends)


@dataclass(frozen=True, slots=True)
class StoredChunk:
    """Decoded (zero-copy) rows of one chunk; None = column not sent."""

    rows: int
    ids: StoredStrings
    timestamps: IntArray | None
    scores: npt.NDArray[np.float64] | None
    labels: StoredStrings | None
    probabilities: npt.NDArray[np.float64] | None
    trace_ids: npt.NDArray[np.uint8] | None
    span_ids: npt.NDArray[np.uint8] | None


def decode_chunk(blob: bytes) -> StoredChunk:
    """Inverse of ``encode_chunks`` for one chunk; raises ValueError saying what is wrong."""
    if len(blob) < _CHUNK_HEADER.size:
        raise ValueError(f"{len(blob)} bytes, too short for a chunk header")
    magic, version, flags, rows, crc = _CHUNK_HEADER.unpack_from(blob)
    if magic != _CHUNK_MAGIC:
        raise ValueError(f"bad magic {magic!r} (expected {_CHUNK_MAGIC!r})")
    if version != PAYLOAD_FORMAT:
        raise ValueError(
            f"payload format {version} is not one this mlsidecar reads ({PAYLOAD_FORMAT}); "
            "run a newer mlsidecar"
        )
    if zlib.crc32(memoryview(blob)[_CHUNK_HEADER.size :]) != crc:
        raise ValueError("CRC mismatch: the stored bytes changed after they were written")
    count = flags.bit_count()
    lengths = struct.unpack_from(f"<{count}I", blob, _CHUNK_HEADER.size)
    offset = _CHUNK_HEADER.size + 4 * count
    if offset + sum(lengths) != len(blob):
        raise ValueError(f"section lengths {lengths} do not add up to {len(blob)} bytes")
    sections: dict[int, tuple[int, int]] = {}
    for flag, length in zip((f for f in _SECTION_NAMES if flags & f), lengths, strict=True):
        sections[flag] = (offset, length)
        offset += length

    def fixed(flag: int, dtype: str, width: int | None) -> Any:
        if flag not in sections:
            return None
        start, length = sections[flag]
        itemsize = np.dtype(dtype).itemsize
        if width is None:  # probabilities: as many columns as the bytes say
            width = length // (itemsize * rows) if rows else 0
        if length != rows * width * itemsize:
            raise ValueError(f"{_SECTION_NAMES[flag]}: {length} bytes for {rows} rows")
        array = np.frombuffer(blob, dtype=dtype, count=rows * width, offset=start)
        return (
            array if width == 1 and flag in (_TIMESTAMPS, _SCORES) else array.reshape(rows, width)
        )

    def strings(flag: int) -> StoredStrings | None:
        if flag not in sections:
            return None
        start, length = sections[flag]
        return _strings(blob, start, rows, start + length, _SECTION_NAMES[flag])

    ids = strings(_IDS)
    if ids is None:
        raise ValueError("no ids section")
    return StoredChunk(
        rows=rows,
        ids=ids,
        timestamps=fixed(_TIMESTAMPS, "<i8", 1),
        scores=fixed(_SCORES, "<f8", 1),
        labels=strings(_LABELS),
        probabilities=fixed(_PROBABILITIES, "<f8", None),
        trace_ids=fixed(_TRACE_IDS, "u1", 16),
        span_ids=fixed(_SPAN_IDS, "u1", 8),
    )


@dataclass(frozen=True, slots=True)
class BatchMeta:
    """What is the same for every row of a batch (the ``meta`` column, JSON)."""

    weight: float
    class_names: tuple[str, ...]
    attributes: Mapping[str, str]
    chunk_rows: int


def encode_meta(batch: PendingBatch, chunk_rows: int) -> str:
    return json.dumps(
        {
            "weight": batch.weight,
            "class_names": list(batch.class_names),
            "attributes": dict(batch.attributes),
            "chunk_rows": chunk_rows,
        },
        separators=(",", ":"),
        sort_keys=True,
    )


@functools.lru_cache(maxsize=4096)
def decode_meta(text: str) -> BatchMeta:
    """Parsed once per distinct text: batches of one model mostly share theirs."""
    meta = json.loads(text)
    chunk_rows = int(meta["chunk_rows"])
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows {chunk_rows} is not positive")
    return BatchMeta(
        weight=float(meta["weight"]),
        class_names=tuple(str(name) for name in meta["class_names"]),
        attributes=types.MappingProxyType({str(k): str(v) for k, v in meta["attributes"].items()}),
        chunk_rows=chunk_rows,
    )


# -- the in-memory id index -----------------------------------------------------------------


def hash_ids(ids: Sequence[str]) -> UIntArray:
    """64-bit keys of prediction ids (Python's keyed SipHash; 0 is reserved for "empty").

    The hash is randomised per process, so keys are never persisted: the index is rebuilt
    from the stored ids on open, and an attacker cannot pre-compute colliding ids.
    """
    keys = np.fromiter(map(hash, ids), dtype=np.int64, count=len(ids)).view(np.uint64)
    keys[keys == 0] = 1
    return keys


@dataclass(frozen=True, slots=True)
class IndexChange:
    """What ``IdIndex.put`` changed, so that ``IdIndex.undo`` can restore it."""

    new_slots: IntArray
    replaced_slots: IntArray
    replaced_locs: IntArray


class IdIndex:
    """Prediction-id key -> location, for one model: numpy hash table of 8-slot buckets.

    index = IdIndex()
    index.put(hash_ids(["a", "b"]), np.array([0, 1]))
    index.find(hash_ids(["b", "c"]))     # (slots, locations): locations == [1, -1]

    A bucket is one 64-byte row of keys, filled left to right; a key whose home bucket is
    full goes to the next one. So a lookup gathers one row per key, and a bucket with an
    empty slot ends the search. A removed entry keeps its key with location -1; entries of
    batches below ``low_water`` (expired or evicted) are dead the same way. Dead entries
    are dropped when the table is rebuilt, once three quarters of it are in use.
    """

    BUCKET = 8
    # Rebuilt at 80 % in use down to 40 % live: with entries dying at the rate they are
    # added (eviction, expiry), each insert then pays about one re-insert of a live entry.
    MAX_LOAD = 0.8
    TARGET_LOAD = 0.4
    MIN_BUCKETS = 64
    # Keys left after a vector round are few (full buckets, shared claims): finish in Python.
    _SCALAR_TAIL = 32

    def __init__(self, buckets: int = MIN_BUCKETS) -> None:
        self._allocate(max(int(buckets), self.MIN_BUCKETS))
        # Locations of batches below this key are dead (expired or evicted).
        self.low_water = 0

    def _allocate(self, buckets: int) -> None:
        self._buckets = buckets
        self._keys = np.zeros((buckets, self.BUCKET), dtype=np.uint64)
        self._locs = np.full((buckets, self.BUCKET), -1, dtype=np.int64)
        # Flat views: a slot number is bucket * BUCKET + column.
        self._flat_keys = self._keys.reshape(-1)
        self._flat_locs = self._locs.reshape(-1)
        self._used = 0

    @property
    def capacity(self) -> int:
        return self._buckets * self.BUCKET

    @property
    def nbytes(self) -> int:
        return int(self._keys.nbytes + self._locs.nbytes)

    def live_count(self) -> int:
        return int(np.count_nonzero(self._live(self._flat_locs)))

    def _live(self, locs: IntArray) -> npt.NDArray[np.bool_]:
        return (locs >= 0) & ((locs >> ROW_BITS) >= self.low_water)

    def _home(self, keys: UIntArray) -> IntArray:
        # Multiply-shift ("fastrange") maps the top 32 bits onto [0, buckets).
        return ((keys >> np.uint64(32)) * np.uint64(self._buckets) >> np.uint64(32)).astype(
            np.int64
        )

    def _probe(self, keys: UIntArray) -> IntArray:
        """The slot holding each key, or -1."""
        result = np.full(len(keys), -1, dtype=np.int64)
        todo = np.arange(len(keys))
        bucket = self._home(keys)
        while todo.size > self._SCALAR_TAIL:
            rows = self._keys.take(bucket, axis=0)
            # The 8 comparison bytes of a bucket read as one integer: 0x01 at the match.
            equal = (rows == keys[todo][:, None]).view(np.uint64).ravel()
            hit = equal != 0
            column = np.bitwise_count(equal[hit] - np.uint64(1)) >> np.uint8(3)
            result[todo[hit]] = bucket[hit] * self.BUCKET + column
            # Only a full bucket can have pushed the key on to the next one.
            more = ~hit & (rows[:, -1] != 0)
            todo = todo[more]
            bucket = (bucket[more] + 1) % self._buckets
        for i, b in zip(todo.tolist(), bucket.tolist(), strict=True):
            key = int(keys[i])
            while True:
                row = self._keys[b].tolist()
                if key in row:
                    result[i] = b * self.BUCKET + row.index(key)
                    break
                if row[-1] == 0:
                    break
                b = (b + 1) % self._buckets
        return result

    def find(self, keys: UIntArray) -> tuple[IntArray, IntArray]:
        """(slots, locations) of ``keys``; location -1 (slot -1 or dead) when not pending."""
        slots = self._probe(keys)
        locs = np.full(len(keys), -1, dtype=np.int64)
        present = slots >= 0
        found = self._flat_locs[slots[present]]
        locs[present] = np.where(self._live(found), found, -1)
        return slots, locs

    def put(self, keys: UIntArray, locs: IntArray) -> IndexChange:
        """Point ``keys`` (unique) at ``locs``; a live entry replaced is in ``replaced_locs``."""
        self._reserve(len(keys))
        slots = self._probe(keys)
        present = np.flatnonzero(slots >= 0)
        replaced_slots = slots[present]
        previous = self._flat_locs[replaced_slots]
        self._flat_locs[replaced_slots] = locs[present]
        live = self._live(previous)
        absent = np.flatnonzero(slots < 0)
        new_slots = self._insert(keys[absent], locs[absent])
        return IndexChange(new_slots, replaced_slots[live], previous[live])

    def remove(self, slots: IntArray) -> None:
        self._flat_locs[slots] = -1

    def undo(self, change: IndexChange) -> None:
        """Restore the table as it was before the ``put`` that returned ``change``."""
        # The new keys were appended after every bucket's filled prefix: clearing them
        # leaves the prefixes as they were.
        self._flat_keys[change.new_slots] = 0
        self._flat_locs[change.new_slots] = -1
        self._used -= len(change.new_slots)
        self._flat_locs[change.replaced_slots] = change.replaced_locs

    def _insert(self, keys: UIntArray, locs: IntArray) -> IntArray:
        """Place keys known to be absent; returns their slots."""
        placed = np.empty(len(keys), dtype=np.int64)
        todo = np.arange(len(keys))
        bucket = self._home(keys)
        while todo.size > self._SCALAR_TAIL:
            rows = self._keys.take(bucket, axis=0)
            filled = np.bitwise_count((rows != 0).view(np.uint64).ravel()).astype(np.int64)
            fits = filled < self.BUCKET
            slots = bucket * self.BUCKET + filled
            # Keys sharing a bucket claim the same column: one write lands, the others
            # retry that bucket next round (the full ones move on to the next bucket).
            self._flat_keys[slots[fits]] = keys[todo[fits]]
            won = fits & (self._flat_keys[np.where(fits, slots, 0)] == keys[todo])
            self._flat_locs[slots[won]] = locs[todo[won]]
            placed[todo[won]] = slots[won]
            bucket = np.where(fits, bucket, (bucket + 1) % self._buckets)
            todo, bucket = todo[~won], bucket[~won]
        for i, b in zip(todo.tolist(), bucket.tolist(), strict=True):
            while self._keys[b, -1] != 0:
                b = (b + 1) % self._buckets
            slot = b * self.BUCKET + self._keys[b].tolist().index(0)
            self._flat_keys[slot] = keys[i]
            self._flat_locs[slot] = locs[i]
            placed[i] = slot
        self._used += len(keys)
        return placed

    def _reserve(self, n: int) -> None:
        if self._used + n <= self.MAX_LOAD * self.capacity:
            return
        keep = (self._flat_keys != 0) & self._live(self._flat_locs)
        keys, locs = self._flat_keys[keep], self._flat_locs[keep]
        del keep
        # Let go of the old table before allocating the new one: the rebuild's peak memory
        # is then the new table plus the live entries, not two tables.
        self._keys = np.empty((0, self.BUCKET), dtype=np.uint64)
        self._locs = np.empty((0, self.BUCKET), dtype=np.int64)
        self._flat_keys, self._flat_locs = self._keys.reshape(-1), self._locs.reshape(-1)
        buckets = math.ceil((len(keys) + n) / (self.TARGET_LOAD * self.BUCKET))
        self._allocate(max(buckets, self.MIN_BUCKETS))
        self._fill_empty(keys, locs)

    def _fill_empty(self, keys: UIntArray, locs: IntArray) -> None:
        """Place many unique keys into the empty table at once: sort by bucket, and each
        key's rank within its bucket is its column; the few beyond 8 go through _insert."""
        bucket = self._home(keys)
        order = np.argsort(bucket, kind="stable")
        ordered = bucket[order]
        index = np.arange(len(order))
        starts = np.ones(len(order), dtype=np.bool_)
        starts[1:] = ordered[1:] != ordered[:-1]
        rank = index - np.maximum.accumulate(np.where(starts, index, 0))
        fits = rank < self.BUCKET
        slots = ordered[fits] * self.BUCKET + rank[fits]
        chosen = order[fits]
        self._flat_keys[slots] = keys[chosen]
        self._flat_locs[slots] = locs[chosen]
        self._used += len(chosen)
        rest = order[~fits]
        self._insert(keys[rest], locs[rest])


# -- the store ------------------------------------------------------------------------------

_FULL = 13  # SQLITE_FULL
_CORRUPT = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB
_BUSY = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED


def _primary_code(error: sqlite3.Error) -> int:
    return int(getattr(error, "sqlite_errorcode", 1) or 1) & 0xFF


def _translate(error: sqlite3.Error, path: str, doing: str) -> StoreError:
    code = _primary_code(error)
    if code == _FULL:
        return StoreFullError(
            path,
            f"full while {doing} ({error}); free disk space, raise store.max_db_bytes or "
            "lower store.max_pending / store.ttl_s",
        )
    if code in _CORRUPT:
        return CorruptStoreError(
            path,
            f"not a readable pending store while {doing} ({error}); move the file away to "
            "start empty (its pending predictions are lost)",
        )
    if code in _BUSY:
        return StoreInUseError(
            path,
            f"in use by another process while {doing} ({error}); each agent needs its own "
            "data directory",
        )
    return StoreError(path, f"{doing}: {error}")


@dataclass(frozen=True, slots=True)
class _BatchRow:
    batch_key: int
    model: str
    version: str
    received_unix_nano: int
    rows: int
    remaining: int
    taken: bytes | None
    meta: str


_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


class SqlitePendingPredictions:
    """The pending-prediction join store in one SQLite file (WAL mode).

    store = SqlitePendingPredictions(data_dir / "pending.db", ttl_s=7 * 86400,
                                     max_pending=1_000_000, synchronous="NORMAL")
    store.put(batch); joined = store.take("churn", ids); unmatched = store.expire(now)

    ``synchronous``: with ``"NORMAL"`` a returned put survives kill -9 or any crash of the
    agent; after a power loss or OS crash the last commits may be missing, the file stays
    consistent. ``"FULL"`` fsyncs every commit (shared by a group) and survives those too.
    ``"OFF"`` also survives kill -9, but a power loss can corrupt the file.
    ``max_pending`` bounds the rows kept (oldest whole batches are evicted, counted as
    unmatched); ``max_db_bytes`` caps the file (``StoreFullError`` beyond it). A duplicate
    id for a model replaces the older prediction.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        max_pending: int = DEFAULT_MAX_PENDING,
        synchronous: Synchronous = "NORMAL",
        max_db_bytes: int | None = None,
        cache_chunks: int = 256,
        wal_autocheckpoint_pages: int = 1000,
        lock_timeout_s: float = 2.0,
    ) -> None:
        if not (ttl_s > 0 and math.isfinite(ttl_s)):
            raise ValueError(f"ttl_s must be a positive number of seconds, got {ttl_s}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        if synchronous not in _SYNCHRONOUS:
            raise ValueError(
                f"synchronous must be one of {', '.join(_SYNCHRONOUS)}, got {synchronous!r}"
            )
        if max_db_bytes is not None and max_db_bytes < 64 * 1024:
            raise ValueError(f"max_db_bytes must be at least 65536, got {max_db_bytes}")
        self.path = Path(path)
        self._where = str(self.path)
        self.ttl_ns = int(ttl_s * 1e9)
        self.max_pending = max_pending
        self.synchronous = synchronous
        # Recently read chunks: consecutive takes often need the same ones.
        self._cache_chunks = cache_chunks
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._counts_lock = threading.Lock()
        self._pending: dict[ModelVersion, int] = {}
        self._indexes: dict[str, IdIndex] = {}
        self._unmatched: dict[ModelVersion, int] = {}
        self._batches = 0
        self._next_key = 1
        self._depth = 0
        self._aborted = False
        self._abort_cause: BaseException | None = None
        self._evicted_total = 0
        self._expired_total = 0
        self._replaced_total = 0
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(
            # How long to wait for a previous owner (e.g. an agent still exiting) to let go.
            self.path,
            isolation_level=None,
            check_same_thread=False,
            timeout=lock_timeout_s,
        )
        try:
            self._configure(synchronous, max_db_bytes, wal_autocheckpoint_pages)
            migrate(self._conn, self._where)
            self._load()
        except sqlite3.Error as error:
            self._conn.close()
            raise _translate(error, self._where, "opening") from error
        except BaseException:
            self._conn.close()
            raise

    def _configure(self, synchronous: str, max_db_bytes: int | None, autocheckpoint: int) -> None:
        conn = self._conn
        # Held for the connection's life: a second agent on the same file fails at open,
        # and WAL needs no shared-memory file.
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        ours = (
            schema_version(conn) > 0
            or conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_version'").fetchone()
        )
        if app_id not in (0, APPLICATION_ID) or (app_id == 0 and tables and not ours):
            raise CorruptStoreError(
                self._where,
                f"is a SQLite database but not an mlsidecar pending store (application_id "
                f"{app_id:#x}, {tables} schema objects); point store.path elsewhere",
            )
        if not tables:
            # 16 KiB pages: fewer, larger chunks and commits of fewer pages (measured +20 % puts,
            # +30 % scattered joins over 4 KiB). Only settable before the first table.
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(self._where, f"cannot use WAL journal mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute(f"PRAGMA wal_autocheckpoint = {int(autocheckpoint)}")
        # The WAL is reused after each checkpoint; truncate it back when it grew large.
        conn.execute("PRAGMA journal_size_limit = 67108864")
        if app_id == 0:
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        if max_db_bytes is not None:
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {max(max_db_bytes // page_size, 16)}")

    # -- transactions

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One commit for every call inside; a call that raises undoes only itself.

        with store.transaction():
            store.put(a); store.put(b)      # durable together when the block ends
        """
        self._check_open()
        conn = self._conn
        if self._depth == 0:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as error:
                raise _translate(error, self._where, "beginning a transaction") from error
            self._depth = 1
            self._aborted = False
            try:
                yield
            except BaseException:
                # The failed call undid its own in-memory changes; only an aborted group's
                # earlier calls need the in-memory side read back from the file.
                self._rollback()
                if self._aborted:
                    self._load()
                raise
            else:
                try:
                    if self._aborted:
                        raise self._group_aborted()
                    conn.execute("COMMIT")
                except (sqlite3.Error, StoreError) as error:
                    self._rollback()
                    self._load()
                    if isinstance(error, sqlite3.Error):
                        raise _translate(error, self._where, "committing") from error
                    raise
            finally:
                self._depth = 0
        else:
            if self._aborted:
                raise self._group_aborted()
            name = f"call{self._depth}"
            conn.execute(f"SAVEPOINT {name}")
            self._depth += 1
            try:
                yield
            except BaseException as error:
                # SQLITE_FULL, IOERR, NOMEM may roll back the whole transaction, savepoints too.
                if conn.in_transaction:
                    conn.execute(f"ROLLBACK TO {name}")
                    conn.execute(f"RELEASE {name}")
                else:
                    self._aborted = True
                    self._abort_cause = error
                raise
            else:
                conn.execute(f"RELEASE {name}")
            finally:
                self._depth -= 1

    def _group_aborted(self) -> StoreError:
        """The error for calls of a group whose transaction SQLite rolled back: of the
        same kind as the failure that caused it (e.g. full), so callers retry alike."""
        cause = self._abort_cause
        kind = (
            type(_translate(cause, self._where, ""))
            if isinstance(cause, sqlite3.Error)
            else StoreError
        )
        return kind(
            self._where,
            f"another call of the same commit failed ({cause}) and SQLite rolled the whole "
            "commit back; nothing of it was stored, retry",
        )

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("ROLLBACK")

    @contextlib.contextmanager
    def _call(self, doing: str) -> Iterator[None]:
        """An atomic call: its own transaction, or a savepoint inside ``transaction()``."""
        try:
            with self.transaction():
                yield
        except sqlite3.Error as error:
            raise _translate(error, self._where, doing) from error

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(self._where, "closed")

    # -- loading

    def _load(self) -> None:
        """(Re)build the in-memory state from the file: counts and the id indexes."""
        self._indexes = {}
        self._cache.clear()
        pending: dict[ModelVersion, int] = {}
        batches = 0
        last_key = 0
        cursor = self._conn.execute(
            "SELECT batch_key, model, version, rows, remaining, taken FROM batches "
            "ORDER BY batch_key"
        )
        for batch_key, model, version, rows, remaining, taken in cursor:
            ids: list[str] = []
            for chunk_key, data in self._conn.execute(
                "SELECT chunk_key, data FROM chunks WHERE chunk_key >= ? AND chunk_key < ? "
                "ORDER BY chunk_key",
                (batch_key << ROW_BITS, (batch_key + 1) << ROW_BITS),
            ):
                if chunk_key & ROW_MASK != len(ids):
                    raise self._corrupt(batch_key, model, f"no chunk holds row {len(ids)}")
                try:
                    ids.extend(decode_chunk(data).ids.all())
                except (ValueError, UnicodeDecodeError) as error:
                    raise self._corrupt(batch_key, model, error, chunk_key) from error
            if len(ids) != rows:
                raise self._corrupt(batch_key, model, f"{len(ids)} ids stored for {rows} rows")
            keep = np.flatnonzero(~_taken_mask(taken, rows))
            if len(keep) < rows:
                ids = [ids[i] for i in keep.tolist()]
            keep, keys = _last_of_each_key(keep, hash_ids(ids))
            index = self._indexes.get(model)
            if index is None:
                index = self._indexes[model] = IdIndex()
            index.put(keys, (batch_key << ROW_BITS) | keep)
            pending[(model, version)] = pending.get((model, version), 0) + remaining
            batches += 1
            last_key = batch_key
        with self._counts_lock:
            self._pending = {key: n for key, n in pending.items() if n}
            self._batches = batches
        self._next_key = last_key + 1

    def _corrupt(
        self, batch_key: int | list[int], model: str, error: object, chunk_key: int | None = None
    ) -> CorruptStoreError:
        if isinstance(batch_key, int):
            where = f"batch {batch_key}"
        elif len(batch_key) == 1:
            where = f"batch {batch_key[0]}"
        else:  # a failure found while reading several batches at once
            where = f"one of batches {batch_key[0]}..{batch_key[-1]}"
        if chunk_key is not None:
            where += f" (rows from {chunk_key & ROW_MASK})"
        return CorruptStoreError(
            self._where,
            f"{where} of model {model!r} is unreadable: {error}; move the file away to "
            "start empty (its pending predictions are lost)",
        )

    # -- put

    def put(self, batch: PendingBatch) -> None:
        """Store ``batch``; durable when this returns (see the class docstring)."""
        self._check_open()
        n = batch.rows
        if n == 0:
            return
        keys = hash_ids(batch.ids)
        rows, keys = _last_of_each_key(np.arange(n, dtype=np.int64), keys)
        starts = range(0, n, MAX_STORED_ROWS)
        first_key = self._next_key
        locs = ((first_key + rows // MAX_STORED_ROWS) << ROW_BITS) | (rows % MAX_STORED_ROWS)
        with self._call(f"storing {n} predictions of model {batch.model!r}"):
            records = []
            for part, lo in enumerate(starts):
                hi = min(lo + MAX_STORED_ROWS, n)
                key = first_key + part
                kept = rows[(rows >= lo) & (rows < hi)] - lo
                taken = None
                if len(kept) < hi - lo:  # repeated ids within the batch: earlier rows lose
                    taken = np.packbits(
                        ~np.isin(np.arange(hi - lo), kept), bitorder="little"
                    ).tobytes()
                records.append((key, hi - lo, len(kept), taken))
                rows_per_chunk, chunks = encode_chunks(batch, lo, hi)
                self._conn.execute(
                    "INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        key,
                        batch.model,
                        batch.version,
                        batch.received_unix_nano,
                        hi - lo,
                        len(kept),
                        taken,
                        encode_meta(batch, rows_per_chunk),
                    ),
                )
                self._conn.executemany(
                    "INSERT INTO chunks VALUES (?, ?)",
                    [
                        ((key << ROW_BITS) + i * rows_per_chunk, data)
                        for i, data in enumerate(chunks)
                    ],
                )
            index = self._indexes.get(batch.model)
            new_index = index is None
            if index is None:
                index = IdIndex()
            change = index.put(keys, locs)
            try:
                replaced, emptied = self._mark_taken(change.replaced_locs)
                stored = len(keys)
                evicted = self._evict(self.pending_count() + stored - sum(replaced.values()))
            except BaseException:
                index.undo(change)
                raise
        # Committed (or part of an open group): now the in-memory side.
        if new_index:
            self._indexes[batch.model] = index
        self._next_key = first_key + len(records)
        with self._counts_lock:
            mv = (batch.model, batch.version)
            self._pending[mv] = self._pending.get(mv, 0) + len(keys)
            self._batches += len(records) - emptied
            self._subtract(replaced)
        self._replaced_total += sum(replaced.values()) + (n - len(keys))
        self._drop(evicted, self._unmatched)
        self._evicted_total += sum(n for _, _, _, n in evicted)

    def _evict(self, total_after: int) -> list[tuple[int, str, str, int]]:
        """Delete the oldest whole batches until ``total_after`` fits ``max_pending``."""
        excess = total_after - self.max_pending
        victims: list[tuple[int, str, str, int]] = []
        after = 0
        while excess > 0:
            chunk = self._conn.execute(
                "SELECT batch_key, model, version, remaining FROM batches WHERE batch_key > ? "
                "ORDER BY batch_key LIMIT ?",
                (after, _EVICT_CHUNK),
            ).fetchall()
            if not chunk:
                break
            for row in chunk:
                victims.append(row)
                excess -= row[3]
                if excess <= 0:
                    break
            after = chunk[-1][0]
        self._delete_batches([v[0] for v in victims])
        return victims

    def _delete_batches(self, keys: Sequence[int]) -> None:
        self._conn.executemany("DELETE FROM batches WHERE batch_key = ?", [(k,) for k in keys])
        self._conn.executemany(
            "DELETE FROM chunks WHERE chunk_key >= ? AND chunk_key < ?",
            [(k << ROW_BITS, (k + 1) << ROW_BITS) for k in keys],
        )

    def _drop(
        self, victims: Sequence[tuple[int, str, str, int]], into: dict[ModelVersion, int]
    ) -> None:
        """In-memory side of deleting whole batches: counts, low-water marks, unmatched."""
        with self._counts_lock:
            for batch_key, model, version, remaining in victims:
                index = self._indexes.get(model)
                if index is not None:
                    index.low_water = max(index.low_water, batch_key + 1)
                mv = (model, version)
                self._subtract({mv: remaining})
                if remaining:
                    into[mv] = into.get(mv, 0) + remaining
            self._batches -= len(victims)

    def _subtract(self, counts: Mapping[ModelVersion, int]) -> None:
        for mv, n in counts.items():
            left = self._pending.get(mv, 0) - n
            if left > 0:
                self._pending[mv] = left
            else:
                self._pending.pop(mv, None)

    def _mark_taken(
        self, locs: IntArray, known: Mapping[int, _BatchRow] | None = None
    ) -> tuple[dict[ModelVersion, int], int]:
        """Mark rows at ``locs`` taken; delete batches left empty. SQL only: returns the
        rows newly taken per (model, version) and the batches deleted, for the caller."""
        if len(locs) == 0:
            return {}, 0
        batch_keys = locs >> ROW_BITS
        counts: dict[ModelVersion, int] = {}
        updates: list[tuple[int, bytes, int]] = []
        deletes: list[int] = []
        rows_by_batch = _group(batch_keys, locs & ROW_MASK)
        wanted = list(rows_by_batch)
        metas = [known[k] for k in wanted] if known is not None else self._batch_rows(wanted)
        for meta in metas:
            rows = rows_by_batch[meta.batch_key]
            fresh, bitmap = _set_bits(meta.taken, meta.rows, rows)
            remaining = meta.remaining - fresh
            mv = (meta.model, meta.version)
            counts[mv] = counts.get(mv, 0) + fresh
            if remaining <= 0:
                deletes.append(meta.batch_key)
            else:
                updates.append((remaining, bitmap, meta.batch_key))
        self._conn.executemany(
            "UPDATE batches SET remaining = ?, taken = ? WHERE batch_key = ?", updates
        )
        self._delete_batches(deletes)
        return counts, len(deletes)

    def _batch_rows(self, keys: Sequence[int]) -> list[_BatchRow]:
        found: list[_BatchRow] = []
        for i in range(0, len(keys), _SQL_CHUNK):
            chunk = keys[i : i + _SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            found.extend(
                _BatchRow(*row)
                for row in self._conn.execute(
                    "SELECT batch_key, model, version, received_unix_nano, rows, remaining, "
                    f"taken, meta FROM batches WHERE batch_key IN ({marks})",
                    chunk,
                )
            )
        return found

    # -- take

    def take(self, model: str, ids: Sequence[str]) -> JoinedPredictions:
        """Remove and return the pending predictions of ``ids`` (row i answers ids[i])."""
        self._check_open()
        index = self._indexes.get(model)
        if index is None or len(ids) == 0:
            return JoinedPredictions.none_found(model, ids)
        keys = hash_ids(ids)
        slots, locs = index.find(keys)
        positions = np.flatnonzero(locs >= 0)
        if positions.size == 0:
            return JoinedPredictions.none_found(model, ids)
        # A repeated id joins once: its first occurrence.
        _, first = np.unique(slots[positions], return_index=True)
        if first.size != positions.size:
            positions = np.sort(positions[first])
        locs = locs[positions]
        with self._call(f"joining {len(ids)} outcomes of model {model!r}"):
            batch_keys, batch_of = np.unique(locs >> ROW_BITS, return_inverse=True)
            rows_by_key = {row.batch_key: row for row in self._batch_rows(batch_keys.tolist())}
            batches: list[_BatchRow] = []
            shared: list[BatchMeta] = []
            for key in batch_keys.tolist():
                row = rows_by_key.get(key)
                if row is None:
                    raise CorruptStoreError(
                        self._where, f"batch {key} of model {model!r} is indexed but missing"
                    )
                try:
                    shared.append(decode_meta(row.meta))
                except (ValueError, KeyError, TypeError, AttributeError) as error:
                    raise self._corrupt(key, model, f"meta: {error}") from error
                batches.append(row)
            rows = locs & ROW_MASK
            chunk_rows = np.array([meta.chunk_rows for meta in shared], dtype=np.int64)[batch_of]
            starts = rows - rows % chunk_rows
            chunk_keys, chunk_of = np.unique(
                ((locs >> ROW_BITS) << ROW_BITS) | starts, return_inverse=True
            )
            view = self._chunk_view(chunk_keys.tolist(), model)
            rows -= starts
            try:
                # Keys are hashes: confirm the stored id (a 2^-64 collision stays an orphan).
                same = view.matches(chunk_of, rows, [ids[p] for p in positions.tolist()])
                if not same.all():
                    positions, locs, rows = positions[same], locs[same], rows[same]
                    batch_of, chunk_of = batch_of[same], chunk_of[same]
                joined = _assemble(
                    model, ids, positions, batches, shared, batch_of, view, chunk_of, rows
                )
            except (ValueError, UnicodeDecodeError) as error:
                raise self._corrupt(batch_keys.tolist(), model, error) from error
            counts, emptied = self._mark_taken(locs, rows_by_key)
        index.remove(slots[positions])
        with self._counts_lock:
            self._subtract(counts)
            self._batches -= emptied
        return joined

    def _chunk_view(self, keys: list[int], model: str) -> _ChunkView:
        """The chunks ``keys`` (in that order) laid side by side, from the cache or the file."""
        found: dict[int, bytes] = {}
        missing = []
        for key in keys:
            hit = self._cache.get(key)
            if hit is None:
                missing.append(key)
            else:
                self._cache.move_to_end(key)
                found[key] = hit
        for i in range(0, len(missing), _SQL_CHUNK):
            part = missing[i : i + _SQL_CHUNK]
            marks = ",".join("?" * len(part))
            found.update(
                self._conn.execute(
                    f"SELECT chunk_key, data FROM chunks WHERE chunk_key IN ({marks})", part
                )
            )
        for key in missing:
            if key not in found:
                raise self._corrupt(key >> ROW_BITS, model, "a chunk is missing", key)
            self._cache[key] = found[key]
        while len(self._cache) > self._cache_chunks:
            self._cache.popitem(last=False)
        try:
            return _ChunkView([found[key] for key in keys])
        except ValueError as error:
            raise self._corrupt(sorted({key >> ROW_BITS for key in keys}), model, error) from error

    # -- expire, forget, counts

    def expire(self, now_unix_nano: int) -> dict[ModelVersion, int]:
        """Drop batches received more than the TTL ago (oldest first); return unmatched
        counts: those rows plus every row evicted by ``max_pending`` since the last call."""
        self._check_open()
        cutoff = now_unix_nano - self.ttl_ns
        victims: list[tuple[int, str, str, int]] = []
        with self._call("expiring predictions past the TTL"):
            after, done = 0, False
            while not done:
                chunk = self._conn.execute(
                    "SELECT batch_key, model, version, remaining, received_unix_nano FROM batches "
                    "WHERE batch_key > ? ORDER BY batch_key LIMIT ?",
                    (after, _EVICT_CHUNK),
                ).fetchall()
                done = len(chunk) < _EVICT_CHUNK
                for batch_key, model, version, remaining, received in chunk:
                    # Stop at the first batch within the TTL: expiry follows arrival order,
                    # which keeps every model's live batches a suffix (see IdIndex.low_water).
                    if received >= cutoff:
                        done = True
                        break
                    victims.append((batch_key, model, version, remaining))
                if chunk:
                    after = chunk[-1][0]
            self._delete_batches([v[0] for v in victims])
        unmatched, self._unmatched = self._unmatched, {}
        self._drop(victims, unmatched)
        self._expired_total += sum(v[3] for v in victims)
        return unmatched

    def forget(self, model: str) -> int:
        """Drop every pending prediction of ``model`` (not counted as unmatched)."""
        self._check_open()
        with self._call(f"forgetting model {model!r}"):
            keys = [
                key
                for (key,) in self._conn.execute(
                    "SELECT batch_key FROM batches WHERE model = ?", (model,)
                )
            ]
            self._delete_batches(keys)
        deleted = len(keys)
        self._indexes.pop(model, None)
        self._cache.clear()
        with self._counts_lock:
            forgotten = {mv: n for mv, n in self._pending.items() if mv[0] == model}
            self._subtract(forgotten)
            self._batches -= deleted
        self._unmatched = {mv: n for mv, n in self._unmatched.items() if mv[0] != model}
        return sum(forgotten.values())

    def pending_count(self, model: str | None = None, version: str | None = None) -> int:
        with self._counts_lock:
            return sum(
                n
                for (m, v), n in self._pending.items()
                if (model is None or m == model) and (version is None or v == version)
            )

    def pending_by_version(self) -> dict[ModelVersion, int]:
        with self._counts_lock:
            return dict(self._pending)

    def stats(self) -> StoreStats:
        with self._counts_lock:
            pending = sum(self._pending.values())
            batches = self._batches
        file_bytes = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                file_bytes += Path(f"{self.path}{suffix}").stat().st_size
        return StoreStats(
            pending=pending,
            batches=batches,
            evicted=self._evicted_total,
            expired=self._expired_total,
            replaced=self._replaced_total,
            index_bytes=sum(index.nbytes for index in list(self._indexes.values())),
            file_bytes=file_bytes,
        )

    def checkpoint(self) -> None:
        """Copy the WAL into the database file now and truncate it (SQLite also does this
        on its own every ``wal_autocheckpoint_pages``); e.g. when idle or before a backup."""
        self._check_open()
        try:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as error:
            raise _translate(error, self._where, "checkpointing") from error

    def close(self) -> None:
        """Checkpoint and close the file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._conn.close()


# -- helpers --------------------------------------------------------------------------------


def _taken_mask(taken: bytes | None, rows: int) -> npt.NDArray[np.bool_]:
    if taken is None:
        return np.zeros(rows, dtype=np.bool_)
    bits = np.unpackbits(np.frombuffer(taken, dtype=np.uint8), count=rows, bitorder="little")
    return bits.astype(np.bool_)


def _set_bits(taken: bytes | None, rows: int, set_rows: IntArray) -> tuple[int, bytes]:
    """Set ``set_rows`` in the taken bitmap; (how many were not yet set, the new bitmap)."""
    if len(set_rows) > 32:
        mask = _taken_mask(taken, rows)
        fresh = int(np.count_nonzero(~mask[set_rows]))
        mask[set_rows] = True
        return fresh, np.packbits(mask, bitorder="little").tobytes()
    bits = bytearray(taken) if taken is not None else bytearray((rows + 7) // 8)
    fresh = 0
    for row in set_rows.tolist():
        byte, bit = row >> 3, 1 << (row & 7)
        if not bits[byte] & bit:
            bits[byte] |= bit
            fresh += 1
    return fresh, bytes(bits)


def _last_of_each_key(rows: IntArray, keys: UIntArray) -> tuple[IntArray, UIntArray]:
    """Keep the last row of each repeated key (a later duplicate replaces an earlier one)."""
    ordered = np.sort(keys)
    if not np.any(ordered[1:] == ordered[:-1]):
        return rows, keys
    _, last_reversed = np.unique(keys[::-1], return_index=True)
    keep = np.sort(len(keys) - 1 - last_reversed)
    return rows[keep], keys[keep]


def _group(batch_keys: IntArray, values: IntArray) -> dict[int, IntArray]:
    """values split by batch key (stable within each batch)."""
    if len(batch_keys) and batch_keys[0] == batch_keys[-1] and np.all(batch_keys == batch_keys[0]):
        return {int(batch_keys[0]): values}
    order = np.argsort(batch_keys, kind="stable")
    sorted_keys = batch_keys[order]
    cuts = np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1
    return {
        int(sorted_keys[start]): values[part]
        for start, part in zip(np.r_[0, cuts], np.split(order, cuts), strict=True)
    }


_SECTION_FLAGS = tuple(_SECTION_NAMES)
_SECTION = {flag: i for i, flag in enumerate(_SECTION_FLAGS)}


class _ChunkView:
    """Several chunks joined into one buffer, so that a column of any set of their rows is
    one vectorised gather: no per-chunk Python work (a scattered join touches hundreds).

    Headers are read vectorised too; each chunk's CRC was checked when the file was opened
    (chunks written since are this process's own).
    """

    def __init__(self, blobs: list[bytes]) -> None:
        # Zero padding: the section-length gather may read past the last, short header.
        self.buffer = b"".join([*blobs, bytes(4 * len(_SECTION_FLAGS))])
        self.bytes = np.frombuffer(self.buffer, dtype=np.uint8)
        sizes = np.array([len(blob) for blob in blobs], dtype=np.int64)
        bases = np.cumsum(sizes) - sizes
        header = self.bytes[bases[:, None] + np.arange(_CHUNK_HEADER.size)]
        magic_ok = (header[:, :4] == np.frombuffer(_CHUNK_MAGIC, dtype=np.uint8)).all(axis=1)
        if not (magic_ok & (header[:, 4] == PAYLOAD_FORMAT)).all():
            raise ValueError(f"a chunk is not in payload format {PAYLOAD_FORMAT}")
        flags = header[:, 5].astype(np.int64)
        self.rows = np.ascontiguousarray(header[:, 8:12]).view("<u4").ravel().astype(np.int64)
        present = (flags[:, None] >> np.arange(len(_SECTION_FLAGS))) & 1
        count = present.sum(axis=1)
        lengths = self._u32(
            bases[:, None] + _CHUNK_HEADER.size + 4 * np.arange(len(_SECTION_FLAGS))
        )
        lengths = np.where(np.arange(len(_SECTION_FLAGS)) < count[:, None], lengths, 0)
        # The i-th length belongs to the i-th present section: spread them by section flag.
        rank = np.cumsum(present, axis=1) - 1
        by_section = np.where(present == 1, np.take_along_axis(lengths, np.maximum(rank, 0), 1), 0)
        starts = bases[:, None] + _CHUNK_HEADER.size + 4 * count[:, None]
        starts = starts + np.cumsum(by_section, axis=1) - by_section
        if not (starts[:, -1] + by_section[:, -1] == bases + sizes).all():
            raise ValueError("a chunk's section lengths do not add up to its size")
        # Absolute start and length of each section in the buffer; -1 where a chunk lacks it.
        self.sections = np.where(present == 1, starts, -1)
        self.lengths = by_section

    def _u32(self, at: IntArray) -> IntArray:
        raw = self.bytes[at[..., None] + np.arange(4)]
        return raw.view("<u4")[..., 0].astype(np.int64)

    def _present(self, flag: int, chunk_of: IntArray) -> tuple[IntArray, IntArray]:
        starts = self.sections[chunk_of, _SECTION[flag]]
        return np.flatnonzero(starts >= 0), starts

    def fixed(
        self, flag: int, chunk_of: IntArray, rows: IntArray, width: int, dtype: str
    ) -> tuple[IntArray, Any]:
        """(which rows have the section, their values: ``width`` bytes each as ``dtype``)."""
        have, starts = self._present(flag, chunk_of)
        chunks = chunk_of[have]
        if np.any(self.lengths[chunks, _SECTION[flag]] != self.rows[chunks] * width):
            raise ValueError(f"{_SECTION_NAMES[flag]}: not {width} bytes a row in every chunk")
        first = starts[have] + rows[have] * width
        raw = self.bytes[first[:, None] + np.arange(width)]
        return have, raw.view(dtype)

    def _bounds(
        self, flag: int, chunk_of: IntArray, rows: IntArray
    ) -> tuple[IntArray, list[int], list[int]]:
        have, starts = self._present(flag, chunk_of)
        offsets, r = starts[have], rows[have]
        ends = self._u32(offsets + 4 * r)
        begins = np.where(r > 0, self._u32(offsets + 4 * np.maximum(r - 1, 0)), 0)
        text = offsets + 4 * self.rows[chunk_of[have]]
        return have, (text + begins).tolist(), (text + ends).tolist()

    def strings(self, flag: int, chunk_of: IntArray, rows: IntArray) -> tuple[IntArray, list[str]]:
        """(which rows have the section, their strings)."""
        have, begins, ends = self._bounds(flag, chunk_of, rows)
        buffer = self.buffer
        raws = [buffer[a:b] for a, b in zip(begins, ends, strict=True)]
        # Labels repeat: decode each distinct byte string once.
        decoded = {raw: raw.decode("utf-8", "surrogatepass") for raw in set(raws)}
        return have, [decoded[raw] for raw in raws]

    def matches(
        self, chunk_of: IntArray, rows: IntArray, wanted: list[str]
    ) -> npt.NDArray[np.bool_]:
        """Whether the stored id of each row is the one wanted."""
        have, begins, ends = self._bounds(_IDS, chunk_of, rows)
        if len(have) != len(rows):
            raise ValueError("a chunk has no ids")
        buffer = self.buffer
        stored = [buffer[a:b] for a, b in zip(begins, ends, strict=True)]
        # All equal (the usual case): one comparison of the joined bytes, lengths included.
        joined = "".join(wanted)
        if joined.isascii() and b"".join(stored) == joined.encode("ascii"):
            lengths = np.fromiter(map(len, wanted), dtype=np.int64, count=len(wanted))
            if np.array_equal(lengths, np.subtract(ends, begins)):
                return np.ones(len(rows), dtype=np.bool_)
        return np.fromiter(
            (
                raw == id_.encode("utf-8", "surrogatepass")
                for raw, id_ in zip(stored, wanted, strict=True)
            ),
            dtype=np.bool_,
            count=len(rows),
        )


def _assemble(
    model: str,
    ids: Sequence[str],
    positions: IntArray,
    batches: list[_BatchRow],
    shared: list[BatchMeta],
    batch_of: IntArray,
    view: _ChunkView,
    chunk_of: IntArray,
    rows: IntArray,
) -> JoinedPredictions:
    """The joined rows (``rows`` of chunks ``chunk_of``) placed at ``positions`` of the answer."""
    out = JoinedPredictions.none_found(model, ids)
    out.found[positions] = True
    out.received_unix_nano[positions] = np.array(
        [batch.received_unix_nano for batch in batches], dtype=np.int64
    )[batch_of]
    out.weights[positions] = np.array([meta.weight for meta in shared])[batch_of]
    for flag, target, dtype in (
        (_TIMESTAMPS, out.timestamps_unix_nano, "<i8"),
        (_SCORES, out.scores, "<f8"),
    ):
        have, values = view.fixed(flag, chunk_of, rows, 8, dtype)
        target[positions[have]] = values.ravel()
    for flag, matrix, width in ((_TRACE_IDS, out.trace_ids, 16), (_SPAN_IDS, out.span_ids, 8)):
        have, values = view.fixed(flag, chunk_of, rows, width, "u1")
        matrix[positions[have]] = values
    have, labels = view.strings(_LABELS, chunk_of, rows)
    probabilities, class_names = _probabilities(
        len(ids), positions, shared, batch_of, view, chunk_of, rows
    )
    return dataclasses.replace(
        out,
        labels=scatter(out.labels, positions[have], labels),
        # Values a batch shares, by the batch each row came from.
        versions=scatter(out.versions, positions, [batch.version for batch in batches], batch_of),
        attributes=scatter(
            out.attributes, positions, [meta.attributes for meta in shared], batch_of
        ),
        probabilities=probabilities,
        class_names=class_names,
    )


def _probabilities(
    n: int,
    positions: IntArray,
    shared: list[BatchMeta],
    batch_of: IntArray,
    view: _ChunkView,
    chunk_of: IntArray,
    rows: IntArray,
) -> tuple[npt.NDArray[np.float64] | None, tuple[str, ...]]:
    """Probabilities aligned by class name, over batches that may order classes differently."""
    union: dict[str, int] = {}
    groups: dict[tuple[str, ...], list[int]] = {}
    for b, meta in enumerate(shared):
        if meta.class_names:
            groups.setdefault(meta.class_names, []).append(b)
    parts = []
    for names, members in groups.items():
        selected = np.flatnonzero(np.isin(batch_of, members))
        have, values = view.fixed(
            _PROBABILITIES, chunk_of[selected], rows[selected], 8 * len(names), "<f8"
        )
        if len(have):
            targets = [union.setdefault(name, len(union)) for name in names]
            parts.append(
                (positions[selected[have]], targets, values.reshape(len(have), len(names)))
            )
    if not parts:
        return None, ()
    out = np.full((n, len(union)), np.nan)
    for where, targets, values in parts:
        out[where[:, None], np.array(targets)[None, :]] = values
    return out, tuple(union)
