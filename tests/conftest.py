"""Shared fixtures: simulated nights made once per session, and catalog databases on SQLite and PostgreSQL.

PostgreSQL: the server at 127.0.0.1:5432 (database ``test``, trust auth). Each
test session creates its own database and drops it afterwards; each test gets
a fresh schema in it (selected through ``search_path`` in the URL, so spawned
processes reach it with the URL alone). Without a server the PostgreSQL tests
are skipped, except under CI (``$CI`` set) where they fail.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from mascara.simulate import SimConfig, simulate_night


@pytest.fixture(scope="session")
def small_night(tmp_path_factory) -> dict:
    """A small simulated camera-night of 12 frames (one batch) with one broken frame of each kind."""
    datadir = tmp_path_factory.mktemp("data")
    cfg = SimConfig(site="LP", camera="E", size="small", nframes=12, seed=5, bad_frames=3)
    res = simulate_night(datadir, "20260301", cfg)
    res["datadir"] = datadir
    res["night_dir"] = Path(res["night_dir"])
    return res


PG_SERVER = os.environ.get("MASCARA_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _pg_admin(url: str):  # type: ignore[no-untyped-def]
    return create_engine(url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """URL of a database private to this test session (dropped at the end)."""
    admin = _pg_admin(PG_SERVER)
    try:
        with admin.connect() as c:
            c.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means "no server"
        admin.dispose()
        msg = f"PostgreSQL not reachable at {PG_SERVER}: {exc.__class__.__name__}: {exc}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    name = f"mascara_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_SERVER.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def _pg_schema(base: str) -> Iterator[str]:
    """A fresh schema in the session database; yields a URL selecting it."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = _pg_admin(base)
    with admin.connect() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{base}?options=-csearch_path%3D{schema}&application_name=mascara-{schema}"
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty catalog database: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog.sqlite'}"
        return
    with _pg_schema(request.getfixturevalue("pg_database")) as url:
        yield url


@pytest.fixture
def pg_url(pg_database: str) -> Iterator[str]:
    """PostgreSQL only: a URL of an empty schema (for client/server matters)."""
    with _pg_schema(pg_database) as url:
        yield url
