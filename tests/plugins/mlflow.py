"""A real `mlflow server` on 127.0.0.1 for the tests (from `.venv-mlflow`, which `make test`
builds apart from the project's pinned environment), stopped by its process group."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.plugins.postgres import _free_port

ROOT = Path(__file__).resolve().parents[2]


def mlflow_binary() -> Path | None:
    given = os.environ.get("LORAJOBS_MLFLOW_BIN", "").strip()
    path = Path(given) if given else ROOT / ".venv-mlflow" / "bin" / "mlflow"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = mlflow_binary()
    if binary is None:  # a test that needs the real server fails without it: never a skip
        pytest.fail(
            "mlflow not installed: make test builds .venv-mlflow (or set LORAJOBS_MLFLOW_BIN)"
        )
    tmp = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 - closed below
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    proc = subprocess.Popen(
        [
            str(binary),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp / 'mlflow.db'}",
            "--artifacts-destination",
            str(tmp / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server did not start: {(tmp / 'server.log').read_text()[-2000:]}"
                )
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
