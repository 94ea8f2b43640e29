"""Alembic migrations produce exactly the models' schema, both ways, on both dialects."""

from __future__ import annotations

import argparse

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from mascara.catalog import _engine, connect
from mascara.catalog.commands import cli_db_upgrade
from mascara.catalog.models import TABLES, SQLModel

OURS = {m.__tablename__ for m in TABLES}


def _diffs(engine) -> list:  # type: ignore[no-untyped-def]
    def include(obj, name, type_, reflected, compare_to):  # type: ignore[no-untyped-def]
        return name in OURS if type_ == "table" else True

    with engine.connect() as conn:
        mc = MigrationContext.configure(conn, opts={"compare_type": True, "include_object": include})
        return compare_metadata(mc, SQLModel.metadata)


def _objects(engine) -> tuple[set[str], set[str]]:  # type: ignore[no-untyped-def]
    insp = inspect(engine)
    return set(insp.get_table_names()), set(insp.get_view_names())


def test_migrations_match_models(db_url):
    with connect(db_url) as cat:  # upgrades automatically
        tables, views = _objects(cat.engine)
        assert tables == OURS | {"alembic_version"}
        assert views == {"night_status", "failed_batches"}
        assert _engine.current_revision(cat.engine) == _engine.head_revision()
        assert _diffs(cat.engine) == []


def test_downgrade_then_upgrade(db_url):
    with connect(db_url) as cat:
        cat.register_camera_night("LP", "E", "20260301", "/d")
        _engine.downgrade(cat.engine, "base")
        assert _objects(cat.engine) == ({"alembic_version"}, set())
        assert _engine.current_revision(cat.engine) is None
        _engine.upgrade(cat.engine)
        assert _diffs(cat.engine) == []
        assert _objects(cat.engine)[1] == {"night_status", "failed_batches"}
        cat.register_camera_night("LP", "E", "20260301", "/d")
        assert len(cat.night_status()) == 1


def test_db_upgrade_command(db_url, capsys):
    args = argparse.Namespace(datadir=".", db=db_url, revision="0001")
    assert cli_db_upgrade(args) == 0
    assert "(empty) -> 0001" in capsys.readouterr().out
    engine = _engine.make_engine(db_url)
    try:
        assert _objects(engine)[1] == set()  # views arrive in 0002
        args.revision = "head"
        cli_db_upgrade(args)
        assert f"0001 -> {_engine.head_revision()}" in capsys.readouterr().out
        assert _diffs(engine) == []
    finally:
        engine.dispose()
