"""Catalog bookkeeping of a camera-night run, as plain functions (no Prefect).

The Prefect flow wraps these in tasks; ``mascprocess --no-prefect`` calls them
directly.  They decide, from the catalog and the files on disk, whether a
camera-night resumes an interrupted run or starts afresh with its old outputs
moved aside (SPEC §9), and which batches are already done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import logging
import os
import socket
import threading
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from mascara import selection
from mascara.catalog import Catalog, LeaseHeld, connect, fingerprint_key

log = logging.getLogger(__name__)

#: Lease length of a run (s); the flow heartbeats every third of it.
LEASE_SECONDS = 300.0
#: Packages whose versions are stored with every run.
PROVENANCE_PACKAGES = ("mascara", "numpy", "scipy", "astropy", "photutils", "h5py", "numba", "prefect",
                       "prefect-dask", "dask", "distributed", "sqlalchemy", "sqlmodel")


# --------------------------------------------------------------------------- parameters


# Parsing lives with the argument checks (mascara.selection): one place for mascprocess and the flow.
parse_nights = selection.parse_nights
previous_night = selection.previous_night
parse_letters = selection.parse_letters


# --------------------------------------------------------------------------- catalog handles


@lru_cache(maxsize=8)
def catalog(url: str) -> Catalog:
    """One :class:`Catalog` per URL and process (engines are thread-safe)."""
    return connect(url)


def versions() -> dict[str, str]:
    out = {}
    for name in PROVENANCE_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


@lru_cache(maxsize=1)
def code_hash() -> str:
    """sha256 over the source of ``mascara`` and ``flows``: Prefect's cache changes with the code."""
    import flows
    import mascara

    h = hashlib.sha256()
    for pkg in (mascara, flows):
        root = Path(pkg.__file__).parent
        for p in sorted(root.rglob("*.py")):
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- opening a run


@dataclasses.dataclass
class RunHandle:
    """What the batch and combine steps of one camera-night need (all plain, picklable values)."""

    db_url: str
    night_path: str
    night_id: str
    camera_night_id: str
    run_id: str
    fingerprint_key: str
    decision: str  # "new", "resume", "moved", "erased"
    moves: list[tuple[str, str | None]]
    done: dict[int, str]  # batch -> sha256 of batches verified done on disk


def verified_done(cat: Catalog, camera_night_id: str, fp_key: str) -> dict[int, str]:
    """Batches the catalog calls succeeded under ``fp_key`` whose file exists with the recorded sha256."""
    out = {}
    for b, (path, sha) in cat.done_batches(camera_night_id, fp_key).items():
        if path and sha and Path(path).is_file() and file_sha256(path) == sha:
            out[int(b)] = sha
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _release_dead_lease(cat: Catalog, exc: LeaseHeld) -> bool:
    """End the holder's run when it ran on this host in a process that no longer exists.

    A killed run keeps its lease until it expires; on the same host the process
    table tells for sure that it is gone, so a re-run need not wait.
    """
    if exc.host != socket.gethostname():
        return False
    from sqlmodel import Session

    from mascara.catalog.models import ReductionRun

    with Session(cat.engine) as s:
        run = s.get(ReductionRun, exc.run_id)
        pid = run.pid if run is not None else None
    if pid is None or _pid_alive(pid):
        return False
    log.warning("run %s (pid %d on this host) is gone; ending it and taking over its lease", exc.run_id, pid)
    cat.finish_run(exc.run_id, "failed", error=f"abandoned: process {pid} on {exc.host} no longer exists")
    return True


def open_run(db_url: str, plan: Any, overwrite: bool = False, flow_run_id: str | None = None,
             lease_seconds: float = LEASE_SECONDS, host: str | None = None, pid: int | None = None) -> RunHandle:
    """Register a camera-night, take its lease, and resume or move old outputs aside (SPEC §9).

    - Same fingerprint as the last run, which did not succeed: resume (keep outputs).
    - Otherwise, if outputs exist: rename them to ``<name>_old`` (erase with
      ``overwrite``) and record every move in the catalog.

    Raises
    ------
    LeaseHeld
        another live run reduces this camera-night.
    """
    from mascara.reduce import existing_outputs, move_outputs_aside

    cat = catalog(db_url)
    night = plan.night
    cn_id = cat.register_camera_night(night.site, night.camera, night.night, night.path)
    fp = plan.fingerprint()
    fp_key = fingerprint_key(fp)
    last = cat.last_run(cn_id)
    kwargs = dict(fingerprint=fp, settings=plan.settings.to_dict(), versions=versions(),
                  host=host or socket.gethostname(), flow_run_id=flow_run_id, lease_seconds=lease_seconds,
                  pid=pid)
    try:
        run_id = cat.start_run(cn_id, **kwargs)
    except LeaseHeld as exc:
        if not _release_dead_lease(cat, exc):
            raise
        run_id = cat.start_run(cn_id, **kwargs)

    resumable = (last is not None and last.run_id != run_id and last.status != "succeeded"
                 and last.fingerprint_key == fp_key)
    retried_flow_run = last is not None and last.run_id == run_id  # a retried flow run continues its run
    moves: list[tuple[str, str | None]] = []
    if resumable or retried_flow_run:
        decision = "resume"
    elif existing_outputs(night):
        moves = move_outputs_aside(night, erase=overwrite)
        reason = ("changed reduction" if last is not None and last.fingerprint_key != fp_key
                  else "re-run of a completed reduction" if last is not None else "outputs without a catalog run")
        for src, dst in moves:
            cat.record_move(cn_id, run_id, src, dst, "erased" if dst is None else "renamed", reason)
        decision = "erased" if overwrite else "moved"
    else:
        decision = "new"
    cat.register_batches(run_id, [(b, min(f.lstseq for f in fr), max(f.lstseq for f in fr), len(fr))
                                  for b, fr in plan.batches.items()])
    done = verified_done(cat, cn_id, fp_key) if decision == "resume" else {}
    log.info("%s: %s run %s, %d of %d batches already done", night.night_id, decision, run_id,
             len(done), len(plan.batches))
    return RunHandle(db_url=db_url, night_path=str(night.path), night_id=night.night_id, camera_night_id=cn_id,
                     run_id=run_id, fingerprint_key=fp_key, decision=decision, moves=moves, done=done)


