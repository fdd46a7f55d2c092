"""The client SDK (agent.client) against the real agent on 127.0.0.1.

Every test logs through ``SidecarClient`` / ``AsyncSidecarClient`` and checks what the
agent itself counted (its health report, its spans, its /metrics), not what the client
believes it sent.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import httpx
import numpy as np
import pandas as pd
import pytest
from conftest import AgentHarness, free_port
from metric_data import data_points
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

from agent.client import AsyncSidecarClient, ClientStats, SidecarClient

# Short timers: a test waits for flush(), never for the default 1 s interval.
FAST = {"flush_interval_s": 0.05, "backoff_s": 0.01, "max_backoff_s": 0.05}


def report(agent: AgentHarness, model: str, version: str | None = None) -> dict[str, Any]:
    result = agent.agent.engine.report(model, version)
    assert result is not None, f"the agent has no report for {model!r}"
    return result


@pytest.fixture
def client_for(agent: AgentHarness) -> Iterator[Any]:
    clients: list[SidecarClient] = []

    def make(model: str, **options: Any) -> SidecarClient:
        client = SidecarClient(agent.ingest_target, model=model, **{**FAST, **options})
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close(timeout=1)


# -- events reach the agent -------------------------------------------------------------------


def test_predictions_logged_one_by_one_appear_in_the_health_report(agent, client_for):
    client = client_for("fraud", model_version="v1")
    for i in range(300):
        client.log_prediction(
            f"p{i}",
            {"amount": float(i), "merchant": "fuel" if i % 3 else "online", "age": None},
            score=i / 300,
            label="fraud" if i % 10 == 0 else "legit",
            latency_ms=4.0,
        )
    assert client.flush(timeout=5) is True

    health = report(agent, "fraud")
    assert health["version"] == "v1"
    assert health["totals"]["rows"] == 300
    assert health["window"]["latency_ms"]["mean"] == 4.0
    assert health["window"]["score"]["max"] == pytest.approx(299 / 300)
    stats = client.stats()
    assert (stats.sent_predictions, stats.dropped, stats.buffered) == (300, {}, 0)
    assert stats.breaker_state == "closed"


def test_many_threads_logging_at_once_lose_and_duplicate_nothing(agent, client_for):
    import threading

    client = client_for("threads", batch_rows=300)

    def work(t: int) -> None:
        for i in range(2000):
            client.log_prediction(f"t{t}-{i}", {"x": float(i)}, score=0.5)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert client.flush(10)
    stats = client.stats()
    assert (stats.sent_predictions, stats.dropped, stats.buffered) == (8000, {}, 0)
    assert report(agent, "threads")["totals"]["rows"] == 8000


def test_features_keep_their_kind_numbers_or_categories(agent, client_for):
    client = client_for("kinds")
    for i in range(50):
        client.log_prediction(
            f"k{i}",
            {
                "amount": i,
                "ratio": np.float32(i / 50),
                "flag": i % 2 == 0,  # bools go as 0/1, as in the batch form
                "city": ["paris", "oslo"][i % 2],
                "mixed": i if i % 5 else "n/a",  # a string among numbers: categorical
            },
            score=0.5,
        )
    assert client.flush(5)
    features = report(agent, "kinds")["features"]
    assert {name: f["type"] for name, f in features.items()} == {
        "amount": "numeric",
        "ratio": "numeric",
        "flag": "numeric",
        "city": "categorical",
        "mixed": "categorical",
    }


def test_outcomes_join_their_predictions(agent, client_for):
    client = client_for("churn", model_version="v2")
    for i in range(40):
        client.log_prediction(f"c{i}", {"tenure": float(i)}, score=0.8, label="churn")
    for i in range(0, 40, 2):
        client.log_outcome(f"c{i}", label="churn" if i % 4 else "stay")
    for i in range(1, 11, 2):
        client.log_outcome(f"c{i}", value=1.0)  # numeric outcomes go in their own batch
    assert client.flush(5)

    outcomes = report(agent, "churn")["outcomes"]
    assert outcomes["joined"] == 25
    assert client.stats().sent_outcomes == 25


def test_probabilities_as_a_mapping_or_in_class_names_order(agent, client_for):
    client = client_for("iris", class_names=["setosa", "virginica"])
    client.log_prediction("i1", {"x": 1.0}, probabilities={"setosa": 0.9, "virginica": 0.1})
    client.log_prediction("i2", {"x": 2.0}, probabilities=[0.2, 0.8])
    client.log_prediction("i3", {"x": 3.0}, probabilities=[0.2, 0.3, 0.5])  # wrong length
    assert client.flush(5)
    assert report(agent, "iris")["totals"]["rows"] == 2
    stats = client.stats()
    assert stats.dropped == {"invalid_event": 1}
    assert "probabilities: 3 values" in stats.last_errors["invalid_event"]


def test_trace_ids_of_the_active_span_reach_the_agent(agent, client_for):
    tracer = TracerProvider().get_tracer("model-service")  # the service's own tracing
    client = client_for("traced")
    contexts = []
    for i in range(3):
        with tracer.start_as_current_span("POST /predict") as span:
            client.log_prediction(f"t{i}", {"x": float(i)}, score=0.5, latency_ms=5.0 * 10**i)
            contexts.append((span.get_span_context().trace_id, span.get_span_context().span_id))
    client.log_prediction("untraced", {"x": 9.0}, score=0.5)  # outside any span
    assert client.flush(5)

    (span,) = [
        s
        for s in agent.spans.get_finished_spans()
        if s.name == "mlsidecar.v1.Ingest/SubmitPredictions"
        and s.attributes.get("ml.model.name") == "traced"
    ]
    links = {(link.context.trace_id, link.context.span_id) for link in span.links}
    assert links == set(contexts)
    assert {link.attributes["ml.prediction.id"] for link in span.links} == {"t0", "t1", "t2"}
    # and the latency histogram's exemplars point at those requests
    exemplars = [
        (e.trace_id, e.span_id)
        for point in data_points(agent.metric_reader, "ml.prediction.duration")
        if point.attributes.get("ml.model.name") == "traced"
        for e in point.exemplars
    ]
    assert set(exemplars) == set(contexts)  # 5, 50, 500 ms: one bucket, one exemplar each


def test_batch_forms_take_numpy_arrays_and_pandas_dataframes(agent, client_for):
    client = client_for("batched", class_names=["no", "yes"])
    rng = np.random.default_rng(3)
    frame = pd.DataFrame(
        {
            "amount": rng.normal(50, 10, 100),
            "merchant": pd.Series(["fuel", None] * 50, dtype="string"),
            "flag": np.arange(100) % 2 == 0,
        }
    )
    ids = np.array([f"b{i}" for i in range(100)])
    scores = rng.random(100)
    client.log_predictions(
        ids,
        frame,
        scores=scores,
        labels=np.where(scores > 0.5, "yes", "no"),
        probabilities=np.column_stack([1 - scores, scores]),
        latencies_ms=np.full(100, 2.5),
    )
    client.log_predictions(
        [f"m{i}" for i in range(20)], {"amount": np.arange(20.0)}, scores=np.zeros(20)
    )
    client.log_outcomes(ids[:30], labels=["yes"] * 30)
    assert client.flush(5)

    health = report(agent, "batched")
    assert health["totals"]["rows"] == 120
    assert health["outcomes"]["joined"] == 30
    assert health["features"]["merchant"]["type"] == "categorical"
    assert health["features"]["amount"]["type"] == "numeric"
    assert client.stats().dropped == {}


def test_small_batch_form_calls_are_sent_together_in_few_batches(agent, client_for):
    """A service logging 20 rows per request must not cost one RPC per request."""
    client = client_for("coalesced", flush_interval_s=60, batch_rows=500)
    scores = np.zeros(20)
    for request in range(50):  # 1000 rows in 50 calls, one reused scores array
        scores[:] = request / 100
        client.log_predictions(
            [f"r{request}-{i}" for i in range(20)],
            {"amount": np.arange(20.0) + request, "merchant": np.array(["fuel", "travel"] * 10)},
            scores=scores,
            labels=np.where(scores > 0.2, "fraud", "legit"),
            attributes={"region": "eu"},
        )
    client.log_predictions(["r0-0"], {"amount": [1.0], "merchant": ["fuel"]})  # an id again
    assert client.flush(5)
    stats = client.stats()
    assert (stats.sent_predictions, stats.dropped) == (1001, {})
    assert stats.sent_batches <= 4  # 1000 rows in two or three batches, plus the repeat
    health = report(agent, "coalesced")
    assert health["totals"]["rows"] == 1001
    assert health["features"]["merchant"]["type"] == "categorical"


def test_pack_columns_concatenates_pieces_exactly_and_keeps_ids_unique():
    from agent.client._batches import Columns, pack_columns

    def piece(ids: list[str], amounts: list[float], layout: str = "n") -> Columns:
        key = (
            "m",
            "v1",
            (("region", "eu"),),
            None,
            ("amount",),
            (True, True, False, False),
        )
        values = np.array(amounts) if layout == "n" else np.array([str(a) for a in amounts])
        labels = np.array([f"l{a}" for a in amounts])
        return Columns(key, ids, 7, [values], np.array(amounts) / 10, labels, None, None, b"", b"")

    pieces = [piece(["a", "b"], [1.0, 2.0]), piece(["c"], [3.0]), piece(["a"], [4.0]),
              piece(["d"], [5.0], layout="s")]  # fmt: skip
    batches = [item for item in pack_columns(pieces) if item is not None]
    assert [rows for rows, _ in batches] == [3, 1, 1]
    first = batches[0][1]
    assert list(first.ids) == ["a", "b", "c"]
    assert list(first.features[0].numbers.values) == [1.0, 2.0, 3.0]
    assert list(first.scores) == [0.1, 0.2, 0.3]
    assert list(first.labels) == ["l1.0", "l2.0", "l3.0"]
    assert list(first.timestamps_unix_nano) == [7, 7, 7]
    assert dict(first.attributes) == {"region": "eu"}
    assert list(batches[1][1].ids) == ["a"]  # the repeated id goes to a second batch
    # same key, strings where numbers were: the sender keeps the kinds apart
    assert list(batches[2][1].features[0].categories.values) == ["5.0"]


def test_pack_columns_keeps_every_kind_exact_and_yields_within_long_columns():
    """Numbers, booleans, bytes, strings and objects with missing values, over more rows
    than one packing slice: the sender must give up the GIL inside a column too."""
    from agent.client._batches import SLICE_ROWS, Columns, pack_columns

    n = SLICE_ROWS * 2 + 7
    numbers = np.arange(n) * 0.5
    flags = np.arange(n) % 3 == 0
    raw = np.array([f"b{i % 5}".encode() for i in range(n)])
    text = np.array([f"t{i % 7}" for i in range(n)])
    objects = np.array([None if i % 4 == 0 else f"o{i}" for i in range(n)], dtype=object)
    names = ("num", "flag", "raw", "text", "obj")
    key = ("m", "v1", (), None, names, (True, True, False, False))
    piece = Columns(key, [f"r{i}" for i in range(n)], 1, [numbers, flags, raw, text, objects],
                    numbers / n, np.arange(n) % 2, None, None, b"", b"")  # fmt: skip
    items = list(pack_columns([piece]))
    ((rows, batch),) = [item for item in items if item is not None]
    assert rows == n
    assert items.count(None) > len(names) + 2  # slices inside the columns, not only between
    got = {column.name: column for column in batch.features}
    assert list(got["num"].numbers.values) == numbers.tolist()
    assert list(got["flag"].numbers.values) == flags.astype(float).tolist()
    assert list(got["raw"].categories.values) == [v.decode() for v in raw.tolist()]
    assert list(got["text"].categories.values) == text.tolist()
    assert list(got["obj"].categories.values) == ["" if v is None else v for v in objects]
    assert list(batch.scores) == (numbers / n).tolist()
    assert list(batch.labels) == [str(i % 2) for i in range(n)]  # labels made strings


def test_the_sender_offers_the_gil_once_per_pause_budget_and_after_every_long_slice():
    """A pause costs the sender ~0.1 ms (timer slack): after every 10-20 us slice of a
    numpy column it made packing five times slower. ``drive`` pauses once per
    ``PAUSE_EVERY_S`` of packing; a slice that long on its own is always followed by one."""
    from agent.client._sync import PAUSE_EVERY_S, drive

    def slices(count: int, work_s: float) -> Iterator[None]:
        for _ in range(count):
            deadline = time.perf_counter() + work_s
            while time.perf_counter() < deadline:
                pass
            yield None

    pauses: list[float] = []

    def pause(seconds: float) -> None:
        started = time.perf_counter()
        time.sleep(seconds)
        pauses.append(time.perf_counter() - started)

    def no_io(_: Any) -> None:
        raise AssertionError("packing only")

    started = time.perf_counter()
    drive(slices(3000, 0.0), no_io, no_io, pause)
    packing = time.perf_counter() - started - sum(pauses)
    assert 1 <= len(pauses) <= packing / PAUSE_EVERY_S + 1, (len(pauses), packing)
    assert len(pauses) < 3000 / 4  # not one per slice

    pauses.clear()
    drive(slices(20, PAUSE_EVERY_S * 1.5), no_io, no_io, pause)
    assert len(pauses) == 20  # a model thread never waits more than one slice


def test_the_batch_form_copies_the_callers_arrays_before_returning():
    """The sender packs later, so the call must not keep views of arrays the caller reuses."""
    from agent.client._batches import pack_columns

    client = SidecarClient("127.0.0.1:9", model="copies", flush_interval_s=3600, batch_rows=10_000)
    try:
        amount, scores = np.array([1.0, 2.0]), np.array([0.1, 0.2])
        labels = np.array(["a", "b"])
        client.log_predictions(["r1", "r2"], {"amount": amount}, scores=scores, labels=labels)
        amount[:], scores[:], labels[:] = 9.0, 0.9, "z"  # the caller reuses its buffers
        pieces = [item.batch for item in client._buffer._items]
        ((rows, batch),) = [item for item in pack_columns(pieces) if item is not None]
        assert rows == 2
        assert list(batch.features[0].numbers.values) == [1.0, 2.0]
        assert list(batch.scores) == [0.1, 0.2]
        assert list(batch.labels) == ["a", "b"]
    finally:
        client.close(timeout=0)


def test_a_batch_form_call_bigger_than_the_buffer_keeps_its_newest_rows(agent, client_for):
    client = client_for("big-call", max_buffer=1000)
    ids = [f"b{i}" for i in range(2500)]
    client.log_predictions(ids, {"x": np.arange(2500.0)}, scores=np.full(2500, 0.5))
    assert client.flush(5)
    client.log_outcomes(ids[-1:], values=[1.0])
    assert client.flush(5)
    stats = client.stats()
    assert stats.sent_predictions + stats.dropped_total == 2500
    health = report(agent, "big-call")
    assert health["totals"]["rows"] == stats.sent_predictions >= 1000
    assert health["outcomes"]["joined"] == 1  # the newest row was kept and delivered


def test_batch_forms_refuse_mismatched_shapes_naming_the_argument(agent, client_for):
    client = client_for("shapes")
    with pytest.raises(ValueError, match=r"scores: \(3,\) values, expected 2"):
        client.log_predictions(["a", "b"], {"x": [1.0, 2.0]}, scores=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"features\['x'\]"):
        client.log_predictions(["a", "b"], {"x": [1.0]})
    with pytest.raises(ValueError, match="values, labels: set exactly one"):
        client.log_outcomes(["a"])


def test_sample_rate_reaches_the_agent_and_weights_the_prediction_count(agent, client_for):
    client = client_for("sampled", sample_rate=0.25, seed=11)
    for i in range(400):
        client.log_prediction(f"s{i}", {"x": 1.0}, score=0.5)
    assert client.flush(5)
    stats = client.stats()
    sent = stats.sent_predictions
    assert 0 < sent < 400 and sent + stats.sampled_out == 400

    health = report(agent, "sampled")
    assert health["totals"]["rows"] == sent
    assert health["totals"]["estimated_predictions"] == sent * 4
    text = httpx.get(agent.api_url + "/metrics").text
    total = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("ml_predictions_total{") and 'ml_model_name="sampled"' in line
    )
    assert total == sent * 4


def test_an_id_logged_twice_goes_in_a_second_batch_instead_of_sinking_the_first(agent, client_for):
    client = client_for("dups", flush_interval_s=60)
    for i in range(10):
        client.log_prediction(f"d{i}", {"x": 1.0}, score=0.5)
    client.log_prediction("d3", {"x": 2.0}, score=0.6)  # the agent refuses repeats in a batch
    assert client.flush(5)
    stats = client.stats()
    assert (stats.sent_predictions, stats.sent_batches, stats.dropped) == (11, 2, {})
    assert report(agent, "dups")["totals"]["rows"] == 11


def test_a_bad_event_is_dropped_alone_and_nothing_raises(agent, client_for):
    client = client_for("bad-events", flush_interval_s=60)
    client.log_prediction("ok1", {"x": 1.0})
    client.log_prediction("bad-model", {"x": 1.0}, model="no spaces allowed")
    client.log_prediction("bad-attrs", {"x": 1.0}, attributes={f"k{i}": "v" for i in range(9)})
    client.log_prediction("bad-features", [1, 2, 3])  # type: ignore[arg-type]
    client.log_prediction("", {"x": 1.0})
    client.log_outcome("ok1")  # neither value nor label
    client.log_prediction("ok2", {"x": 1.0})
    client.log_prediction(12345, {"x": 1.0})  # type: ignore[arg-type]  # ints become "12345"
    assert client.flush(5)
    stats = client.stats()
    assert stats.dropped == {"invalid_event": 5}
    assert stats.sent_predictions == 3
    assert report(agent, "bad-events")["totals"]["rows"] == 3
    with pytest.raises(ValueError, match=r"ids\[2\]: duplicate id 'a' \(first at ids\[0\]\)"):
        client.log_predictions(["a", "b", "a"], {"x": [1.0, 2.0, 3.0]})


def test_events_still_buffered_at_interpreter_exit_are_flushed(agent):
    script = f"""
