"""Catalog operations on SQLite and PostgreSQL: registration, leases, batches, views."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlmodel import Session

from catalog_rows import VERSIONS, fill_realistic, fingerprint, reduce_fake
from mascara.catalog import CatalogConflict, LeaseHeld, LeaseLost, connect, fingerprint_key
from mascara.catalog.models import Batch, Camera, CameraNight, DirectoryMove, Frame, Lease, PackageVersion, Product, ReductionRun


def count(cat, model, *where) -> int:  # type: ignore[no-untyped-def]
    with Session(cat.engine) as s:
        return s.execute(select(func.count()).select_from(model).where(*where)).scalar_one()


def test_connect_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MASCARA_DB_URL", raising=False)
    with connect(datadir=tmp_path / "d") as cat:
        assert cat.engine.url.database == str((tmp_path / "d" / "catalog.sqlite").resolve())
    env = tmp_path / "env.sqlite"
    monkeypatch.setenv("MASCARA_DB_URL", f"sqlite:///{env}")
    with connect(datadir=tmp_path / "d") as cat:
        assert cat.engine.url.database == str(env)
    explicit = tmp_path / "explicit.sqlite"
    with connect(f"sqlite:///{explicit}", datadir=tmp_path / "d") as cat:
        assert cat.engine.url.database == str(explicit)
        with cat.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 60000


def test_registration_is_idempotent(catalog):
    a = catalog.register_camera_night("LP", "E", "20260301", "/data/20260301LPE")
    b = catalog.register_camera_night("LP", "LPE", "20260301", "/data/20260301LPE")
    c = catalog.register_camera_night("LP", "S", "20260301", "/data/20260301LPS")
    assert a == b != c
    assert count(catalog, CameraNight) == 2 and count(catalog, Camera) == 2
    # the same night and camera in another data directory is another camera-night (issue 9)
    d = catalog.register_camera_night("LP", "E", "20260301", "/mnt/new/20260301LPE")
    assert d not in (a, c) and count(catalog, CameraNight) == 3
    assert {r["night_dir"] for r in catalog.night_status("20260301") if r["camera"] == "LPE"} == {
        "/data/20260301LPE", "/mnt/new/20260301LPE"}
    assert {r["datadir"] for r in catalog.night_status("20260301")} == {"/data", "/mnt/new"}

    run = catalog.start_run(a, fingerprint(), {"batch_size": 50}, VERSIONS, "h1")
    rows = [(i, 50 * i, 50 * i + 49, 50) for i in range(100, 110)]
    catalog.register_batches(run, rows)
    catalog.batch_started(run, 100)
    catalog.batch_succeeded(run, 100, "/tmp/b100.h5", "f" * 64, {"read": 1.0}, 0.2, 150, False)
    catalog.register_batches(run, rows)  # again, e.g. after a crash: nothing changes
    assert count(catalog, Batch) == 10
    assert count(catalog, Batch, Batch.status == "succeeded") == 1
    with pytest.raises(CatalogConflict, match="batch 101"):
        catalog.register_batches(run, [(101, 5050, 5098, 49)])
    # a live run: a done batch whose frames grew is registered again as pending, to be reduced again
    catalog.register_batches(run, [(100, 5000, 5049, 50)], grown=True)  # unchanged: keeps its status
    assert count(catalog, Batch, Batch.status == "succeeded") == 1
    with pytest.raises(CatalogConflict, match="batch 100"):
        catalog.register_batches(run, [(100, 5000, 5049, 51)])
    catalog.register_batches(run, [(100, 4999, 5049, 51)], grown=True)
    with Session(catalog.engine) as s:
        b = s.execute(select(Batch).where(Batch.batch_index == 100)).scalar_one()
        assert (b.status, b.lstseq_min, b.frames_present, b.sha256, b.path) == ("pending", 4999, 51, None, None)

    frames = [(5000 + i, f"{5000 + i:08d}LPE.fits", 100, "ok", None) for i in range(20)]
    catalog.record_frames(a, frames)
    frames[3] = (5003, "00005003LPE.fits", 100, "rejected", "unreadable")
    catalog.record_frames(a, frames)
    assert count(catalog, Frame) == 20 and count(catalog, Frame, Frame.status == "rejected") == 1
    p1 = catalog.record_product(run, "fLC", "/x/fLC_20260301LPE.hdf5", "1" * 64, 10, 5)
    p2 = catalog.record_product(run, "fLC", "/x/fLC_20260301LPE.hdf5", "2" * 64, 11, 5)
    assert p1 == p2 and count(catalog, Product) == 1
    catalog.record_move(a, run, "/x/lightcurves", "/x/lightcurves_old", "renamed", "rerun")
    catalog.record_move(a, run, "/x/lightcurves", "/x/lightcurves_old", "renamed", "rerun")  # nothing left under src
    with Session(catalog.engine) as s:
        assert s.execute(select(Product.path)).scalars().all() == ["/x/fLC_20260301LPE.hdf5"]  # not under src
    with pytest.raises(ValueError):
        catalog.record_move(a, run, "/x/lightcurves", None, "renamed")
    with pytest.raises(ValueError):
        catalog.record_product(run, "movie", "/x/m.mp4", "0" * 64, 1)


def test_a_data_directory_reached_through_a_symbolic_link_is_the_same_camera_night(catalog, tmp_path):
    """The backfill planned a whole season again through a linked data directory: the catalog held the real
    path and looked up the linked one. A camera-night is found, and registered once, under either name; a row
    registered under the linked name (before paths were resolved) is found through the real one too."""
    real = tmp_path / "real"
    (real / "20260301LPE").mkdir(parents=True)
    (real / "20260302LPE").mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    a = catalog.register_camera_night("LP", "E", "20260301", real / "20260301LPE")
    assert catalog.find_camera_night(link / "20260301LPE") == a
    assert catalog.register_camera_night("LP", "E", "20260301", link / "20260301LPE") == a
    assert count(catalog, CameraNight) == 1
    (row,) = catalog.night_status("20260301")
    assert row["night_dir"] == str(real / "20260301LPE")
    # a row an older mascara registered under the linked name: found under both names, never registered twice
    with Session(catalog.engine) as s:
        s.add(CameraNight(id="cn-old", camera_id="LPE", night="20260302", night_dir=str(link / "20260302LPE"),
                          datadir=str(link), registered_at=s.get(CameraNight, a).registered_at))
        s.commit()
    assert catalog.find_camera_night(real / "20260302LPE") == "cn-old"
    assert catalog.find_camera_night(link / "20260302LPE") == "cn-old"
    assert catalog.register_camera_night("LP", "E", "20260302", real / "20260302LPE") == "cn-old"
    assert count(catalog, CameraNight) == 2
    assert catalog.find_camera_night(tmp_path / "elsewhere" / "20260301LPE") is None


def test_status_vocabulary_is_enforced(catalog):
    cn = catalog.register_camera_night("LP", "E", "20260301", "/d")
    run = catalog.start_run(cn, fingerprint(), {}, {}, "h")
    catalog.register_batches(run, [(7, 350, 399, 50)])
    with pytest.raises(Exception, match="(?i)check"):
        with catalog.engine.begin() as c:
            c.execute(Batch.__table__.update().values(status="done"))
    with pytest.raises(ValueError):
        catalog.finish_run(run, "done")


def test_provenance_is_stored(catalog):
    cn = catalog.register_camera_night("LS", "C", "20260215", "/d")
    settings = {"apertures": [2.5, 4.5], "gain": 0.62, "catalogue": None}
    run = catalog.start_run(cn, fingerprint("s9"), settings, VERSIONS, "h", flow_run_id="f-1")
    assert catalog.run_versions(run) == VERSIONS
    with Session(catalog.engine) as s:
        row = s.get(ReductionRun, run)
        assert row.settings == settings and row.settings_hash == fingerprint("s9")["settings_hash"]
    assert count(catalog, PackageVersion) == len(VERSIONS)
    info = catalog.last_run(cn)
    assert info.fingerprint == fingerprint("s9") and info.fingerprint_key == fingerprint_key(fingerprint("s9"))
    assert info.status == "running" and info.live and info.flow_run_id == "f-1"


def test_lease_refused_then_released(catalog):
    cn = catalog.register_camera_night("LP", "E", "20260301", "/d")
    assert catalog.last_run(cn) is None
    run = catalog.start_run(cn, fingerprint(), {}, VERSIONS, "station-pc")
    with pytest.raises(LeaseHeld, match=r"LPE night 20260301 .* on host station-pc since") as err:
        catalog.start_run(cn, fingerprint(), {}, VERSIONS, "laptop")
    assert err.value.run_id == run and err.value.host == "station-pc"
    assert count(catalog, ReductionRun) == 1  # the refused run left no trace
    catalog.heartbeat(run)
    catalog.finish_run(run, "succeeded")
    assert count(catalog, Lease) == 0
    with pytest.raises(LeaseLost):
        catalog.heartbeat(run)
    # a write after the run's own end (a batch a signal's end overtook) says so, not that a run took over
    with pytest.raises(LeaseLost, match=r"has ended \(succeeded\): what it finished after its end is not recorded"):
        catalog.set_phase(run, "combining")
    # nor the frames of such a batch: an interrupted night counted them as reduced (an outside trial)
    with pytest.raises(LeaseLost, match="has ended"):
        catalog.batch_succeeded(run, 10, "/t/b10.h5", "a" * 64, frame_rows=[(500, "00000500LPE.fits", 10, "ok", None)])
    assert count(catalog, Frame) == 0
    run2 = catalog.start_run(cn, fingerprint(), {}, VERSIONS, "laptop")
    assert catalog.last_run(cn).run_id == run2 != run


def test_expired_lease_is_taken_over(catalog):
    cn = catalog.register_camera_night("LP", "E", "20260301", "/d")
    dead = catalog.start_run(cn, fingerprint(), {}, VERSIONS, "crashed-host", lease_seconds=0.5)
    catalog.register_batches(dead, [(7, 350, 399, 50), (8, 400, 449, 50)])
    catalog.batch_started(dead, 7)
    catalog.batch_succeeded(dead, 7, "/t/b7.h5", "7" * 64, {}, 0.2, 100, False)
    catalog.batch_started(dead, 8)  # the process dies during batch 8
    with pytest.raises(LeaseHeld):
        catalog.start_run(cn, fingerprint(), {}, VERSIONS, "new-host")
    time.sleep(0.7)
    assert not catalog.last_run(cn).live
    new = catalog.start_run(cn, fingerprint(), {}, VERSIONS, "new-host")
    with Session(catalog.engine) as s:
        old = s.get(ReductionRun, dead)
        assert old.status == "failed" and "taken over by run " + new in old.error
    with pytest.raises(LeaseLost):
        catalog.heartbeat(dead)
    # the resumed run sees the batch the dead run finished, and redoes batch 8
    assert catalog.done_batches(cn, fingerprint()) == {7: ("/t/b7.h5", "7" * 64)}
    catalog.register_batches(new, [(7, 350, 399, 50), (8, 400, 449, 50)])
    catalog.batch_started(new, 8)
    catalog.batch_succeeded(new, 8, "/t/b8.h5", "8" * 64, {}, 0.2, 100, False)
    with Session(catalog.engine) as s:
        b8 = s.execute(select(Batch).where(Batch.batch_index == 8)).scalar_one()
        assert (b8.tries, b8.run_id, b8.status) == (2, new, "succeeded")
    assert set(catalog.done_batches(cn, fingerprint())) == {7, 8}
    assert catalog.done_batches(cn, fingerprint("other settings")) == {}


def test_a_run_that_lost_its_lease_cannot_write(catalog):
    """A run stalled past its lease (a suspended process, a network partition) while a run on another
    host took the camera-night over: when it wakes up, every write about its reduction is refused
    (batches, phase, decision, products), its "abandoned" record stays, and the new run's stands."""
    cn = catalog.register_camera_night("LP", "E", "20260301", "/d")
    rows = [(7, 350, 399, 50), (8, 400, 449, 50)]
    zombie = catalog.start_run(cn, fingerprint(), {}, VERSIONS, "station-a", lease_seconds=0.5)
    catalog.decide(zombie, "new", None, [])
    catalog.begin_reducing(zombie, rows, fresh=True)
    catalog.batch_started(zombie, 7)
    time.sleep(0.7)  # station-a stalls; its lease runs out
    taker = catalog.start_run(cn, fingerprint(), {}, VERSIONS, "station-b")
    catalog.decide(taker, "resume", zombie, [])
    catalog.begin_reducing(taker, rows, fresh=False)
    catalog.batch_started(taker, 7)
    catalog.batch_succeeded(taker, 7, "/b/b7.h5", "b" * 64, {}, 0.2, 100, False)

    for write in (lambda: catalog.batch_succeeded(zombie, 7, "/a/b7.h5", "a" * 64, {}, 0.2, 100, False),
                  lambda: catalog.batch_started(zombie, 8),
                  lambda: catalog.batch_failed(zombie, 8, "late"),
                  lambda: catalog.set_phase(zombie, "combining"),
                  lambda: catalog.decide(zombie, "new", None, []),
                  lambda: catalog.begin_reducing(zombie, rows, fresh=True),
                  lambda: catalog.finish_run(zombie, "succeeded", products=[
                      {"kind": "fLC", "path": "/d/lightcurves/fLC.h5", "sha256": "a" * 64, "size": 1}])):
        with pytest.raises(LeaseLost, match="another run took over"):
            write()
    catalog.finish_run(zombie, "failed", error="LeaseLost")  # its own end: the takeover's record stays
    with Session(catalog.engine) as s:
        z = s.get(ReductionRun, zombie)
        assert z.status == "failed" and "taken over by run " + taker in z.error
        b7 = s.execute(select(Batch).where(Batch.batch_index == 7)).scalar_one()
        assert (b7.run_id, b7.path, b7.status) == (taker, "/b/b7.h5", "succeeded")
    assert count(catalog, Product) == 0 and catalog.last_run(cn).run_id == taker
    catalog.finish_run(taker, "succeeded", products=[
        {"kind": "fLC", "path": "/d/lightcurves/fLC.h5", "sha256": "b" * 64, "size": 2}])
    catalog.finish_run(taker, "succeeded")  # a retried finish changes nothing
    assert [(p["run_id"], p["sha256"]) for p in catalog.live_products(cn)] == [(taker, "b" * 64)]