# --------------------------------------------------------------------------- recording


def _size(path: Path) -> int | None:
    """Size of a regular file, None for a directory, a dangling link or a vanished file."""
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def record_batch(handle: RunHandle, outcome: Any) -> None:
    """Record a finished batch: its frames (accepted and rejected, with reasons), gap counts, the batch file."""
    cat = catalog(handle.db_url)
    rows = [(seq, name, size, "ok", None) for seq, name, size in outcome.accepted]
    raw = Path(handle.night_path) / "raw"
    rows += [(seq, name, _size(raw / name), "rejected", reason) for seq, name, reason in outcome.rejected]
    cat.record_frames(handle.camera_night_id, rows)
    counts = {"slots_expected": outcome.slots_expected, "frames_present": outcome.frames_present,
              "frames_accepted": len(outcome.accepted), "frames_rejected": outcome.frames_rejected,
              "frames_missing": outcome.frames_missing}
    cat.batch_succeeded(handle.run_id, outcome.batch, outcome.path, outcome.sha256, timings=outcome.timings,
                        astro_rms=outcome.astro_rms, astro_nstars=outcome.astro_nstars, flagged=outcome.flagged,
                        frames=counts)


def record_intake(db_url: str, plan: Any, camera_night_id: str | None = None, run_id: str | None = None) -> str:
    """Record what the intake found in a night's ``raw/`` (gaps, emptiness) and the files it refused by name.

    Registers the camera-night if needed (an empty night has no run); returns its id.
    """
    cat = catalog(db_url)
    night = plan.night
    cn_id = camera_night_id or cat.register_camera_night(night.site, night.camera, night.night, night.path)
    cat.record_intake(cn_id, run_id, **plan.intake_summary())
    cat.record_frames(cn_id, [(r.lstseq, r.filename, r.size, "rejected", r.reason) for r in plan.rejected])
    return cn_id


def record_calibration(db_url: str, camera_night_id: str, night_path: str, state: Mapping[str, Any]) -> None:
    """Record the master calibration of a night and a frame row per calibration file (used, unused, rejected)."""
    raw = Path(night_path) / "raw"
    rows = [(None, name, _size(raw / name), "ok", f"combined into the master {state['kind']}")
            for name in state["files"]]
    rows += [(None, name, _size(raw / name), "ok", f"not used: the master is a {state['kind']}")
             for name in state["unused"]]
    rows += [(None, name, _size(raw / name), "rejected", reason) for name, reason in state["rejected"]]
    catalog(db_url).record_calibration(camera_night_id, state["kind"], state["files"], state["note"], rows)


def record_products(handle: RunHandle, products: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Record the products of a run (fLC, sLC, camera solution, diagnostics); returns their descriptions."""
    import h5py

    cat = catalog(handle.db_url)
    out = []
    for kind in ("fLC", "sLC"):
        path = products.get(kind)
        if not path or not Path(path).is_file():
            continue
        sha = products.get(f"sha256_{kind}") or file_sha256(path)
        with h5py.File(path, "r") as f:
            nstars = len(f["header_table"]["ascc"]) if "header_table" in f else None
        size = Path(path).stat().st_size
        cat.record_product(handle.run_id, kind, path, sha, size, nstars=nstars)
        out.append({"kind": kind, "path": str(path), "sha256": sha, "size": size, "nstars": nstars})
    # the night's camera solution and the diagnostic stars' light curves are products too
    night = Path(handle.night_path)
    for kind, path in (("solution", night / "astrometry" / "camera_solution.json"),
                       ("diagnostics", night / "work" / "diagnostics.hdf5")):
        if path.is_file():
            sha, size = file_sha256(path), path.stat().st_size
            cat.record_product(handle.run_id, kind, str(path), sha, size)
            out.append({"kind": kind, "path": str(path), "sha256": sha, "size": size, "nstars": None})
    return out


class Heartbeat:
    """Heartbeats the leases of the open runs from a daemon thread until stopped."""

    def __init__(self, db_url: str, interval: float = LEASE_SECONDS / 3):
        self.db_url, self.interval = db_url, interval
        self.run_ids: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            for run_id in list(self.run_ids):
                try:
                    catalog(self.db_url).heartbeat(run_id)
                except Exception as exc:  # a lost lease shows up when the run finishes
                    log.warning("heartbeat of run %s failed: %s", run_id, exc)
