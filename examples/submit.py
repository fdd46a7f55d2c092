"""Send one columnar batch of predictions, then outcomes for some of them, to a running agent.

    .venv/bin/mlsidecar run                            # in another terminal: ingest on 127.0.0.1:4320
    .venv/bin/python examples/submit.py                # --target HOST:PORT, --token-file F, --rows N

Columns are numpy arrays: protobuf packs a float64 array into a repeated double
field in one step, and the agent decodes it back into an array the same way,
so no code on either side loops over values.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message

from agent._proto.mlsidecar.v1 import ingest_pb2 as pb
from agent._proto.mlsidecar.v1 import ingest_pb2_grpc as pb_grpc

# Transient: back off and send the same batch again (same batch_id, so it is counted once).
RETRYABLE = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
Metadata = Sequence[tuple[str, str]]


def call_with_retry(
    rpc: Callable[..., Any], request: Message, *, metadata: Metadata, attempts: int = 5
) -> Any:
    """Retry transient refusals with exponential backoff; INVALID_ARGUMENT is permanent."""
    for attempt in range(attempts):
        try:
            return rpc(request, timeout=5, metadata=metadata)
        except grpc.RpcError as error:
            if error.code() not in RETRYABLE or attempt == attempts - 1:
                raise
            time.sleep(0.1 * 2**attempt)
    raise ValueError("attempts must be at least 1")


def prediction_batch(rows: int, rng: np.random.Generator) -> pb.PredictionBatch:
    amount = rng.lognormal(3.5, 1.0, rows)
    account_age_days = rng.gamma(2.0, 200.0, rows)
    account_age_days[rng.random(rows) < 0.05] = np.nan  # NaN = missing; never rejected
    merchant = rng.choice(["grocery", "travel", "electronics", "online"], rows)
    score = 1.0 / (1.0 + np.exp(3.0 - 0.02 * amount))
    return pb.PredictionBatch(
        model="fraud-scorer",
        model_version="v1",
        ids=[uuid.uuid4().hex for _ in range(rows)],  # the join key for outcomes
        features=[
            pb.Column(name="amount", numbers=pb.NumberValues(values=amount)),
            pb.Column(name="account_age_days", numbers=pb.NumberValues(values=account_age_days)),
            pb.Column(name="merchant", categories=pb.CategoryValues(values=merchant.tolist())),
        ],
        scores=score,
        labels=np.where(score >= 0.5, "fraud", "legit").tolist(),
        class_names=["legit", "fraud"],
        probabilities=np.column_stack([1.0 - score, score]).ravel(),  # row-major
        latencies_ms=rng.gamma(4.0, 3.0, rows),
        # The model request's trace context, so metric exemplars can point at its trace.
        trace_ids=[os.urandom(16) for _ in range(rows)],
        span_ids=[os.urandom(8) for _ in range(rows)],
        attributes={"region": "eu"},  # low-cardinality segment for the whole batch
        batch_id=uuid.uuid4().hex,  # idempotency key for retries
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:4320", help="agent gRPC ingest address")
    parser.add_argument(
        "--token-file",
        help="file holding the bearer token, when ingest.token is set (default: the "
        "MLSIDECAR_TOKEN variable; never a value on the command line, where ps shows it)",
    )
    parser.add_argument("--rows", type=int, default=200)
    args = parser.parse_args()
    token = (
        Path(args.token_file).read_text().strip()
        if args.token_file
        else os.environ.get("MLSIDECAR_TOKEN", "")
    )
    metadata = [("authorization", f"Bearer {token}")] if token else []
    rng = np.random.default_rng(7)

    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.IngestStub(channel)

        batch = prediction_batch(args.rows, rng)
        ack = call_with_retry(stub.SubmitPredictions, batch, metadata=metadata)
        print(f"predictions: accepted={ack.accepted} duplicate={ack.duplicate}")

        # Re-sending the same batch (e.g. after a lost response) is acknowledged, not recounted.
        ack = call_with_retry(stub.SubmitPredictions, batch, metadata=metadata)
        print(f"same batch again: accepted={ack.accepted} duplicate={ack.duplicate}")

        # Ground truth usually arrives later; here, for the first half of the rows.
        half = len(batch.ids) // 2
        outcomes = pb.OutcomeBatch(
            model=batch.model,
            model_version=batch.model_version,
            ids=batch.ids[:half],
            actual_labels=rng.choice(["legit", "fraud"], half, p=[0.95, 0.05]).tolist(),
            batch_id=uuid.uuid4().hex,
        )
        ack = call_with_retry(stub.SubmitOutcomes, outcomes, metadata=metadata)
        print(f"outcomes: accepted={ack.accepted}")

        health = stub.GetModelHealth(
            pb.ModelHealthRequest(model="fraud-scorer", model_version="v1"),
            timeout=5,
            metadata=metadata,
        )
        # The report is a google.protobuf.Struct: the same JSON as the HTTP endpoint,
        # except that every number is a double.
        report = json_format.MessageToDict(health.report)
        window, latency = report["window"], report["window"]["latency_ms"]
        print(
            f"current window: {int(window['count'])} rows, {int(window['outcomes'])} outcomes, "
            f"latency p50 {latency['p50']:.1f} ms, p99 {latency['p99']:.1f} ms"
        )
        print("health:", json.dumps(report["health"]))


if __name__ == "__main__":
    main()
