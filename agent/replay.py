"""``mlsidecar replay FILE``: submit recorded predictions and outcomes to a running agent.

    mlsidecar replay events.jsonl --target 127.0.0.1:4320 --model fraud-scorer
    # rows are checked first; bad ones go to events.jsonl.rejected.jsonl with the reason

One row per event (JSONL object or CSV line; format in docs/replay.md). Valid rows are
sent in batches over the raw gRPC stubs: replay must know which rows the agent accepted,
and the SDK is fire-and-forget by design (it drops and counts). When the agent rejects a
batch (INVALID_ARGUMENT rejects the whole batch), the batch is bisected until the bad rows
are isolated, so every good row is still accepted.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from agent.ingest_connection import (
    TOKEN_ENV,
    IngestConnection,
    add_connection_arguments,
    explain_connect_failure,
    ingest_connection,
    quiet_grpc_core_logs,
)

RESERVED = {
    "kind", "id", "model", "version", "timestamp", "score", "label", "value", "latency_ms",
    "probabilities", "attributes", "features", "trace_id", "span_id",
}  # fmt: skip
MODEL_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
VERSION_PATTERN = re.compile(r"[\x21-\x7e]{0,128}")
MAX_ATTRIBUTES = 8  # as agent/ingest/decode.py: checked here so one bad row is caught early
MAX_ATTRIBUTE_LENGTH = 128
MAX_ID_LENGTH = 1024
RETRIES = 5  # UNAVAILABLE, RESOURCE_EXHAUSTED, CANCELLED, deadline: same batch_id (deduplicated)


class ReplayError(Exception):
    """A problem with the command line or the file as a whole (exit 2)."""


class RowError(ValueError):
    """A row that cannot be sent; the message names the field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(slots=True)
class Row:
    """One valid event, ready to be packed."""

    line: int
    kind: str  # "prediction" | "outcome"
    id: str
    model: str
    version: str
    raw: dict[str, Any]
    timestamp_ns: int = 0
    numbers: dict[str, float] = field(default_factory=dict)
    categories: dict[str, str] = field(default_factory=dict)
    score: float | None = None
    label: str | None = None
    value: float | None = None
    latency_ms: float | None = None
    probabilities: dict[str, float] | None = None
    attributes: dict[str, str] = field(default_factory=dict)
    trace_id: bytes = b""
    span_id: bytes = b""

    def group(self) -> tuple[Any, ...]:
        """Rows that can share one batch."""
        if self.kind == "outcome":
            return ("outcome", self.model, self.version, self.value is not None)
        classes = tuple(sorted(self.probabilities)) if self.probabilities else ()
        return ("prediction", self.model, self.version, tuple(sorted(self.attributes.items())),
                classes)  # fmt: skip


