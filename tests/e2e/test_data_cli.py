"""The data commands through the CLI as a subprocess, against a real SeaweedFS S3 server with
access keys enforced: `data push`, staging at `submit`, `adapters`, `fetch JOB|NAME`, and a
full run after which no file, log or output holds the secret key."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.cli import CLI, write_spec

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    # Short (Ray's socket paths) and known, so the test can read every log Ray wrote.
    d = Path(tempfile.mkdtemp(prefix="ljray-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def cli(tmp_path: Path, s3_env: Any, ray_tmp: Path) -> CLI:
    return CLI(
        home=tmp_path / "home",
        env={
            **s3_env.server.env(),
            "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
            "LORAJOBS_BUCKET": f"{s3_env.uri}/lj",
            "RAY_TMPDIR": str(ray_tmp),
        },
    )


def _folder(d: Path, n: int = 5) -> Path:
    d.mkdir(parents=True)
    for i in range(n):
        (d / f"img-{i}.png").write_bytes(bytes([i]) * (1000 + i))
        (d / f"img-{i}.txt").write_text(f"caption {i}")
    return d


def test_data_push_stages_once_and_prints_the_uri(cli: CLI, tmp_path: Path, s3_env: Any) -> None:
    data = _folder(tmp_path / "shapes")
    first = cli("data", "push", str(data), "--json")
    assert first.code == 0, first.err
    info = first.json()
    assert info["uri"] == f"{s3_env.uri}/lj/datasets/{info['digest']}"
    assert (info["files"], info["uploaded_files"], info["already_staged"]) == (10, 10, False)
    again = cli("data", "push", str(data))
    assert again.code == 0 and again.out.strip() == info["uri"]
    assert "already staged" in again.err
    model = cli("data", "push", str(data), "--kind", "model")
    assert model.code == 0 and f"/lj/models/{info['digest']}" in model.out
    bad = cli("data", "push", str(data), "--kind", "checkpoint")
    assert bad.code == 2 and "--kind must be one of" in bad.err


def test_wrong_credentials_and_missing_bucket_give_one_line_each(
    cli: CLI, tmp_path: Path, s3_env: Any
) -> None:
    data = _folder(tmp_path / "d", n=1)
    cli.env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret-key-0123456789"
    for args in (("data", "push", str(data)), ("adapters",)):
        r = cli(*args)
        assert r.code == 2, r.err
        (line,) = r.err.strip().splitlines()
        assert line.startswith("error: ") and "access denied" in line
        assert "not-the-secret" not in r.err + r.out
    cli.env["AWS_SECRET_ACCESS_KEY"] = s3_env.server.secret_key
    cli.env["LORAJOBS_BUCKET"] = "s3://no-such-bucket-lj/x"
    for args in (("data", "push", str(data)), ("adapters",), ("fetch", "some-name")):
        r = cli(*args)
        assert r.code == 1, r.err
        (line,) = r.err.strip().splitlines()
        assert line == "error: s3://no-such-bucket-lj: no such bucket"


def test_submit_with_local_data_and_wrong_credentials_inserts_nothing(
    cli: CLI, tmp_path: Path
) -> None:
    data = _folder(tmp_path / "shapes", n=2)
    spec = write_spec(tmp_path / "s.yaml", "image", "styled", "org/some-model", str(data))
    cli.env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret-key-0123456789"
    r = cli("submit", str(spec), "--wait")
    assert r.code == 2 and r.out == ""
    (line,) = r.err.strip().splitlines()  # staging stopped it: one line, before any row
    assert "access denied" in line and "not-the-secret" not in r.err
    del cli.env["AWS_SECRET_ACCESS_KEY"]
    assert cli("status", "--json").json() == []


def test_fetch_never_writes_outside_its_folder(cli: CLI, tmp_path: Path, s3_env: Any) -> None:
    client = s3_env.server.client()
    sha = hashlib.sha256(b"pwn").hexdigest()
    client.put_object(Bucket=s3_env.bucket, Key="lj/adapters/evil/j1/x", Body=b"pwn")
    marker = {"files": {"../../etc/x": {"sha256": sha, "size": 3}}}
    client.put_object(
        Bucket=s3_env.bucket,
        Key="lj/adapters/evil/j1/lorajobs.json",
        Body=json.dumps(marker).encode(),
    )
    out = tmp_path / "a" / "b" / "out"
    r = cli("fetch", "evil", "-o", str(out))
    assert r.code == 1 and "unsafe file path '../../etc/x'" in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "a" / "etc").exists() and not (tmp_path / "etc").exists()
    assert not out.exists() or list(out.iterdir()) == []


def test_a_job_named_to_climb_out_is_refused_and_inserts_nothing(cli: CLI, tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "s.yaml", "text", "../../x", "file:///m", "file:///d.jsonl")
    r = cli("submit", str(spec))
    assert r.code == 2 and "name" in r.err
    assert cli("status", "--json").json() == []


def test_full_run_stages_once_pulls_once_and_leaks_no_secret(
    cli: CLI,
    tmp_path: Path,
    s3_env: Any,
    ray_tmp: Path,
    tiny_text_model: Path,
    tiny_text_dataset: Path,
) -> None:
    secret = s3_env.server.secret_key
    specs = [
        write_spec(
            tmp_path / f"{i}.yaml",
            "text",
            "acme-bot",
            str(tiny_text_model),
            str(tiny_text_dataset),
            training={"steps": 4, "seed": i},
        )
        for i in (1, 2)
    ]
    outputs: list[str] = []

    def run(*args: str) -> Any:
        r = cli(*args)
        outputs.extend([r.out, r.err])
        return r

    r = run("submit", *map(str, specs), "--wait", "--json")
    assert r.code == 0, r.err[-3000:]
    jobs = r.json()
    assert [j["state"] for j in jobs] == ["succeeded", "succeeded"]
    # Staged once at submit (both specs name the same folders), and the jobs name the bucket.
    assert r.err.count("staged dataset") == 1 and r.err.count("staged model") == 1
    bucket = f"{s3_env.uri}/lj"
    shown = run("show", jobs[0]["id"], "--json").json()
    assert shown["spec"]["dataset"].startswith(f"{bucket}/datasets/")
    assert shown["spec"]["dataset"].endswith("/train.jsonl")
    assert shown["spec"]["base_model"].startswith(f"{bucket}/models/")
    # Pushing the same data again sends nothing: it is the same content, the same URI.
    push = run("data", "push", str(tiny_text_dataset))
    assert push.out.strip() == shown["spec"]["dataset"] and "already staged" in push.err
    # Two jobs on this node, one download: one cache entry per input, keyed by content.
    cache = tmp_path / "home" / "cache"
    for kind in ("datasets", "models"):
        entries = [p.name for p in (cache / kind).iterdir() if not p.name.startswith(".")]
        assert len(entries) == 1 and entries[0].startswith("sha256-"), entries

    listed = run("adapters", "--name", "acme-bot", "--json").json()
    assert sorted(a["job_id"] for a in listed) == sorted(j["id"] for j in jobs)
    assert all(a["size"] > 0 and a["base_model"] == shown["spec"]["base_model"] for a in listed)
    table = run("adapters")
    assert table.code == 0 and "acme-bot" in table.out
    ambiguous = run("fetch", "acme-bot")
    assert ambiguous.code == 2 and "--latest" in ambiguous.err
    dest = tmp_path / "fetched"
    got = run("fetch", "acme-bot", "--latest", "-o", str(dest))
    assert got.code == 0, got.err
    assert Path(got.out.strip()) == (dest / f"acme-bot-{listed[0]['job_id']}").resolve()
    dest = Path(got.out.strip())
    sidecar = json.loads((dest / "lorajobs.json").read_text())
    assert sidecar["job_id"] == listed[0]["job_id"]
    for rel, meta in sidecar["files"].items():
        assert hashlib.sha256((dest / rel).read_bytes()).hexdigest() == meta["sha256"]
    by_id = run("fetch", jobs[0]["id"], "-o", str(tmp_path / "by-id"))
    assert by_id.code == 0 and (Path(by_id.out.strip()) / "lorajobs.json").is_file()

    # The secret key is nowhere: database, cache, staging records, sidecars, Ray's logs (the
    # controller's and the workers'), every object in the bucket, every CLI output.
    leaks = []
    for root in (tmp_path / "home", ray_tmp, dest, tmp_path / "by-id"):
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink() and secret.encode() in p.read_bytes():
                leaks.append(str(p))
    assert (tmp_path / "home" / "lorajobs.db").is_file()
    assert list(ray_tmp.rglob("*.log")) or list(ray_tmp.rglob("*.err")), "no Ray logs to check"
    client = s3_env.server.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3_env.bucket):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=s3_env.bucket, Key=obj["Key"])["Body"].read()
            if secret.encode() in body:
                leaks.append(f"s3://{s3_env.bucket}/{obj['Key']}")
    leaks += [f"CLI output {i}" for i, text in enumerate(outputs) if secret in text]
    assert leaks == []
