"""Reprocess a season: one flow run per camera-night, spread over the workers of the pool.

``mascara backfill DATADIR --night 20260101..20260331`` (or the deployment
``reduce-night/backfill``, which runs :func:`reduce_night_backfill` on a
worker) looks at every camera-night of the range and submits one run of the
deployment ``reduce-night/backfill-night`` for each that needs it. Nothing
here schedules anything: Prefect's workers pick the runs up, and Prefect's own
limits say how many run at once:

- per worker: ``prefect worker start --pool mascara --limit 1`` takes one
  camera-night at a time, so N workers share a season evenly;
- globally: the ``backfill`` work queue's concurrency limit
  (``--backfill-limit``), for a catalog or a file server that several
  workers must not swamp;
- precedence: a worker takes the runs of higher-priority queues first, and
  the queues are ordered ``nightly``, ``live``, ``default``, ``backfill``
  (:data:`QUEUE_ORDER`, kept by :func:`ensure_queues` on every backfill): when
  the nightly run is scheduled, the next free worker slot goes to it, ahead
  of every backfill run still waiting. Runs already going are not stopped.

Only what is needed is submitted: a camera-night whose latest reduction
succeeded under the same fingerprint (code version, settings, star
catalogue, raw files) with its files in place is ``up-to-date``; one with a
backfill run already scheduled or running, or a reduction holding its lease,
is ``in-progress``. ``force`` submits the up-to-date ones again (the lifecycle
moves the earlier outputs to ``_old``), never one in progress: a second
``--force`` while the first one's runs wait would reduce each camera-night
twice and erase, with the default ``keep_old``, the outputs the first one
moved aside. Each submitted run also checks again when it
starts (``skip_done``), so two backfills submitted at once do not reduce a
camera-night twice.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows import _heartbeat

_heartbeat.install()  # flow runs end when their work does (flows/_heartbeat.py)

#: The deployment of one camera-night of a backfill (prefect.yaml).
NIGHT_DEPLOYMENT = "reduce-night/backfill-night"
#: The work pool of every deployment (prefect.yaml).
POOL = "mascara"
#: Work queues of the pool, highest priority first: a free worker takes the first queue's runs first.
QUEUE_ORDER = ("nightly", "live", "default", "backfill")
#: States of a flow run that is still to finish.
OPEN_STATES = ("SCHEDULED", "PENDING", "RUNNING", "PAUSED")
#: Tag of every backfill run naming its camera-night.
TAG_PREFIX = "camera-night:"


@dataclasses.dataclass
class Entry:
    """One camera-night (or a night without any directory) of a backfill and what was done with it."""

    night_id: str  # <night><site><cam>, or <night> for a night without any directory
    state: str  # submit, submitted, up-to-date, in-progress, empty, no-data
    reason: str = ""
    night_path: str | None = None
    flow_run_id: str | None = None
    frames: int = 0
    #: the plan of a camera-night without frames, for :func:`record_empty` once the backfill is submitted
    empty_plan: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def night(self) -> str:
        return self.night_id[:8]


def plan_backfill(datadir: str | Path, nights: Any, cameras: Any = None, site: Any = None,
                  settings: dict | None = None, db_url: str | None = None, force: bool = False) -> list[Entry]:
    """What a backfill of ``nights`` would do for every camera-night (no Prefect, no change anywhere).

    Raises :class:`mascara.selection.SelectionError` for a malformed request,
    and :class:`mascara.selection.NoNightData` when no requested night has a
    directory at all.
    """
    from flows import _runs
    from mascara.catalog._engine import resolve_url
    from mascara.rawio import parse_night_dir
    from mascara.reduce import plan_camera_night
    from mascara.selection import parse_nights, select_nights
    from mascara.settings import Settings

    sel = select_nights(datadir, nights, cameras, site, settings=settings, db_url=db_url)
    db_url = resolve_url(db_url, str(Path(datadir).resolve()))
    s = Settings.from_dict(sel.settings)
    out: list[Entry] = []
    for p in sel.night_dirs:
        nd = parse_night_dir(p)
        plan = plan_camera_night(nd, s)
        e = Entry(nd.night_id, "submit", night_path=str(Path(nd.path).resolve()), frames=len(plan.frames))
        if plan.empty_reason():
            e.state, e.reason, e.empty_plan = "empty", plan.empty_reason(), plan
        else:
            why = _runs.already_done(db_url, plan)
            # force redoes what is up to date, never what is being reduced right now
            if why is not None and (not force or why.startswith("in progress")):
                e.state, e.reason = ("in-progress" if why.startswith("in progress") else "up-to-date"), why
            else:  # what a submission changes: never reduced, failed, another fingerprint, files gone
                e.reason = "--force: " + why if why is not None else _runs.why_reduce(db_url, plan)
        out.append(e)
    found = {e.night for e in out}
    for cn in sel.not_found:
        out.append(Entry(cn, "no-data", f"no night directory {cn}"))
    requested = parse_nights(nights)
    for n in requested or []:
        if n not in found and not any(e.night == n for e in out):
            near = [i for i in sel.ignored if n in i.split(":")[0]]  # misnamed, as mascprocess says too
            bare = [w for w in sel.without_raw if w.startswith(n)]
            out.append(Entry(n, "no-data", "no night directory for this night" +
                             (f" (without raw/: {', '.join(bare[:5])})" if bare else "") +
                             (f" (ignored: {'; '.join(near[:3])})" if near else "")))
    return sorted(out, key=lambda e: e.night_id)


# --------------------------------------------------------------------------- Prefect


def ensure_queues(client: Any, pool: str = POOL, backfill_limit: int | None = None) -> list[dict]:
    """Create the pool's work queues where missing and order their priorities as :data:`QUEUE_ORDER`.

    Queues not named there keep their place after ``default``. ``backfill_limit``
    sets the ``backfill`` queue's concurrency limit (0: remove it; None: leave
    it). Returns ``[{name, priority, concurrency_limit}]`` of the pool's queues.
    """
    from prefect.exceptions import ObjectAlreadyExists

    have = {q.name: q for q in client.read_work_queues(work_pool_name=pool)}
    for name in QUEUE_ORDER:
        if name not in have:
            try:
                client.create_work_queue(name=name, work_pool_name=pool,
                                         description=f"mascara {name} runs (priority order: {', '.join(QUEUE_ORDER)})")
            except ObjectAlreadyExists:  # created meanwhile by another backfill
                pass
    for rank, name in enumerate(QUEUE_ORDER, start=1):
        q = {q.name: q for q in client.read_work_queues(work_pool_name=pool)}[name]
        if q.priority != rank:
            client.update_work_queue(q.id, priority=rank)
    if backfill_limit is not None:
        q = {q.name: q for q in client.read_work_queues(work_pool_name=pool)}["backfill"]
        client.update_work_queue(q.id, concurrency_limit=backfill_limit or None)
    return [{"name": q.name, "priority": q.priority, "concurrency_limit": q.concurrency_limit}
            for q in sorted(client.read_work_queues(work_pool_name=pool), key=lambda q: q.priority)]


def open_backfill_runs(client: Any, deployment_id: Any) -> dict[str, list[tuple[str, str]]]:
    """``{camera-night id: [(flow run id, state type), ...]}`` of the deployment's runs not yet finished."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    runs = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType(s) for s in OPEN_STATES]))))
    out: dict[str, list[tuple[str, str]]] = {}
    for r in runs:
        for t in r.tags:
            if t.startswith(TAG_PREFIX):
                out.setdefault(t[len(TAG_PREFIX):], []).append(
                    (str(r.id), r.state_type.value if r.state_type else "SCHEDULED"))
    return out


