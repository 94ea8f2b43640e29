"""A PostgreSQL connection killed by the server is replaced and the transaction retried."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, event, text

from catalog_rows import VERSIONS, fingerprint
from mascara.catalog import connect


pytestmark = pytest.mark.postgres


def _kill(admin, pid: int) -> None:  # type: ignore[no-untyped-def]
    with admin.connect() as c:
        assert c.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar() is True


def _backend_pids(admin, app: str) -> list[int]:  # type: ignore[no-untyped-def]
    with admin.connect() as c:
        return list(c.execute(text("SELECT pid FROM pg_stat_activity WHERE application_name = :a"),
                              {"a": app}).scalars())


def test_connection_killed_between_calls(pg_url):
    app = pg_url.rsplit("application_name=", 1)[1]
    admin = create_engine(pg_url.split("?")[0], isolation_level="AUTOCOMMIT")
    with connect(pg_url) as cat:
        cn = cat.register_camera_night("LP", "E", "20260301", "/d")
        run = cat.start_run(cn, fingerprint(), {}, VERSIONS, "h")
        cat.register_batches(run, [(k, 50 * k, 50 * k + 49, 50) for k in range(3)])
        before = _backend_pids(admin, app)
        assert before
        for pid in before:
            _kill(admin, pid)
        cat.batch_started(run, 0)
        cat.batch_succeeded(run, 0, "/t/0.h5", "0" * 64, {}, 0.2, 100, False)
        cat.heartbeat(run)
        assert set(_backend_pids(admin, app)).isdisjoint(before)
        assert cat.done_batches(cn, fingerprint()) == {0: ("/t/0.h5", "0" * 64)}
    admin.dispose()


def test_connection_killed_inside_a_transaction(pg_url, caplog):
    admin = create_engine(pg_url.split("?")[0], isolation_level="AUTOCOMMIT")
    with connect(pg_url) as cat:
        cn = cat.register_camera_night("LP", "E", "20260301", "/d")
        run = cat.start_run(cn, fingerprint(), {}, VERSIONS, "h")
        cat.register_batches(run, [(k, 50 * k, 50 * k + 49, 50) for k in range(3)])
        cat.batch_started(run, 1)
        killed: list[int] = []

        @event.listens_for(cat.engine, "before_cursor_execute")
        def _sabotage(conn, cursor, statement, *args):  # type: ignore[no-untyped-def]
            # the server drops us just before the batch's UPDATE, once
            if statement.startswith("UPDATE batch") and not killed:
                pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
                _kill(admin, pid)
                killed.append(pid)

        cat.batch_succeeded(run, 1, "/t/1.h5", "1" * 64, {"total": 3.0}, 0.2, 100, False)
        event.remove(cat.engine, "before_cursor_execute", _sabotage)
        assert killed and "retry 1 of" in caplog.text
        assert cat.done_batches(cn, fingerprint()) == {1: ("/t/1.h5", "1" * 64)}
    admin.dispose()
