"""Parameter parsing and run decisions of flows._runs (plain functions, no server)."""

from __future__ import annotations

import datetime as dt
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows._runs import parse_letters, parse_nights, previous_night


def test_nights_from_every_form_a_deployment_parameter_can_take():
    # --param nights=20260301 arrives as an int (Prefect parses --param values as JSON)
    assert parse_nights(20260301) == ["20260301"]
    assert parse_nights("20260301+20260302") == ["20260301", "20260302"]
    assert parse_nights(["20260301", 20260302]) == ["20260301", "20260302"]
    assert parse_nights("all") is None


def test_empty_nights_mean_the_previous_night():
    today = dt.date(2026, 3, 1)
    assert previous_night(today) == "20260228"
    for value in (None, "", "yesterday", "YESTERDAY"):
        assert parse_nights(value, today=today) == ["20260228"]
    assert parse_nights("yesterday+20260101", today=today) == ["20260101", "20260228"]


def test_night_ranges_mix_with_lists():
    assert parse_nights("20260227..20260302") == ["20260227", "20260228", "20260301", "20260302"]
    assert parse_nights("20251230..20260101+20260301+20251231") == ["20251230", "20251231", "20260101", "20260301"]
    assert parse_nights(["20260301..20260302", 20260310]) == ["20260301", "20260302", "20260310"]
    assert len(parse_nights("20260101..20261231")) == 365


@pytest.mark.parametrize("bad, why", [("20260302..20260301", "backwards"), ("20260101..20370101", "more than"),
                                      ("2026..20260301", "YYYYMMDD"), ("20260230..20260301", "real date")])
def test_malformed_ranges_are_refused(bad, why):
    with pytest.raises(ValueError, match=why):
        parse_nights(bad)


def test_a_range_reduces_the_nights_it_finds_and_reports_the_others(tmp_path):
    from mascara.selection import select_nights

    for n in ("20260301", "20260303"):
        (tmp_path / f"{n}LPE" / "raw").mkdir(parents=True)
    sel = select_nights(tmp_path, "20260301..20260304", "E", "LP")
    assert [p.name for p in sel.night_dirs] == ["20260301LPE", "20260303LPE"]
    assert sel.not_found == ["20260302LPE", "20260304LPE"]


def test_directories_that_look_like_nights_but_are_not_are_named(tmp_path):
    """A stranger's trial: 2026031LPE, 20260301LPX and 20260301LPE_copy (each with frames in raw/) were
    skipped without a word, and 20261399LPE was reduced as an empty night while --night 20261399 was
    refused as not a real date. Each is now ignored with the reason; without raw/ it is not a night."""
    from mascara.selection import select_nights

    for name in ("20260301LPE", "2026031LPE", "20260301LPX", "20260301LPE_copy", "20261399LPE", "20260301XXE"):
        (tmp_path / name / "raw").mkdir(parents=True)
    (tmp_path / "notes").mkdir()
    sel = select_nights(tmp_path, "all", None, None)
    assert [p.name for p in sel.night_dirs] == ["20260301LPE"]
    assert sorted(i.split(":")[0] for i in sel.ignored) == ["20260301LPE_copy", "20260301LPX", "20260301XXE",
                                                            "2026031LPE", "20261399LPE"]
    why = dict(i.split(": ", 1) for i in sel.ignored)
    assert why["20261399LPE"] == "20261399 is not a real date"
    assert why["20260301XXE"] == "site XX is not one of LP, LS"
    assert why["2026031LPE"].startswith("not a night directory name <YYYYMMDD><SITE><CAM>")
    # asked for one night: only what concerns it
    sel = select_nights(tmp_path, "20260301", None, None)
    assert sorted(i.split(":")[0] for i in sel.ignored) == ["20260301LPE_copy", "20260301LPX", "20260301XXE"]


@pytest.mark.parametrize("bad", ["2026031", "2026-03-01", "20260301+x"])
def test_malformed_nights_are_refused(bad):
    with pytest.raises(ValueError):
        parse_nights(bad)


def test_cameras_and_sites():
    assert parse_letters("E+S") == ["E", "S"]
    assert parse_letters(["E"]) == ["E"]
    assert parse_letters(None) is None
    assert parse_letters("") is None
    assert parse_letters("all") is None


# --------------------------------------------------------------------------- run decisions (SPEC §9)


