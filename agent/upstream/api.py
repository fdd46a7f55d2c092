"""Admin API routes of the upstream breakers (docs/upstream.md).

    GET  /v1/breakers                  every upstream's breaker: state, counters, retry-after
    POST /v1/breakers/{name}/reset     close it now (takes the admin token when one is set)

Target URLs never appear here: they may carry credentials.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from agent.api.errors import error_response as _error
from agent.upstream.proxy import Upstreams


def add_breaker_routes(
    app: FastAPI, upstreams: Upstreams, admin_refusal: Callable[[Request], JSONResponse | None]
) -> None:
    @app.get("/v1/breakers", tags=["upstream"])
    async def list_breakers() -> dict[str, Any]:
        """Every configured upstream's circuit breaker (Redis-shared ones read off the loop)."""
        return {"breakers": await upstreams.listing()}

    @app.post("/v1/breakers/{name}/reset", tags=["upstream"])
    async def reset_breaker(name: str, request: Request) -> JSONResponse:
        """Close an upstream's breaker now. Needs the admin token when one is set."""
        if (refusal := admin_refusal(request)) is not None:
            return refusal
        upstream = upstreams.by_name.get(name)
        if upstream is None or upstream.breaker is None:
            return _error(
                404, "NOT_FOUND", "unknown_breaker", f"no upstream {name[:100]!r} has a breaker"
            )
        await upstream.breaker.reset()
        return JSONResponse({"upstream": name, **await upstream.breaker.snapshot()})
