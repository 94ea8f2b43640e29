"""``mascara status`` and ``mascara db upgrade`` through the real command line parser."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from catalog_rows import fill_realistic
from mascara.catalog import _engine
from mascara.cli import main


def test_status_json_and_table(catalog, db_url, capsys, tmp_path):
    fill_realistic(catalog)
    assert main(["status", str(tmp_path), "--db", db_url, "--json", "--night", "20260301"]) == 0
    rows = json.loads(capsys.readouterr().out)
    expected = catalog.night_status("20260301")
    assert [(r["camera"], r["state"], r["batches_done"]) for r in rows] == \
        [(r["camera"], r["state"], r["batches_done"]) for r in expected]
    assert rows[0]["started_at"] == expected[0]["started_at"].isoformat()

    assert main(["status", str(tmp_path), "--db", db_url]) == 0
    table = capsys.readouterr().out
    lines = {line.split("│")[2].strip(): line for line in table.splitlines() if line.count("│") > 5}
    assert set(lines) == {"LPE", "LPS", "LPW", "LSC"}
    assert "12/12" in lines["LPE"] and "succeeded" in lines["LPE"] and "8/10" in lines["LPS"]
    assert "pending" in lines["LPW"] and "reducer2" in lines["LSC"]
    # a failed camera-night says why (issue 9): the phase it stopped in and its error, under the table
    assert "20260301 LPS: failed while reducing: batches failed" in table
    assert "LPE: failed" not in table


def test_status_without_catalog(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MASCARA_DB_URL", raising=False)
    assert main(["status", str(tmp_path)]) == 1
    assert "no catalog" in capsys.readouterr().err
    assert not (tmp_path / "catalog.sqlite").exists()


def test_status_of_an_empty_database_says_so_and_creates_nothing(db_url, tmp_path, capsys):
    """``mascara status --db`` on a database without a catalog (a fresh PostgreSQL schema, an empty SQLite
    file): one line, exit 1, and the database is left as it was (a view never creates a schema)."""
    if db_url.startswith("sqlite"):
        Path(db_url.removeprefix("sqlite:///")).touch()
    assert main(["status", str(tmp_path), "--db", db_url]) == 1
    assert "no catalog in" in capsys.readouterr().err
    engine = _engine.make_engine(db_url)
    try:
        assert _engine.current_revision(engine) is None
    finally:
        engine.dispose()


def test_db_upgrade_refuses_a_data_directory_that_does_not_exist(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MASCARA_DB_URL", raising=False)
    assert main(["db", "upgrade", str(tmp_path / "typo")]) == 2
    assert "no data directory" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()  # nothing created


def test_db_upgrade_creates_embedded_catalog(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MASCARA_DB_URL", raising=False)
    assert main(["db", "upgrade", str(tmp_path)]) == 0
    assert f"revision (empty) -> {_engine.head_revision()}" in capsys.readouterr().out
    assert (tmp_path / "catalog.sqlite").exists()
    assert main(["status", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_a_damaged_catalog_is_named_not_a_traceback(tmp_path, capsys, monkeypatch):
    """A stranger's trial: garbage in catalog.sqlite gave ``mascara status`` a page of SQLAlchemy traceback
    and ``mascprocess`` a bare "file is not a database"; both now name the catalog in one line."""
    from mascara.cli import mascprocess_main

    monkeypatch.delenv("MASCARA_DB_URL", raising=False)
    (tmp_path / "20260301LPE" / "raw").mkdir(parents=True)
    (tmp_path / "catalog.sqlite").write_bytes(bytes(range(256)) * 20)
    assert main(["status", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"mascara: the catalog sqlite:///{tmp_path}/catalog.sqlite cannot be used: " \
                          "file is not a database", err
    # mascprocess, on a night with one frame (it fails at the catalog, before any frame is read)
    from mascara.simulate import SimConfig, simulate_night

    simulate_night(tmp_path, "20260302", SimConfig(site="LP", camera="E", size="small", nframes=1, seed=1))
    assert mascprocess_main([str(tmp_path), "--night", "20260302", "--no-prefect", "-q"]) == 1
    err = capsys.readouterr().err
    assert f"20260302LPE: failed: the catalog sqlite:///{tmp_path}/catalog.sqlite cannot be used: file is not a " \
           "database" in err, err
    assert "Traceback" not in err


def test_status_names_night_files_gone_from_disk(catalog, db_url, capsys, tmp_path):
    """The catalog says what a run wrote; ``mascara status`` also says when those files were deleted or
    replaced since (an outside trial deleted an sLC by hand and status still called the night done)."""
    from catalog_rows import reduce_fake

    _, run = reduce_fake(catalog, "LP", "E", "20260301", nbatches=1, finish=None, products=False)
    flc, slc = tmp_path / "fLC_20260301LPE.hdf5", tmp_path / "sLC_20260301LPE.hdf5"
    flc.write_bytes(b"f" * 100)
    slc.write_bytes(b"s" * 50)
    catalog.record_product(run, "fLC", str(flc), "a" * 64, 100, 1)
    catalog.record_product(run, "sLC", str(slc), "b" * 64, 50, 1)
    catalog.finish_run(run, "succeeded")

    def status() -> tuple[list[str], str]:
        assert main(["status", str(tmp_path), "--db", db_url, "--json"]) == 0
        [row] = json.loads(capsys.readouterr().out)
        assert main(["status", str(tmp_path), "--db", db_url]) == 0
        return row["products_gone"], capsys.readouterr().out

    gone, table = status()
    assert gone == [] and "gone" not in table
    # rewritten in place with the same size after the run recorded it (another catalog's run, say): its
    # modification time is not the one recorded; put back (as cp -a or a rename would keep it), in place again
    st = flc.stat()
    os.utime(flc, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert status()[0] == ["fLC"]
    os.utime(flc, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert status()[0] == []
    slc.unlink()
    flc.write_bytes(b"f" * 99)  # replaced by another file
    gone, table = status()
    assert gone == ["fLC", "sLC"]
    assert "fLC+sLC gone or replaced" in table and f"fLC, sLC recorded by run {run} not on disk" in table


def test_status_of_a_catalog_an_older_mascara_wrote_says_so_and_changes_nothing(db_url, tmp_path, capsys):
    """A view never writes: ``mascara status`` on a catalog at an older schema revision upgraded it (on a
    shared PostgreSQL catalog, under the runs of other machines). It now names the revision and the command
    that upgrades it, exit 1, and the catalog stays at its revision; once upgraded, status reads it."""
    engine = _engine.make_engine(db_url)
    try:
        _engine.upgrade(engine, "0006")
        assert main(["status", str(tmp_path), "--db", db_url]) == 1
        err = capsys.readouterr().err
        assert "schema revision 0006" in err and f"mascara db upgrade {tmp_path} --db" in err, err
        assert main(["status", str(tmp_path), "--db", db_url, "--season"]) == 1  # every view of the command
        assert _engine.current_revision(engine) == "0006"
        assert main(["db", "upgrade", str(tmp_path), "--db", db_url]) == 0
        assert _engine.current_revision(engine) == _engine.head_revision()
        assert main(["status", str(tmp_path), "--db", db_url]) == 0
    finally:
        engine.dispose()


def test_status_of_a_catalog_a_newer_mascara_wrote_says_so(db_url, tmp_path, capsys):
    from sqlalchemy import text

    engine = _engine.make_engine(db_url)
    try:
        _engine.upgrade(engine)
        with engine.begin() as c:
            c.execute(text("UPDATE alembic_version SET version_num = '0099'"))
        assert main(["status", str(tmp_path), "--db", db_url]) == 1
        assert "revision 0099, which this mascara" in capsys.readouterr().err
        with engine.begin() as c:  # back, for the fixture's clean-up
            c.execute(text(f"UPDATE alembic_version SET version_num = '{_engine.head_revision()}'"))
    finally:
        engine.dispose()


def test_status_says_when_a_running_run_has_lost_its_process_on_this_host(catalog, db_url, capsys, tmp_path):
    """An outside trial filled the disk under a run whose catalog was on it: the run could not record its
    end, and ``mascara status`` went on showing it ``running`` for a process that had exited. The view
    changes nothing; it says so, and JSON carries the pid."""
    import os
    import socket
    import subprocess
    import sys

    from catalog_rows import VERSIONS, fingerprint

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    here = socket.gethostname()
    for cam, pid in (("E", gone.pid), ("W", os.getpid())):  # W: its process is this test's, which lives
        cn = catalog.register_camera_night("LP", cam, "20260301", f"/data/20260301LP{cam}")
        catalog.start_run(cn, fingerprint(), {"batch_size": 50}, VERSIONS, here, pid=pid)
    assert main(["status", str(tmp_path), "--db", db_url]) == 0
    out = capsys.readouterr().out
    assert "20260301 LPE: run " in out and f"is recorded running, but its process {gone.pid} on this host is gone" \
        in " ".join(out.split()), out
    assert "LPW: run" not in out
    assert main(["status", str(tmp_path), "--db", db_url, "--json"]) == 0
    rows = {r["camera"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["LPE"]["state"] == "running" and rows["LPE"]["process_gone"] == gone.pid
    assert rows["LPW"]["process_gone"] is None


def test_status_selects_cameras_and_sites_as_the_other_commands_do(catalog, db_url, capsys, tmp_path):
    """An outside trial: ``mascara status D --night 20260301 --camera E`` was refused (unrecognized arguments)
    though mascprocess, quicklook and backfill take ``--camera`` and ``--site``. The same values (``E``,
    ``E+S``, ``all``; ``LP``, ``LP+LS``) now select the rows of every view: the table, ``--json``,
    ``--rejected`` and ``--season``; a letter that is no camera is a mistake (exit 2, one line)."""
    from catalog_rows import reduce_fake

    fill_realistic(catalog)  # 20260301 LPE LPS LPW (LPE: 3 rejected frames), 20260215 LSC
    reduce_fake(catalog, "LP", "S", "20260302", nbatches=1, rejected=2)

    def cams(*argv: str) -> list[str]:
        assert main(["status", str(tmp_path), "--db", db_url, "--json", *argv]) == 0
        return [r["camera"] for r in json.loads(capsys.readouterr().out)]

    assert cams("--night", "20260301", "--camera", "E") == ["LPE"]
    assert cams("--night", "20260301", "--camera", "E+S") == ["LPE", "LPS"]
    assert cams("--night", "20260301", "--camera", "all") == ["LPE", "LPS", "LPW"]
    assert cams("--site", "LS") == ["LSC"]
    assert cams("--site", "LP+LS", "--camera", "C") == ["LSC"]
    assert cams("--site", "LP", "--camera", "C") == []
    assert cams("--rejected", "--camera", "S") == ["LPS", "LPS"]
    assert cams("--rejected", "--camera", "E") == ["LPE"] * 3
    assert cams("--season", "--camera", "S") == ["LPS"]
    assert cams("--season", "--site", "LS") == ["LSC"]

    assert main(["status", str(tmp_path), "--db", db_url, "--night", "20260301", "--camera", "S"]) == 0
    table = capsys.readouterr().out
    lines = {line.split("│")[2].strip() for line in table.splitlines() if line.count("│") > 5}
    assert lines == {"LPS"}
    assert "20260301 LPS: failed while reducing" in table
    assert main(["status", str(tmp_path), "--db", db_url, "--night", "20260301", "--camera", "N"]) == 0
    assert "no camera-nights registered for night 20260301, camera N" in capsys.readouterr().out

    assert main(["status", str(tmp_path), "--db", db_url, "--camera", "e"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "camera 'e' is not one of" in err and "did you mean E?" in err, err
    assert main(["status", str(tmp_path), "--db", db_url, "--site", "XX"]) == 2
    assert "site 'XX' is not one of" in capsys.readouterr().err


def _fill_beyond_a_pipe(catalog, view: str) -> None:
    """Far more output than a pipe holds (64 KiB): for ``rejected``, 3000 refused raw files; for ``table``,
    400 failed camera-nights, whose lines of why come after the table (a second write)."""
    if view == "rejected":
        cn = catalog.register_camera_night("LP", "E", "20260301", "/data/20260301LPE")
        catalog.record_frames(cn, [(k, f"{k:08d}LPE.fits", 10, "rejected", "missing keyword LST")
                                   for k in range(3000)])
        return
    from datetime import date, timedelta

    from catalog_rows import VERSIONS, fingerprint

    for k in range(400):
        night = f"{date(2025, 1, 1) + timedelta(days=k):%Y%m%d}"
        cn = catalog.register_camera_night("LP", "E", night, f"/data/{night}LPE")
        catalog.finish_run(catalog.start_run(cn, fingerprint(), {}, VERSIONS, "station"), "failed",
                           error="RuntimeError: " + "x" * 60)


@pytest.mark.parametrize("view,argv", [("rejected", ["--rejected", "--json"]), ("table", [])],
                         ids=["rejected-json", "table"])
def test_status_output_closed_early_by_its_reader_ends_quietly(catalog, db_url, tmp_path, view, argv):
    """``mascara status D --rejected --json | head`` ended in a BrokenPipeError traceback, and the table
    (written by rich) in exit 1 once its reader had gone. A reader that stops reading ends the command
    quietly: no traceback, no message, exit 141 (128 + SIGPIPE, as a command the shell's SIGPIPE stops)."""
    import subprocess
    import sys

    _fill_beyond_a_pipe(catalog, view)
    proc = subprocess.Popen([sys.executable, "-m", "mascara.cli", "status", str(tmp_path), "--db", db_url, *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(200)  # like head: a few lines, then it goes away
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 141), err
    assert err == "", err


def _bad_urls(tmp_path: Path) -> list[tuple[str, str]]:
    """(URL, what its one line must show of it): the password never."""
    return [
        ("notaurl", "notaurl"),
        ("postgres ql://u:secret@h/d", "h/d"),  # cannot be parsed, and holds a password
        ("mysql://x:secret@y/z", "mysql://x:***@y/z"),  # a driver that is not installed
        ("postgresql+nosuchdriver://x:secret@y/z", "postgresql+nosuchdriver://x:***@y/z"),
        ("postgresql+asyncpg://x:secret@y/z", "postgresql+asyncpg://x:***@y/z"),  # asyncio: not usable
        (f"sqlite:///{tmp_path}/typo/catalog.sqlite", f"{tmp_path}/typo"),  # its directory does not exist
    ]


def test_status_refuses_a_catalog_url_that_cannot_name_one_in_one_line(tmp_path, capsys, monkeypatch):
    """``mascara status D --db notaurl`` printed a page of traceback. A URL that cannot be parsed, names a
    driver that is not installed, or a SQLite file in a directory that does not exist is one line naming the
    URL (password hidden) and the problem, exit 2, and nothing is created."""
    monkeypatch.delenv("MASCARA_DB_URL", raising=False)
    for url, shown in _bad_urls(tmp_path):
        assert main(["status", str(tmp_path), "--db", url]) == 2, url
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mascara status: "), err
        assert shown in err and "secret" not in err and "Traceback" not in err, err
    assert not (tmp_path / "typo").exists()
    # the same URL given by $MASCARA_DB_URL
    monkeypatch.setenv("MASCARA_DB_URL", "notaurl")
    assert main(["status", str(tmp_path)]) == 2
    assert "notaurl" in capsys.readouterr().err


def test_status_of_an_unreachable_server_is_still_one_message(tmp_path, capsys, monkeypatch):
    """A PostgreSQL URL that parses but whose server does not answer keeps its message (exit 1)."""
    monkeypatch.delenv("MASCARA_DB_URL", raising=False)
    assert main(["status", str(tmp_path), "--db", "postgresql+psycopg://u:secret@127.0.0.1:1/d"]) == 1
    err = capsys.readouterr().err
    assert "cannot be used: connection failed" in err and "Traceback" not in err, err
    assert "secret" not in err and err.count("\n") == 1, err  # the password was printed, then psycopg's hints


def test_season_says_which_whole_months_it_counts(catalog, db_url, capsys, tmp_path):
    """``mascara status --season --night 20260301..20260302`` counts every night of March (by design: the
    season view is by month) but did not say so; the table now names the months it covers, and says when
    they are more than the nights asked for. ``--json`` has the month in every row and is unchanged."""
    fill_realistic(catalog)
    base = ["status", str(tmp_path), "--db", db_url, "--season"]
    assert main([*base, "--night", "20260301..20260302"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "months covered: 202603 (whole months: every night of them, not only the nights of --night " \
           "20260301..20260302)" in out, out
    assert main([*base, "--night", "20260201..20260331"]) == 0  # whole months asked: nothing more counted
    out = " ".join(capsys.readouterr().out.split())
    assert "months covered: 202602, 202603" in out and "not only" not in out, out
    assert main([*base, "--night", "20260415"]) == 0  # nothing there: the month is still named
    out = " ".join(capsys.readouterr().out.split())
    assert "no camera-nights registered" in out and "months covered: 202604 (whole months" in out, out
    assert main([*base]) == 0  # every month: nothing to say
    assert "months covered" not in capsys.readouterr().out
    assert main([*base, "--json", "--night", "20260301..20260302"]) == 0
    assert {r["month"] for r in json.loads(capsys.readouterr().out)} == {"202603"}


def test_status_night_all_means_every_night(catalog, db_url, capsys, tmp_path):
    """``--night all`` passed the check of the nights (parse_nights takes it, as mascprocess does) and then
    selected the nights named "all": none. It is every night, as elsewhere."""
    fill_realistic(catalog)
    assert main(["status", str(tmp_path), "--db", db_url, "--json", "--night", "all", "--camera", "C"]) == 0
    assert [r["camera"] for r in json.loads(capsys.readouterr().out)] == ["LSC"]


def test_db_upgrade_refuses_a_catalog_url_that_names_none(tmp_path, capsys, monkeypatch):
    """A review: ``mascara db upgrade --db sqlite:////typo/x.sqlite`` made the directory and a new catalog."""
    monkeypatch.delenv("MASCARA_DB_URL", raising=False)
    assert main(["db", "upgrade", str(tmp_path), "--db", f"sqlite:///{tmp_path}/typo/x.sqlite"]) == 2
    assert f"no directory {tmp_path}/typo for the SQLite file" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()
    assert main(["db", "upgrade", str(tmp_path), "--db", "postgres://u@h/d"]) == 2
    assert "postgresql+psycopg://" in capsys.readouterr().err
