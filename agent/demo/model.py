"""The demo model service: a FastAPI "fraud" scorer that logs every prediction via the SDK.

    service = ModelService(listen="127.0.0.1:0", sidecar="127.0.0.1:4320", sidecar_token=None,
                           feature_store_url="http://127.0.0.1:8321/upstream/features")
    await service.start()   # POST http://127.0.0.1:<service.port>/predict ; await service.stop()

A request scores a batch of transactions with a numpy logistic regression. The user's
account age comes from the feature store, called through the agent's egress proxy (so
its breaker guards the call); when that fails the model imputes a default and says so
(``features_source: fallback``). Each prediction is logged with its features, score,
label, latency and the request's trace context (opentelemetry-instrumentation-fastapi),
after the response is sent (a background task, still inside the request's span), so the
caller's latency does not include it; ``log_inline=True`` logs before responding.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import os
import time
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
from fastapi import BackgroundTasks, FastAPI, HTTPException
from opentelemetry import propagate
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from pydantic import BaseModel, Field

from agent.api.serve import HttpListener
from agent.config import Listener
from agent.demo.world import (
    MERCHANTS,
    MODEL,
    VERSION,
    fraud_probability,
)

if TYPE_CHECKING:
    from agent.client import SidecarClient

log = logging.getLogger(__name__)
THRESHOLD = 0.5
MAX_INSTANCES = 1_000


class Transaction(BaseModel):
    id: str = Field(min_length=1, max_length=128)
    amount: float = Field(ge=0, allow_inf_nan=False)
    hour: int = Field(ge=0, le=23)
    merchant: str = Field(min_length=1, max_length=64)
    user_id: int = Field(ge=0)


class PredictRequest(BaseModel):
    instances: list[Transaction] = Field(min_length=1, max_length=MAX_INSTANCES)


class Scored(BaseModel):
    id: str
    score: float
    label: str


class PredictResponse(BaseModel):
    predictions: list[Scored]
    features_source: str  # "store", "fallback" (the store failed) or "local" (no store)


async def _call(log: functools.partial[None]) -> None:
    log()


def _tracer_provider() -> TracerProvider:
    """Spans for the model's requests; exported over OTLP only when OTEL_* says where."""
    # OTEL_SERVICE_NAME, when set, names the service (Resource.create would let ours win).
    name = os.environ.get("OTEL_SERVICE_NAME") or "demo-fraud-model"
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


