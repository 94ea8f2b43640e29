"""The reduce-night flow run through ``mascprocess`` against a real Prefect server.

Resume after SIGKILL, retry of a transient failure, the Dask task runner; every
run's fLC/sLC content is compared with an uninterrupted run of the plain
library driver (``mascprocess --no-prefect``).
"""

from __future__ import annotations

import os
import pickle
import signal
import sqlite3
import subprocess
import time

import cloudpickle
import pytest
from prefect.states import Completed, Failed, Pending
from sqlalchemy.exc import OperationalError

from flows.reduce_night import retry_on_transient
from flowkit import (
    BIN,
    NIGHT,
    NIGHT_ID,
    assert_same_night_files,
    batch_rows,
    fresh_copy,
    mascprocess,
    night_status,
    runs,
    task_runs,
)


def _batch_name(b: int) -> str:
    return f"batch-{NIGHT_ID}-{b:07d}"


# --------------------------------------------------------------------------- retry policy (no server)


@pytest.mark.parametrize("exc, retry", [
    (OSError("disk hiccup"), True),
    (TimeoutError("nfs"), True),
    (OperationalError("SELECT 1", None, ConnectionError("server closed the connection")), True),
    (ValueError("bad data"), False),
    (KeyError("LSTSEQ"), False),
    # no wait mends these (an outside trial: a read-only night directory was retried for 75 s)
    (PermissionError(13, "Permission denied", "/data/20260301LPE/work"), False),
    (OSError(30, "Read-only file system", "/data/20260301LPE/work"), False),
    (NotADirectoryError(20, "Not a directory", "/data/20260301LPE/work"), False),
    (OSError(28, "No space left on device"), True),
])
def test_retry_only_on_transient_errors(exc, retry):
    assert retry_on_transient(None, None, Failed(data=exc)) is retry


def test_a_process_that_outlives_a_flow_run_plans_the_night_again_for_the_next(pristine_night, tmp_path, monkeypatch):
    """The plan is shared by one flow run's tasks, not by every run of a long-lived process (a Dask worker)."""
    from corpus import linked_copy
    from flowkit import NIGHT_ID

    from flows.reduce_night import _plan, _settings_json

    night = linked_copy(pristine_night, tmp_path / "data") / NIGHT_ID
    sjson = _settings_json(None)
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "run-1")
    first = _plan(str(night), sjson)
    assert _plan(str(night), sjson) is first  # the run's tasks share it
    last = sorted(p for p in (night / "raw").iterdir() if p.name.endswith(f"{NIGHT_ID[-3:]}.fits"))[-1]
    last.rename(last.with_name(last.name + ".archived"))  # the inventory changes between two runs
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "run-2")
    second = _plan(str(night), sjson)
    assert len(second.frames) == len(first.frames) - 1


def test_a_split_task_that_comes_after_its_run_stopped_the_splitter_starts_none(tmp_path):
    """A split task queued, or retried, after the night's combine or end started a new splitter process
    (a review): the stopped run's splitter is closed for good, so nothing is split under work/ after it."""
    from types import SimpleNamespace

    from flows import reduce_night as rn

    plan = SimpleNamespace(night=SimpleNamespace(path=tmp_path / "20260301LPE"))
    rn.stop_splitter(str(plan.night.path), "run-stopped", clean=True)
    assert rn._splitter_process(plan, "run-stopped", "sqlite://") is None
    assert os.path.realpath(plan.night.path) not in rn._SPLITTERS


def test_a_split_task_of_a_run_that_lost_its_lease_starts_no_splitter(tmp_path):
    """A review: a run that stalled past its lease while another run took the camera-night over kept
    splitting into the work/ the new run owns. Its split tasks now find it without the lease, close its
    splitter and start none."""
    from types import SimpleNamespace

    from flows import reduce_night as rn
    from mascara.catalog import connect

    url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    cat = connect(url)
    cn = cat.register_camera_night("LP", "E", "20260301", str(tmp_path / "20260301LPE"))
    fp = {"code_version": "c", "settings_hash": "s", "catalogue_hash": "k", "raw_inventory_hash": "r"}
    run = cat.start_run(cn, fp, {}, {}, "h", lease_seconds=0.5)
    assert cat.holds_lease(run)
    time.sleep(0.6)
    taker = cat.start_run(cn, fp, {}, {}, "h2")  # the expired lease taken over
    assert cat.holds_lease(taker) and not cat.holds_lease(run)
    plan = SimpleNamespace(night=SimpleNamespace(path=tmp_path / "20260301LPE"))
    assert rn._splitter_process(plan, run, url) is None
    assert run in rn._SPLITTERS_CLOSED
    cat.close()


