"""Live mode end to end (issue 14): the live simulator writes a night while ``mascprocess --live`` reduces it."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from flowkit import BIN, NIGHT, NIGHT_ID, assert_same_night_files

from mascara.catalog import connect


def _succeeded_batches(datadir: Path) -> int:
    if not (datadir / "catalog.sqlite").exists():
        return 0
    try:
        with connect(datadir=datadir) as cat:
            rows = cat.night_status(NIGHT)
    except Exception:  # noqa: BLE001 - the catalog may still be being created by the other process
        return 0
    return sum(int(r.get("batches_done") or 0) for r in rows)


def _deliver(src: Path, dest: Path) -> None:
    """``src`` copied to ``dest`` as a camera writes it: under a hidden name, then renamed (never seen half
    written; a new file with a new modification time where ``dest`` existed)."""
    import os
    import shutil

    hidden = dest.parent / f".{dest.name}"
    shutil.copyfile(src, hidden)
    os.rename(hidden, dest)


def _stopped_after(url: str, night: Path, batch: int, on_batch=None) -> None:  # type: ignore[no-untyped-def]
    """A live run of ``night`` stopped (``LiveStopped``, recorded "interrupted (test)") once ``batch`` is
    reduced; ``on_batch(outcome)`` is called for every batch before that."""
    import threading

    import pytest

    from flows import _runs
    from mascara.rawio import parse_night_dir
    from mascara.reduce import LiveStopped

    stop = threading.Event()

    def each(_handle, outcome) -> None:  # type: ignore[no-untyped-def]
        if on_batch is not None:
            on_batch(outcome)
        if outcome.batch == batch:
            stop.reason = "interrupted (test)"  # type: ignore[attr-defined]
            stop.set()

    with pytest.raises(LiveStopped):
        _runs.drive_live_camera_night(url, parse_night_dir(night), grace=2, idle_timeout=30, poll=0.3,
                                      on_batch=each, stop=stop)


def _wait(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_live_reduction_of_an_arriving_night_equals_offline_and_survives_a_kill(tmp_path, reference):
    """Frames written in place at 15x real time (a reader can see half-written files): batches are
    recorded while frames still arrive; a live run killed mid-night and started again resumes; the
    night files equal the offline reduction of the same frames (the session's reference)."""
    datadir = tmp_path / "data"
    datadir.mkdir()
    sim = subprocess.Popen([str(BIN / "mascara"), "simulate", str(datadir), "--night", NIGHT, "--site", "LP",
                            "--camera", "E", "--size", "small", "--frames", "120", "--seed", "3", "--live",
                            "--speed", "15", "--write-mode", "in-place"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    live = [str(BIN / "mascprocess"), str(datadir), "--night", NIGHT, "--site", "LP", "--camera", "E", "--live",
            "--idle-timeout", "8", "--grace", "4", "--poll", "0.3", "-q"]
    raw = datadir / NIGHT_ID / "raw"
    _wait(lambda: raw.is_dir() and any(p.name.startswith("calib_dark") for p in raw.iterdir()), 120,
          "the calibration frames")
    first = subprocess.Popen(live, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: _succeeded_batches(datadir) >= 1, 120, "the first batch in the catalog")
        assert sim.poll() is None, "the night was over before a batch was recorded: not live"
        first.kill()  # mid-night, frames still arriving
        first.wait(timeout=30)
        frames_at_kill = len(list(raw.glob("*LPE.fits")))
        second = subprocess.run(live, capture_output=True, text=True, timeout=600)
    finally:
        for p in (first, sim):
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
    assert sim.wait(timeout=60) == 0, sim.stderr.read()
    assert second.returncode == 0, second.stderr[-3000:]
    assert frames_at_kill < 120

    with connect(datadir=datadir) as cat:
        [status] = [r for r in cat.night_status(NIGHT) if r["camera"] == "LPE"]
        assert status["state"] == "succeeded" and status["decision"] == "resume", status
        [killed] = cat.failed_runs(NIGHT)
        assert "abandoned" in killed["error"]
    assert_same_night_files(datadir / NIGHT_ID, reference)


def test_live_flow_shows_each_batch_as_a_task_run_while_the_night_goes_on(tmp_path, reference, prefect_server,
                                                                          monkeypatch):
    """The live flow (deployment reduce-night/live) against the session's Prefect server, on a night
    written at 15x real time: every batch is its own task run, the first ones finish before the last
    frame is written, and the night files equal the offline reduction's."""
    import datetime as dt

    import httpx

    from flows.live import reduce_night_live

    api, env = prefect_server
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    datadir = tmp_path / "data"
    datadir.mkdir()
    sim = subprocess.Popen([str(BIN / "mascara"), "simulate", str(datadir), "--night", NIGHT, "--site", "LP",
                            "--camera", "E", "--size", "small", "--frames", "120", "--seed", "3", "--live",
                            "--speed", "15"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        state = reduce_night_live(datadir=str(datadir), nights=NIGHT, cameras="E", site="LP", idle_timeout=8,
                                  grace=4, poll=0.3, return_state=True)
    finally:
        if sim.poll() is None:
            sim.kill()
    sim_end = time.time()
    assert state.is_completed(), state.message
    assert state.result() == {NIGHT_ID: "succeeded"}
    r = httpx.post(f"{api}/task_runs/filter", timeout=30, json={
        "flow_runs": {"id": {"any_": [str(state.state_details.flow_run_id)]}}, "limit": 200})
    r.raise_for_status()
    batches = [t for t in r.json() if t["name"].startswith(f"batch-{NIGHT_ID}-")]
    assert len(batches) == 3 and all(t["state_type"] == "COMPLETED" for t in batches), [t["name"] for t in r.json()]
    last_frame = max(p.stat().st_mtime for p in (datadir / NIGHT_ID / "raw").glob("*LPE.fits"))
    first_done = min(dt.datetime.fromisoformat(t["end_time"]).timestamp() for t in batches)
    assert first_done < last_frame < sim_end, (first_done, last_frame)
    assert_same_night_files(datadir / NIGHT_ID, reference)
    # each batch row was marked running when its task began (not once it had finished): its thread CPU fits
    # between the two marks
    with sqlite3.connect(f"file:{datadir / 'catalog.sqlite'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT batch_index, tries, (julianday(finished_at) - julianday(started_at)) * 86400, "
                          "cpu_s FROM batch WHERE status = 'succeeded'").fetchall()
    assert len(rows) == 3 and all(t == 1 and w >= 0.95 * c > 0 for _, t, w, c in rows), rows
    # the progress and the quick-look figures of the night, as artifacts of the flow run
    r = httpx.post(f"{api}/artifacts/filter", timeout=30, json={
        "artifacts": {"flow_run_id": {"any_": [str(state.state_details.flow_run_id)]}}})
    r.raise_for_status()
    versions: dict[str, list[str]] = {}
    for a in r.json():
        versions.setdefault(a["key"] or "", []).append(str(a["data"]))
    assert {f"{NIGHT_ID.lower()}-live", f"{NIGHT_ID.lower()}-quicklook"} <= set(versions), sorted(versions)
    assert any("3 batches reduced" in d for d in versions[f"{NIGHT_ID.lower()}-live"])
    assert any("data:image/png;base64," in d for d in versions[f"{NIGHT_ID.lower()}-quicklook"])


def test_a_signal_to_a_live_run_is_recorded_and_the_night_resumes(tmp_path, pristine_night, reference):
    """SIGTERM to ``mascprocess --live`` while its camera thread reduces: the signal reaches the main
    thread only, which records the thread's run as interrupted and releases its lease before the
    process exits (not left ``running`` for the next run to find abandoned), then stops the thread
    (a daemon thread still reducing at shutdown once aborted the process: exit -6, not 143); the
    next run resumes."""
    from flowkit import fresh_copy, running, runs, terminate

    datadir = fresh_copy(pristine_night, tmp_path / "data")
    live = [str(BIN / "mascprocess"), str(datadir), "--night", NIGHT, "--site", "LP", "--camera", "E", "--live",
            "--idle-timeout", "30", "--grace", "2", "--poll", "0.3", "-q"]
    with running(live) as proc:
        _wait(lambda: _succeeded_batches(datadir) >= 1, 180, "the first batch in the catalog")
        err = terminate(proc)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "still reducing" not in err, err[-3000:]  # the camera thread stopped before the interpreter's shutdown
    [run] = runs(datadir)
    assert (run["status"], run["error"]) == ("failed", "interrupted (SIGTERM)"), run
    with connect(datadir=datadir) as cat:
        assert not cat.running_runs_of(run["host"], run["pid"])
    again = subprocess.run(live[:-7] + ["--idle-timeout", "3", "--grace", "2", "--poll", "0.3", "-q"],
                           capture_output=True, text=True, timeout=600)  # live again: a live run resumes
    assert again.returncode == 0, again.stderr[-3000:]
    with connect(datadir=datadir) as cat:
        [status] = [r for r in cat.night_status(NIGHT) if r["camera"] == "LPE"]
        assert status["state"] == "succeeded" and status["decision"] == "resume", status
    assert_same_night_files(datadir / NIGHT_ID, reference)


def test_a_stopped_live_run_ends_before_its_next_batch_and_stops_its_splitter(tmp_path, pristine_night,
                                                                              monkeypatch):
    """``stop`` set while the first batch is recorded (``mascprocess --live`` sets it on a signal, so
    that no camera thread is still reducing when the interpreter shuts down): the run raises
    ``LiveStopped`` before its next batch, is recorded as failed with the stop's reason (its writes
    stopped, before its lease is released), and leaves no splitter process behind."""
    import multiprocessing
    import threading

    import pytest
    from flowkit import fresh_copy, runs

    from flows import _runs
    from mascara.catalog._engine import resolve_url
    from mascara.rawio import parse_night_dir
    from mascara.reduce import LiveStopped

    datadir = fresh_copy(pristine_night, tmp_path / "data")
    stop = threading.Event()
    recorded: list[int] = []

    def on_batch(_handle, outcome) -> None:  # type: ignore[no-untyped-def]
        recorded.append(outcome.batch)
        stop.reason = "interrupted (SIGTERM)"  # type: ignore[attr-defined]  # as mascprocess --live sets it
        stop.set()

    from mascara import reduce as red

    seen: list[tuple[int, str]] = []
    real = red.reduce_batch

    def spy(plan, ctx, batch):  # type: ignore[no-untyped-def]  # the catalog while the batch is reduced
        with sqlite3.connect(f"file:{datadir / 'catalog.sqlite'}?mode=ro", uri=True) as db:
            seen.append((batch, db.execute("SELECT status FROM batch WHERE batch_index = ?", (batch,)).fetchone()[0]))
        return real(plan, ctx, batch)

    monkeypatch.setattr(red, "reduce_batch", spy)

    with pytest.raises(LiveStopped):
        _runs.drive_live_camera_night(resolve_url(None, str(datadir)), parse_night_dir(datadir / NIGHT_ID),
                                      grace=2, idle_timeout=3, poll=0.3, on_batch=on_batch, stop=stop)
    assert len(recorded) == 1
    assert seen == [(recorded[0], "running")]  # marked when it began, as the offline drivers do
    assert not multiprocessing.active_children()
    [run] = runs(datadir)
    assert (run["status"], run["error"]) == ("failed", "interrupted (SIGTERM)"), run
    with connect(datadir=datadir) as cat:
        [status] = [r for r in cat.night_status(NIGHT) if r["camera"] == "LPE"]
    assert status["batches_done"] == 1, status


def test_a_live_run_waits_for_its_directory_and_reduces_late_frames_again(tmp_path, pristine_night, reference):
    """The live run starts before the camera has made tonight's directory (it waits, as the README
    says), and a frame of the middle batch arrives after that batch was reduced (a stalled copy): the
    batch is reduced again with it, so the night files equal the offline reduction of the same frames
    and the catalog counts every frame. Before, the run failed at once on the missing directory, and a
    late frame was lost without a word while the run ended ``succeeded``."""
    import threading

    from flowkit import runs

    from flows import _runs
    from mascara.catalog._engine import resolve_url
    from mascara.rawio import parse_night_dir

    datadir = tmp_path / "data"
    datadir.mkdir()
    src = pristine_night / NIGHT_ID / "raw"
    night = datadir / NIGHT_ID
    frames = sorted(p.name for p in src.glob("*LPE.fits"))
    middle = [f for f in frames if int(f[:8]) // 50 == int(frames[len(frames) // 2][:8]) // 50]
    held = middle[len(middle) // 2]
    errors: list[BaseException] = []

    def deliver(name: str) -> None:
        _deliver(src / name, night / "raw" / name)

    def camera() -> None:
        try:
            time.sleep(1.5)  # the live run is already watching
            (night / "raw").mkdir(parents=True)
            for p in sorted(src.glob("calib_*")):
                deliver(p.name)
            for f in frames:
                if f != held:
                    deliver(f)
            batch = night / "work" / "batches" / f"batch_{int(held[:8]) // 50}.h5"
            _wait(batch.exists, 300, "the middle batch reduced without its held frame")
            deliver(held)  # the stalled copy arrives
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    feeder = threading.Thread(target=camera)
    feeder.start()
    try:
        handle, _ = _runs.drive_live_camera_night(resolve_url(None, str(datadir)), parse_night_dir(night),
                                                  grace=2, idle_timeout=8, poll=0.3)
    finally:
        feeder.join(timeout=600)
    assert not errors, errors
    [run] = runs(datadir)
    assert run["status"] == "succeeded", run
    assert_same_night_files(night, reference)
    with connect(datadir=datadir) as cat:
        [status] = [r for r in cat.night_status(NIGHT) if r["camera"] == "LPE"]
        assert status["frames_ok"] == len(frames) and status["frames_missing"] == 0, status


def test_a_live_run_restarted_after_late_frames_reduces_the_grown_batch_again(tmp_path, pristine_night, reference):
    """A live run stopped after the middle batch was reduced without one of its frames; the frame arrives
    while no run is going; the restarted live run resumes, registers the grown batch again (pending, its
    new frame count) instead of failing on a CatalogConflict and staying 'running', reduces it again, and
    the night equals the offline reduction."""
    import shutil

    from flowkit import runs

    from flows import _runs
    from mascara.catalog._engine import resolve_url
    from mascara.rawio import parse_night_dir

    datadir = tmp_path / "data"
    night = datadir / NIGHT_ID
    shutil.copytree(pristine_night / NIGHT_ID / "raw", night / "raw")
    frames = sorted(p.name for p in (night / "raw").glob("*LPE.fits"))
    middle_batch = int(frames[len(frames) // 2][:8]) // 50
    middle = [f for f in frames if int(f[:8]) // 50 == middle_batch]
    held = middle[len(middle) // 2]
    (night / "raw" / held).rename(tmp_path / held)
    url = resolve_url(None, str(datadir))
    _stopped_after(url, night, middle_batch)
    shutil.copyfile(tmp_path / held, night / "raw" / held)  # arrives while no run is going
    handle, result = _runs.drive_live_camera_night(url, parse_night_dir(night), grace=2, idle_timeout=3, poll=0.3)
    first, second = runs(datadir)
    assert (first["status"], first["error"]) == ("failed", "interrupted (test)")
    assert second["status"] == "succeeded" and handle.decision == "resume", second
    assert middle_batch not in result.skipped and result.skipped, result.skipped  # reused the first batch only
    assert_same_night_files(night, reference)
    with connect(datadir=datadir) as cat:
        [status] = [r for r in cat.night_status(NIGHT) if r["camera"] == "LPE"]
        assert status["frames_ok"] == len(frames) and status["batches_done"] == status["batches_total"], status


def test_frames_that_never_arrive_whole_are_rejected_at_the_end_of_a_live_night(tmp_path, pristine_night):
    """An outside trial cut one frame short and left another empty under a live run: the night ended
    `succeeded`, 0 rejected, "missing 2", no catalog row for either file and nothing on stderr, where an
    offline run records "truncated file (...)". At the night's end the files still incomplete go through the
    offline intake and are recorded and named."""
    import os

    from flowkit import fresh_copy

    datadir = fresh_copy(pristine_night, tmp_path / "data")
    raw = datadir / NIGHT_ID / "raw"
    frames = sorted(p for p in raw.iterdir() if not p.name.startswith("calib_"))
    cut, empty, renamed = frames[len(frames) // 2], frames[len(frames) // 2 + 1], frames[len(frames) // 2 + 2]
    size = cut.stat().st_size
    os.truncate(cut, size // 2)
    os.truncate(empty, 0)
    upper = renamed.with_name(renamed.name.replace(".fits", ".FITS"))  # named nearly like a frame: refused too
    renamed.rename(upper)
    res = subprocess.run([str(BIN / "mascprocess"), str(datadir), "--night", NIGHT, "--site", "LP", "--camera", "E",
                          "--live", "--idle-timeout", "8", "--grace", "2", "--poll", "0.3", "-q"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    with connect(datadir=datadir) as cat:
        [status] = [r for r in cat.night_status(NIGHT) if r["camera"] == "LPE"]
        rejected = {r["filename"]: r["reason"] for r in cat.rejected_frames(NIGHT)}
    assert status["state"] == "succeeded" and status["frames_missing"] == 0, status
    assert status["frames_rejected"] == 3 and status["frames_ok"] == len(frames) - 3, status
    assert rejected == {
        cut.name: f"truncated file ({size // 2} of {size} bytes) (not complete when the live run ended)",
        empty.name: "empty file (0 bytes) (not complete when the live run ended)",
        upper.name: "file name is not <lstseq:08d>LPE.fits[.gz]"}, rejected
    assert f"{NIGHT_ID}: 3 raw file(s) rejected:" in res.stderr and cut.name in res.stderr, res.stderr[-3000:]


def _offline_of(night: Path, dest: Path) -> Path:
    """The offline reduction (library driver) of a copy of ``night``'s raw/ as it is now."""
    import shutil

    from flows import _runs
    from mascara.catalog._engine import resolve_url
    from mascara.rawio import parse_night_dir

    shutil.copytree(night / "raw", dest / NIGHT_ID / "raw", symlinks=False)
    _runs.drive_camera_night(resolve_url(None, str(dest)), parse_night_dir(dest / NIGHT_ID))
    return dest / NIGHT_ID


def test_a_frame_replaced_after_its_batch_was_reduced_is_reduced_again(tmp_path, pristine_night):
    """An outside trial replaced a frame of a batch the live run had reduced by another frame's file: the run
    kept the first file's photometry, recorded the slot 'ok' and ended succeeded, and its night files
    differed from the offline reduction of the same raw/ (which refuses the file: its LSTSEQ is another
    slot's). A frame file written again is watched again: the batch is reduced again, the file is refused
    and recorded, and the night equals the offline one. The same while no run watches (a restart)."""
    import shutil

    from flowkit import runs

    from flows import _runs
    from mascara.catalog._engine import resolve_url
    from mascara.rawio import parse_night_dir

    datadir = tmp_path / "data"
    night = datadir / NIGHT_ID
    shutil.copytree(pristine_night / NIGHT_ID / "raw", night / "raw")
    frames = sorted(p.name for p in (night / "raw").glob("*LPE.fits"))
    batches = sorted({int(f[:8]) // 50 for f in frames})
    first_batch, middle_batch = batches[0], batches[len(batches) // 2]
    in_first = [f for f in frames if int(f[:8]) // 50 == first_batch]
    in_middle = [f for f in frames if int(f[:8]) // 50 == middle_batch]
    url = resolve_url(None, str(datadir))
    swapped = {}

    def on_batch(outcome) -> None:  # type: ignore[no-untyped-def]
        if outcome.batch == first_batch and not swapped:  # reduced: a file of it is written again now
            _deliver(night / "raw" / frames[-1], night / "raw" / in_first[3])
            swapped["live"] = in_first[3]

    _stopped_after(url, night, middle_batch, on_batch)
    _deliver(night / "raw" / frames[-2], night / "raw" / in_middle[5])  # while no run watches
    handle, result = _runs.drive_live_camera_night(url, parse_night_dir(night), grace=2, idle_timeout=3, poll=0.3)
    first, second = runs(datadir)
    assert first["status"] == "failed" and second["status"] == "succeeded" and handle.decision == "resume"
    assert middle_batch not in result.skipped  # its batch file predates a file of it: reduced again
    offline = _offline_of(night, tmp_path / "offline")
    assert_same_night_files(night, offline)
    with connect(datadir=datadir) as cat:
        refused = {r["filename"]: r["reason"] for r in cat.rejected_frames(night_dir=night)}
    for name in (in_first[3], in_middle[5]):
        assert "disagrees with the file name" in refused.get(name, ""), refused


def test_a_live_camera_night_that_gets_no_frame_is_recorded_empty_with_its_reason(tmp_path, pristine_night):
    """An outside trial: ``--live --camera E+W`` where W's directory never appeared exited 1, and the catalog
    had no row for LPW (``mascara status --camera W``: "no camera-nights registered"), where an offline run
    records a night without data as empty. Both cases are recorded: no directory, and a directory that
    received only calibration files."""
    import shutil

    import pytest

    from flows import _runs
    from mascara.catalog._engine import resolve_url
    from mascara.rawio import parse_night_dir

    datadir = tmp_path / "data"
    datadir.mkdir()
    url = resolve_url(None, str(datadir))
    never = datadir / NIGHT_ID.replace("LPE", "LPW")
    with pytest.raises(_runs.NothingToReduce, match="no night directory appeared"):
        _runs.drive_live_camera_night(url, parse_night_dir(never), grace=1, idle_timeout=1, poll=0.2)
    calib_only = datadir / NIGHT_ID
    (calib_only / "raw").mkdir(parents=True)
    for p in (pristine_night / NIGHT_ID / "raw").glob("calib_*"):
        shutil.copyfile(p, calib_only / "raw" / p.name)
    with pytest.raises(_runs.NothingToReduce, match="no science frame arrived"):
        _runs.drive_live_camera_night(url, parse_night_dir(calib_only), grace=1, idle_timeout=1, poll=0.2)
    with connect(datadir=datadir) as cat:
        rows = {r["camera"]: r for r in cat.night_status(NIGHT)}
    assert set(rows) == {"LPE", "LPW"}, rows
    assert rows["LPW"]["state"] == "empty" and "no night directory appeared" in rows["LPW"]["error"], rows
    assert rows["LPE"]["state"] == "empty" and "no science frame arrived" in rows["LPE"]["error"], rows
    assert "calib_ file(s)" in rows["LPE"]["error"], rows  # what raw/ held, as offline says it


def test_a_night_reduced_live_is_up_to_date_for_an_offline_plan_of_the_same_raw(tmp_path, pristine_night):
    """An outside trial: a live run's fingerprint names no raw inventory, so ``--skip-done`` and ``backfill``
    reduced every live night again ("reduced by run ... with other raw inventory") and moved the live
    reduction aside. The live run records the inventory it ended with (migration 0010): the night is up to
    date for an offline plan of the same raw/, and is not once a file of raw/ changes."""
    import os
    import shutil

    from flows import _runs
    from mascara.catalog._engine import resolve_url
    from mascara.rawio import parse_night_dir
    from mascara.reduce import plan_camera_night

    datadir = tmp_path / "data"
    night = datadir / NIGHT_ID
    shutil.copytree(pristine_night / NIGHT_ID / "raw", night / "raw")
    url = resolve_url(None, str(datadir))
    handle, _ = _runs.drive_live_camera_night(url, parse_night_dir(night), grace=1, idle_timeout=2, poll=0.2)
    # the night ended (2 s without a frame) before the files present at the start had settled: they joined at
    # its end, the darks too (they were left out, and the night was reduced without a master dark)
    assert_same_night_files(night, _offline_of(night, tmp_path / "offline"))
    why = _runs.already_done(url, plan_camera_night(night))
    assert why is not None and why.startswith("up to date") and handle.run_id in why, why
    assert _runs.why_reduce(url, plan_camera_night(night)) == "up to date"
    # what the run records is what it reduced: not frames or darks that came after its last look at raw/
    from mascara.reduce import live_inventory

    live_plan = plan_camera_night(night, live=True)
    assert live_inventory(live_plan) == plan_camera_night(night).fingerprint()["raw_inventory_hash"]
    frames = sorted((night / "raw").glob("*LPE.fits"))
    shutil.copyfile(frames[-1], night / "raw" / f"{int(frames[-1].name[:8]) + 1}LPE.fits")
    assert live_inventory(live_plan) is None  # a frame the live plan does not hold
    os.remove(night / "raw" / f"{int(frames[-1].name[:8]) + 1}LPE.fits")
    dark = sorted((night / "raw").glob("calib_*"))[0]
    later = (night / "work" / "context.json").stat().st_mtime_ns + 10**9
    os.utime(dark, ns=(later, later))
    assert live_inventory(live_plan) is None  # written after the master was made
    os.utime(frames[3], ns=(later, later))
    last = sorted(p for p in (night / "raw").glob("*LPE.fits"))[-1]
    os.remove(last)  # raw/ changed since: reduce it again, and say why
    assert _runs.already_done(url, plan_camera_night(night)) is None
    assert "other raw inventory" in _runs.why_reduce(url, plan_camera_night(night))
