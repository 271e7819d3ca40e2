"""A real PostgreSQL server for the tests, started once per session on 127.0.0.1.

Fixtures:
- `pg_server` (session): the running server (`PgServer`): admin URL, `create_database()`.
- `pg_url` (session): a `postgresql+psycopg://` URL of one database made for the session.
- `pg_db_url` (function; alias `pg_database`): a fresh, empty database per test, dropped
  afterwards, so tests never see each other's rows.
- `any_db_url` (function, parametrised): an empty SQLite file, then an empty PostgreSQL database
  (that case marked slow), for tests that must hold on both backends.

The server comes from the PostgreSQL server binaries (`initdb`, `pg_ctl`; Debian puts them in
/usr/lib/postgresql/<version>/bin). Missing binaries fail the tests with the command that
installs them (`infra/local/ensure-postgres.sh`); they are not skipped. PostgreSQL refuses to
run as root, so under root the server runs as the `postgres` user via `runuser`. With
`LORAJOBS_TEST_PG_URL` set to a superuser URL of a server started elsewhere, that server is used
instead and nothing is started.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found: run "
    "`bash infra/local/ensure-postgres.sh` (apt-get install -y postgresql) "
    "or set LORAJOBS_PG_BIN to their folder"
)


def find_pg_bin() -> Path | None:
    """Folder holding initdb and pg_ctl: $LORAJOBS_PG_BIN, Debian's newest, or PATH."""
    explicit = os.environ.get("LORAJOBS_PG_BIN")
    if explicit:
        return Path(explicit) if (Path(explicit) / "initdb").exists() else None
    debian = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    if debian:
        return Path(debian[-1]).parent
    for name in ("initdb", "pg_ctl"):
        found = shutil.which(name)
        if found:
            # /usr/local/bin/pg_ctl may be a symlink into the real folder with its siblings.
            real = Path(found).resolve().parent
            if (real / "initdb").exists() and (real / "pg_ctl").exists():
                return real
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    """A PostgreSQL server the tests may create and drop databases on."""

    host: str
    port: int
    user: str
    password: str
    data_dir: Path | None = None  # None: started elsewhere, not ours to stop
    pid: int | None = None
    _created: list[str] = field(default_factory=list)

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://{self.user}:{self.password}@{self.host}:{self.port}/{dbname}"

    def _admin(self):  # type: ignore[no-untyped-def]
        import psycopg

        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname="postgres",
            autocommit=True,
            connect_timeout=10,
        )

    def create_database(self, prefix: str = "lj") -> str:
        """Create an empty database with a fresh name; returns its URL."""
        name = f"{prefix}_{secrets.token_hex(4)}"
        with self._admin() as conn:
            # template0: nothing a previous test left in template1 can leak in.
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        self._created.append(name)
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with self._admin() as conn:
            # FORCE: a test that forgot to dispose an engine must not break the next one.
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self._created:
            self._created.remove(name)


def _as_postgres_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("running as root needs a `postgres` user to run the server: " + INSTALL_HINT)
    return ["runuser", "-u", "postgres", "--", *cmd]


def start_server(bin_dir: Path) -> PgServer:
    """initdb into a new temp folder and start a server on a free loopback port."""
    # Directly under /tmp (not pytest's 0700 tmp tree): the postgres user must reach it.
    root = Path(tempfile.mkdtemp(prefix="lorajobs-pg-"))
    data, log, pwfile = root / "data", root / "server.log", root / "pw"
    password = secrets.token_hex(12)
    pwfile.write_text(password + "\n")
    if os.geteuid() == 0:
        pg = pwd.getpwnam("postgres")
        os.chown(root, pg.pw_uid, pg.pw_gid)
        os.chown(pwfile, pg.pw_uid, pg.pw_gid)
    os.chmod(root, 0o700)
    os.chmod(pwfile, 0o600)

    def run(cmd: list[str], what: str) -> None:
        proc = subprocess.run(
            _as_postgres_user(cmd), capture_output=True, text=True, timeout=120, cwd=root
        )
        if proc.returncode != 0:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            shutil.rmtree(root, ignore_errors=True)
            pytest.fail(f"PostgreSQL {what} failed:\n{proc.stdout}\n{proc.stderr}\n{tail}")

    run(
        [
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            f"--pwfile={pwfile}",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ],
        "initdb",
    )
    last_error = ""
    for _ in range(3):  # a free port can be taken between probing and binding: try another
        port = _free_port()
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        proc = subprocess.run(
            _as_postgres_user(
                [
                    str(bin_dir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-l",
                    str(log),
                    "-w",
                    "-t",
                    "60",
                    "-o",
                    opts,
                    "start",
                ]
            ),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=root,
        )
        if proc.returncode == 0:
            pid = int((data / "postmaster.pid").read_text().splitlines()[0])
            return PgServer("127.0.0.1", port, "postgres", password, data_dir=data, pid=pid)
        log_tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        last_error = proc.stdout + proc.stderr + log_tail
    shutil.rmtree(root, ignore_errors=True)
    pytest.fail(f"PostgreSQL did not start:\n{last_error}")


def stop_server(server: PgServer, bin_dir: Path) -> None:
    """Stop the server we started (fast shutdown of its data dir), then remove its files."""
    assert server.data_dir is not None and server.pid is not None
    proc = subprocess.run(
        _as_postgres_user(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(server.data_dir),
                "-m",
                "fast",
                "-w",
                "-t",
                "30",
                "stop",
            ]
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:
        # pg_ctl could not do it: end the postmaster we started, by its PID.
        try:
            os.kill(server.pid, 3)  # SIGQUIT: immediate shutdown
            for _ in range(100):
                os.kill(server.pid, 0)
                time.sleep(0.1)
        except ProcessLookupError:
            pass
    shutil.rmtree(server.data_dir.parent, ignore_errors=True)


def _external_server(url: str) -> PgServer:
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return PgServer(
        u.host or "127.0.0.1", u.port or 5432, u.username or "postgres", u.password or ""
    )


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's PostgreSQL server (started here unless LORAJOBS_TEST_PG_URL is set)."""
    external = os.environ.get("LORAJOBS_TEST_PG_URL")
    if external:
        yield _external_server(external)
        return
    bin_dir = find_pg_bin()
    if bin_dir is None:
        pytest.fail(INSTALL_HINT)
    server = start_server(bin_dir)
    try:
        yield server
    finally:
        stop_server(server, bin_dir)


@pytest.fixture(scope="session")
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """URL of one database made for this test session."""
    url = pg_server.create_database("lorajobs_session")
    yield url
    pg_server.drop_database(url)


@pytest.fixture
def pg_db_url(pg_server: PgServer) -> Iterator[str]:
    """URL of a new empty database for this test alone (no schema: call ensure_schema)."""
    url = pg_server.create_database("lorajobs_test")
    yield url
    pg_server.drop_database(url)


@pytest.fixture
def pg_database(pg_db_url: str) -> str:
    """Same as `pg_db_url` (a fresh empty database per test), under the name e2e tests use."""
    return pg_db_url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def any_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database, once as a SQLite file and once on PostgreSQL (marked slow)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'lorajobs.db'}"
    return str(request.getfixturevalue("pg_db_url"))


@pytest.fixture
def any_db_engine(any_db_url: str) -> Iterator[Any]:
    """An engine on `any_db_url` with the schema at head, disposed after the test."""
    from lorajobs.orchestrator.db import ensure_schema, make_engine

    engine = make_engine(any_db_url)
    ensure_schema(engine, auto=True)
    yield engine
    engine.dispose()