# -- reading -----------------------------------------------------------------------------


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line number, row, error) for each data line of a .jsonl or .csv file."""
    suffix = path.suffix.lower()
    try:
        handle = path.open(newline="" if suffix == ".csv" else None, encoding="utf-8")
    except OSError as error:
        raise ReplayError(f"cannot read {str(path)!r}: {error.strerror}") from None
    with handle:
        if suffix == ".csv":
            reader = csv.DictReader(handle)
            if not reader.fieldnames:
                raise ReplayError(f"{str(path)!r}: no header line")
            for record in reader:
                extra = record.pop(None, None)
                if extra:
                    yield reader.line_num, None, f"line: {len(extra)} more values than columns"
                    continue
                yield reader.line_num, _csv_row(record), None
        elif suffix in (".jsonl", ".ndjson"):
            for number, text in enumerate(handle, 1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except ValueError as error:
                    yield number, None, f"line: not valid JSON ({error})"
                    continue
                if not isinstance(row, dict):
                    yield number, None, "line: expected a JSON object"
                    continue
                yield number, row, None
        else:
            raise ReplayError(f"{str(path)!r}: expected a .jsonl, .ndjson or .csv file")


def _csv_row(record: dict[str, str | None]) -> dict[str, Any]:
    """CSV cells are strings: empty means absent; ``attributes.<key>`` and ``features.<name>``
    columns nest; feature cells that parse as numbers are numbers."""
    row: dict[str, Any] = {}
    for key, cell in record.items():
        if cell is None or cell == "":
            continue
        if key.startswith("attributes."):
            row.setdefault("attributes", {})[key.removeprefix("attributes.")] = cell
        elif key.startswith("features."):
            row.setdefault("features", {})[key.removeprefix("features.")] = _cell(cell)
        elif key in RESERVED:
            row[key] = cell
        else:
            row[key] = _cell(cell)
    return row


def _cell(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


# -- validation --------------------------------------------------------------------------


def _number(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise RowError(key, f"expected a number, got {str(value)[:40]!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RowError(key, f"expected a number, got {type(value).__name__}")
    return float(value)


def _text(row: dict[str, Any], key: str) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise RowError(key, f"expected a string, got {type(value).__name__}")
    return str(value)


def _timestamp(value: Any) -> int:
    """RFC 3339 text, or a number of seconds since the epoch, as Unix nanoseconds."""
    if value is None:
        return 0
    if isinstance(value, str):
        try:
            return int(float(value) * 1e9)
        except ValueError:
            pass
        try:
            when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise RowError("timestamp", f"{value[:40]!r} is neither RFC 3339 nor seconds") from None
        if when.tzinfo is None:
            raise RowError("timestamp", f"{value[:40]!r} has no time zone (add Z or +00:00)")
        return int(when.timestamp() * 1e9)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return int(value * 1e9)
    raise RowError("timestamp", "expected RFC 3339 text or seconds since the epoch")


def _hex_bytes(row: dict[str, Any], key: str, size: int) -> bytes:
    value = row.get(key)
    if value is None or value == "":
        return b""
    try:
        raw = bytes.fromhex(str(value))
    except ValueError:
        raise RowError(key, f"expected {size * 2} hex digits") from None
    if len(raw) != size:
        raise RowError(key, f"expected {size * 2} hex digits, got {len(str(value))}")
    return raw


def _features(row: dict[str, Any], into: Row) -> None:
    nested = row.get("features")
    if nested is not None and not isinstance(nested, dict):
        raise RowError(
            "features", f"expected an object of name: value, got {type(nested).__name__}"
        )
    items = [(k, v) for k, v in row.items() if k not in RESERVED]
    items += list((nested or {}).items())
    for name, value in items:
        where = f"features.{name}"
        if not name:
            raise RowError("features", "a feature has an empty name")
        if value is None:
            continue  # absent: counted as missing by the agent only if other rows have it
        if isinstance(value, bool):
            into.categories[name] = "true" if value else "false"
        elif isinstance(value, int | float):
            into.numbers[name] = float(value)
        elif isinstance(value, str):
            into.categories[name] = value
        else:
            raise RowError(where, f"expected a number or a string, got {type(value).__name__}")
        if name in into.numbers and name in into.categories:
            raise RowError(where, "given twice with different types")


def validate(line: int, row: dict[str, Any], defaults: argparse.Namespace) -> Row:
    """A checked Row, or RowError naming the first bad field."""
    kind = _text(row, "kind") or defaults.kind
    if kind not in ("prediction", "outcome"):
        raise RowError("kind", f"expected prediction or outcome, got {kind!r}")
    id_ = _text(row, "id")
    if not id_:
        raise RowError("id", "missing or empty")
    if len(id_) > MAX_ID_LENGTH:
        raise RowError("id", f"longer than {MAX_ID_LENGTH} characters")
    model = _text(row, "model") or defaults.model
    if not model:
        raise RowError("model", "missing (give it per row or with --model)")
    if not MODEL_PATTERN.fullmatch(model):
        raise RowError("model", f"{model[:40]!r} does not match [A-Za-z0-9._-]{{1,128}}")
    version = _text(row, "version")
    version = defaults.version if version is None else version
    if not VERSION_PATTERN.fullmatch(version):
        raise RowError("version", "at most 128 printable ASCII characters without spaces")
    out = Row(line, kind, id_, model, version, row, timestamp_ns=_timestamp(row.get("timestamp")))
    out.label = _text(row, "label")
    if kind == "outcome":
        out.value = _number(row, "value")
        if (out.value is None) == (out.label is None):
            raise RowError("label", "an outcome needs exactly one of label and value")
        if out.value is not None and not math.isfinite(out.value):
            raise RowError("value", "must be a finite number")
        return out
    out.score = _number(row, "score")
    out.latency_ms = _number(row, "latency_ms")
    if out.latency_ms is not None and not out.latency_ms >= 0:
        raise RowError("latency_ms", f"must be ≥ 0, got {out.latency_ms}")
    _features(row, out)
    attributes = row.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise RowError("attributes", "expected an object of string values")
    if len(attributes) > MAX_ATTRIBUTES:
        raise RowError("attributes", f"{len(attributes)} entries, at most {MAX_ATTRIBUTES}")
    for key, value in attributes.items():
        if not key or len(key) > MAX_ATTRIBUTE_LENGTH or len(str(value)) > MAX_ATTRIBUTE_LENGTH:
            raise RowError(f"attributes.{key[:40]}", f"1-{MAX_ATTRIBUTE_LENGTH} characters")
        out.attributes[key] = str(value)
    probabilities = row.get("probabilities")
    if probabilities is not None:
        if not isinstance(probabilities, dict) or not probabilities:
            raise RowError("probabilities", "expected an object of class: probability")
        out.probabilities = {}
        for name, p in probabilities.items():
            if isinstance(p, bool) or not isinstance(p, int | float) or not name:
                raise RowError(f"probabilities.{name}", "expected a number")
            out.probabilities[str(name)] = float(p)
    out.trace_id = _hex_bytes(row, "trace_id", 16)
    out.span_id = _hex_bytes(row, "span_id", 8)
    return out


# -- sending -----------------------------------------------------------------------------


def _prediction_batch(rows: list[Row]) -> Any:
    from agent._proto.mlsidecar.v1 import ingest_pb2 as pb

    first = rows[0]
    classes = sorted(first.probabilities) if first.probabilities else []
    events = []
    for r in rows:
        event = pb.PredictionEvent(
            id=r.id,
            timestamp_unix_nano=r.timestamp_ns,
            numbers=r.numbers,
            categories=r.categories,
            label=r.label or "",
            probabilities=[r.probabilities[c] for c in classes] if r.probabilities else [],
            trace_id=r.trace_id,
            span_id=r.span_id,
        )
        if r.score is not None:
            event.score = r.score
        if r.latency_ms is not None:
            event.latency_ms = r.latency_ms
        events.append(event)
    return pb.PredictionBatch(
        model=first.model,
        model_version=first.version,
        events=events,
        class_names=classes,
        attributes=first.attributes,
        batch_id=uuid.uuid4().hex,
    )


def _outcome_batch(rows: list[Row]) -> Any:
    from agent._proto.mlsidecar.v1 import ingest_pb2 as pb

    first = rows[0]
    batch = pb.OutcomeBatch(
        model=first.model, model_version=first.version, ids=[r.id for r in rows],
        batch_id=uuid.uuid4().hex,
    )  # fmt: skip
    if first.value is not None:
        batch.actual_values.extend(math.nan if r.value is None else r.value for r in rows)
    else:
        batch.actual_labels.extend(r.label or "" for r in rows)
    if any(r.timestamp_ns for r in rows):
        batch.timestamps_unix_nano.extend(r.timestamp_ns for r in rows)
    return batch


class AgentUnreachable(Exception):
    """The agent did not answer (after retries)."""


class Sender:
    """Sends groups of rows; bisects rejected batches down to the bad rows."""

    def __init__(self, connection: IngestConnection, timeout: float) -> None:
        import grpc

        from agent._proto.mlsidecar.v1 import ingest_pb2_grpc as pb_grpc

        self._grpc = grpc
        self.connection = connection
        self.target = connection.target
        self.channel = connection.channel([("grpc.max_send_message_length", 64 * 1024 * 1024)])
        self.stub = pb_grpc.IngestStub(self.channel)
        token = connection.token
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self.accepted: Counter[str] = Counter()
        self.rejected: list[tuple[Row, str, str]] = []  # row, field, reason

    def wait_ready(self, timeout: float) -> None:
        try:
            self._grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except self._grpc.FutureTimeoutError:
            raise AgentUnreachable(
                f"no agent answering at {self.target} (gRPC ingest, "
                f"{self.connection.protection()}) within {timeout:g}s: {self._why_not_ready()}"
            ) from None

    def _why_not_ready(self) -> str:
        """The last connection error, from one call of the health service (which needs no
        token), explained: a wrong CA, TLS against plaintext, a missing client certificate."""
        check = self.channel.unary_unary("/grpc.health.v1.Health/Check")
        try:
            check(b"", timeout=1.0)  # an empty HealthCheckRequest: raw bytes, no stub needed
        except self._grpc.RpcError as error:
            return explain_connect_failure(error.details() or error.code().name, self.connection)
        return "it answered only now"

    def _call(self, rows: list[Row]) -> Any:
        grpc = self._grpc
        kind = rows[0].kind
        batch = _prediction_batch(rows) if kind == "prediction" else _outcome_batch(rows)
        method = self.stub.SubmitPredictions if kind == "prediction" else self.stub.SubmitOutcomes
        delay = 0.2
        for attempt in range(RETRIES + 1):
            try:
                return method(batch, timeout=self.timeout, metadata=self.metadata)
            except grpc.RpcError as error:
                code = error.code()
                retryable = code in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                )
                # A stopping agent cancels calls in flight; a slow one misses the deadline.
                if code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
                    retryable = True
                if not retryable:
                    raise
                if attempt == RETRIES:
                    raise AgentUnreachable(
                        f"the agent at {self.target} stopped answering: {code.name} "
                        f"{error.details() or ''}".rstrip()
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    def send(self, rows: list[Row]) -> None:
        grpc = self._grpc
        try:
            self._call(rows)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                hint = (
                    "the token given is not its ingest.token"
                    if self.connection.token
                    else f"give its ingest.token with --token-file PATH or {TOKEN_ENV}"
                )
                raise AgentUnreachable(
                    f"the agent at {self.target} refused the call ({error.details()}): {hint}"
                ) from None
            if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise AgentUnreachable(
                    f"the agent at {self.target} answered {error.code().name}: {error.details()}"
                ) from None
            if len(rows) == 1:
                message = error.details() or "INVALID_ARGUMENT"
                self.rejected.append((rows[0], _agent_field(message), message))
                return
            half = len(rows) // 2  # the agent rejects whole batches: find the bad rows
            self.send(rows[:half])
            self.send(rows[half:])
            return
        self.accepted[rows[0].kind] += len(rows)

    def close(self) -> None:
        self.channel.close()


def _agent_field(message: str) -> str:
    """The field an agent's message names: "events[0].id: empty id" -> "id"."""
    head = message.split(":", 1)[0]
    head = re.sub(r"\[\d+\]", "", head).removeprefix("events.")
    return head.split(" ", 1)[0] or "batch"


