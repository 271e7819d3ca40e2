"""A real `lorajobs server` (uvicorn) on 127.0.0.1 for the tests, stopped by PID; tokens made
straight in its database, as `lorajobs admin token create` does."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.e2e.cli import CLI
from tests.plugins.postgres import _free_port


@dataclass
class ApiServer:
    """One server process and the CLI environment it was started with."""

    cli: CLI
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        self.proc = self.cli.popen("server", "--port", str(self.port), log=self.log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server did not start: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def token(self, owner: str, role: str = "member") -> str:
        """A new token, made with the CLI as an admin would (`admin token create`)."""
        r = self.cli("admin", "token", "create", "--owner", owner, "--role", role, "--json")
        assert r.code == 0, r.err
        import json

        token = str(json.loads(r.out)["token"])
        self.tokens[token] = f"{owner}/{role}"
        return token

    def client(self, token: str, home: Path) -> CLI:
        """A user's CLI: the server's URL and a token, no database URL, no bucket keys."""
        return CLI(home=home, env={"LORAJOBS_API_URL": self.url, "LORAJOBS_TOKEN": token})

    def http(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


def start_api_server(home: Path, env: dict[str, str] | None = None) -> ApiServer:
    server = ApiServer(
        CLI(home=home, env=dict(env or {})), _free_port(), home.parent / "server.log"
    )
    home.mkdir(parents=True, exist_ok=True)
    assert server.cli("db", "upgrade").code == 0
    server.start()
    return server


@pytest.fixture
def api_server(tmp_path: Path) -> Iterator[ApiServer]:
    """A server on the embedded defaults (SQLite, a folder bucket) in its own home."""
    server = start_api_server(tmp_path / "server-home")
    try:
        yield server
    finally:
        server.stop()