def dead_run(db_url: str, night_path: str | Path, flow_run_id: str) -> str | None:
    """Why a flow run Prefect still calls Running no longer reduces its camera-night, or None if it may.

    Prefect keeps a flow run Running when its process dies with its worker (a machine that went down): only
    the catalog can tell. Dead: the run it opened is recorded ended, its lease expired (a live run heartbeats
    it), or it ran on this host in a process that is gone. A run not yet in the catalog (just started) or on
    another host with a live lease is not dead.
    """
    from mascara.catalog import CatalogError
    from mascara.catalog.catalog import flow_run_run_id
    from mascara.catalog.lifecycle import process_gone

    from flows import _runs

    cat = _runs.catalog(db_url)
    cn = cat.find_camera_night(night_path)
    if cn is None:
        return None
    run_id = flow_run_run_id(cn, flow_run_id)
    try:
        info = cat.run_info(run_id)
    except CatalogError:
        return None
    if info.status != "running":
        return f"its catalog run {run_id} is {info.status}"
    if not info.live:
        return f"its catalog run {run_id} holds no unexpired lease (a run heartbeats it while it lives)"
    pid = process_gone(cat, run_id)
    return None if pid is None else f"its process {pid} on this host is gone (run {run_id})"


def submit(entries: list[Entry], datadir: str | Path, *, settings: dict | None = None, db_url: str | None = None,
           force: bool = False, keep_old: int = 1, deployment: str = NIGHT_DEPLOYMENT,
           backfill_limit: int | None = None, pool: str = POOL, dask_address: str | None = None) -> list[dict]:
    """Submit one flow run of ``deployment`` per entry in state ``submit``; returns the pool's queues.

    Entries whose camera-night already has an open run of the deployment
    become ``in-progress``; the others ``submitted`` with their flow run id.
    ``dask_address`` (``tcp://host:8786``) runs the batches of every submitted
    camera-night on that Dask cluster (the run's ``MASCARA_DASK_ADDRESS``).
    """
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    from mascara.catalog._engine import resolve_url

    datadir = str(Path(datadir).resolve())
    url = resolve_url(db_url, datadir)
    with get_client(sync_client=True) as client:
        queues = ensure_queues(client, pool, backfill_limit)
        dep = client.read_deployment_by_name(deployment)
        queued = open_backfill_runs(client, dep.id)
        for e in entries:
            if e.state != "submit":
                continue
            dead = _open_runs_of(e, queued, url)
            if e.state != "submit":
                continue
            for fr_id, _, why in dead:  # Prefect's record follows the catalog's, so no later backfill trips on it
                client.set_flow_run_state(fr_id, Crashed(message=f"mascara backfill: {why}"), force=True)
                e.reason = f"backfill run {fr_id} was Running in Prefect, but {why}: marked Crashed, submitted again"
            params = {"datadir": datadir, "nights": e.night, "cameras": e.night_id[10:], "site": e.night_id[8:10],
                      "settings": settings, "skip_done": not force, "keep_old": int(keep_old)}
            if db_url:
                params["db_url"] = db_url
            run = client.create_flow_run_from_deployment(
                dep.id, parameters=params, name=f"{e.night}-{e.night_id[8:10]}-{e.night_id[10:]}",
                tags=["backfill", TAG_PREFIX + e.night_id],
                job_variables={"env": {"MASCARA_DASK_ADDRESS": dask_address}} if dask_address else None)
            e.state, e.flow_run_id = "submitted", str(run.id)
    return queues