def test_a_split_that_returns_after_its_run_was_stopped_draws_no_figure(pristine_night, tmp_path, monkeypatch):
    """A review: a split thread still waiting when its run was stopped (interrupted, failed) redrew the night's
    quick-look figures after the flow had released the night. It now draws them only while the run's
    splitter is open."""
    import logging
    from types import SimpleNamespace

    from corpus import linked_copy

    from flows import _runs
    from flows import reduce_night as rn

    night = linked_copy(pristine_night, tmp_path / "data") / NIGHT_ID
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "run-quicklook")
    drawn = []
    monkeypatch.setattr(_runs, "draw_quicklook", lambda path, logger, every=0.0: drawn.append(path) or {})
    monkeypatch.setattr(rn, "_splitter_process", lambda plan, run_id, db_url: None)  # no process in this test
    handle = SimpleNamespace(night_path=str(night), run_id="run-open", db_url="sqlite://")
    items = [(str(night / "work" / "batches" / "batch_0.h5"), "0" * 64)]
    out = rn.split_batches(NIGHT_ID, handle, rn._settings_json(None), items, True, logging.getLogger("t"))
    assert len(out["errors"]) == 1 and len(drawn) == 1  # an open run's split redraws (when due)
    rn.stop_splitter(str(night), "run-stopped", clean=False)
    handle.run_id = "run-stopped"
    out = rn.split_batches(NIGHT_ID, handle, rn._settings_json(None), items, True, logging.getLogger("t"))
    assert len(out["errors"]) == 1 and len(drawn) == 1, drawn


def test_batch_threads_from_the_environment(monkeypatch):
    from flows.reduce_night import BatchThreadPool, flow_workers, task_runner_for

    monkeypatch.setenv("MASCARA_FLOW_WORKERS", "3")
    runner = task_runner_for(None)
    assert isinstance(runner, BatchThreadPool) and runner.batch_slots == 3
    assert runner.duplicate().batch_slots == 3  # Prefect copies the runner for each flow run
    for bad in ("1.5", "0", "two"):
        monkeypatch.setenv("MASCARA_FLOW_WORKERS", bad)
        with pytest.warns(UserWarning, match="MASCARA_FLOW_WORKERS"):
            assert flow_workers() == (os.cpu_count() or 2)


def test_completed_states_are_not_retried():
    assert retry_on_transient(None, None, Completed(data=1)) is False


def test_a_retry_is_announced_as_a_warning_naming_the_task_the_error_and_the_delay(caplog):
    from types import SimpleNamespace

    from flows.reduce_night import batch_task

    run = SimpleNamespace(name="batch-20260301LPE-1302300", run_count=2)
    exc = OSError(28, "No space left on device")
    with caplog.at_level("WARNING"):
        assert retry_on_transient(batch_task, run, Failed(data=exc)) is True
        assert retry_on_transient(batch_task, run, Failed(data=ValueError("bad data"))) is False
    (rec,) = caplog.records  # nothing for an error that is not retried
    assert rec.levelname == "WARNING"
    assert rec.getMessage() == ("batch-20260301LPE-1302300 failed (OSError: [Errno 28] No space left on device); "
                                "retry 2 of 3 in about 20 s")


