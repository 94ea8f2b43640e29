"""Handlers of ``mascara status`` and ``mascara db upgrade`` (see mascara/cli.py)."""

from __future__ import annotations

import argparse
import calendar
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from mascara.catalog import _engine
from mascara.catalog.catalog import connect
from mascara.catalog.lifecycle import product_in_place

#: Columns of the terminal table (the JSON output has every column of the view).
TABLE_COLUMNS = (
    ("night", "night"), ("camera", "camera"), ("state", "state"), ("warning", "warning"), ("batches", None),
    ("failed", "batches_failed"), ("frames ok", "frames_ok"), ("rejected", "frames_rejected"),
    ("missing", "frames_missing"), ("products", "products"), ("host", "host"), ("started (UTC)", "started_at"),
    ("finished (UTC)", "finished_at"),
)
#: Characters of a failed run's error printed under the table (``--json`` has all of it).
WHY_WIDTH = 200
_STATE_STYLE = {"succeeded": "green", "failed": "red", "running": "yellow", "pending": "dim", "skipped": "dim",
                "empty": "red"}


def _missing_sqlite(url: str) -> Path | None:
    u = make_url(url)
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        path = Path(u.database)
        return None if path.exists() else path
    return None


def _url_problem(url: str) -> str | None:
    """Why the catalog URL ``url`` someone gave cannot name a catalog (:func:`mascara.catalog._engine.check_url`),
    in one line for people with its password hidden, or None. A server that does not answer is found on
    connecting."""
    try:
        _engine.check_url(url)
    except ValueError as exc:
        return " ".join(str(exc).split())  # one line
    return None


def _selected(camera_id: str, cameras: list[str] | None, sites: list[str] | None) -> bool:
    """Whether the camera ``camera_id`` (site + letter, e.g. ``LPE``) is among ``--camera`` and ``--site``."""
    return (cameras is None or camera_id[-1:] in cameras) and (sites is None or camera_id[:-1] in sites)


def _asked(args: argparse.Namespace, nights: str = "night") -> str:
    """`` for night 20260301, camera E`` of the messages that nothing was found: what was asked."""
    parts = [f"{nights} {args.night}" if args.night else "",
             f"camera {args.camera}" if getattr(args, "camera", None) else "",
             f"site {args.site}" if getattr(args, "site", None) else ""]
    asked = ", ".join(p for p in parts if p)
    return f" for {asked}" if asked else ""


def _months_covered(nights: list[str] | None, night_arg: str | None) -> str | None:
    """The line of ``--season`` naming the months its --night nights fall in, and saying when those whole
    months are more than the nights asked for (the season view counts by month); None for every month."""
    if nights is None:
        return None
    months = sorted({n[:6] for n in nights})
    asked = set(nights)
    whole = all(f"{m}{d:02d}" in asked for m in months
                for d in range(1, calendar.monthrange(int(m[:4]), int(m[4:]))[1] + 1))
    line = f"months covered: {', '.join(months)}"
    if not whole:
        line += f" (whole months: every night of them, not only the nights of --night {night_arg})"
    return line


