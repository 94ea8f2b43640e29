"""The Prefect flow ``reduce-night``: nights -> cameras -> 50-frame batches.

Tasks are thin wrappers of :mod:`mascara.reduce` plus catalog updates
(:mod:`flows._runs`).  Per camera-night::

    start-<night>     catalog: register, lease, resume or move old outputs aside
    prepare-<night>   master calibration and the night's camera solution
    batch-<night>-<b> one task per batch, all batches of all cameras concurrent
    split-<night>     StarSplitter.add of finished batch files, beside the batches: only on
                      Dask; on the flow's thread pool a thread of the flow hands them to the
                      night's splitter process, with no task run
    combine-<night>   fLC/sLC night files, products, summary artifacts

The catalog decides what is done (a batch row ``succeeded`` under the run's
fingerprint whose file exists with the recorded sha256).  Prefect's cache is a
view of it: batch results are persisted under a key of the batch's inputs,
the reduction fingerprint and the code (not the flow run), so a resumed night
shows its finished batches as ``Cached``; batches the catalog does not call
done are submitted with ``refresh_cache`` and always run.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextvars
import dataclasses
import errno
import hashlib
import json
import logging
import os
import queue
import socket
import sys
import threading
import time
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.exceptions import PrefectException
from prefect.runtime import flow_run as runtime_flow_run
from prefect.runtime import task_run as runtime_task_run
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

from flows import _heartbeat, _runs, report
from mascara import faults, nightlock
from mascara.catalog import LeaseHeld
from mascara.nightlock import NightLocked

_heartbeat.install()  # flow runs end when their work does (flows/_heartbeat.py)

#: Exceptions worth retrying: I/O trouble and lost database connections.
#: Bad data never reaches here: rejected frames are recorded by the library.
TRANSIENT = (OSError, TimeoutError, OperationalError, InterfaceError, DisconnectionError)
#: Retries of a task on a transient error, with exponential backoff from RETRY_BACKOFF seconds.
RETRIES = 3
RETRY_BACKOFF = float(os.environ.get("MASCARA_RETRY_BACKOFF", "10"))
#: Seconds between two updates of a night's progress artifact (each is an API call); the last is always sent.
PROGRESS_INTERVAL = 5.0
#: While batches are split, quick-look figures are redrawn at most this often (seconds); always at the end.
QUICKLOOK_INTERVAL = float(os.environ.get("MASCARA_QUICKLOOK_INTERVAL", "300"))


# --------------------------------------------------------------------------- task policies


#: I/O errors that no wait mends: permissions, a read-only filesystem, a path of the wrong kind. An outside
#: trial saw a night directory without write permission retried for 75 s, with 44 lines of tracebacks.
PERMANENT_OS = (PermissionError, NotADirectoryError, IsADirectoryError)


def is_transient(exc: BaseException | None) -> bool:
    if isinstance(exc, PERMANENT_OS) or (isinstance(exc, OSError) and exc.errno == errno.EROFS):
        return False
    return isinstance(exc, TRANSIENT)


def retry_on_transient(task: Any, task_run: Any, state: Any) -> bool:
    """``retry_condition_fn``: retry I/O and database-connection errors, nothing else.

    Prefect asks only while retries are left; each retry is announced as a
    warning (Prefect's own line is at INFO, below ``mascprocess``'s default
    level, so a full disk retried for a minute looked like a hang).
    """
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    retry = is_transient(exc)
    if retry and task_run is not None:
        _announce_retry(task, task_run, exc)
    return retry


def _announce_retry(task: Any, task_run: Any, exc: BaseException) -> None:
    n = int(getattr(task_run, "run_count", 0) or 1)  # runs so far, the failed one included
    total = int(getattr(task, "retries", RETRIES) or RETRIES)
    delays = getattr(task, "retry_delay_seconds", None)
    if isinstance(delays, (list, tuple)) and delays:
        delays = delays[min(n - 1, len(delays) - 1)]
    when = ""
    if isinstance(delays, (int, float)) and delays:
        when = f" in about {delays:.0f} s" if delays >= 10 else f" in about {delays:.2g} s"
    why = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
    try:
        logger = get_run_logger()
    except Exception:  # noqa: BLE001 - outside a run context (a test calling the policy)
        logger = logging.getLogger(__name__)
    logger.warning("%s failed (%s); retry %d of %d%s", getattr(task_run, "name", "task"), why, n, total, when)


def batch_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache key of a batch: night, batch, reduction fingerprint and code; not the flow run."""
    h: _runs.RunHandle = parameters["handle"]
    blob = json.dumps([h.night_path, h.night_id, int(parameters["batch"]), h.fingerprint_key, _runs.code_hash()])
    return "batch-" + hashlib.sha256(blob.encode()).hexdigest()


_transient_task = dict(retries=RETRIES, retry_delay_seconds=exponential_backoff(RETRY_BACKOFF),
                       retry_jitter_factor=0.2, retry_condition_fn=retry_on_transient)


def _plan(night_path: str, settings_json: str) -> Any:
    """The night's plan, made once per flow run: its tasks share one view of ``raw/``.

    Keyed by the flow run, so that a process that outlives a run (a Dask
    worker, a served flow, a test) plans the night again for the next run
    instead of reusing an old inventory of ``raw/``.
    """
    from prefect.runtime import flow_run

    return _plan_of_run(night_path, settings_json, str(flow_run.id))


@lru_cache(maxsize=32)
def _plan_of_run(night_path: str, settings_json: str, flow_run_id: str) -> Any:
    from mascara.reduce import plan_camera_night
    from mascara.settings import Settings

    return plan_camera_night(night_path, Settings.from_dict(json.loads(settings_json)))


def _ctx(plan: Any) -> Any:
    from mascara.reduce import prepare_camera_night

    return prepare_camera_night(plan)  # reads work/context.json once it exists


# --------------------------------------------------------------------------- tasks