def test_a_start_task_refused_by_another_run_is_told_by_the_exception_type():
    from datetime import datetime, timezone

    from flows.reduce_night import _refused, _state_failure
    from mascara.catalog import LeaseHeld
    from mascara.nightlock import NightLocked

    now = datetime.now(timezone.utc)
    held = LeaseHeld("LPE night 20260301 is being reduced by run r1 on host b", run_id="r1", host="b", since=now,
                     expires_at=now)
    for exc in (held, NightLocked("held by run r1 of catalog sqlite:///a.sqlite")):
        got, text = _state_failure(Failed(data=exc))
        assert got is exc and text.startswith(type(exc).__name__ + ": ") and _refused(got, text)
    # an error of its own is a failure, whatever its text says
    own = OSError(5, "Input/output error: /data/NightLocked/20260301LPE")
    assert not _refused(*_state_failure(Failed(data=own)))
    # only a state without an exception is told by its message: Prefect's stand-ins, an unfinished state
    assert _state_failure(Failed(message="LeaseHeld: run r1"))[0] is None
    assert _refused(*_state_failure(Failed(message="LeaseHeld: run r1")))
    assert not _refused(*_state_failure(Failed(message="crashed")))
    assert _refused(*_state_failure(Pending(message="LeaseHeld: run r1")))
    assert not _refused(*_state_failure(Pending()))


@pytest.mark.parametrize("dumps, loads", [(pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)])
def test_a_refusal_keeps_its_type_and_fields_on_the_way_back_from_a_dask_worker(dumps, loads):
    """A review found LeaseHeld could not be unpickled (keyword-only fields): a start task refused on a Dask
    worker came back as a Pending task run, and the night was reported failed instead of locked."""
    from datetime import datetime, timezone

    from flows.reduce_night import _refused, _state_failure
    from mascara.catalog import LeaseHeld
    from mascara.nightlock import NightLocked

    now = datetime.now(timezone.utc)
    held = LeaseHeld("held by run r1", run_id="r1", host="b", since=now, expires_at=now)
    back = loads(dumps(held))
    assert type(back) is LeaseHeld and str(back) == str(held)
    assert (back.run_id, back.host, back.since, back.expires_at) == ("r1", "b", now, now)
    locked = loads(dumps(NightLocked("held by run r1", "/data/n/.mascara.lock", {"run": "r1"})))
    assert type(locked) is NightLocked and locked.holder == {"run": "r1"}
    for exc in (back, locked):
        assert _refused(*_state_failure(Failed(data=exc)))


# --------------------------------------------------------------------------- with a server


@pytest.mark.prefect
@pytest.mark.slow
def test_resume_after_sigkill_runs_only_unfinished_batches(prefect_server, pristine_night, reference, tmp_path):
    api, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    # one batch at a time, so that killing after the first leaves work undone
    cmd = [str(BIN / "mascprocess"), str(datadir), "--night", NIGHT, "--camera", "E", "--site", "LP", "-q"]
    proc = subprocess.Popen(cmd, env={**env, "MASCARA_FLOW_WORKERS": "1"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "killed.log", "w"))
    deadline = time.time() + 400
    done: set[int] = set()
    try:
        while not done:
            assert proc.poll() is None, f"run ended before it was killed: {(tmp_path / 'killed.log').read_text()}"
            assert time.time() < deadline, "no batch finished in time"
            time.sleep(0.3)
            try:
                rows, (run,) = batch_rows(datadir), runs(datadir)
            except (sqlite3.OperationalError, ValueError):
                continue  # catalog not created yet
            finished = {b for b, r in rows.items() if r["status"] == "succeeded"}
            if finished and run["flow_run_id"]:
                # wait until Prefect has the result too (persisted before the state turns Completed)
                states = task_runs(api, run["flow_run_id"])
                done = {b for b in finished if any(t["state_type"] == "COMPLETED" for t in states.get(_batch_name(b), []))}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = batch_rows(datadir)
    assert 0 < len(done) < len(before), before

    mascprocess(datadir, env, "-q")

    after = batch_rows(datadir)
    assert all(r["status"] == "succeeded" for r in after.values()), after
    for b in done:  # never recomputed
        assert after[b]["tries"] == 1 and after[b]["sha256"] == before[b]["sha256"]
    for b in set(after) - done:
        assert after[b]["tries"] == (2 if before[b]["status"] == "running" else 1), (b, before[b], after[b])
    first, second = runs(datadir)
    assert first["status"] == "failed" and "abandoned" in first["error"]
    assert second["status"] == "succeeded"
    states = task_runs(api, second["flow_run_id"])
    for b in after:
        (st,) = states[_batch_name(b)]
        if b in done:
            assert st["state_name"] == "Cached", (b, st)
        else:
            assert st["state_name"] == "Completed" and st["run_count"] == 1, (b, st)
    # resumed, not moved aside
    outputs = sorted(p.name for p in (datadir / NIGHT_ID).iterdir() if p.name != ".mascara.lock")
    assert outputs == ["astrometry", "lightcurves", "quicklook", "raw", "work"]
    assert_same_night_files(datadir / NIGHT_ID, reference)


