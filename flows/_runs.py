"""Catalog bookkeeping of a camera-night run, as plain functions (no Prefect).

The Prefect flow wraps these in tasks; ``mascprocess --no-prefect`` calls them
directly (:func:`drive_camera_night`). The life of a run (resume, move aside,
erase, what is done) is decided in one place, :mod:`mascara.catalog.lifecycle`;
this module adds parameter parsing, the per-process catalog handle, heartbeats
and the recording of batches.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from flows import _signals
from mascara import faults, selection
from mascara.catalog import Catalog, connect
from mascara.catalog.catalog import ABANDONED
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


# Parsing lives with the argument checks (mascara.selection): one place for mascprocess and the flow.
parse_nights = selection.parse_nights
previous_night = selection.previous_night
parse_letters = selection.parse_letters


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
             keep_old: int = KEEP_OLD, end_on_error: bool = False, take_lock: bool = True,
             defer_bin_removal: bool = False) -> RunHandle:
    """Register, lease, decide and move aside: :func:`mascara.catalog.lifecycle.open_run` on this URL."""
    return lifecycle.open_run(catalog(db_url), db_url, plan, overwrite=overwrite, keep_old=keep_old,
                              flow_run_id=flow_run_id, lease_seconds=lease_seconds, host=host, pid=pid,
                              end_on_error=end_on_error, take_lock=take_lock, defer_bin_removal=defer_bin_removal)


def lock_for_flow(db_url: str, plan: Any, flow_run_id: str | None) -> str:
    """:func:`mascara.catalog.lifecycle.lock_for_flow` on this URL."""
    return lifecycle.lock_for_flow(catalog(db_url), db_url, plan, flow_run_id)


def end_unreturned_run(db_url: str, night_path: str | Path, flow_run_id: str | None, error: str) -> str | None:
    """End as failed the run a flow run was opening when it stopped (its start task returned no handle).

    The run id derives from the flow run (:meth:`mascara.catalog.Catalog.start_run`),
    so it is found without the handle; a run that was never registered, or is
    already finished, is left alone. Returns the id of the run ended, or None.
    """
    from mascara.catalog.catalog import CatalogError, flow_run_run_id

    if not flow_run_id:
        return None
    cat = catalog(db_url)
    cn_id = cat.find_camera_night(night_path)
    if cn_id is None:
        return None
    run_id = flow_run_run_id(cn_id, flow_run_id)
    try:
        if cat.run_info(run_id).finished_at is not None:
            return None
    except CatalogError:
        return None
    cat.finish_run(run_id, "failed", error=error[:2000])
    return run_id


def end_runs_of_this_process(db_url: str, error: str) -> list[str]:
    """End as failed every run this process started and has not finished (returns their ids).

    For a process about to exit on a signal while runs go on in threads it
    cannot wait for (``mascprocess --live``): each is recorded with ``error``
    and its lease released, as the library driver records its own run.
    """
    import os
    import socket

    cat = catalog(db_url)
    ended = cat.running_runs_of(socket.gethostname(), os.getpid())
    for run_id in ended:
        cat.finish_run(run_id, "failed", error=error[:2000])
    return ended


def already_done(db_url: str, plan: Any) -> str | None:
    """Why a planned camera-night needs no reduction (:func:`mascara.catalog.lifecycle.up_to_date`), or None.

    A camera-night the catalog has never seen is not registered by asking.
    """
    cat = catalog(db_url)
    cn_id = cat.find_camera_night(plan.night.path)
    if cn_id is None:
        return None
    return lifecycle.up_to_date(cat, cn_id, lifecycle.fingerprint_key(plan.fingerprint()))


def why_reduce(db_url: str, plan: Any) -> str:
    """Why a planned camera-night needs reducing (:func:`mascara.catalog.lifecycle.why_reduce`), in words."""
    cat = catalog(db_url)
    fp = plan.fingerprint()
    why = lifecycle.why_reduce(cat, cat.find_camera_night(plan.night.path), lifecycle.fingerprint_key(fp), fp)
    return why or "up to date"


# --------------------------------------------------------------------------- recording


def _size(path: Path) -> int | None:
    """Size of a regular file, None for a directory, a dangling link or a vanished file."""
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def record_batch_failure(cat: Any, run_id: str, batch: int, exc: BaseException) -> None:
    """Record ``batch`` of run ``run_id`` failed with ``exc``; a failure to record it is logged, so that it
    never hides ``exc`` (the run lost its lease, the database went away: the run's end says the rest)."""
    from mascara.catalog import LeaseLost

    if getattr(exc, "batch_recorded", False):  # recorded succeeded before its run ended: nothing to say
        return
    try:
        cat.batch_failed(run_id, batch, f"{type(exc).__name__}: {exc}")
    except LeaseLost as rec:
        if isinstance(exc, LeaseLost) and "has ended" in str(rec):  # done after its run's own end: no alarm
            logging.getLogger(__name__).info("batch %s not recorded: %s", batch, rec)
        else:
            logging.getLogger(__name__).warning("batch %s failed (%s: %s) and could not be recorded: %s", batch,
                                                type(exc).__name__, exc, rec)
    except Exception as rec:  # noqa: BLE001
        logging.getLogger(__name__).warning("batch %s failed (%s: %s) and could not be recorded: %s", batch,
                                            type(exc).__name__, exc, rec)


def reduce_recorded(handle: RunHandle, batch: int, reduce: Any) -> Any:
    """``reduce()`` one batch of a Prefect task, recorded as every driver records it: the batch ``running``
    first, then its outcome (:func:`record_batch`), or its failure with its error."""
    cat = catalog(handle.db_url)
    cat.batch_started(handle.run_id, batch)
    try:
        outcome = reduce()
        record_batch(handle, outcome)
    except Exception as exc:
        record_batch_failure(cat, handle.run_id, batch, exc)
        raise
    return outcome


def record_batch(handle: RunHandle, outcome: Any) -> None:
    """Record a finished batch: its frames (accepted and rejected, with reasons), gap counts, the batch file."""
    faults.checkpoint("after_batch_file")
    cat = catalog(handle.db_url)
    rows = [(seq, name, size, "ok", None) for seq, name, size in outcome.accepted]
    raw = Path(handle.night_path) / "raw"
    rows += [(seq, name, _size(raw / name), "rejected", reason) for seq, name, reason in outcome.rejected]
    counts = {"slots_expected": outcome.slots_expected, "frames_present": outcome.frames_present,
              "frames_accepted": len(outcome.accepted), "frames_rejected": outcome.frames_rejected,
              "frames_missing": outcome.frames_missing}
    cat.batch_succeeded(handle.run_id, outcome.batch, outcome.path, outcome.sha256, timings=outcome.timings,
                        astro_rms=outcome.astro_rms, astro_nstars=outcome.astro_nstars, flagged=outcome.flagged,
                        frames=counts, frame_rows=rows)  # one transaction, fenced: not after the run's end
    # the batch is reduced and recorded: its sky quality is a diagnostic and never fails it (an outside trial:
    # a run ended by SIGTERM between the two made the quality's write fail, and the batch was then logged as
    # "not recorded ... the next run does it again", which reused it, recorded)
    from mascara.catalog import LeaseLost

    try:
        record_quality(handle, outcome.path)
    except Exception as exc:  # noqa: BLE001
        log.info("batch %s: reduced and recorded; its sky quality was not (%s: %s); the next run that reuses "
                 "the batch records it", outcome.batch, type(exc).__name__, exc)
        if isinstance(exc, LeaseLost):  # the run is over or taken over: nothing more of it may be written
            exc.batch_recorded = True  # type: ignore[attr-defined]  # (record_batch_failure: nothing to record)
            raise


def record_quality(handle: RunHandle, batch_path: str) -> dict:
    """Sky quality of a reduced batch (:mod:`mascara.diagnostics`): the catalog, then ``work/quality/``.

    In that order: a run that reuses the batch records its quality when the
    file is missing, so the file is written only once the catalog has it.
    """
    from mascara.diagnostics import night_batch_quality, save_batch_quality

    q = night_batch_quality(handle.night_path, batch_path)
    catalog(handle.db_url).record_quality(handle.run_id, q["batch"],
                                          [(f["lstseq"], f["sky"], f["transparency"]) for f in q["frames"]],
                                          q["transparency"], q["low_transparency"])
    save_batch_quality(handle.night_path, q)
    return q


def record_live_without_frames(db_url: str, night_path: str | Path, plan: Any) -> str:
    """Record a live camera-night that got no frame as ``empty``, with why (as offline); returns why."""
    night_path = Path(night_path)
    if (night_path / "raw").is_dir():
        from mascara.reduce import plan_camera_night

        found = plan_camera_night(night_path, plan.settings).empty_reason()  # raw/ as it is at the end
        why = f"no science frame arrived before the end of the live run: {found or plan.empty_reason()}"
        record_intake(db_url, plan, empty_reason=why)
    else:
        why = "no night directory appeared before the end of the live run"
        record_no_data(db_url, night_path, why)
    return why


def record_quality_if_missing(handle: RunHandle, batch: int, batch_path: str | Path) -> bool:
    """:func:`record_quality` of a reused batch whose quality was never recorded (its run ended between
    recording the batch and its quality: ``work/quality/`` is written last); whether it was recorded now."""
    from mascara.diagnostics import quality_path

    if quality_path(handle.night_path, batch).is_file() or not Path(batch_path).is_file():
        return False
    record_quality(handle, str(batch_path))
    return True


def record_missing_qualities(handle: RunHandle, plan: Any) -> list[int]:
    """:func:`record_quality_if_missing` of every batch of ``plan`` a resumed run reuses; the batches recorded.
    Never raises (a diagnostic)."""
    done = []
    for b in sorted(set(handle.done) & set(plan.batches)):
        try:
            if record_quality_if_missing(handle, b, plan.batch_path(b)):
                done.append(b)
        except Exception as exc:  # noqa: BLE001 - a diagnostic
            log.warning("batch %s: sky quality not recorded: %s: %s", b, type(exc).__name__, exc)
    return done


def record_intake(db_url: str, plan: Any, camera_night_id: str | None = None, run_id: str | None = None, *,
                  empty_reason: str | None = None) -> str:
    """Record what the intake found in a night's ``raw/`` (gaps, emptiness) and the files it refused by name.

    Registers the camera-night if needed (an empty night has no run); returns its id. ``empty_reason``
    replaces the plan's own for a night without frames (a live run says that none arrived).
    """
    cat = catalog(db_url)
    night = plan.night
    cn_id = camera_night_id or cat.register_camera_night(night.site, night.camera, night.night, night.path)
    summary = plan.intake_summary()
    if empty_reason is not None and summary["empty_reason"]:
        summary["empty_reason"] = empty_reason
    cat.record_intake(cn_id, run_id, **summary)
    # files recorded by an earlier reduction that have left raw/ since; only when a reduction starts, which
    # records the files it reads (a night whose frames were all archived keeps its last reduction's record)
    present = plan.raw_filenames() if run_id is not None else None
    if present is not None:
        gone = cat.mark_gone_frames(cn_id, present)
        if gone:
            log.warning("%s: %d recorded file(s) no longer in raw/ (now 'gone' in the catalog), e.g. %s",
                        night.path, len(gone), ", ".join(gone[:3]))
    cat.record_frames(cn_id, [(r.lstseq, r.filename, r.size, "rejected", r.reason) for r in plan.rejected])
    return cn_id


def record_refused(db_url: str, camera_night_id: str, exc: BaseException) -> int:
    """Record the frames a failed preparation refused (``NoCameraSolution.refused``); how many.

    Without it a night none of whose frames passed the intake failed with "60 refused" and listed none
    of them: they are recorded by the batches, which never ran.
    """
    refused = getattr(exc, "refused", None) or []
    try:
        if refused:
            catalog(db_url).record_frames(camera_night_id, [(q, name, size, "rejected", why)
                                                            for q, name, size, why in refused])
    except Exception as record:  # noqa: BLE001 - the failure itself is recorded next, whatever happens here
        log.warning("the %d frame(s) refused could not be recorded: %s", len(refused), record)
        return 0
    return len(refused)


def record_no_data(db_url: str, night_path: Path | str, reason: str) -> str:
    """Record a camera-night that has no frames, not even a directory, as ``empty`` (no run); returns its id."""
    from mascara.selection import NIGHT_DIR_RE

    p = Path(night_path)
    m = NIGHT_DIR_RE.match(p.name)
    if m is None:
        raise ValueError(f"{p}: not a night directory name (<YYYYMMDD><SITE><CAM>)")
    cat = catalog(db_url)
    cn_id = cat.register_camera_night(m["site"], m["camera"], m["night"], p)
    cat.record_intake(cn_id, None, frames_present=0, slots_expected=0, frames_missing=0, empty_reason=reason)
    return cn_id


def _unused_reason(name: str, kind: str) -> str:
    if name.startswith("calib_flat"):
        return "not used: no flat field is applied (the master dark or bias is subtracted, then the frame cropped)"
    return f"not used: the master is a {kind}"


def record_calibration(db_url: str, camera_night_id: str, night_path: str, state: Mapping[str, Any]) -> None:
    """Record the master calibration of a night and a frame row per calibration file (used, unused, rejected)."""
    raw = Path(night_path) / "raw"
    rows = [(None, name, _size(raw / name), "ok", f"combined into the master {state['kind']}")
            for name in state["files"]]
    rows += [(None, name, _size(raw / name), "ok", _unused_reason(name, state["kind"])) for name in state["unused"]]
    rows += [(None, name, _size(raw / name), "rejected", reason) for name, reason in state["rejected"]]
    catalog(db_url).record_calibration(camera_night_id, state["kind"], state["files"], state["note"], rows)


def finish_succeeded(handle: RunHandle, products: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Record the products and the end of the run in one transaction; returns the product descriptions."""
    return lifecycle.finish_succeeded(catalog(handle.db_url), handle, products)


def combine_and_finish(handle: RunHandle, plan: Any) -> tuple[dict[str, Any], dict[str, Path]]:
    """The end of every driver's run: enter ``combining``, check that every batch file is there, write the
    night files, draw the quick-look figures (:func:`final_quicklook`), then record the products and the
    run's ``succeeded`` (one transaction); returns the products and the figures (to publish, not redraw:
    after the end, ``quicklook/`` is no longer the run's)."""
    from mascara.reduce import combine_camera_night, prepare_camera_night

    cat = catalog(handle.db_url)
    cat.set_phase(handle.run_id, "combining")
    if getattr(plan, "live", False):  # what it reduced, as an offline plan of raw/ names it (migration 0010)
        from mascara.reduce import live_inventory

        inventory = live_inventory(plan)
        if inventory is not None:
            cat.set_final_inventory(handle.run_id, inventory)
        else:
            log.info("%s: raw/ holds files this live run did not reduce as they are now; an offline run "
                     "(--skip-done, backfill) will reduce the night again", handle.night_id)
    paths = [str(plan.batch_path(b)) for b in plan.batches]
    lifecycle.check_batch_files(paths)
    products = combine_camera_night(plan, prepare_camera_night(plan), paths)
    figures = final_quicklook(handle.night_path)
    finish_succeeded(handle, products)
    return products, figures


def final_quicklook(night_path: str | Path, logger: Any = None) -> dict[str, Path]:
    """A finished night's quick-look figures, drawn before its run records its end.

    Recording the end releases the lease and the night directory's lock: a
    run waiting for them (``-o``, other settings) may then move ``quicklook/``
    aside, so figures drawn after it would land beside, or inside, what that
    run is moving. Drawn here, they are part of the run; an interruption while
    they are drawn fails it, and the next run ends it from the outputs already
    written (the combine is idempotent).
    """
    faults.checkpoint("drawing_quicklook")
    return draw_quicklook(night_path, logger)


class NothingToReduce(RuntimeError):
    """A camera-night whose ``raw/`` holds no usable science frame (recorded by the intake)."""


def drive_camera_night(db_url: str, night: Any, settings: Any = None, *, overwrite: bool = False,
                       keep_old: int = KEEP_OLD, pid: int | None = None, host: str | None = None,
                       split_in_background: bool = True, heartbeat: Heartbeat | None = None,
                       flow_run_id: str | None = None, require_calibration: bool = False) -> tuple[RunHandle, Any]:
    """Reduce one camera-night with the library driver, recorded exactly as the flow records it.

    Returns the run handle and the :class:`mascara.reduce.NightResult`.
    ``flow_run_id`` makes the run id deterministic, as in a Prefect flow run
    (a second call with it is a retry of the same run).

    Raises
    ------
    NothingToReduce
        the night's ``raw/`` holds no usable science frame (recorded, no run started).
    LeaseHeld
        another live run reduces this camera-night (nothing was done).
    CalibrationRequired
        ``require_calibration`` and no usable master dark (recorded, the run failed).
    Exception
        whatever stopped the reduction, after the run was recorded as failed
        (``KeyboardInterrupt``: recorded as interrupted).
    """
    from mascara.reduce import (
        CalibrationRequired,
        plan_camera_night,
        reduce_camera_night,
    )

    plan = plan_camera_night(night, settings)
    if plan.empty_reason():
        record_intake(db_url, plan)
        raise NothingToReduce(plan.empty_reason())
    cat = catalog(db_url)
    # a signal while the run opens is raised inside the try below; nothing between the two can fail,
    # or the hold would never be released
    with _signals.Hold() as hold:  # erased outputs stay in their bins: the held part is renames and catalog writes
        handle = open_run(db_url, plan, overwrite=overwrite, keep_old=keep_old, pid=pid, host=host,
                          flow_run_id=flow_run_id, end_on_error=True, defer_bin_removal=True)

    def on_prepared(ctx: Any) -> None:
        record_calibration(db_url, handle.camera_night_id, handle.night_path, ctx.calibration_state())

    def on_batch_start(batch: int) -> None:  # running in the catalog while it is reduced, not after
        cat.batch_started(handle.run_id, batch)

    def on_batch_error(batch: int, exc: Exception) -> None:
        record_batch_failure(cat, handle.run_id, batch, exc)

    def on_batch(outcome: Any) -> None:
        record_batch(handle, outcome)

    try:  # from here on the run is reducing: whatever stops it (a signal included) is recorded
        hold.release()
        if heartbeat is not None:
            heartbeat.run_ids.add(handle.run_id)
        # the erases' bins, now that a signal stops the run again; one that cannot be removed fails the run
        # (recorded as its failure), so that no finished night keeps an erased reduction hidden on disk
        lifecycle.remove_bins(handle.night_path)
        record_intake(db_url, plan, handle.camera_night_id, handle.run_id)
        record_missing_qualities(handle, plan)
        result = reduce_camera_night(plan.night, plan.settings, skip=handle.done, on_batch=on_batch,
                                     on_batch_start=on_batch_start, on_batch_error=on_batch_error,
                                     on_prepared=on_prepared,
                                     require_calibration=require_calibration,
                                     split_in_background=split_in_background, combine=False)
        result.products, _ = combine_and_finish(handle, plan)
    except CalibrationRequired as exc:
        record_calibration(db_url, handle.camera_night_id, handle.night_path, exc.state)
        cat.finish_run(handle.run_id, "failed", error=str(exc))
        raise
    except KeyboardInterrupt as exc:
        with _signals.shielded():  # a second Ctrl-C does not cut this record short
            cat.finish_run(handle.run_id, "failed", error=f"interrupted ({interruption(exc)})")
        raise
    except Exception as exc:
        record_refused(db_url, handle.camera_night_id, exc)
        cat.finish_run(handle.run_id, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if heartbeat is not None:
            heartbeat.run_ids.discard(handle.run_id)
    return handle, result


def drive_live_camera_night(db_url: str, night: Any, settings: Any = None, *, grace: float = 300.0,
                            idle_timeout: float | None = None, until_jd: float | None = None, poll: float = 2.0,
                            settle: float = 1.0, keep_old: int = KEEP_OLD, heartbeat: Heartbeat | None = None,
                            split_in_background: bool = True, require_calibration: bool = False,
                            flow_run_id: str | None = None, on_batch: Any = None,
                            stop: threading.Event | None = None) -> tuple[RunHandle, Any]:
    """Reduce one camera-night while it is observed, recorded as an offline run is (issue 14).

    The run opens (lease, decision, moves aside) when the first batch is
    ready; a restarted live run of the same night and settings resumes it
    (its fingerprint names no raw inventory, :data:`mascara.reduce.LIVE_INVENTORY`).
    Each batch is registered in the catalog once complete and recorded when
    reduced; at the end (``until_jd`` or ``idle_timeout``) the night files
    are combined and the run ends ``succeeded``. ``on_batch`` is called
    after each batch is recorded (a flow publishes progress there). Setting
    ``stop`` ends the run before its next batch with
    :class:`mascara.reduce.LiveStopped`, recorded as failed with the event's
    ``reason`` attribute when it has one (``mascprocess --live`` sets
    ``interrupted (SIGTERM)``), after the run's writes have stopped and before
    its lease is released.

    Raises
    ------
    NothingToReduce
        no science frame arrived before the end.
    LeaseHeld, LeaseLost
        another run holds or took over the camera-night.
    """
    from mascara.reduce import LiveStopped, reduce_camera_night_live

    state: dict[str, Any] = {}

    def on_start(plan: Any) -> set[int]:
        with _signals.Hold() as hold:
            handle = open_run(db_url, plan, keep_old=keep_old, flow_run_id=flow_run_id, end_on_error=True,
                              defer_bin_removal=True)
            state["handle"] = handle
        hold.release()  # the handle is known: an interruption is recorded from here on
        if heartbeat is not None:
            heartbeat.run_ids.add(handle.run_id)
        lifecycle.remove_bins(handle.night_path)  # as in drive_camera_night
        record_intake(db_url, plan, handle.camera_night_id, handle.run_id)  # so far; again at the end
        record_missing_qualities(handle, plan)
        return set(handle.done)

    def on_ready(plan: Any) -> None:
        catalog(db_url).register_batches(state["handle"].run_id, plan.batch_rows(), grown=True)

    def on_prepared(ctx: Any) -> None:
        h = state["handle"]
        record_calibration(db_url, h.camera_night_id, h.night_path, ctx.calibration_state())

    def on_reduce(batch: int) -> None:
        catalog(db_url).batch_started(state["handle"].run_id, batch)

    def on_reduce_error(batch: int, exc: Exception) -> None:
        record_batch_failure(catalog(db_url), state["handle"].run_id, batch, exc)

    def on_reduced(outcome: Any) -> None:
        h = state["handle"]
        record_batch(h, outcome)
        draw_quicklook(h.night_path)  # a night being observed: its figures follow it
        if on_batch is not None:
            on_batch(h, outcome)

    cat = catalog(db_url)
    try:
        result, plan = reduce_camera_night_live(
            night.path if hasattr(night, "path") else night, settings, grace=grace, idle_timeout=idle_timeout,
            until_jd=until_jd, poll=poll, settle=settle, on_start=on_start, on_ready=on_ready,
            on_batch=on_reduced, on_batch_start=on_reduce, on_batch_error=on_reduce_error, on_prepared=on_prepared,
            split_in_background=split_in_background, require_calibration=require_calibration, stop=stop)
        handle = state.get("handle")
        if handle is None:  # recorded as an offline run records a night without frames, then said
            night_path = Path(night.path if hasattr(night, "path") else night)
            raise NothingToReduce(f"{night_path}: {record_live_without_frames(db_url, night_path, plan)}")
        record_intake(db_url, plan, handle.camera_night_id, handle.run_id)
        result.products, _ = combine_and_finish(handle, plan)
    except NothingToReduce:
        raise
    except KeyboardInterrupt as exc:
        if "handle" in state:
            with _signals.shielded():
                cat.finish_run(state["handle"].run_id, "failed", error=f"interrupted ({interruption(exc)})")
        raise
    except Exception as exc:
        if "handle" in state:
            reason = getattr(stop, "reason", None) if isinstance(exc, LiveStopped) else None
            cat.finish_run(state["handle"].run_id, "failed", error=reason or f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if heartbeat is not None and "handle" in state:
            heartbeat.run_ids.discard(state["handle"].run_id)
    return state["handle"], result


_drawn_at: dict[str, float] = {}
_drawn_lock = threading.Lock()


def draw_quicklook(night_path: str | Path, logger: Any = None, *, every: float = 0.0) -> dict[str, Path]:
    """Redraw a camera-night's quick-look figures (:mod:`mascara.quicklook`); a figure never fails a reduction.

    With ``every`` > 0 the figures are redrawn only if the first such call for
    this night in this process, or the last redraw, is at least ``every``
    seconds old (``{}`` otherwise): while a night is reduced its figures follow
    it without a redraw per batch, and a short night is drawn once, at its end.
    Failures are logged on ``logger`` (a Prefect run logger in the flows).
    """
    from mascara.quicklook import update_camera_night

    key = str(night_path)
    now = time.monotonic()
    with _drawn_lock:
        if every > 0 and now - _drawn_at.setdefault(key, now) < every:
            return {}
        _drawn_at[key] = now
    try:
        return update_camera_night(night_path)
    except Exception as exc:  # noqa: BLE001
        (logger or log).warning("quick-look figures of %s not drawn: %s: %s", night_path, type(exc).__name__, exc)
        return {}


def draw_night_summaries(datadir: str | Path, night_paths: list[Path]) -> list[Path]:
    """The summary figure across cameras of every night and site among ``night_paths`` (reduced ones only)."""
    from mascara.quicklook import update_night_summaries

    return update_night_summaries(datadir, night_paths)


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
        from mascara import nightlock

        while not self._stop.wait(self.interval):
            try:  # a run that took over a stalled run's lease takes its night's lock once that process let go
                nightlock.retry_pending()
            except Exception as exc:  # noqa: BLE001 - a safety net; the lease still decides
                log.warning("night locks not retried: %s", exc)
            for run_id in list(self.run_ids):
                try:
                    catalog(self.db_url).heartbeat(run_id)
                except Exception as exc:  # a lost lease shows up when the run finishes
                    if self._ended(run_id):  # finished between the snapshot and its discard: nothing to say
                        self.run_ids.discard(run_id)
                        continue
                    log.warning("heartbeat of run %s failed: %s", run_id, exc)

    def _ended(self, run_id: str) -> bool:
        """Whether ``run_id`` recorded its own end (its lease released with it).

        A run whose lease another run took over is recorded failed too, by
        that run ("abandoned: ..."); its failed heartbeat is the first sign of
        the takeover and is still said.
        """
        try:
            info = catalog(self.db_url).run_info(run_id)
        except Exception:  # noqa: BLE001 - unknown run or no catalog: the warning stands
            return False
        return info.status != "running" and not (info.error or "").startswith(ABANDONED)