@task(name="start", task_run_name="start-{night_id}", cache_policy=NO_CACHE, **_transient_task)
def start_camera_night(night_id: str, night_path: str, settings_json: str, db_url: str, overwrite: bool,
                       flow_run_id: str | None, host: str, pid: int, keep_old: int = 1) -> _runs.RunHandle:
    """Open the catalog run of a camera-night: lease, resume or move aside, register batches.

    A retry reuses the run id (it derives from the flow run) and continues the
    run's journal: moves it intended are finished, never skipped.
    """
    plan = _plan(night_path, settings_json)
    # the flow's process holds the night directory's lock (this task may run on a Dask worker)
    handle = _runs.open_run(db_url, plan, overwrite=overwrite, flow_run_id=flow_run_id, host=host, pid=pid,
                            keep_old=keep_old, take_lock=False)
    for w in handle.warnings:
        get_run_logger().warning(w)
    _runs.record_intake(db_url, plan, handle.camera_night_id, handle.run_id)
    _crash_abandoned_flow_run(db_url, handle, flow_run_id)
    return handle


def _crash_abandoned_flow_run(db_url: str, handle: _runs.RunHandle, flow_run_id: str | None) -> None:
    """Mark Crashed in Prefect the flow run of the camera-night's previous run, if the catalog ended that run
    as abandoned (its process gone, or its lease expired) while Prefect still calls it Running, and no other
    camera-night of that flow run is still recorded running.

    A flow run whose process is killed outright (``kill -9``, the machine's power) is never told, and its
    worker may be gone with it: Prefect showed it Running for good (an outside trial), although the catalog
    recorded its end when the next run took the camera-night over. One flow run reduces several cameras:
    while another of its runs holds a lease (its process only stalled past this camera-night's lease, a
    review), a Crashed state would stop that run's next tasks, so it is left alone. Cosmetic for the
    reduction, so any error of Prefect's API here is logged and nothing more.
    """
    from mascara.catalog.lifecycle import abandoned_flow_run

    try:
        prev = abandoned_flow_run(_runs.catalog(db_url), handle.camera_night_id, handle.run_id, flow_run_id)
        if prev is None:
            return
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.objects import StateType
        from prefect.states import Crashed

        with get_client(sync_client=True) as client:
            fr = client.read_flow_run(prev.flow_run_id)
            if fr.state is None or fr.state.type != StateType.RUNNING:
                return
            why = f"mascara: the catalog ended its run {prev.run_id} ({prev.error}); run {handle.run_id} took over"
            client.set_flow_run_state(prev.flow_run_id, Crashed(message=why[:500]), force=True)
        get_run_logger().warning("%s: flow run %s was Running in Prefect, but its run %s was %s: marked Crashed",
                                 handle.night_id, prev.flow_run_id, prev.run_id, prev.error)
    except Exception as exc:  # noqa: BLE001 - Prefect's record only
        get_run_logger().warning("%s: could not mark the abandoned flow run Crashed: %s", handle.night_id, exc)


@task(name="prepare", task_run_name="prepare-{night_id}", cache_policy=NO_CACHE, **_transient_task)
def prepare_task(night_id: str, handle: _runs.RunHandle, settings_json: str,
                 require_calibration: bool = False) -> dict:
    """Master calibration and the night's camera solution (cached in ``work/context.json``); records the calibration."""
    from mascara.reduce import CalibrationRequired, NoCameraSolution, prepare_camera_night

    try:
        ctx = prepare_camera_night(_plan(handle.night_path, settings_json), require_calibration=require_calibration)
    except CalibrationRequired as exc:
        _runs.record_calibration(handle.db_url, handle.camera_night_id, handle.night_path, exc.state)
        raise
    except NoCameraSolution as exc:  # no batch will run to record the frames the intake refused
        _runs.record_refused(handle.db_url, handle.camera_night_id, exc)
        raise
    _runs.record_calibration(handle.db_url, handle.camera_night_id, handle.night_path, ctx.calibration_state())
    return {"master_kind": ctx.master_kind, "calibration": ctx.calibration_note, "solution": ctx.solution_info}


@task(name="batch", task_run_name="batch-{night_id}-{batch:07d}", cache_key_fn=batch_cache_key,
      persist_result=True, **_transient_task)
def batch_task(night_id: str, batch: int, handle: _runs.RunHandle, settings_json: str) -> dict:
    """Reduce one batch and record it; a batch the catalog already has is returned as it is."""
    from mascara.reduce import reduce_batch

    plan = _plan(handle.night_path, settings_json)
    known = handle.done.get(batch)
    path = plan.batch_path(batch)
    if known is not None and path.is_file() and _runs.file_sha256(path) == known:
        # done before, but Prefect's result of it was lost (e.g. killed before persisting)
        _runs.record_quality_if_missing(handle, batch, path)
        return {"batch": batch, "path": str(path), "sha256": known, "nframes": len(plan.batches[batch]),
                "rejected": _nrejected(_batch_attrs(path)), "reused": True}

    def reduce() -> Any:
        faults.maybe_fail_batch(night_id, batch, runtime_task_run.run_count or 1)
        return reduce_batch(plan, _ctx(plan), batch)

    outcome = _runs.reduce_recorded(handle, batch, reduce)
    return {"batch": batch, "path": outcome.path, "sha256": outcome.sha256, "nframes": len(plan.batches[batch]),
            "accepted": len(outcome.accepted), "rejected": len(outcome.rejected), "astro_rms": outcome.astro_rms,
            "flagged": outcome.flagged, "cpu_seconds": sum(outcome.timings.values()), "reused": False}


def _batch_attrs(batch_path: Any) -> dict:
    """A batch file's attributes (:func:`mascara.lightcurves.write_batch_file`)."""
    import h5py

    with h5py.File(batch_path, "r") as f:
        return json.loads(f.attrs["attrs"])


def _nrejected(attrs: dict) -> int:
    rejected = attrs["rejected"]
    return len(json.loads(rejected) if isinstance(rejected, str) else rejected)


#: The flow's splitter processes, one per camera-night while its batches are split (night path -> process).
_SPLITTERS: dict[str, Any] = {}
#: Runs whose splitter was stopped: a split task of theirs that comes later (queued, or retried after a
#: transient error) starts none, so nothing is split under ``work/`` after the night's combine or end.
_SPLITTERS_CLOSED: set[str] = set()
_SPLITTERS_LOCK = threading.Lock()
#: Seconds the flow waits for an idle splitter to end before it kills it.
SPLITTER_STOP_SECONDS = 60.0