@pytest.mark.prefect
@pytest.mark.slow
def test_transient_failure_is_retried_and_the_night_completes(prefect_server, pristine_night, reference, tmp_path):
    from mascara.reduce import plan_camera_night

    api, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    batches = sorted(plan_camera_night(datadir / NIGHT_ID).batches)
    victim = batches[1]
    res = mascprocess(datadir, {**env, "MASCARA_FLOW_FAULT": f"{NIGHT_ID}:{victim}:1"}, "-q")
    # the retry is said even with -q (Prefect's own line is at INFO)
    assert f"{_batch_name(victim)} failed (InjectedFault: injected transient failure" in res.stderr, res.stderr[-3000:]
    assert "retry 1 of 3 in about" in res.stderr, res.stderr[-3000:]

    rows = batch_rows(datadir)
    assert rows[victim] == {**rows[victim], "status": "succeeded", "tries": 2}
    assert all(rows[b]["tries"] == 1 for b in batches if b != victim)
    assert night_status(datadir)["state"] == "succeeded"
    (run,) = runs(datadir)
    (st,) = task_runs(api, run["flow_run_id"])[_batch_name(victim)]
    assert st["state_type"] == "COMPLETED" and st["run_count"] == 2
    assert_same_night_files(datadir / NIGHT_ID, reference)


def _flow_logs(api: str, flow_run_id: str) -> list[str]:
    """The messages of a flow run's logs (its tasks' included), as the UI shows them."""
    import httpx

    res = httpx.post(f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200},
                     timeout=30)
    res.raise_for_status()
    return [r["message"] for r in res.json()]


def _split_times(night) -> dict[int, float]:
    """When each batch's star-by-star pieces were written (``work/split/``, by the splitter's registry)."""
    from mascara.lightcurves import StarSplitter

    store = StarSplitter(night / "work")
    return {b: max(os.stat(store.splitdir / name).st_mtime for name in store.entry(b)["files"].values())
            for b in store.batches}


@pytest.mark.prefect
@pytest.mark.slow
def test_batches_are_split_while_the_night_goes_on(prefect_server, pristine_night, reference, tmp_path):
    """One batch thread: each finished batch is split beside the next one, not after the night's last batch,
    and on the flow's thread pool without a task run per split (issue 12: each costs Prefect's server CPU
    on the cores that reduce)."""
    from datetime import datetime

    from mascara.reduce import plan_camera_night

    api, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    plan = plan_camera_night(datadir / NIGHT_ID)
    batches = sorted(plan.batches)
    assert len(batches) >= 3
    # the last batch fails once, and is retried 3 s later: splits done only at the night's end (by the combine)
    # would come after its file
    mascprocess(datadir, {**env, "MASCARA_FLOW_WORKERS": "1", "MASCARA_RETRY_BACKOFF": "3",
                          "MASCARA_FLOW_FAULT": f"{NIGHT_ID}:{batches[-1]}:1"}, "-q")
    (run,) = runs(datadir)
    tr = task_runs(api, run["flow_run_id"])

    def span(name):
        (st,) = tr[name]
        assert st["state_type"] == "COMPLETED", (name, st)
        return datetime.fromisoformat(st["start_time"]), datetime.fromisoformat(st["end_time"])

    spans = [span(_batch_name(b)) for b in batches]
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end  # one batch at a time
    assert not [name for name in tr if name.startswith("split-")], sorted(tr)
    assert sorted(tr) == sorted([f"start-{NIGHT_ID}", f"prepare-{NIGHT_ID}", f"combine-{NIGHT_ID}",
                                 *map(_batch_name, batches)])
    split_at = _split_times(datadir / NIGHT_ID)
    assert sorted(split_at) == batches
    # the first batches were split while the last one was still being reduced, not by the combine
    last = os.stat(plan.batch_path(batches[-1])).st_mtime
    assert max(split_at[b] for b in batches[:-1]) < last - 1.5, (split_at, last)
    assert night_status(datadir)["state"] == "succeeded"
    assert_same_night_files(datadir / NIGHT_ID, reference)


