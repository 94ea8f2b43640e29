"""Wall time of a small season reprocessed with ``mascara backfill`` on one and on two workers (issue 15).

Simulates ``--nights`` nights of ``--cameras`` (small frames unless told), then
for each worker count: a fresh copy of the data, a fresh catalog (a schema of
its own on the PostgreSQL server of ``--pg``, as a shared install has), a
Prefect server of its own, ``prefect deploy --all`` of prefect.yaml, N
``prefect worker start --limit 1`` processes, and ``mascara backfill
--wait``. Reports the wall time from submission to the last run's end, the
flow runs' own durations, and CPU seconds of every process (from
``getrusage`` of the children of this script). Prints one JSON report.

    python bench/season.py --nights 4 --cameras E+S --frames 100
    python bench/season.py --workers 1 2 --dask      # also batches on a separate Dask cluster
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import date, timedelta
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def children_cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def pg_schema(server: str) -> str:
    from sqlalchemy import create_engine, text

    schema = f"bench_season_{uuid.uuid4().hex[:8]}"
    eng = create_engine(server, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    eng.dispose()
    return f"{server}?options=-csearch_path%3D{schema}"


def one_season(pristine: Path, nights: str, nworkers: int, work: Path, pg: str | None,
               dask: bool) -> dict:
    work.mkdir(parents=True)
    data = work / "data"
    shutil.copytree(pristine, data)
    db = pg_schema(pg) if pg else f"sqlite:///{data / 'catalog.sqlite'}"
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MASCARA_"))}
    env.update({"PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_API_URL": api, "PREFECT_WORKER_QUERY_SECONDS": "2",
                "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(work / "results")})
    procs = []
    log = open(work / "processes.log", "w")

    def start(cmd: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen([str(c) for c in cmd], env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, **kw)
        procs.append(p)
        return p

    try:
        start([BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)])
        for _ in range(180):
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        subprocess.run([BIN / "prefect", "work-pool", "create", "mascara", "--type", "process"], env=env,
                       check=True, capture_output=True)
        subprocess.run([BIN / "prefect", "--no-prompt", "deploy", "--all"], env=env, cwd=ROOT, check=True,
                       capture_output=True)
        extra = []
        if dask:
            dport = free_port()
            start([BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(dport), "--no-dashboard"])
            start([BIN / "dask", "worker", f"tcp://127.0.0.1:{dport}", "--nworkers", "2", "--nthreads", "1",
                   "--no-dashboard", "--local-directory", str(work / "dask")], cwd=ROOT)
            extra = ["--dask-address", f"tcp://127.0.0.1:{dport}"]
            time.sleep(8)
        for i in range(nworkers):
            start([BIN / "prefect", "worker", "start", "--pool", "mascara", "--limit", "1", "--name", f"w{i}"],
                  cwd=work)
        time.sleep(3)
        cpu0, t0 = children_cpu(), time.perf_counter()
        res = subprocess.run([BIN / "mascara", "backfill", data, "--night", nights, "--db", db, "--json",
                              "--backfill-limit", "0", "--wait", *extra], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            raise RuntimeError(f"backfill failed: {res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        rows = json.loads(res.stdout[res.stdout.index("["):res.stdout.rindex("]") + 1])
        ids = [r["flow_run"] for r in rows if r["state"] == "submitted"]
        runs = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"id": {"any_": ids}}}, timeout=30).json()
        durations = [r["total_run_time"] for r in runs]
    finally:
        for p in reversed(procs):
            stop(p)
        log.close()
    frames = sum(r["frames"] for r in rows if r["state"] == "submitted")
    return {"workers": nworkers, "dask": dask, "camera_nights": len(ids), "frames": frames,
            "wall_s": round(wall, 1), "wall_per_camera_night_s": round(wall / max(1, len(ids)), 1),
            "flow_run_s_median": round(statistics.median(durations), 1) if durations else None,
            "flow_run_s_sum": round(sum(durations), 1),
            "cpu_s_servers_workers_runs": round(children_cpu() - cpu0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nights", type=int, default=4)
    ap.add_argument("--first", default="20260301")
    ap.add_argument("--cameras", default="E+S")
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--size", default="small", choices=["small", "full"])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dask", action="store_true", help="also run the 2-worker season with batches on Dask")
    ap.add_argument("--pg", default=os.environ.get("MASCARA_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
                    help="PostgreSQL server for the catalogs ('' for SQLite)")
    ap.add_argument("--cpu-per-frame", type=float, default=None,
                    help="measured CPU-s per full frame (docs/performance.md) for the projection")
    args = ap.parse_args()

    first = date(int(args.first[:4]), int(args.first[4:6]), int(args.first[6:]))
    nights = [(first + timedelta(days=i)).strftime("%Y%m%d") for i in range(args.nights)]
    work = Path(tempfile.mkdtemp(prefix="bench-season-"))
    pristine = work / "pristine"
    t0 = time.perf_counter()
    subprocess.run([BIN / "mascara", "simulate", pristine, "--night", "+".join(nights), "--site", "LP",
                    "--camera", args.cameras, "--size", args.size, "--frames", str(args.frames), "--seed", "1"],
                   check=True, capture_output=True)
    report = {"command": " ".join(sys.argv), "load_before": os.getloadavg(), "nights": nights,
              "cameras": args.cameras, "size": args.size, "frames_per_camera_night": args.frames,
              "simulate_s": round(time.perf_counter() - t0, 1), "runs": []}
    rng = f"{nights[0]}..{nights[-1]}"
    for n in args.workers:
        report["runs"].append(one_season(pristine, rng, n, work / f"w{n}", args.pg or None, False))
        print(json.dumps(report["runs"][-1]), file=sys.stderr, flush=True)
    if args.dask:
        report["runs"].append(one_season(pristine, rng, max(args.workers), work / "dask", args.pg or None, True))
    report["load_after"] = os.getloadavg()
    if args.cpu_per_frame:
        frames = 450 * 5000
        report["projection_450x5000_full_frames"] = {
            "cpu_hours": round(frames * args.cpu_per_frame / 3600, 1),
            **{f"wall_days_{m}_machines_of_2_cores": round(frames * args.cpu_per_frame / (2 * m) / 86400, 2)
               for m in (1, 2, 4, 8)}}
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