def _splitter_process(plan: Any, run_id: str, db_url: str) -> Any:
    """The night's :class:`mascara.reduce.SplitterProcess`, started on first use (or again if it died);
    None once the run's splitter was stopped (:func:`stop_splitter`) or the run no longer holds its
    camera-night's lease (another run took it over: nothing more of this run's is written under ``work/``,
    and its splitter is stopped at once)."""
    from mascara.reduce import SplitterProcess

    key = os.path.realpath(plan.night.path)
    with _SPLITTERS_LOCK:
        if run_id in _SPLITTERS_CLOSED:
            return None
        sp = _SPLITTERS.get(key)
    if not _runs.catalog(db_url).holds_lease(run_id):
        stop_splitter(plan.night.path, run_id, clean=False)
        return None
    if sp is not None and sp.alive():
        return sp
    new = SplitterProcess.for_night(plan, _ctx(plan), report=True)  # outside the lock: the other nights go on
    with _SPLITTERS_LOCK:
        if run_id not in _SPLITTERS_CLOSED:
            _SPLITTERS[key] = new
            return new
    new.stop(clean=False)  # the run's splitter was stopped while this one started
    return None


def stop_splitter(night_path: str, run_id: str | None, clean: bool) -> None:
    """End the night's splitter process, if it has one (after its queue when ``clean``, else at once), and
    start none for ``run_id`` after this."""
    with _SPLITTERS_LOCK:
        if run_id is not None:
            _SPLITTERS_CLOSED.add(run_id)
        sp = _SPLITTERS.pop(os.path.realpath(night_path), None)
    if sp is not None:
        sp.stop(clean=clean, timeout=SPLITTER_STOP_SECONDS)


def split_batches(night_id: str, handle: _runs.RunHandle, settings_json: str, batches: list[tuple[str, str]],
                  own_process: bool, logger: Any) -> dict:
    """Split finished batch files by star into ``work/`` (StarSplitter; one writer per night) and redraw the
    night's quick-look figures when they are :data:`QUICKLOOK_INTERVAL` old.

    With ``own_process`` (the flow's thread pool) the split is done by the
    night's splitter process, as the library driver does it, and the call
    waits for it: the split's CPU is then not spent under the flow process's
    GIL beside its batch threads. Otherwise (a Dask worker) it is done here.

    Splitting is an optimisation of the combine step, which re-adds any batch
    the store lacks, so a batch that fails to split is logged on ``logger``
    and counted, not raised.
    """
    from mascara.lightcurves import StarSplitter, split_outcome
    from mascara.diagnostics import diagnostic_stars

    plan = _plan(handle.night_path, settings_json)
    if own_process:
        sp = _splitter_process(plan, handle.run_id, handle.db_url)
        outcomes = (sp.split(batches) if sp is not None else
                    [(path, "error: the run's splitter was stopped (the night is combining or has ended, or "
                            "another run took its lease)") for path, _ in batches])
    else:
        splitter = StarSplitter(plan.workdir, diagnostic_stars(plan, _ctx(plan)))
        outcomes = [(path, split_outcome(splitter, path, sha)) for path, sha in batches]
    added = sum(st == "added" for _, st in outcomes)
    skipped = sum(st == "skipped" for _, st in outcomes)
    errors = []
    for path, st in outcomes:
        if st.startswith("error: "):
            why = st[len("error: "):]
            logger.warning("splitting %s failed: %s", path, why)
            errors.append(f"{Path(path).name}: {why}")
    with _SPLITTERS_LOCK:
        ended = handle.run_id in _SPLITTERS_CLOSED
    if not ended:  # a split that returns after its run was stopped (interrupted, failed) draws nothing
        _runs.draw_quicklook(plan.night.path, logger, every=QUICKLOOK_INTERVAL)
    return {"added": added, "skipped": skipped, "errors": errors}


@task(name="split", task_run_name="split-{night_id}", cache_policy=NO_CACHE, **_transient_task)
def split_task(night_id: str, handle: _runs.RunHandle, settings_json: str, batches: list[tuple[str, str]]) -> dict:
    """:func:`split_batches` in a task, on runners other than the flow's thread pool (Dask workers, which
    split in the task).

    On the flow's thread pool no task runs for a split: a thread of the flow
    hands the batches to the night's splitter process (each task run costs
    Prefect's server some 25 ms of CPU, on the cores that reduce; a
    5,000-frame night would have about 100 of them).
    """
    return split_batches(night_id, handle, settings_json, batches, own_process=False, logger=get_run_logger())


@task(name="combine", task_run_name="combine-{night_id}", cache_policy=NO_CACHE, **_transient_task)
def combine_task(night_id: str, handle: _runs.RunHandle, settings_json: str) -> dict:
    """Write the fLC/sLC night files (idempotent), record them, end the run, publish artifacts."""
    from mascara.reduce import combine_camera_night

    from mascara.catalog.lifecycle import check_batch_files

    plan = _plan(handle.night_path, settings_json)
    paths = [str(plan.batch_path(b)) for b in plan.batches]
    _runs.catalog(handle.db_url).set_phase(handle.run_id, "combining")
    check_batch_files(paths)  # IncompleteNight is not transient: no retry
    products = combine_camera_night(plan, _ctx(plan), paths)
    figures = _runs.final_quicklook(plan.night.path, get_run_logger())  # before the end releases the night
    files = _runs.finish_succeeded(handle, products)
    # the night is reduced and recorded: nothing after this may fail it (an outside trial: the Prefect server
    # down at this point failed a night the catalog had recorded as succeeded, and a re-run moved it aside)
    summary = night_summary(plan, paths, files)
    quality = _quality_summary(plan.night.path)
    _publish_summary_never_failing(handle, summary, files, figures, quality, plan.settings.to_dict(),
                                   get_run_logger())
    return {"night_id": night_id, "summary": summary, "files": files, "quality": quality}


