"""Boundaries: hostile specs through the API are refused with the field named and nothing is
queued; the worker checks again before it reads or writes; a folder bucket never follows a
symlink out of itself; unknown schemes are refused in every mode."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from lorajobs.jobspecs import parse_spec
from lorajobs.jobspecs.failures import InvalidInput, SpecError
from lorajobs.orchestrator.attempt import run as run_attempt
from lorajobs.storage.boundaries import Boundary
from lorajobs.storage.files import FileStorage
from tests.plugins.service import ApiServer

pytestmark = pytest.mark.slow


def _base(bucket: str) -> dict[str, Any]:
    root = f"{bucket}/owners/acme"
    return {
        "kind": "text",
        "name": "hostile",
        "base_model": f"{root}/models/m",
        "dataset": f"{root}/datasets/d",
        "training": {"steps": 2},
    }


HOSTILE = [
    ("dataset", {"dataset": "file:///var/cache/lorajobs/datasets"}, "not local-only"),
    ("dataset", {"dataset": "/etc"}, "not local-only"),
    ("dataset", {"dataset": "{bucket}/owners/globex/datasets/d"}, "outside your prefix"),
    ("dataset", {"dataset": "{bucket}/owners/acme/../globex/d"}, "climbs out"),
    ("dataset", {"dataset": "ftp://example.invalid/data"}, "unsupported scheme 'ftp://'"),
    ("output", {"output": "file:///etc/cron.d"}, "not local-only"),
    ("output", {"output": "{bucket}/owners/globex"}, "outside your prefix"),
    ("base_model", {"base_model": "stabilityai/sd-turbo"}, "does not download from the hub"),
    ("owner", {"owner": "globex"}, "not yours"),
]


@pytest.mark.parametrize("field,change,why", HOSTILE, ids=[f"{h[0]}-{h[2]}" for h in HOSTILE])
def test_hostile_specs_are_refused_and_nothing_is_queued(
    api_server: ApiServer, tmp_path: Path, field: str, change: dict[str, str], why: str
) -> None:
    bucket = f"file://{(api_server.cli.home / 'bucket').as_posix()}"
    spec = {**_base(bucket), **{k: v.format(bucket=bucket) for k, v in change.items()}}
    token = api_server.token("acme")
    with api_server.http(token) as c:
        for verb in ("/v1/validate", "/v1/jobs"):
            r = c.post(verb, json={"spec": spec})
            assert r.status_code == 422, r.text
            assert any(p.startswith(f"{field}:") and why in p for p in r.json()["problems"]), r.text
        assert c.get("/v1/jobs").json()["jobs"] == []
    assert api_server.cli("status", "--json").json() == []  # nothing reached the queue


def test_the_cli_client_shows_a_refusal_in_one_line(api_server: ApiServer, tmp_path: Path) -> None:
    import yaml

    bucket = f"file://{(api_server.cli.home / 'bucket').as_posix()}"
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**_base(bucket), "output": "file:///etc/cron.d"}))
    user = api_server.client(api_server.token("acme"), tmp_path / "user")
    r = user("submit", str(path))
    assert r.code == 2 and "output:" in r.err and "not local-only" in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1, r.err
    assert user("status", "--json").json() == []


def test_the_worker_checks_the_boundary_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row that never went through the server (or was changed behind it) still cannot make
    a worker read another tenant's bytes: the attempt fails as a user error, writing nothing."""
    bucket = f"file://{(tmp_path / 'bucket').as_posix()}"
    monkeypatch.setenv("LORAJOBS_TENANCY", "shared")
    monkeypatch.setenv("LORAJOBS_BUCKET", bucket)
    spec = {
        **_base(bucket),
        "owner": "acme",
        "dataset": f"{bucket}/owners/globex/datasets/secret",
    }
    sent: list[dict[str, Any]] = []
    out = run_attempt(
        spec, "0123456789ab", 1, f"{bucket}/owners/acme", send=sent.append, ray_node_id="n" * 16
    )
    assert out["ok"] is False and out["kind"] == "user"
    assert "dataset:" in out["error"] and "outside your prefix" in out["error"]
    assert not (tmp_path / "bucket").exists() and sent == []  # not even a log was written


def test_boundary_rules() -> None:
    b = Boundary(bucket="s3://lj", allowed=("s3://shared/models",), hub=True)
    ok = {"base_model": "s3://shared/models/sd15", "dataset": "s3://lj/owners/acme/datasets/x"}
    assert b.problems("acme", ok, "s3://lj/owners/acme") == []
    assert b.problems("acme", {"base_model": "org/name@" + "a" * 40}, "s3://lj/owners/acme") == []
    bad = b.problems(
        "acme",
        {"base_model": "org/name", "dataset": "s3://lj/owners/acme2/x"},
        "s3://lj/owners/acme",
    )
    assert len(bad) == 2 and "not pinned" in bad[0] and "outside your prefix" in bad[1]
    # The allow-list is for reading: outputs stay in the owner's own prefix.
    assert b.problems("acme", {"output": "s3://shared/models"}, "s3://shared/models")


def test_unknown_schemes_are_refused_in_every_mode(tmp_path: Path) -> None:
    for field, value in (
        ("dataset", "ftp://x/y"),
        ("output", "http://x/y"),
        ("base_model", "gs://b/m"),
    ):
        spec = {**_base("s3://lj"), field: value}
        with pytest.raises(SpecError, match=f"{field}: unsupported scheme"):
            parse_spec(spec)


def test_a_folder_bucket_never_follows_a_symlink_out(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("another tenant's")
    root = tmp_path / "bucket"
    (root / "owners" / "acme").mkdir(parents=True)
    os.symlink(outside / "secret.txt", root / "owners" / "acme" / "link.txt")
    os.symlink(outside, root / "owners" / "acme" / "dir")
    storage = FileStorage(root)
    with pytest.raises(InvalidInput, match="symlink leads outside"):
        storage.get_bytes("owners/acme/link.txt")
    with pytest.raises(InvalidInput, match="symlink leads outside"):
        storage.get_bytes("owners/acme/dir/secret.txt")
    assert [o.key for o in storage.list("owners")] == []
