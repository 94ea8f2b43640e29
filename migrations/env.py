"""Alembic environment of the mascara catalog (SQLite and PostgreSQL).

The package passes an open connection in ``config.attributes["connection"]``;
from the command line the URL comes from ``-x url=...``, ``sqlalchemy.url`` or
``$MASCARA_DB_URL``.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import text

from mascara.catalog import models
from mascara.catalog._engine import make_engine

config = context.config
target_metadata = models.SQLModel.metadata
_OUR_TABLES = {m.__tablename__ for m in models.TABLES}


def _include_object(obj, name, type_, reflected, compare_to):  # type: ignore[no-untyped-def]
    # Only our tables: an unrelated table in a shared database is none of our business.
    if type_ == "table":
        return name in _OUR_TABLES
    return True


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    sqlite = connection.dialect.name == "sqlite"
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=sqlite,  # SQLite cannot ALTER most things: copy-and-move tables
        transactional_ddl=True,  # SQLite has transactional DDL once pysqlite stops interfering
        include_object=_include_object,
        compare_type=True,
    )
    raw = connection.connection.dbapi_connection if sqlite else None
    if raw is not None:
        # Batch mode copies and drops tables that others reference: foreign keys must be off,
        # which SQLite allows only outside a transaction (this connection has not begun one).
        raw.execute("PRAGMA foreign_keys = OFF")
    try:
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # Two processes upgrading a fresh database at once: the second waits.
                connection.execute(text("SELECT pg_advisory_xact_lock(727272)"))
            context.run_migrations()
            if raw is not None:
                bad = connection.execute(text("PRAGMA foreign_key_check")).fetchall()
                if bad:
                    raise RuntimeError(f"migration left rows with broken foreign keys: {bad[:5]}")
    finally:
        if raw is not None:
            raw.execute("PRAGMA foreign_keys = ON")


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = (context.get_x_argument(as_dictionary=True).get("url")
           or config.get_main_option("sqlalchemy.url") or os.environ.get("MASCARA_DB_URL"))
    if not url:
        raise SystemExit("no database URL: pass -x url=... or set MASCARA_DB_URL")
    engine = make_engine(url)
    with engine.connect() as conn:
        _run(conn)
        conn.commit()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_migrations_online()
