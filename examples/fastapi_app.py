"""A FastAPI model service that reports to mlsidecar through the client SDK.

    MLSIDECAR_TARGET=127.0.0.1:4320 .venv/bin/uvicorn examples.fastapi_app:app --port 8000
    curl -s -X POST 127.0.0.1:8000/predict -H 'content-type: application/json' \
         -d '{"amount": 42.5, "merchant": "fuel"}'
    curl -s -X POST '127.0.0.1:8000/outcome/<id>?label=fraud'

Each request is a span (opentelemetry-instrumentation-fastapi), so the prediction the
SDK logs carries that span's trace and span id: the agent's exemplars and span links
lead back to the request. The SDK never slows a request: ``log_prediction`` only
queues; a task sends batches in the background and ``close()`` flushes on shutdown.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from pydantic import BaseModel

from agent.client import AsyncSidecarClient

sidecar = AsyncSidecarClient(
    os.environ.get("MLSIDECAR_TARGET", "127.0.0.1:4320"),
    model="fraud-scorer",
    model_version="v1",
    token=os.environ.get("MLSIDECAR_TOKEN"),  # when the agent sets ingest.token
)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await sidecar.start()
    yield
    await sidecar.close(timeout=5)  # flush what is still queued


app = FastAPI(title="fraud-scorer", lifespan=lifespan)
# In production, give the provider a BatchSpanProcessor(OTLPSpanExporter()) for Tempo.
FastAPIInstrumentor.instrument_app(app, tracer_provider=TracerProvider())


class Transaction(BaseModel):
    amount: float
    merchant: str


def fraud_score(tx: Transaction) -> float:
    """A stand-in for the real model: a fixed logistic regression."""
    logit = -3.0 + 0.02 * (tx.amount - 30.0) + (1.0 if tx.merchant == "online" else 0.0)
    return 1.0 / (1.0 + math.exp(-logit))


@app.post("/predict")
async def predict(tx: Transaction) -> dict[str, object]:
    with sidecar.timed(features=tx.model_dump()) as prediction:
        prediction.score = fraud_score(tx)
        prediction.label = "fraud" if prediction.score >= 0.5 else "legit"
    return {"id": prediction.id, "score": prediction.score, "label": prediction.label}


@app.post("/outcome/{prediction_id}")
async def outcome(prediction_id: str, label: str) -> dict[str, str]:
    sidecar.log_outcome(prediction_id, label=label)  # joins the prediction on the agent
    return {"id": prediction_id, "label": label}


@app.get("/sidecar")
async def sidecar_stats() -> dict[str, object]:
    stats = sidecar.stats()
    return {
        "sent": stats.sent_predictions,
        "dropped": stats.dropped,
        "breaker": stats.breaker_state,
    }
