"""``mascprocess``: reduce nights from the command line with the ``reduce-night`` flow.

Without ``PREFECT_API_URL`` the command starts a temporary local server for
the run, Prefect's own ephemeral server, as its first step, so that it boots
while the flow and the science modules are imported (:mod:`flows._tempserver`);
with it, the run shows in that server's UI.
``--no-prefect`` runs the library's sequential driver instead, with the same
catalog bookkeeping.

The arguments are checked first (:func:`mascara.selection.select_nights`),
before Prefect or the science modules are imported.  Exit codes:

- 0: every selected camera-night was reduced (warnings, rejected frames and
  gaps are recorded in the catalog and shown by ``mascara status``);
- 1: at least one camera-night was not reduced: it failed, was empty, lacked
  the calibration ``--require-calibration`` asks for, or another run holds it;
  each is recorded in the catalog where the camera-night exists; also when
  the temporary Prefect server could not start, or the Prefect server or
  the catalog server named does not answer (one line; nothing started);
- 2: a command-line mistake (a malformed or unknown night, camera or site, a
  missing data directory or settings file, nothing matching); nothing started.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from mascara import _collector

# Before Prefect is imported: its settings are read once, at import.
_PREFECT_ENV = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
}


def _prepare_environment(args: argparse.Namespace) -> None:
    for k, v in _PREFECT_ENV.items():
        os.environ.setdefault(k, v)
    level = "WARNING" if (args.quiet or not args.verbose) else "INFO"
    # the run's INFO messages reach the Prefect server (the UI's logs of the run) while the terminal shows
    # only what was asked for: the level is set on Prefect's console handler, not on its loggers
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", level)
    root = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=root, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # Prefect's records reach this handler by propagation
        handler.setLevel(root)
        handler.addFilter(_PrefectBelow(logging.getLevelName(level)))
    for noisy in ("httpx", "httpcore", "websockets", "numba", "distributed", "asyncio", "aiosqlite", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _PrefectBelow(logging.Filter):
    """Drops Prefect's records (the run loggers' included) below ``level``: the terminal shows them as it
    did when Prefect's loggers themselves were at that level, while the server still receives them."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or not record.name.startswith("prefect")


