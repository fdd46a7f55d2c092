"""Admin API routes of the alerts: list, acknowledge, silence (docs/alerts.md).

    GET    /v1/alerts                    active (firing first), recent resolved, silences
    POST   /v1/alerts/{id}/ack           stop repeat notifications until it resolves
    POST   /v1/silences                  {"matchers": {"model": "churn"}, "duration_s": 3600}
    DELETE /v1/silences/{id}

The state-changing ones take the admin token when one is configured.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from agent.alerts.manager import Alerts
from agent.api.errors import error_response as _error


def add_alert_routes(
    app: FastAPI, alerts: Alerts, admin_refusal: Callable[[Request], JSONResponse | None]
) -> None:
    @app.get("/v1/alerts", tags=["alerts"])
    def list_alerts() -> dict[str, Any]:
        """Active alerts (firing first, then pending), recently resolved ones, silences."""
        return alerts.listing()

    @app.post("/v1/alerts/{alert_id}/ack", tags=["alerts"])
    def ack_alert(alert_id: str, request: Request) -> JSONResponse:
        """Acknowledge an active alert: no repeat notifications until it resolves."""
        if (refusal := admin_refusal(request)) is not None:
            return refusal
        alert = alerts.ack(alert_id)
        if alert is None:
            return _error(404, "NOT_FOUND", "alert", f"no active alert {alert_id!r}")
        return JSONResponse(asdict(alert))

    @app.post("/v1/silences", tags=["alerts"])
    async def add_silence(request: Request) -> JSONResponse:
        """Mute notifications of alerts whose labels match, for ``duration_s`` seconds."""
        if (refusal := admin_refusal(request)) is not None:
            return refusal
        try:
            body = json.loads(await request.body())
        except ValueError as error:
            return _error(400, "INVALID_ARGUMENT", "body", f"body: not valid JSON: {error}")
        if not isinstance(body, dict):
            return _error(400, "INVALID_ARGUMENT", "body", "body: expected a JSON object")
        matchers = body.get("matchers")
        if not isinstance(matchers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in matchers.items()
        ):
            return _error(
                400,
                "INVALID_ARGUMENT",
                "matchers",
                'matchers: expected an object of label: value strings, e.g. {"model": "churn"}',
            )
        duration = body.get("duration_s")
        if isinstance(duration, bool) or not isinstance(duration, int | float):
            return _error(400, "INVALID_ARGUMENT", "duration_s", "duration_s: expected a number")
        comment = body.get("comment", "")
        if not isinstance(comment, str):
            return _error(400, "INVALID_ARGUMENT", "comment", "comment: expected a string")
        if not math.isfinite(duration):
            return _error(400, "INVALID_ARGUMENT", "duration_s", "duration_s: must be finite")
        try:
            silence = alerts.silence(matchers, float(duration), comment)
        except ValueError as error:
            field = str(error).split(":", 1)[0]
            return _error(400, "INVALID_ARGUMENT", field, str(error))
        return JSONResponse(asdict(silence), status_code=201)

    @app.delete("/v1/silences/{silence_id}", tags=["alerts"])
    def delete_silence(silence_id: str, request: Request) -> JSONResponse:
        if (refusal := admin_refusal(request)) is not None:
            return refusal
        if not alerts.unsilence(silence_id):
            return _error(404, "NOT_FOUND", "silence", f"no silence {silence_id!r}")
        return JSONResponse({"deleted": silence_id})