def test_catalog_pickles_by_url(catalog):
    cn = catalog.register_camera_night("LP", "E", "20260301", "/d")
    clone = pickle.loads(pickle.dumps(catalog))
    try:
        assert clone.engine.url == catalog.engine.url and clone.night_status()[0]["camera_night_id"] == cn
    finally:
        clone.close()


def test_flow_run_id_gives_the_same_run(catalog):
    cn = catalog.register_camera_night("LP", "E", "20260301", "/d")
    a = catalog.start_run(cn, fingerprint(), {}, VERSIONS, "h", flow_run_id="prefect-123")
    b = catalog.start_run(cn, fingerprint(), {}, VERSIONS, "h", flow_run_id="prefect-123")  # flow retry
    assert a == b and count(catalog, ReductionRun) == 1


def test_views_count_the_latest_run(catalog):
    ids = fill_realistic(catalog)
    rows = {r["camera"]: r for r in catalog.night_status("20260301")}
    assert set(rows) == {"LPE", "LPS", "LPW"}
    e, s, w = rows["LPE"], rows["LPS"], rows["LPW"]
    assert (e["state"], e["batches_done"], e["batches_total"], e["batches_failed"]) == ("succeeded", 12, 12, 0)
    assert (e["frames_ok"], e["frames_rejected"], e["products"]) == (597, 3, 2)
    assert e["last_run_id"] == ids["e_run"] and e["flc_path"].endswith("fLC_20260301LPE.hdf5")
    assert (s["state"], s["batches_done"], s["batches_total"], s["batches_failed"]) == ("failed", 8, 10, 2)
    assert (w["state"], w["batches_total"], w["last_run_id"]) == ("pending", 0, None)
    assert len(catalog.night_status()) == 4
    assert [r["camera"] for r in catalog.night_status("20260215+20260301")] == ["LSC", "LPE", "LPS", "LPW"]

    failed = catalog.failed_batches()
    assert [(f["camera"], f["tries"]) for f in failed] == [("LSC", 3), ("LSC", 3), ("LPS", 3), ("LPS", 3)]
    recent = catalog.failed_batches(since_days=7)
    assert {f["camera"] for f in recent} == {"LPS"} and all(0 <= f["age_days"] < 0.1 for f in recent)
    assert all(19.9 < f["age_days"] < 20.1 for f in catalog.failed_batches(night="20260215"))


