"""`lorajobs usage`: each owner's decayed GPU-hours, share and factor, from the deployment's
settings (LORAJOBS_FAIRSHARE_SHARES, LORAJOBS_FAIRSHARE_HALFLIFE); a bad setting is one line,
exit code 2."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from tests.e2e.cli import CLI


def test_usage_shows_decayed_gpu_hours_shares_and_factors(tmp_path: Path) -> None:
    from lorajobs.orchestrator import fairshare
    from lorajobs.orchestrator.db import ensure_schema, make_engine
    from lorajobs.orchestrator.settings import Settings

    cli = CLI(tmp_path / "home", {"LORAJOBS_FAIRSHARE_SHARES": "acme=3,beta=1"})
    empty = cli("usage")
    assert empty.code == 0 and "(no usage yet)" in empty.out, empty.err
    engine = make_engine(Settings.from_env({"LORAJOBS_HOME": str(tmp_path / "home")}))
    ensure_schema(engine)
    now = datetime.now(timezone.utc)
    for owner, hours in (("acme", 6.0), ("beta", 1.0)):
        fairshare.account(engine, owner=owner, gpus=1, seconds=hours * 3600, now=now,
                          halflife_s=7 * 86400)  # fmt: skip
    rows = {r["owner"]: r for r in cli("usage", "--json").json()["owners"]}
    assert rows["acme"]["share"] == 3.0 and abs(rows["acme"]["factor"] - 2.0) < 0.01
    assert rows["beta"]["share"] == 1.0 and abs(rows["beta"]["gpu_hours"] - 1.0) < 0.01
    table = cli("usage")
    assert table.code == 0 and "half-life 7d" in table.out
    assert any(line.split()[:1] == ["acme"] for line in table.out.splitlines())
    bad = CLI(tmp_path / "home", {"LORAJOBS_FAIRSHARE_SHARES": "acme=lots"})("usage")
    assert bad.code == 2 and "LORAJOBS_FAIRSHARE_SHARES" in bad.err
    assert len(bad.err.strip().splitlines()) == 1, bad.err


def test_usage_over_http_admins_see_every_owner_members_their_own(tmp_path: Path) -> None:
    from lorajobs.orchestrator import fairshare
    from lorajobs.orchestrator.db import make_engine
    from lorajobs.orchestrator.settings import Settings
    from tests.plugins.service import start_api_server

    home = tmp_path / "server-home"
    server = start_api_server(home, {"LORAJOBS_FAIRSHARE_SHARES": "acme=3,beta=1"})
    try:
        engine = make_engine(Settings.from_env({"LORAJOBS_HOME": str(home)}))
        now = datetime.now(timezone.utc)
        for owner in ("acme", "beta"):
            fairshare.account(engine, owner=owner, gpus=1, seconds=3600, now=now,
                              halflife_s=7 * 86400)  # fmt: skip
        admin, member = server.token("ops", "admin"), server.token("beta")
        with server.http(admin) as http:
            all_rows = http.get("/v1/usage").json()["owners"]
        assert {r["owner"] for r in all_rows} == {"acme", "beta"}
        with server.http(member) as http:
            own = http.get("/v1/usage").json()["owners"]
        assert [r["owner"] for r in own] == ["beta"] and own[0]["share"] == 1.0
        with server.http() as http:
            assert http.get("/v1/usage").status_code == 401
        # The CLI in client mode asks the server.
        out = server.client(member, tmp_path / "user").__call__("usage", "--json")
        assert out.code == 0 and [r["owner"] for r in out.json()["owners"]] == ["beta"]
    finally:
        server.stop()
