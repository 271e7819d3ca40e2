"""The CLI as a client of `lorajobs server`: every job and data command goes through the API.

On when `LORAJOBS_API_URL` is set (with `LORAJOBS_TOKEN`) or after `lorajobs login URL`, which
keeps the URL and token in `<config>/lorajobs/credentials.json` (mode 0600; `<config>` is
`$XDG_CONFIG_HOME` or `~/.config`). The user's machine then holds no database URL and no bucket
credentials: adapters and data move through presigned URLs or the server itself, and every
downloaded file is checked against the sha256 the server listed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorajobs.jobspecs.failures import (
    AccessDenied,
    IntegrityError,
    InvalidInput,
    InvalidTransition,
    JobNotFound,
    LoraJobsError,
    NotAuthenticated,
    SpecError,
    StorageError,
)

TIMEOUT_S = 60.0
CHUNK = 1 << 20


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME", "").strip() or str(Path("~/.config").expanduser())
    return Path(base) / "lorajobs"


def credentials_path() -> Path:
    return config_dir() / "credentials.json"


def save_login(url: str, token: str) -> Path:
    """Keep the server URL and token for later commands, readable by this user only."""
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(".credentials.json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "token": token}, f)
    os.replace(tmp, path)
    return path


def client_from_env() -> ApiClient | None:
    """The API client this CLI uses, or None for the embedded single-user mode."""
    url = os.environ.get("LORAJOBS_API_URL", "").strip()
    token = os.environ.get("LORAJOBS_TOKEN", "").strip()
    if not url:
        path = credentials_path()
        if not path.is_file():
            return None
        try:
            saved = json.loads(path.read_text())
            url, token = saved["url"], token or saved["token"]
        except (ValueError, KeyError, TypeError):
            raise InvalidInput(f"{path}: unreadable; run 'lorajobs login URL' again") from None
    if not token:
        raise InvalidInput(
            "LORAJOBS_API_URL is set but no token: set LORAJOBS_TOKEN or run 'lorajobs login URL'"
        )
    return ApiClient(url, token)


class ApiClient:
    """A thin client of the `/v1` API; errors come back as lorajobs errors (one line)."""

    def __init__(self, url: str, token: str) -> None:
        import httpx

        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}", "User-Agent": "lorajobs-cli"},
            timeout=TIMEOUT_S,
            follow_redirects=False,
        )
        # Presigned URLs carry their own signature: no token is ever sent to the bucket. One
        # client for all of them, so files reuse its connections.
        self._bare = httpx.Client(timeout=None, follow_redirects=False)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            r = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            raise StorageError(f"{self.url}: {type(err).__name__}: {err}") from None
        _raise_for(r)
        return r.json() if r.headers.get("content-type", "").startswith("application/json") else r

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
        return self.request("POST", path, json=body, headers=headers)

    def stream(self, path: str, **params: Any) -> Iterator[bytes]:
        """The body of a streamed GET, as it arrives."""
        import httpx

        query = {k: v for k, v in params.items() if v is not None}
        try:
            with self._http.stream("GET", path, params=query, timeout=None) as r:
                if r.status_code >= 400:
                    r.read()
                    _raise_for(r)
                yield from r.iter_bytes()
        except httpx.HTTPError as err:
            raise StorageError(f"{self.url}: {type(err).__name__}: {err}") from None

    def download(self, url: str, dest: Path, size: int, sha256: str) -> None:
        """One file from a presigned URL (no token sent) or from the server; sha256 checked
        before it takes its name."""
        import httpx

        own = url.startswith("/")
        h = hashlib.sha256()
        tmp = dest.with_name(f".{dest.name}.part")
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            client = self._http if own else self._bare
            with client.stream("GET", url) as r, open(tmp, "wb") as f:
                if r.status_code >= 400:
                    r.read()
                    _raise_for(r)
                for chunk in r.iter_bytes(CHUNK):
                    h.update(chunk)
                    f.write(chunk)
        except httpx.HTTPError as err:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"{dest.name}: download failed: {type(err).__name__}") from None
        if tmp.stat().st_size != size or h.hexdigest() != sha256:
            tmp.unlink(missing_ok=True)
            raise IntegrityError(f"{dest.name}: the bytes received do not match their sha256")
        os.replace(tmp, dest)

    def upload(self, plan: dict[str, Any], path: Path, sha256: str) -> dict[str, Any] | None:
        """Send one file as the server planned: a PUT (to the server or a presigned URL), or a
        multipart upload; returns what `commit` needs for a multipart one."""
        if plan["method"] == "PUT":
            client = self._http if plan["url"].startswith("/") else self._bare
            with open(path, "rb") as f:
                r = client.put(plan["url"], content=f, headers={"X-Content-SHA256": sha256})
            _raise_for(r)
            return None
        etags = []
        with open(path, "rb") as f:
            for part in plan["parts"]:
                r = self._bare.put(part["url"], content=f.read(plan["part_size"]))
                _raise_for(r)
                etags.append(r.headers["etag"])
        return {"upload_id": plan["upload_id"], "etags": etags}


#: HTTP status -> the lorajobs error it stands for (exit codes follow: 4xx are the user's, 2).
_ERRORS: dict[int, type[LoraJobsError]] = {
    400: InvalidInput,
    401: NotAuthenticated,
    403: AccessDenied,
    404: JobNotFound,
    409: InvalidTransition,
    413: InvalidInput,
    422: InvalidInput,
    429: InvalidInput,
}


def _raise_for(r: Any) -> None:
    if r.status_code < 400:
        return
    try:
        body = r.json()
    except ValueError:
        body = {}
    message = (body.get("error") if isinstance(body, dict) else None) or f"HTTP {r.status_code}"
    problems = body.get("problems") if isinstance(body, dict) else None
    if r.status_code == 422 and problems:
        raise SpecError("spec", list(problems))
    raise _ERRORS.get(r.status_code, StorageError)(message)