# -- progress and the command ------------------------------------------------------------


class Progress:
    """A bar on a terminal; otherwise a plain line every 10 % (or every 5 s)."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = max(total, 1)
        self.stream = stream
        self.tty = stream.isatty()
        self._last_tenth = -1
        self._last_time = time.monotonic()

    def update(self, done: int, accepted: int, rejected: int) -> None:
        share = min(done / self.total, 1.0)
        if self.tty:
            width = 30
            filled = int(share * width)
            self.stream.write(
                f"\r[{'#' * filled}{'.' * (width - filled)}] {share * 100:5.1f}% "
                f"{done}/{self.total} rows, {accepted} accepted, {rejected} rejected"
            )
            self.stream.flush()
            return
        tenth = int(share * 10)
        if tenth > self._last_tenth or time.monotonic() - self._last_time >= 5:
            self._last_tenth, self._last_time = tenth, time.monotonic()
            print(
                f"replay: {done}/{self.total} rows ({share * 100:.0f}%), {accepted} accepted, "
                f"{rejected} rejected",
                file=self.stream,
                flush=True,
            )

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="events: .jsonl (one object a line) or .csv")
    parser.add_argument("--target", metavar="HOST:PORT",
                        help="agent gRPC ingest (default: ingest.listen of --config, else "
                             "127.0.0.1:4320)")  # fmt: skip
    parser.add_argument("--config", "-c", type=Path,
                        help="agent config: target, ingest.token, TLS when ingest.tls is set")  # fmt: skip
    parser.add_argument("--model", help="model for rows without one")
    parser.add_argument("--version", default="", help="model version for rows without one")
    parser.add_argument("--kind", choices=["prediction", "outcome"],
                        help="kind for rows without one")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=500, help="rows per batch (500)")
    parser.add_argument("--rejected", type=Path,
                        help="where rejected rows go (default: FILE.rejected.jsonl)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    add_connection_arguments(parser)


def _connection(args: argparse.Namespace) -> IngestConnection:
    """Target, token and TLS: the options first, then ``--config`` (or the agent's default
    settings and MLSIDECAR_* variables when no --target is given)."""
    target, token, tls = args.target, None, False
    if args.config is not None or target is None:
        from agent.cli import load_settings

        settings = load_settings(args.config)
        if target is None:
            target = f"{settings.ingest.host}:{settings.ingest.port}"
            if ":" in settings.ingest.host:
                target = f"[{settings.ingest.host}]:{settings.ingest.port}"
        if settings.ingest.token is not None:
            token = settings.ingest.token.get_secret_value()
        tls = settings.ingest.tls is not None
    try:
        return ingest_connection(args, str(target), fallback_token=token, fallback_tls=tls)
    except ValueError as error:
        raise ReplayError(str(error)) from None


def replay_file(args: argparse.Namespace) -> int:
    """The command: 0 when every row was accepted, 1 when some were rejected or the agent
    could not be reached; ReplayError (exit 2) for a bad command line or file."""
    if args.batch_size < 1:
        raise ReplayError(f"--batch-size: must be ≥ 1, got {args.batch_size}")
    if not args.file.is_file():
        raise ReplayError(f"{str(args.file)!r}: no such file")
    quiet_grpc_core_logs()
    connection = _connection(args)
    total = sum(1 for _ in _rows(args.file))  # a cheap first pass, for the progress bar
    rejected_path = args.rejected or args.file.with_name(args.file.name + ".rejected.jsonl")
    sender = Sender(connection, args.timeout)
    progress = Progress(total, sys.stderr)
    invalid: list[tuple[int, dict[str, Any] | None, str, str]] = []  # line, row, field, reason
    seen: dict[tuple[str, str, str, str], int] = {}
    open_groups: dict[tuple[Any, ...], list[Row]] = {}
    done = 0
    try:
        sender.wait_ready(min(args.timeout, 5.0))

        def flush(kind: str | None) -> None:
            for key in [k for k in open_groups if kind is None or k[0] == kind]:
                sender.send(open_groups.pop(key))

        for line, raw, error in _rows(args.file):
            done += 1
            if raw is None:
                invalid.append((line, None, "line", str(error)))
                continue
            try:
                row = validate(line, raw, args)
                identity = (row.kind, row.model, row.version, row.id)
                if identity in seen:
                    raise RowError("id", f"duplicate {row.kind} id {row.id!r} (first on line "
                                         f"{seen[identity]})")  # fmt: skip
                seen[identity] = line
            except RowError as bad:
                invalid.append((line, raw, bad.field, str(bad)))
                continue
            group = open_groups.setdefault(row.group(), [])
            group.append(row)
            if len(group) >= args.batch_size:
                if row.kind == "outcome":
                    flush("prediction")  # predictions go before the outcomes that join them
                sender.send(open_groups.pop(row.group()))
                progress.update(
                    done, sum(sender.accepted.values()), len(invalid) + len(sender.rejected)
                )
        flush("prediction")
        flush(None)
    except AgentUnreachable as error:
        progress.finish()
        print(f"mlsidecar: {error}", file=sys.stderr)
        accepted = sum(sender.accepted.values())
        print(f"replay stopped after {done} of {total} rows: {accepted} accepted", file=sys.stderr)
        return 1
    finally:
        sender.close()
    progress.update(done, sum(sender.accepted.values()), len(invalid) + len(sender.rejected))
    progress.finish()
    return _report(args.file, rejected_path, total, sender, invalid)


def _report(
    path: Path,
    rejected_path: Path,
    total: int,
    sender: Sender,
    invalid: list[tuple[int, dict[str, Any] | None, str, str]],
) -> int:
    records = [(line, raw, f, reason, "client") for line, raw, f, reason in invalid]
    records += [(r.line, r.raw, f, reason, "agent") for r, f, reason in sender.rejected]
    records.sort(key=lambda item: item[0])
    accepted = sender.accepted
    print(
        f"replay {path}: {total} rows, {accepted['prediction']} predictions and "
        f"{accepted['outcome']} outcomes accepted, {len(records)} rejected"
    )
    if not records:
        rejected_path.unlink(missing_ok=True)  # no stale side file from an earlier run
        return 0
    with rejected_path.open("w", encoding="utf-8") as out:
        for line, raw, field_name, reason, by in records:
            out.write(json.dumps({"line": line, "field": field_name, "reason": reason,
                                  "rejected_by": by, "row": raw}, default=str) + "\n")  # fmt: skip
    reasons = Counter((f, re.sub(r"'[^']*'|\d+", "…", reason)) for _, _, f, reason, _ in records)
    first_line: dict[tuple[str, str], tuple[int, str]] = {}
    for line, _, f, reason, _ in records:
        first_line.setdefault((f, re.sub(r"'[^']*'|\d+", "…", reason)), (line, reason))
    print(f"rejected rows (with reasons) written to {rejected_path}:")
    for key, count in reasons.most_common(10):
        line, example = first_line[key]
        print(f"  {count:6d} x {key[0]}: e.g. line {line}: {example}")
    if len(reasons) > 10:
        print(f"  ... and {len(reasons) - 10} other reasons (see the side file)")
    return 1
