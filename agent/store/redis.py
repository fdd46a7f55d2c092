"""Redis pending store: one store shared by every replica, so an outcome joins its prediction
whichever replica each of them reached.

    store = RedisPendingPredictions("redis://redis.internal:6379/0", key_prefix="mlsidecar")
    store.put(PendingBatch("churn", "v1", ids=["a", "b"], received_unix_nano=now,
                           scores=np.array([0.2, 0.9])))
    joined = store.take("churn", ["a", "x"])      # joined.found == [True, False]

Every call is one Lua script (one round trip, atomic in Redis): a put stores a whole batch,
a take removes and returns what it finds, so two replicas taking the same id cannot both
join it. A take is two-phase: it keeps what it took under a claim id made by the agent
until the next call acknowledges it, so a take whose reply is lost gives its rows back
instead of losing those joins (docs/store.md, "Takes are two-phase").

Per prediction, a hash field ``id -> batch key + packed outputs`` (no feature values); what
a batch's rows share (version, receipt time, weight, class names, segment attributes) once
per batch. Key layout, TTL and counts: docs/store.md ("Redis backend").

Semantics are those of ``SqlitePendingPredictions`` (tests run the same scenarios on both):
a duplicate id replaces the older prediction, ``expire`` counts expired and evicted rows as
unmatched per (model, version) exactly once across replicas, ``max_pending`` evicts the
oldest whole batches, ``forget`` drops a model. Durability is the Redis server's: a put is
acknowledged once Redis has applied it, and survives what Redis's persistence settings let
it survive (RDB snapshots, AOF with appendfsync, replicas).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import threading
import types
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import redis
import redis.backoff
import redis.commands.core
import redis.exceptions
import redis.retry

from agent.store.pending import (
    CorruptStoreError,
    IntArray,
    JoinedPredictions,
    ModelVersion,
    PendingBatch,
    StoreClosedError,
    StoreError,
    StoreFullError,
    StoreSchemaError,
    StoreStats,
    scatter,
)
from agent.store.sqlite import encode_strings

T = TypeVar("T")

# The key layout and value formats below; bump it (and refuse older data) when they change.
SCHEMA_VERSION = 1
DEFAULT_TTL_S = 7 * 86400.0
DEFAULT_MAX_PENDING = 1_000_000
DEFAULT_KEY_PREFIX = "mlsidecar"
# Keys not touched by a put for TTL + this long are dropped by Redis itself: a safety net
# for data no agent sweeps any more (e.g. a retired deployment), never the TTL itself.
MIN_SAFETY_MARGIN_S = 86400.0
# Batches dropped per expire script: keeps each script (which blocks Redis) short.
EXPIRE_BATCHES_PER_CALL = 32
# A take's claim not settled within this long is given back to pending by any replica's
# expire sweep: its agent never got the rows (or died before it could say so).
DEFAULT_CLAIM_TIMEOUT_S = 60.0
MIN_REDIS = (7, 0)

# A stored row: batch key (16 hex digits), then this head, then probabilities (8 bytes per
# class of the batch), then the label (UTF-8, the rest of the value).
BATCH_KEY_BYTES = 16
ROW_HEAD = np.dtype(
    [("timestamp", "<i8"), ("score", "<f8"), ("trace_id", "u1", (16,)), ("span_id", "u1", (8,))]
)
_HEAD_START = BATCH_KEY_BYTES
_HEAD_END = BATCH_KEY_BYTES + ROW_HEAD.itemsize


class RedisUnavailableError(StoreError, ConnectionError):
    """Redis cannot be reached, timed out, or refuses writes for now: retry later.

    Also a ``ConnectionError`` (an ``OSError``), so ``mlsidecar run`` reports a Redis that is
    down at start as "cannot start" (exit code 1) with this message.
    """


# -- Lua ------------------------------------------------------------------------------------

# Shared by every script. ARGV[1] is the key prefix, ARGV[2] the schema version.
_PRELUDE = """
local P = ARGV[1]
local CHUNK = 1000  -- ids per HMGET/HSET/HDEL: unpack() is bounded by the Lua C stack
local CLAIM_ID_CHARS = 32  -- a take's claim id: 32 hex digits, made by the agent

local function mkey(model, what) return P .. ':m:' .. model .. ':' .. what end

local function schema_mismatch()
  local found = redis.call('GET', P .. ':schema')
  if not found then
    redis.call('SET', P .. ':schema', ARGV[2])
    return nil
  end
  if found ~= ARGV[2] then return found end
  return nil
end

-- Strings sent or stored as n uint32 end offsets (little-endian), then their bytes. The
-- offsets are read 200 at a time: one struct.unpack call per offset costs a third more.
local function unpack_strings(ends, text)
  local out, at, n = {}, 0, #ends / 4
  for lo = 1, n, 200 do
    local m = math.min(200, n - lo + 1)
    local e = {struct.unpack('<' .. string.rep('I4', m), ends, 4 * lo - 3)}
    for j = 1, m do
      out[lo + j - 1] = string.sub(text, at + 1, e[j])
      at = e[j]
    end
  end
  return out
end

