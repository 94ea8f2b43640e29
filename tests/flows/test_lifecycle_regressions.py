"""The six reproductions of issue 9, each a plain regression test, on real processes.

Kills and failing filesystem calls are injected at named points
(``MASCARA_FAULT``, mascara/faults.py); the Prefect cases run the real flow
against the session's Prefect server, so its task retries are the real ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from diskkit import fill, mount_tmpfs, resize, unmount
from flowkit import (BIN, NIGHT, NIGHT_ID, assert_same_night_files, batch_rows, fresh_copy, mascprocess,
                     flow_run_state, mascprocess_cmd, night_status, running, runs, terminate)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "catalog"))
from lifecycle_checks import check_invariants, sha256, tree_digest  # noqa: E402


#: sha256 of an empty file.
EMPTY = hashlib.sha256(b"").hexdigest()


def _rows(datadir: Path, sql: str, *params) -> list[tuple]:  # type: ignore[no-untyped-def]
    with sqlite3.connect(f"file:{datadir / 'catalog.sqlite'}?mode=ro", uri=True) as db:
        return db.execute(sql, params).fetchall()


def _count_soon(datadir: Path, sql: str) -> int:
    """A count from a catalog that another process may still be creating (0 until its tables exist)."""
    try:
        return _rows(datadir, sql)[0][0] if (datadir / "catalog.sqlite").exists() else 0
    except sqlite3.OperationalError:
        return 0


def _check(datadir: Path) -> None:
    from mascara.catalog import connect

    finished = {r for (r,) in _rows(datadir, "SELECT id FROM reduction_run WHERE status = 'succeeded'")}
    with connect(datadir=datadir) as cat:
        check_invariants(cat, finished)


def test_interrupted_rerun_does_not_wedge_the_night(prefect_server, pristine_night, reference, tmp_path):
    """Issue 9, 1: reduce; re-run killed after its first batch file; the next plain run and -o succeed."""
    api, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    raw = tree_digest(datadir / NIGHT_ID / "raw")
    mascprocess(datadir, env, "-q")
    first_flc = sha256(datadir / NIGHT_ID / "lightcurves" / f"fLC_{NIGHT_ID}.hdf5")

    killed = mascprocess(datadir, {**env, "MASCARA_FAULT": "after_batch_file:kill"}, "-q", check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (datadir / NIGHT_ID / "lightcurves_old" / f"fLC_{NIGHT_ID}.hdf5").is_file()
    killed_flow_run = runs(datadir)[-1]["flow_run_id"]
    assert flow_run_state(api, killed_flow_run) == "RUNNING"  # nobody told Prefect

    again = mascprocess(datadir, env, "-q")  # no manual repair
    assert again.returncode == 0
    # the run that took the camera-night over ended the killed one in the catalog, and in Prefect too
    assert flow_run_state(api, killed_flow_run) == "CRASHED"
    assert night_status(datadir)["state"] == "succeeded"
    assert_same_night_files(datadir / NIGHT_ID, reference)
    # the first reduction is still where its rows say, with its checksum
    assert sha256(datadir / NIGHT_ID / "lightcurves_old" / f"fLC_{NIGHT_ID}.hdf5") == first_flc
    _check(datadir)

    mascprocess(datadir, {**env, "MASCARA_FAULT": "after_batch_file:kill"}, "-q", check=False)
    overwrite = mascprocess(datadir, env, "-q", "-o")  # -o starts afresh whatever the state
    assert overwrite.returncode == 0 and night_status(datadir)["decision"] == "erase"
    assert not (datadir / NIGHT_ID / "lightcurves_old").exists()
    assert_same_night_files(datadir / NIGHT_ID, reference)
    _check(datadir)
    assert tree_digest(datadir / NIGHT_ID / "raw") == raw


def test_a_failed_move_aside_is_retried_not_skipped(prefect_server, pristine_night, tmp_path):
    """Issue 9, 2: moving outputs aside fails once; Prefect retries the start task with the same run id."""
    _, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    mascprocess(datadir, env, "-q")
    old_flc = sha256(datadir / NIGHT_ID / "lightcurves" / f"fLC_{NIGHT_ID}.hdf5")
    (first_run,) = [r["id"] for r in runs(datadir)]

    mascprocess(datadir, {**env, "MASCARA_FAULT": "after_intent:oserror"}, "-q")
    second = [r for r in runs(datadir) if r["id"] != first_run]
    assert [(r["status"], r["decision"]) for r in second] == [("succeeded", "move")]
    assert sha256(datadir / NIGHT_ID / "lightcurves_old" / f"fLC_{NIGHT_ID}.hdf5") == old_flc
    moves = _rows(datadir, "SELECT src, dst, action, state FROM directory_move WHERE run_id = ?", second[0]["id"])
    assert sorted((Path(s).name, Path(d).name, a, st) for s, d, a, st in moves) == [
        ("astrometry", "astrometry_old", "renamed", "done"), ("lightcurves", "lightcurves_old", "renamed", "done"),
        ("quicklook", "quicklook_old", "renamed", "done"), ("work", "work_old", "renamed", "done")]
    old_rows = _rows(datadir, "SELECT path, sha256 FROM product WHERE run_id = ? AND kind = 'fLC'", first_run)
    assert old_rows == [(str(datadir / NIGHT_ID / "lightcurves_old" / f"fLC_{NIGHT_ID}.hdf5"), old_flc)]
    _check(datadir)


def test_a_second_rerun_records_the_erase_of_the_oldest_outputs(pristine_night, tmp_path, prefect_server):
    """Issue 9, 3: the _old that makes room is erased with a record and a warning; --keep-old 2 keeps it."""
    _, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    for _ in range(2):
        mascprocess(datadir, env, "--no-prefect", "-q")
    third = mascprocess(datadir, env, "--no-prefect", "-q")
    assert "erasing lightcurves_old (generation 1 of lightcurves makes room (keep_old=1))" in third.stderr
    assert third.stderr.count("erasing lightcurves_old") == 1, third.stderr  # said once (it was logged and printed)
    first = runs(datadir)[0]["id"]
    rows = _rows(datadir, "SELECT kind, erased_at, erased_by FROM product WHERE run_id = ?", first)
    assert rows and all(e is not None and by for _, e, by in rows)
    erases = _rows(datadir, "SELECT src, state FROM directory_move WHERE action = 'erased'")
    assert sorted(Path(s).name for s, _ in erases) == ["astrometry_old", "lightcurves_old", "quicklook_old",
                                                                "work_old"]
    # one live row per path
    live = _rows(datadir, "SELECT path, COUNT(*) FROM product WHERE erased_at IS NULL GROUP BY path")
    assert all(n == 1 for _, n in live)

    mascprocess(datadir, env, "--no-prefect", "-q", "--keep-old", "2")
    assert (datadir / NIGHT_ID / "lightcurves_old2").is_dir() and (datadir / NIGHT_ID / "lightcurves_old").is_dir()
    _check(datadir)

    # after -o, the README's provenance query lists only the run whose file is at that path now (issue 9, 6)
    from test_catalog_readme import readme_queries

    mascprocess(datadir, env, "--no-prefect", "-q", "-o")
    path = str(datadir / NIGHT_ID / "lightcurves" / f"fLC_{NIGHT_ID}.hdf5")
    sql = readme_queries()[3].replace("/data/20260301LPE/lightcurves/fLC_20260301LPE.hdf5", path)
    assert {r[0] for r in _rows(datadir, sql)} == {runs(datadir)[-1]["id"]}
    everyone = {r[0] for r in _rows(datadir, sql.replace("AND p.erased_at IS NULL", ""))}
    assert len(everyone) == 2  # the erased run at the same path, too
    _check(datadir)


def test_failed_reruns_in_a_row_keep_the_last_finished_reduction(pristine_night, tmp_path, prefect_server):
    """A stranger's trial: two re-runs under new settings, each dying after its first batch file (the
    trial's were settings the reduction refused). The first moves the finished reduction aside; the
    second used to erase that ``_old`` to make room for its predecessor's unfinished outputs, leaving
    no night files anywhere. Now the unfinished outputs are erased (recorded) and the finished
    reduction stays, checksum and catalog rows intact, until a run finishes."""
    _, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    night = datadir / NIGHT_ID
    mascprocess(datadir, env, "--no-prefect", "-q")
    first_flc = sha256(night / "lightcurves" / f"fLC_{NIGHT_ID}.hdf5")
    for i, vmag in enumerate((7.0, 6.5)):
        settings = tmp_path / f"settings{i}.json"
        settings.write_text(f'{{"vmag_fast": {vmag}, "vmag_slow": 8.0}}')
        killed = mascprocess(datadir, {**env, "MASCARA_FAULT": "after_batch_file:kill"}, "--no-prefect", "-q",
                             "--settings", str(settings), check=False)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        assert sha256(night / "lightcurves_old" / f"fLC_{NIGHT_ID}.hdf5") == first_flc
    assert not (night / "lightcurves").exists()
    erased = _rows(datadir, "SELECT src, reason FROM directory_move WHERE action = 'erased'")
    assert sorted(Path(s).name for s, _ in erased) == ["astrometry", "work"], erased
    assert all("never finished" in r for _, r in erased)
    first = runs(datadir)[0]["id"]
    assert not _rows(datadir, "SELECT path FROM product WHERE run_id = ? AND erased_at IS NOT NULL", first)
    _check(datadir)
    mascprocess(datadir, env, "--no-prefect", "-q")  # a run that finishes: new night files, the kept ones stay
    assert sha256(night / "lightcurves_old" / f"fLC_{NIGHT_ID}.hdf5") == first_flc
    assert (night / "lightcurves" / f"fLC_{NIGHT_ID}.hdf5").is_file()
    _check(datadir)


def test_a_run_killed_after_writing_its_night_files_does_not_push_the_last_finished_one_out(
        pristine_night, tmp_path, prefect_server):
    """Stop 32's trial on the Prefect path: a changed-settings run killed after writing both night files but
    before recording them. The next run (the defaults again) counted those files as a finished reduction:
    it erased ``lightcurves_old``, the last recorded reduction, and moved the unrecorded files into its
    place, where no product row names them. A run the catalog saw fail never finished, whatever it left
    on disk: its outputs are erased (recorded, naming the run) and the recorded reduction stays."""
    _, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    night = datadir / NIGHT_ID
    flc = Path("lightcurves") / f"fLC_{NIGHT_ID}.hdf5"
    old_flc = Path("lightcurves_old") / f"fLC_{NIGHT_ID}.hdf5"
    mascprocess(datadir, env, "--no-prefect", "-q")
    first_flc = sha256(night / flc)
    settings = tmp_path / "settings.json"
    settings.write_text('{"vmag_fast": 7.0, "vmag_slow": 8.0}')
    killed = mascprocess(datadir, {**env, "MASCARA_FAULT": "after_slc:kill"}, "--no-prefect", "-q",
                         "--settings", str(settings), check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (night / "lightcurves" / f"sLC_{NIGHT_ID}.hdf5").is_file()  # both written, neither recorded
    assert sha256(night / old_flc) == first_flc
    first, dead = (r["id"] for r in runs(datadir))
    assert not _rows(datadir, "SELECT path FROM product WHERE run_id = ?", dead)
    _check(datadir)

    mascprocess(datadir, env, "--no-prefect", "-q")  # the defaults again: not a resume, a move
    assert sha256(night / old_flc) == first_flc
    assert _rows(datadir, "SELECT run_id FROM product WHERE path = ? AND erased_at IS NULL",
                 str(night / old_flc)) == [(first,)]
    erased = _rows(datadir, "SELECT src, reason FROM directory_move WHERE action = 'erased'")
    assert {"lightcurves", "work"} <= {Path(s).name for s, _ in erased}, erased
    assert all(Path(s).parent == night and dead in r and "never finished" in r for s, r in erased), erased
    assert runs(datadir)[-1]["status"] == "succeeded"
    assert not list(night.glob("*_old2"))
    _check(datadir)


def test_a_night_file_removed_by_hand_does_not_make_a_finished_reduction_look_unfinished(
        pristine_night, tmp_path, prefect_server):
    """An outside trial: two reductions, then the fLC of the second removed by hand. The next run (with
    --skip-done, which sees the file gone) erased the second run's sLC, work and batch files as "a reduction
    that never finished". Its run succeeded: they are moved aside like any finished reduction."""
    _, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    night = datadir / NIGHT_ID
    slc_name = f"sLC_{NIGHT_ID}.hdf5"
    mascprocess(datadir, env, "--no-prefect", "-q")
    mascprocess(datadir, env, "--no-prefect", "-q")  # a second generation: the first goes to _old
    second = runs(datadir)[-1]["id"]
    slc = sha256(night / "lightcurves" / slc_name)
    (night / "lightcurves" / f"fLC_{NIGHT_ID}.hdf5").unlink()
    mascprocess(datadir, env, "--no-prefect", "-q", "--skip-done")
    assert runs(datadir)[-1]["status"] == "succeeded"
    assert sha256(night / "lightcurves_old" / slc_name) == slc
    assert list((night / "work_old" / "batches").glob("*.h5"))
    assert _rows(datadir, "SELECT run_id FROM product WHERE path = ? AND erased_at IS NULL",
                 str(night / "lightcurves_old" / slc_name)) == [(second,)]
    erased = _rows(datadir, "SELECT src, reason FROM directory_move WHERE action = 'erased'")
    assert erased and not [r for _, r in erased if "never finished" in r], erased
    _check(datadir)


