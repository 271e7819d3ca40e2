"""What every command shares: the consoles, the settings, the queue, and spec loading.

Data goes to stdout (`out`), messages to stderr (`err`). Heavy modules (SQLAlchemy, Alembic,
pydantic models) are imported inside the functions that need them, so `lorajobs --help` and the
light commands start fast and never import torch or Ray.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from lorajobs.orchestrator.settings import Settings

if TYPE_CHECKING:
    from lorajobs.jobspecs import AnyJobSpec
    from lorajobs.orchestrator.cli.remote import ApiClient
    from lorajobs.orchestrator.queue import Queue

# stdout: data. Piped output gets a wide console so tables are not cut to 80 columns.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)  # stderr: messages


def settings() -> Settings:
    """This process's settings, from the environment. A new LORAJOBS_HOME is made private
    (0700): it holds the queue, the bucket and the cache of every job run here."""
    s = Settings.from_env()
    if not s.home.exists():
        s.home.mkdir(parents=True, mode=0o700, exist_ok=True)
    return s


def open_queue(s: Settings) -> Queue:
    """The queue in `s`'s database; the embedded SQLite default creates its schema itself."""
    from lorajobs.orchestrator.db import ensure_schema, make_engine
    from lorajobs.orchestrator.queue import Queue

    engine = make_engine(s)
    ensure_schema(engine, auto=s.database_url.startswith("sqlite"))
    return Queue(engine)


def load_specs(paths: list[Path]) -> list[AnyJobSpec]:
    """Validate every file before touching anything, so one bad file inserts nothing."""
    from lorajobs.jobspecs import load_spec, resolve_local_paths
    from lorajobs.jobspecs.failures import InvalidInput

    specs, problems = [], []
    for p in paths:
        try:
            specs.append(resolve_local_paths(load_spec(p), p.resolve().parent, source=str(p)))
        except InvalidInput as e:
            problems.append(str(e))
    if problems:
        raise InvalidInput("\n".join(problems))
    return specs


def run_controller_until_done(s: Settings, queue: Queue, ids: list[str]) -> list[Any]:
    """Run a controller in this process until the jobs `ids` end; their final records."""
    from lorajobs.orchestrator.controller import Controller
    from lorajobs.orchestrator.ray_backend import RayBackend
    from lorajobs.orchestrator.settings import ControllerConfig

    log_to_stderr()
    sigterm_as_interrupt()
    backend = RayBackend(s)
    try:
        controller = Controller(queue, backend, ControllerConfig.from_env())
        controller.run(until=lambda: all(queue.get(i).status.is_terminal() for i in ids))
    finally:
        backend.shutdown()
    return [queue.get(i) for i in ids]


def sigterm_as_interrupt() -> None:
    """SIGTERM unwinds like Ctrl-C, so `finally` blocks shut the local Ray down cleanly."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def log_to_stderr() -> None:
    """Log lines with their level, on stderr (warnings must not read like info)."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # Their INFO lines say nothing an operator acts on (Alembic's "Context impl SQLiteImpl",
    # botocore's "Found credentials"); their warnings still show.
    for noisy in ("alembic", "botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def human_size(n: float) -> str:
    """`1234567` -> `1.2 MB`."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def api() -> ApiClient | None:
    """The lorajobs server this CLI talks to (`LORAJOBS_API_URL`, or `lorajobs login`); None
    for the embedded single-user mode, which works on the database and bucket directly."""
    from lorajobs.orchestrator.cli.remote import client_from_env

    return client_from_env()