@pytest.mark.prefect
@pytest.mark.slow
def test_the_flow_splits_in_a_process_of_its_own_whose_death_costs_the_night_nothing(prefect_server, pristine_night,
                                                                                     reference, tmp_path):
    """On the flow's thread pool a night's batches are split by its splitter process, as the library driver
    splits them (issue 12: not under the flow process's GIL, beside its batch threads). Killed there, it takes
    only itself: the flow run's logs say which batches were not split, and the combine splits what the store
    lacks."""
    api, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    res = mascprocess(datadir, {**env, "MASCARA_FAULT": "splitting:kill", "MASCARA_FLOW_WORKERS": "1"})
    out = res.stdout + res.stderr
    assert "the splitter process ended (exit code -9)" in out, out[-3000:]
    assert night_status(datadir)["state"] == "succeeded"
    (run,) = runs(datadir)
    logs = _flow_logs(api, run["flow_run_id"])
    assert [m for m in logs if "the splitter process ended (exit code -9)" in m], logs
    assert sorted(_split_times(datadir / NIGHT_ID)) == sorted(batch_rows(datadir))  # the combine split the rest
    assert_same_night_files(datadir / NIGHT_ID, reference)


_FAILING_SPLIT = """
import json, sys
import flows.reduce_night as rn

calls = []
real = rn._splitter_process

def failing(plan, run_id, db_url):
    calls.append(run_id)
    if len(calls) == 2:  # the first split of a batch (the first call starts the splitter as the night begins)
        raise OSError(5, "Input/output error (injected)", str(plan.workdir))
    return real(plan, run_id, db_url)

rn._splitter_process = failing
state = rn.reduce_night(datadir=sys.argv[1], nights=sys.argv[2], cameras="E", site="LP", return_state=True)
print(json.dumps({"type": state.type.value, "calls": len(calls),
                  "flow_run_id": str(state.state_details.flow_run_id)}))
"""


@pytest.mark.prefect
@pytest.mark.slow
def test_a_split_that_raises_in_the_flows_thread_is_logged_and_the_night_goes_on(prefect_server, pristine_night,
                                                                                 reference, tmp_path):
    """A split that fails outright (the splitter could not be started: an I/O error) in the flow's thread: the
    batches it held are named in the run's logs and split by the combine, the next split starts afresh, and
    the night is the same as an uninterrupted one."""
    import json
    import sys
    from pathlib import Path

    from mascara.reduce import plan_camera_night

    api, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    res = subprocess.run([sys.executable, "-c", _FAILING_SPLIT, str(datadir), NIGHT], capture_output=True, text=True,
                         env={**env, "MASCARA_FLOW_WORKERS": "1"}, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["type"] == "COMPLETED", (out, res.stderr[-3000:])
    assert out["calls"] >= 3  # the next split asked for a splitter again
    logs = _flow_logs(api, out["flow_run_id"])
    first = Path(plan_camera_night(datadir / NIGHT_ID).batch_path(min(batch_rows(datadir)))).name
    assert [m for m in logs if f"batch(es) not split now ({first}" in m and "Input/output error (injected)" in m], logs
    assert night_status(datadir)["state"] == "succeeded"
    assert sorted(_split_times(datadir / NIGHT_ID)) == sorted(batch_rows(datadir))
    assert_same_night_files(datadir / NIGHT_ID, reference)


@pytest.mark.prefect
@pytest.mark.slow
def test_dask_runner_on_a_local_cluster_gives_the_same_result(prefect_server, pristine_night, reference, tmp_path,
                                                             monkeypatch):
    from distributed import Client, LocalCluster

    _, env = prefect_server
    for k, v in env.items():  # the Dask workers run Prefect tasks: they need the API and result storage
        monkeypatch.setenv(k, v)
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        res = mascprocess(datadir, env, "-q", "--dask-address", cluster.scheduler_address)
        print(f"dask run: {res.seconds:.1f} s")
        with Client(cluster) as client:
            prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert {"batch_task", "combine_task"} <= set(prefixes)  # the batches ran on the cluster
    assert night_status(datadir)["state"] == "succeeded"
    assert_same_night_files(datadir / NIGHT_ID, reference)