@pytest.fixture()
def night(pristine_night, tmp_path):
    from flowkit import NIGHT_ID, fresh_copy

    from mascara.reduce import plan_camera_night

    datadir = fresh_copy(pristine_night, tmp_path / "data")
    return plan_camera_night(datadir / NIGHT_ID), f"sqlite:///{datadir / 'catalog.sqlite'}"


def test_new_then_resume_then_move_aside_then_erase(night, caplog):
    import logging

    from flows._runs import catalog, file_sha256, open_run, verified_done

    plan, url = night
    cat = catalog(url)
    first = open_run(url, plan)
    assert first.decision == "new" and first.done == {}
    # one batch finished: a file with its checksum in the catalog
    b0, b1 = sorted(plan.batches)[:2]
    for b in (b0, b1):
        p = plan.batch_path(b)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"batch {b}".encode())
        cat.batch_started(first.run_id, b)
        cat.batch_succeeded(first.run_id, b, p, file_sha256(p))
    plan.batch_path(b1).write_bytes(b"damaged")  # the catalog's checksum no longer matches
    cat.finish_run(first.run_id, "failed", error="interrupted")

    second = open_run(url, plan)
    assert second.decision == "resume" and second.moves == []
    assert set(second.done) == {b0}  # b1's file does not match: it is not done
    batch_dir = plan.batch_path(b0).parent
    assert verified_done(cat, second.camera_night_id, second.fingerprint_key, batch_dir) == second.done
    cat.finish_run(second.run_id, "succeeded")

    caplog.set_level(logging.INFO, logger="mascara.catalog.lifecycle")
    third = open_run(url, plan)  # a completed reduction is moved aside, and the user is told where
    told = (f"{plan.night.night_id}: previous outputs moved aside (re-run of the completed reduction of run "
            f"{second.run_id}): work -> work_old")
    assert told in caplog.text, caplog.text
    assert third.decision == "move" and third.done == {}
    night_dir = plan.night.path
    assert (night_dir / "work_old" / "batches").is_dir() and not (night_dir / "work").exists()
    assert (night_dir / "raw").is_dir()
    assert sorted(Path(src).name for src, _ in third.moves) == ["work"]
    cat.finish_run(third.run_id, "succeeded")

    (night_dir / "lightcurves").mkdir()
    fourth = open_run(url, plan, overwrite=True)
    assert fourth.decision == "erase" and not (night_dir / "lightcurves").exists()
    with sqlite3.connect(f"file:{night_dir.parent / 'catalog.sqlite'}?mode=ro", uri=True) as db:
        moves = db.execute("SELECT src, dst, action FROM directory_move ORDER BY moved_at").fetchall()
    assert [(Path(s).name, d and Path(d).name, a) for s, d, a in moves] == [
        ("work", "work_old", "renamed"), ("lightcurves", None, "erased"), ("work_old", None, "erased")]


def test_keep_old_below_one_is_refused_before_a_run_is_registered(night):
    """A refused argument must not leave a run ``running`` with the lease (a stranger's trial: --keep-old 0)."""
    from flows._runs import catalog, open_run

    plan, url = night
    with pytest.raises(ValueError, match="keep_old must be at least 1"):
        open_run(url, plan, keep_old=0)
    cn = catalog(url).find_camera_night(plan.night.path)
    assert cn is None or catalog(url).last_run(cn) is None


def test_the_heartbeat_says_nothing_of_a_run_that_ended_between_its_snapshot_and_its_discard(night, caplog):
    """An outside trial: a run that had succeeded was warned about ("heartbeat of run ... failed: no longer
    holds a lease") when the heartbeat fired while the quick-look figures were drawn, after the end was
    recorded. A finished run is dropped quietly; a run the catalog does not know still gets the warning."""
    from flows._runs import Heartbeat, catalog, open_run

    plan, url = night
    handle = open_run(url, plan)
    catalog(url).finish_run(handle.run_id, "succeeded")
    with caplog.at_level("WARNING", logger="flows._runs"), Heartbeat(url, interval=0.05) as hb:
        hb.run_ids.update({handle.run_id, "no-such-run"})
        deadline = time.monotonic() + 10
        while handle.run_id in hb.run_ids or not caplog.records:
            assert time.monotonic() < deadline, (hb.run_ids, caplog.text)
            time.sleep(0.05)
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if handle.run_id in m], said
    assert any("heartbeat of run no-such-run failed" in m for m in said), said


