"""What a task costs on an existing Dask cluster against the thread runner (issue 15).

Starts a Prefect server, a ``dask scheduler`` and ``dask worker`` processes of
their own, then measures, interleaved and repeated:

1. a flow of ``--tasks`` trivial tasks (each returns a small dict) with
   ``ThreadPoolTaskRunner(2)`` and with ``DaskTaskRunner(address=...)``:
   the wall time per task is Prefect's and Dask's own cost (submission, state
   reports, result transfer);
2. ``mascprocess`` of one small night (``--frames``) with threads and with
   ``--dask-address``: the cost on real batches, where each task also ships
   the run handle and loads the night's context in the Dask worker.

Prints one JSON report.

    python bench/dask_tasks.py --tasks 40 --frames 200 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trivial_flow(ntasks: int, address: str | None) -> float:
    """Wall seconds of a flow of ``ntasks`` trivial tasks (after one warm-up task)."""
    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    @task(persist_result=False)
    def tiny(i: int) -> dict:
        return {"i": i}

    if address:
        from prefect_dask import DaskTaskRunner

        runner = DaskTaskRunner(address=address)
    else:
        runner = ThreadPoolTaskRunner(max_workers=2)

    @flow(task_runner=runner, persist_result=False)
    def many(n: int) -> float:
        tiny.submit(-1).result()
        t0 = time.perf_counter()
        futs = [tiny.submit(i) for i in range(n)]
        for f in futs:
            f.result()
        return time.perf_counter() - t0

    return many(ntasks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=40)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dask-workers", type=int, default=2)
    args = ap.parse_args()

    if os.environ.get("MASCARA_BENCH_CHILD"):
        print(json.dumps({"seconds": trivial_flow(args.tasks, os.environ.get("MASCARA_BENCH_DASK") or None)}))
        return

    work = Path(tempfile.mkdtemp(prefix="bench-dask-"))
    port, dport = free_port(), free_port()
    api, address = f"http://127.0.0.1:{port}/api", f"tcp://127.0.0.1:{dport}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MASCARA_"))}
    env.update({"PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_API_URL": api, "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(work / "results"),
                "PREFECT_LOGGING_LEVEL": "WARNING", "PYTHONPATH": str(ROOT / "bench")})
    log = open(work / "processes.log", "w")
    procs = []
    for cmd, cwd in (([BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], work),
                     ([BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(dport), "--no-dashboard"], work),
                     ([BIN / "dask", "worker", address, "--nworkers", str(args.dask_workers), "--nthreads", "1",
                       "--no-dashboard", "--local-directory", str(work / "dask")], ROOT / "bench")):
        procs.append(subprocess.Popen([str(c) for c in cmd], env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    try:
        for _ in range(180):
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        time.sleep(5)
        subprocess.run([BIN / "mascara", "simulate", work / "pristine", "--night", "20260301", "--site", "LP",
                        "--camera", "E", "--size", "small", "--frames", str(args.frames), "--seed", "1"],
                       check=True, capture_output=True)
        trivial: dict[str, list[float]] = {"threads": [], "dask": []}
        night: dict[str, list[float]] = {"threads": [], "dask": []}
        load = [os.getloadavg()[0]]
        for rep in range(args.repeat):
            for kind in ("threads", "dask"):
                child = {**env, "MASCARA_BENCH_CHILD": "1", "MASCARA_BENCH_DASK": address if kind == "dask" else ""}
                out = subprocess.run([sys.executable, __file__, "--tasks", str(args.tasks)], env=child,
                                     capture_output=True, text=True, cwd=ROOT / "bench")
                if out.returncode != 0:
                    raise RuntimeError(out.stderr[-3000:])
                line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
                trivial[kind].append(json.loads(line)["seconds"] / args.tasks)
                data = work / f"night-{kind}-{rep}"
                shutil.copytree(work / "pristine", data)
                extra = ["--dask-address", address] if kind == "dask" else []
                t0 = time.perf_counter()
                res = subprocess.run([BIN / "mascprocess", data, "--night", "20260301", "--camera", "E", "--site",
                                      "LP", "-q", *extra], env={**env, "PYTHONPATH": ""}, capture_output=True,
                                     text=True)
                if res.returncode != 0:
                    raise RuntimeError(res.stderr[-3000:])
                night[kind].append(time.perf_counter() - t0)
                load.append(os.getloadavg()[0])
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        log.close()
    from mascara.rawio import parse_night_dir
    from mascara.reduce import plan_camera_night

    nbatches = len(plan_camera_night(parse_night_dir(work / "pristine" / "20260301LPE")).batches)
    report = {
        "command": " ".join(sys.argv), "load_1min": load, "dask_workers": args.dask_workers,
        "trivial_task_ms": {k: {"min": round(1e3 * min(v), 1), "median": round(1e3 * statistics.median(v), 1)}
                            for k, v in trivial.items()},
        "small_night_wall_s": {k: {"min": round(min(v), 1), "median": round(statistics.median(v), 1)}
                               for k, v in night.items()},
        "small_night": {"frames": args.frames, "batches": nbatches},
    }
    d = report["small_night_wall_s"]
    report["dask_extra_s_per_batch_median"] = round((d["dask"]["median"] - d["threads"]["median"]) / nbatches, 2)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