def _console(min_width: int, always: bool = False) -> Any:
    """A rich Console for the views: at least ``min_width`` wide when piped or redirected (``always``: on a
    terminal too), so nothing is truncated; a reader gone raises BrokenPipeError, as a print does
    (:func:`cli_status` ends quietly), instead of rich's own exit 1."""
    from rich.console import Console

    class _ViewConsole(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            raise BrokenPipeError

    console = _ViewConsole()
    if always or not console.is_terminal:
        console = _ViewConsole(width=max(console.width, min_width))
    return console


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return f"{value:%Y-%m-%d %H:%M}"
    return str(value)


def _why(row: dict[str, Any]) -> str:
    """Why a camera-night is not simply done: the phase a failed run stopped in and its error."""
    if row.get("state") != "failed" or not row.get("error"):
        return ""
    # one line: an error's own line breaks (h5py puts the file and the reason after one) are not its end
    first = " ".join(str(row["error"]).split())
    if len(first) > WHY_WIDTH:
        first = first[:WHY_WIDTH - 3] + "..."
    phase = row.get("phase")
    return f"while {phase}: {first}" if phase else first


def status_rows(datadir: str | Path = ".", db: str | None = None, night: str | None = None) -> list[dict[str, Any]]:
    """Rows of the night_status view for the CLI (an absent SQLite catalog has none)."""
    url = _engine.resolve_url(db, datadir)
    if _missing_sqlite(url):
        return []
    with connect(url) as cat:
        return cat.night_status(night)


def _schema_problem(url: str, datadir: str, db: str | None) -> str | None:
    """Why the status views cannot read the catalog at ``url`` as it is, or None; asked without writing.

    A view never writes: not a schema into an empty database (a fresh PostgreSQL schema, say), and not
    the migrations of a catalog an older mascara wrote (``mascara db upgrade`` applies them, the next
    reduction too), which would change a shared catalog under the runs of other machines.
    """
    engine = _engine.make_engine(url)
    try:
        current = _engine.current_revision(engine)
    finally:
        engine.dispose()
    shown = _engine.shown_url(url)
    if current is None:
        return f"no catalog in {shown}: nothing was reduced there (`mascara db upgrade` creates one)"
    head = _engine.head_revision()
    if current == head:
        return None
    if _engine.known_revision(current):
        where = f" --db {shown}" if db else ""
        return (f"the catalog in {shown} has schema revision {current}, older than this mascara's {head}: "
                f"`mascara db upgrade {datadir}{where}` brings it up to date (a view does not change it)")
    return (f"the catalog in {shown} has schema revision {current}, which this mascara (schema {head}) does "
            "not know: a newer mascara wrote it; use that one")


def _print_json(rows: list[dict[str, Any]]) -> int:
    """``--json`` of the status commands: the rows on stdout (times in ISO 8601); exit code 0."""
    json.dump(rows, sys.stdout, default=lambda v: v.isoformat() if isinstance(v, datetime) else str(v), indent=1)
    sys.stdout.write("\n")
    return 0


def _check_products_on_disk(cat: Any, rows: list[dict[str, Any]]) -> None:
    """Add ``products_gone`` to each row: the kinds of its recorded products whose file is not the one its
    run left (:func:`mascara.catalog.lifecycle.product_in_place`: missing, another size or modification
    time); the table shows it as a warning.

    The catalog records what a run wrote; this view should not call a night done whose files were
    deleted or replaced by hand since (a re-run, or ``backfill``, reduces it again and records why).
    """
    wanted = {r["camera_night_id"] for r in rows}
    by_night: dict[str, list[dict[str, Any]]] = {}
    for p in cat.live_products():
        if p["camera_night_id"] in wanted:
            by_night.setdefault(p["camera_night_id"], []).append(p)
    for r in rows:
        gone = []
        for p in by_night.get(r["camera_night_id"], []):
            if not product_in_place(p):
                gone.append(p["kind"])
        r["products_gone"] = sorted(gone)


def _check_running_processes(cat: Any, rows: list[dict[str, Any]]) -> None:
    """Add ``process_gone`` and ``stalled`` to each row; for a running row whose run nothing runs any more.

    ``process_gone``: the pid of its run when that ran on this host and is
    gone. ``stalled``: why the run is running in name only (that process
    gone, or no live lease: its heartbeats stopped); None otherwise.
    """
    from mascara.catalog.lifecycle import process_gone

    for r in rows:
        run = r.get("last_run_id") if r["state"] == "running" else None
        r["process_gone"] = process_gone(cat, run) if run else None
        r["stalled"] = None
        if r["process_gone"]:
            r["stalled"] = f"its process {r['process_gone']} on this host is gone"
        elif run:
            info = cat.run_info(run)  # live: the run holds its camera-night's lease, unexpired
            if not info.live:
                beat = info.heartbeat_at
                r["stalled"] = ("no heartbeat since " + (f"{beat:%Y-%m-%d %H:%M:%S} UTC" if beat else "it started")
                                + " and its lease has expired")


def cli_status(args: argparse.Namespace) -> int:
    """``mascara status``: the night_status table, or JSON with ``--json``.

    A reader that stops reading (``| head``) ends it quietly: exit 141 (128 + SIGPIPE, as a command the
    shell's SIGPIPE stops), no traceback.
    """
    try:
        code = _status(args)
        sys.stdout.flush()  # here, not at the interpreter's exit, where a closed pipe is a message on stderr
        return code
    except BrokenPipeError:
        try:  # what is still buffered goes nowhere, quietly, at exit
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):  # a stdout without a file descriptor
            pass
        return 141


