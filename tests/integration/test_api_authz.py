"""The authorization matrix of the HTTP API, on a real `lorajobs server` (uvicorn, SQLite, a
folder bucket): every endpoint x role x own/other owner gives the expected status, and another
owner's jobs, logs, adapters and data are never listed, shown, fetched or changed."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from lorajobs.orchestrator.db import make_engine
from lorajobs.orchestrator.queue import Queue
from lorajobs.orchestrator.states import JobStatus
from lorajobs.storage.adapters import upload_adapter
from tests.plugins.service import ApiServer, start_api_server

pytestmark = pytest.mark.slow


def _spec(bucket: str, owner: str, name: str = "a1") -> dict[str, Any]:
    root = f"{bucket}/owners/{owner}"
    return {
        "kind": "text",
        "name": name,
        "base_model": f"{root}/models/m",
        "dataset": f"{root}/datasets/d",
        "training": {"steps": 2},
    }


def _succeed_with_adapter(server: ApiServer, job: dict[str, Any], tmp: Path) -> None:
    """Give a queued job a real adapter in its owner's prefix and mark it succeeded, as a
    worker and controller would (training itself is tested elsewhere)."""
    folder = tmp / f"adapter-{job['id']}"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"weights of " + job["id"].encode())
    data = (folder / "adapter_model.safetensors").read_bytes()
    marker = {
        "files": {
            "adapter_model.safetensors": {
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        }
    }
    (folder / "lorajobs.json").write_text(json.dumps(marker))
    uri = f"{job['output_uri']}/adapters/{job['name']}/{job['id']}"
    upload_adapter(folder, uri)
    log = Path(job["output_uri"].removeprefix("file://")) / "jobs" / job["id"] / "logs"
    log.mkdir(parents=True)
    grids = log.parent / "samples"
    grids.mkdir()
    (grids / "step-000002.png").write_bytes(b"\x89PNG not really")
    (log / "attempt-1.log").write_text("step 1/2  loss 0.5000\nstep 2/2  loss 0.2500\n")
    queue = Queue(make_engine(_db(server)))
    for to in (JobStatus.dispatched, JobStatus.running):
        queue.transition(job["id"], expected=queue.get(job["id"]).status, to=to, reason="test")
    queue.transition(
        job["id"],
        expected=JobStatus.running,
        to=JobStatus.succeeded,
        reason="test",
        result={"adapter_uri": uri},
    )


def _db(server: ApiServer) -> str:
    return f"sqlite:///{server.cli.home / 'lorajobs.db'}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One server for the module (bad tokens are not throttled here: that has its own test)."""
    tmp_path = tmp_path_factory.mktemp("authz")
    s = start_api_server(tmp_path / "home", {"LORAJOBS_BAD_TOKENS_PER_MINUTE": "100000"})
    try:
        yield _populate(s, tmp_path)
    finally:
        s.stop()


def _populate(s: ApiServer, tmp_path: Path) -> dict[str, Any]:
    bucket = f"file://{(s.cli.home / 'bucket').as_posix()}"
    tokens = {
        "admin": s.token("ops", "admin"),
        "member": s.token("acme"),
        "other": s.token("globex"),
        "viewer": s.token("acme", "viewer"),
        "revoked": s.token("acme"),
    }
    assert s.cli("admin", "token", "revoke", tokens["revoked"]).code == 0
    with s.http(tokens["member"]) as c:
        done = c.post("/v1/jobs", json={"spec": _spec(bucket, "acme", "done")}).json()["job"]
    _succeed_with_adapter(s, done, tmp_path)
    with s.http(tokens["other"]) as c:
        theirs = c.post("/v1/jobs", json={"spec": _spec(bucket, "globex", "g1")}).json()["job"]
    return {"server": s, "bucket": bucket, "tokens": tokens, "done": done, "theirs": theirs}


def _fresh(world: dict[str, Any], state: str = "queued") -> str:
    """A new job of acme's, queued (or cancelled, for retry)."""
    with world["server"].http(world["tokens"]["member"]) as c:
        job = c.post("/v1/jobs", json={"spec": _spec(world["bucket"], "acme", "fresh")}).json()
        if state == "cancelled":
            c.post(f"/v1/jobs/{job['job']['id']}/cancel")
    return str(job["job"]["id"])


Call = Callable[[httpx.Client, dict[str, Any]], httpx.Response]

