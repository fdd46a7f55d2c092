"""The webhook's HTTPS server: ``POST /mutate`` (AdmissionReview), ``GET /healthz``.

server = InjectorServer("0.0.0.0:8443", template_path, cert, key)
await server.start(); ...; await server.stop()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from agent.api.serve import HttpListener
from agent.config import Listener, TLSSettings
from agent.inject.patch import SidecarTemplate, admission_response


def build_app(template: SidecarTemplate) -> FastAPI:
    app = FastAPI(title="mlsidecar injector", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/mutate")
    async def mutate(request: Request) -> JSONResponse:
        try:
            review: Any = await request.json()
        except ValueError:
            return JSONResponse({"detail": "body is not JSON"}, status_code=400)
        if not isinstance(review, dict) or review.get("kind") != "AdmissionReview":
            return JSONResponse({"detail": "expected an AdmissionReview"}, status_code=400)
        return JSONResponse(admission_response(review, template))

    return app


class InjectorServer:
    """The template is read once at start: a new chart release rolls the injector's pod."""

    def __init__(self, listen: str, template: Path, cert: Path, key: Path) -> None:
        if not template.is_file():
            raise ValueError(f"--template: file {str(template)!r} does not exist")
        # The API server calls webhooks over TLS only; TLSSettings checks the files exist.
        settings = Listener(listen=listen, tls=TLSSettings(cert=cert, key=key))
        self._listener = HttpListener(
            build_app(SidecarTemplate.load(template)), settings, key="--listen", what="injector"
        )

    @property
    def port(self) -> int | None:
        return self._listener.port

    async def start(self) -> None:
        await self._listener.start()

    async def stop(self) -> None:
        await self._listener.stop()