def test_finish_marks_stuck_batches_failed(catalog):
    cn, run = reduce_fake(catalog, "LP", "N", "20260302", nbatches=3, finish=None)
    idx = next(iter(catalog.done_batches(cn, fingerprint())))
    catalog.batch_started(run, idx)
    catalog.finish_run(run, "failed", "KeyboardInterrupt")
    row = catalog.failed_batches("20260302")[0]
    assert row["batch_index"] == idx and "run ended" in row["error"]
    assert catalog.last_run(cn).error == "KeyboardInterrupt"


def test_moves_rewrite_product_paths(catalog):
    cn, old = reduce_fake(catalog, "LP", "E", "20260301", nbatches=2, settings_hash="s0")
    base = "/data/20260301LPE"
    catalog.record_move(cn, None, f"{base}/lightcurves/", f"{base}/lightcurves_old", "renamed", "settings changed")
    catalog.record_move(cn, None, f"{base}/lightcurves", f"{base}/lightcurves_old", "renamed", "settings changed")
    catalog.record_move(cn, None, f"{base}/tmp", f"{base}/tmp_old", "renamed", "settings changed")
    with Session(catalog.engine) as s:
        paths = sorted(s.execute(select(Product.path)).scalars())
        assert paths == [f"{base}/lightcurves_old/fLC_20260301LPE.hdf5", f"{base}/lightcurves_old/sLC_20260301LPE.hdf5"]
    assert all(p.startswith(f"{base}/tmp_old/batch_") for p, _ in catalog.done_batches(cn, fingerprint("s0")).values())
    _, new = reduce_fake(catalog, "LP", "E", "20260301", nbatches=2)
    catalog.record_move(cn, new, f"{base}/lightcurves", None, "erased", "-o given")
    with Session(catalog.engine) as s:
        rows = {p.path: (p.run_id, p.erased_at is not None) for p in s.execute(select(Product)).scalars()}
    assert rows[f"{base}/lightcurves/fLC_20260301LPE.hdf5"] == (new, True)
    assert rows[f"{base}/lightcurves_old/fLC_20260301LPE.hdf5"] == (old, False)
    assert count(catalog, DirectoryMove) == 4  # the lightcurves move was recorded twice; only the first moved rows