def _status(args: argparse.Namespace) -> int:
    """:func:`cli_status` up to its output; its exit code."""
    from mascara.selection import SelectionError, parse_cameras, parse_nights, parse_sites

    try:  # a mistake in the selection is exit 2 and one line, as for mascprocess
        # the nights as mascprocess takes them: ``all`` is every night (None), a range its nights
        nights = parse_nights(args.night) if args.night is not None else None
        cameras = parse_cameras(getattr(args, "camera", None))
        sites = parse_sites(getattr(args, "site", None))
    except SelectionError as exc:
        print(f"mascara status: {exc}", file=sys.stderr)
        return 2
    url = _engine.resolve_url(args.db, args.datadir)
    if args.db or os.environ.get(_engine.ENV_URL):  # a URL someone gave (the default one is well formed)
        problem = _url_problem(url)
        if problem is not None:
            print(f"mascara status: {problem}", file=sys.stderr)
            return 2
    missing = _missing_sqlite(url)
    if missing is not None:
        print(f"no catalog at {missing}: nothing was reduced in {args.datadir}", file=sys.stderr)
        return 1
    problem = _schema_problem(url, args.datadir, args.db)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    if getattr(args, "season", False):
        return _print_season(url, args, nights, cameras, sites)
    if getattr(args, "rejected", False):
        return _print_rejected(url, args, nights, cameras, sites)
    with connect(url) as cat:
        rows = [r for r in cat.night_status(nights) if _selected(r["camera"], cameras, sites)]
        _check_products_on_disk(cat, rows)
        _check_running_processes(cat, rows)
    if args.json:
        return _print_json(rows)

    from rich.table import Table

    table = Table(title=f"Reductions in {_engine.shown_url(url)}")
    several_datadirs = len({r.get("datadir") for r in rows}) > 1
    columns = list(TABLE_COLUMNS)
    if several_datadirs:  # the same night and camera may appear once per data directory
        columns.insert(2, ("data", "datadir"))
    for header, _ in columns:
        table.add_column(header, no_wrap=True,
                         justify="right" if header in {"failed", "frames ok", "rejected", "missing", "products"} else "left")
    for r in rows:
        cells = []
        for header, key in columns:
            if key is None:  # batches: done/total
                cells.append(f"{r['batches_done']}/{r['batches_total']}")
            elif key == "state":  # a warning turns a success yellow
                warned = r.get("warning") or r.get("products_gone")
                style = "yellow" if r["state"] == "succeeded" and warned else _STATE_STYLE.get(r["state"], "")
                cells.append(f"[{style}]{r['state']}[/]")
            elif key == "warning":
                gone = f"{'+'.join(r['products_gone'])} gone or replaced" if r.get("products_gone") else None
                cells.append(f"[yellow]{_cell('; '.join(w for w in (r[key], gone) if w) or None)}[/]")
            else:
                cells.append(_cell(r[key]))
        table.add_row(*cells)
    console = _console(220)  # piped or redirected: never truncate
    if rows:
        console.print(table)
        for r in rows:  # what a warning or an empty night means, in one line each
            if r.get("warning") and r.get("calibration_note"):
                console.print(f"{r['night']} {r['camera']}: {r['warning']}: {r['calibration_note']}", soft_wrap=True)
            if r.get("products_gone"):
                console.print(f"{r['night']} {r['camera']}: {', '.join(r['products_gone'])} recorded by run "
                              f"{r['last_run_id']} not on disk as recorded (deleted or replaced since); a re-run "
                              "reduces the night again", soft_wrap=True)
            if r.get("stalled"):  # recorded running, but nothing runs it
                console.print(f"{r['night']} {r['camera']}: run {r['last_run_id']} is recorded running, but "
                              f"{r['stalled']} (killed, or it could not write its end to the catalog); the next "
                              "run of this night takes it over", soft_wrap=True)
            if _why(r):  # why a run failed, with the phase it stopped in
                console.print(f"{r['night']} {r['camera']}: failed {_why(r)}", soft_wrap=True)
            if r["state"] == "empty" and r.get("error"):
                console.print(f"{r['night']} {r['camera']}: empty: {r['error']}", soft_wrap=True)
    else:
        console.print("no camera-nights registered" + _asked(args))
    return 0


