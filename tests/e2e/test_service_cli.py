"""The service from a user's and an operator's side: `login` keeps a token privately and the
CLI then goes through the server; `admin token` lists no secrets and revokes at once; the
server publishes its OpenAPI document, caps request bodies, sends security headers and no CORS;
LORAJOBS_HOME and its database are private."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from tests.e2e.cli import CLI
from tests.plugins.service import ApiServer

pytestmark = pytest.mark.slow


def test_login_keeps_the_token_private_and_the_cli_uses_the_server(
    api_server: ApiServer, tmp_path: Path
) -> None:
    token = api_server.token("acme")
    user = CLI(home=tmp_path / "user")
    r = user("login", api_server.url, "--token", token)
    assert r.code == 0 and "as acme (member)" in r.err, r.err
    creds = tmp_path / "user" / "config" / "lorajobs" / "credentials.json"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    assert json.loads(creds.read_text())["url"] == api_server.url
    assert user("status", "--json").json() == []  # through the server: no local database
    assert not (tmp_path / "user" / "lorajobs.db").exists()
    bad = CLI(home=tmp_path / "user2")("login", api_server.url, "--token", "lj_x_y")
    assert bad.code == 2 and "unknown or revoked" in bad.err
    assert user("logout").code == 0 and not creds.exists()


def test_admin_tokens_list_no_secret_and_revoke_at_once(api_server: ApiServer) -> None:
    token = api_server.token("acme", "viewer")
    listed = api_server.cli("admin", "token", "list", "--json")
    assert listed.code == 0 and token not in listed.out
    row = next(t for t in listed.json() if t["role"] == "viewer")
    assert row["owner"] == "acme" and row["revoked_at"] is None
    with api_server.http(token) as c:
        assert c.get("/v1/jobs").status_code == 200
        assert api_server.cli("admin", "token", "revoke", row["id"]).code == 0
        assert c.get("/v1/jobs").status_code == 401
    bad = api_server.cli("admin", "token", "create", "--owner", "acme", "--role", "root")
    assert bad.code == 2 and "--role must be one of" in bad.err


def test_openapi_headers_limits_and_no_cors(api_server: ApiServer) -> None:
    token = api_server.token("acme")
    with api_server.http(token) as c:
        doc = c.get("/v1/openapi.json").json()
        for path in (
            "/v1/jobs",
            "/v1/jobs/{ref}",
            "/v1/jobs/{ref}/logs",
            "/v1/jobs/{ref}/cancel",
            "/v1/jobs/{ref}/retry",
            "/v1/jobs/{ref}/priority",
            "/v1/adapters",
            "/v1/jobs/{ref}/adapter",
            "/v1/data/stage",
            "/v1/validate",
            "/v1/schema",
        ):
            assert path in doc["paths"], path
        r = c.get("/v1/jobs", headers={"Origin": "https://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        assert r.headers["x-frame-options"] == "DENY"
        assert "default-src 'self'" in r.headers["content-security-policy"]
        assert r.headers["x-content-type-options"] == "nosniff"
        big = c.post(
            "/v1/validate",
            content=b"{" + b" " * (2 << 20) + b"}",
            headers={"content-type": "application/json"},
        )
        assert big.status_code == 413
        preflight = c.options(
            "/v1/jobs",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in preflight.headers
    # Cookie-authenticated writes need the CSRF header (the dashboard sends it).
    with api_server.http() as c:
        c.cookies.set("lorajobs_session", token)
        c.cookies.set("lorajobs_csrf", "abc")
        assert c.get("/v1/jobs").status_code == 200
        assert c.post("/v1/jobs/0123456789ab/cancel").status_code == 403
        ok = c.post("/v1/jobs/0123456789ab/cancel", headers={"X-CSRF-Token": "abc"})
        assert ok.status_code == 404


def test_home_and_database_are_private(tmp_path: Path) -> None:
    cli = CLI(home=tmp_path / "home")
    assert cli("status").code == 0
    assert stat.S_IMODE((tmp_path / "home").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "home" / "lorajobs.db").stat().st_mode) == 0o600