def test_status_takes_night_ranges(catalog):
    for night in ("20260228", "20260301", "20260302", "20260305"):
        catalog.register_camera_night("LP", "E", night, f"/d/{night}LPE")
    assert sorted(r["night"] for r in catalog.night_status("20260301..20260304")) == ["20260301", "20260302"]
    assert sorted(r["night"] for r in catalog.night_status("20260228..20260301+20260305")) == [
        "20260228", "20260301", "20260305"]


def test_running_runs_of_a_process(catalog):
    """The runs a process started and has not ended: what a signal handler ends before the process exits."""
    a = catalog.register_camera_night("LP", "E", "20260301", "/data/20260301LPE")
    b = catalog.register_camera_night("LP", "S", "20260301", "/data/20260301LPS")
    c = catalog.register_camera_night("LP", "W", "20260301", "/data/20260301LPW")
    ra = catalog.start_run(a, fingerprint(), {}, VERSIONS, "station", pid=4711)
    rb = catalog.start_run(b, fingerprint(), {}, VERSIONS, "station", pid=4711)
    catalog.start_run(c, fingerprint(), {}, VERSIONS, "station", pid=4712)  # another process
    assert sorted(catalog.running_runs_of("station", 4711)) == sorted([ra, rb])
    assert catalog.running_runs_of("laptop", 4711) == []
    catalog.finish_run(ra, "failed", error="interrupted (SIGTERM)")
    assert catalog.running_runs_of("station", 4711) == [rb]