class RichProgress:
    """Progress bars per camera-night: frames and batches (a ``ProgressSink``)."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("frames"),
            TextColumn("{task.fields[batches]}"), TimeElapsedColumn(), TextColumn("{task.fields[state]}"),
            transient=False,
        )
        self.tasks: dict[str, Any] = {}
        self.nbatches: dict[str, list[int]] = {}

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def night_planned(self, night_id: str, nframes: int, nbatches: int) -> None:
        self.nbatches[night_id] = [0, nbatches, 0, 0]  # done, of, failed, frames rejected
        self.tasks[night_id] = self.progress.add_task(night_id, total=nframes, batches=f"0/{nbatches} batches",
                                                      state="")

    def batch_done(self, night_id: str, nframes: int, ok: bool, rejected: int = 0) -> None:
        counts = self.nbatches[night_id]
        counts[0 if ok else 2] += 1
        counts[3] += rejected
        failed = f", {counts[2]} failed" if counts[2] else ""
        refused = f", {counts[3]} frames rejected" if counts[3] else ""
        # the bar counts frames through the reduction (the rejected ones are said beside it): a failed
        # batch's frames are not
        self.progress.update(self.tasks[night_id], advance=nframes if ok else 0,
                             batches=f"{counts[0]}/{counts[1]} batches{failed}{refused}")

    def night_finished(self, night_id: str, state: str, message: str) -> None:
        colour = {"succeeded": "green"}.get(state, "red")
        self.progress.update(self.tasks[night_id], state=f"[{colour}]{state}")


def _silent_prefect_server() -> str | None:
    """Why the Prefect server the settings name cannot be used (it does not answer), or None.

    Any HTTP answer counts as an answer (a server that wants a key says so
    itself); only a transport error (refused, unreachable, timed out) is
    reported, with what to do.
    """
    from flows._tempserver import configured_api_url, health

    url = configured_api_url()
    if not url:
        return None
    if url.startswith("http://"):
        cause = health(url, timeout=10.0)
        if isinstance(cause, int):  # an answer
            return None
    else:  # TLS as Prefect's client does it (its certificate settings)
        import httpx

        try:
            httpx.get(url.rstrip("/") + "/health", timeout=10.0)
            return None
        except httpx.TransportError as exc:
            cause = exc
    return (f"the Prefect server at {url} does not answer ({type(cause).__name__}: {cause}); start it, unset "
            "PREFECT_API_URL for a temporary server of this command, or use --no-prefect")


def _server_catalog_problem(db: str | None, datadir: str) -> str | None:
    """Why a catalog on a database server cannot be used (it does not answer, refuses the login), in one
    line with its password hidden, or None. A SQLite catalog is not opened here: its file is made by the run."""
    from mascara.catalog._engine import make_engine, resolve_url, unusable

    url = resolve_url(db, datadir)
    if url.startswith("sqlite"):
        return None
    from sqlalchemy.exc import SQLAlchemyError

    engine = make_engine(url)
    try:
        with engine.connect():
            return None
    except SQLAlchemyError as exc:
        return unusable(url, exc)
    finally:
        engine.dispose()


def _load_ahead() -> None:
    """What the run would load on first use, loaded while the temporary Prefect server boots.

    The science modules, the IERS table and astropy's coordinates (the
    first camera-night's preparation), the quick-look figures (matplotlib)
    and the JSON encoder Prefect imports when it creates the flow run
    (FastAPI's): 2-3 s that would otherwise come after the wait.
    """
    import fastapi.encoders  # noqa: F401

    import mascara.quicklook  # noqa: F401
    import mascara.reduce  # noqa: F401
    from mascara.sky import load_ahead

    load_ahead()


def cli_mascprocess(args: argparse.Namespace) -> int:
    """Handler of ``mascprocess`` and ``mascara process`` (arguments: mascara.cli.add_mascprocess_arguments).

    SIGTERM and SIGHUP are handled like SIGINT: the run of every camera-night
    in progress is recorded as failed with ``interrupted (SIGTERM)``, Prefect's
    temporary server is stopped, and the exit code is 128 + the signal number.
    """
    from flows import _signals

    try:
        with _signals.handled():
            return _mascprocess(args)
    except BaseException as exc:  # noqa: BLE001 - only interruptions are handled here
        from flows._runs import interruption  # here, not above: argument checks must not wait for imports

        name = interruption(exc)
        if name is None:
            raise
        print(f"mascprocess: interrupted by {name}; camera-nights in progress are recorded as failed "
              f"(interrupted) and resume on the next run", file=sys.stderr)
        return 128 + int(getattr(signal.Signals, name, signal.SIGINT))


def _mascprocess(args: argparse.Namespace) -> int:
    """Handler of ``mascprocess`` and ``mascara process`` (arguments: mascara.cli.add_mascprocess_arguments)."""
    from mascara.selection import SelectionError, select_nights

    if getattr(args, "live", False):
        _collector.settled()  # a night long; its modules load as the cameras start
        return run_live(args)
    try:  # before anything slow: a mistake costs a fraction of a second, not a server start
        sel = select_nights(args.datadir, args.night or "all", args.camera, args.site, settings_file=args.settings,
                            db_url=args.db)
    except SelectionError as exc:
        print(f"mascprocess: {exc}", file=sys.stderr)
        return 2
    if len(sel.not_found) > 3:  # a range: nights without data are ordinary
        print(f"mascprocess: no night directory for {len(sel.not_found)} of the requested camera-nights in "
              f"{sel.datadir} ({', '.join(sel.not_found[:3])}, ...); going on with the "
              f"{len(sel.night_dirs)} found", file=sys.stderr)
    else:
        for missing in sel.not_found:
            print(f"mascprocess: no night directory {missing} in {sel.datadir}; going on with the others",
                  file=sys.stderr)
    for why in sel.ignored:
        print(f"mascprocess: ignoring {why}", file=sys.stderr)
    _prepare_environment(args)
    settings = sel.settings
    if args.no_prefect:
        return run_without_prefect(args.datadir, args.night, args.camera, args.site, args.overwrite, args.db,
                                   settings, quiet=args.quiet, keep_old=args.keep_old,
                                   require_calibration=args.require_calibration, skip_done=args.skip_done)

    unreachable = _server_catalog_problem(args.db, args.datadir)
    if unreachable:  # before Prefect: a catalog server that does not answer is one line, not a flow's traceback
        print(f"mascprocess: {unreachable}", file=sys.stderr)
        return 1

    from flows._tempserver import early_server

    with early_server() as server:  # without an API URL, a temporary server boots while the rest is imported
        from contextlib import nullcontext

        silent = _silent_prefect_server() if server is None else None
        if silent:  # one line, not the client's page of tracebacks
            print(f"mascprocess: {silent}", file=sys.stderr)
            return 1

        from flows.reduce_night import flow_with_runner, set_progress_sink
        from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

        flow_obj = flow_with_runner(args.dask_address)
        params = dict(datadir=args.datadir, nights=args.night or "all", cameras=args.camera, site=args.site,
                      overwrite=args.overwrite, db_url=args.db, settings=settings, keep_old=args.keep_old,
                      require_calibration=args.require_calibration, skip_done=args.skip_done)
        t0 = time.perf_counter()
        api = nullcontext()
        try:  # while a temporary server boots; with a running server it is loaded here rather than in the run
            _load_ahead()
        except Exception:  # noqa: BLE001 - only a head start: the run loads it again and reports failures
            logging.getLogger(__name__).debug("loading ahead failed", exc_info=True)
        _collector.settled()
        if server is not None:
            try:
                server.wait(get_current_settings().server.ephemeral.startup_timeout_seconds)
            except RuntimeError as exc:  # nothing has started: no run to record
                print(f"mascprocess: {exc}; its own messages, if any, are above. Point PREFECT_API_URL at a "
                      f"running server, or reduce without Prefect (--no-prefect)", file=sys.stderr)
                return 1
            api = temporary_settings(updates={PREFECT_API_URL: server.api_url})
        with api:
            if args.quiet:
                state = flow_obj(**params, return_state=True)
            else:
                with RichProgress() as bars:
                    set_progress_sink(bars)
                    try:
                        state = flow_obj(**params, return_state=True)
                    finally:
                        set_progress_sink(None)
            results = state.result() if state.is_completed() else None  # while the server is up
    seconds = time.perf_counter() - t0
    if results is not None:
        from mascara.catalog._engine import resolve_url

        acted = {r["night_id"] for r in results if r["state"] not in ("up-to-date", "empty")}
        report_rejected(resolve_url(args.db, args.datadir), [p for p in sel.night_dirs if Path(p).name in acted],
                        args.datadir, args.db)
        empty = [r for r in results if r["state"] == "empty"]
        for r in empty:  # the flow completes on nights without data; the command says so in its exit code
            print(f"{r['night_id']}: not reduced: {r['message']}", file=sys.stderr)
        current = [r for r in results if r["state"] == "up-to-date"]
        for r in current:
            print(f"{r['night_id']}: {r['message']}")
        if not args.quiet:
            print(f"reduced {len(results) - len(empty) - len(current)} camera-night(s) in {seconds:.1f} s"
                  f"{f' ({len(current)} up to date)' if current else ''}; see `{status_command(args.datadir, args.db)}`")
        return 1 if empty else 0
    print(f"reduction failed after {seconds:.1f} s: {state.message}", file=sys.stderr)
    return 1


#: Rejected raw files named per camera-night at the end of a reduction (``mascara status --rejected`` lists all).
REJECTED_SHOWN = 3


def status_command(datadir: str | Path, db: str | None = None) -> str:
    """The ``mascara status`` command that shows this reduction's catalog (``--db`` when one was given)."""
    if not db:
        return f"mascara status {datadir}"
    from mascara.catalog._engine import shown_url

    return f"mascara status {datadir} --db {shown_url(db)}"


def report_rejected(db_url: str, night_dirs: Any, datadir: str | Path, db: str | None = None) -> None:
    """Name the raw files each camera-night's reduction refused, with the reason, on stderr (a few per night)."""
    try:
        from flows._runs import catalog

        cat = catalog(db_url)
        for nd in night_dirs:
            rows = cat.rejected_frames(night_dir=Path(nd))
            if not rows:
                continue
            name = Path(nd).name
            print(f"{name}: {len(rows)} raw file(s) rejected:", file=sys.stderr)
            for r in rows[:REJECTED_SHOWN]:
                print(f"  {r['filename']}: {r['reason']}", file=sys.stderr)
            if len(rows) > REJECTED_SHOWN:
                print(f"  ... and {len(rows) - REJECTED_SHOWN} more: {status_command(datadir, db)} --rejected "
                      f"--night {name[:8]}", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - a report, never a failure of the reduction
        logging.getLogger(__name__).debug("rejected files not reported: %s", exc)


def run_without_prefect(datadir: str, night: str | None, camera: str | None, site: str | None,
                        overwrite: bool = False, db: str | None = None, settings: dict | None = None,
                        quiet: bool = False, keep_old: int = 1, require_calibration: bool = False,
                        skip_done: bool = False) -> int:
    """Reduce with :func:`mascara.reduce.reduce_camera_night`, one camera-night after the other.

    The catalog is kept exactly as the flow keeps it (runs, batches, frames,
    products, moves), so ``mascara status`` and resumes work the same way.
    """
    from flows import _runs
    from mascara.catalog import LeaseHeld
    from mascara.nightlock import NightLocked
    from mascara.catalog._engine import resolve_url, shown_url
    from mascara.rawio import parse_night_dir
    from mascara.reduce import CalibrationRequired
    from mascara.selection import SelectionError, select_nights
    from mascara.settings import Settings

    _collector.settled()
    datadir = str(Path(datadir).resolve())
    try:
        sel = select_nights(datadir, night or "all", camera, site, settings=settings, db_url=db)
    except SelectionError as exc:
        print(f"mascprocess: {exc}", file=sys.stderr)
        return 2
    db_url = resolve_url(db, datadir)
    s = Settings.from_dict(settings)
    status = 0
    attempted: list[Path] = []  # not those --skip-done found up to date
    with _runs.Heartbeat(db_url) as heartbeat:
        for nd in (parse_night_dir(p) for p in sel.night_dirs):
            t0 = time.perf_counter()
            if skip_done and not overwrite:
                from mascara.reduce import plan_camera_night

                why = _runs.already_done(db_url, plan_camera_night(nd, s))
                if why is not None:
                    print(f"{nd.night_id}: {why}")
                    continue
            attempted.append(nd.path)
            try:
                handle, result = _runs.drive_camera_night(db_url, nd, s, overwrite=overwrite, keep_old=keep_old,
                                                          pid=os.getpid(), host=socket.gethostname(),
                                                          heartbeat=heartbeat,
                                                          require_calibration=require_calibration)
            except (LeaseHeld, NightLocked) as exc:
                print(f"{nd.night_id}: {exc}", file=sys.stderr)
                status = 1
                continue
            except _runs.NothingToReduce as exc:
                print(f"{nd.night_id}: not reduced: {exc}", file=sys.stderr)
                status = 1
                continue
            except CalibrationRequired as exc:  # recorded by drive_camera_night
                print(f"{nd.night_id}: not reduced: {exc}", file=sys.stderr)
                status = 1
                continue
            except Exception as exc:  # recorded as failed by drive_camera_night; go on with the next night
                from sqlalchemy.exc import DatabaseError, OperationalError

                if isinstance(exc, DatabaseError) and not isinstance(exc, OperationalError):
                    # not a catalog (a damaged or foreign file): every night would fail alike; name it and stop
                    print(f"{nd.night_id}: failed: the catalog {shown_url(db_url)} cannot be used: "
                          f"{exc.orig or exc}", file=sys.stderr)
                    return 1
                if isinstance(exc, OperationalError):  # the catalog failed (a full disk, a server gone)
                    cause = exc.__context__  # what stopped the reduction, when recording that failed
                    print(f"{nd.night_id}: failed: the catalog {shown_url(db_url)} cannot be used: "
                          f"{exc.orig or exc} (this night's outcome may not be recorded there)"
                          + (f"; the reduction had stopped on {type(cause).__name__}: {cause}" if cause else ""),
                          file=sys.stderr)
                else:
                    print(f"{nd.night_id}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                status = 1
                continue
            # handle.warnings (outputs erased to make room) were logged as they happened: not printed twice
            if not quiet:
                print(f"{nd.night_id}: {handle.decision} run, {len(result.batches)} batches reduced, "
                      f"{len(result.skipped)} reused, {time.perf_counter() - t0:.1f} s")
    for cn in sel.not_found:  # a selected camera without a directory: recorded 'empty', as the flow records it
        if len(cn) == 11:  # <night><site><cam>; a bare night names no camera to record
            try:
                _runs.record_no_data(db_url, Path(datadir) / cn, f"no night directory {Path(datadir) / cn}")
            except Exception as exc:  # noqa: BLE001 - the message above already said it
                logging.getLogger(__name__).warning("%s: not recorded in the catalog: %s", cn, exc)
            status = 1
    report_rejected(db_url, attempted, datadir, db)
    _runs.draw_night_summaries(datadir, sel.night_dirs)
    return status


#: Seconds without a new frame that end a live run of a night whose dawn has passed.
REPLAY_IDLE_TIMEOUT = 600.0


#: Seconds an interrupted ``mascprocess --live`` waits for its camera threads to finish their batch.
STOP_WAIT = 60.0


def run_live(args: argparse.Namespace) -> int:
    """``mascprocess --live``: one library-driver thread per camera-night of the night, until sunrise.

    The night directories need not exist yet (the acquisition creates them
    at dusk). Each camera-night is recorded as an offline run is; a killed
    live run started again resumes where it was.
    """
    import threading

    from mascara.selection import SelectionError, check_catalog_url, parse_cameras, parse_nights, parse_sites

    try:
        nights = parse_nights(args.night)
        cams = parse_cameras(args.camera)
        sites = parse_sites(args.site)
        if args.night is None or len(nights) != 1 or not cams or not sites or len(sites) != 1:
            raise SelectionError("--live needs one --night, one --site and --camera")
        if not Path(args.datadir).is_dir():
            raise SelectionError(f"data directory {args.datadir} does not exist")
        check_catalog_url(args.db, args.datadir)
        settings = None
        if args.settings:
            from mascara.selection import load_settings_file

            settings = load_settings_file(args.settings)
    except SelectionError as exc:
        print(f"mascprocess: {exc}", file=sys.stderr)
        return 2
    _prepare_environment(args)
    from flows import _runs
    from mascara.catalog._engine import resolve_url
    from mascara.live import dawn_jd
    from mascara.rawio import parse_night_dir
    from mascara.settings import Settings

    night, site = nights[0], sites[0]
    datadir = Path(args.datadir).resolve()
    db_url = resolve_url(args.db, str(datadir))
    s = Settings.from_dict(settings)
    until = dawn_jd(night, site)
    idle_timeout = args.idle_timeout
    if until <= 2440587.5 + time.time() / 86400.0:  # a past night replayed (a test, a demo, a copy)
        until = None
        if idle_timeout is None:
            idle_timeout = REPLAY_IDLE_TIMEOUT
        print(f"mascprocess: the night of {night} at {site} is already over; the live run ends after "
              f"{idle_timeout:.0f} s without a new frame", file=sys.stderr)
    status: dict[str, int] = {}

    stop = threading.Event()

    def one(cam: str) -> None:
        nd = parse_night_dir(datadir / f"{night}{site}{cam}")
        t0 = time.perf_counter()
        try:
            handle, result = _runs.drive_live_camera_night(
                db_url, nd, s, grace=args.grace, idle_timeout=idle_timeout, until_jd=until, poll=args.poll,
                keep_old=args.keep_old, heartbeat=heartbeat, require_calibration=args.require_calibration,
                stop=stop)
        except Exception as exc:  # recorded as failed by the driver where a run was open
            if stop.is_set():  # LiveStopped, or a write refused after the lease was released
                status[cam] = 1  # the main thread reports the interruption
                return
            print(f"{nd.night_id}: live run ended without night files: {type(exc).__name__}: {exc}", file=sys.stderr)
            status[cam] = 1
            return
        status[cam] = 0
        if not args.quiet:
            print(f"{nd.night_id}: live {handle.decision} run, {len(result.batches)} batches reduced, "
                  f"{len(result.skipped)} reused, {time.perf_counter() - t0:.1f} s")

    with _runs.Heartbeat(db_url) as heartbeat:
        threads = [threading.Thread(target=one, args=(c,), name=f"live-{night}{site}{c}", daemon=True)
                   for c in cams]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():  # join with a timeout, so that signals reach the main thread
                    t.join(0.5)
        except KeyboardInterrupt as exc:
            # The camera threads are asked to stop and waited for: each ends its run before its next batch,
            # recorded with the interruption once its writes (batch file, splitter) have stopped, and only
            # then releases the lease. A thread still reducing when the interpreter shuts down can abort the
            # process ("terminate called without an active exception", SIGABRT) instead of letting it exit
            # with 128 + N; so the process leaves without a shutdown if one does not stop in time.
            from flows import _signals

            reason = f"interrupted ({_runs.interruption(exc)})"
            stop.reason = reason  # type: ignore[attr-defined]
            stop.set()
            deadline = time.monotonic() + STOP_WAIT
            try:
                for t in threads:
                    while t.is_alive() and time.monotonic() < deadline:
                        t.join(0.5)
            except KeyboardInterrupt:
                pass  # a second signal: do not wait
            with _signals.shielded():  # a thread that did not stop, or one that opened its run meanwhile
                _runs.end_runs_of_this_process(db_url, reason)
                left = [t.name for t in threads if t.is_alive()]
                if left:  # recorded; leave without an interpreter shutdown these threads could abort
                    import multiprocessing

                    print(f"mascprocess: {', '.join(left)} still reducing after {STOP_WAIT:.0f} s; exiting "
                          "without waiting", file=sys.stderr)
                    for child in multiprocessing.active_children():  # the splitters: they would wait for ever
                        child.terminate()
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(128 + int(getattr(signal.Signals, _runs.interruption(exc) or "SIGINT", signal.SIGINT)))
            raise
    # the files refused, as after an offline run (the frames that never arrived whole included)
    report_rejected(db_url, [datadir / f"{night}{site}{c}" for c in cams if c in status], datadir, args.db)
    _runs.draw_night_summaries(datadir, [datadir / f"{night}{site}{c}" for c in cams])
    return max(status.values(), default=1)
