"""Engines for the catalog: URL choice, SQLite pragmas, Alembic upgrades."""

from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

#: Seconds a SQLite writer waits for the lock before giving up.
SQLITE_BUSY_TIMEOUT = 60.0
#: Environment variable naming the catalog when no URL is given.
ENV_URL = "MASCARA_DB_URL"
#: File name of the embedded catalog inside a data directory.
SQLITE_NAME = "catalog.sqlite"

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"

_upgraded: set[str] = set()
_upgrade_lock = threading.Lock()


def resolve_url(url: str | None = None, datadir: str | Path | None = None) -> str:
    """The catalog URL: ``url``, else ``$MASCARA_DB_URL``, else ``<datadir>/catalog.sqlite``.

    ``datadir`` defaults to the current directory.
    """
    if url:
        return url
    env = os.environ.get(ENV_URL)
    if env:
        return env
    path = Path(datadir if datadir is not None else ".").resolve() / SQLITE_NAME
    return f"sqlite:///{path}"


def shown_url(url: str) -> str:
    """``url`` as the catalog's name for people and for other processes: no password, and a SQLite file by
    its resolved absolute path (one file reached by two spellings, relative or through a link, is one
    catalog: the night directory's lock compares these names, :mod:`mascara.nightlock`)."""
    try:
        u = make_url(url)
        if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
            u = u.set(database=str(Path(u.database).resolve()))
        return u.render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot parse is shown without what precedes an '@'
        return url.split("@")[-1]


def check_url(url: str) -> None:
    """Refuse, before anything is done, a catalog URL a person gave that cannot name a catalog.

    Raises :class:`ValueError` with one line for people: a URL SQLAlchemy cannot
    parse, a database whose driver is not installed, or a SQLite file whose
    directory does not exist (a mistyped path would otherwise create a second,
    empty catalog there, and the runs it records would move aside outputs
    the real catalog knows; :func:`make_engine` would create the directory).
    A server that does not answer is found on connecting.
    """
    try:
        u = make_url(url)
    except Exception as exc:  # noqa: BLE001 - ArgumentError, ValueError: the same for the user
        raise ValueError(f"catalog URL {shown_url(url)!r} cannot be parsed ({exc}); e.g. "
                         "sqlite:////data/catalog.sqlite or postgresql+psycopg://user@host/db") from None
    if u.get_backend_name() not in ("sqlite", "postgresql"):
        hint = " (postgresql+psycopg://... for PostgreSQL)" if u.get_backend_name() == "postgres" else ""
        raise ValueError(f"catalog URL {shown_url(url)!r}: {u.get_backend_name()} is not supported; the catalog "
                         f"runs on SQLite or PostgreSQL{hint}")
    try:
        dialect = u.get_dialect()
        dialect.import_dbapi()  # the driver module itself, which create_engine imports
    except Exception as exc:  # noqa: BLE001 - NoSuchModuleError, ModuleNotFoundError of the driver
        raise ValueError(f"catalog URL {shown_url(url)!r}: no database driver for {u.drivername!r} "
                         f"({type(exc).__name__}: {exc})") from None
    if getattr(dialect, "is_async", False):  # postgresql+asyncpg: its connect fails deep in SQLAlchemy
        raise ValueError(f"catalog URL {shown_url(url)!r}: {u.drivername} is an asyncio driver; the catalog "
                         "needs a synchronous one, e.g. postgresql+psycopg://")
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        where = Path(u.database).absolute().parent  # as make_engine opens it: no ~ expansion
        if not where.is_dir():
            raise ValueError(f"catalog URL {shown_url(url)!r}: no directory {where} for the SQLite file (a "
                             "mistyped path? the directory is not created)")


def unusable(url: str | None, exc: BaseException) -> str:
    """One line for people: the catalog ``url`` (its password hidden; None: unnamed) cannot be used, and the
    driver's first line of why (psycopg adds hints on further lines)."""
    why = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    return f"the catalog {shown_url(url) + ' ' if url else ''}cannot be used: {why}"


def _sqlite_hooks(engine: Engine) -> None:
    # pysqlite's own transaction handling defers BEGIN and cannot start
    # BEGIN IMMEDIATE; switch it off and emit BEGIN ourselves so a writer takes
    # the write lock at the start (no lock upgrade, no SQLITE_BUSY deadlocks).
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT * 1000)}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.execute("PRAGMA synchronous = NORMAL")  # safe with WAL, much faster commits
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # type: ignore[no-untyped-def]
        readonly = conn.get_execution_options().get("mascara_readonly", False)
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


#: Every engine :func:`make_engine` made that is still alive (:func:`dispose_all`).
_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


def dispose_all() -> None:
    """Close the pooled connections of every live catalog engine of this process.

    A command calls it when its work is done: SQLite then checkpoints its
    write-ahead log into the catalog file and removes ``-wal``/``-shm``, and a
    PostgreSQL server sees its connections closed. Engines held in reference
    cycles were otherwise closed only by the interpreter's last collection,
    which a command's process skips (:mod:`mascara._collector`).
    """
    for engine in list(_ENGINES):
        try:
            engine.dispose()
        except Exception:  # noqa: BLE001 - at exit, a connection that will not close is closed by the OS
            pass


def make_engine(url: str) -> Engine:
    """An engine for ``url`` with the catalog's connection settings.

    SQLite: WAL, foreign keys on, ``busy_timeout`` of 60 s, writers begin with
    ``BEGIN IMMEDIATE``; the file's directory is created. PostgreSQL:
    ``pool_pre_ping`` so connections dropped by the server are replaced.
    """
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(u, connect_args={"timeout": SQLITE_BUSY_TIMEOUT})
        _sqlite_hooks(engine)
    else:
        engine = create_engine(u, pool_pre_ping=True, pool_size=2, max_overflow=4)
    _ENGINES.add(engine)
    return engine


def alembic_config(url: str):  # type: ignore[no-untyped-def]
    """An Alembic ``Config`` for the repository's ``migrations/`` and ``url``."""
    from alembic.config import Config

    ini = MIGRATIONS_DIR / "alembic.ini"
    if not ini.is_file():
        raise FileNotFoundError(f"Alembic migrations not found at {MIGRATIONS_DIR}")
    cfg = Config(str(ini))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _scripts() -> Any:
    """The Alembic script directory of ``migrations/`` (this code's revisions)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://"))


def head_revision() -> str:
    return _scripts().get_current_head()  # type: ignore[no-any-return]


def known_revision(revision: str) -> bool:
    """Whether ``revision`` is one of this code's migrations (else a newer mascara wrote it)."""
    from alembic.util import CommandError

    try:
        return _scripts().get_revision(revision) is not None
    except CommandError:
        return False


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        conn = conn.execution_options(mascara_readonly=True)
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` on ``engine``'s database."""
    from alembic import command

    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        conn.commit()


def downgrade(engine: Engine, revision: str) -> None:
    """Revert migrations down to ``revision`` (``"base"`` drops everything)."""
    from alembic import command

    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
        conn.commit()
    with _upgrade_lock:
        _upgraded.discard(engine.url.render_as_string(hide_password=False))


def ensure_schema(engine: Engine) -> None:
    """Upgrade to head once per process and URL, only when behind."""
    key = engine.url.render_as_string(hide_password=False)
    with _upgrade_lock:
        if key in _upgraded:
            return
        if current_revision(engine) != head_revision():
            upgrade(engine)
        _upgraded.add(key)