local function slice(list, lo, hi)
  local part = {}
  for i = lo, math.min(hi, #list) do part[#part + 1] = list[i] end
  return part
end

-- End offsets as unpack_strings reads them, 200 a struct.pack call.
local function pack_ends(ends)
  local packed = {}
  for lo = 1, #ends, 200 do
    local part = slice(ends, lo, lo + 199)
    packed[#packed + 1] = struct.pack('<' .. string.rep('I4', #part), unpack(part))
  end
  return table.concat(packed)
end

local function add_pending(model, version, n)
  local key = mkey(model, 'pending')
  if redis.call('HINCRBY', key, version, n) <= 0 then redis.call('HDEL', key, version) end
  redis.call('INCRBY', P .. ':total', n)
end

-- Its own field rather than read from the meta JSON: cjson.decode costs ~10 us a call.
local function batch_version(model, bk)
  return redis.call('HGET', mkey(model, 'version'), bk)
end

local function remove_batch(model, bk)
  redis.call('HDEL', mkey(model, 'meta'), bk)
  redis.call('HDEL', mkey(model, 'version'), bk)
  redis.call('HDEL', mkey(model, 'rows'), bk)
  redis.call('HDEL', mkey(model, 'left'), bk)
  redis.call('ZREM', P .. ':batches', bk .. model)
  if redis.call('HLEN', mkey(model, 'left')) == 0 then redis.call('SREM', P .. ':models', model) end
end

-- n rows of batch bk stopped being pending (taken or replaced): not unmatched.
local function release(model, bk, n)
  local version = batch_version(model, bk)
  if not version then return end
  add_pending(model, version, -n)
  if redis.call('HINCRBY', mkey(model, 'left'), bk, -n) <= 0 then remove_batch(model, bk) end
end

-- Drop a whole batch (expired or evicted): its rows still pending go. Returns version, rows.
local function drop_batch(model, bk)
  local version = batch_version(model, bk)
  if not version then
    redis.call('ZREM', P .. ':batches', bk .. model)
    return nil, 0
  end
  local left = tonumber(redis.call('HGET', mkey(model, 'left'), bk) or 0)
  local packed = redis.call('HGET', mkey(model, 'rows'), bk)
  if left > 0 and packed then
    local ids_key = mkey(model, 'ids')
    local n = struct.unpack('<I4', packed)
    local ids = unpack_strings(string.sub(packed, 5, 4 + 4 * n), string.sub(packed, 5 + 4 * n))
    for lo = 1, #ids, CHUNK do
      local part = slice(ids, lo, lo + CHUNK - 1)
      local values = redis.call('HMGET', ids_key, unpack(part))
      local mine = {}
      for j = 1, #part do
        -- An id re-sent in a later batch belongs to that batch now.
        if values[j] and string.sub(values[j], 1, 16) == bk then mine[#mine + 1] = part[j] end
      end
      if #mine > 0 then redis.call('HDEL', ids_key, unpack(mine)) end
    end
  end
  if left > 0 then add_pending(model, version, -left) end
  remove_batch(model, bk)
  return version, left
end

local function unmatched_field(model, version) return #model .. ':' .. model .. version end

-- Milliseconds by the Redis server's clock: every replica ages claims by the same clock.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Settle a take's claim (key P:claim:<id>), whose rows the take removed as a take always did
-- (no longer pending). 'acked': the taker has them, drop the claim. 'cancelled': it never
-- got them, so each row goes back to pending (its batch re-created if the take emptied it),
-- unless the id was re-sent since (the newer prediction stands, as after a put); forget
-- deletes its model's claims. A cancelled claim leaves a tombstone for tomb_ms, so that a
-- late copy of its take script (still on its way when the taker gave up) takes nothing.
-- Returns the model whose rows came back, if any.
local function settle(id, how, tomb_ms, keep_ms)
  local claim = P .. ':claim:' .. id
  redis.call('ZREM', P .. ':claims', id)
  local state = redis.call('HGET', claim, 'state')
  if how == 'acked' then
    if state == 'open' then redis.call('DEL', claim) end
    return nil  -- (an acknowledgement may be resent after a lost reply: then no claim)
  end
  if state and state ~= 'open' then return nil end
  redis.call('HSET', claim, 'state', how)  -- a tombstone too when the take never ran
  if not state then
    redis.call('PEXPIRE', claim, tomb_ms)
    return nil
  end
  local r = redis.call('HMGET', claim, 'model', 'mask', 'found', 'ends', 'id_ends', 'id_text',
                       'meta_keys', 'meta_ends', 'metas')
  redis.call('HDEL', claim, 'model', 'mask', 'found', 'ends', 'id_ends', 'id_text', 'meta_keys',
             'meta_ends', 'metas', 'at')
  redis.call('PEXPIRE', claim, tomb_ms)
  local model = r[1]
  local metas, listed = {}, unpack_strings(r[8], r[9])
  for i = 1, #listed do metas[string.sub(r[7], 16 * i - 15, 16 * i)] = listed[i] end
  local ids_key = mkey(model, 'ids')
  local wanted, values, mask, j = unpack_strings(r[5], r[6]), unpack_strings(r[4], r[3]), r[2], 0
  local back, order = {}, {}
  for k = 1, #mask do
    if string.byte(mask, k) == 49 then  -- '1'
      j = j + 1
      local value = values[j]
      if redis.call('HSETNX', ids_key, wanted[k], value) == 1 then
        local bk = string.sub(value, 1, 16)
        if not back[bk] then
          back[bk] = {}
          order[#order + 1] = bk
        end
        back[bk][#back[bk] + 1] = wanted[k]
      end
    end
  end
  for _, bk in ipairs(order) do
    local ids, version = back[bk], batch_version(model, bk)
    if version then
      redis.call('HINCRBY', mkey(model, 'left'), bk, #ids)
    else  -- the take emptied the batch: re-create it with the rows given back
      local meta = metas[bk]
      version = cjson.decode(string.sub(meta, 21)).version
      local ends, total = {}, 0
      for i = 1, #ids do
        total = total + #ids[i]
        ends[i] = total
      end
      redis.call('HSET', mkey(model, 'meta'), bk, meta)
      redis.call('HSET', mkey(model, 'version'), bk, version)
      redis.call('HSET', mkey(model, 'rows'), bk,
                 struct.pack('<I4', #ids) .. pack_ends(ends) .. table.concat(ids))
      redis.call('HSET', mkey(model, 'left'), bk, #ids)
      redis.call('ZADD', P .. ':batches', string.sub(meta, 1, 20), bk .. model)
      redis.call('SADD', P .. ':models', model)
    end
    add_pending(model, version, #ids)
  end
  for _, what in ipairs({'ids', 'meta', 'version', 'rows', 'left', 'pending'}) do
    redis.call('PEXPIRE', mkey(model, what), keep_ms)
  end
  return model
end

local function counts(models)
  local out = {}
  for model in pairs(models) do
    out[#out + 1] = model
    out[#out + 1] = redis.call('HGETALL', mkey(model, 'pending'))
  end
  return out
end
"""

# ARGV: prefix, schema, model, version, received ns, meta JSON, max_pending, safety ms,
# ids (uint32 ends, bytes; unique), rows' fixed part (bytes, width), labels (ends, bytes;
# both empty without labels). Whole columns rather than an argument per row: packing and
# parsing thousands of arguments cost the client more than the script costs Redis.
_PUT = """
local bad = schema_mismatch()
if bad then return redis.error_reply('MLSIDECAR_SCHEMA ' .. bad) end
local model, version, received, meta = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local max_pending, keep_ms = tonumber(ARGV[7]), tonumber(ARGV[8])
local id_ends, id_text, fixed, width = ARGV[9], ARGV[10], ARGV[11], tonumber(ARGV[12])
local labels = unpack_strings(ARGV[13], ARGV[14])
local ids_key = mkey(model, 'ids')
local bk = string.format('%016x', redis.call('INCR', P .. ':seq'))
local ids = unpack_strings(id_ends, id_text)
local older = {}
for lo = 1, #ids, CHUNK do
  local fields, pairs_ = {}, {}
  for i = lo, math.min(lo + CHUNK - 1, #ids) do
    fields[#fields + 1] = ids[i]
    pairs_[#pairs_ + 1] = ids[i]
    pairs_[#pairs_ + 1] = bk .. string.sub(fixed, (i - 1) * width + 1, i * width) .. (labels[i] or '')
  end
  local previous = redis.call('HMGET', ids_key, unpack(fields))
  for j = 1, #fields do
    if previous[j] then
      local old = string.sub(previous[j], 1, 16)
      older[old] = (older[old] or 0) + 1
    end
  end
  redis.call('HSET', ids_key, unpack(pairs_))
end
redis.call('HSET', mkey(model, 'meta'), bk, meta)
redis.call('HSET', mkey(model, 'version'), bk, version)
redis.call('HSET', mkey(model, 'rows'), bk, struct.pack('<I4', #ids) .. id_ends .. id_text)
redis.call('HSET', mkey(model, 'left'), bk, #ids)
redis.call('ZADD', P .. ':batches', received, bk .. model)
redis.call('SADD', P .. ':models', model)
add_pending(model, version, #ids)
local replaced = 0
for old, n in pairs(older) do
  release(model, old, n)
  replaced = replaced + n
end
local touched, evicted = {[model] = true}, 0
while tonumber(redis.call('GET', P .. ':total') or 0) > max_pending do
  local oldest = redis.call('ZRANGE', P .. ':batches', 0, 0)[1]
  if not oldest then break end
  local victim = string.sub(oldest, 17)
  local victim_version, left = drop_batch(victim, string.sub(oldest, 1, 16))
  if left > 0 then
    redis.call('HINCRBY', P .. ':unmatched', unmatched_field(victim, victim_version), left)
    evicted = evicted + left
  end
  touched[victim] = true
end
for _, what in ipairs({'ids', 'meta', 'version', 'rows', 'left', 'pending'}) do
  redis.call('PEXPIRE', mkey(model, what), keep_ms)
end
for _, what in ipairs({':batches', ':models', ':total', ':unmatched'}) do
  redis.call('PEXPIRE', P .. what, keep_ms)
end
return {bk, replaced, evicted, redis.call('ZCARD', P .. ':batches'), counts(touched)}
"""

# ARGV: prefix, schema, model, claim id, ids (uint32 ends, bytes), key TTL ms, the claim
# ids of earlier takes to acknowledge (joined; sent with this call rather than in a round
# trip of their own), tombstone ms. Returns a
# mask ("1" = found, per id), the found rows concatenated and their uint32 ends, the meta of
# every batch a row came from (batch key, JSON, ...), the number of batches, and the model's
# pending counts. Two-phase: the found rows leave the ids hash (no other take gets them) for
# the claim P:claim:<claim id>, which keeps this reply; they stay counted pending until the
# claim is settled (``settle``). A retry with the same claim id gets the same reply.
_TAKE = """
local bad = schema_mismatch()
if bad then return redis.error_reply('MLSIDECAR_SCHEMA ' .. bad) end
local model, claim_id = ARGV[3], ARGV[4]
local claim = P .. ':claim:' .. claim_id
local touched = {[model] = true}  -- whose pending counts the reply carries
local acks = ARGV[8]
for at = 1, #acks, CLAIM_ID_CHARS do
  settle(string.sub(acks, at, at + CLAIM_ID_CHARS - 1), 'acked')
end
local state = redis.call('HGET', claim, 'state')
if state == 'open' then  -- the retry of a take whose reply was lost: the same rows again
  local r = redis.call('HMGET', claim, 'mask', 'found', 'ends', 'meta_keys', 'meta_ends', 'metas')
  return {r[1], r[2], r[3], r[4], r[5], r[6], redis.call('ZCARD', P .. ':batches'),
          counts(touched)}
end
local ids_key = mkey(model, 'ids')
local wanted = unpack_strings(ARGV[5], ARGV[6])
if state then  -- settled (cancelled) before this late copy ran: it takes nothing
  return {string.rep('0', #wanted), '', '', '', '', '', redis.call('ZCARD', P .. ':batches'),
          counts(touched)}
end
local rows, seen, taken, order = {}, {}, {}, {}
for lo = 1, #wanted, CHUNK do
  local fields = slice(wanted, lo, lo + CHUNK - 1)
  local values = redis.call('HMGET', ids_key, unpack(fields))
  local hits = {}
  for j = 1, #fields do
    local value, id, k = values[j], fields[j], lo + j - 1
    if value and not seen[id] then  -- an id repeated in one take joins once
      seen[id] = true
      hits[#hits + 1] = id
      rows[k] = value
      local bk = string.sub(value, 1, 16)
      local at = taken[bk]
      if not at then
        at = {}
        taken[bk] = at
        order[#order + 1] = bk
      end
      at[#at + 1] = k
    else
      rows[k] = false
    end
  end
  if #hits > 0 then redis.call('HDEL', ids_key, unpack(hits)) end
end
local meta_keys, meta_ends, metas, claimed = {}, {}, {}, false
for _, bk in ipairs(order) do
  local meta = redis.call('HGET', mkey(model, 'meta'), bk)
  if meta then
    meta_keys[#meta_keys + 1] = bk
    metas[#metas + 1] = meta
    meta_ends[#meta_ends + 1] = (meta_ends[#meta_ends] or 0) + #meta
    release(model, bk, #taken[bk])
    claimed = true
  else  -- a row whose batch is gone (dropped by the safety expiry): not a prediction
    for _, k in ipairs(taken[bk]) do rows[k] = false end
  end
end
local mask, found, ends, total = {}, {}, {}, 0
for k = 1, #wanted do
  local value = rows[k]
  if value then
    mask[k] = '1'
    found[#found + 1] = value
    total = total + #value
    ends[#ends + 1] = total
  else
    mask[k] = '0'
  end
end
local reply = {table.concat(mask), table.concat(found), pack_ends(ends), table.concat(meta_keys),
               pack_ends(meta_ends), table.concat(metas)}
if claimed then
  local at = now_ms()
  redis.call('HSET', claim, 'state', 'open', 'model', model, 'at', at, 'mask', reply[1],
             'found', reply[2], 'ends', reply[3], 'meta_keys', reply[4], 'meta_ends', reply[5],
             'metas', reply[6], 'id_ends', ARGV[5], 'id_text', ARGV[6])
  redis.call('PEXPIRE', claim, tonumber(ARGV[7]))
  redis.call('ZADD', P .. ':claims', at, claim_id)
  redis.call('PEXPIRE', P .. ':claims', tonumber(ARGV[7]))
end
reply[7] = redis.call('ZCARD', P .. ':batches')
reply[8] = counts(touched)
return reply
"""

# ARGV: prefix, schema, acked claim ids, cancelled claim ids (32 characters each, joined),
# tombstone ms, key TTL ms. Returns the pending counts of the models the claims touched, and
# the number of batches.
_SETTLE = """
local bad = schema_mismatch()
if bad then return redis.error_reply('MLSIDECAR_SCHEMA ' .. bad) end
local touched, tomb_ms, keep_ms = {}, tonumber(ARGV[5]), tonumber(ARGV[6])
for i, how in ipairs({'acked', 'cancelled'}) do
  local ids = ARGV[2 + i]
  for at = 1, #ids, CLAIM_ID_CHARS do
    local model = settle(string.sub(ids, at, at + CLAIM_ID_CHARS - 1), how, tomb_ms, keep_ms)
    if model then touched[model] = true end
  end
end
return {counts(touched), redis.call('ZCARD', P .. ':batches')}
"""

# ARGV: prefix, schema, cutoff (received ns; batches received before it expire), limit,
# claim timeout ms, key TTL ms. Returns expired (model, version, rows) triples, whether the
# sweep is done, and once done the rows evicted since the last sweep (field, rows) and every
# model's pending counts; last, the claims recovered: takes never settled within the claim
# timeout (their agent lost the reply and stopped, or died) give their rows back to pending.
_EXPIRE = """
local bad = schema_mismatch()
if bad then return redis.error_reply('MLSIDECAR_SCHEMA ' .. bad) end
local limit, claim_ms = tonumber(ARGV[4]), tonumber(ARGV[5])
local stale = redis.call('ZRANGEBYSCORE', P .. ':claims', '-inf', now_ms() - claim_ms,
                         'LIMIT', 0, limit)
for _, id in ipairs(stale) do settle(id, 'cancelled', claim_ms, tonumber(ARGV[6])) end
local victims = redis.call('ZRANGEBYSCORE', P .. ':batches', '-inf', '(' .. ARGV[3], 'LIMIT', 0, limit)
local expired = {}
for _, member in ipairs(victims) do
  local model = string.sub(member, 17)
  local version, left = drop_batch(model, string.sub(member, 1, 16))
  if left > 0 then
    expired[#expired + 1] = model
    expired[#expired + 1] = version
    expired[#expired + 1] = left
  end
end
if #victims >= limit then return {expired, 0, {}, 0, {}, #stale} end
local unmatched = redis.call('HGETALL', P .. ':unmatched')
redis.call('DEL', P .. ':unmatched')
local all, total = {}, 0
for _, model in ipairs(redis.call('SMEMBERS', P .. ':models')) do
  local pending = redis.call('HGETALL', mkey(model, 'pending'))
  for i = 2, #pending, 2 do total = total + tonumber(pending[i]) end
  all[#all + 1] = model
  all[#all + 1] = pending
end
-- Recounted from the per-model counts: repairs the total should the safety expiry have
-- dropped a model's keys.
redis.call('SET', P .. ':total', total, 'KEEPTTL')
return {expired, 1, unmatched, redis.call('ZCARD', P .. ':batches'), all, #stale}
"""

# ARGV: prefix, schema, model. Returns the rows dropped and the number of batches left.
_FORGET = """
local bad = schema_mismatch()
if bad then return redis.error_reply('MLSIDECAR_SCHEMA ' .. bad) end
local model = ARGV[3]
for _, bk in ipairs(redis.call('HKEYS', mkey(model, 'left'))) do
  redis.call('ZREM', P .. ':batches', bk .. model)
end
local n = 0
for _, v in ipairs(redis.call('HVALS', mkey(model, 'pending'))) do n = n + tonumber(v) end
for _, what in ipairs({'ids', 'meta', 'version', 'rows', 'left', 'pending'}) do
  redis.call('UNLINK', mkey(model, what))
end
redis.call('DECRBY', P .. ':total', n)
redis.call('SREM', P .. ':models', model)
-- Its takes' open claims go too (few: those not yet acknowledged), so that none is given
-- back later; an acknowledgement or a give-back then finds nothing to do.
for _, id in ipairs(redis.call('ZRANGE', P .. ':claims', 0, -1)) do
  if redis.call('HGET', P .. ':claim:' .. id, 'model') == model then
    redis.call('DEL', P .. ':claim:' .. id)
    redis.call('ZREM', P .. ':claims', id)
  end
end
local prefix = unmatched_field(model, '')
for _, field in ipairs(redis.call('HKEYS', P .. ':unmatched')) do
  if string.sub(field, 1, #prefix) == prefix then redis.call('HDEL', P .. ':unmatched', field) end
end
return {n, redis.call('ZCARD', P .. ':batches')}
"""

# ARGV: prefix, schema. Every model's pending counts and the number of batches (read only).
_COUNTS = """
local all = {}
for _, model in ipairs(redis.call('SMEMBERS', P .. ':models')) do
  all[#all + 1] = model
  all[#all + 1] = redis.call('HGETALL', mkey(model, 'pending'))
end
return {all, redis.call('ZCARD', P .. ':batches')}
"""


def _script(body: str, flags: str = "") -> str:
    # A shebang declares the script's flags (Redis 7): a script that may grow memory is
    # refused up front when Redis is out of memory, before it wrote anything.
    return f"#!lua{' flags=' + flags if flags else ''}\n{_PRELUDE}{body}"


# -- values ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _BatchMeta:
    """What every row of a stored batch shares but its receipt time (``meta``, JSON)."""

    version: str
    weight: float
    class_names: tuple[str, ...]
    attributes: Mapping[str, str]


def encode_meta(batch: PendingBatch) -> str:
    """The receipt time (20 digits), then the rest as JSON: the JSON is then the same for the
    batches of one version and segment, and a take decodes it once (``_decode_meta``)."""
    # Class names only with probabilities: a batch without them has no probability columns.
    class_names = list(batch.class_names) if batch.probabilities is not None else []
    shared = json.dumps(
        {
            "version": batch.version,
            "weight": float(batch.weight),
            "class_names": class_names,
            "attributes": dict(batch.attributes),
        },
        separators=(",", ":"),
        sort_keys=True,
        ensure_ascii=False,
    )
    return f"{int(batch.received_unix_nano):020d}{shared}"


@functools.lru_cache(maxsize=4096)
def _decode_meta(text: bytes) -> _BatchMeta:
    """Parsed once per distinct text: batches of one model mostly share theirs."""
    meta = json.loads(text)
    return _BatchMeta(
        version=str(meta["version"]),
        weight=float(meta["weight"]),
        class_names=tuple(str(name) for name in meta["class_names"]),
        attributes=types.MappingProxyType({str(k): str(v) for k, v in meta["attributes"].items()}),
    )


def _fixed_width(values: Sequence[bytes], size: int, what: str) -> Any:
    """``values`` (each ``size`` bytes or empty = none) as a rows x size uint8 matrix."""
    joined = b"".join(values)
    if len(joined) != size * len(values):
        for row, value in enumerate(values):
            if len(value) not in (0, size):
                raise ValueError(f"{what} of row {row}: {len(value)} bytes, expected {size}")
        joined = b"".join(value or bytes(size) for value in values)
    return np.frombuffer(joined, dtype=np.uint8).reshape(len(values), size)


def encode_fixed(batch: PendingBatch) -> tuple[bytes, int]:
    """Each row's fixed-width outputs, rows x width bytes: ``ROW_HEAD`` (timestamp, score,
    trace id, span id; fill values for columns not sent), then the probabilities."""
    n = batch.rows
    classes = len(batch.class_names) if batch.probabilities is not None else 0
    head = np.zeros(n, dtype=ROW_HEAD)
    if batch.timestamps_unix_nano is not None:
        head["timestamp"] = batch.timestamps_unix_nano
    head["score"] = np.nan if batch.scores is None else batch.scores
    if batch.trace_ids is not None:
        head["trace_id"] = _fixed_width(batch.trace_ids, 16, "trace id")
    if batch.span_ids is not None:
        head["span_id"] = _fixed_width(batch.span_ids, 8, "span id")
    width = ROW_HEAD.itemsize + 8 * classes
    block = np.empty((n, width), dtype=np.uint8)
    block[:, : ROW_HEAD.itemsize] = head.view(np.uint8).reshape(n, ROW_HEAD.itemsize)
    if classes:
        probabilities = np.ascontiguousarray(batch.probabilities, dtype="<f8")
        block[:, ROW_HEAD.itemsize :] = probabilities.view(np.uint8).reshape(n, 8 * classes)
    return block.tobytes(), width


def pack_strings(values: Sequence[str]) -> tuple[bytes, bytes]:
    """(uint32 end offsets, UTF-8 bytes) of ``values``, as the scripts unpack them."""
    text, ends = encode_strings(values)
    if len(ends) and ends[-1] >= 1 << 32:
        raise ValueError(f"{len(values)} strings take {ends[-1]} bytes, over 4 GiB")
    return ends.astype("<u4").tobytes(), text


def describe_url(url: str) -> str:
    """The server a Redis URL names, without credentials or query: 'redis://host:6379/0'."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port or 6379
    except ValueError:
        port = 6379
    return f"{parts.scheme}://{host}:{port}{parts.path}"


def _counts_of(reply: Sequence[Any]) -> dict[str, dict[str, int]]:
    """[model, [version, n, ...], ...] -> {model: {version: n}}."""
    out: dict[str, dict[str, int]] = {}
    for i in range(0, len(reply), 2):
        flat = reply[i + 1]
        out[reply[i].decode()] = {
            flat[j].decode(): int(flat[j + 1]) for j in range(0, len(flat), 2) if int(flat[j + 1])
        }
    return out


# -- the store ------------------------------------------------------------------------------


class RedisPendingPredictions:
    """The pending-prediction join store in Redis, shared by the replicas of a deployment.

    store = RedisPendingPredictions("redis://:password@redis:6379/0", key_prefix="fraud",
                                    ttl_s=7 * 86400, max_pending=1_000_000)
    store.put(batch); joined = store.take("churn", ids); unmatched = store.expire(now)

    Every replica of a deployment points at the same URL and ``key_prefix`` (and should
    share ``ttl_s`` and ``max_pending``: they apply to the store as a whole). A take's claim
    not acknowledged within ``claim_timeout_s`` (longer than the gap between this store's
    calls: the agent's expire sweep runs every ``store.expire_interval_s``) is given back
    to pending by any replica's ``expire``. Calls may
    come from any thread; ``GroupCommitPendingPredictions`` runs them on its writer thread
    like the SQLite store's. ``pending_count`` and ``stats`` read counts cached from the
    last call (every ``expire`` refreshes all models), so they cost no round trip.

    Errors: ``RedisUnavailableError`` (unreachable, timed out, loading, read-only replica),
    ``StoreFullError`` (Redis at ``maxmemory``: nothing of the put was stored),
    ``StoreSchemaError`` (the prefix holds another schema version).
    """

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        ttl_s: float = DEFAULT_TTL_S,
        max_pending: int = DEFAULT_MAX_PENDING,
        timeout_s: float = 2.0,
        claim_timeout_s: float = DEFAULT_CLAIM_TIMEOUT_S,
    ) -> None:
        if not (ttl_s > 0 and math.isfinite(ttl_s)):
            raise ValueError(f"ttl_s must be a positive number of seconds, got {ttl_s}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        if not key_prefix:
            raise ValueError("key_prefix must not be empty")
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s}")
        if not (claim_timeout_s > timeout_s and math.isfinite(claim_timeout_s)):
            raise ValueError(
                f"claim_timeout_s must be longer than timeout_s ({timeout_s}), "
                f"got {claim_timeout_s}"
            )
        self.path = describe_url(url)
        self.key_prefix = key_prefix
        self.ttl_ns = int(ttl_s * 1e9)
        self.max_pending = max_pending
        self._keep_ms = int((ttl_s + max(ttl_s, MIN_SAFETY_MARGIN_S)) * 1000)
        self._counts_lock = threading.Lock()
        self._pending: dict[str, dict[str, int]] = {}
        self._batches = 0
        self._evicted_total = 0
        self._expired_total = 0
        self._replaced_total = 0
        self._claim_ms = int(claim_timeout_s * 1000)
        # Claims of takes whose rows this store returned (to acknowledge) or never got (to
        # give back), not yet settled in Redis because the call failed: sent with the next.
        self._claims_lock = threading.Lock()
        self._unacked: list[str] = []
        self._unreturned: list[str] = []
        # Claims other agents left unsettled that this store's expire gave back (a total).
        self.recovered_claims = 0
        self._closed = False
        try:
            self._client = redis.Redis.from_url(
                url,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                # One immediate retry on a broken connection (e.g. after Redis restarted);
                # not on a timeout, where the script may have run.
                retry=redis.retry.Retry(
                    redis.backoff.NoBackoff(), 1, (redis.exceptions.ConnectionError,)
                ),
            )
        except ValueError:  # a malformed URL; its text may hold the password
            raise ValueError(f"store.redis.url: not a Redis URL ({self.path})") from None
        self._put = self._client.register_script(_script(_PUT))
        # Takes, expiry and forget free memory: they must run when Redis is full.
        self._take = self._client.register_script(_script(_TAKE, "allow-oom"))
        self._expire = self._client.register_script(_script(_EXPIRE, "allow-oom"))
        self._forget = self._client.register_script(_script(_FORGET, "allow-oom"))
        self._settle = self._client.register_script(_script(_SETTLE, "allow-oom"))
        self._counts = self._client.register_script(_script(_COUNTS, "no-writes"))
        try:
            self._open()
        except BaseException:
            self._client.close()
            raise

    def _open(self) -> None:
        """Check the server and the schema, load the scripts and the counts."""
        with self._translated("connecting"):
            version = str(self._client.info("server").get("redis_version", "0"))
            if tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < MIN_REDIS:
                raise StoreError(
                    self.path, f"Redis {version} is too old: the pending store needs 7.0 or newer"
                )
            schema_key = f"{self.key_prefix}:schema"
            self._client.set(schema_key, SCHEMA_VERSION, nx=True)
            found = self._client.get(schema_key)
            if found != str(SCHEMA_VERSION).encode():
                raise self._schema_error(found)
            # Loaded now so that a server that cannot run them fails the open, not a put.
            scripts = (self._put, self._take, self._settle, self._expire, self._forget)
            for script in (*scripts, self._counts):
                self._client.script_load(script.script)
            reply = self._counts(args=[self.key_prefix, SCHEMA_VERSION])
        with self._counts_lock:
            self._pending = _counts_of(reply[0])
            self._batches = int(reply[1])

    def _schema_error(self, found: bytes | str | None) -> StoreSchemaError:
        text = found.decode(errors="replace") if isinstance(found, bytes) else str(found)
        return StoreSchemaError(
            self.path,
            f"keys under prefix {self.key_prefix!r} are schema version {text}, this mlsidecar "
            f"understands {SCHEMA_VERSION}; run a matching mlsidecar, or choose another "
            "store.redis.key_prefix (or delete the keys to start empty)",
        )

    @contextlib.contextmanager
    def _translated(self, doing: str) -> Iterator[None]:
        """Redis errors as ``StoreError``s that say what to do (never with the URL's password)."""
        self._check_open()
        try:
            yield
        except redis.exceptions.RedisError as error:
            raise self._translate(error, doing) from error

    def _translate(self, error: redis.exceptions.RedisError, doing: str) -> StoreError:
        text = str(error)
        server = self.path.split("://", 1)[-1].split("/", 1)[0]
        if isinstance(error, redis.exceptions.AuthenticationError):
            return RedisUnavailableError(
                self.path,
                f"Redis at {server} refused the credentials while {doing} ({text}); "
                "check the user and password in store.redis.url",
            )
        if isinstance(error, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
            return RedisUnavailableError(
                self.path,
                f"cannot reach Redis at {server} while {doing} ({text}); check that it is "
                "running and that store.redis.url names it",
            )
        if text.startswith("OOM") or isinstance(error, redis.exceptions.OutOfMemoryError):
            return StoreFullError(
                self.path,
                f"Redis is at its maxmemory while {doing} ({text}); nothing of the call was "
                "stored: raise maxmemory, or lower store.max_pending / store.pending_ttl_s",
            )
        if "MLSIDECAR_SCHEMA" in text:
            return self._schema_error(text.split("MLSIDECAR_SCHEMA", 1)[1].split()[0])
        if text.startswith(("READONLY", "LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN")):
            return RedisUnavailableError(
                self.path, f"Redis cannot take writes now while {doing} ({text}); retry"
            )
        return StoreError(self.path, f"{doing}: {text}")

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(self.path, "closed")

    def _run(self, script: redis.commands.core.Script, args: list[Any], doing: str) -> Any:
        with self._translated(doing):
            return script(args=[self.key_prefix, SCHEMA_VERSION, *args])

    def _update_counts(self, counts: Sequence[Any], batches: int, *, every: bool = False) -> None:
        with self._counts_lock:
            if every:
                self._pending = _counts_of(counts)
            else:
                self._pending.update(_counts_of(counts))
            self._batches = batches

    # -- the protocol

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Nothing to group: each call is one atomic script, applied when it returns (for
        ``GroupCommitPendingPredictions``, which wraps its calls in this)."""
        self._check_open()
        yield

    def put(self, batch: PendingBatch) -> None:
        """Store ``batch`` (one round trip); applied in Redis when this returns."""
        self._check_open()
        n = batch.rows
        if n == 0:
            return
        ids = list(batch.ids)
        fixed, width = encode_fixed(batch)
        labels = batch.labels
        last = {id_: i for i, id_ in enumerate(ids)}
        if len(last) < n:  # ids repeated within the batch: the later row wins
            keep = np.array(sorted(last.values()), dtype=np.int64)
            ids = [ids[i] for i in keep.tolist()]
            fixed = np.frombuffer(fixed, dtype=np.uint8).reshape(n, width)[keep].tobytes()
            labels = None if labels is None else [labels[i] for i in keep.tolist()]
        id_ends, id_text = pack_strings(ids)
        label_ends, label_text = pack_strings(labels) if labels is not None else (b"", b"")
        reply = self._run(
            self._put,
            [
                batch.model,
                batch.version,
                int(batch.received_unix_nano),
                encode_meta(batch),
                self.max_pending,
                self._keep_ms,
                id_ends,
                id_text,
                fixed,
                width,
                label_ends,
                label_text,
            ],
            f"storing {n} predictions of model {batch.model!r}",
        )
        self._replaced_total += int(reply[1]) + (n - len(ids))
        self._evicted_total += int(reply[2])
        self._update_counts(reply[4], int(reply[3]))

    def take(self, model: str, ids: Sequence[str]) -> JoinedPredictions:
        """Remove and return the pending predictions of ``ids`` (row i answers ids[i]);
        atomic: of replicas taking the same id at once, exactly one gets it.

        Two-phase, so that no join is lost when the reply is: the script moves the rows to
        a claim named by an id made here, and the claim is acknowledged once the rows are
        decoded (sent with this store's next take or expire: no round trip of its own). A
        take that fails (timeout, broken connection) leaves its claim to be given back to
        pending before this store's next take, so the client's retry joins them; should
        this agent never call again, any replica's ``expire`` gives it back after
        ``claim_timeout_s``.
        """
        if len(ids) == 0:
            self._check_open()
            return JoinedPredictions.none_found(model, ids)
        if self._unreturned:
            self._settle_claims()  # give back what failed takes claimed, before retaking
        claim = uuid.uuid4().hex
        doing = f"joining {len(ids)} outcomes of model {model!r}"
        with self._claims_lock:
            acks, self._unacked = self._unacked, []
        try:
            # redis-py's own retry on a broken connection resends the same claim id: safe.
            reply = self._run(
                self._take,
                [model, claim, *pack_strings(ids), self._keep_ms, "".join(acks)],
                doing,
            )
        except BaseException as error:
            with self._claims_lock:
                self._unacked[:0] = acks  # resent later: acknowledging twice is harmless
                if isinstance(error, RedisUnavailableError):
                    self._unreturned.append(claim)
            raise
        self._update_counts(reply[7], int(reply[6]))
        try:
            joined = _assemble(model, ids, *reply[:6])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
            self._acknowledge(claim)  # unreadable rows are not given back to fail again
            raise CorruptStoreError(
                self.path,
                f"a stored prediction of model {model!r} is unreadable ({error}); were keys "
                f"under prefix {self.key_prefix!r} written by another program?",
            ) from error
        if joined.joined:
            self._acknowledge(claim)
        return joined

    def _acknowledge(self, claim: str) -> None:
        """The rows of ``claim`` are ours: acknowledged by the next take or expire."""
        with self._claims_lock:
            self._unacked.append(claim)

    def _settle_claims(self) -> None:
        """Send the claims left to acknowledge or give back (one round trip, when any)."""
        with self._claims_lock:
            acked, self._unacked = self._unacked, []
            cancelled, self._unreturned = self._unreturned, []
        if not acked and not cancelled:
            return
        try:
            reply = self._run(
                self._settle,
                ["".join(acked), "".join(cancelled), self._claim_ms, self._keep_ms],
                f"settling {len(acked) + len(cancelled)} outcome joins",
            )
        except BaseException:
            with self._claims_lock:
                self._unacked[:0] = acked
                self._unreturned[:0] = cancelled
            raise
        self._update_counts(reply[0], int(reply[1]))

    def expire(self, now_unix_nano: int) -> dict[ModelVersion, int]:
        """Drop batches received more than the TTL ago; return unmatched counts: those rows
        plus every row evicted by ``max_pending`` (by any replica) since the last call of
        any replica — each counted by exactly one replica."""
        cutoff = int(now_unix_nano) - self.ttl_ns
        unmatched: dict[ModelVersion, int] = {}
        expired = 0
        self._settle_claims()
        while True:
            reply = self._run(
                self._expire,
                [cutoff, EXPIRE_BATCHES_PER_CALL, self._claim_ms, self._keep_ms],
                "expiring predictions past the TTL",
            )
            self.recovered_claims += int(reply[5])
            triples = reply[0]
            for i in range(0, len(triples), 3):
                key = (triples[i].decode(), triples[i + 1].decode())
                unmatched[key] = unmatched.get(key, 0) + int(triples[i + 2])
                expired += int(triples[i + 2])
            if int(reply[1]):
                break
        evicted = reply[2]
        for i in range(0, len(evicted), 2):
            size, _, rest = evicted[i].partition(b":")
            key = (rest[: int(size)].decode(), rest[int(size) :].decode())
            unmatched[key] = unmatched.get(key, 0) + int(evicted[i + 1])
        self._expired_total += expired
        self._update_counts(reply[4], int(reply[3]), every=True)
        return unmatched

    def forget(self, model: str) -> int:
        """Drop every pending prediction of ``model`` (not counted as unmatched)."""
        reply = self._run(self._forget, [model], f"forgetting model {model!r}")
        with self._counts_lock:
            self._pending.pop(model, None)
            self._batches = int(reply[1])
        return int(reply[0])

    def pending_count(self, model: str | None = None, version: str | None = None) -> int:
        """Pending predictions as of this store's last call (no round trip)."""
        with self._counts_lock:
            return sum(
                n
                for m, versions in self._pending.items()
                if model is None or m == model
                for v, n in versions.items()
                if version is None or v == version
            )

    def pending_by_version(self) -> dict[ModelVersion, int]:
        with self._counts_lock:
            return {(m, v): n for m, versions in self._pending.items() for v, n in versions.items()}

    def stats(self) -> StoreStats:
        """Counts as of the last call; the memory is Redis's (``INFO memory``), not ours."""
        with self._counts_lock:
            pending = sum(n for versions in self._pending.values() for n in versions.values())
            batches = self._batches
        return StoreStats(
            pending=pending,
            batches=batches,
            evicted=self._evicted_total,
            expired=self._expired_total,
            replaced=self._replaced_total,
            index_bytes=0,
            file_bytes=0,
        )

    def close(self) -> None:
        """Close the connections (idempotent); the data stays in Redis."""
        if self._closed:
            return
        # Best effort: what stays unsettled is given back after claim_timeout_s anyway.
        with contextlib.suppress(StoreError):
            self._settle_claims()
        self._closed = True
        self._client.close()


def _assemble(
    model: str,
    ids: Sequence[str],
    mask: bytes,
    text: bytes,
    ends: bytes,
    meta_keys: bytes,
    meta_ends: bytes,
    metas: bytes,
) -> JoinedPredictions:
    """The answer to a take, from the take script's reply: which ids were found, their stored
    rows (concatenated, with uint32 ends) and the meta of their batches (keys, ends, text).
    Every column is gathered at once with numpy: no Python work per row but the labels."""
    out = JoinedPredictions.none_found(model, ids)
    where: IntArray = np.flatnonzero(np.frombuffer(mask, dtype=np.uint8) == ord("1"))
    if where.size == 0:
        return out
    stops = np.frombuffer(ends, dtype="<u4").astype(np.int64)
    if len(mask) != len(ids) or len(stops) != len(where):
        raise ValueError(f"{len(stops)} rows for {len(where)} ids found")
    starts = np.concatenate(([0], stops[:-1]))
    if np.any(stops - starts < _HEAD_END):
        raise ValueError("a stored row is shorter than its fixed part")
    data = np.frombuffer(text, dtype=np.uint8)
    batch_keys = data[starts[:, None] + np.arange(BATCH_KEY_BYTES)]
    # Batch keys are fixed-width hex, so sorted = arrival order (as the SQLite store's).
    keys, batch_of = np.unique(batch_keys.view(f"S{BATCH_KEY_BYTES}").ravel(), return_inverse=True)
    meta_stops = np.frombuffer(meta_ends, dtype="<u4").tolist()
    by_key = {
        meta_keys[BATCH_KEY_BYTES * i : BATCH_KEY_BYTES * (i + 1)]: metas[a:b]
        for i, (a, b) in enumerate(zip([0, *meta_stops[:-1]], meta_stops, strict=True))
    }
    batch_metas = [by_key[bytes(key)] for key in keys]
    # 20 digits of receipt time, then the JSON the batches of a version mostly share.
    received = np.array([int(meta[:20]) for meta in batch_metas], dtype=np.int64)
    shared = [_decode_meta(meta[20:]) for meta in batch_metas]
    head = data[starts[:, None] + np.arange(_HEAD_START, _HEAD_END)].view(ROW_HEAD).ravel()
    out.found[where] = True
    out.received_unix_nano[where] = received[batch_of]
    out.weights[where] = np.array([meta.weight for meta in shared])[batch_of]
    out.timestamps_unix_nano[where] = head["timestamp"]
    out.scores[where] = head["score"]
    out.trace_ids[where] = head["trace_id"]
    out.span_ids[where] = head["span_id"]
    widths = np.array([8 * len(meta.class_names) for meta in shared], dtype=np.int64)
    label_starts = starts + _HEAD_END + widths[batch_of]
    if np.any(label_starts > stops):
        raise ValueError("a stored row is shorter than its probabilities")
    labels = out.labels
    if np.any(label_starts < stops):
        raws = [text[a:b] for a, b in zip(label_starts.tolist(), stops.tolist(), strict=True)]
        decoded = {raw: raw.decode("utf-8", "surrogatepass") for raw in set(raws)}
        labels = scatter(labels, where, [decoded[raw] for raw in raws])
    probabilities, class_names = _probabilities(len(ids), where, data, starts, shared, batch_of)
    return dataclasses.replace(
        out,
        labels=labels,
        versions=scatter(out.versions, where, [meta.version for meta in shared], batch_of),
        attributes=scatter(out.attributes, where, [meta.attributes for meta in shared], batch_of),
        probabilities=probabilities,
        class_names=class_names,
    )


def _probabilities(
    n: int,
    where: IntArray,
    data: Any,
    starts: IntArray,
    shared: list[_BatchMeta],
    batch_of: IntArray,
) -> tuple[Any, tuple[str, ...]]:
    """Probabilities aligned by class name over batches that may order classes differently
    (the union in order of first appearance, as the SQLite store builds it)."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for b, meta in enumerate(shared):
        if meta.class_names:
            groups.setdefault(meta.class_names, []).append(b)
    if not groups:
        return None, ()
    union: dict[str, int] = {}
    parts = []
    for names, members in groups.items():
        selected = np.flatnonzero(np.isin(batch_of, members))
        columns = _HEAD_END + np.arange(8 * len(names))
        values = data[starts[selected, None] + columns].view("<f8")
        targets = [union.setdefault(name, len(union)) for name in names]
        parts.append((where[selected], targets, values))
    out = np.full((n, len(union)), np.nan)
    for at, targets, values in parts:
        out[at[:, None], np.array(targets)[None, :]] = values
    return out, tuple(union)