def test_frames_that_left_raw_are_marked_gone_and_no_longer_counted(catalog):
    """A file replaced by its .fits.gz (or archived) stops counting as an accepted frame; its row stays."""
    cn = catalog.register_camera_night("LP", "E", "20260301", "/data/20260301LPE")
    catalog.record_intake(cn, None, frames_present=3, slots_expected=3, frames_missing=0)
    catalog.record_frames(cn, [(100, "00000100LPE.fits", 10, "ok", None),
                               (101, "00000101LPE.fits", 10, "ok", None),
                               (102, "00000102LPE.fits", 10, "rejected", "truncated file"),
                               (None, "darks_0001.fits", 10, "ok", None)])
    ns = next(r for r in catalog.night_status("20260301") if r["camera_night_id"] == cn)
    assert (ns["frames_ok"], ns["frames_rejected"]) == (2, 1)
    present = {"00000100LPE.fits", "00000101LPE.fits.gz", "darks_0001.fits"}
    assert catalog.mark_gone_frames(cn, present) == ["00000101LPE.fits", "00000102LPE.fits"]
    catalog.record_frames(cn, [(101, "00000101LPE.fits.gz", 9, "ok", None)])
    ns = next(r for r in catalog.night_status("20260301") if r["camera_night_id"] == cn)
    assert (ns["frames_ok"], ns["frames_rejected"]) == (2, 0)
    with Session(catalog.engine) as s:
        rows = {f.filename: (f.status, f.reason) for f in s.execute(select(Frame)).scalars()}
    assert rows["00000101LPE.fits"][0] == "gone" and rows["00000101LPE.fits"][1].endswith("(was ok)")
    assert rows["00000102LPE.fits"][0] == "gone" and "(was rejected: truncated file)" in rows["00000102LPE.fits"][1]
    assert rows["00000100LPE.fits"] == ("ok", None) and rows["darks_0001.fits"] == ("ok", None)
    assert catalog.mark_gone_frames(cn, present) == []  # marked once
    # a file that comes back is recorded again by the reduction that reads it
    catalog.record_frames(cn, [(102, "00000102LPE.fits", 10, "ok", None)])
    ns = next(r for r in catalog.night_status("20260301") if r["camera_night_id"] == cn)
    assert ns["frames_ok"] == 3


