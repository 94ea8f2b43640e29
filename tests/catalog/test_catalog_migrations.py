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
VIEWS = {"night_status", "failed_batches", "failed_runs", "season"}


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
        assert views == VIEWS
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
        assert _objects(cat.engine)[1] == VIEWS
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


def test_upgrade_from_0002_carries_a_catalog_over(db_url):
    """A catalog written before revision 0003 (camera-nights keyed by camera and night) keeps its rows."""
    from sqlalchemy import text

    engine = _engine.make_engine(db_url)
    try:
        _engine.upgrade(engine, "0002")
        with engine.begin() as c:
            c.execute(text("INSERT INTO site (code) VALUES ('LP')"))
            c.execute(text("INSERT INTO camera (id, site, letter) VALUES ('LPE', 'LP', 'E')"))
            c.execute(text("INSERT INTO camera_night (id, camera_id, night, night_dir, registered_at) "
                           "VALUES ('cn-old', 'LPE', '20260301', '/data/20260301LPE', CURRENT_TIMESTAMP)"))
            c.execute(text(
                "INSERT INTO reduction_run (id, camera_night_id, status, host, started_at, heartbeat_at, "
                "code_version, settings_hash, catalogue_hash, raw_inventory_hash, fingerprint_key, settings) "
                "VALUES ('run-old', 'cn-old', 'succeeded', 'h', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, "
                "'v', 's', 'c', 'r', 'k', '{}')"))
            c.execute(text("INSERT INTO directory_move (id, camera_night_id, run_id, src, dst, action, moved_at) "
                           "VALUES ('m-old', 'cn-old', 'run-old', '/data/20260301LPE/work', "
                           "'/data/20260301LPE/work_old', 'renamed', CURRENT_TIMESTAMP)"))
        _engine.upgrade(engine)
        assert _diffs(engine) == []
        with engine.connect() as c:
            assert c.execute(text("SELECT datadir FROM camera_night")).scalar_one() == "/data"
            assert c.execute(text("SELECT phase, decision FROM reduction_run")).one() == ("finished", "new")
            state, intended, moved = c.execute(text("SELECT state, intended_at, moved_at FROM directory_move")).one()
            assert state == "done" and intended is not None and moved is not None
        with connect(db_url) as cat:
            # the same directory finds the old row (its id predates the directory-keyed ids)
            assert cat.register_camera_night("LP", "E", "20260301", "/data/20260301LPE") == "cn-old"
            assert cat.night_status()[0]["state"] == "succeeded"
    finally:
        engine.dispose()


def test_0007_keeps_frames_and_views_and_goes_back(db_url):
    """The frame status ``gone`` (0007): rows and views survive the table copy, and a downgrade restores statuses."""
    from sqlalchemy import text

    engine = _engine.make_engine(db_url)
    try:
        _engine.upgrade(engine, "0006")
        with engine.begin() as c:
            c.execute(text("INSERT INTO site (code) VALUES ('LP')"))
            c.execute(text("INSERT INTO camera (id, site, letter) VALUES ('LPE', 'LP', 'E')"))
            c.execute(text("INSERT INTO camera_night (id, camera_id, night, night_dir, datadir, registered_at) "
                           "VALUES ('cn', 'LPE', '20260301', '/data/20260301LPE', '/data', CURRENT_TIMESTAMP)"))
            for i, status in enumerate(("ok", "ok", "rejected")):
                c.execute(text("INSERT INTO frame (id, camera_night_id, lstseq, filename, status) "
                               f"VALUES ('f{i}', 'cn', {i}, '{i}LPE.fits', '{status}')"))
            # a calibration file is ok with a reason
            c.execute(text("INSERT INTO frame (id, camera_night_id, filename, status, reason) "
                           "VALUES ('d0', 'cn', 'darks_0001.fits', 'ok', 'combined into the master dark')"))
        _engine.upgrade(engine)
        assert _diffs(engine) == [] and _objects(engine)[1] == VIEWS
        with connect(db_url) as cat:
            assert cat.mark_gone_frames("cn", {"0LPE.fits"}) == ["1LPE.fits", "2LPE.fits", "darks_0001.fits"]
            assert cat.night_status()[0]["frames_ok"] == 1 and cat.night_status()[0]["frames_rejected"] == 0
        _engine.downgrade(engine, "0006")
        with engine.connect() as c:
            rows = dict(c.execute(text("SELECT filename, status FROM frame")).all())
            assert rows == {"0LPE.fits": "ok", "1LPE.fits": "ok", "2LPE.fits": "rejected", "darks_0001.fits": "ok"}
            assert c.execute(text("SELECT frames_ok, frames_rejected FROM night_status")).one() == (2, 1)
        assert _objects(engine)[1] == VIEWS
        _engine.upgrade(engine)
        assert _diffs(engine) == []
    finally:
        engine.dispose()
