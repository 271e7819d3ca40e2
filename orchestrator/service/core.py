"""What every route shares: the deployment's settings, who is asking, and what they may see.

A request carries an API token (`Authorization: Bearer lj_...`, or the dashboard's session
cookie plus its CSRF header). Another owner's job answers 404 exactly like a job that does not
exist, so ids cannot be probed. Repeated bad tokens from one address are slowed down with 429.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from fastapi import Request

from lorajobs.jobspecs.failures import AccessDenied, InvalidInput, JobNotFound, NotAuthenticated
from lorajobs.orchestrator.queue import JobRecord, Queue
from lorajobs.orchestrator.settings import Settings
from lorajobs.orchestrator.tokens import Principal, Tokens
from lorajobs.storage.boundaries import Boundary, boundary_from_env, owner_root

COOKIE = "lorajobs_session"
CSRF_COOKIE = "lorajobs_csrf"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class TooManyAttempts(InvalidInput):
    """Too many bad tokens from one address: slow down (HTTP 429)."""


@dataclass(frozen=True)
class ServiceConfig:
    """The server's own knobs (environment variables in `docs/cluster.md`)."""

    boundary: Boundary
    max_request_bytes: int = 1 << 20
    max_upload_bytes: int = 50 << 30
    bad_tokens_per_minute: int = 10
    secure_cookies: bool = False

    @classmethod
    def from_env(cls, settings: Settings, env: Mapping[str, str] | None = None) -> ServiceConfig:
        env = os.environ if env is None else env
        boundary = boundary_from_env(env, bucket=settings.bucket, force=True)
        assert boundary is not None
        return cls(
            boundary=boundary,
            max_request_bytes=int(env.get("LORAJOBS_MAX_REQUEST_BYTES") or 1 << 20),
            max_upload_bytes=int(float(env.get("LORAJOBS_MAX_UPLOAD_GB") or 50) * (1 << 30)),
            bad_tokens_per_minute=int(env.get("LORAJOBS_BAD_TOKENS_PER_MINUTE") or 10),
            secure_cookies=(env.get("LORAJOBS_SECURE_COOKIES", "").strip() == "1"),
        )


class Throttle:
    """Counts bad tokens per client address over the last minute."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._seen: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, who: str, now: float) -> deque[float]:
        q = self._seen.setdefault(who, deque())
        while q and now - q[0] > 60.0:
            q.popleft()
        return q

    def check(self, who: str) -> None:
        with self._lock:
            q = self._recent(who, time.monotonic())
            if len(q) >= self.per_minute:
                wait = int(60 - (time.monotonic() - q[0])) + 1
                raise TooManyAttempts(f"too many bad tokens from this address: retry in {wait} s")

    def failed(self, who: str) -> None:
        with self._lock:
            self._recent(who, time.monotonic()).append(time.monotonic())


class Service:
    """The queue, the tokens and the rules, for one server process."""

    def __init__(self, settings: Settings, config: ServiceConfig, queue: Queue) -> None:
        self.settings = settings
        self.config = config
        self.queue = queue
        self.tokens = Tokens(queue.engine, queue.clock)
        self.throttle = Throttle(config.bad_tokens_per_minute)

    def authenticate(self, request: Request) -> Principal:
        """The principal of this request's token; 401 without a valid one, 429 when throttled."""
        who = request.client.host if request.client else "?"
        self.throttle.check(who)
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        from_cookie = False
        if not token:
            token, from_cookie = request.cookies.get(COOKIE, ""), True
        if not token:
            raise NotAuthenticated("no API token: send 'Authorization: Bearer <token>'")
        principal = self.tokens.verify(token)
        if principal is None:
            self.throttle.failed(who)
            raise NotAuthenticated("unknown or revoked API token")
        if from_cookie and request.method not in SAFE_METHODS:
            sent, want = request.headers.get(CSRF_HEADER, ""), request.cookies.get(CSRF_COOKIE, "")
            if not want or not secrets.compare_digest(sent, want):
                raise AccessDenied("missing or wrong CSRF token (header X-CSRF-Token)")
        return principal

    def job(self, principal: Principal, ref: str) -> JobRecord:
        """A job the principal may see; another owner's answers exactly as a missing one."""
        owner = None if principal.is_admin else principal.owner
        try:
            return self.queue.get(ref, owner=owner)
        except JobNotFound:
            raise JobNotFound(f"no job {ref!r}") from None

    def writable_job(self, principal: Principal, ref: str) -> JobRecord:
        job = self.job(principal, ref)
        require_writer(principal)
        return job

    def root(self, owner: str) -> str:
        """The owner's prefix in the bucket: its data, staging, logs and adapters."""
        return owner_root(self.settings.bucket, owner)

    def visible_owner(self, principal: Principal, asked: str | None) -> str | None:
        """The owner to filter by: a member or viewer only ever sees its own."""
        if principal.is_admin:
            return asked
        if asked is not None and asked != principal.owner:
            return "\0"  # nobody: another owner's jobs are simply not there
        return principal.owner


def require_writer(principal: Principal) -> None:
    if not principal.can_write:
        raise AccessDenied(f"token {principal.token_id} is a viewer: it can only read")
