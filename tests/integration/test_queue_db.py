"""Settings, the engine factory and schema migrations, on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from lorajobs.jobspecs.failures import InvalidInput, LoraJobsError
from lorajobs.orchestrator.db import (
    METADATA,
    UPGRADE_HINT,
    current_revision,
    ensure_schema,
    head_revision,
    make_engine,
    normalize_url,
    upgrade,
)
from lorajobs.orchestrator.settings import Settings, redact_url

ROOT = Path(__file__).resolve().parents[2]


# ---- settings -----------------------------------------------------------------------------


def test_settings_defaults_live_under_home(tmp_path: Path) -> None:
    s = Settings.from_env({"LORAJOBS_HOME": str(tmp_path / "h")})
    home = tmp_path / "h"
    assert s.home == home
    assert s.database_url == f"sqlite:///{home}/lorajobs.db"
    assert s.bucket == f"file://{home}/bucket"
    assert s.cache_dir == home / "cache"
    assert s.ray_address is None


def test_settings_default_home_is_in_the_user_folder() -> None:
    assert Settings.from_env({}).home == Path("~/.lorajobs").expanduser()
    assert Settings.from_env({"LORAJOBS_HOME": ""}).home == Path("~/.lorajobs").expanduser()


def test_settings_from_variables(tmp_path: Path) -> None:
    s = Settings.from_env(
        {
            "LORAJOBS_HOME": str(tmp_path),
            "LORAJOBS_DATABASE_URL": "postgresql://u:hunter2@db:5432/lj",
            "LORAJOBS_RAY_ADDRESS": "ray://head:10001",
            "LORAJOBS_BUCKET": "s3://bucket/prefix",
            "LORAJOBS_CACHE_DIR": str(tmp_path / "c"),
        }
    )
    assert s.database_url == "postgresql://u:hunter2@db:5432/lj"
    assert (s.ray_address, s.bucket, s.cache_dir) == (
        "ray://head:10001",
        "s3://bucket/prefix",
        tmp_path / "c",
    )
    assert s.redacted_database_url() == "postgresql://u:***@db:5432/lj"
    assert "hunter2" not in repr(s) and "hunter2" not in str(s)
    with pytest.raises(AttributeError):
        s.bucket = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    "url,shown",
    [
        ("sqlite:////tmp/a b/x.db", "sqlite:////tmp/a b/x.db"),
        ("postgresql+psycopg://u:p%40ss@h:5432/d", "postgresql+psycopg://u:***@h:5432/d"),
        ("postgres://u:pa/ss@h/d?sslmode=require", "postgres://u:***@h/d?sslmode=require"),
        ("postgresql://u:pa?ss@h/d", "postgresql://u:***@h/d"),
        ("postgresql://u@h/d", "postgresql://u@h/d"),
        ("postgresql://h/d?user=u&password=secret", "postgresql://h/d?user=u&password=***"),
    ],
)
def test_redaction_hides_every_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


# ---- engine -------------------------------------------------------------------------------


def test_postgres_urls_use_psycopg() -> None:
    assert normalize_url("postgres://u@h/d") == "postgresql+psycopg://u@h/d"
    assert normalize_url("postgresql://u@h/d") == "postgresql+psycopg://u@h/d"
    assert normalize_url("postgresql+psycopg://u@h/d") == "postgresql+psycopg://u@h/d"
    assert make_engine("postgres://u:pw@127.0.0.1:1/d").dialect.driver == "psycopg"


def test_unsupported_urls_are_bad_input() -> None:
    with pytest.raises(InvalidInput, match="unsupported database 'mysql://u:\\*\\*\\*@h/d'"):
        make_engine("mysql://u:secret@h/d")
    with pytest.raises(InvalidInput, match="not a database URL"):
        make_engine("::::")


def test_unreachable_postgres_is_one_line_without_the_password() -> None:
    engine = make_engine("postgresql://lj:s3cret@127.0.0.1:1/lj?connect_timeout=2")
    with pytest.raises(LoraJobsError) as info:
        ensure_schema(engine)
    msg = str(info.value)
    assert msg.startswith("cannot use database postgresql+psycopg://lj:***@127.0.0.1:1/lj")
    assert "s3cret" not in msg and "\n" not in msg


def test_sqlite_engine_creates_its_folder_and_uses_wal(tmp_path: Path) -> None:
    engine = make_engine(Settings.from_env({"LORAJOBS_HOME": str(tmp_path / "new" / "home")}))
    ensure_schema(engine)
    assert (tmp_path / "new" / "home" / "lorajobs.db").exists()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


# ---- schema -------------------------------------------------------------------------------


def test_migrations_build_exactly_the_models(any_db_url: str) -> None:
    engine = make_engine(any_db_url)
    assert current_revision(engine) is None
    ensure_schema(engine, auto=True)
    assert current_revision(engine) == head_revision()
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, METADATA) == []
    names = inspect(engine).get_table_names()
    assert {"jobs", "job_events", "alembic_version"} <= set(names)
    indexes = {i["name"] for i in inspect(engine).get_indexes("jobs")}
    assert {"ix_jobs_status_priority_created_at", "ix_jobs_owner_status"} <= indexes
    ensure_schema(engine)  # at head: nothing to do, no error, also without auto
    upgrade(engine)  # and upgrading again is a no-op
    engine.dispose()


def test_sqlite_is_upgraded_silently(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/x.db")
    ensure_schema(engine)  # auto defaults to False: SQLite upgrades anyway
    assert current_revision(engine) == head_revision()
    engine.dispose()


@pytest.mark.slow
def test_postgres_is_not_migrated_behind_the_operators_back(pg_db_url: str) -> None:
    engine = make_engine(pg_db_url)
    with pytest.raises(LoraJobsError) as info:
        ensure_schema(engine)
    assert (
        str(info.value)
        == UPGRADE_HINT
        == ("database schema is not up to date: run 'lorajobs db upgrade'")
    )
    assert current_revision(engine) is None
    upgrade(engine)  # what `lorajobs db upgrade` does
    ensure_schema(engine)
    engine.dispose()


@pytest.mark.slow
def test_a_newer_schema_is_reported(pg_db_url: str) -> None:
    engine = make_engine(pg_db_url)
    upgrade(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999_future'")
    with pytest.raises(LoraJobsError, match="9999_future is newer than this lorajobs"):
        ensure_schema(engine, auto=True)
    with pytest.raises(LoraJobsError, match="cannot upgrade the database schema: .*9999_future"):
        upgrade(engine)
    engine.dispose()


def test_concurrent_upgrades_do_not_collide(any_db_url: str) -> None:
    engines = [make_engine(any_db_url) for _ in range(4)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(engines))

    def go(engine: object) -> None:
        try:
            barrier.wait(timeout=30)
            ensure_schema(engine, auto=True)  # type: ignore[arg-type]
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=go, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert current_revision(engines[0]) == head_revision()
    for e in engines:
        e.dispose()


def test_migrations_are_found_from_any_working_directory(tmp_path: Path) -> None:
    code = (
        "from lorajobs.orchestrator.db import make_engine, ensure_schema, current_revision;"
        f"e = make_engine('sqlite:///{tmp_path}/w.db'); ensure_schema(e);"
        "print(current_revision(e))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == head_revision()


def test_control_plane_modules_do_not_import_torch() -> None:
    code = (
        "import sys, lorajobs.orchestrator.settings, lorajobs.orchestrator.states, lorajobs.orchestrator.db, "
        "lorajobs.orchestrator.records, lorajobs.orchestrator.queue;"
        "bad = [m for m in ('torch', 'diffusers', 'transformers', 'ray') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_the_schema_head_constant_is_alembics_head() -> None:
    """`SCHEMA_HEAD` lets commands skip loading Alembic; it must name the newest migration."""
    from alembic.script import ScriptDirectory

    from lorajobs.orchestrator.db import SCHEMA_HEAD, _alembic_config

    assert ScriptDirectory.from_config(_alembic_config()).get_current_head() == SCHEMA_HEAD