def _publish_summary_never_failing(handle: _runs.RunHandle, summary: dict, files: list[dict], figures: dict,
                                   quality: dict, settings: dict, logger: Any) -> None:
    """:func:`_publish_summary`, with a failure (the Prefect server gone, say) logged as a warning."""
    try:
        _publish_summary(handle, summary, files, figures, quality, settings)
    except Exception as exc:  # noqa: BLE001 - reporting never fails a reduced night
        logger.warning("%s: reduced and recorded, but its artifacts were not published: %s: %s",
                       handle.night_id, type(exc).__name__, exc)


def _report_failed_night(n: _Night, sjson: str, logger: Any) -> None:
    """What an operator needs of a camera-night that failed after it started reducing, in the UI.

    The progress artifact's last word (batches and frames actually reduced,
    and the failure), the counts of its reduced batches for the night's table
    (:attr:`_Night.partial`), and its quick-look figures drawn from what
    ``work/`` holds, published like a finished night's. Never raises: this is
    reporting, the failure itself is recorded by the caller.
    """
    done = len(n.batches) - len(n.left)
    nfailed = len(n.failed)
    try:
        update_progress_artifact(n.progress_id, 100.0 * done / max(len(n.batches), 1),
                                 description=f"{n.night_id}: failed: {done - nfailed}/{len(n.batches)} batches "
                                             f"reduced ({nfailed} failed), {n.done_frames}/{n.nframes} frames")
    except Exception as exc:  # noqa: BLE001
        logger.debug("progress artifact: %s", exc)
    try:
        plan = _plan(n.night_path, sjson)
        paths = [str(p) for p in map(plan.batch_path, sorted(plan.batches)) if Path(p).is_file()]
        summary = night_summary(plan, paths, [])
        summary["batches"] = f"{len(paths)}/{len(plan.batches)}"
        n.partial = {"summary": summary, "quality": _quality_summary(n.night_path)}
    except Exception as exc:  # noqa: BLE001
        logger.warning("%s: counts of the reduced batches not read: %s", n.night_id, exc)
    figures = _runs.draw_quicklook(n.night_path, logger)
    if figures:
        try:
            report.publish_markdown(_artifact_key(n.night_id, "quicklook"),
                                    report.quicklook_markdown(n.night_id, figures, n.night_path),
                                    f"Quick-look figures of {n.night_id} (failed: the batches reduced)")
        except Exception as exc:  # noqa: BLE001
            logger.warning("%s: quick-look artifact not published: %s", n.night_id, exc)


def _quality_summary(night_path: Any) -> dict:
    from mascara.diagnostics import read_qualities, summarise

    return summarise(read_qualities(night_path))


# --------------------------------------------------------------------------- summaries and artifacts


def night_summary(plan: Any, batch_paths: list[str], files: list[dict]) -> dict[str, Any]:
    """Frames, rejected frames, batches, stars and astrometry rms of a reduced night (from its batch files)."""
    import numpy as np

    nframes = nrej = nflag = 0
    rms = []
    for p in batch_paths:
        a = _batch_attrs(p)
        nframes += int(a["nframes"])
        nrej += _nrejected(a)
        if bool(a["astro_ok"]) and np.isfinite(a["astro_rms"]):
            rms.append(float(a["astro_rms"]))
        else:
            nflag += 1
    stars = {f["kind"]: f["nstars"] for f in files}
    return {
        "night": plan.night.night_id, "frames": nframes, "rejected": nrej, "batches": len(batch_paths),
        "batches_flagged": nflag, "stars_fLC": stars.get("fLC"), "stars_sLC": stars.get("sLC"),
        "astro_rms_median_px": round(float(np.median(rms)), 4) if rms else None,
        "astro_rms_max_px": round(float(np.max(rms)), 4) if rms else None,
    }


def _artifact_key(night_id: str, what: str) -> str:
    return f"{night_id.lower()}-{what}"


def _publish_summary(handle: _runs.RunHandle, summary: dict, files: list[dict], figures: dict, quality: dict,
                     settings: dict) -> None:
    """Three artifacts per camera-night: a one-row table, the output files, the quick-look figures."""
    row = report.camera_night_row(handle.night_id, "succeeded", summary, files, quality, settings)
    report.publish_table(_artifact_key(handle.night_id, "summary"), [row],
                         f"Reduction of {handle.night_id} ({handle.decision} run {handle.run_id})")
    report.publish_markdown(_artifact_key(handle.night_id, "outputs"),
                            report.outputs_markdown(handle.night_id, handle.night_path, files, handle.moves, settings),
                            f"Output files of {handle.night_id}")
    if figures:
        report.publish_markdown(_artifact_key(handle.night_id, "quicklook"),
                                report.quicklook_markdown(handle.night_id, figures, handle.night_path),
                                f"Quick-look figures of {handle.night_id}")


# --------------------------------------------------------------------------- progress reporting


class ProgressSink(Protocol):
    """Receives progress in the flow's process (``mascprocess`` draws bars with it)."""

    def night_planned(self, night_id: str, nframes: int, nbatches: int) -> None: ...
    def batch_done(self, night_id: str, nframes: int, ok: bool, rejected: int = 0) -> None: ...
    def night_finished(self, night_id: str, state: str, message: str) -> None: ...


_SINK: ProgressSink | None = None


def set_progress_sink(sink: ProgressSink | None) -> None:
    """Report progress of flows run in this process to ``sink`` (None: stop)."""
    global _SINK
    _SINK = sink


def _notify(method: str, *args: Any) -> None:
    if _SINK is not None:
        try:
            getattr(_SINK, method)(*args)
        except Exception:  # noqa: BLE001 - a progress bar never breaks a reduction
            pass


# --------------------------------------------------------------------------- the flow


def flow_workers() -> int:
    """Batches reduced at once by the flow's threads: ``$MASCARA_FLOW_WORKERS``, else the number of cores.

    Read when this module is imported (the flow's default runner), also by a
    deployment's worker: a value that is not a positive integer is reported
    and the number of cores used, rather than failing the import.
    """
    cores = os.cpu_count() or 2
    value = os.environ.get("MASCARA_FLOW_WORKERS", "").strip()
    if not value:
        return cores
    try:
        n = int(value)
        if n < 1:
            raise ValueError
    except ValueError:
        warnings.warn(f"MASCARA_FLOW_WORKERS={value!r} is not a positive integer; using {cores} (the cores)",
                      stacklevel=2)
        return cores
    return n


