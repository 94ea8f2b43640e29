"""Issue 15: a season reprocessed by ``mascara backfill`` over two process workers, a PostgreSQL catalog.

Everything is real: the session's Prefect server, prefect.yaml deployed to it,
two ``prefect worker start --limit 1`` processes, a PostgreSQL catalog shared
by every flow run, and (last test) a Dask cluster started as separate
``dask scheduler`` / ``dask worker`` processes.
"""

from __future__ import annotations

import fcntl
import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from flowkit import BIN, REPO, artifacts, stop_process_group
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "catalog"))
from lifecycle_checks import check_invariants  # noqa: E402

pytestmark = [pytest.mark.prefect, pytest.mark.slow, pytest.mark.postgres]

SEASON = ("20260301", "20260302")  # 20260303 has no data: the range below skips and reports it
RANGE = "20260301..20260303"
CAMERAS = ("E", "S")
NIGHTLY = "20260305"


def _run(cmd: list[str], env: dict, check: bool = True, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, **kw)
    if check:
        assert res.returncode == 0, f"{' '.join(map(str, cmd))}: {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _flow_runs(api: str, ids: list[str]) -> dict[str, dict]:
    r = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"id": {"any_": ids}}}, timeout=30)
    r.raise_for_status()
    return {fr["id"]: fr for fr in r.json()}


