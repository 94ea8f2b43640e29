"""Helpers of the orchestration tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NIGHT = "20260301"
NIGHT_ID = "20260301LPE"
SERVER_START_TIMEOUT = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL it (a Prefect worker ignores the first SIGTERM a while)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@contextlib.contextmanager
def running(cmd: list[str], env: dict | None = None) -> Iterator[subprocess.Popen]:
    """``cmd`` started in the background (text pipes); killed on leaving if it still runs (a failed
    assertion while it was waited for)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def terminate(proc: subprocess.Popen, timeout: float = 60) -> str:
    """SIGTERM to ``proc``, as an operator's ``kill`` would; waits for its exit and returns its stderr."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=timeout)
    return err


def fresh_copy(pristine: Path, dest: Path) -> Path:
    shutil.copytree(pristine, dest)
    return dest


def mascprocess_cmd(datadir: Path, *args: str) -> list[str]:
    """``mascprocess`` of the test night's camera E at LP, with ``args``."""
    return [str(BIN / "mascprocess"), str(datadir), "--night", NIGHT, "--camera", "E", "--site", "LP", *args]


def mascprocess(datadir: Path, env: dict, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = mascprocess_cmd(datadir, *args)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    res.seconds = time.perf_counter() - t0  # type: ignore[attr-defined]
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


# --------------------------------------------------------------------------- queries


def batch_rows(datadir: Path) -> dict[int, dict]:
    """Batch rows of the catalog: batch -> {status, tries, sha256} (one fingerprint per test night)."""
    with sqlite3.connect(f"file:{datadir / 'catalog.sqlite'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT batch_index, status, tries, sha256 FROM batch").fetchall()
    return {b: {"status": s, "tries": t, "sha256": h} for b, s, t, h in rows}


def runs(datadir: Path) -> list[dict]:
    with sqlite3.connect(f"file:{datadir / 'catalog.sqlite'}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM reduction_run ORDER BY started_at")]


def night_status(datadir: Path) -> dict:
    from mascara.catalog import connect

    with connect(datadir=datadir) as cat:
        (row,) = cat.night_status(NIGHT)
    return row


def task_runs(api: str, flow_run_id: str) -> dict[str, dict]:
    """Task runs of a flow run by name: state type/name, run count, start and end (the server's REST API)."""
    r = httpx.post(f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200},
                   timeout=30)
    r.raise_for_status()
    out = {}
    for t in r.json():
        out.setdefault(t["name"], []).append({"state_type": t["state_type"], "state_name": t["state_name"],
                                              "run_count": t["run_count"], "start_time": t["start_time"],
                                              "end_time": t["end_time"]})
    return out


def flow_run_state(api: str, flow_run_id: str) -> str:
    """The state type of a flow run (the server's REST API): ``RUNNING``, ``COMPLETED``, ``CRASHED``..."""
    r = httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=30)
    r.raise_for_status()
    return r.json()["state_type"]


def artifacts(api: str, flow_run_id: str) -> dict[str, dict]:
    r = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}},
                   timeout=30)
    r.raise_for_status()
    return {a["key"]: a for a in r.json() if a["key"]}


# --------------------------------------------------------------------------- night files


def night_file_content(path: Path) -> dict[str, bytes | dict]:
    """The SPEC §8 content of a night file: global attrs and every dataset's bytes (root attrs excluded)."""
    out: dict[str, bytes | dict] = {}
    with h5py.File(path, "r") as f:
        out["global"] = {k: np.asarray(v).tolist() for k, v in f["global"].attrs.items()}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                arr = obj[()]
                out[name] = (str(arr.dtype), np.asarray(arr).tobytes())

        for group in ("data", "header", "header_table"):
            f[group].visititems(lambda n, o, g=group: visit(f"{g}/{n}", o))
    return out


def assert_same_night_files(night_dir: Path, reference_dir: Path) -> None:
    for kind in ("fLC", "sLC"):
        a = night_file_content(night_dir / "lightcurves" / f"{kind}_{NIGHT_ID}.hdf5")
        b = night_file_content(reference_dir / "lightcurves" / f"{kind}_{NIGHT_ID}.hdf5")
        assert a.keys() == b.keys(), f"{kind}: different datasets"
        different = [k for k in a if a[k] != b[k]]
        assert not different, f"{kind}: {len(different)} datasets differ, e.g. {different[:5]}"


def json_dump(obj) -> str:
    return json.dumps(obj, indent=1, default=str)