class BatchThreadPool(ThreadPoolTaskRunner):
    """Threads for ``batches`` batch tasks at once, and one more for a night's other tasks.

    The flow keeps at most ``batch_slots`` batch tasks submitted (it submits the
    next one when one ends), so a night's combine does not queue behind the
    night's remaining batches: with every batch submitted at once, a thread
    pool runs them first in first out. The extra thread is not reserved: with
    several cameras, their start, prepare and combine tasks share it and the
    batch threads, and a batch submitted after them waits for them. Splits
    run in threads of the flow's own (:func:`split_batches`), not here.
    """

    def __init__(self, batches: int | None = None, max_workers: int | None = None) -> None:
        if batches is None:  # Prefect's duplicate() passes max_workers
            batches = max_workers - 1 if max_workers else flow_workers()
        self.batch_slots = max(1, int(batches))
        super().__init__(max_workers=self.batch_slots + 1)


def _batch_slots() -> int | None:
    """How many batch tasks the flow keeps submitted: the pool's batch threads; None (all) on other runners."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    runner = getattr(ctx, "task_runner", None)
    return runner.batch_slots if isinstance(runner, BatchThreadPool) else None


@dataclasses.dataclass
class _Night:
    """Book-keeping of one camera-night inside the flow."""

    night_id: str
    night_path: str
    nframes: int
    batches: dict[int, int]  # batch -> frames
    handle: _runs.RunHandle | None = None
    left: set[int] = dataclasses.field(default_factory=set)
    done_frames: int = 0
    failed: list[str] = dataclasses.field(default_factory=list)
    split_pending: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    split_busy: bool = False
    combine_submitted: bool = False
    state: str = "pending"  # pending, running, succeeded, failed, locked, empty, up-to-date
    message: str = ""
    progress_id: Any = None
    progress_at: float = 0.0  # monotonic time of the last progress-artifact update
    result: dict | None = None
    #: what a night that did not succeed got to (its batch files on disk): the night table's counts
    partial: dict | None = None


def _settings_json(settings: dict | str | None) -> str:
    from mascara.settings import Settings

    if isinstance(settings, str):
        settings = json.loads(settings) if settings.strip() else None
    return json.dumps(Settings.from_dict(settings or None).to_dict(), sort_keys=True, default=list)


def worker_datadir(datadir: str | None) -> str:
    """The data directory: the parameter, or ``$MASCARA_DATADIR`` of the worker when the parameter is empty.

    A deployment whose ``datadir`` was templated from an unset
    ``MASCARA_DATADIR`` at ``prefect deploy`` time gets ``""`` (or the
    unrendered template); that must not silently mean the worker's working
    directory (the checkout).
    """
    from mascara.selection import SelectionError

    if datadir and str(datadir).strip() and "{{" not in str(datadir):
        return str(datadir)
    env = os.environ.get("MASCARA_DATADIR", "").strip()
    if env:
        return env
    raise SelectionError("no data directory: the datadir parameter is empty (was MASCARA_DATADIR unset at "
                         "`prefect deploy`?) and MASCARA_DATADIR is not set where this flow runs; pass "
                         "--param datadir=/path or set MASCARA_DATADIR for the worker")


def describe_request(nights: Any = None, cameras: Any = None, site: Any = None) -> str:
    """A short name of what a run reduces: ``20260301-LP-E+S``, ``20260301+20260302-all-E``, ``all-nights-LP-all``.

    ``yesterday`` (and the empty default) is resolved to its date; more than
    three nights are written ``first..last(n)``.
    """
    from mascara.selection import SelectionError, parse_letters, parse_nights

    try:
        ns = parse_nights(nights)
        n = "all-nights" if ns is None else ("+".join(ns) if len(ns) <= 3 else f"{ns[0]}..{ns[-1]}({len(ns)})")
    except SelectionError:
        n = str(nights)
    cams = parse_letters(cameras)
    sites = parse_letters(site)
    return f"{n}-{'+'.join(sites) if sites else 'all'}-{'+'.join(cams) if cams else 'all'}"


def flow_run_name() -> str:
    """The flow run's name from its parameters (:func:`describe_request`), instead of a random one."""
    p = runtime_flow_run.parameters or {}
    return describe_request(p.get("nights"), p.get("cameras"), p.get("site"))


