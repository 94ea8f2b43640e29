"""Whole-process runs of ``mascprocess``: what a user waits for (issue 12).

Each run is a fresh ``mascprocess`` process on a fresh data directory whose
``raw/`` holds symbolic links to the calibration files and the first frames of
one simulated night, so every run reduces the same pixels from scratch
(catalog, work files, outputs). Measured per run, from outside the process:

- wall time (``time.perf_counter`` around the process);
- CPU seconds of the process and of every process it waited for (the splitter
  beside the reduction, Prefect's temporary server), user + system, from
  ``getrusage(RUSAGE_CHILDREN)``: imports, numba cache loads, prepare, the
  batches, the combine and Prefect all included;
- the largest peak RSS among those processes.

Runs cover two night lengths (the slope between them is the cost of an extra
frame, the intercept the fixed cost of a night) and three drivers,
interleaved and repeated:

- ``library``: ``mascprocess --no-prefect``;
- ``prefect``: ``mascprocess`` without ``PREFECT_API_URL``, so the flow starts
  Prefect's temporary server (a user without a server);
- ``prefect-server``: the same flow against a Prefect server that is already
  running (a station's server, as the nightly deployment runs); the server's
  own CPU during the run is added to the run's.

The start of a Prefect server is measured apart (``server_start``). One
untimed warm-up run first loads (or compiles) every numba kernel into the
on-disk cache; its extra CPU is reported as the JIT charge. A second one,
through the flow and its temporary server, creates Prefect's database in the
Prefect home the timed runs share, as a user's first run does once; its
extra wall and CPU are reported as ``prefect_home_charge``.

    python bench/process.py NIGHT_DIR --frames 100 550 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


_WRAPPER = """
import json, resource, subprocess, sys
rc = subprocess.run(sys.argv[2:]).returncode
u = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write(json.dumps({"user": u.ru_utime, "sys": u.ru_stime, "maxrss_kb": u.ru_maxrss,
                                         "inblock": u.ru_inblock, "majflt": u.ru_majflt}))
