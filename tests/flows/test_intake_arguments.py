"""Command-line mistakes are refused before anything slow starts, with what was looked for and what exists."""

from __future__ import annotations

import subprocess
import sys

import pytest
from corpus import linked_copy
from flowkit import NIGHT

# Runs mascprocess's entry point in a fresh interpreter and reports which heavy modules it imported.
_PROBE = """
import sys
from mascara.cli import mascprocess_main
code = mascprocess_main(sys.argv[1:])
print("imported:", " ".join(m for m in ("prefect", "numpy", "astropy", "sqlalchemy") if m in sys.modules))
sys.exit(code)
"""


@pytest.fixture(scope="module")
def two_cameras(pristine_night, tmp_path_factory):
    """The pristine night plus an empty camera S directory of the same night."""
    datadir = linked_copy(pristine_night, tmp_path_factory.mktemp("args") / "data")
    (datadir / f"{NIGHT}LPS" / "raw").mkdir(parents=True)
    return datadir


@pytest.mark.parametrize("args, words", [
    (["--night", "2026-03-01"], "night '2026-03-01' is not YYYYMMDD"),
    (["--night", "202603"], "night '202603' is not YYYYMMDD"),
    (["--night", "20261399"], "night '20261399' is not a real date"),
    (["--camera", "X"], "camera 'X' is not one of N E S W C"),
    (["--camera", "e"], "did you mean E?"),
    (["--site", "XX"], "site 'XX' is not one of LP, LS"),
    (["--settings", "/nowhere/settings.json"], "settings file /nowhere/settings.json does not exist"),
    (["--night", "20260302"], f"for night(s) 20260302, camera(s) any, site any; night directories there: "
                              f"{NIGHT} (LPE LPS)"),
    (["--night", NIGHT, "--camera", "W"], f"cameras present for that night: {NIGHT} (LPE LPS)"),
    # a range is named by its ends, not night by night (an outside trial: ten nights joined by '+')
    (["--night", f"{NIGHT}..20260310", "--camera", "W"],
     f"for night(s) {NIGHT}..20260310 (10 nights), camera(s) W, site any; cameras present for those nights: "
     f"{NIGHT} (LPE LPS)"),
])
def test_a_mistake_is_refused_before_prefect_or_numpy_is_imported(two_cameras, args, words):
    res = subprocess.run([sys.executable, "-c", _PROBE, str(two_cameras), *args], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2, res.stderr
    assert words in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr  # one line, no traceback
    assert res.stdout.strip() == "imported:"  # nothing heavy was imported, let alone a server started
    assert not (two_cameras / "catalog.sqlite").exists()


@pytest.mark.parametrize("args", [["--keep-old", "0"], ["--keep-old", "-1"], ["--keep-old", "two"],
                                  ["--live", "--idle-timeout", "-5"], ["--live", "--poll", "0"],
                                  ["--live", "--grace", "nan"]])
def test_counts_and_durations_are_checked_as_arguments(two_cameras, args):
    """--keep-old 0 left a run holding the lease; --idle-timeout -5 ended a live run at once with "no
    science frame arrived" though every frame was there (a stranger's trial): command-line mistakes now."""
    res = subprocess.run([sys.executable, "-c", _PROBE, str(two_cameras), *args], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and f"argument {args[-2]}:" in res.stderr, res.stderr
    assert not (two_cameras / "catalog.sqlite").exists()


def test_missing_data_directory(tmp_path):
    res = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path / "nowhere")], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and f"data directory {tmp_path / 'nowhere'} does not exist" in res.stderr