# (name, the call, expected status for: admin, member (own), other owner, viewer (own)).
READS: list[tuple[str, Call, tuple[int, int, int, int]]] = [
    ("show", lambda c, w: c.get(f"/v1/jobs/{w['done']['id']}"), (200, 200, 404, 200)),
    ("events", lambda c, w: c.get(f"/v1/jobs/{w['done']['id']}/events"), (200, 200, 404, 200)),
    ("logs", lambda c, w: c.get(f"/v1/jobs/{w['done']['id']}/logs"), (200, 200, 404, 200)),
    ("metrics", lambda c, w: c.get(f"/v1/jobs/{w['done']['id']}/metrics"), (200, 200, 404, 200)),
    ("adapter", lambda c, w: c.get(f"/v1/jobs/{w['done']['id']}/adapter"), (200, 200, 404, 200)),
    (
        "adapter file",
        lambda c, w: c.get(f"/v1/jobs/{w['done']['id']}/adapter/files/adapter_model.safetensors"),
        (200, 200, 404, 200),
    ),
    ("samples", lambda c, w: c.get(f"/v1/jobs/{w['done']['id']}/samples"), (200, 200, 404, 200)),
    (
        "sample",
        lambda c, w: c.get(f"/v1/jobs/{w['done']['id']}/samples/step-000002.png"),
        (200, 200, 404, 200),
    ),
    ("schema", lambda c, w: c.get("/v1/schema"), (200, 200, 200, 200)),
    ("cluster", lambda c, w: c.get("/v1/cluster"), (200, 200, 200, 200)),
    ("whoami", lambda c, w: c.get("/v1/whoami"), (200, 200, 200, 200)),
    (
        "validate",
        lambda c, w: c.post("/v1/validate", json={"spec": _spec(w["bucket"], "acme")}),
        (422, 200, 422, 200),  # the admin's own jobs are ops's: acme's data is not theirs
    ),
]
WRITES: list[tuple[str, Call, tuple[int, int, int, int]]] = [
    ("cancel", lambda c, w: c.post(f"/v1/jobs/{_fresh(w)}/cancel"), (200, 200, 404, 403)),
    (
        "priority",
        lambda c, w: c.post(f"/v1/jobs/{_fresh(w)}/priority", json={"priority": 5}),
        (200, 200, 404, 403),
    ),
    (
        "retry",
        lambda c, w: c.post(f"/v1/jobs/{_fresh(w, 'cancelled')}/retry"),
        (200, 200, 404, 403),
    ),
    (
        "submit",
        lambda c, w: c.post("/v1/jobs", json={"spec": _spec(w["bucket"], "acme", "sub")}),
        (422, 201, 422, 403),
    ),
    (
        "data stage",
        lambda c, w: c.post(
            "/v1/data/stage",
            json={"kind": "dataset", "files": {"a.txt": {"size": 1, "sha256": "0" * 64}}},
        ),
        (200, 200, 200, 403),
    ),
]


@pytest.mark.parametrize("name,call,expected", READS + WRITES, ids=[r[0] for r in READS + WRITES])
def test_endpoint_by_role(world: dict[str, Any], name: str, call: Call, expected: tuple) -> None:
    roles = ("admin", "member", "other", "viewer")
    got = {}
    for role in roles:
        with world["server"].http(world["tokens"][role]) as c:
            got[role] = call(c, world).status_code
    assert got == dict(zip(roles, expected)), name
    for role in ("revoked", None):  # a revoked token is refused at once, like none at all
        with world["server"].http(world["tokens"][role] if role else None) as c:
            assert call(c, world).status_code == 401, (name, role)


def test_listings_never_show_another_owner(world: dict[str, Any]) -> None:
    t = world["tokens"]
    with world["server"].http(t["other"]) as c:
        mine = c.get("/v1/jobs").json()["jobs"]
        assert {j["owner"] for j in mine} == {"globex"}
        assert c.get("/v1/jobs", params={"owner": "acme"}).json()["jobs"] == []
        assert c.get("/v1/adapters").json() == []
        # A prefix of acme's job id is no job of globex's (and not "ambiguous" either).
        assert c.get(f"/v1/jobs/{world['done']['id'][:6]}").status_code == 404
    with world["server"].http(t["member"]) as c:
        assert world["theirs"]["id"] not in {j["id"] for j in c.get("/v1/jobs").json()["jobs"]}
        assert [a["job_id"] for a in c.get("/v1/adapters").json()] == [world["done"]["id"]]
    with world["server"].http(t["admin"]) as c:
        owners = {j["owner"] for j in c.get("/v1/jobs", params={"limit": 500}).json()["jobs"]}
        assert {"acme", "globex"} <= owners


def test_an_admin_submits_for_a_named_owner(world: dict[str, Any]) -> None:
    spec = {**_spec(world["bucket"], "acme", "for-acme"), "owner": "acme"}
    with world["server"].http(world["tokens"]["admin"]) as c:
        r = c.post("/v1/jobs", json={"spec": spec})
    assert r.status_code == 201 and r.json()["job"]["owner"] == "acme"
    assert r.json()["job"]["output_uri"] == f"{world['bucket']}/owners/acme"


def test_every_change_names_who_made_it(world: dict[str, Any]) -> None:
    job = _fresh(world)
    with world["server"].http(world["tokens"]["admin"]) as c:
        c.post(f"/v1/jobs/{job}/priority", json={"priority": 7})
        c.post(f"/v1/jobs/{job}/cancel")
        events = c.get(f"/v1/jobs/{job}/events").json()
    by = [e["data"]["by"] for e in events]
    assert by[0].endswith("(acme, member)") and by[1].endswith("(ops, admin)") and len(by) == 3


def test_no_token_is_stored_or_logged(world: dict[str, Any]) -> None:
    """Tokens live only as hashes: not in any table, event or log the server wrote."""
    engine = make_engine(_db(world["server"]))
    with engine.connect() as conn:
        dump = "\n".join(
            str(tuple(row))
            for table in ("jobs", "job_events", "api_tokens", "scheduler_state")
            for row in conn.execute(text(f"SELECT * FROM {table}"))  # noqa: S608 - fixed names
        )
    server_log = world["server"].log.read_text()
    for token in world["tokens"].values():
        secret = token.split("_", 2)[2]
        assert secret not in dump and secret not in server_log


def test_bad_tokens_are_slowed_down(api_server: ApiServer) -> None:
    with api_server.http("lj_nope_nope") as c:
        codes = [c.get("/v1/jobs").status_code for _ in range(12)]
    assert codes[:10] == [401] * 10 and codes[-1] == 429
