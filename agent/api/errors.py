"""The one JSON error shape of every HTTP answer the agent gives (admin API, egress proxy).

    error_response(404, "NOT_FOUND", "alert", "no active alert 'x'")
    # {"error": {"code": "NOT_FOUND", "reason": "alert", "message": "no active alert 'x'"}}

``code`` is the gRPC-style status name, ``reason`` a stable machine-readable word (often
the field at fault), ``message`` the human sentence.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse


def error_response(status: int, code: str, reason: str, message: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "reason": reason, "message": message}}, status_code=status
    )