sys.exit(rc)
"""


def night_subset(night_dir: Path, dest: Path, nframes: int) -> Path:
    """``dest/<night_id>/raw`` with links to the calibration files and the first ``nframes`` frames."""
    raw = dest / night_dir.name / "raw"
    if dest.exists():
        shutil.rmtree(dest)
    raw.mkdir(parents=True)
    for n in _subset_names(night_dir, nframes):
        (raw / n).symlink_to(night_dir / "raw" / n)
    return dest


def _subset_names(night_dir: Path, nframes: int) -> list[str]:
    """Names in ``night_dir/raw`` of the calibration files and the first ``nframes`` frames."""
    names = sorted(os.listdir(night_dir / "raw"))
    return [n for n in names if n.startswith("calib_")] + [n for n in names if not n.startswith("calib_")][:nframes]


DRIVERS = ("library", "prefect", "prefect-server")
#: Each Prefect driver and the key of its comparison with the library driver in the results.
OVER_LIBRARY = {"prefect-server": "prefect_server_over_library", "prefect": "prefect_over_library"}


class PrefectServer:
    """A ``prefect server start`` process for the ``prefect-server`` runs; how long it took to answer."""

    def __init__(self, home: Path) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/api"
        env = dict(os.environ, PREFECT_HOME=str(home))
        env.pop("PREFECT_API_URL", None)
        t = time.perf_counter()
        self.proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                      str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        import urllib.request

        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server start exited {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - t > 180:
                raise RuntimeError("prefect server did not answer in 180 s")
            time.sleep(0.2)
        self.start_wall = time.perf_counter() - t
        self.start_cpu = self.cpu()

    def cpu(self) -> float:
        """User + system CPU seconds of the server and every process under it, so far."""
        import psutil

        total = 0.0
        try:
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            pass
        return total

    def stop(self) -> None:
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)


def run_once(night_dir: Path, workdir: Path, nframes: int, driver: str, workers: int,
             server: PrefectServer | None = None) -> dict:
    """One ``mascprocess`` run on a fresh copy of the first ``nframes`` frames; its wall, CPU and peak RSS.

    Prefect keeps its home (its database) in ``workdir/../prefect-home`` across runs, as a user's does.
    """
    prefect = driver != "library"
    datadir = night_subset(night_dir, workdir, nframes)
    name = night_dir.name
    cmd = [str(BIN / "mascprocess"), str(datadir), "--night", name[:8], "--site", name[8:10], "--camera", name[10:],
           "--quiet"]
    if not prefect:
        cmd.append("--no-prefect")
    env = dict(os.environ, MASCARA_WORKERS=str(workers), MASCARA_FLOW_WORKERS=str(workers),
               PREFECT_HOME=str(workdir.parent / "prefect-home"))
    env.pop("PREFECT_API_URL", None)  # the temporary server, as a user without a server gets
    env.pop("MASCARA_DB_URL", None)  # each run's own catalog in its data directory (the phases are read there)
    if driver == "prefect-server":
        env["PREFECT_API_URL"] = server.url
    usage = workdir.parent / "usage.json"
    load = os.getloadavg()
    server_cpu = server.cpu() if driver == "prefect-server" else 0.0
    w = time.perf_counter()
    launched = time.time()
    # a small wrapper process reports the usage of its children alone (ru_maxrss never resets in this one)
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, str(usage), *cmd], env=env, capture_output=True,
                          text=True, cwd=str(workdir))
    wall = time.perf_counter() - w
    ended = time.time()
    server_cpu = server.cpu() - server_cpu if driver == "prefect-server" else 0.0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    u = json.loads(usage.read_text())
    res = {"frames": nframes, "driver": driver, "prefect": prefect, "workers": workers, "wall": wall,
           "cpu": u["user"] + u["sys"] + server_cpu, "user": u["user"], "sys": u["sys"], "server_cpu": server_cpu, "rss_mb": u["maxrss_kb"] / 1024,
           # what the run read from the disk rather than the page cache (blocks of 512 bytes), and its major faults
           "disk_read_mb": u.get("inblock", 0) * 512 / 1e6, "major_faults": u.get("majflt", 0), "load_before": load[0],
           "load_after": os.getloadavg()[0], "phases": run_phases(datadir / "catalog.sqlite", launched, ended)}
    shutil.rmtree(datadir, ignore_errors=True)
    return res


#: The phases of a run's wall time, from the times its catalog recorded (:func:`run_phases`).
PHASES = ("start", "prepare", "batches", "combine", "exit")


def run_phases(db: Path, launched: float, ended: float) -> dict[str, float] | None:
    """Wall seconds of a finished one-night run by phase, from its catalog's timestamps (UTC).

    ``start``: launch to the run's registration (imports, Prefect's flow run and start task);
    ``prepare``: to the first batch's start (calibration, camera solution, the splitter's spawn);
    ``batches``: first batch start to last batch end; ``combine``: to the run's end (night files,
    products); ``exit``: to the process's exit (quick-look figures, reports, Prefect's last calls,
    interpreter shutdown). None if the catalog does not say.
    """
    import datetime as dt
    import sqlite3

    def epoch(value: str) -> float:
        t = dt.datetime.fromisoformat(value)
        return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp()

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            run = con.execute("SELECT started_at, finished_at FROM reduction_run").fetchall()
            b0, b1 = con.execute("SELECT min(started_at), max(finished_at) FROM batch").fetchone()
    except sqlite3.Error:
        return None
    if len(run) != 1 or None in (*run[0], b0, b1):
        return None
    r0, r1, b0, b1 = epoch(run[0][0]), epoch(run[0][1]), epoch(b0), epoch(b1)
    return dict(zip(PHASES, (r0 - launched, b0 - r0, b1 - b0, r1 - b1, ended - r1)))


def paired_ratios(runs: list[dict], driver: str, nframes: int) -> dict:
    """``driver`` against the library driver round by round: each round's run over the library's run of the
    same round and length, minus 1, for wall and CPU, with their median.

    The runs of one round follow each other within minutes, so a machine that
    gets slower or faster over the benchmark (this shared one does, by up to
    a quarter within an hour) moves both runs of a pair alike; minima or
    medians taken per driver pair runs from different times.
    """
    out: dict = {}
    for what in ("wall", "cpu"):
        pairs = []
        for x in runs:
            if x["driver"] != driver or x["frames"] != nframes or "round" not in x:
                continue
            lib = [y for y in runs if y["driver"] == "library" and y["frames"] == nframes
                   and y.get("round") == x["round"]]
            if lib:
                pairs.append(x[what] / lib[0][what] - 1.0)
        if pairs:
            out[f"{what}_paired"] = pairs
            out[f"{what}_paired_median"] = statistics.median(pairs)
    return out


def _stats(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "n": len(values), "all": values}


def read_ahead(night_dir: Path, nframes: int) -> dict:
    """Read the files of :func:`night_subset`, so that the run that follows finds them in the page cache.

    Done once before the warm-up and again, untimed, just before every timed
    run. Without it a run may read frames from disk that an earlier one did
    not: in one run of this script the first 564-frame run took 61.0 s wall
    and 91.5 CPU-s, the next one 48.2 s and 75.8 CPU-s. Once before all the
    runs was not enough on a kernel that pages out memory idle for about a
    minute (DAMON): one 564-frame Prefect run read 2.4 GB from disk and took
    42.3 s against 35.5 s for the same run with 0.4 GB, which alone moved
    Prefect's median over the library driver by several per cent.
    """
    files = _subset_names(night_dir, nframes)
    t = time.perf_counter()
    total = 0
    for n in files:
        with open(night_dir / "raw" / n, "rb") as f:
            while chunk := f.read(1 << 23):
                total += len(chunk)
    return {"files": len(files), "bytes": total, "seconds": time.perf_counter() - t}


def measure(night_dir: Path | str, workdir: Path | str, frames: tuple[int, int], repeat: int = 2,
            workers: int = 2, prefect: bool = True, progress=print) -> dict:
    """Interleaved, repeated runs at two night lengths with every driver; slopes, intercepts, projections."""
    night_dir, workdir = Path(night_dir), Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    n1, n2 = sorted(frames)
    drivers = list(DRIVERS) if prefect else ["library"]
    progress(f"[process] reading the first {n2} frames once (page cache) ...")
    cache = read_ahead(night_dir, n2)
    progress(f"[process]   {cache['bytes'] / 1e9:.1f} GB in {cache['seconds']:.1f} s")
    progress(f"[process] warm-up run (numba cache), {n1} frames ...")
    warm = run_once(night_dir, workdir / "warm", n1, "library", workers)
    warm_prefect = None
    if prefect:
        # Prefect's home as a user has it after a first run: its database created (migrations, blocks
        # registered); without this the first timed temporary-server run paid it (start 13.1 s against 6.0 s)
        shutil.rmtree(workdir / "prefect-home", ignore_errors=True)
        progress(f"[process] warm-up run (Prefect's database in its home), {n1} frames ...")
        warm_prefect = run_once(night_dir, workdir / "warm", n1, "prefect", workers)
    server = None
    if prefect:
        shutil.rmtree(workdir / "server-home", ignore_errors=True)
        server = PrefectServer(workdir / "server-home")
        progress(f"[process] a Prefect server answered after {server.start_wall:.1f} s ({server.start_cpu:.1f} CPU-s)")
    runs: list[dict] = []
    try:
        for r in range(repeat):
            for n in (n2, n1) if r % 2 == 0 else (n1, n2):
                for drv in drivers if r % 2 == 0 else drivers[::-1]:
                    progress(f"[process] repeat {r + 1}/{repeat}: {n} frames, {drv} ...")
                    # every run starts with its frames in the page cache, whatever the machine evicted meanwhile
                    ahead = read_ahead(night_dir, n)
                    runs.append(run_once(night_dir, workdir / "run", n, drv, workers, server))
                    runs[-1]["read_ahead_seconds"] = ahead["seconds"]
                    runs[-1]["round"] = r
                    progress(f"[process]   wall {runs[-1]['wall']:.1f} s, CPU {runs[-1]['cpu']:.1f} s, "
                             f"RSS {runs[-1]['rss_mb']:.0f} MB, load {runs[-1]['load_before']:.2f}")
    finally:
        if server is not None:
            server.stop()
    out: dict = {"night": night_dir.name, "frames": [n1, n2], "repeat": repeat, "workers": workers,
                 "page_cache": cache, "warmup": warm, "warmup_prefect": warm_prefect, "runs": runs, "drivers": {}}
    if server is not None:
        out["server_start"] = {"wall": server.start_wall, "cpu": server.start_cpu}
    for key in drivers:
        d: dict = {}
        for n in (n1, n2):
            sel = [x for x in runs if x["driver"] == key and x["frames"] == n]
            d[n] = {"wall": _stats([x["wall"] for x in sel]), "cpu": _stats([x["cpu"] for x in sel]),
                    "rss_mb": max(x["rss_mb"] for x in sel)}
        for what in ("cpu", "wall"):
            for agg in ("min", "median"):
                slope = (d[n2][what][agg] - d[n1][what][agg]) / (n2 - n1)
                d[f"{what}_slope_{agg}"] = slope
                d[f"{what}_fixed_{agg}"] = d[n1][what][agg] - slope * n1
        # a 5,000-frame night from the measured long run plus the measured slope
        for agg in ("min", "median"):
            d[f"wall_5000_{agg}"] = d[n2]["wall"][agg] + (5000 - n2) * d[f"wall_slope_{agg}"]
            d[f"cpu_5000_{agg}"] = d[n2]["cpu"][agg] + (5000 - n2) * d[f"cpu_slope_{agg}"]
        phased = [x["phases"] for x in runs if x["driver"] == key and x["frames"] == n2 and x.get("phases")]
        if phased:
            d["phases"] = {ph: statistics.median(x[ph] for x in phased) for ph in PHASES}
        d["runs"] = {n1: d.pop(n1), n2: d.pop(n2)}
        out["drivers"][key] = d
    lib = out["drivers"]["library"]
    for key, name in OVER_LIBRARY.items():
        if key in out["drivers"]:
            pf = out["drivers"][key]
            out[name] = {f"{what}_{agg}": pf["runs"][n2][what][agg] / lib["runs"][n2][what][agg] - 1.0
                         for what in ("wall", "cpu") for agg in ("min", "median")}
            # the same on a 5,000-frame night, from each driver's measured long run plus its slope
            out[name].update({f"wall_5000_{agg}": pf[f"wall_5000_{agg}"] / lib[f"wall_5000_{agg}"] - 1.0
                              for agg in ("min", "median")})
            out[name].update(paired_ratios(runs, key, n2))
    out["jit_charge_cpu"] = warm["cpu"] - out["drivers"]["library"]["runs"][n1]["cpu"]["median"]
    if warm_prefect is not None:  # a fresh Prefect home, once per installation
        timed = out["drivers"]["prefect"]["runs"][n1]
        out["prefect_home_charge"] = {"wall": warm_prefect["wall"] - timed["wall"]["median"],
                                      "cpu": warm_prefect["cpu"] - timed["cpu"]["median"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("night_dir", type=Path)
    ap.add_argument("--frames", type=int, nargs=2, default=[100, 550])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-prefect", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-data/process"))
    args = ap.parse_args()
    res = measure(args.night_dir.resolve(), args.work, tuple(args.frames), args.repeat, args.workers,
                  not args.no_prefect)
    print(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