from agent.client import SidecarClient
client = SidecarClient({agent.ingest_target!r}, model="atexit", flush_interval_s=60)
for i in range(25):
    client.log_prediction(f"e{{i}}", {{"x": float(i)}}, score=0.5)
other = SidecarClient({agent.ingest_target!r}, model="atexit-other")
other.close()  # closing another client leaves this one's exit hook in place
# no flush(), no close(): the atexit hook sends them
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert report(agent, "atexit")["totals"]["rows"] == 25


def test_an_async_client_never_closed_is_flushed_at_interpreter_exit(agent):
    script = f"""
import asyncio
from agent.client import AsyncSidecarClient

async def main():
    client = AsyncSidecarClient({agent.ingest_target!r}, model="atexit-async", flush_interval_s=60)
    for i in range(25):
        client.log_prediction(f"e{{i}}", {{"x": float(i)}}, score=0.5)
    client.log_predictions(["b1", "b2"], {{"x": [1.0, 2.0]}})
    # no flush(), no close(): the loop ends, then the exit hook sends them without it

asyncio.run(main())
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert report(agent, "atexit-async")["totals"]["rows"] == 27


def test_tls_credentials_and_token_reach_a_guarded_agent(start_agent, tmp_path):
    from tls import Pki

    pki = Pki(tmp_path)
    agent = start_agent(ingest={"tls": pki.server_tls(), "token": "tls-token"})
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    with SidecarClient(
        agent.ingest_target, model="secured", credentials=credentials, token="tls-token", **FAST
    ) as client:
        client.log_prediction("s1", {"x": 1.0}, score=0.5)
        assert client.flush(5)
        assert client.stats().dropped == {}
    assert report(agent, "secured")["totals"]["rows"] == 1


# -- what the client does with the agent's answers ---------------------------------------------


def test_a_batch_over_the_agents_row_limit_is_split_and_all_rows_arrive(start_agent):
    agent = start_agent(ingest={"max_rows_per_batch": 16})
    with SidecarClient(agent.ingest_target, model="split", batch_rows=100, **FAST) as client:
        for i in range(100):
            client.log_prediction(f"r{i}", {"x": float(i)}, score=0.1)
        assert client.flush(5)
        stats = client.stats()
    assert report(agent, "split")["totals"]["rows"] == 100
    assert stats.sent_predictions == 100 and stats.dropped == {}
    assert stats.splits >= 7  # 100 -> 50 -> 25 -> 12/13: at least 8 pieces


def test_a_batch_over_the_clients_size_limit_is_split_before_sending(agent, client_for):
    client = client_for("bytes", batch_rows=200, max_message_bytes=4096)
    for i in range(200):
        client.log_prediction(f"q{i}", {f"f{j}": float(j) for j in range(5)}, score=0.1)
    assert client.flush(5)
    stats = client.stats()
    assert stats.splits > 0 and stats.sent_batches > 1
    assert report(agent, "bytes")["totals"]["rows"] == 200


def test_a_permanent_rejection_is_dropped_and_counted_with_its_reason(start_agent):
    agent = start_agent(ingest={"token": "secret-token"})
    with SidecarClient(agent.ingest_target, model="refused", **FAST) as client:
        for i in range(10):
            client.log_prediction(f"x{i}", {"x": 1.0})
        assert client.flush(5)  # nothing left: the batch was settled (dropped)
        stats = client.stats()
    assert stats.dropped == {"unauthenticated": 10}
    assert stats.last_errors["unauthenticated"] == "missing or wrong bearer token"
    assert stats.retries == 0 and stats.breaker_state == "closed"  # the agent is up

    with SidecarClient(
        agent.ingest_target, model="refused", token="secret-token", **FAST
    ) as client:
        client.log_prediction("ok", {"x": 1.0})
        assert client.flush(5)
    assert report(agent, "refused")["totals"]["rows"] == 1


def test_invalid_argument_from_the_agent_is_counted_not_retried(start_agent):
    agent = start_agent(ingest={"max_models": 1})
    with SidecarClient(agent.ingest_target, model="limited", model_version="v1", **FAST) as client:
        client.log_prediction("a", {"x": 1.0})
        assert client.flush(5)
        client.log_prediction("b", {"x": 1.0}, model_version="v2")  # a second version: refused
        assert client.flush(5)
        stats = client.stats()
    assert stats.sent_predictions == 1
    assert stats.dropped == {"invalid_argument": 1}
    assert "max_models" in stats.last_errors["invalid_argument"]
    assert stats.retries == 0


class FlakyProxy:
    """A real gRPC server in front of the agent that forwards every call but answers the
    first ``fail`` ones with ``code``, as if the response had been lost on the way back.

    A fake network, since no real network here loses responses on demand; the agent
    behind it is real and does the counting.
    """

    def __init__(self, upstream: str, fail: int, code: grpc.StatusCode) -> None:
        self.fail, self.code, self.calls = fail, code, 0
        self._channel = grpc.insecure_channel(upstream)
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        self.server.add_generic_rpc_handlers([self])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def service(self, details: Any) -> Any:
        forward = self._channel.unary_unary(details.method)  # raw bytes both ways

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.calls += 1
            answer = forward(request, timeout=5)
            if self.calls <= self.fail:
                context.abort(self.code, "response lost (test proxy)")
            return answer

        return grpc.unary_unary_rpc_method_handler(handle)

    def stop(self) -> None:
        self.server.stop(0)
        self._channel.close()


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_a_retry_resends_the_same_batch_id_and_the_agent_counts_it_once(agent, code):
    proxy = FlakyProxy(agent.ingest_target, fail=2, code=code)
    try:
        with SidecarClient(f"127.0.0.1:{proxy.port}", model="retried", **FAST) as client:
            for i in range(50):
                client.log_prediction(f"r{i}", {"x": float(i)}, score=0.3)
            assert client.flush(5)
            stats = client.stats()
    finally:
        proxy.stop()
    assert proxy.calls == 3  # two "lost" answers, then the acknowledgement
    assert stats.retries == 2
    assert stats.duplicate_batches == 1  # the agent recognised the batch_id
    assert stats.sent_predictions == 50 and stats.dropped == {}
    assert report(agent, "retried")["totals"]["rows"] == 50  # counted once, not three times


def test_retries_are_bounded_then_the_batch_is_dropped_with_the_status(agent):
    proxy = FlakyProxy(agent.ingest_target, fail=100, code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    try:
        client = SidecarClient(
            f"127.0.0.1:{proxy.port}", model="exhausted", max_retries=2, breaker_fail_max=50, **FAST
        )
        client.log_prediction("e1", {"x": 1.0})
        assert client.flush(5)
        stats = client.stats()
        client.close(1)
    finally:
        proxy.stop()
    assert proxy.calls == 3  # one try and two retries
    assert stats.retries == 2
    assert stats.dropped == {"resource_exhausted": 1}


# -- buffer, flush, close ---------------------------------------------------------------------


def test_a_full_buffer_drops_the_oldest_events_and_counts_them(agent):
    client = SidecarClient(
        agent.ingest_target, model="full", max_buffer=10, batch_rows=100, flush_interval_s=60
    )
    for i in range(25):
        client.log_prediction(f"f{i}", {"x": float(i)}, score=0.5)
    assert client.stats().buffered == 10
    assert client.stats().dropped == {"buffer_full": 15}
    assert client.flush(5)
    for i in range(10, 25):  # f10..f14 were dropped, and five of these outcomes will be
        client.log_outcome(f"f{i}", value=1.0)
    assert client.flush(5)
    client.close(1)

    health = report(agent, "full")
    assert health["totals"]["rows"] == 10
    assert health["outcomes"]["joined"] == 10  # f15..f24: the newest ten were kept


def test_events_logged_after_close_are_counted_not_raised(agent):
    client = SidecarClient(agent.ingest_target, model="closed", **FAST)
    client.log_prediction("a", {"x": 1.0})
    client.close(5)
    client.log_prediction("b", {"x": 1.0})
    client.log_outcome("a", value=1.0)
    client.close()  # a second close does nothing
    stats = client.stats()
    assert stats.sent_predictions == 1
    assert stats.dropped == {"closed": 2}
    assert report(agent, "closed")["totals"]["rows"] == 1


def test_close_waits_for_delivery_and_the_context_manager_closes(agent):
    with SidecarClient(agent.ingest_target, model="ctx", flush_interval_s=30) as client:
        for i in range(7):
            client.log_prediction(f"c{i}", {"x": float(i)})
    # the 30 s timer never fired: leaving the block flushed
    assert report(agent, "ctx")["totals"]["rows"] == 7
    assert not client._thread.is_alive()


def test_flush_returns_false_when_the_agent_cannot_be_reached():
    client = SidecarClient(f"127.0.0.1:{free_port()}", model="nowhere", send_timeout_s=0.2, **FAST)
    client.log_prediction("a", {"x": 1.0})
    started = time.monotonic()
    assert client.flush(timeout=0.3) is False
    assert time.monotonic() - started < 2
    client.close(timeout=0.2)
    assert (
        client.stats().dropped.get("closed", 0) + client.stats().dropped.get("unavailable", 0) == 1
    )


def test_the_dropped_metric_is_exported_through_the_services_meter_provider():
    reader = InMemoryMetricReader()
    client = SidecarClient(
        f"127.0.0.1:{free_port()}",
        model="metered",
        max_buffer=2,
        flush_interval_s=60,
        meter_provider=MeterProvider(metric_readers=[reader]),
    )
    for i in range(5):
        client.log_prediction(f"m{i}", None, score=0.1)
    points = data_points(reader, "mlsidecar.client.dropped")
    assert [(dict(p.attributes), p.value) for p in points] == [
        ({"ml.model.name": "metered", "reason": "buffer_full"}, 3)
    ]
    client.close(timeout=0.1)


# -- helpers ----------------------------------------------------------------------------------


def test_monitor_decorator_logs_inputs_outputs_and_latency(agent, client_for):
    client = client_for("decorated")

    @client.monitor()
    def predict(features: dict[str, float]) -> float:
        time.sleep(0.002)
        return features["amount"] / 100

    @client.monitor(output=lambda r: {"label": r[0], "score": r[1]})
    def classify(features: dict[str, float]) -> tuple[str, float]:
        return ("high", 0.9) if features["amount"] > 50 else ("low", 0.1)

    assert predict({"amount": 42.0}) == 0.42
    assert classify({"amount": 80.0}) == ("high", 0.9)
    assert client.flush(5)
    health = report(agent, "decorated")
    assert health["totals"]["rows"] == 2
    assert health["window"]["latency_ms"]["max"] >= 2.0
    assert health["window"]["score"]["max"] == 0.9


def test_timed_block_logs_its_prediction_with_the_id_it_hands_out(agent, client_for):
    client = client_for("timed")
    with client.timed(features={"amount": 3.0}) as prediction:
        prediction.score = 0.7
    client.log_outcome(prediction.id, value=1.0)
    with pytest.raises(RuntimeError), client.timed(id="failed", features={"amount": 1.0}):
        raise RuntimeError("the model failed")  # no prediction is logged for it
    assert client.flush(5)
    health = report(agent, "timed")
    assert health["totals"]["rows"] == 1
    assert health["outcomes"]["joined"] == 1
    assert prediction.latency_ms is not None and prediction.latency_ms >= 0


def test_bad_options_are_refused_naming_the_option():
    with pytest.raises(ValueError, match="model: 'a b' does not match"):
        SidecarClient(model="a b")
    with pytest.raises(ValueError, match=r"sample_rate: 0 is outside \(0, 1\]"):
        SidecarClient(model="m", sample_rate=0)
    with pytest.raises(ValueError, match="max_buffer: 0 must be a positive integer"):
        SidecarClient(model="m", max_buffer=0)
    with pytest.raises(ValueError, match="model_version: 'v 1'"):
        SidecarClient(model="m", model_version="v 1")
    for client_class in (SidecarClient, AsyncSidecarClient):  # one check, shared by both
        with pytest.raises(ValueError, match="close_timeout_s: -1 must not be negative"):
            client_class(model="m", close_timeout_s=-1)


# -- asyncio ----------------------------------------------------------------------------------


def test_async_client_sends_from_a_task_with_the_same_semantics(agent):
    async def main() -> ClientStats:
        async with AsyncSidecarClient(agent.ingest_target, model="aio", **FAST) as client:
            tracer = TracerProvider().get_tracer("svc")
            for i in range(120):
                with tracer.start_as_current_span("predict"):
                    client.log_prediction(f"a{i}", {"x": float(i)}, score=0.2, latency_ms=1.0)
            for i in range(60):
                client.log_outcome(f"a{i}", label="yes")
            client.log_predictions(["bulk1", "bulk2"], {"x": np.array([1.0, 2.0])})

            @client.monitor()
            async def predict(features: dict[str, float]) -> dict[str, Any]:
                await asyncio.sleep(0.001)
                return {"score": 0.9, "label": "yes"}

            assert await predict({"x": 3.0}) == {"score": 0.9, "label": "yes"}
            assert await client.flush(5)
            return client.stats()

    stats = asyncio.run(main())
    assert (stats.sent_predictions, stats.sent_outcomes, stats.dropped) == (123, 60, {})
    assert stats.sent == 183
    health = report(agent, "aio")
    assert health["totals"]["rows"] == 123
    assert health["window"]["latency_ms"]["max"] >= 1.0  # the decorated coroutine's time
    assert health["outcomes"]["joined"] == 60
    spans = [
        s
        for s in agent.spans.get_finished_spans()
        if s.attributes.get("ml.model.name") == "aio" and "SubmitPredictions" in s.name
    ]
    assert any(span.links for span in spans)


def test_async_client_created_outside_a_loop_starts_on_first_use(agent):
    client = AsyncSidecarClient(agent.ingest_target, model="lazy", **FAST)

    async def main() -> None:
        client.log_prediction("l1", {"x": 1.0})
        assert await client.flush(5)
        await client.close()

    asyncio.run(main())
    assert report(agent, "lazy")["totals"]["rows"] == 1


def test_async_client_never_blocks_the_loop_when_the_agent_is_down():
    async def main() -> tuple[float, ClientStats]:
        client = AsyncSidecarClient(
            f"127.0.0.1:{free_port()}",
            model="aio-down",
            send_timeout_s=0.2,
            breaker_fail_max=2,
            breaker_reset_s=0.2,
            max_buffer=100,
            batch_rows=10,
            **FAST,
        )
        worst = 0.0
        for i in range(400):
            started = time.perf_counter()
            client.log_prediction(f"d{i}", {"x": 1.0})
            worst = max(worst, time.perf_counter() - started)
            if i % 20 == 0:
                await asyncio.sleep(0.01)
        stats = client.stats()
        await client.close(timeout=0.2)
        return worst, stats

    worst, stats = asyncio.run(main())
    assert worst < 0.1  # an enqueue, never a network wait (send_timeout_s is 0.2 s)
    assert stats.breaker_state == "open"
    assert stats.dropped.get("buffer_full", 0) > 0


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_the_fastapi_example_links_each_prediction_to_its_request_span(agent, monkeypatch):
    import importlib.util
    from pathlib import Path

    from fastapi.testclient import TestClient

    monkeypatch.setenv("MLSIDECAR_TARGET", agent.ingest_target)
    path = Path(__file__).resolve().parent.parent / "examples" / "fastapi_app.py"
    spec = importlib.util.spec_from_file_location("fastapi_app_example", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    with TestClient(example.app) as http:  # runs the lifespan: start, then close (flush)
        answers = [
            http.post("/predict", json={"amount": amount, "merchant": "online"}).json()
            for amount in (10.0, 200.0, 400.0)
        ]
        assert http.post(f"/outcome/{answers[0]['id']}", params={"label": "legit"}).is_success
    assert [a["label"] for a in answers] == ["legit", "fraud", "fraud"]

    health = report(agent, "fraud-scorer")
    assert health["totals"]["rows"] == 3
    assert health["outcomes"]["joined"] == 1
    assert health["window"]["latency_ms"]["count"] == 3
    (span,) = [
        s
        for s in agent.spans.get_finished_spans()
        if s.name == "mlsidecar.v1.Ingest/SubmitPredictions"
        and s.attributes.get("ml.model.name") == "fraud-scorer"
    ]
    assert {link.attributes["ml.prediction.id"] for link in span.links} == {
        a["id"] for a in answers
    }
    assert len({link.context.trace_id for link in span.links}) == 3  # one trace per request


# -- packaging --------------------------------------------------------------------------------

# A client-only install, simulated in a subprocess of this venv: every module that is not
# the standard library, agent.client / agent._proto, or a file of the client's declared
# distributions (and what they require) fails to import.
ISOLATED_IMPORT = r"""
import importlib.metadata as md, json, re, sys