def _open_runs_of(e: Entry, queued: dict[str, list[tuple[str, str]]], url: str) -> list[tuple[str, str, str]]:
    """Make ``e`` ``in-progress`` when a backfill run of its camera-night is open and alive in Prefect.

    Returns the runs Prefect calls Running whose process is gone by the
    catalog (:func:`dead_run`): ``(flow run id, state, why)``. Even with
    ``--force`` nothing is submitted beside an open run: a second forced run
    would erase what the first one moved aside.
    """
    alive, dead = [], []
    for fr_id, st in queued.get(e.night_id, []):
        why = dead_run(url, e.night_path, fr_id) if st == "RUNNING" and e.night_path else None
        (alive if why is None else dead).append((fr_id, st, why))
    if alive:
        fr_id, st, _ = alive[0]
        e.state, e.reason, e.flow_run_id = "in-progress", f"a backfill run is already {st.lower()}", fr_id
    return dead


def preview(entries: list[Entry], datadir: str | Path, *, db_url: str | None = None,
            deployment: str = NIGHT_DEPLOYMENT) -> None:
    """What :func:`submit` would do, asking Prefect and writing nothing (``--dry-run`` with a server).

    Entries with an open backfill run become ``in-progress``; a Running one
    whose process is gone keeps ``submit``, its reason saying that run would
    be marked Crashed first.
    """
    from prefect.client.orchestration import get_client

    from mascara.catalog._engine import resolve_url

    url = resolve_url(db_url, str(Path(datadir).resolve()))
    with get_client(sync_client=True) as client:
        queued = open_backfill_runs(client, client.read_deployment_by_name(deployment).id)
    for e in entries:
        if e.state == "submit":
            for fr_id, _, why in _open_runs_of(e, queued, url):
                e.reason = f"backfill run {fr_id} is Running in Prefect, but {why}: would be marked Crashed"


