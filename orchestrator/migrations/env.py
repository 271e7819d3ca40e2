"""Alembic environment: runs lorajobs' migrations on the connection it is handed.

`lorajobs.orchestrator.db.upgrade` passes an open connection (already in a transaction) through
`config.attributes["connection"]`, so nothing here depends on the working directory or on an
alembic.ini. Run by hand (`alembic -c orchestrator/alembic.ini ...`, for writing migrations), it
connects to LORAJOBS_DATABASE_URL instead.
"""

from __future__ import annotations

from typing import Any

from alembic import context

from lorajobs.orchestrator.db import METADATA, make_engine
from lorajobs.orchestrator.settings import Settings

config = context.config


def _run(connection: Any) -> None:
    context.configure(
        connection=connection,
        target_metadata=METADATA,
        # SQLite can only change most table properties by copying the table.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    if context.is_offline_mode():
        url = config.get_main_option("sqlalchemy.url") or Settings.from_env().database_url
        context.configure(url=url, target_metadata=METADATA, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url") or Settings.from_env())
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


_main()