CLIENT = ["grpcio", "protobuf", "numpy", "pybreaker", "opentelemetry-api"]

def closure(names):
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name.lower() in seen:
            continue
        seen.add(name.lower())
        for req in md.requires(name) or []:
            if "extra ==" not in req:
                todo.append(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
    return seen

allowed = set()
for dist in closure(CLIENT):
    for f in md.files(dist) or []:
        if f.suffix in (".py", ".so") and ".dist-info" not in str(f):
            parts = list(f.parts)
            parts[-1] = parts[-1].split(".")[0]
            if parts[-1] == "__init__":
                parts.pop()
            for i in range(1, len(parts) + 1):  # and its packages (namespace ones too)
                allowed.add(".".join(parts[:i]))

def permitted(name):
    top = name.split(".")[0]
    if top in sys.stdlib_module_names or name in allowed:
        return True
    return name == "agent" or name.startswith(("agent.client", "agent._proto"))

class ClientOnly:
    def find_spec(self, name, path=None, target=None):
        if not permitted(name):
            raise ImportError(f"not in the client's dependency set: {name}")
        return None

sys.meta_path.insert(0, ClientOnly())
import agent.client
from agent.client import SidecarClient
client = SidecarClient("127.0.0.1:1", model="m", flush_interval_s=60)
client.log_prediction("a", {"x": 1.0}, score=0.5)
client.close(timeout=0.1)
print(json.dumps(sorted(sys.modules)))
"""


def test_the_client_imports_and_runs_with_only_its_declared_dependencies():
    done = subprocess.run(
        [sys.executable, "-c", ISOLATED_IMPORT], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    modules = set(json.loads(done.stdout.splitlines()[-1]))
    assert {"agent.client", "pybreaker", "grpc", "numpy"} <= modules
    assert not {"fastapi", "uvicorn", "psutil", "redis"} & modules


def test_importing_the_client_in_the_full_venv_loads_no_server_module():
    code = "import sys, json; import agent.client; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    modules = set(json.loads(done.stdout))
    ours = {m for m in modules if m.startswith("agent.")}
    assert ours and all(m.startswith(("agent.client", "agent._proto")) for m in ours)
    # pybreaker imports redis when it is installed (its optional storage), and redis pulls
    # in the OTel SDK; the web stack never comes with the client.
    assert not {"fastapi", "uvicorn", "starlette", "pydantic", "scipy"} & {
        m.split(".")[0] for m in modules
    }
