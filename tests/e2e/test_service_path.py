"""The whole path through `lorajobs server` on PostgreSQL and SeaweedFS, with a user whose
environment holds no database URL and no AWS keys: data push (presigned uploads, multipart
included), submit, status, `logs -f`, cancel, fetch (presigned downloads, sha256 checked).
The server and the controller hold the credentials; no token or secret lands in the
database, the events, the logs or the sidecars."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from lorajobs.orchestrator.db import make_engine
from lorajobs.storage.backends import open_storage
from tests.e2e.cli import CLI, write_spec
from tests.plugins.service import start_api_server

pytestmark = pytest.mark.slow


def _deployment_env(s3_env: Any, pg_database: str) -> dict[str, str]:
    return {
        **s3_env.server.env(),
        "LORAJOBS_DATABASE_URL": pg_database,
        "LORAJOBS_BUCKET": f"{s3_env.uri}/lj",
        "LORAJOBS_TENANCY": "shared",
        "LORAJOBS_UPLOAD_PART_MB": "5",
        "LORAJOBS_ALLOW_CPU_FALLBACK": "1",
    }


def test_the_whole_path_through_the_server(
    tmp_path: Path, pg_database: str, s3_env: Any, tiny_text_model: Path, tiny_text_dataset: Path
) -> None:
    env = _deployment_env(s3_env, pg_database)
    server = start_api_server(tmp_path / "server", env)
    controller_cli = CLI(home=tmp_path / "controller", env=env)
    controller = controller_cli.popen("controller", log=tmp_path / "controller.log")
    try:
        token = server.token("acme")
        user = server.client(token, tmp_path / "user")
        assert not any(k.startswith("AWS_") or k == "LORAJOBS_DATABASE_URL" for k in user.environ())
        _walk(user, tmp_path, tiny_text_model, tiny_text_dataset, env)
        _no_secrets(env, pg_database, s3_env, [token, s3_env.server.secret_key])
    finally:
        os.kill(controller.pid, 15)
        controller.wait(timeout=60)
        server.stop()


def _walk(user: CLI, tmp: Path, model: Path, dataset: Path, env: dict[str, str]) -> None:
    # Data push: the dataset (one PUT per file) and a 6 MiB file (a two-part multipart upload).
    pushed = user("data", "push", str(dataset), "--json")
    assert pushed.code == 0, pushed.err
    uri = pushed.json()["uri"]
    assert uri.startswith(f"{env['LORAJOBS_BUCKET']}/owners/acme/datasets/"), uri
    big = tmp / "big"
    big.mkdir()
    (big / "blob.bin").write_bytes(os.urandom(6 * 1024 * 1024))
    multi = user("data", "push", str(big), "--kind", "model")
    assert multi.code == 0, multi.err
    staged = open_storage(multi.out.strip())
    assert [o.size for o in staged.list("")] == [6 * 1024 * 1024]
    again = user("data", "push", str(dataset))
    assert again.code == 0 and "already staged" in again.err and again.out.strip() == uri

    # Submit: the base model is a local folder, pushed first by the client.
    spec = write_spec(
        tmp / "job.yaml",
        "text",
        "svc-text",
        str(model),
        uri,
        training={"steps": 6, "learning_rate": 1e-2},
    )
    r = user("submit", str(spec), "--idempotency-key", "k1")
    assert r.code == 0, r.err
    job = r.out.strip()
    assert user("submit", str(spec), "--idempotency-key", "k1").out.strip() == job

    # A second job to cancel while it waits or runs.
    slow = write_spec(
        tmp / "slow.yaml", "text", "svc-slow", str(model), uri, training={"steps": 100000}
    )
    victim = user("submit", str(slow)).out.strip()
    assert user("cancel", victim).code == 0

    follow = user("logs", job, "-f", timeout=600)
    assert follow.code == 0 and "adapter uploaded to" in follow.out, follow.err[-2000:]
    listed = {j["id"]: j for j in user("status", "--json").json()}
    assert listed[job]["state"] == "succeeded", listed[job]
    assert listed[victim]["state"] == "cancelled"
    shown = user("show", job, "--json").json()
    assert shown["events"][0]["data"]["by"].endswith("(acme, member)")

    r = user("fetch", job, "-o", str(tmp / "out"))
    assert r.code == 0, r.err
    dest = Path(r.out.strip())
    assert dest.name == f"svc-text-{job}" and "sha256 verified" in r.err
    sidecar = json.loads((dest / "lorajobs.json").read_text())
    for rel, meta in sidecar["files"].items():
        assert hashlib.sha256((dest / rel).read_bytes()).hexdigest() == meta["sha256"]
    assert (dest / "adapter_config.json").is_file()
    # Commands that take a job id fetch its adapter through the server too.
    merged = user("merge", job, job, "--weights", "0.5,0.5", "-o", str(tmp / "merged"))
    assert merged.code == 0, merged.err
    assert (tmp / "merged" / "adapter_model.safetensors").is_file()


def _no_secrets(env: dict[str, str], db: str, s3_env: Any, secrets: list[str]) -> None:
    engine = make_engine(db)
    with engine.connect() as conn:
        dump = "\n".join(
            str(tuple(row))
            for table in ("jobs", "job_events", "api_tokens", "scheduler_state")
            for row in conn.execute(text(f"SELECT * FROM {table}"))  # noqa: S608 - fixed names
        )
    bucket = open_storage(env["LORAJOBS_BUCKET"])
    texts = [bucket.get_bytes(o.key) for o in bucket.list("owners/acme/jobs")]
    texts += [
        bucket.get_bytes(o.key) for o in bucket.list("owners/acme/adapters") if o.size < 1 << 20
    ]
    for secret in secrets:
        assert secret not in dump
        assert all(secret.encode() not in t for t in texts)