def test_a_sqlite_catalog_locked_for_the_whole_busy_timeout_fails_at_once_with_a_clear_error(tmp_path,
                                                                                              monkeypatch):
    """An outside trial stopped a run (SIGSTOP) inside a catalog write: the next run waited SQLite's busy
    timeout five times (five minutes, SIGTERM held meanwhile) before "database is locked". A lock held for the
    whole busy timeout is not retried: one wait, then an error naming the catalog and the likely cause."""
    import sqlite3
    import time

    from mascara.catalog import _engine
    from mascara.catalog.catalog import CatalogLocked, connect

    monkeypatch.setattr(_engine, "SQLITE_BUSY_TIMEOUT", 1.0)
    path = tmp_path / "catalog.sqlite"
    with connect(f"sqlite:///{path}") as cat:
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process's write, stopped half-way
        try:
            t0 = time.monotonic()
            with pytest.raises(CatalogLocked) as got:
                cat.register_camera_night("LP", "E", "20260301", "/d/20260301LPE")
            waited = time.monotonic() - t0
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert 0.9 <= waited < 2.5, waited  # one busy wait, not five
        assert f"the catalog sqlite:///{path.resolve()} stayed locked by another process for 1 s" in str(got.value)
        cat.register_camera_night("LP", "E", "20260301", "/d/20260301LPE")  # free again: works


