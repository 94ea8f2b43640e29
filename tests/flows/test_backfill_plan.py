"""What a backfill submits (issue 15), on SQLite and PostgreSQL, without a Prefect server.

A camera-night is up to date when its latest reduction succeeded under the
same fingerprint with its files in place; anything else is submitted.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from flowkit import BIN
from sqlalchemy import update
from sqlmodel import Session

from flows.backfill import plan_backfill
from mascara.catalog import connect
from mascara.catalog.models import Lease
from mascara.rawio import parse_night_dir
from mascara.reduce import plan_camera_night

pytestmark = pytest.mark.slow

NIGHTS = ("20260301", "20260302")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pristine-season")
    subprocess.run([str(BIN / "mascara"), "simulate", str(d), "--night", "+".join(NIGHTS), "--site", "LP",
                    "--camera", "E", "--size", "small", "--frames", "60", "--seed", "21"],
                   check=True, capture_output=True)
    return d


def _mascprocess(data: Path, db: str, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([str(BIN / "mascprocess"), str(data), "--site", "LP", "--camera", "E", "--db", db,
                          "--no-prefect", *args], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _states(entries) -> dict[str, str]:
    return {e.night_id: e.state for e in entries}


def test_only_what_changed_is_submitted(pristine, tmp_path, db_url):
    data = tmp_path / "data"
    shutil.copytree(pristine, data)
    _mascprocess(data, db_url, "--night", NIGHTS[0], "-q")
    rng = "20260301..20260303"

    plan = plan_backfill(data, rng, site="LP", db_url=db_url)
    assert _states(plan) == {"20260301LPE": "up-to-date", "20260302LPE": "submit", "20260303": "no-data"}
    done = next(e for e in plan if e.night_id == "20260301LPE")
    assert "same fingerprint" in done.reason and done.frames == 60
    # a submission says why (an outside trial: its reason column was empty)
    reason = {e.night_id: e.reason for e in plan}
    assert reason["20260302LPE"] == "never reduced"
    assert reason["20260303"] == "no night directory for this night"
    (data / "20260303lpe" / "raw").mkdir(parents=True)  # misnamed: said, as mascprocess says it (an outside trial)
    reason = {e.night_id: e.reason for e in plan_backfill(data, rng, site="LP", db_url=db_url)}
    assert reason["20260303"].startswith("no night directory for this night (ignored: 20260303lpe: not a night "
                                         "directory name"), reason["20260303"]
    (data / "20260303lpe" / "raw").rmdir()
    (data / "20260303lpe").rmdir()
    (data / "20260303LPE").mkdir()  # a night directory without raw/ (its frames archived): said, as mascprocess does
    reason = {e.night_id: e.reason for e in plan_backfill(data, rng, site="LP", db_url=db_url)}
    assert reason["20260303"] == "no night directory for this night (without raw/: 20260303LPE)", reason
    (data / "20260303LPE").rmdir()
    first_run = done.reason.split()[4]

    # asked to, or after a change of settings, it is submitted again
    forced = {e.night_id: e for e in plan_backfill(data, rng, site="LP", db_url=db_url, force=True)}
    assert forced["20260301LPE"].state == "submit" and forced["20260301LPE"].reason.startswith("--force: up to")
    changed = {e.night_id: e for e in plan_backfill(data, rng, site="LP", db_url=db_url,
                                                      settings={"vmag_slow": 9.5})}
    assert changed["20260301LPE"].state == "submit"
    # (vmag_slow also changes the stars taken from the catalogue)
    assert changed["20260301LPE"].reason == f"reduced by run {first_run} with other settings, catalogue"

    # a night file that is not what the catalog recorded: not up to date
    flc = data / "20260301LPE" / "lightcurves" / "fLC_20260301LPE.hdf5"
    saved, st = flc.read_bytes(), flc.stat()
    flc.write_bytes(saved + b"\0")
    entry = {e.night_id: e for e in plan_backfill(data, rng, site="LP", db_url=db_url)}["20260301LPE"]
    assert (entry.state, entry.reason) == ("submit", f"fLC of run {first_run} deleted or replaced since")
    flc.write_bytes(saved)
    # rewritten in place with the same size after it was recorded (another catalog's run, say): replaced
    later = st.st_mtime + 3600
    __import__("os").utime(flc, (later, later))
    assert _states(plan_backfill(data, rng, site="LP", db_url=db_url))["20260301LPE"] == "submit"
    __import__("os").utime(flc, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _states(plan_backfill(data, rng, site="LP", db_url=db_url))["20260301LPE"] == "up-to-date"

    # a reduction holding the camera-night's lease: in progress, not submitted twice
    with connect(db_url) as cat:
        cn = cat.find_camera_night(data / "20260302LPE")
        assert cn is None  # never reduced, and asking did not register it
        p = plan_camera_night(parse_night_dir(data / "20260302LPE"))
        cn = cat.register_camera_night("LP", "E", NIGHTS[1], data / "20260302LPE")
        run = cat.start_run(cn, fingerprint=p.fingerprint(), settings={}, versions={}, host="elsewhere",
                            lease_seconds=600)
        state = plan_backfill(data, rng, site="LP", db_url=db_url)
        forced = plan_backfill(data, rng, site="LP", db_url=db_url, force=True)
        cat.finish_run(run, "failed", error="test: released")
    assert _states(state)["20260302LPE"] == "in-progress"
    assert _states(forced)["20260302LPE"] == "in-progress"  # force redoes what is done, not what is going on
    # killed on this host (kill -9): recorded running, its process gone; submitted, and said so (an outside
    # trial read "its last run ... running" while status said the process was gone)
    dead = subprocess.Popen(["true"])
    dead.wait()
    with connect(db_url) as cat:
        run = cat.start_run(cn, fingerprint=p.fingerprint(), settings={}, versions={},
                            host=__import__("socket").gethostname(), pid=dead.pid, lease_seconds=600)
        cat.decide(run, "new", None, [])
        killed = {e.night_id: e for e in plan_backfill(data, rng, site="LP", db_url=db_url)}["20260302LPE"]
        cat.finish_run(run, "failed", error="test: released")
    assert (killed.state, killed.reason) == (
        "submit", f"its last run {run} is recorded running, but its process {dead.pid} is gone")

    # mascprocess --skip-done: the same rule from the command line, a range given
    res = _mascprocess(data, db_url, "--night", "20260301..20260302", "--skip-done")
    assert "20260301LPE: up to date" in res.stdout
    with connect(db_url) as cat:
        rows = {r["night"]: r for r in cat.night_status()}
        runs = cat.failed_runs()
    assert rows[NIGHTS[0]]["state"] == rows[NIGHTS[1]]["state"] == "succeeded"
    assert [r["error"] for r in runs] == ["test: released", "test: released"]
    assert _states(plan_backfill(data, rng, site="LP", db_url=db_url)) == {
        "20260301LPE": "up-to-date", "20260302LPE": "up-to-date", "20260303": "no-data"}
    # the same data directory through a symbolic link: the same camera-nights, up to date (it planned the
    # whole range again: the catalog holds the real paths and looked the linked ones up as given)
    link = tmp_path / "link"
    link.symlink_to(data)
    assert _states(plan_backfill(link, rng, site="LP", db_url=db_url)) == {
        "20260301LPE": "up-to-date", "20260302LPE": "up-to-date", "20260303": "no-data"}
    res = _mascprocess(link, db_url, "--night", "20260301..20260302", "--skip-done")
    assert "20260301LPE: up to date" in res.stdout and "20260302LPE: up to date" in res.stdout
    with connect(db_url) as cat:
        assert len(cat.night_status()) == 2  # no second camera-night for the linked path


def test_backfill_command_checks_its_arguments_before_anything(pristine, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(pristine, data)
    env_no_server = {k: v for k, v in __import__("os").environ.items() if not k.startswith("PREFECT_API")}
    bad = subprocess.run([str(BIN / "mascara"), "backfill", str(data), "--night", "20260302..20260301"],
                         capture_output=True, text=True, env=env_no_server)
    assert bad.returncode == 2 and "runs backwards" in bad.stderr
    noserver = subprocess.run([str(BIN / "mascara"), "backfill", str(data), "--night", "20260301..20260310"],
                              capture_output=True, text=True, env=env_no_server)
    assert noserver.returncode == 2 and "PREFECT_API_URL" in noserver.stderr
    dry = subprocess.run([str(BIN / "mascara"), "backfill", str(data), "--night", "20260301..20260310",
                          "--dry-run", "--json"], capture_output=True, text=True, env=env_no_server)
    assert dry.returncode == 0, dry.stderr
    rows = json.loads(dry.stdout)  # with --json, standard output is the JSON alone
    states = {r["camera_night"]: r["state"] for r in rows}
    assert states["20260301LPE"] == states["20260302LPE"] == "submit"
    assert sum(s == "no-data" for s in states.values()) == 8
    assert "would submit 2 camera-night(s)" in dry.stderr


def test_a_submitted_backfill_records_camera_nights_without_frames_as_empty(pristine, tmp_path, db_url):
    """Camera-nights with an empty raw/ found by a backfill are recorded ``empty`` once it is submitted (the
    season's counts missed them), never by the plan alone."""
    from flows.backfill import record_empty

    data = tmp_path / "data"
    shutil.copytree(pristine, data)
    (data / "20260301LPS" / "raw").mkdir(parents=True)
    entries = plan_backfill(data, "20260301", site="LP", db_url=db_url)
    assert _states(entries) == {"20260301LPE": "submit", "20260301LPS": "empty"}
    with connect(db_url) as cat:
        assert cat.night_status("20260301") == []  # planning changed nothing
    assert record_empty(entries, data, db_url) == 1
    with connect(db_url) as cat:
        (row,) = cat.night_status("20260301")
    assert (row["camera"], row["state"]) == ("LPS", "empty"), row


def test_a_flow_run_is_dead_for_the_backfill_only_when_the_catalog_says_so(db_url, tmp_path):
    """``dead_run``: what the catalog says of the run a flow run opened, for a flow run Prefect calls Running."""
    import os
    import socket
    import sys

    from flows.backfill import dead_run

    fp = {"code_version": "x", "settings_hash": "y", "catalogue_hash": "z", "raw_inventory_hash": "w"}
    night = tmp_path / "20260301LPE"
    night.mkdir()
    here = socket.gethostname()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert dead_run(db_url, night, "fr-0") is None  # a night the catalog never saw
    with connect(db_url) as cat:
        cn = cat.register_camera_night("LP", "E", "20260301", night)
        assert dead_run(db_url, night, "fr-0") is None  # not registered yet: it may be starting
        live = cat.start_run(cn, fp, {}, {}, host=here, flow_run_id="fr-live", pid=os.getpid(), lease_seconds=600)
        assert dead_run(db_url, night, "fr-live") is None
        cat.finish_run(live, "failed", error="test")
        assert "is failed" in dead_run(db_url, night, "fr-live")
        cat.start_run(cn, fp, {}, {}, host="elsewhere", flow_run_id="fr-far", pid=1, lease_seconds=600)
        assert dead_run(db_url, night, "fr-far") is None  # another host, a live lease: it may be working
        with Session(cat.engine) as s:  # its heartbeats stopped: the lease ran out
            s.execute(update(Lease).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
            s.commit()
        assert "holds no unexpired lease" in dead_run(db_url, night, "fr-far")
        cat.start_run(cn, fp, {}, {}, host=here, flow_run_id="fr-gone", pid=gone.pid, lease_seconds=600)
        assert f"process {gone.pid} on this host is gone" in dead_run(db_url, night, "fr-gone")
