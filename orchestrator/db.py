"""Database tables, the engine factory and schema migrations (Alembic).

Two backends: SQLite (the embedded default, a file under LORAJOBS_HOME; several processes may
write to it) and PostgreSQL (shared by controllers on different machines). The schema is only
ever created by the Alembic migrations in `orchestrator/migrations`, never by `create_all`, so
the two cannot drift; a test compares them.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Connection,
    DateTime,
    Dialect,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    create_engine,
    event,
    false,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from lorajobs.jobspecs.failures import InvalidInput, LoraJobsError
from lorajobs.orchestrator.settings import Settings, redact_url
from lorajobs.orchestrator.states import JobStatus

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")
UPGRADE_HINT = "database schema is not up to date: run 'lorajobs db upgrade'"

# Execution option read by the SQLite "begin" hook below: "IMMEDIATE" for transactions that
# will write. See `make_engine`.
SQLITE_BEGIN = "lorajobs_sqlite_begin"

# Arbitrary constant: key of the PostgreSQL advisory lock that serialises schema upgrades.
_MIGRATION_LOCK_KEY = 0x6C6F72616A6F62  # "lorajob"


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (the only kind stored)."""
    return datetime.now(timezone.utc)


def new_job_id() -> str:
    """A fresh job id: 12 lowercase hex characters (48 random bits)."""
    return secrets.token_hex(6)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that goes in as aware UTC and always comes back aware UTC.

    SQLite has no time zones: values are stored as naive UTC text (which also sorts correctly)
    and get their tzinfo back on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: lorajobs stores aware UTC datetimes only")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    """Declarative base; constraint names are fixed so migrations can refer to them."""

    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


_STATUS_VALUES = ", ".join(f"'{s.value}'" for s in JobStatus)


class JobRow(Base):
    """One job: its spec, where it stands, and the latest progress report."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(12), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    owner: Mapped[str] = mapped_column(String(64))
    priority: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    spec: Mapped[str] = mapped_column(Text)  # canonical JSON of the validated spec
    output_uri: Mapped[str] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    attempt: Mapped[int] = mapped_column(Integer, server_default="1")
    gpus: Mapped[float] = mapped_column(Float)
    gpu_type: Mapped[str | None] = mapped_column(String(64))
    cpus: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    failure_kind: Mapped[str | None] = mapped_column(String(16))
    failure_reason: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, server_default=false())
    step: Mapped[int | None] = mapped_column(Integer)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    it_per_s: Mapped[float | None] = mapped_column(Float)
    node: Mapped[str | None] = mapped_column(String(255))
    result: Mapped[str | None] = mapped_column(Text)  # JSON of the worker's result dict
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # 0002: scheduling and fault recovery.
    memory_gb: Mapped[float | None] = mapped_column(Float)
    max_runtime_s: Mapped[float | None] = mapped_column(Float)
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime())  # backoff after a failure
    infra_retries: Mapped[int] = mapped_column(Integer, server_default="0")
    user_retries: Mapped[int] = mapped_column(Integer, server_default="0")
    internal_retries: Mapped[int] = mapped_column(Integer, server_default="0")
    node_id: Mapped[str | None] = mapped_column(String(64))  # Ray node of the current attempt
    accelerator: Mapped[str | None] = mapped_column(String(64))  # that node's GPU type
    cost_usd: Mapped[float | None] = mapped_column(Float)  # all attempts so far

    __table_args__ = (
        # The scheduler's query: queued jobs by priority, oldest first.
        Index("ix_jobs_status_priority_created_at", "status", "priority", "created_at"),
        # Per-owner limits and `lorajobs status --owner`.
        Index("ix_jobs_owner_status", "owner", "status"),
        # Covers the scheduling round's candidate query (see Queue._class_heads).
        Index("ix_jobs_scheduling_class", "status", "priority", "owner", "gpus", "gpu_type",
              "cpus", "memory_gb", "created_at", "id", "not_before"),
        Index("ix_jobs_created_at", "created_at"),
        CheckConstraint(f"status IN ({_STATUS_VALUES})", name="status"),
    )


class JobEventRow(Base):
    """One status change of one job: the audit trail `lorajobs show` prints."""

    __tablename__ = "job_events"

    # BIGINT on PostgreSQL; plain INTEGER on SQLite, where only that is an autoincrement rowid.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(
        String(12), ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    from_status: Mapped[str | None] = mapped_column(String(16))  # None for the submit event
    to_status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    data: Mapped[str | None] = mapped_column(Text)  # JSON


class SchedulerStateRow(Base):
    """What the controllers publish for the CLI, one row per name (0003). `waiting`: why queued
    jobs wait, as the last scheduling round found (`lorajobs.orchestrator.waiting`)."""

    __tablename__ = "scheduler_state"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    data: Mapped[str] = mapped_column(Text)  # JSON