def test_the_heartbeat_still_warns_of_a_run_whose_lease_was_taken_over(night, caplog):
    """A run recorded failed by the run that took its lease over ("abandoned: ...") did not end itself: its
    failed heartbeat is the first sign of the takeover and is said (a review: the quiet drop above must not
    swallow it)."""
    from flows._runs import Heartbeat, catalog, open_run

    plan, url = night
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    first = open_run(url, plan, pid=dead.pid)
    open_run(url, plan)  # takes the lease of the dead process's run over
    assert catalog(url).run_info(first.run_id).error.startswith("abandoned")
    caplog.clear()  # the takeover's own warning names the run too

    def warned() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.name == "flows._runs" and r.getMessage().startswith(f"heartbeat of run {first.run_id} failed")]

    with caplog.at_level("WARNING", logger="flows._runs"), Heartbeat(url, interval=0.05) as hb:
        hb.run_ids.add(first.run_id)
        deadline = time.monotonic() + 10
        while len(warned()) < 2:  # said at every beat, not dropped after the first
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)
        assert first.run_id in hb.run_ids


def test_a_live_run_holds_the_camera_night(night):
    from flows._runs import open_run

    from mascara.catalog import LeaseHeld

    plan, url = night
    open_run(url, plan)  # this process is alive: its lease holds
    with pytest.raises(LeaseHeld):
        open_run(url, plan)


def test_the_lease_of_a_dead_process_on_this_host_is_taken_over(night):
    from flows._runs import catalog, open_run

    plan, url = night
    from flows._runs import already_done

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    first = open_run(url, plan, pid=dead.pid)
    # --skip-done and the backfill: a holder killed on this host is not "in progress" (a stranger's trial:
    # a crashed night was skipped for the rest of the lease, 5 minutes)
    assert already_done(url, plan) is None
    second = open_run(url, plan)
    assert already_done(url, plan).startswith("in progress")  # a live holder is
    assert second.decision == "resume" and second.run_id != first.run_id
    assert catalog(url).last_run(second.camera_night_id).run_id == second.run_id


# --------------------------------------------------------------------------- quick-look figures during a run


def test_quicklook_figures_follow_a_run_at_most_once_per_interval_and_always_at_the_end(tmp_path, caplog):
    from flows._runs import draw_quicklook

    night = tmp_path / "20260301LPW"
    (night / "work").mkdir(parents=True)
    assert draw_quicklook(night, every=0.5) == {}  # the first call starts the clock: a short night draws once
    assert not (night / "quicklook").exists()
    time.sleep(0.6)
    first = draw_quicklook(night, every=0.5)  # an interval later: drawn
    assert set(first) == {"lightcurves", "sky", "astrometry", "frames"}
    stamps = {k: p.stat().st_mtime_ns for k, p in first.items()}
    assert draw_quicklook(night, every=3600.0) == {}  # redrawn less than an interval ago: skipped
    assert {k: p.stat().st_mtime_ns for k, p in first.items()} == stamps
    assert set(draw_quicklook(night)) == set(first)  # the end of a run always redraws
    assert {k: p.stat().st_mtime_ns for k, p in first.items()} != stamps

    broken = tmp_path / "20260301LPN"
    (broken / "work").mkdir(parents=True)
    (broken / "quicklook").write_text("a file where the figures' directory belongs")
    with caplog.at_level("WARNING"):
        assert draw_quicklook(broken) == {}  # a figure never fails a reduction
    assert "quick-look figures of" in caplog.text and str(broken) in caplog.text


