"""The FastAPI application: `/v1` (its OpenAPI document at `/v1/openapi.json`), the dashboard
at `/`, errors as one-line JSON, and the hardening every response gets.

Hardening: request bodies are capped (`LORAJOBS_MAX_REQUEST_BYTES`; file uploads have their own
cap), security headers on every response (no sniffing, no framing, a strict content security
policy, no referrer), no CORS (no cross-origin reads are allowed, so none are configured), and
repeated bad tokens from one address get 429. The dashboard's session cookie is HttpOnly and
SameSite=Strict and its writes need a CSRF header; TLS is the reverse proxy's (or uvicorn's
`--ssl-*` options), see `docs/cluster.md`.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from lorajobs.jobspecs.failures import (
    AccessDenied,
    InvalidInput,
    InvalidTransition,
    JobNotFound,
    LoraJobsError,
    NotAuthenticated,
    ObjectNotFound,
    SpecError,
    StorageError,
)
from lorajobs.orchestrator.queue import Queue
from lorajobs.orchestrator.service import dashboard, data_api, jobs_api
from lorajobs.orchestrator.service.core import Service, ServiceConfig, TooManyAttempts
from lorajobs.orchestrator.settings import Settings

log = logging.getLogger(__name__)

#: The first match wins: most specific classes first.
STATUS = (
    (TooManyAttempts, 429),
    (NotAuthenticated, 401),
    (AccessDenied, 403),
    (JobNotFound, 404),
    (ObjectNotFound, 404),
    (SpecError, 422),
    (InvalidInput, 400),
    (InvalidTransition, 409),
    (StorageError, 502),
)

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def status_of(err: LoraJobsError) -> int:
    for cls, code in STATUS:
        if isinstance(err, cls):
            return code
    return 500


def create_app(settings: Settings, config: ServiceConfig, queue: Queue) -> FastAPI:
    """The server's application over `queue` and `settings.bucket`."""
    app = FastAPI(
        title="lorajobs",
        version="1",
        description="Train many LoRA adapters: the queue, the bucket and the dashboard.",
        openapi_url="/v1/openapi.json",
        docs_url="/v1/docs",
        redoc_url=None,
    )
    app.state.service = Service(settings, config, queue)
    app.include_router(jobs_api.router)
    app.include_router(data_api.router)
    app.include_router(dashboard.router)

    @app.exception_handler(LoraJobsError)
    def _lorajobs_error(request: Request, err: LoraJobsError) -> JSONResponse:
        code = status_of(err)
        if code >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, err)
        body: dict[str, Any] = {"error": str(err).splitlines()[0]}
        if isinstance(err, SpecError):
            body["error"] = f"{err.source}: " + "; ".join(err.problems)
            body["problems"] = err.problems
        headers = {"WWW-Authenticate": "Bearer"} if code == 401 else None
        return JSONResponse(body, status_code=code, headers=headers)

    @app.exception_handler(RequestValidationError)
    def _bad_request(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in err.errors()
        ]
        return JSONResponse({"error": problems[0], "problems": problems}, status_code=422)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"ok": "yes"}

    app.add_middleware(_Hardening, max_bytes=config.max_request_bytes)
    return app


def from_env() -> FastAPI:
    """The app for this process's environment: what `lorajobs server --workers N` builds in
    each uvicorn worker process."""
    from lorajobs.orchestrator.db import ensure_schema, make_engine

    settings = Settings.from_env()
    engine = make_engine(settings)
    ensure_schema(engine, auto=settings.database_url.startswith("sqlite"))
    return create_app(settings, ServiceConfig.from_env(settings), Queue(engine))


class _Hardening:
    """ASGI middleware: security headers on every response, and a cap on request bodies (file
    uploads, `/v1/data/.../files/`, are capped by their route instead)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        capped = "/files/" not in scope.get("path", "")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if capped and declared is not None and int(declared or 0) > self.max_bytes:
            await _too_large(send, self.max_bytes)
            return
        seen, started = 0, time.perf_counter()

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if capped and message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                for k, v in SECURITY_HEADERS.items():
                    if k.lower().encode() not in names:
                        headers.append((k.encode(), v.encode()))
                # The time spent in the server, to the first byte (what bench/api.py reads).
                ms = (time.perf_counter() - started) * 1000
                headers.append((b"server-timing", f"app;dur={ms:.2f}".encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, counted, with_headers)
        except _BodyTooLarge:
            await _too_large(send, self.max_bytes)


class _BodyTooLarge(Exception):
    pass


async def _too_large(send: Any, limit: int) -> None:
    body = json.dumps({"error": f"request body larger than {limit} bytes"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                *[(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()],
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
