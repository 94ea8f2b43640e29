"""Catalog bookkeeping of a camera-night run, as plain functions (no Prefect).

The Prefect flow wraps these in tasks; ``mascprocess --no-prefect`` calls them
directly (:func:`drive_camera_night`). The life of a run (resume, move aside,
erase, what is done) is decided in one place, :mod:`mascara.catalog.lifecycle`;
this module adds parameter parsing, the per-process catalog handle, heartbeats
and the recording of batches.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from mascara import faults
from mascara.catalog import Catalog, connect
from mascara.catalog import lifecycle
from mascara.catalog.lifecycle import (  # noqa: F401  (re-exported for the flow and the tests)
    KEEP_OLD,
    LEASE_SECONDS,
    PROVENANCE_PACKAGES,
    RunHandle,
    file_sha256,
    verified_done,
    versions,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- parameters


def parse_nights(nights: str | int | Iterable[str | int] | None, today: dt.date | None = None) -> list[str] | None:
    """Nights as ``YYYYMMDD`` strings from ``"a+b"``, an int, a list, or ``None``.

    ``None``, ``""`` and ``"yesterday"`` mean the previous night: the UTC date of
    yesterday (the nightly schedule runs in the morning after the night).
    ``"all"`` returns None (every night found).
    """
    if nights is None or (isinstance(nights, str) and nights.strip().lower() in ("", "yesterday")):
        return [previous_night(today)]
    if isinstance(nights, str) and nights.strip().lower() == "all":
        return None
    if isinstance(nights, (int, str)):
        items = str(nights).split("+")
    else:
        items = [str(n) for n in nights]
    out = []
    for n in items:
        n = n.strip()
        if n.lower() == "yesterday":
            n = previous_night(today)
        if not (len(n) == 8 and n.isdigit()):
            raise ValueError(f"night must be YYYYMMDD, not {n!r}")
        out.append(n)
    return out


def previous_night(today: dt.date | None = None) -> str:
    """``YYYYMMDD`` of the night that started yesterday evening (UTC)."""
    today = today or dt.datetime.now(dt.UTC).date()
    return (today - dt.timedelta(days=1)).strftime("%Y%m%d")


def parse_letters(value: str | Iterable[str] | None) -> list[str] | None:
    """Camera letters or sites from ``"E+S"``, a list, or None/""/"all" (meaning all)."""
    if value is None:
        return None
    items = value.split("+") if isinstance(value, str) else [str(v) for v in value]
    items = [v.strip() for v in items if v.strip()]
    if not items or [v.lower() for v in items] == ["all"]:
        return None
    return items


def interruption(exc: BaseException | None) -> str | None:
    """The signal name if ``exc`` is an interruption (Ctrl-C, SIGTERM, SIGHUP), else None.

    Prefect turns SIGTERM into its ``TerminationSignal`` while a flow runs;
    ``mascprocess`` turns SIGTERM and SIGHUP into ``KeyboardInterrupt`` otherwise.
    """
    import signal

    if isinstance(exc, KeyboardInterrupt):
        return str(exc) or "SIGINT"
    if type(exc).__name__ == "TerminationSignal":
        sig = getattr(exc, "signal", None)
        return signal.Signals(sig).name if sig else "SIGTERM"
    return None


# --------------------------------------------------------------------------- catalog handles


@lru_cache(maxsize=8)
def catalog(url: str) -> Catalog:
    """One :class:`Catalog` per URL and process (engines are thread-safe)."""
    return connect(url)


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


# --------------------------------------------------------------------------- opening a run


def open_run(db_url: str, plan: Any, overwrite: bool = False, flow_run_id: str | None = None,
             lease_seconds: float = LEASE_SECONDS, host: str | None = None, pid: int | None = None,
             keep_old: int = KEEP_OLD) -> RunHandle:
    """Register, lease, decide and move aside: :func:`mascara.catalog.lifecycle.open_run` on this URL."""
    return lifecycle.open_run(catalog(db_url), db_url, plan, overwrite=overwrite, keep_old=keep_old,
                              flow_run_id=flow_run_id, lease_seconds=lease_seconds, host=host, pid=pid)


# --------------------------------------------------------------------------- recording


def record_batch(handle: RunHandle, outcome: Any) -> None:
    """Record a finished batch: its frames (accepted and rejected) and the batch file."""
    faults.checkpoint("after_batch_file")
    cat = catalog(handle.db_url)
    rows = [(seq, name, size, "ok", None) for seq, name, size in outcome.accepted]
    sizes = {}
    raw = Path(handle.night_path) / "raw"
    for seq, name, reason in outcome.rejected:
        p = raw / name
        sizes[name] = p.stat().st_size if p.exists() else None
        rows.append((seq, name, sizes[name], "rejected", reason))
    cat.record_frames(handle.camera_night_id, rows)
    cat.batch_succeeded(handle.run_id, outcome.batch, outcome.path, outcome.sha256, timings=outcome.timings,
                        astro_rms=outcome.astro_rms, astro_nstars=outcome.astro_nstars, flagged=outcome.flagged)


def finish_succeeded(handle: RunHandle, products: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Record the products and the end of the run in one transaction; returns the product descriptions."""
    return lifecycle.finish_succeeded(catalog(handle.db_url), handle, products)


def drive_camera_night(db_url: str, night: Any, settings: Any = None, *, overwrite: bool = False,
                       keep_old: int = KEEP_OLD, pid: int | None = None, host: str | None = None,
                       split_in_background: bool = True, heartbeat: Heartbeat | None = None,
                       flow_run_id: str | None = None) -> tuple[RunHandle, Any]:
    """Reduce one camera-night with the library driver, recorded exactly as the flow records it.

    Returns the run handle and the :class:`mascara.reduce.NightResult`.
    ``flow_run_id`` makes the run id deterministic, as in a Prefect flow run
    (a second call with it is a retry of the same run).

    Raises
    ------
    LeaseHeld
        another live run reduces this camera-night (nothing was done).
    Exception
        whatever stopped the reduction, after the run was recorded as failed
        (``KeyboardInterrupt``: recorded as interrupted).
    """
    from mascara.reduce import combine_camera_night, plan_camera_night, prepare_camera_night, reduce_camera_night

    plan = plan_camera_night(night, settings)
    handle = open_run(db_url, plan, overwrite=overwrite, keep_old=keep_old, pid=pid, host=host,
                      flow_run_id=flow_run_id)
    cat = catalog(db_url)
    if heartbeat is not None:
        heartbeat.run_ids.add(handle.run_id)

    def on_batch(outcome: Any) -> None:
        cat.batch_started(handle.run_id, outcome.batch)
        record_batch(handle, outcome)

    try:
        result = reduce_camera_night(plan.night, plan.settings, skip=handle.done, on_batch=on_batch,
                                     split_in_background=split_in_background, combine=False)
        cat.set_phase(handle.run_id, "combining")
        paths = [str(plan.batch_path(b)) for b in plan.batches]
        lifecycle.check_batch_files(paths)
        result.products = combine_camera_night(plan, prepare_camera_night(plan), paths)
        finish_succeeded(handle, result.products)
    except KeyboardInterrupt as exc:
        cat.finish_run(handle.run_id, "failed", error=f"interrupted ({interruption(exc)})")
        raise
    except Exception as exc:
        cat.finish_run(handle.run_id, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if heartbeat is not None:
            heartbeat.run_ids.discard(handle.run_id)
    return handle, result


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
