"""The live flow: reduce a night's camera-nights while they are observed (deployment ``reduce-night/live``).

The flow is named ``reduce-night`` like the offline one, so its deployment
is ``reduce-night/live``; it starts before dusk (``prefect.yaml``: every day
at 16:00 UTC, ``nights="tonight"``) and ends after dawn. Per camera-night a
:class:`mascara.reduce.LiveNight` watches ``raw/``; every batch that becomes
ready is reduced by its own task run (``batch-<night_id>-<batch>``), recorded
in the catalog as an offline batch is, and handed to a splitter process
beside the flow; the progress artifact of the night is updated as batches
finish (at most every ``PROGRESS_INTERVAL`` seconds); at the end each
camera-night is combined and its run ends ``succeeded``, exactly as
``mascprocess --live`` does with the library driver.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows import _runs
from flows import report
from flows.reduce_night import _transient_task, worker_datadir

#: Seconds between two updates of a night's progress artifact.
PROGRESS_INTERVAL = 30.0


def tonight(now: dt.datetime | None = None) -> str:
    """The night that starts this evening (UTC date), as ``YYYYMMDD``."""
    return (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y%m%d")


def live_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    night = p.get("nights") or "tonight"
    night = tonight() if str(night).strip().lower() == "tonight" else str(night)
    return f"live-{night}-{p.get('site') or 'LP'}-{p.get('cameras') or 'all'}"


@task(name="batch", task_run_name="batch-{night_id}-{batch:07d}", cache_policy=NO_CACHE, **_transient_task)
def live_batch_task(night_id: str, batch: int, handle: _runs.RunHandle, plan: Any, ctx: Any) -> dict:
    """Reduce one ready batch and record it (its frames, gap counts, the batch file)."""
    from mascara.reduce import reduce_batch

    outcome = _runs.reduce_recorded(handle, batch, lambda: reduce_batch(plan, ctx, batch))
    return {"batch": batch, "path": outcome.path, "nframes": outcome.nframes, "rejected": len(outcome.rejected),
            "astro_rms": outcome.astro_rms}


def _progress_markdown(night_id: str, done: list[dict], pending: int, state: str) -> str:
    lines = [f"# {night_id}, live: {state}", "",
             f"{len(done)} batches reduced, {sum(d['nframes'] for d in done)} frames, "
             f"{sum(d['rejected'] for d in done)} rejected; {pending} ready and waiting", "",
             "| batch | frames | rejected | astrometry rms (px) |", "|---:|---:|---:|---:|"]
    for d in done[-20:]:
        rms = "" if d["astro_rms"] is None else f"{d['astro_rms']:.3f}"
        lines.append(f"| {d['batch']} | {d['nframes']} | {d['rejected']} | {rms} |")
    return "\n".join(lines)


class _Camera:
    """What the flow keeps of one camera-night during the night."""

    def __init__(self, night_dir: Any, live: Any):
        self.night_dir, self.live = night_dir, live
        self.handle: _runs.RunHandle | None = None
        self.ctx: Any = None
        self.splitter: Any = None  # mascara.reduce.SplitterProcess, from the first batch on
        self.done: list[dict] = []
        self.published = 0.0
        self.error: str | None = None


@flow(name="reduce-night", flow_run_name=live_run_name, log_prints=True)
def reduce_night_live(datadir: str | None = None, nights: str | int = "tonight", cameras: str | None = None,
                      site: str = "LP", db_url: str | None = None, settings: dict | None = None,
                      grace: float = 300.0, idle_timeout: float | None = None, poll: float = 10.0,
                      keep_old: int = 1) -> dict[str, str]:
    """Reduce one night's camera-nights while they are observed; returns the state of each.

    ``nights`` is one night (``YYYYMMDD`` or ``tonight``); ``cameras`` the
    camera letters joined by ``+`` (default: every camera of the site). The
    night ends at dawn at the site, or after ``idle_timeout`` seconds without
    a new frame (a replayed past night: 600 s unless given).
    """
    from mascara.catalog._engine import resolve_url
    from mascara.live import dawn_jd
    from mascara.rawio import parse_night_dir
    from mascara.reduce import LiveNight, SplitterProcess
    from mascara.selection import CAMERAS, SelectionError, parse_cameras, parse_nights, parse_sites
    from mascara.settings import Settings

    logger = get_run_logger()
    night = tonight() if str(nights).strip().lower() == "tonight" else str(nights)
    night_list = parse_nights(night)
    sites = parse_sites(site)
    if not night_list or len(night_list) != 1 or not sites or len(sites) != 1:
        raise SelectionError("the live flow takes one night and one site")
    night, site = night_list[0], sites[0]
    cams = parse_cameras(cameras) or list(CAMERAS)
    root = Path(worker_datadir(datadir)).resolve()
    url = resolve_url(db_url, str(root))
    s = Settings.from_dict(settings)
    until: float | None = dawn_jd(night, site)
    if until <= 2440587.5 + time.time() / 86400.0:
        until = None
        idle_timeout = 600.0 if idle_timeout is None else idle_timeout
        logger.info("the night of %s at %s is already over: ending after %.0f s without a new frame",
                    night, site, idle_timeout)
    night_ids = {c: f"{night}{site}{c}" for c in cams}
    cameras_ = {c: _Camera(parse_night_dir(root / night_ids[c]),
                           LiveNight(root / night_ids[c], s, grace=grace, idle_timeout=idle_timeout, until_jd=until))
                for c in cams}

    def publish(cam: _Camera, state: str, force: bool = False, figures: dict | None = None) -> None:
        """The night's progress and its quick-look figures, at most every PROGRESS_INTERVAL s: redrawn while
        the run holds the night, ``figures`` as drawn before its end once it has ended (a run waiting for
        the night may be moving ``quicklook/`` aside by then)."""
        if not force and time.monotonic() - cam.published < PROGRESS_INTERVAL:
            return
        nid = cam.night_dir.night_id
        create_markdown_artifact(key=f"{nid.lower()}-live", markdown=_progress_markdown(nid, cam.done, 0, state),
                                 description=f"{nid}: live progress")
        if figures is None:
            figures = _runs.draw_quicklook(cam.night_dir.path, get_run_logger())
        if figures:
            report.publish_markdown(f"{nid.lower()}-quicklook",
                                    report.quicklook_markdown(nid, figures, str(cam.night_dir.path)),
                                    f"Quick-look figures of {nid} ({state})")
        cam.published = time.monotonic()

    with _runs.Heartbeat(url) as heartbeat:
        try:
            while True:
                running = [c for c in cameras_.values() if c.error is None and not c.live.over]
                if not running:
                    break
                submitted = []
                for cam in running:
                    new = cam.live.step()
                    if not new:
                        continue
                    if cam.handle is None:
                        try:
                            cam.handle = _runs.open_run(url, cam.live.ready_plan(new), keep_old=keep_old,
                                                        end_on_error=True)
                        except Exception as exc:  # noqa: BLE001 - recorded by open_run; the other cameras go on
                            cam.error = f"{type(exc).__name__}: {exc}"
                            logger.error("%s: not reduced: %s", cam.night_dir.night_id, cam.error)
                            continue
                        heartbeat.run_ids.add(cam.handle.run_id)
                        _runs.record_intake(url, cam.live.ready_plan(new), cam.handle.camera_night_id,
                                            cam.handle.run_id)
                        cam.ctx = cam.live.context()
                        _runs.record_calibration(url, cam.handle.camera_night_id, cam.handle.night_path,
                                                 cam.ctx.calibration_state())
                        cam.splitter = SplitterProcess.for_night(cam.live.plan, cam.ctx)
                        _runs.record_missing_qualities(cam.handle, cam.live.ready_plan(new))
                        for b in sorted(set(cam.handle.done) & set(new)):  # an earlier live run did these
                            if cam.live.done_before(b):  # unless a frame file of it is newer than its batch file
                                cam.splitter.put(cam.live.plan.batch_path(b))
                        new = [b for b in new if b not in cam.live.finished]
                    if not new:
                        continue
                    _runs.catalog(url).register_batches(cam.handle.run_id, cam.live.ready_plan(new).batch_rows(),
                                                        grown=True)
                    for b in new:
                        submitted.append((cam, b, live_batch_task.submit(cam.night_dir.night_id, b, cam.handle,
                                                                         cam.live.plan, cam.ctx)))
                for cam, b, fut in submitted:
                    try:
                        d = fut.result()
                    except Exception as exc:  # recorded below; the other cameras go on
                        cam.error = f"batch {b}: {type(exc).__name__}: {exc}"
                        continue
                    cam.live.done(b)
                    cam.done.append(d)
                    cam.splitter.put(d["path"])
                    publish(cam, "observing")
                if not submitted:
                    time.sleep(poll)
        finally:
            for cam in cameras_.values():
                if cam.splitter is not None:
                    cam.splitter.stop()

        states: dict[str, str] = {}
        for c, cam in cameras_.items():
            nid = night_ids[c]
            if cam.handle is None:
                if cam.error:
                    states[nid] = f"failed: {cam.error}"
                else:  # recorded empty with why, as offline and the library's live driver do
                    why = _runs.record_live_without_frames(url, cam.live.night.path, cam.live.plan)
                    states[nid] = f"no data: {why}"
                continue
            cat = _runs.catalog(url)
            try:
                if cam.error:
                    raise RuntimeError(cam.error)
                plan = cam.live.plan
                _runs.record_intake(url, plan, cam.handle.camera_night_id, cam.handle.run_id)
                _, figures = _runs.combine_and_finish(cam.handle, plan)
                states[nid] = "succeeded"
                publish(cam, "finished", force=True, figures=figures)
            except Exception as exc:  # noqa: BLE001 - recorded; the flow fails below
                cat.finish_run(cam.handle.run_id, "failed", error=f"{type(exc).__name__}: {exc}")
                states[nid] = f"failed: {exc}"
            finally:
                heartbeat.run_ids.discard(cam.handle.run_id)
    failed = {k: v for k, v in states.items() if v.startswith("failed")}
    if failed:
        raise RuntimeError(f"live reduction failed for {', '.join(failed)}: {next(iter(failed.values()))}")
    logger.info("live night %s: %s", night, states)
    return states