def test_a_run_records_the_exact_code_it_ran_not_only_the_release(catalog, tmp_path):
    """An outside trial: every run of 344 commits recorded code version 0.1.0, so the catalog could not say
    which code reduced a file. The release stays the fingerprint's code version; the provenance of every run
    also names the digest of the mascara and flows sources it ran and, in a git checkout, the commit."""
    import shutil
    import subprocess
    import sys

    from mascara.catalog import lifecycle

    repo = Path(lifecycle.__file__).resolve().parents[2]
    versions = lifecycle.versions()
    revision = versions[lifecycle.REVISION_KEY]
    digest = lifecycle.source_digest([repo / "mascara", repo / "flows"])
    assert revision.startswith(f"source {digest}"), revision
    if (repo / ".git").exists():
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        assert f"; git {head}" in revision, revision
    cn = catalog.register_camera_night("LP", "E", "20260301", "/d")
    run = catalog.start_run(cn, fingerprint("s1"), {}, versions, "h")
    assert catalog.run_versions(run)[lifecycle.REVISION_KEY] == revision

    # the digest follows the files, not where they are: a copy elsewhere (no git) has it, an edit changes it
    copy = tmp_path / "copy"
    for pkg in ("mascara", "flows"):
        shutil.copytree(repo / pkg, copy / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    probe = "from mascara.catalog import lifecycle; print(lifecycle.code_revision())"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(copy)}
    got = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120)
    assert got.stdout.strip() == f"source {digest}", got.stderr[-2000:]
    with open(copy / "mascara" / "photometry.py", "a") as f:
        f.write("\n# an edit\n")
    assert lifecycle.source_digest([copy / "mascara", copy / "flows"]) != digest


def test_a_batch_and_its_frames_are_recorded_together_or_not_at_all(catalog):
    """A review: the frames of a batch were written in a transaction of their own before the batch's, so a
    run ended between the two (a signal) still counted them as reduced. They go in the batch's transaction."""
    cn = catalog.register_camera_night("LP", "E", "20260301", "/d")
    run = catalog.start_run(cn, fingerprint(), {}, VERSIONS, "h")
    catalog.register_batches(run, [(7, 350, 399, 2), (8, 400, 449, 1)])
    catalog.batch_started(run, 7)
    catalog.batch_succeeded(run, 7, "/t/b7.h5", "7" * 64, frame_rows=[
        (350, "00000350LPE.fits", 10, "ok", None), (351, "00000351LPE.fits", 10, "rejected", "truncated")])
    assert count(catalog, Frame) == 2
    catalog.batch_started(run, 8)
    catalog.finish_run(run, "failed", error="interrupted (SIGTERM)")
    with pytest.raises(LeaseLost, match=r"has ended \(failed: interrupted \(SIGTERM\)\)"):
        catalog.batch_succeeded(run, 8, "/t/b8.h5", "8" * 64, frame_rows=[(400, "00000400LPE.fits", 10, "ok", None)])
    assert count(catalog, Frame) == 2