@flow(name="reduce-night", log_prints=True, flow_run_name=flow_run_name, task_runner=BatchThreadPool())
def reduce_night(
    datadir: str,
    nights: str | int | list[str | int] | None = None,
    cameras: str | list[str] | None = None,
    site: str | None = None,
    overwrite: bool = False,
    db_url: str | None = None,
    settings: dict[str, Any] | None = None,
    keep_old: int = 1,
    require_calibration: bool = False,
    skip_done: bool = False,
) -> list[dict] | State:
    """Reduce camera-nights of ``datadir``: one task per 50-frame batch, all cameras at once.

    Parameters
    ----------
    datadir : directory holding ``<YYYYMMDD><SITE><CAM>/raw/`` night directories; empty:
        ``$MASCARA_DATADIR`` of the worker.
    nights : ``"20260301+20260302"``, ``20260301``, a list, ``"all"``; empty or
        ``"yesterday"``: the previous night (UTC date of yesterday).
    cameras : letters ``"E+S"`` or a list; empty: all cameras found.
    site : ``LP``/``LS``; empty: every site found.
    overwrite : start a fresh reduction whatever the state of the night, erasing
        every earlier output instead of renaming it to ``<name>_old``.
    db_url : catalog URL; default ``$MASCARA_DB_URL`` or ``<datadir>/catalog.sqlite``.
    settings : :class:`mascara.settings.Settings` overrides.
    keep_old : generations of earlier outputs kept (``_old``, ``_old2``...);
        the oldest beyond that is erased, with a record.
    require_calibration : fail a camera-night without a usable master dark
        instead of reducing it with a recorded warning.
    skip_done : leave alone a camera-night whose latest reduction succeeded
        under the same fingerprint (code version, settings, star catalogue,
        raw files) with its files in place, or that another run is reducing
        (state ``up-to-date``); the backfill's runs set it.

    Returns
    -------
    One summary per camera-night. The flow fails if any camera-night failed;
    camera-nights without frames (an empty ``raw/``, or no directory for a
    requested night: the dome stayed closed) are recorded as ``empty`` and
    named in a ``nodata-...`` artifact, and the run ends Completed.
    """
    from mascara.catalog._engine import resolve_url
    from mascara.rawio import parse_night_dir
    from mascara.selection import NoNightData, select_nights

    # the checks of mascprocess, first: a deployment run with a mistake fails at once with one line;
    # a night without any night directory is an ordinary night without data (dome closed)
    datadir = worker_datadir(datadir)
    try:
        sel = select_nights(datadir, nights, cameras, site, settings=settings, db_url=db_url)
    except NoNightData as exc:
        logger = get_run_logger()
        datadir = str(Path(datadir).resolve())
        no_data = [(cn, f"no night directory {Path(datadir) / cn}") for cn in exc.expected] or [
            (n, f"no night directory for night {n} in {datadir}") for n in exc.nights]
        _record_no_data(resolve_url(db_url, datadir), datadir, no_data, logger)
        logger.info("reduce-night: no data: %s", exc)
        return [{"night_id": cn, "state": "empty", "message": why} for cn, why in no_data]
    logger = get_run_logger()
    datadir = str(Path(datadir).resolve())
    db_url = resolve_url(db_url, datadir)
    missing_dirs = [(cn, f"no night directory {Path(datadir) / cn}") for cn in sel.not_found]
    for cn, why in missing_dirs:
        logger.warning("%s: %s", cn, why)
    sjson = _settings_json(sel.settings)
    found = [parse_night_dir(p) for p in sel.night_dirs]
    flow_run_id = str(runtime_flow_run.id) if runtime_flow_run.id else None
    host, pid = socket.gethostname(), os.getpid()

    nights_: dict[str, _Night] = {}
    events: queue.Queue = queue.Queue()

    def track(fut: Any, kind: str, night_id: str, payload: Any = None) -> None:
        fut.add_done_callback(lambda f: events.put((kind, night_id, payload, f)))

    # batches wait here and are submitted as batch threads free up (BatchThreadPool), nights in the order
    # their prepare ended; on other runners (Dask) all at once
    slots = _batch_slots()
    waiting: collections.deque[tuple[_Night, int]] = collections.deque()
    in_flight = [0]
    # on the flow's thread pool a night's finished batches go to its splitter process from a thread of the
    # flow's, with no task run (split_task); at most one split of each night at a time (_Night.split_busy)
    split_threads = (concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(found)), thread_name_prefix="split")
                     if slots is not None else None)

    def submit_batches() -> None:
        while waiting and (slots is None or in_flight[0] < slots):
            n, b = waiting.popleft()
            if n.state != "running":
                continue
            t = batch_task if b in n.handle.done else batch_task.with_options(refresh_cache=True)
            track(t.submit(n.night_id, b, n.handle, sjson), "batch", n.night_id, b)
            in_flight[0] += 1

    for nd in found:
        plan = _plan(str(nd.path), sjson)
        n = _Night(night_id=nd.night_id, night_path=str(nd.path), nframes=len(plan.frames),
                   batches={b: len(fr) for b, fr in plan.batches.items()})
        nights_[n.night_id] = n
        if plan.empty_reason():
            n.state, n.message = "empty", plan.empty_reason()
            _runs.record_intake(db_url, plan)
            logger.warning("%s: no data: %s", n.night_id, n.message)
            continue
        if skip_done and not overwrite:
            why = _runs.already_done(db_url, plan)
            if why is not None:
                n.state, n.message = "up-to-date", why
                logger.info("%s: not reduced again: %s", n.night_id, why)
                continue
        _notify("night_planned", n.night_id, n.nframes, len(n.batches))
        n.progress_id = create_progress_artifact(0.0, key=_artifact_key(n.night_id, "progress"),
                                                 description=f"{n.night_id}: batches reduced")
        try:  # held by this process until end_night, whichever process the tasks run in
            _runs.lock_for_flow(db_url, plan, flow_run_id)
        except (NightLocked, LeaseHeld) as exc:  # another run reduces it: said once, nothing taken
            n.state, n.message = "locked", f"{type(exc).__name__}: {exc}"
            logger.error("%s: locked %s", n.night_id, n.message)
            continue
        start = start_camera_night.submit(n.night_id, n.night_path, sjson, db_url, overwrite, flow_run_id,
                                          host, pid, int(keep_old))
        track(start, "start", n.night_id)
    logger.info("reduce-night: %d camera-night(s): %s", len(nights_), ", ".join(nights_))

    def open_nights() -> list[_Night]:
        return [n for n in nights_.values() if n.state in ("pending", "running")]

    def end_night(n: _Night, state: str, message: str, report_partial: bool = True) -> None:
        n.state, n.message = state, message
        if state == "failed" and n.handle is not None and report_partial:
            _report_failed_night(n, sjson, logger)  # before the lease goes: the figures read work/
        # nothing more written under work/ after a failure, and nothing once the run is recorded ended
        stop_splitter(n.night_path, n.handle.run_id if n.handle else None, clean=state == "succeeded")
        if state == "failed":
            try:
                if n.handle is not None:
                    _runs.catalog(db_url).finish_run(n.handle.run_id, "failed", error=message[:2000])
                else:  # stopped while its start task opened the run: found by the flow run's id
                    _runs.end_unreturned_run(db_url, n.night_path, flow_run_id, message)
            except Exception as exc:  # noqa: BLE001
                logger.warning("%s: could not end run in the catalog: %s", n.night_id, exc)
        if n.handle is not None:
            heartbeat.run_ids.discard(n.handle.run_id)
        nightlock.release_dir(n.night_path)
        _notify("night_finished", n.night_id, state, message)
        (logger.info if state == "succeeded" else logger.error)("%s: %s %s", n.night_id, state, message)

    def split_here(n: _Night, items: list[tuple[str, str]]) -> None:
        """Split ``items`` in a thread of the flow's (none: start the night's splitter process, whose spawn and
        imports take a few seconds, while its first batch runs, as the library driver does)."""
        n.split_busy = True
        # the thread sees the flow run's context (its logger, its id for the night's plan)
        done = split_threads.submit(contextvars.copy_context().run, split_batches, n.night_id, n.handle, sjson,
                                    items, True, logger)
        done.add_done_callback(lambda f, nid=n.night_id: events.put(("split-here", nid, items, f)))

    def maybe_split_or_combine(n: _Night) -> None:
        if n.state != "running" or n.split_busy:
            return
        if n.split_pending:
            items = list(n.split_pending)
            n.split_pending.clear()
            n.split_busy = True
            if split_threads is None:
                track(split_task.submit(n.night_id, n.handle, sjson, items), "split", n.night_id)
            else:
                split_here(n, items)
        elif not n.left and not n.combine_submitted:
            if n.failed:
                end_night(n, "failed", f"{len(n.failed)} batch(es) failed: " + "; ".join(n.failed[:5]))
                return
            n.combine_submitted = True
            stop_splitter(n.night_path, n.handle.run_id, clean=True)  # idle: its split ended; the combine writes
            track(combine_task.submit(n.night_id, n.handle, sjson), "combine", n.night_id)

    with _runs.Heartbeat(db_url) as heartbeat:
        try:
            while open_nights():
                try:
                    kind, night_id, payload, fut = events.get(timeout=5.0)
                except queue.Empty:
                    continue
                n = nights_[night_id]
                if kind == "split-here":  # a split of the flow's own thread (concurrent.futures.Future)
                    n.split_busy = False
                    exc = fut.exception()
                    if exc is not None:  # the combine splits them; the next split starts afresh
                        what = (f"{len(payload)} batch(es) not split now ({', '.join(Path(p).name for p, _ in payload)})"
                                if payload else "splitter not started")
                        logger.warning("%s: %s (the combine splits what the store lacks): %s: %s", n.night_id, what,
                                       type(exc).__name__, exc)
                    maybe_split_or_combine(n)
                    continue
                fut.wait()
                st = fut.state
                if kind == "batch":  # its thread is free: the next batch, behind any split already queued
                    in_flight[0] -= 1
                    submit_batches()
                if not st.is_completed():
                    exc, err = _state_failure(st, fut)
                    if kind == "start":
                        end_night(n, "locked" if _refused(exc, err) else "failed", err)
                    elif kind == "batch":
                        n.failed.append(f"batch {payload}: {err}")
                        n.left.discard(payload)
                        _notify("batch_done", n.night_id, n.batches[payload], False)
                        maybe_split_or_combine(n)
                    elif kind == "split":  # never raises on data; a crash here is not fatal either
                        n.split_busy = False
                        maybe_split_or_combine(n)
                    else:
                        end_night(n, "failed", f"{kind}: {err}")
                    continue
                if kind == "start":
                    n.handle = fut.result()
                    n.state = "running"
                    heartbeat.run_ids.add(n.handle.run_id)
                    track(prepare_task.submit(n.night_id, n.handle, sjson, require_calibration), "prepare",
                          n.night_id)
                elif kind == "prepare":
                    n.left = set(n.batches)
                    waiting.extend((n, b) for b in sorted(n.batches))
                    submit_batches()
                    if split_threads is not None and n.left - set(n.handle.done):
                        split_here(n, [])
                    logger.info("%s: %s run, %d batches (%d already done)", n.night_id,
                                n.handle.decision, len(n.batches), len(n.handle.done))
                elif kind == "batch":
                    res = fut.result()
                    n.left.discard(payload)
                    n.done_frames += n.batches[payload]
                    n.split_pending.append((res["path"], res["sha256"]))
                    _notify("batch_done", n.night_id, n.batches[payload], True, int(res.get("rejected") or 0))
                    done = len(n.batches) - len(n.left)
                    now = time.monotonic()
                    if n.left and now - n.progress_at < PROGRESS_INTERVAL:
                        maybe_split_or_combine(n)  # at most one progress API call every few seconds
                        continue
                    n.progress_at = now
                    try:
                        update_progress_artifact(n.progress_id, 100.0 * done / len(n.batches),
                                                 description=f"{n.night_id}: {done}/{len(n.batches)} batches, "
                                                             f"{n.done_frames}/{n.nframes} frames")
                    except Exception as exc:  # noqa: BLE001 - progress is cosmetic
                        logger.debug("progress artifact: %s", exc)
                    maybe_split_or_combine(n)
                elif kind == "split":
                    n.split_busy = False
                    maybe_split_or_combine(n)
                elif kind == "combine":
                    n.result = fut.result()
                    end_night(n, "succeeded", json.dumps(n.result["summary"]))
        finally:
            signame = _runs.interruption(sys.exc_info()[1])
            why = f"interrupted ({signame})" if signame else "flow ended before this camera-night finished"
            for n in open_nights():
                end_night(n, "failed", why, report_partial=False)  # no figures while being stopped
            if split_threads is not None:  # every splitter is stopped: a split still waiting returns at once
                split_threads.shutdown(wait=False, cancel_futures=True)

    results = [{"night_id": n.night_id, "state": n.state, "message": n.message,
                **(n.result or {})} for n in nights_.values()]
    _record_no_data(db_url, datadir, missing_dirs, logger, publish=False)
    results += [{"night_id": cn, "state": "empty", "message": why} for cn, why in missing_dirs]
    _publish_nights(datadir, nights_, missing_dirs, sjson, logger)
    # a camera-night without frames is an ordinary night (dome closed), not a failure
    bad = [r for r in results if r["state"] not in ("succeeded", "empty", "up-to-date")]
    if bad:  # each was logged with its reason: the run's state says which, with no traceback of this function
        return Failed(message="camera-nights not reduced: " + "; ".join(
            f"{r['night_id']} {r['state']}: {r['message'][:300]}" for r in bad))
    return results