def wait(flow_run_ids: list[str], timeout: float | None = None, poll: float = 5.0,
         on_change: Any = None) -> dict[str, str]:
    """Wait until every flow run is final; returns ``{flow run id: state type}`` (the last seen)."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    states: dict[str, str] = {}
    t0 = time.monotonic()
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[UUID(i) for i in flow_run_ids])))
            now = {str(r.id): (r.state_type.value if r.state_type else "SCHEDULED") for r in runs}
            if now != states and on_change is not None:
                on_change(now)
            states = now
            if all(v not in OPEN_STATES for v in states.values()) and len(states) == len(flow_run_ids):
                return states
            if timeout is not None and time.monotonic() - t0 > timeout:
                return states
            time.sleep(poll)


def record_empty(entries: list[Entry], datadir: str | Path, db_url: str | None = None) -> int:
    """Record the camera-nights without frames as ``empty`` in the catalog, as a reduction of them would;
    how many. A submitted backfill does it, so that the season's counts hold every camera-night on disk (the
    plan alone, and ``--dry-run``, change nothing)."""
    from flows import _runs
    from mascara.catalog._engine import resolve_url

    url = resolve_url(db_url, str(Path(datadir).resolve()))
    empty = [e for e in entries if e.state == "empty" and e.empty_plan is not None]
    for e in empty:
        _runs.record_intake(url, e.empty_plan)
    return len(empty)


def summary_rows(entries: list[Entry]) -> list[dict[str, Any]]:
    return [{"camera_night": e.night_id, "state": e.state, "frames": e.frames, "flow_run": e.flow_run_id or "",
             "reason": e.reason} for e in entries]


def counts(entries: list[Entry]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in entries:
        out[e.state] = out.get(e.state, 0) + 1
    return out


# --------------------------------------------------------------------------- the command


def cli_backfill(args: Any) -> int:
    """Handler of ``mascara backfill`` (arguments: :func:`mascara.cli._add_backfill`).

    Exit codes: 0 submitted (or nothing to do), and with ``--wait`` every run
    succeeded; 1 with ``--wait``, a run did not succeed; 2 a mistake in the
    request or no Prefect server to submit to; nothing was submitted.
    """
    import json
    import sys

    from mascara.selection import NoNightData, SelectionError, load_settings_file

    # with --json, standard output is the JSON alone (a program reads it); every other line goes to stderr
    out = sys.stderr if args.json else sys.stdout
    try:
        settings = load_settings_file(args.settings) if args.settings else None
        entries = plan_backfill(args.datadir, args.night, args.camera, args.site, settings, args.db, args.force)
    except NoNightData as exc:
        print(f"mascara backfill: nothing to do: {exc}", file=out)
        if args.json:
            print("[]")
        return 0
    except SelectionError as exc:
        print(f"mascara backfill: {exc}", file=sys.stderr)
        return 2
    if not args.dry_run and not os.environ.get("PREFECT_API_URL"):
        print("mascara backfill: PREFECT_API_URL is not set: a backfill submits runs to a Prefect server whose "
              "workers reduce them (see README, 'Reprocessing a season'); --dry-run shows what it would submit",
              file=sys.stderr)
        return 2
    if args.dry_run and os.environ.get("PREFECT_API_URL"):  # what is already queued or running is not submitted
        try:
            preview(entries, args.datadir, db_url=args.db, deployment=args.deployment)
        except Exception as exc:  # noqa: BLE001 - the plan alone is still worth showing
            print(f"mascara backfill: could not ask {os.environ['PREFECT_API_URL']} which runs are open "
                  f"({type(exc).__name__}: {exc}); the plan below does not know them", file=sys.stderr)
    elif args.dry_run:
        print("mascara backfill: PREFECT_API_URL is not set: the plan below does not know the backfill runs "
              "already queued or running", file=sys.stderr)
    if not args.dry_run:
        try:
            queues = submit(entries, args.datadir, settings=settings, db_url=args.db, force=args.force,
                            keep_old=args.keep_old, deployment=args.deployment, backfill_limit=args.backfill_limit,
                            pool=args.pool, dask_address=args.dask_address)
        except Exception as exc:  # noqa: BLE001 - no server, no deployment: say which
            print(f"mascara backfill: could not submit to {os.environ.get('PREFECT_API_URL')}: "
                  f"{type(exc).__name__}: {exc} (is `prefect deploy --all` done and the deployment "
                  f"{args.deployment} there?)", file=sys.stderr)
            return 2
        record_empty(entries, args.datadir, args.db)
        if not args.quiet:
            print("work queues of pool " + args.pool + " (a free worker takes the first first): " +
                  ", ".join(f"{q['name']} {q['priority']}" + (f" (at most {q['concurrency_limit']} at once)"
                                                                if q["concurrency_limit"] else "")
                            for q in queues), file=out)
    if args.json:
        print(json.dumps(summary_rows(entries), indent=1))
    elif not args.quiet:
        _print_table(entries)
    c = counts(entries)
    verb = "would submit" if args.dry_run else "submitted"
    n_sub = c.get("submit", 0) if args.dry_run else c.get("submitted", 0)
    others = ", ".join(f"{v} {k}" for k, v in sorted(c.items()) if k not in ("submit", "submitted"))
    print(f"backfill {args.night}: {verb} {n_sub} camera-night(s)" + (f"; {others}" if others else ""), file=out)
    if args.dry_run or not args.wait:
        return 0
    ids = [e.flow_run_id for e in entries if e.state == "submitted" and e.flow_run_id]
    if not ids:
        return 0
    t0 = time.monotonic()

    def show(states: dict[str, str]) -> None:
        tally: dict[str, int] = {}
        for v in states.values():
            tally[v] = tally.get(v, 0) + 1
        if not args.quiet:
            print(f"  {time.monotonic() - t0:7.0f} s  " + ", ".join(f"{v} {k.lower()}" for k, v in sorted(tally.items())),
                  flush=True, file=out)

    final = wait(ids, timeout=args.timeout, on_change=show)
    bad = {i: s for i, s in final.items() if s != "COMPLETED"}
    print(f"backfill {args.night}: {len(final) - len(bad)} of {len(ids)} run(s) completed in "
          f"{time.monotonic() - t0:.0f} s" + (f"; not completed: {len(bad)}" if bad else ""), file=out)
    names = {e.flow_run_id: e.night_id for e in entries if e.flow_run_id}
    final_states = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
    for i, st in sorted(bad.items(), key=lambda kv: names.get(kv[0], "")):  # which ones, and whether still going
        still = "" if st in final_states else " (still going: --timeout ended the wait, not the run)"
        print(f"  {names.get(i, '?')}: flow run {i} {st.lower()}{still}", file=out)
    return 1 if bad or len(final) < len(ids) else 0


def _print_table(entries: list[Entry]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="backfill")
    for col in ("camera-night", "state", "frames", "flow run / reason"):
        t.add_column(col)
    for e in entries:
        t.add_row(e.night_id, e.state, str(e.frames or ""), e.flow_run_id or e.reason)
    Console(width=160).print(t)


# --------------------------------------------------------------------------- the deployment


@flow(name="reduce-night", flow_run_name="backfill-{nights}", log_prints=False)
def reduce_night_backfill(datadir: str = "", nights: str = "yesterday", cameras: str | None = None,
                          site: str | None = None, force: bool = False, settings: dict | None = None,
                          db_url: str | None = None, keep_old: int = 1,
                          backfill_limit: int | None = None) -> list[dict]:
    """Submit one ``reduce-night/backfill-night`` run per camera-night of ``nights`` that needs it.

    ``nights`` takes ranges (``20260101..20260331``) mixed with ``+``; nights
    without data are listed, not failures. The table of what was submitted,
    skipped and why is the artifact ``backfill-<first>-<last>``. See
    :mod:`flows.backfill`.
    """
    from flows import report
    from flows.reduce_night import worker_datadir
    from mascara.selection import NoNightData

    logger = get_run_logger()
    datadir = worker_datadir(datadir)
    try:
        entries = plan_backfill(datadir, nights, cameras, site, settings, db_url, force)
    except NoNightData as exc:
        logger.info("backfill: nothing to do: %s", exc)
        return []
    queues = submit(entries, datadir, settings=settings, db_url=db_url, force=force, keep_old=keep_old,
                    backfill_limit=backfill_limit)
    record_empty(entries, datadir, db_url)
    c = counts(entries)
    logger.info("backfill %s: %s; work queues %s", nights, c, queues)
    report.publish_table(report.artifact_key("backfill", entries[0].night, entries[-1].night), summary_rows(entries),
                         f"Backfill {nights}: " + ", ".join(f"{v} {k}" for k, v in sorted(c.items())))
    return summary_rows(entries)