def normalize_url(url: str) -> str:
    """Pin PostgreSQL URLs to the psycopg 3 driver (the one lorajobs installs)."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(settings_or_url: Settings | str, **kwargs: Any) -> Engine:
    """An engine for `settings.database_url` (or a URL), set up for several writers.

    SQLite: the parent folder is created; WAL lets readers run beside a writer; `busy_timeout`
    makes a second writer wait instead of failing; transactions are begun by us so that writes
    can take the write lock up front (`BEGIN IMMEDIATE`) instead of failing mid-transaction.
    """
    raw = settings_or_url.database_url if isinstance(settings_or_url, Settings) else settings_or_url
    url_text = normalize_url(raw)
    try:
        url = make_url(url_text)
    except ArgumentError:
        raise InvalidInput(f"not a database URL: {redact_url(raw)}") from None
    backend = url.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(url_text, url.database, **kwargs)
    if backend == "postgresql":
        connect_args = dict(kwargs.pop("connect_args", {}))
        if "connect_timeout" not in url.query:
            connect_args.setdefault("connect_timeout", 10)
        return create_engine(url, pool_pre_ping=True, connect_args=connect_args, **kwargs)
    raise InvalidInput(
        f"unsupported database {redact_url(raw)!r}: use sqlite:///PATH or postgresql://..."
    )


def _sqlite_engine(url_text: str, database: str | None, **kwargs: Any) -> Engine:
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    connect_args = dict(kwargs.pop("connect_args", {}))
    connect_args.setdefault("timeout", 30)
    # Pooled connections move between threads, one at a time; the pool guarantees that.
    connect_args.setdefault("check_same_thread", False)
    engine = create_engine(url_text, connect_args=connect_args, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take BEGIN away from the sqlite3 module (it would emit it lazily and DEFERRED).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout = 30000")
        _enable_wal(cur)
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A DEFERRED transaction that reads and then writes fails with SQLITE_BUSY (no waiting)
        # if another process wrote in between; IMMEDIATE takes the write lock at BEGIN and waits.
        mode = conn.get_execution_options().get(SQLITE_BEGIN, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _enable_wal(cur: Any) -> None:
    # WAL is a property of the file, so this only has to win once. Switching needs an exclusive
    # lock and SQLite reports "locked" at once (no busy wait) when several connections open a
    # new file together, so retry for a while.
    if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
        return
    deadline = time.monotonic() + 30
    while True:
        try:
            cur.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def write_engine(engine: Engine) -> Engine:
    """A view of `engine` whose transactions are meant to write (IMMEDIATE on SQLite)."""
    if engine.dialect.name == "sqlite":
        return engine.execution_options(**{SQLITE_BEGIN: "IMMEDIATE"})
    return engine


# ---- schema ------------------------------------------------------------------------------


def _alembic_config(connection: Connection | None = None) -> Config:
    from alembic.config import Config  # alembic only when the schema is checked

    cfg = Config()
    # ConfigParser interpolation: a literal '%' in the install path must be doubled.
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    """The newest migration this version of lorajobs ships."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None, "no migrations shipped"
    return head


def current_revision(engine: Engine) -> str | None:
    """The migration the database is at; None for an empty database."""
    from alembic.runtime.migration import MigrationContext

    with _db_errors(engine), engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> None:
    """Migrate the database to the newest schema (`lorajobs db upgrade`). Safe to run twice,
    also concurrently: the upgrade runs in one transaction that holds a lock first."""
    from alembic import command
    from alembic.util import CommandError

    with _db_errors(engine), write_engine(engine).connect() as conn:
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_KEY})")
            try:
                # Alembic sees the open transaction and runs every migration inside it.
                command.upgrade(_alembic_config(conn), "head")
            except CommandError as err:  # e.g. a revision from a newer lorajobs
                raise LoraJobsError(f"cannot upgrade the database schema: {err}") from None


#: The newest migration shipped; a test checks it against Alembic's own head. Knowing it lets
#: every command check the schema with one query instead of loading Alembic and its scripts.
SCHEMA_HEAD = "0003"


def _stamped_revision(engine: Engine) -> str | None:
    """The revision in `alembic_version`, read with one plain query; None when unknown."""
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    except DBAPIError:
        return None  # no table yet, or no database: the full check below says what is wrong
    return rows[0] if len(rows) == 1 else None


def ensure_schema(engine: Engine, *, auto: bool = False) -> None:
    """Make sure the schema is at head before the queue is used.

    SQLite (embedded, one user) is upgraded silently. A shared PostgreSQL database is only
    upgraded when `auto` is true: otherwise raise, so an operator decides when to migrate.
    """
    if _stamped_revision(engine) == SCHEMA_HEAD:
        return
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config())
    current = current_revision(engine)
    if current == script.get_current_head():
        return
    if current is not None and current not in {s.revision for s in script.walk_revisions()}:
        raise LoraJobsError(
            f"database schema {current} is newer than this lorajobs knows: upgrade lorajobs"
        )
    if auto or engine.dialect.name == "sqlite":
        upgrade(engine)
        return
    raise LoraJobsError(UPGRADE_HINT)


@contextmanager
def _db_errors(engine: Engine) -> Iterator[None]:
    """Turn 'cannot connect / cannot open' into a one-line LoraJobsError naming the database
    (password hidden), which the CLI prints as is."""
    try:
        yield
    except OperationalError as exc:
        lines = str(exc.orig).strip().splitlines() if exc.orig is not None else []
        url = redact_url(engine.url.render_as_string(hide_password=True))
        raise LoraJobsError(f"cannot use database {url}: {lines[0] if lines else exc}") from None