def _record_no_data(db_url: str, datadir: str, entries: list[tuple[str, str]], logger: Any,
                    publish: bool = True) -> None:
    """Camera-nights without a directory: recorded as ``empty`` in the catalog (where the camera is known);
    with ``publish``, one artifact naming them."""
    if not entries:
        return
    for cn, why in entries:
        if len(cn) == 11:  # <night><site><cam>; a bare night names no camera to record
            try:
                _runs.record_no_data(db_url, Path(datadir) / cn, why)
            except Exception as exc:  # noqa: BLE001 - the artifact still says it
                logger.warning("%s: not recorded in the catalog: %s", cn, exc)
    if not publish:
        return
    nights = sorted({cn[:8] for cn, _ in entries})
    report.publish_markdown(report.artifact_key("nodata", *nights[:3]), report.no_data_markdown(entries),
                            f"No data: {', '.join(cn for cn, _ in entries)[:200]}")


def _publish_nights(datadir: str, nights_: dict[str, _Night], missing: list[tuple[str, str]], sjson: str,
                    logger: Any) -> None:
    """Per night and site: the summary figure across cameras and one table of its camera-nights, and
    an artifact naming the camera-nights without frames (empty ``raw/`` or ``missing`` directories)."""
    from mascara.quicklook import update_night_summaries

    settings = json.loads(sjson)
    empty = [(n.night_id, n.message) for n in nights_.values() if n.state == "empty"] + list(missing)
    if empty:
        report.publish_markdown(report.artifact_key("nodata", *sorted({e[0][:8] for e in empty})[:3]),
                                report.no_data_markdown(empty), "No data: " + ", ".join(e[0] for e in empty)[:200])
    groups: dict[tuple[str, str], list[_Night]] = {}
    for n in nights_.values():
        groups.setdefault((n.night_id[:8], n.night_id[8:10]), []).append(n)
    for (night, site), members in sorted(groups.items()):
        rows = []
        for n in sorted(members, key=lambda m: m.night_id):
            r = n.result or n.partial or {}
            rows.append(report.camera_night_row(n.night_id, n.state, r.get("summary"), r.get("files", ()),
                                                r.get("quality"), settings, n.message))
        reduced = [n.night_path for n in members if n.state == "succeeded"]
        # every reduced camera of the night and site in the data directory, not only this run's; never raises
        drawn = update_night_summaries(datadir, reduced, logger) if reduced else []
        figure = drawn[0] if drawn else None
        try:
            report.publish_table(report.artifact_key(night, site, "cameras"), rows,
                                 f"Night {night} at {site}: every camera")
            report.publish_markdown(report.artifact_key(night, site, "night"),
                                    report.night_markdown(night, site, rows, figure),
                                    f"Night {night} at {site}: summary figure and table")
        except Exception as exc:  # noqa: BLE001 - reporting never fails a reduced night
            logger.warning("night artifacts of %s %s not published: %s", night, site, exc)