def test_unknown_setting_is_refused(two_cameras, tmp_path):
    bad = tmp_path / "settings.json"
    bad.write_text('{"vmag_fast": 8.0, "apertures_px": [2, 3]}')
    res = subprocess.run([sys.executable, "-c", _PROBE, str(two_cameras), "--settings", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "unknown setting(s) apertures_px" in res.stderr


@pytest.mark.parametrize("settings, words", [
    ('{"gain": 0}', "gain=0: must be a number > 0"),
    ('{"gain": -1}', "gain=-1: must be a number > 0"),
    ('{"vmag_fast": "abc"}', "vmag_fast='abc': must be a number"),
    ('{"catalogue": "/nonexistent.fits"}', "catalogue='/nonexistent.fits': no such file"),
    ('{"sky_radii": [21, 6]}', "sky_radii=[21, 6]: must be [inner, outer] with 0 < inner < outer"),
    ('{"apertures": []}', "apertures=[]: must be a list of one or more numbers"),
    ('{"bin_order": 2}', "bin_order=2: must be 3 (cubic), 1 (bilinear) or 0 (nearest)"),
])
def test_a_bad_setting_value_is_refused_before_anything_moves(two_cameras, tmp_path, settings, words):
    """A stranger's trial: gain 0 moved the night's outputs aside, then failed deep in the photometry
    (exit 1); "abc" for a magnitude failed with a TypeError. Now a refusal (exit 2) naming the value."""
    bad = tmp_path / "settings.json"
    bad.write_text(settings)
    res = subprocess.run([sys.executable, "-c", _PROBE, str(two_cameras), "--settings", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and words in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (two_cameras / "catalog.sqlite").exists()


def test_the_flow_refuses_the_same_mistakes_first(two_cameras):
    """``reduce_night`` (deployment runs) calls the same checks before anything else."""
    from flows.reduce_night import reduce_night
    from mascara.selection import SelectionError

    with pytest.raises(SelectionError, match="not a real date"):
        reduce_night.fn(datadir=str(two_cameras), nights="20261399")
    with pytest.raises(SelectionError, match="camera 'e'"):
        reduce_night.fn(datadir=str(two_cameras), nights=NIGHT, cameras="e")
    assert not (two_cameras / "catalog.sqlite").exists()


@pytest.mark.parametrize("live", [False, True])
@pytest.mark.parametrize("db, words", [
    ("notaurl", "catalog URL 'notaurl' cannot be parsed"),
    ("mysql://x@y/z", "mysql is not supported; the catalog runs on SQLite or PostgreSQL"),
    ("postgresql+nodriver://u:secret@h/db", "no database driver for 'postgresql+nodriver'"),
    ("sqlite:///{tmp}/nowhere/cat.sqlite", "no directory {tmp}/nowhere for the SQLite file"),
])
def test_a_catalog_url_that_names_no_catalog_is_refused_and_nothing_is_made(two_cameras, tmp_path, db, words, live):
    """An outside trial: --db sqlite:////nonexistent/dir/cat.sqlite made that directory and a second, empty
    catalog there, whose run moved the night's reduction aside while the real catalog went on naming the moved
    files; a URL that could not be parsed gave a 33-line traceback after Prefect had started. Each is now one
    line, exit 2, before Prefect or numpy is imported, and nothing is created."""
    db, words = db.format(tmp=tmp_path), words.format(tmp=tmp_path)
    args = ["--night", NIGHT, "--camera", "E", "--db", db] + (["--site", "LP", "--live"] if live else [])
    res = subprocess.run([sys.executable, "-c", _PROBE, str(two_cameras), *args], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2, res.stderr
    assert words in res.stderr and "secret" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "prefect" not in res.stdout and "numpy" not in res.stdout, res.stdout
    assert not (tmp_path / "nowhere").exists()
    assert not (two_cameras / "catalog.sqlite").exists()


def test_a_catalog_server_that_does_not_answer_is_one_line_before_prefect_starts(two_cameras):
    """An outside trial: --db naming a PostgreSQL server that does not answer gave a traceback from the flow,
    after Prefect had started. It is one line, password hidden, exit 1, before Prefect is imported."""
    db = "postgresql+psycopg://nobody:secret@127.0.0.1:1/mascara"
    res = subprocess.run([sys.executable, "-c", _PROBE, str(two_cameras), "--night", NIGHT, "--camera", "E",
                          "--db", db], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith("mascprocess: the catalog postgresql+psycopg://nobody:***@127.0.0.1:1/mascara "
                                 "cannot be used: connection failed") and res.stderr.count("\n") == 1, res.stderr
    assert "prefect" not in res.stdout, res.stdout


def test_a_prefect_server_that_does_not_answer_is_one_line_with_what_to_do(two_cameras):
    """An outside trial: PREFECT_API_URL naming a server that was down gave a 117-line traceback, exit 1."""
    import os

    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:1/api"}
    res = subprocess.run([sys.executable, "-c", _PROBE, str(two_cameras), "--night", NIGHT, "--camera", "E"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith("mascprocess: the Prefect server at http://127.0.0.1:1/api does not answer ("), \
        res.stderr
    assert "--no-prefect" in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert not (two_cameras / "catalog.sqlite").exists()