class ModelService:
    """The FastAPI app, its listener, its SDK client and its feature-store client."""

    def __init__(
        self,
        *,
        listen: str = "127.0.0.1:8080",
        sidecar: str = "127.0.0.1:4320",
        feature_store_url: str | None = None,
        log_predictions: bool = True,
        log_inline: bool = False,
        feature_timeout_s: float = 1.0,
        sidecar_token: str | None = None,
        proxy_token: str | None = None,
        insecure: bool = False,
    ) -> None:
        from agent.demo.parts import listen_address

        # A clear ValueError naming `listen` (not a pydantic one) for a bad or exposed address.
        listen_address(listen, "listen", insecure=insecure, what="demo model service")
        self.sidecar_target = sidecar
        self._sidecar_token = sidecar_token
        # The egress proxy asks for Proxy-Authorization when upstream.token is set.
        self._proxy_headers = (
            {} if proxy_token is None else {"proxy-authorization": f"Bearer {proxy_token}"}
        )
        self.feature_store_url = (
            None if feature_store_url is None else feature_store_url.rstrip("/")
        )
        self.log_predictions = log_predictions
        self.log_inline = log_inline
        self.feature_timeout_s = feature_timeout_s
        self.requests = 0
        self.predictions = 0
        self.fallbacks = 0
        self.client: SidecarClient | None = None
        self._http: httpx.AsyncClient | None = None
        self.tracer_provider = _tracer_provider()
        self.app = self._build_app()
        # insecure=True: listen_address above has refused a non-loopback address without it.
        self._listener = HttpListener(
            self.app,
            Listener(listen=listen, insecure=True),
            key="--listen",
            what="demo model service",
        )

    @property
    def port(self) -> int | None:
        return self._listener.port

    async def start(self) -> None:
        if self.log_predictions:
            from agent.client import SidecarClient

            self.client = SidecarClient(
                self.sidecar_target,
                model=MODEL,
                model_version=VERSION,
                token=self._sidecar_token,
                # 100 requests of 20 rows per RPC: the sender's CPU per request falls by
                # about a quarter against the default 500 (bench/README.md, demo latency)
                batch_rows=2000,
            )
        # trust_env off: the proxy is on loopback; an HTTP(S)_PROXY variable must not divert it.
        self._http = httpx.AsyncClient(timeout=self.feature_timeout_s, trust_env=False)
        await self._listener.start()

    async def stop(self) -> None:
        await self._listener.stop()
        if self._http is not None:
            await self._http.aclose()
        if self.client is not None:
            # Off the event loop: in `mlsidecar demo` the agent serves on this same loop.
            await asyncio.to_thread(self.client.close, 5.0)
        self.tracer_provider.shutdown()

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "predictions": self.predictions,
            "fallbacks": self.fallbacks,
            "logging": self.log_predictions,
            "logged": None
            if not self.log_predictions
            else "inline"
            if self.log_inline
            else "after-response",
            # this process's CPU time: the benchmark's CPU cost of the SDK per request
            "cpu_seconds": time.process_time(),
            "sdk": None if self.client is None else dataclasses.asdict(self.client.stats()),
        }

    async def _account_ages(self, user_ids: list[int]) -> tuple[np.ndarray, str]:
        """Account ages from the feature store (via the proxy), else NaN ("fallback")."""
        if self.feature_store_url is None or self._http is None:
            from agent.demo.world import account_age_days

            return account_age_days(np.array(user_ids)), "local"
        headers = dict(self._proxy_headers)
        propagate.inject(headers)  # the proxy's span and the store's become this request's children
        try:
            response = await self._http.post(
                f"{self.feature_store_url}/features", json={"user_ids": user_ids}, headers=headers
            )
            if response.status_code == 200:
                found = response.json()["features"]
                ages = [found.get(str(u), {}).get("account_age_days", math.nan) for u in user_ids]
                return np.array(ages, dtype=float), "store"
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        # The breaker is open or the store is down: score anyway with the feature missing.
        return np.full(len(user_ids), math.nan), "fallback"

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="mlsidecar demo fraud model", version=VERSION)

        @app.post("/predict", response_model=PredictResponse)
        async def predict(request: PredictRequest, background: BackgroundTasks) -> PredictResponse:
            started = time.perf_counter()
            rows = request.instances
            unknown = [r.merchant for r in rows if r.merchant not in MERCHANTS]
            if unknown:
                raise HTTPException(422, f"instances[].merchant: unknown merchant {unknown[0]!r}")
            ages, source = await self._account_ages([r.user_id for r in rows])
            amount = np.array([r.amount for r in rows])
            hour = np.array([r.hour for r in rows], dtype=float)
            merchant = np.array([r.merchant for r in rows])
            scores = fraud_probability(amount, ages, hour, merchant)
            labels = np.where(scores >= THRESHOLD, "fraud", "legit")
            latency_ms = (time.perf_counter() - started) * 1000.0
            self.requests += 1
            self.predictions += len(rows)
            if source == "fallback":
                self.fallbacks += 1
            if self.client is not None:
                # One batch-form call per request: the columns are already numpy arrays,
                # and the SDK coalesces requests into batches of batch_rows.
                log = functools.partial(
                    self.client.log_predictions,
                    [r.id for r in rows],
                    {
                        "amount": amount,
                        "hour": hour,
                        "merchant": merchant,
                        "account_age_days": ages,
                    },
                    scores=scores,
                    labels=labels,
                    latencies_ms=np.full(len(rows), latency_ms),
                    attributes={"features_source": source},
                )
                if self.log_inline:
                    log()
                else:
                    # Starlette runs it once the response is sent, inside the request's span
                    # (the event keeps its trace id); an async callable stays on this loop.
                    background.add_task(_call, log)
            return PredictResponse(
                predictions=[
                    Scored(id=r.id, score=float(s), label=str(lab))
                    for r, s, lab in zip(rows, scores, labels, strict=True)
                ],
                features_source=source,
            )

        @app.get("/healthz")
        async def healthz() -> dict[str, Any]:
            return {"status": "ok", "model": MODEL, "version": VERSION}

        @app.get("/stats")
        async def stats() -> dict[str, Any]:
            return self.stats()

        FastAPIInstrumentor.instrument_app(
            app, tracer_provider=self.tracer_provider, excluded_urls="healthz,stats"
        )
        return app