def _state_failure(state: Any, fut: Any = None) -> tuple[BaseException | None, str]:
    """The exception a task run that did not complete raised (None if it left none) and its one-line text."""
    if fut is not None and not state.is_final():
        # a task runner that could not run the task at all (a Dask worker that cannot unpickle it) leaves
        # the task run Pending; its own future holds the reason
        try:
            fut.result(timeout=0, raise_on_failure=False)
        except TimeoutError:
            pass
        except Exception as exc:  # noqa: BLE001
            return exc, f"{type(exc).__name__}: {exc} (task run left {state.type.value})"
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as e:  # noqa: BLE001 - the result could not be read (storage): no exception of the task's
        return None, f"{type(e).__name__}: {e} ({state.type.value}: {state.message})"
    if isinstance(exc, BaseException):
        if isinstance(exc, PrefectException):
            # Prefect's stand-ins (FailedRun, CrashedRun, UnfinishedRun...) are built from the state when the
            # task's own exception did not come back with it: no type is left to tell by, only the message
            extra = "" if not state.message or state.message in str(exc) else f" ({state.message})"
            return None, f"{type(exc).__name__}: {exc}{extra}"
        return exc, f"{type(exc).__name__}: {exc}"
    return None, f"{state.type.value}: {state.message}"


def _refused(exc: BaseException | None, text: str) -> bool:
    """Whether a start task failed because another run holds the camera-night (its lease or its directory lock).

    Told by the exception's type; only a failure that left no exception (a
    state with a message alone) is told by the text of that message.
    """
    if exc is not None:
        return isinstance(exc, (LeaseHeld, NightLocked))
    return "LeaseHeld" in text or "NightLocked" in text


def task_runner_for(dask_address: str | None) -> Any:
    """The task runner: threads (default), or Dask at ``tcp://...`` or on a ``local`` cluster."""
    if not dask_address:
        return BatchThreadPool(flow_workers())
    from prefect_dask import DaskTaskRunner

    if dask_address == "local":
        nworkers = flow_workers()
        return DaskTaskRunner(cluster_kwargs={"n_workers": nworkers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    return DaskTaskRunner(address=dask_address)


def flow_with_runner(dask_address: str | None = None) -> Any:
    """``reduce_night`` with the task runner of :func:`task_runner_for`."""
    return reduce_night.with_options(task_runner=task_runner_for(dask_address))


# Deployments pick the runner from the environment of the worker (see prefect.yaml).
if os.environ.get("MASCARA_DASK_ADDRESS"):
    reduce_night = flow_with_runner(os.environ["MASCARA_DASK_ADDRESS"])

# Prefect runs a deployment's entrypoint (``flows/reduce_night.py:reduce_night``) as a script, under the
# module name ``reduce_night``. Tasks defined under that name cannot be unpickled by a Dask worker (it
# imports them by module name, and ``reduce_night`` is no module there), so the flow handed to Prefect is
# the one of the installed package, ``flows.reduce_night``, whose tasks every process can import.
if __name__ not in ("flows.reduce_night", "__main__"):
    from flows.reduce_night import reduce_night  # noqa: E402,F811