def test_the_library_driver_marks_a_batch_running_while_it_is_reduced(night, monkeypatch):
    """The catalog's ``started_at`` is when the batch began, not when its result was recorded: the library
    drivers marked a batch started only once it had finished (so a run showed no batch ``running`` and every
    batch took a few milliseconds). A batch's thread CPU cannot exceed the wall time between its marks."""
    from flows._runs import drive_camera_night
    from mascara import reduce as red

    plan, url = night
    seen: list[tuple[int, str]] = []
    real = red.reduce_batch

    def spy(plan_, ctx, batch):  # what the catalog says while the batch is being reduced
        with sqlite3.connect(f"file:{plan.night.path.parent / 'catalog.sqlite'}?mode=ro", uri=True) as db:
            seen.append((batch, db.execute("SELECT status FROM batch WHERE batch_index = ?", (batch,)).fetchone()[0]))
        return real(plan_, ctx, batch)

    monkeypatch.setattr(red, "reduce_batch", spy)
    drive_camera_night(url, plan.night, split_in_background=False)
    assert sorted(seen) == [(b, "running") for b in sorted(plan.batches)]
    with sqlite3.connect(f"file:{plan.night.path.parent / 'catalog.sqlite'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT batch_index, status, tries, julianday(finished_at) - julianday(started_at), cpu_s "
                          "FROM batch").fetchall()
    assert len(rows) == len(plan.batches)
    for b, status, tries, days, cpu in rows:
        assert status == "succeeded" and tries == 1, (b, status, tries)
        assert cpu > 0 and days * 86400.0 >= 0.95 * cpu, (b, days * 86400.0, cpu)


def test_a_batch_that_fails_in_the_library_driver_is_recorded_failed_with_its_error(night, monkeypatch):
    """The library driver recorded nothing for a batch whose reduction raised (the run's end then called it
    failed "during the batch", without the error); the flow records the batch's own error, and so does it."""
    from flows._runs import drive_camera_night
    from mascara import reduce as red

    plan, url = night
    bad = sorted(plan.batches)[1]
    real = red.reduce_batch

    def failing(plan_, ctx, batch):
        if batch == bad:
            raise RuntimeError("a fault injected into one batch")
        return real(plan_, ctx, batch)

    monkeypatch.setattr(red, "reduce_batch", failing)
    with pytest.raises(RuntimeError, match="injected"):
        drive_camera_night(url, plan.night, split_in_background=False)
    with sqlite3.connect(f"file:{plan.night.path.parent / 'catalog.sqlite'}?mode=ro", uri=True) as db:
        [(status, tries, error)] = db.execute("SELECT status, tries, error FROM batch WHERE batch_index = ?",
                                              (bad,)).fetchall()
        [(run_status, run_error)] = db.execute("SELECT status, error FROM reduction_run").fetchall()
    assert (status, tries, error) == ("failed", 1, "RuntimeError: a fault injected into one batch")
    assert run_status == "failed" and "injected" in run_error


def test_a_batch_recorded_before_its_run_ended_is_not_called_unrecorded_when_its_quality_is_refused(
        night, monkeypatch, caplog):
    """An outside trial: SIGTERM ended a flow's run between a batch's record and its sky quality's; the
    quality's write was refused (the run had ended) and the batch was logged "not recorded ... the next run
    does it again", while the catalog had it succeeded and the next run reused it. The batch stays recorded,
    the log says what was not, and the run that reuses the batch records its quality."""
    import logging

    from flows import _runs
    from mascara.catalog import LeaseLost
    from mascara.diagnostics import quality_path
    from mascara.reduce import prepare_camera_night, reduce_batch

    caplog.set_level(logging.INFO)
    plan, url = night
    first = sorted(plan.batches)[0]
    real = _runs.record_quality

    def ended_meanwhile(handle, batch_path):  # type: ignore[no-untyped-def]
        _runs.catalog(url).finish_run(handle.run_id, "failed", error="interrupted (SIGTERM)")
        return real(handle, batch_path)  # refused: the run has ended

    monkeypatch.setattr(_runs, "record_quality", ended_meanwhile)
    handle = _runs.open_run(url, plan)
    with pytest.raises(LeaseLost):  # the run is over: the batch's run stops writing
        _runs.reduce_recorded(handle, first, lambda: reduce_batch(plan, prepare_camera_night(plan), first))
    with sqlite3.connect(f"file:{plan.night.path.parent / 'catalog.sqlite'}?mode=ro", uri=True) as db:
        [(status,)] = db.execute("SELECT status FROM batch WHERE batch_index = ?", (first,)).fetchall()
    assert status == "succeeded"
    assert "not recorded:" not in caplog.text and "its sky quality was not (LeaseLost" in caplog.text
    assert not quality_path(plan.night.path, first).is_file()  # written only once the catalog has it
    monkeypatch.setattr(_runs, "record_quality", real)
    again, _ = _runs.drive_camera_night(url, plan.night, split_in_background=False)
    assert again.decision == "resume" and first in again.done
    assert quality_path(plan.night.path, first).is_file()