def test_a_refusal_by_a_live_run_on_this_host_names_its_process_not_the_lease_expiry(catalog):
    """An outside trial: a second run was told '... the lease expires 23:12:40 UTC if that run died', though on
    the same host a dead holder is taken over at once: the time was never waited for. It names the process."""
    import os
    import socket

    cn = catalog.register_camera_night("LP", "E", "20260301", "/d")
    catalog.start_run(cn, fingerprint(), {}, VERSIONS, socket.gethostname(), pid=os.getpid())
    with pytest.raises(LeaseHeld, match=rf"process {os.getpid()} on this host is running it") as err:
        catalog.start_run(cn, fingerprint(), {}, VERSIONS, socket.gethostname())
    assert "the lease expires" not in str(err.value)


def test_sizes_of_full_night_files_fit(catalog):
    """An outside trial on PostgreSQL: sizes were 32-bit there, and the fLC of a full 5,000-frame night
    (about 2.7 GB) made the run's success fail to record after both night files were written, on every
    re-run. Sizes over 32 bits are recorded and read back exactly, on both backends (migration 0009)."""
    big = 2_700_000_000
    cn = catalog.register_camera_night("LP", "E", "20260401", "/data/20260401LPE")
    run = catalog.start_run(cn, fingerprint(), {}, VERSIONS, host="vm")
    catalog.record_frames(cn, [(1, "00000001LPE.fits", 5_000_000_000, "ok", None)])
    catalog.finish_run(run, "succeeded", products=[
        dict(kind="fLC", path="/data/20260401LPE/lightcurves/fLC_20260401LPE.hdf5", sha256="0" * 64, size=big,
             mtime_ns=1_796_605_834_966_444_237, nstars=25_000)])
    assert catalog.run_info(run).status == "succeeded"
    with Session(catalog.engine) as s:
        assert s.execute(select(Product.size)).scalars().all() == [big]
        assert s.execute(select(Frame.size)).scalars().all() == [5_000_000_000]


def test_an_abandoned_flow_run_is_called_crashed_only_when_none_of_its_camera_nights_is_running(catalog):
    """A review: one flow run reduces several cameras; its process may have only stalled past camera E's
    lease while it still holds camera W's. Marking that flow run Crashed in Prefect would stop W's next
    tasks, so the flow run is named only once none of its runs is recorded running."""
    from mascara.catalog.catalog import ABANDONED
    from mascara.catalog.lifecycle import abandoned_flow_run

    e = catalog.register_camera_night("LP", "E", "20260301", "/data/20260301LPE")
    w = catalog.register_camera_night("LP", "W", "20260301", "/data/20260301LPW")
    old_e = catalog.start_run(e, fingerprint(), {}, VERSIONS, "h1", flow_run_id="fr-1")
    old_w = catalog.start_run(w, fingerprint(), {}, VERSIONS, "h1", flow_run_id="fr-1")
    catalog.finish_run(old_e, "failed", error=f"{ABANDONED} no heartbeat since 2026-03-02 01:00:00 UTC")
    new_e = catalog.start_run(e, fingerprint(), {}, VERSIONS, "h2", flow_run_id="fr-2")
    assert abandoned_flow_run(catalog, e, new_e, "fr-2") is None  # W of fr-1 still runs
    catalog.finish_run(old_w, "failed", error=f"{ABANDONED} process 123 on h1 no longer exists")
    prev = abandoned_flow_run(catalog, e, new_e, "fr-2")
    assert prev is not None and prev.run_id == old_e and prev.flow_run_id == "fr-1"
    assert abandoned_flow_run(catalog, e, new_e, "fr-1") is None  # never the caller's own flow run
    assert abandoned_flow_run(catalog, w, catalog.start_run(w, fingerprint(), {}, VERSIONS, "h2"), None).run_id \
        == old_w
    # a run that failed for a reason of its own ended its flow run itself: nothing to mark
    s = catalog.register_camera_night("LP", "S", "20260301", "/data/20260301LPS")
    old_s = catalog.start_run(s, fingerprint(), {}, VERSIONS, "h1", flow_run_id="fr-3")
    catalog.finish_run(old_s, "failed", error="OSError: disk full")
    assert abandoned_flow_run(catalog, s, catalog.start_run(s, fingerprint(), {}, VERSIONS, "h2"), None) is None