def cli_db_upgrade(args: argparse.Namespace) -> int:
    """``mascara db upgrade``: apply the Alembic migrations up to ``--revision``."""
    url = _engine.resolve_url(args.db, args.datadir)
    if _missing_sqlite(url) is not None and not Path(args.datadir).is_dir():
        # the default catalog of a data directory that does not exist: a typo, not a new catalog
        print(f"mascara db upgrade: no data directory {args.datadir} (create it first, or give --db)",
              file=sys.stderr)
        return 2
    problem = _url_problem(url)  # a mistyped --db makes no catalog in a directory of its own
    if problem:
        print(f"mascara db upgrade: {problem}", file=sys.stderr)
        return 2
    engine = _engine.make_engine(url)
    try:
        before = _engine.current_revision(engine)
        _engine.upgrade(engine, getattr(args, "revision", "head") or "head")
        after = _engine.current_revision(engine)
    finally:
        engine.dispose()
    shown = _engine.shown_url(url)
    print(f"{shown}: revision {before or '(empty)'} -> {after}")
    return 0


def _print_rejected(url: str, args: argparse.Namespace, nights: list[str] | None, cameras: list[str] | None,
                    sites: list[str] | None) -> int:
    """``mascara status --rejected``: every refused raw file of the selected camera-nights and why."""
    with connect(url) as cat:
        rows = [r for r in cat.rejected_frames(nights) if _selected(r["camera"], cameras, sites)]
    if args.json:
        return _print_json(rows)
    from rich.table import Table

    table = Table(title=f"Rejected raw files in {_engine.shown_url(url)}")
    several_datadirs = len({str(Path(r["night_dir"]).parent) for r in rows}) > 1
    for header in ("night", "camera", *(("night directory",) if several_datadirs else ()), "file", "reason"):
        table.add_column(header, no_wrap=header != "reason")
    for r in rows:
        table.add_row(r["night"], r["camera"], *((r["night_dir"],) if several_datadirs else ()), r["filename"],
                      r["reason"] or "")
    _console(120, always=True).print(table)
    if not rows:
        print("no rejected raw files" + _asked(args, "night(s)"))
    return 0


def _print_season(url: str, args: argparse.Namespace, nights: list[str] | None, cameras: list[str] | None,
                  sites: list[str] | None) -> int:
    """``mascara status --season``: the season view, one row per month, site and camera, and the totals; the
    months of the --night nights, whole (said under the table)."""
    with connect(url) as cat:
        rows = [r for r in cat.season(nights) if _selected(r["camera"], cameras, sites)]
        # the view counts a run recorded running as running; one that nothing runs any more is "stalled" here
        running = [r for r in cat.night_status(nights) if r["state"] == "running"
                   and _selected(r["camera"], cameras, sites)] if any(
            r["running"] for r in rows) else []
        _check_running_processes(cat, running)
    for r in rows:
        r["stalled"] = sum(1 for x in running if x["stalled"] and (x["night"][:6], x["site"], x["camera"]) == (
            r["month"], r["site"], r["camera"]))
        r["running"] -= r["stalled"]
    if args.json:
        return _print_json(rows)
    from rich.table import Table

    keys = ("camera_nights", "done", "failed", "running", "stalled", "pending", "empty", "frames", "frames_rejected")
    table = Table(title="Season: the latest reduction of every camera-night, by month")
    for h in ("month", "site", "camera", "camera-nights", "done", "failed", "running", "stalled", "pending", "empty",
              "frames", "rejected", "CPU h"):
        table.add_column(h, justify="left" if h in ("month", "site", "camera") else "right", no_wrap=True)
    for r in rows:
        table.add_row(r["month"], r["site"], r["camera"], *(str(r[k]) for k in keys), f"{r['cpu_seconds'] / 3600:.2f}")
    if rows:
        table.add_row("all", "", "", *(str(sum(r[k] for r in rows)) for k in keys),
                      f"{sum(r['cpu_seconds'] for r in rows) / 3600:.2f}", style="bold")
    console = _console(160)
    console.print(table if rows else "no camera-nights registered" + _asked(args, "the months of --night"))
    months = _months_covered(nights, args.night)
    if months:  # the view is by month: --night 20260301..20260302 counts all of March, which it says
        console.print(months, soft_wrap=True)
    return 0
