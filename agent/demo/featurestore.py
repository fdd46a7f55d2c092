"""A tiny feature store: the demo model's upstream dependency, which the story breaks.

    store = FeatureStore()
    app = store.app()     # POST /features {"user_ids": [1, 2]} -> {"features": {"1": {...}}}
    store.failing = True  # every lookup answers 503 until set back (PUT /admin/failing too)

The model service reaches it only through the agent's egress proxy, so its breaker
guards the calls and opens while the store fails.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from agent.demo.world import account_age_days

if TYPE_CHECKING:
    from agent.api.serve import HttpListener

MAX_USERS_PER_LOOKUP = 1_000


class FeatureStore:
    """Serves each user's account features; ``failing`` makes it answer 503 (an outage)."""

    def __init__(self) -> None:
        self.failing = False
        self.lookups = 0
        self.refused = 0

    async def _features(self, request: Request) -> JSONResponse:
        if self.failing:
            self.refused += 1
            return JSONResponse({"error": "feature store unavailable (demo outage)"}, 503)
        try:
            body = json.loads(await request.body())
            ids = body["user_ids"]
            if not isinstance(ids, list) or len(ids) > MAX_USERS_PER_LOOKUP:
                raise ValueError
            users = np.array([int(i) for i in ids], dtype=np.int64)
        except (ValueError, KeyError, TypeError):
            return JSONResponse(
                {"error": f"user_ids: expected a list of at most {MAX_USERS_PER_LOOKUP} ints"},
                400,
            )
        self.lookups += 1
        ages = account_age_days(users)
        features = {
            str(u): {"account_age_days": float(a)} for u, a in zip(users, ages, strict=True)
        }
        return JSONResponse({"features": features})

    async def _set_failing(self, request: Request) -> JSONResponse:
        try:
            failing = json.loads(await request.body())["failing"]
            if not isinstance(failing, bool):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "failing: expected true or false"}, 400)
        self.failing = failing
        return JSONResponse(self.status())

    async def _status(self, request: Request) -> JSONResponse:
        return JSONResponse(self.status())

    def status(self) -> dict[str, Any]:
        return {"failing": self.failing, "lookups": self.lookups, "refused": self.refused}

    async def serve(self, listen: str, key: str) -> HttpListener:
        """Serve the store on ``listen`` (HOST:PORT, the option ``key``); stop the listener
        to end. The caller has checked the address (``parts.listen_address`` refuses a
        non-loopback one without --insecure), so the listener takes it as it is."""
        from agent.api.serve import HttpListener
        from agent.config import Listener

        listener = HttpListener(
            self.app(), Listener(listen=listen, insecure=True), key=key, what="demo feature store"
        )
        await listener.start()
        return listener

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/features", self._features, methods=["POST"]),
                Route("/admin/failing", self._set_failing, methods=["PUT"]),
                Route("/admin/status", self._status, methods=["GET"]),
            ]
        )