def test_a_data_directory_reached_through_a_link_keeps_the_catalog_true(pristine_night, tmp_path, prefect_server):
    """An outside trial: a night reduced through its real path, then through a symbolic link to the data
    directory. The move aside was recorded under the link's name, so the first run's product rows (under the
    real name) were not rewritten: they named the new reduction's files, the first fLC in lightcurves_old had
    no row, and status blamed the wrong run. Every path a run records is now the real one."""
    _, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data").resolve()
    link = tmp_path / "datalink"
    link.symlink_to(datadir)
    night = datadir / NIGHT_ID
    flc = f"fLC_{NIGHT_ID}.hdf5"
    mascprocess(datadir, env, "--no-prefect", "-q")
    first_flc = sha256(night / "lightcurves" / flc)
    mascprocess(link, env, "-q")  # the Prefect flow (the library driver resolved the data directory already)
    first, second = (r["id"] for r in runs(datadir))
    assert sha256(night / "lightcurves_old" / flc) == first_flc
    live = dict(_rows(datadir, "SELECT path, run_id FROM product WHERE kind = 'fLC' AND erased_at IS NULL"))
    assert live == {str(night / "lightcurves_old" / flc): first, str(night / "lightcurves" / flc): second}
    recorded = [p for (p,) in _rows(datadir, "SELECT path FROM product UNION SELECT src FROM directory_move "
                                             "UNION SELECT path FROM batch WHERE path IS NOT NULL")]
    assert recorded and all(p.startswith(str(datadir) + "/") for p in recorded), recorded
    status = subprocess.run([str(BIN / "mascara"), "status", str(link), "--night", NIGHT], env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "gone or replaced" not in status.stdout + status.stderr, status.stdout
    _check(datadir)


def test_a_flow_refused_by_a_live_run_of_its_catalog_says_so_in_one_line(pristine_night, tmp_path, prefect_server):
    """An outside trial: a second run of the same camera-night through the Prefect flow, while the first
    reduced it. The flow takes the night directory's lock before its start task meets the lease, so it said
    the lock was held by a run "whose lease this run took over; going on without the lock" (false), then
    failed on the lease with a 12-line traceback. It is refused by the lease first, in one line."""
    _, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    with running(mascprocess_cmd(datadir, "--no-prefect", "-q"), env={**env, "MASCARA_FAULT": "after_begin:hang"}
                 ) as proc:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _count_soon(
                datadir, "SELECT COUNT(*) FROM reduction_run WHERE phase = 'reducing'") == 0:
            time.sleep(0.1)
        assert proc.poll() is None
        holder = runs(datadir)[0]["id"]
        second = mascprocess(datadir, env, "-q", check=False, timeout=300)
        assert second.returncode == 1, second.stderr[-3000:]
        err = second.stderr
        assert f"is being reduced by run {holder}" in err, err[-3000:]
        assert "took over" not in err and "Traceback" not in err, err[-3000:]
        assert runs(datadir)[0]["status"] == "running" and len(runs(datadir)) == 1  # nothing recorded or taken
        proc.kill()  # (signals are held while a run opens, where it hangs)
        proc.communicate()
    _check(datadir)
    again = mascprocess(datadir, env, "-q")  # the killed holder is taken over at once
    assert again.returncode == 0 and runs(datadir)[-1]["status"] == "succeeded", again.stderr[-3000:]


def test_two_flows_of_one_camera_night_started_at_once_refuse_the_second_in_one_line(pristine_night, tmp_path,
                                                                                   prefect_server):
    """Stop 33's "left alone": a flow takes the night directory's lock before its start task registers the run.
    A second flow of the camera-night started in between found no lease and a lock of its own catalog, said the
    holder was a run "whose lease this run took over; going on without the lock" (false), and failed later on
    the lease. It is refused at the lock in one line, and records nothing: a refusal's run would take the lease
    from under the run that is starting."""
    from mascara.nightlock import lock_path

    _, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    lock = lock_path(datadir / NIGHT_ID)
    with running(mascprocess_cmd(datadir, "-q"), env={**env, "MASCARA_FAULT": "after_flow_lock:hang"}) as first:
        deadline = time.monotonic() + 180
        holder: dict = {}
        while time.monotonic() < deadline and not holder.get("run_id"):
            with contextlib.suppress(OSError, ValueError):
                holder = json.loads(lock.read_text() or "{}")
            time.sleep(0.1)
        assert first.poll() is None and holder.get("pid") == first.pid, holder
        second = mascprocess(datadir, env, "-q", check=False, timeout=300)
        assert second.returncode == 1, second.stderr[-3000:]
        err = second.stderr
        assert f"is being reduced by run {holder['run_id']}" in err and "that is starting" in err, err[-3000:]
        assert "took over" not in err and "Traceback" not in err, err[-3000:]
        assert runs(datadir) == []  # nothing recorded: no refusal's run, no lease taken
        first.kill()
        first.communicate()
    again = mascprocess(datadir, env, "-q")  # the killed flow's lock went with its process
    assert again.returncode == 0 and [r["status"] for r in runs(datadir)] == ["succeeded"], again.stderr[-3000:]
    _check(datadir)


def test_a_run_of_another_catalog_between_two_runs_is_judged_from_disk(pristine_night, tmp_path, prefect_server):
    """A review of the catalog-status rule: catalog X reduces the night; a run of catalog Y, under other
    settings, moves X's reduction aside and is killed after its first batch file. X's next run must not
    take Y's unfinished outputs for X's succeeded run (X ties outputs to a run only by what it recorded
    there): they are erased and X's reduction stays in lightcurves_old, as with unfinished outputs of no
    run of X. (Taken for X's, they pushed X's reduction out and no night files were left.)"""
    _, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    night = datadir / NIGHT_ID
    x, y = (f"sqlite:///{tmp_path / name}.sqlite" for name in ("x", "y"))
    mascprocess(datadir, env, "--no-prefect", "-q", "--db", x)
    first_flc = sha256(night / "lightcurves" / f"fLC_{NIGHT_ID}.hdf5")
    settings = tmp_path / "settings.json"
    settings.write_text('{"vmag_fast": 7.0, "vmag_slow": 8.0}')
    killed = mascprocess(datadir, {**env, "MASCARA_FAULT": "after_batch_file:kill"}, "--no-prefect", "-q",
                         "--db", y, "--settings", str(settings), check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sha256(night / "lightcurves_old" / f"fLC_{NIGHT_ID}.hdf5") == first_flc
    mascprocess(datadir, env, "--no-prefect", "-q", "--db", x, "--settings", str(settings))
    assert sha256(night / "lightcurves_old" / f"fLC_{NIGHT_ID}.hdf5") == first_flc
    assert (night / "lightcurves" / f"fLC_{NIGHT_ID}.hdf5").is_file()
    # X's catalog follows its first reduction to where Y's run moved it (it recorded it erased, in _old)
    from mascara.catalog import connect
    from mascara.catalog.lifecycle import product_in_place

    with connect(x) as cat:
        live = [p for p in cat.live_products() if p["kind"] == "fLC"]
    where = sorted(Path(p["path"]).parent.name for p in live)
    assert where == ["lightcurves", "lightcurves_old"] and all(product_in_place(p) for p in live), live


def test_two_data_directories_with_the_same_night(db_url, pristine_night, tmp_path):
    """Issue 9, 4: one catalog, the same night in two data directories: two camera-nights, two leases."""
    from flows import _runs
    from mascara.catalog import connect
    from mascara.rawio import parse_night_dir
    from mascara.reduce import plan_camera_night

    a = fresh_copy(pristine_night, tmp_path / "a") / NIGHT_ID
    b = fresh_copy(pristine_night, tmp_path / "b") / NIGHT_ID
    holder = _runs.open_run(db_url, plan_camera_night(a))  # a live run on a (this process)
    other = _runs.open_run(db_url, plan_camera_night(b))  # not refused: another camera-night
    assert holder.camera_night_id != other.camera_night_id
    _runs.catalog(db_url).finish_run(holder.run_id, "failed", error="test")
    _runs.catalog(db_url).finish_run(other.run_id, "failed", error="test")
    for d in (a, b):
        _runs.drive_camera_night(db_url, parse_night_dir(d), split_in_background=False)
    with connect(db_url) as cat:
        rows = [r for r in cat.night_status(NIGHT) if r["camera"] == "LPE"]
    assert sorted((r["night_dir"], r["state"], r["flc_path"]) for r in rows) == [
        (str(d), "succeeded", str(d / "lightcurves" / f"fLC_{NIGHT_ID}.hdf5")) for d in sorted((a, b))]
    _runs.catalog(db_url).close()
    _runs.catalog.cache_clear()


def _group_alive(pgid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if os.getpgid(int(p.name)) == pgid:
                    out.append(int(p.name))
            except ProcessLookupError:
                pass
    return out


def _servers_of(pid: int) -> list[int]:
    """Temporary Prefect servers that ``mascprocess`` ``pid`` started (in a session of their own)."""
    out = []
    for p in Path("/proc").iterdir():
        try:
            args = (p / "cmdline").read_bytes().split(b"\0") if p.name.isdigit() else []
        except OSError:
            continue
        if b"prefect.server.api.server:create_app" in args and str(pid).encode() in args:
            out.append(int(p.name))
    return out


@pytest.mark.prefect
@pytest.mark.parametrize("to_group", [False, True], ids=["to-process", "to-group"])
def test_sigterm_stops_the_temporary_server_and_records_the_interruption(pristine_night, tmp_path, prefect_server,
                                                                         to_group):
    """Issue 9, 5: SIGTERM to mascprocess in ephemeral mode: exit 143, no orphan server, run 'interrupted'.

    Also to the whole process group, as a terminal's Ctrl-C, ``timeout`` or ``systemctl stop`` do: the
    temporary server once shared the group, died first, and the flow crashed (exit 1 after a minute)."""
    _, env = prefect_server
    env = {k: v for k, v in env.items() if k not in ("PREFECT_API_URL",)}  # a temporary server of its own
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    cmd = [str(BIN / "mascprocess"), str(datadir), "--night", NIGHT, "--camera", "E", "--site", "LP", "-q"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 240:  # until a batch is under way (the temporary server took 20-60 s)
        if _count_soon(datadir, "SELECT COUNT(*) FROM batch WHERE status IN ('running', 'succeeded')"):
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    [server] = _servers_of(proc.pid)
    if to_group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    time.sleep(2)
    assert _group_alive(proc.pid) == [], "processes of mascprocess outlived it"
    assert _servers_of(proc.pid) == [] and not Path(f"/proc/{server}").exists(), "the temporary server outlived it"
    (run,) = runs(datadir)
    assert run["status"] == "failed" and run["error"] == "interrupted (SIGTERM)"
    assert "interrupted by SIGTERM" in err
    mascprocess(datadir, prefect_server[1], "--no-prefect", "-q")  # and it resumes
    assert night_status(datadir)["decision"] == "resume"


def test_sighup_is_handled_like_sigint(pristine_night, tmp_path, prefect_server):
    _, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    cmd = [str(BIN / "mascprocess"), str(datadir), "--night", NIGHT, "--camera", "E", "--site", "LP", "-q",
           "--no-prefect"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not _count_soon(datadir, "SELECT COUNT(*) FROM reduction_run WHERE phase = 'reducing'"):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGHUP, err[-3000:]
    assert [(r["status"], r["error"]) for r in runs(datadir)] == [("failed", "interrupted (SIGHUP)")]


@pytest.mark.parametrize("fault,signame", [("after_begin:sighup", "SIGHUP"), ("mid_move:sigterm", "SIGTERM"),
                                           ("after_register:sigint", "SIGINT")])
def test_a_signal_while_the_run_opens_is_recorded_and_the_night_resumes(fault, signame, pristine_night, reference,
                                                                         tmp_path, prefect_server):
    """A signal at a named point of the opening (lease taken, outputs being moved aside, batches
    registered but no handle returned yet) ends the run recorded as interrupted, the lease released,
    exit code 128+N; the next plain run finishes the night, equal to an uninterrupted reduction."""
    _, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    if fault.startswith("mid_move"):  # something to move aside: a finished reduction first
        mascprocess(datadir, env, "--no-prefect", "-q")
    raw = tree_digest(datadir / NIGHT_ID / "raw")
    res = mascprocess(datadir, {**env, "MASCARA_FAULT": fault}, "--no-prefect", "-q", check=False)
    assert res.returncode == 128 + signal.Signals[signame], res.stderr[-3000:]
    assert f"interrupted by {signame}" in res.stderr
    latest = runs(datadir)[-1]
    assert (latest["status"], latest["error"]) == ("failed", f"interrupted ({signame})")
    assert _rows(datadir, "SELECT COUNT(*) FROM lease") == [(0,)]
    _check(datadir)

    again = mascprocess(datadir, env, "--no-prefect", "-q")  # at once: no lease to wait out
    assert again.returncode == 0, again.stderr[-3000:]
    assert night_status(datadir)["state"] == "succeeded"
    assert_same_night_files(datadir / NIGHT_ID, reference)
    _check(datadir)
    assert tree_digest(datadir / NIGHT_ID / "raw") == raw


def test_a_signal_while_the_flow_opens_the_run_is_recorded(pristine_night, reference, tmp_path, prefect_server):
    """The Prefect flow, SIGTERM while its start task is opening the run (no handle returned yet): the
    flow ends the run it was opening, found by the flow run's id, as interrupted; the next run resumes."""
    _, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    res = mascprocess(datadir, {**env, "MASCARA_FAULT": "after_begin:sigterm"}, "-q", check=False)
    assert res.returncode == 128 + signal.SIGTERM, res.stderr[-3000:]
    (run,) = runs(datadir)
    assert (run["status"], run["error"], run["phase"]) == ("failed", "interrupted (SIGTERM)", "reducing")
    assert run["flow_run_id"]
    assert _rows(datadir, "SELECT COUNT(*) FROM lease") == [(0,)]
    _check(datadir)
    assert mascprocess(datadir, env, "-q").returncode == 0
    assert night_status(datadir)["state"] == "succeeded"
    assert_same_night_files(datadir / NIGHT_ID, reference)


def test_status_and_failed_runs_say_why(pristine_night, tmp_path, prefect_server):
    """Issue 9, 6: a combine that fails has no failed batch; status and failed_runs still say why."""
    _, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    res = mascprocess(datadir, {**env, "MASCARA_FAULT": "combine_before_flc:oserror"}, "--no-prefect", "-q",
                      check=False)
    assert res.returncode == 1 and "InjectedOSError" in res.stderr
    table = subprocess.run([str(BIN / "mascara"), "status", str(datadir)], env=env, capture_output=True,
                           text=True, check=True).stdout
    line = next(row for row in table.splitlines() if "LPE" in row and "│" in row)
    assert "failed" in line and "3/3" in line
    assert "20260301 LPE: failed while combining: InjectedOSError" in table
    from mascara.catalog import connect

    with connect(datadir=datadir) as cat:
        (row,) = cat.failed_runs(since_days=7)
    assert (row["phase"], row["batches_failed"], row["is_latest"]) == ("combining", 0, 1)
    assert "injected failure" in row["error"]
    shutil.rmtree(datadir)


def test_a_stalled_run_that_lost_its_lease_stops_and_the_takeover_stands(db_url, pristine_night, reference,
                                                                         tmp_path, prefect_server):
    """Two runs of one camera-night over one catalog (SQLite and PostgreSQL): run A freezes after its
    first batch file (SIGSTOP, heartbeat thread included) past its lease; run B takes the night over and
    finishes it; A, woken up, is refused by the catalog at its next write and exits without recording
    anything, and the night is exactly the uninterrupted reduction, recorded as B's."""
    from mascara.catalog import connect

    _, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    env = {**env, "MASCARA_DB_URL": db_url, "MASCARA_LEASE_SECONDS": "3"}
    cmd = [str(BIN / "mascprocess"), str(datadir), "--night", NIGHT, "--camera", "E", "--site", "LP",
           "--no-prefect", "-q"]
    a = subprocess.Popen(cmd, env={**env, "MASCARA_FAULT": "after_batch_file:stop"}, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while True:  # wait until A has frozen itself
            state = Path(f"/proc/{a.pid}/stat").read_text().split()[2]
            if state == "T":
                break
            assert a.poll() is None and time.monotonic() < deadline, a.communicate()
            time.sleep(0.1)
        time.sleep(3.5)  # A's lease runs out: no heartbeat from a stopped process
        b = mascprocess(datadir, env, "--no-prefect", "-q")
        assert b.returncode == 0
    finally:
        os.kill(a.pid, signal.SIGCONT)
    out, err = a.communicate(timeout=300)
    assert a.returncode not in (0, None), out + err
    assert "no longer holds the lease" in err, err[-3000:]

    with connect(db_url) as cat:
        rows = cat.night_status(NIGHT)
        [status] = [r for r in rows if r["camera"] == "LPE"]
        assert status["state"] == "succeeded" and status["decision"] == "resume"
        runs_ = cat.failed_runs(NIGHT)
        assert len(runs_) == 1 and "taken over by run " + status["last_run_id"] in runs_[0]["error"], runs_
        products = cat.live_products()
        assert {p["run_id"] for p in products} == {status["last_run_id"]}
        for p in products:
            assert sha256(Path(p["path"])) == p["sha256"]
        check_invariants(cat, {status["last_run_id"]})
    assert_same_night_files(datadir / NIGHT_ID, reference)


@pytest.mark.parametrize("a_driver,b_driver", [("--no-prefect", "--no-prefect"), ("--no-prefect", "prefect"),
                                               ("prefect", "--no-prefect")])
def test_a_second_catalog_on_the_same_data_directory_is_refused_while_a_run_holds_the_night(
        a_driver, b_driver, pristine_night, reference, tmp_path, prefect_server):
    """Two catalogs (``--db`` differing between two shells) on one data directory: while run A of catalog A
    reduces the night, a run of catalog B is refused before it moves or erases anything, with the holder
    named, and the refusal is recorded in B; once A's process is gone (killed), B reduces the night. Either
    run may be the library driver or the Prefect flow (whose own process holds the lock for its tasks)."""
    from mascara.catalog import connect

    _, env = prefect_server
    drivers = {"--no-prefect": ["--no-prefect"], "prefect": []}
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    night = datadir / NIGHT_ID
    url_a, url_b = f"sqlite:///{tmp_path / 'a.sqlite'}", f"sqlite:///{tmp_path / 'b.sqlite'}"
    cmd = [str(BIN / "mascprocess"), str(datadir), "--night", NIGHT, "--camera", "E", "--site", "LP", "-q"]
    a = subprocess.Popen([*cmd, *drivers[a_driver], "--db", url_a], env={**env, "MASCARA_FAULT": "after_batch_file:hang"},
                         text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (night / "work" / "batches").is_dir() or not any((night / "work" / "batches").iterdir()):
            assert a.poll() is None and time.monotonic() < deadline, a.communicate()
            time.sleep(0.2)
        time.sleep(1.0)  # A hangs after its first batch file
        before = tree_digest(night)
        [(run_a,)] = [(r,) for (r,) in sqlite3.connect(tmp_path / "a.sqlite").execute(
            "SELECT id FROM reduction_run WHERE status = 'running'")]

        b = subprocess.run([*cmd, *drivers[b_driver], "--db", url_b], env=env, capture_output=True, text=True,
                           timeout=600)
        assert b.returncode == 1, b.stderr[-3000:]
        assert f"is being reduced by run {run_a} of catalog {url_a}" in b.stderr, b.stderr[-3000:]
        assert f"(pid {a.pid} on host" in b.stderr
        # B moved, erased and wrote nothing (a Prefect A goes on writing its other batches meanwhile)
        assert not [p.name for p in night.iterdir() if "_old" in p.name or p.name.startswith(".mascara-erasing")]
        if a_driver == "--no-prefect":
            assert tree_digest(night) == before
        assert not sqlite3.connect(tmp_path / "b.sqlite").execute("SELECT * FROM directory_move").fetchall()
        with connect(url_b) as cat:
            [failed] = cat.failed_runs(NIGHT)
            assert failed["error"].startswith("refused: ") and run_a in failed["error"], failed
            assert cat.night_status(NIGHT)[0]["state"] == "failed"
    finally:
        os.killpg(a.pid, signal.SIGKILL)  # with its temporary Prefect server, if it has one
        a.communicate(timeout=60)

    again = subprocess.run([*cmd, *drivers[b_driver], "--db", url_b], env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_night_files(night, reference)
    assert (night / "work_old").is_dir()  # A's unfinished work was moved aside, not lost
    with connect(url_b) as cat:
        assert cat.night_status(NIGHT)[0]["state"] == "succeeded"


@pytest.mark.parametrize("fault", ["after_intent:oserror", "after_begin:oserror"])
def test_a_library_run_that_fails_to_open_is_recorded_not_left_running(fault, pristine_night, reference, tmp_path,
                                                                     prefect_server):
    """``mascprocess --no-prefect`` (and the live driver) do not retry: a run that fails after it was
    registered, while it decides, moves aside or registers its batches, is recorded as failed with the
    error, not left ``running`` until the next run finds its process gone (an outside trial found a live
    restart's CatalogConflict recorded nowhere). The next run finishes what it left and succeeds."""
    _, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    res = mascprocess(datadir, {**env, "MASCARA_FAULT": fault}, "--no-prefect", "-q", check=False)
    assert res.returncode == 1 and "InjectedOSError" in res.stderr, res.stderr[-3000:]
    [run] = runs(datadir)
    assert run["status"] == "failed" and run["error"].startswith("InjectedOSError"), run
    assert not _rows(datadir, "SELECT * FROM lease")
    assert mascprocess(datadir, env, "--no-prefect", "-q").returncode == 0
    assert night_status(datadir)["state"] == "succeeded"
    assert_same_night_files(datadir / NIGHT_ID, reference)
    _check(datadir)


def _edit_in_place(frame: Path) -> None:
    """A trail of +400 ADU across 40 rows of a raw frame, written into the file itself (same size)."""
    import numpy as np
    from astropy.io import fits

    size = frame.stat().st_size
    with fits.open(frame, mode="update", do_not_scale_image_data=True) as hdul:
        data = hdul[0].data
        band = data[data.shape[0] // 3: data.shape[0] // 3 + 40]
        band[:] = np.minimum(band.astype(np.int64) + 400, np.iinfo(data.dtype).max).astype(data.dtype)
    assert frame.stat().st_size == size


def test_a_raw_frame_edited_in_place_is_reduced_again_not_resumed_from_its_old_content(pristine_night, reference,
                                                                                      tmp_path, prefect_server):
    """An outside trial (stranger 5): a run is killed before its night files; a raw frame is then edited
    in place (same size, as a header fix or a transfer again does); the next run resumed with the batch
    reduced from the old content, because the fingerprint knew the raw files by name and size only. It is
    now a new reduction (the raw files' modification times are part of it): the killed run's outputs go
    aside, and the night files equal an uninterrupted reduction of the edited night."""
    _, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    killed = mascprocess(datadir, {**env, "MASCARA_FAULT": "combine_before_flc:kill"}, "--no-prefect", "-q",
                         check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert {b["status"] for b in batch_rows(datadir).values()} == {"succeeded"}
    frames = sorted((datadir / NIGHT_ID / "raw").glob(f"*{NIGHT_ID[8:]}.fits"))
    frame = frames[len(frames) // 2]
    _edit_in_place(frame)

    edited = fresh_copy(pristine_night, tmp_path / "edited")
    _edit_in_place(edited / NIGHT_ID / "raw" / frame.name)
    mascprocess(edited, env, "--no-prefect", "-q")

    again = mascprocess(datadir, env, "--no-prefect", "-q")
    assert again.returncode == 0
    assert_same_night_files(datadir / NIGHT_ID, edited / NIGHT_ID)
    status = night_status(datadir)
    assert status["state"] == "succeeded" and status["decision"] != "resume", status
    with pytest.raises(AssertionError, match="datasets differ"):  # the edit shows in the light curves
        assert_same_night_files(datadir / NIGHT_ID, reference)
    assert (datadir / NIGHT_ID / "work_old" / "batches").is_dir()  # the killed run's batches, set aside
    _check(datadir)


def _tmpfs_for(pristine: Path, tmp_path: Path, spare: int) -> tuple[Path, int]:
    """A tmpfs with room for a copy of ``pristine`` and ``spare`` bytes more (skips where mounting is refused)."""
    used = sum(-(-p.stat().st_size // 4096) * 4096 for p in pristine.rglob("*") if p.is_file())
    return mount_tmpfs(tmp_path / "disk", used + spare), used


def test_a_disk_that_fills_up_during_a_reduction_is_named_recorded_and_the_night_resumes(pristine_night, reference,
                                                                                        tmp_path, prefect_server):
    """An outside trial reduced a night on a disk with 8 MB to spare (the catalog elsewhere): the run failed
    with h5py's words about a hidden temporary file. Now the error names the file that was not written and
    the full device, the catalog records it, nothing half-written or temporary stays, raw/ is untouched,
    and once there is room the same command resumes to the night files of an uninterrupted reduction."""
    _, env = prefect_server
    disk, used = _tmpfs_for(pristine_night, tmp_path, 8 << 20)
    try:
        datadir = fresh_copy(pristine_night, disk / "data")
        raw = tree_digest(datadir / NIGHT_ID / "raw")
        db = tmp_path / "catalog.sqlite"
        res = mascprocess(datadir, env, "--no-prefect", "-q", "--db", f"sqlite:///{db}", check=False)
        assert res.returncode == 1, res.stderr[-3000:]
        # whichever write meets the full device first: ENOSPC, or a short write (numpy's, at the split) with
        # the device full; both say the file and the full device
        full = re.compile(r"not written: (No space left on device|short write on a full device)")
        assert full.search(res.stderr), res.stderr[-3000:]
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            [(status, error)] = con.execute("SELECT status, error FROM reduction_run").fetchall()
        assert status == "failed" and full.search(error), error
        assert not [p for p in (datadir / NIGHT_ID).rglob(".*.tmp")]  # no temporary file left behind
        assert not (datadir / NIGHT_ID / "lightcurves" / f"fLC_{NIGHT_ID}.hdf5").exists()
        assert tree_digest(datadir / NIGHT_ID / "raw") == raw

        resize(disk, used + (64 << 20))
        again = mascprocess(datadir, env, "--no-prefect", "-q", "--db", f"sqlite:///{db}")
        assert again.returncode == 0
        assert_same_night_files(datadir / NIGHT_ID, reference)
        assert tree_digest(datadir / NIGHT_ID / "raw") == raw
    finally:
        unmount(disk)


def test_a_catalog_on_a_full_disk_is_named_and_the_night_reduces_once_there_is_room(pristine_night, reference,
                                                                                   tmp_path, prefect_server):
    """The trial's disk was full before the run: ``mascprocess --no-prefect`` said only
    ``failed: OperationalError: (sqlite3.OperationalError) database or disk is full``."""
    _, env = prefect_server
    disk, used = _tmpfs_for(pristine_night, tmp_path, 1 << 20)
    try:
        datadir = fresh_copy(pristine_night, disk / "data")
        filler = fill(disk)
        res = mascprocess(datadir, env, "--no-prefect", "-q", check=False)
        assert res.returncode == 1
        assert f"the catalog sqlite:///{datadir}/catalog.sqlite cannot be used: database or disk is full" in res.stderr, \
            res.stderr[-3000:]
        filler.unlink()
        resize(disk, used + (64 << 20))
        assert mascprocess(datadir, env, "--no-prefect", "-q").returncode == 0
        assert_same_night_files(datadir / NIGHT_ID, reference)
    finally:
        unmount(disk)


@pytest.mark.parametrize("driver", ["--no-prefect", "prefect"])
def test_a_lease_held_on_another_host_refuses_the_night_as_locked(driver, db_url, pristine_night, tmp_path,
                                                                  prefect_server):
    """A shared catalog (SQLite and PostgreSQL) whose camera-night is held by a run on another host: the
    directory lock of this host cannot see it (flock is per host), so the catalog's lease refuses the run.
    The night is reported locked (not failed with an error of its own), nothing on disk changes, and once
    the lease is released the night reduces."""
    from flows._runs import catalog, open_run

    from mascara.catalog import connect
    from mascara.reduce import plan_camera_night

    _, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    night = datadir / NIGHT_ID
    url = db_url
    held = open_run(url, plan_camera_night(night), host="observatory-b", pid=4242, take_lock=False)
    before = tree_digest(night)
    cmd = [str(BIN / "mascprocess"), str(datadir), "--night", NIGHT, "--camera", "E", "--site", "LP", "-q",
           "--db", url, *(["--no-prefect"] if driver == "--no-prefect" else [])]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stderr[-3000:]
    assert f"run {held.run_id}" in res.stderr and "observatory-b" in res.stderr, res.stderr[-3000:]
    if driver == "prefect":
        assert f"{NIGHT_ID} locked:" in res.stderr, res.stderr[-3000:]
        assert "retry" not in res.stderr  # a held lease is not a transient failure
    # nothing moved, erased or written; the flow's process took the directory's lock before its start task
    # met the lease, and the lock file stays, emptied (mascara/nightlock.py)
    after = tree_digest(night)
    assert after.pop(".mascara.lock", EMPTY) == EMPTY and after == before
    with connect(url) as cat:  # the holder's run is untouched
        info = cat.run_info(held.run_id)
        assert (info.status, info.host, info.live) == ("running", "observatory-b", True)

    catalog(url).finish_run(held.run_id, "failed", error="released by the test")
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]


def test_a_copy_of_the_frames_kept_as_raw_old_survives_reductions_reruns_and_overwrite(pristine_night, tmp_path,
                                                                                       prefect_server):
    """An outside trial: a ``raw_old/`` beside ``raw/`` (a user's earlier copy of frames, named as the
    lifecycle names generations) was erased by the first reduction as "generation 1 of raw". It is raw
    data: a first reduction, a re-run (outputs moved aside) and ``-o`` (outputs erased) leave it as it was,
    and no move or erase of it is recorded."""
    _, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    night = datadir / NIGHT_ID
    for name in ("raw_old", "raw_old2"):
        (night / name).mkdir()
        for f in sorted((night / "raw").iterdir())[:3]:
            shutil.copy2(f, night / name / f.name)
    kept = {n: tree_digest(night / n) for n in ("raw", "raw_old", "raw_old2")}
    for args in ([], [], ["-o"]):
        mascprocess(datadir, env, "--no-prefect", "-q", *args)
        assert {n: tree_digest(night / n) for n in kept} == kept, args
    moved = _rows(datadir, "SELECT src, dst, action FROM directory_move")
    assert moved and not [m for m in moved if "raw" in Path(m[0]).name], moved
    assert {Path(m[0]).name for m in moved if m[2] == "renamed"} >= {"lightcurves", "work"}


def _next_run_removes_the_bins_and_finishes(datadir: Path, env: dict, reference: Path, raw: dict[str, str]) -> None:
    """A plain library run after a run that left erase bins: it removes them and finishes the night as an
    uninterrupted reduction would, raw/ untouched."""
    night = datadir / NIGHT_ID
    again = mascprocess(datadir, env, "--no-prefect", "-q")
    assert again.returncode == 0, again.stderr[-3000:]
    assert not list(night.glob(".mascara-erasing-*"))
    assert night_status(datadir)["state"] == "succeeded"
    assert_same_night_files(night, reference)
    _check(datadir)
    assert tree_digest(night / "raw") == raw


def test_a_long_erase_does_not_hold_off_a_signal(pristine_night, reference, tmp_path, prefect_server):
    """The library driver holds signals while a run opens (nothing half-decided may be left unrecorded), but
    removing erased outputs, which takes as long as the outputs are large, comes after the hold: a SIGTERM
    during a removal that does not end (``removing_bins:hang``) stops the run at once, recorded as
    interrupted, with the erased directory out of view in its bin; the next run removes the bin and
    finishes the night. (With the removal inside the hold, the signal waited for the hang.)"""
    _, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    night = datadir / NIGHT_ID
    mascprocess(datadir, env, "--no-prefect", "-q")
    raw = tree_digest(night / "raw")
    with running(mascprocess_cmd(datadir, "--no-prefect", "-q", "-o"),
                 env={**env, "MASCARA_FAULT": "removing_bins:hang"}) as proc:
        # the run is past its opening (phase 'reducing', recorded before the hold is released) and its
        # bin is there: it is in the hang, not in the hold
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and not (
                list(night.glob(".mascara-erasing-*"))
                and _count_soon(datadir, "SELECT COUNT(*) FROM reduction_run WHERE status = 'running' "
                                         "AND phase = 'reducing'") == 1):
            time.sleep(0.05)
        assert list(night.glob(".mascara-erasing-*")), "no erase bin appeared"
        time.sleep(0.5)  # into the hang
        assert proc.poll() is None
        t0 = time.monotonic()
        err = terminate(proc)
        waited = time.monotonic() - t0
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert waited < 30, waited
    latest = runs(datadir)[-1]
    assert (latest["status"], latest["error"], latest["decision"]) == ("failed", "interrupted (SIGTERM)", "erase")
    assert _rows(datadir, "SELECT COUNT(*) FROM lease") == [(0,)]
    # the erase is done and recorded; what it erased is out of view, in its bin, until the next run
    assert not (night / "lightcurves").exists() and not (night / "work").exists()
    assert list(night.glob(".mascara-erasing-*"))
    _check(datadir)

    _next_run_removes_the_bins_and_finishes(datadir, env, reference, raw)


def test_an_erased_reduction_that_cannot_be_removed_fails_the_run_and_the_next_run_removes_it(
        pristine_night, reference, tmp_path, prefect_server):
    """A bin that cannot be removed (``removing_bins:oserror``) must not leave a night finished with an
    erased reduction hidden on disk, which ``--skip-done`` would never revisit: the run fails, naming the
    bin; the next plain run removes it and finishes the night."""
    _, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    night = datadir / NIGHT_ID
    mascprocess(datadir, env, "--no-prefect", "-q")
    raw = tree_digest(night / "raw")
    res = mascprocess(datadir, {**env, "MASCARA_FAULT": "removing_bins:oserror"}, "--no-prefect", "-q", "-o",
                      check=False)
    assert res.returncode == 1, res.stderr[-3000:]
    (bin_,) = night.glob(".mascara-erasing-*")
    latest = runs(datadir)[-1]
    assert (latest["status"], latest["decision"]) == ("failed", "erase")
    assert "could not remove what an erase left" in latest["error"] and str(bin_) in latest["error"], latest["error"]
    assert _rows(datadir, "SELECT COUNT(*) FROM lease") == [(0,)]
    _check(datadir)

    _next_run_removes_the_bins_and_finishes(datadir, env, reference, raw)


def test_no_run_moves_the_night_aside_while_a_finishing_run_draws_its_figures(pristine_night, reference, tmp_path,
                                                                              prefect_server):
    """A run draws its quick-look figures before it records its end, which releases the lease and the night
    directory's lock: while the figures are drawn (``drawing_quicklook:hang``) an ``-o`` of the same night is
    refused and moves nothing; the drawing run, stopped there by SIGTERM, is recorded as interrupted, and the
    next run ends the night from the outputs already written, figures included. (When the figures came after
    the end, the ``-o`` went ahead and moved the night aside under the drawing run.)"""
    _, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    night = datadir / NIGHT_ID
    raw = tree_digest(night / "raw")
    slc = night / "lightcurves" / f"sLC_{NIGHT_ID}.hdf5"
    with running(mascprocess_cmd(datadir, "--no-prefect", "-q"),
                 env={**env, "MASCARA_FAULT": "drawing_quicklook:hang"}) as proc:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and not slc.is_file():
            time.sleep(0.1)
        assert slc.is_file(), "the night files were never written"
        time.sleep(1.0)  # past the combine's renames, into the hang
        assert proc.poll() is None
        written = {p: sha256(night / "lightcurves" / p) for p in (f"fLC_{NIGHT_ID}.hdf5", slc.name)}

        other = mascprocess(datadir, env, "--no-prefect", "-q", "-o", check=False, timeout=120)
        assert other.returncode == 1, (other.returncode, other.stderr[-3000:])
        assert "being reduced" in other.stderr or "held" in other.stderr, other.stderr[-3000:]
        assert _rows(datadir, "SELECT COUNT(*) FROM directory_move") == [(0,)]
        assert {p: sha256(night / "lightcurves" / p) for p in written} == written
        assert not [p for p in night.iterdir() if p.name.endswith("_old") or p.name.startswith(".mascara-erasing")]

        err = terminate(proc)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    first = runs(datadir)[0]
    assert (first["status"], first["error"], first["phase"]) == ("failed", "interrupted (SIGTERM)", "combining")
    _check(datadir)

    again = mascprocess(datadir, env, "--no-prefect", "-q")
    assert again.returncode == 0, again.stderr[-3000:]
    assert night_status(datadir)["state"] == "succeeded"
    assert runs(datadir)[-1]["decision"] == "resume"
    assert_same_night_files(night, reference)
    assert sorted((night / "quicklook").glob("*.png")), "no quick-look figure was drawn"
    assert _rows(datadir, "SELECT COUNT(*) FROM directory_move") == [(0,)]
    _check(datadir)
    assert tree_digest(night / "raw") == raw
