"""Database tables, the engine factory and schema migrations (Alembic).

Two backends: SQLite (the embedded default, a file under LORAJOBS_HOME; several processes may
write to it) and PostgreSQL (shared by controllers on different machines). The schema is only
ever created by the Alembic migrations in `orchestrator/migrations`, never by `create_all`, so
the two cannot drift; a test compares them.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
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
    Table,
    Text,
    create_engine,
    event,
    false,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
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


class DbClock:
    """The database server's clock: every timestamp that orders or expires anything (created_at,
    leases, backoff, aging) comes from here, never from the machine a client or a controller
    runs on, so a machine whose clock is off neither jumps the queue nor takes over (or loses)
    another controller's jobs.

    PostgreSQL is asked (`clock_timestamp()`) at most every `every_s` seconds; in between the
    answer advances with this process's monotonic clock, which wall-clock steps do not move.
    The embedded SQLite database has no server: its clock is this machine's.
    """

    def __init__(self, engine: Engine, every_s: float = 10.0) -> None:
        self.engine = engine
        self.every_s = every_s
        self._server = engine.dialect.name == "postgresql"
        self._base: datetime | None = None
        self._at = 0.0

    def __call__(self) -> datetime:
        if not self._server:
            return utcnow()
        mono = time.monotonic()
        if self._base is None or mono - self._at >= self.every_s:
            with self.engine.connect() as conn:
                now = conn.execute(text("SELECT clock_timestamp()")).scalar_one()
            self._base, self._at = now.astimezone(timezone.utc), time.monotonic()
            return self._base
        return self._base + timedelta(seconds=mono - self._at)


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


#: Constraint names are fixed so migrations can refer to them.
METADATA = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

_STATUS_VALUES = ", ".join(f"'{s.value}'" for s in JobStatus)


#: One job: its spec, where it stands, and the latest progress report.
JOBS = Table(
    "jobs",
    METADATA,
    Column("id", String(12), primary_key=True),
    Column("name", String(64), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("owner", String(64), nullable=False),
    Column("priority", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("spec", Text, nullable=False),  # canonical JSON of the validated spec
    Column("output_uri", Text, nullable=False),
    Column("idempotency_key", String(255), unique=True, nullable=True),
    Column("attempt", Integer, server_default="1", nullable=False),
    Column("gpus", Float, nullable=False),
    Column("gpu_type", String(64), nullable=True),
    Column("cpus", Integer, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("dispatched_at", UTCDateTime(), nullable=True),
    Column("started_at", UTCDateTime(), nullable=True),
    Column("finished_at", UTCDateTime(), nullable=True),
    Column("failure_kind", String(16), nullable=True),
    Column("failure_reason", Text, nullable=True),
    Column("cancel_requested", Boolean, server_default=false(), nullable=False),
    Column("step", Integer, nullable=True),
    Column("total_steps", Integer, nullable=True),
    Column("loss", Float, nullable=True),
    Column("it_per_s", Float, nullable=True),
    Column("node", String(255), nullable=True),
    Column("result", Text, nullable=True),  # JSON of the worker's result dict
    Column("lease_owner", String(255), nullable=True),
    Column("lease_expires_at", UTCDateTime(), nullable=True),
    # 0002: scheduling and fault recovery.
    Column("memory_gb", Float, nullable=True),
    Column("max_runtime_s", Float, nullable=True),
    Column("not_before", UTCDateTime(), nullable=True),  # backoff after a failure
    Column("infra_retries", Integer, server_default="0", nullable=False),
    Column("user_retries", Integer, server_default="0", nullable=False),
    Column("internal_retries", Integer, server_default="0", nullable=False),
    Column("node_id", String(64), nullable=True),  # Ray node of the current attempt
    Column("accelerator", String(64), nullable=True),  # that node's GPU type
    Column("cost_usd", Float, nullable=True),  # all attempts so far
    # 0005: preemption by priority. When the job was last asked to stop for a higher priority
    # one, and which one (kept after it is requeued: `show` says who preempted whom).
    Column("preempt_at", UTCDateTime(), nullable=True),
    Column("preempted_by", String(12), nullable=True),
    # 0006: nodes a gang spans (its `gpus` are split evenly over them); 1 for every other job.
    Column("nodes", Integer, server_default="1", nullable=False),
    Column("gang_nodes", Text, nullable=True),  # a gang's nodes, comma-separated
    # 0007: the job whose attempt this one shares (a pack's member; None: its own attempt).
    Column("pack_id", String(12), nullable=True),
    # The scheduler's query: queued jobs by priority, oldest first.
    Index("ix_jobs_status_priority_created_at", "status", "priority", "created_at"),
    # Per-owner limits and `lorajobs status --owner`.
    Index("ix_jobs_owner_status", "owner", "status"),
    # Covers the scheduling round's candidate query (see Queue._class_heads).
    Index(
        "ix_jobs_scheduling_class",
        "status",
        "priority",
        "owner",
        "gpus",
        "gpu_type",
        "cpus",
        "memory_gb",
        "nodes",  # 0008s: a class column since 0006 (read from the index, not the row)
        "created_at",
        "id",
        "not_before",
    ),
    Index("ix_jobs_created_at", "created_at"),
    CheckConstraint(f"status IN ({_STATUS_VALUES})", name="status"),
)


#: One status change of one job: the audit trail `lorajobs show` prints.
EVENTS = Table(
    "job_events",
    METADATA,
    # BIGINT on PostgreSQL; plain INTEGER on SQLite, where only that is an autoincrement rowid.
    Column(
        "id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    ),
    Column(
        "job_id", String(12), ForeignKey("jobs.id", ondelete="CASCADE"), index=True, nullable=False
    ),
    Column("at", UTCDateTime(), nullable=False),
    Column("from_status", String(16), nullable=True),  # None for the submit event
    Column("to_status", String(16), nullable=False),
    Column("reason", Text, nullable=False),
    Column("data", Text, nullable=True),  # JSON
)


#: What the controllers publish for the CLI, one row per name (0003). `waiting`: why queued
#: jobs wait, as the last scheduling round found (`lorajobs.orchestrator.waiting`); `usage`:
#: each owner's decayed GPU-hours and the measured seconds per step of each shape
#: (`lorajobs.orchestrator.fairshare`).
SCHEDULER_STATE = Table(
    "scheduler_state",
    METADATA,
    Column("name", String(32), primary_key=True),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("data", Text, nullable=False),  # JSON
)


#: API tokens of the shared service (0004). Only a hash of each token is kept.
TOKENS = Table(
    "api_tokens",
    METADATA,
    Column("id", String(12), primary_key=True),
    Column("owner", String(64), nullable=False),
    Column("role", String(16), nullable=False),
    Column("label", String(128), nullable=True),
    Column("secret_hash", String(64), unique=True, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("created_by", String(128), nullable=True),
    Column("revoked_at", UTCDateTime(), nullable=True),
    Column("last_used_at", UTCDateTime(), nullable=True),
    CheckConstraint("role IN ('admin', 'member', 'viewer')", name="role"),
)


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
    private = database and database != ":memory:" and not database.startswith("file:")
    if private:
        # The queue holds every owner's specs: this user's only (the folder and the file).
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(Path(database).expanduser(), os.O_CREAT | os.O_RDWR, 0o600)
        os.close(fd)
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


def upgrade(engine: Engine) -> tuple[str | None, str | None]:
    """Migrate the database to the newest schema (`lorajobs db upgrade`); returns the revision
    before and after (None: no schema). Safe to run twice, also concurrently: the upgrade runs
    in one transaction that holds a lock first."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.util import CommandError

    with _db_errors(engine), write_engine(engine).connect() as conn:
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_KEY})")
            before = MigrationContext.configure(conn).get_current_revision()
            try:
                # Alembic sees the open transaction and runs every migration inside it.
                command.upgrade(_alembic_config(conn), "head")
            except CommandError as err:  # e.g. a revision from a newer lorajobs
                raise LoraJobsError(f"cannot upgrade the database schema: {err}") from None
            return before, MigrationContext.configure(conn).get_current_revision()


#: The newest migration shipped; a test checks it against Alembic's own head. Knowing it lets
#: every command check the schema with one query instead of loading Alembic and its scripts.
SCHEMA_HEAD = "0008s"


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