def _wait_final(api: str, ids: list[str], timeout: float = 900) -> dict[str, dict]:
    t0 = time.perf_counter()
    while True:
        runs = _flow_runs(api, ids)
        if len(runs) == len(ids) and all(fr["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
                                         for fr in runs.values()):
            return runs
        assert time.perf_counter() - t0 < timeout, {i: fr["state_type"] for i, fr in runs.items()}
        time.sleep(2)


def _submitted(stdout: str) -> list[dict]:
    """The rows of ``mascara backfill --json``: its standard output is that JSON alone (the other lines are on
    stderr), so a program reads it with ``json.loads`` (the summary line once followed it)."""
    return json.loads(stdout)


def _taken(log: str) -> set[str]:
    """Flow run ids a worker ran: it logs ``submitting flow run '<id>'`` for each it tries, and
    ``Aborted submission of flow run '<id>'`` when another worker had it first."""
    tried = set(re.findall(r"submitting flow run '([0-9a-f-]{36})'", log))
    return tried - set(re.findall(r"Aborted submission of flow run '([0-9a-f-]{36})'", log))


def _max_overlap(runs: list[dict]) -> int:
    events = []
    for fr in runs:
        events += [(fr["start_time"], 1), (fr["end_time"], -1)]
    best = cur = 0
    for _, d in sorted(events, key=lambda e: (e[0], e[1])):
        cur += d
        best = max(best, cur)
    return best


@pytest.fixture(scope="module")
def season_db(pg_database):
    """A PostgreSQL schema of its own for the season's catalog."""
    schema = f"season_{uuid.uuid4().hex[:10]}"
    admin = create_engine(pg_database, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield f"{pg_database}?options=-csearch_path%3D{schema}"
    with admin.connect() as c:
        c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(scope="module")
def season(prefect_server, season_db, tmp_path_factory):
    """Two small nights of two cameras and a night for the nightly deployment; prefect.yaml deployed."""
    api, env = prefect_server
    root = tmp_path_factory.mktemp("season")
    data, other = root / "data", root / "nightly"
    _run([BIN / "mascara", "simulate", data, "--night", "+".join(SEASON), "--site", "LP", "--camera", "E+S",
          "--size", "small", "--frames", "60", "--seed", "11"], env)
    _run([BIN / "mascara", "simulate", other, "--night", NIGHTLY, "--site", "LP", "--camera", "E",
          "--size", "small", "--frames", "60", "--seed", "12"], env)
    prefect = BIN / "prefect"
    res = _run([prefect, "work-pool", "create", "mascara", "--type", "process"], env, check=False)
    assert res.returncode == 0 or "already exists" in (res.stdout + res.stderr), res.stderr[-2000:]
    _run([prefect, "--no-prompt", "deploy", "--all"], env, cwd=REPO)
    return {"api": api, "env": env, "data": data, "other": other, "db": season_db, "root": root}


def _worker(season: dict, name: str, extra_env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    log = season["root"] / f"{name}.log"
    proc = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "mascara", "--limit", "1",
                             "--name", name], env={**season["env"], **(extra_env or {})}, cwd=season["root"],
                            stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def _backfill(season: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run([BIN / "mascara", "backfill", season["data"], "--night", RANGE, "--site", "LP",
                 "--db", season["db"], "--json", *args], season["env"], check=check, timeout=1200)


def _catalog_runs(db: str) -> dict[str, list[dict]]:
    eng = create_engine(db)
    with eng.connect() as c:
        rows = c.execute(text("SELECT cn.night_dir, r.id, r.status, r.settings_hash, r.flow_run_id "
                              "FROM reduction_run r JOIN camera_night cn ON cn.id = r.camera_night_id "
                              "ORDER BY r.started_at")).mappings().all()
    eng.dispose()
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(Path(r["night_dir"]).name, []).append(dict(r))
    return out


def test_a_season_backfill_shares_two_workers_puts_nightly_first_and_redoes_only_what_changed(season):
    from mascara.catalog import connect

    api, env, db = season["api"], season["env"], season["db"]
    expected = sorted(f"{n}LP{c}" for n in SEASON for c in CAMERAS)

    # 1. submitted while no worker runs: one run per camera-night, the night without data reported
    res = _backfill(season, "--backfill-limit", "1")
    rows = {r["camera_night"]: r for r in _submitted(res.stdout)}
    assert sorted(k for k, r in rows.items() if r["state"] == "submitted") == expected
    assert rows["20260303"]["state"] == "no-data"
    backfill_ids = [rows[k]["flow_run"] for k in expected]
    # --force again while they wait: nothing submitted twice (a second forced run of a camera-night would
    # erase what the first one moved aside)
    again = {r["camera_night"]: r for r in _submitted(_backfill(season, "--force", "--backfill-limit", "1").stdout)}
    assert {k: (r["state"], r["flow_run"]) for k, r in again.items() if k in expected} == {
        k: ("in-progress", rows[k]["flow_run"]) for k in expected}, again
    # --dry-run asks Prefect too: what waits there is not "would submit" (it was, without asking)
    dry = _backfill(season, "--force", "--dry-run")
    assert {k: (r["state"], r["flow_run"]) for k, r in
            ((r["camera_night"], r) for r in _submitted(dry.stdout)) if k in expected} == {
        k: ("in-progress", rows[k]["flow_run"]) for k in expected}, dry.stdout
    assert "would submit 0 camera-night(s)" in dry.stderr, dry.stderr
    # a nightly run submitted after them must still go first
    nightly = _run([BIN / "prefect", "deployment", "run", "reduce-night/nightly", "--param", f"nights={NIGHTLY}",
                    "--param", f"datadir={season['other']}", "--param", f"db_url={db}"], env)
    nightly_id = re.search(r"UUID: ([0-9a-f-]{36})", nightly.stdout).group(1)
    queues = {q["name"]: q for q in httpx.post(f"{api}/work_pools/mascara/queues/filter", json={},
                                               timeout=30).json()}
    assert queues["nightly"]["priority"] < queues["default"]["priority"] < queues["backfill"]["priority"]
    assert queues["backfill"]["concurrency_limit"] == 1

    worker_a, log_a = _worker(season, "worker-a")
    worker_b = None
    try:
        t0 = time.perf_counter()
        # worker B starts once the nightly run is running: picked first by worker A is not enough, since B's
        # process could reach RUNNING before A's (start times 0.35 s apart the other way round were seen)
        while _flow_runs(api, [nightly_id])[nightly_id]["state_type"] in ("SCHEDULED", "PENDING"):
            assert time.perf_counter() - t0 < 120, log_a.read_text()[-3000:]
            time.sleep(0.5)
        worker_b, log_b = _worker(season, "worker-b")
        runs = _wait_final(api, backfill_ids + [nightly_id])
        assert {fr["state_type"] for fr in runs.values()} == {"COMPLETED"}, {
            i: (fr["name"], fr["state_type"], fr["state"]["message"]) for i, fr in runs.items()}
        first_pass = time.perf_counter() - t0
        back = [runs[i] for i in backfill_ids]
        assert runs[nightly_id]["start_time"] < min(fr["start_time"] for fr in back)  # nightly first
        assert _max_overlap(back) == 1  # the backfill queue's global limit held

        # 2. a second backfill has nothing to do
        res = _backfill(season, "--backfill-limit", "0")
        rows = {r["camera_night"]: r for r in _submitted(res.stdout)}
        assert sorted(k for k, r in rows.items() if r["state"] == "up-to-date") == expected, rows
        assert not [r for r in rows.values() if r["state"] == "submitted"]
        # the same from the UI: the reduce-night/backfill deployment, run by a worker, submits nothing either
        res = _run([BIN / "prefect", "deployment", "run", "reduce-night/backfill", "--param", f"nights={RANGE}",
                    "--param", f"datadir={season['data']}", "--param", f"db_url={db}", "--param", "site=LP",
                    "--watch", "--watch-timeout", "300"], env, timeout=400)
        submitter = re.search(r"UUID: ([0-9a-f-]{36})", res.stdout).group(1)
        art = artifacts(api, submitter)["backfill-20260301-20260303"]
        table = json.loads(art["data"]) if isinstance(art["data"], str) else art["data"]
        assert sorted((r["camera_night"], r["state"]) for r in table) == sorted(
            [(k, "up-to-date") for k in expected] + [("20260303", "no-data")])

        # 3. a changed setting reprocesses every camera-night, spread over both workers
        settings = season["root"] / "settings.json"
        settings.write_text(json.dumps({"vmag_slow": 9.5}))
        t1 = time.perf_counter()
        res = _backfill(season, "--settings", settings, "--wait", "--timeout", "900")
        second_pass = time.perf_counter() - t1
        rows = {r["camera_night"]: r for r in _submitted(res.stdout)}
        assert sorted(k for k, r in rows.items() if r["state"] == "submitted") == expected
        redo_ids = [rows[k]["flow_run"] for k in expected]
        redo = _wait_final(api, redo_ids)
        assert {fr["state_type"] for fr in redo.values()} == {"COMPLETED"}
        taken_a, taken_b = _taken(log_a.read_text()), _taken(log_b.read_text())
        assert taken_a & set(redo_ids) and taken_b & set(redo_ids), (taken_a, taken_b)
        assert set(redo_ids) <= taken_a | taken_b and not (taken_a & taken_b)
        print(f"season of {len(expected)} camera-nights: first pass {first_pass:.0f} s (one backfill at a time, "
              f"nightly beside), reprocessing {second_pass:.0f} s on two workers")
    finally:
        stop_process_group(worker_a)
        if worker_b is not None:
            stop_process_group(worker_b)

    # the catalog: every camera-night reduced once per setting, the earlier outputs moved aside
    by_night = _catalog_runs(db)
    for cn in expected:
        runs_ = by_night[cn]
        assert [r["status"] for r in runs_] == ["succeeded", "succeeded"], runs_
        assert runs_[0]["settings_hash"] != runs_[1]["settings_hash"]
        night = season["data"] / cn
        assert (night / "lightcurves" / f"fLC_{cn}.hdf5").is_file()
        assert (night / "lightcurves_old" / f"fLC_{cn}.hdf5").is_file()
    with connect(db) as cat:
        # camera LPE in March: the two backfilled nights and the nightly one (same catalog)
        (month,) = [r for r in cat.season(RANGE) if r["camera"] == "LPE"]
        status = {r["night"] + r["camera"]: r for r in cat.night_status()}
        assert month["month"] == "202603" and month["done"] == 3 and month["failed"] == 0
        assert month["camera_nights"] == 3 and month["pending"] == month["running"] == 0
        assert month["frames"] == sum(status[f"{n}LPE"]["frames_ok"] for n in (*SEASON, NIGHTLY)) > 0
        assert month["cpu_seconds"] > 0
        finished = {r["id"] for runs_ in by_night.values() for r in runs_ if r["status"] == "succeeded"}
        check_invariants(cat, finished)


def test_a_backfill_runs_its_batches_on_an_existing_dask_cluster(season, tmp_path):
    """``mascara backfill --dask-address``: the batches of each camera-night run on a separate Dask cluster."""
    from distributed import Client

    from flowkit import free_port

    env = season["env"]
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    sched = subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                              "--no-dashboard"], env=env, stdout=open(tmp_path / "scheduler.log", "w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
    dworkers = subprocess.Popen([str(BIN / "dask"), "worker", address, "--nworkers", "2", "--nthreads", "1",
                                 "--no-dashboard", "--local-directory", str(tmp_path / "dask")], env=env, cwd=REPO,
                                stdout=open(tmp_path / "workers.log", "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
    worker, _ = _worker(season, "worker-dask")
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            res = _run([BIN / "mascara", "backfill", season["data"], "--night", SEASON[0], "--site", "LP",
                        "--db", season["db"], "--json", "--force", "--backfill-limit", "0", "--dask-address",
                        address, "--wait", "--timeout", "900"], env, timeout=1200)
            prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
            # the night directories' locks were held by the flow runs' processes, not left on a Dask worker
            # that outlives them: each is free while the cluster still runs
            for c in CAMERAS:
                with open(season["data"] / f"{SEASON[0]}LP{c}" / ".mascara.lock", "rb") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if one leaked
    finally:
        stop_process_group(worker)
        stop_process_group(dworkers)
        stop_process_group(sched)
    rows = _submitted(res.stdout)
    assert sorted(r["camera_night"] for r in rows if r["state"] == "submitted") == [f"{SEASON[0]}LP{c}"
                                                                                   for c in CAMERAS]
    assert {"batch_task", "combine_task"} <= set(prefixes), prefixes
    by_night = _catalog_runs(season["db"])
    for c in CAMERAS:
        assert by_night[f"{SEASON[0]}LP{c}"][-1]["status"] == "succeeded"


def test_a_backfill_run_prefect_still_calls_running_after_its_process_died_does_not_block_the_night(season,
                                                                                                    tmp_path):
    """A worker's machine went down: Prefect keeps the flow run Running, the catalog knows its process is gone.
    The backfill submitted nothing for that camera-night ('in-progress') until someone cancelled the run by
    hand. Now it marks the dead run Crashed and submits the night again; a run still queued, or Running
    with a live process, keeps the night in progress."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Running

    from flows.backfill import NIGHT_DEPLOYMENT, TAG_PREFIX, Entry, submit
    from mascara.catalog import connect

    night_id = f"{SEASON[0]}LPE"
    night_path = season["data"] / night_id
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    created, run = [], None
    with temporary_settings(updates={PREFECT_API_URL: season["api"]}), get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(NIGHT_DEPLOYMENT)
            zombie = client.create_flow_run_from_deployment(dep.id, name="zombie", tags=["backfill",
                                                                                           TAG_PREFIX + night_id])
            created.append(zombie.id)
            client.set_flow_run_state(zombie.id, Running(), force=True)
            with connect(season["db"]) as cat:
                cn = cat.register_camera_night("LP", "E", SEASON[0], night_path)
                run = cat.start_run(cn, fingerprint={"code_version": "x", "settings_hash": "y", "catalogue_hash": "z",
                                                     "raw_inventory_hash": "w"}, settings={}, versions={},
                                    host=__import__("socket").gethostname(), flow_run_id=str(zombie.id),
                                    pid=gone.pid)
            entry = Entry(night_id, "submit", night_path=str(night_path))
            submit([entry], season["data"], db_url=season["db"])
            assert entry.state == "submitted", entry
            created.append(entry.flow_run_id)
            assert f"process {gone.pid} on this host is gone" in entry.reason and "marked Crashed" in entry.reason
            assert client.read_flow_run(zombie.id).state.type.value == "CRASHED"
            # the new run is queued: the next backfill leaves the night to it
            again = Entry(night_id, "submit", night_path=str(night_path))
            submit([again], season["data"], db_url=season["db"])
            assert (again.state, again.flow_run_id) == ("in-progress", entry.flow_run_id), again
        finally:
            for fr in filter(None, created):
                client.delete_flow_run(fr)
            if run is not None:
                with connect(season["db"]) as cat:
                    cat.finish_run(run, "failed", error="test: released")
