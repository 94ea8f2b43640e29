"""The season view (revision 0006): monthly totals per site and camera, on SQLite and PostgreSQL."""

from __future__ import annotations

import argparse

from catalog_rows import VERSIONS, fingerprint

from mascara.catalog.commands import cli_status


def _night(catalog, night: str, camera: str, outcome: str | None, cpu: tuple[float, ...] = (), frames: int = 50):
    cn = catalog.register_camera_night("LP", camera, night, f"/d/{night}LP{camera}")
    catalog.record_intake(cn, None, frames_present=frames, slots_expected=frames, frames_missing=0)
    if outcome is None:
        return cn
    run = catalog.start_run(cn, fingerprint(), {}, VERSIONS, "station")
    catalog.decide(run, "new", None, [])
    catalog.begin_reducing(run, [(i, 50 * i, 50 * i + 49, 50) for i in range(len(cpu))], fresh=True)
    for i, t in enumerate(cpu):
        catalog.batch_started(run, i)
        catalog.batch_succeeded(run, i, f"/t/{night}{camera}{i}.h5", "a" * 64, {"read": t / 2, "photometry": t / 2})
    catalog.record_frames(cn, [(50 * i + k, f"{50 * i + k:08d}LP{camera}.fits", 10, "ok", None)
                               for i in range(len(cpu)) for k in range(3)])
    if outcome != "running":
        catalog.finish_run(run, outcome, error=None if outcome == "succeeded" else "boom")
    return cn


def test_season_totals_by_month_site_and_camera(catalog, capsys):
    _night(catalog, "20260130", "E", "succeeded", cpu=(10.0, 20.0))
    _night(catalog, "20260131", "E", "failed", cpu=(5.0,))
    _night(catalog, "20260131", "S", "running", cpu=(7.0,))
    _night(catalog, "20260201", "E", "succeeded", cpu=(1.0,))
    _night(catalog, "20260202", "E", None)  # registered, never reduced
    _night(catalog, "20260203", "E", None, frames=0)  # no data
    rows = {(r["month"], r["camera"]): r for r in catalog.season()}
    assert set(rows) == {("202601", "LPE"), ("202601", "LPS"), ("202602", "LPE")}
    jan_e, jan_s, feb_e = rows["202601", "LPE"], rows["202601", "LPS"], rows["202602", "LPE"]
    assert (jan_e["camera_nights"], jan_e["done"], jan_e["failed"], jan_e["running"]) == (2, 1, 1, 0)
    assert jan_e["frames"] == 9 and abs(jan_e["cpu_seconds"] - 35.0) < 1e-9
    assert (jan_s["running"], jan_s["cpu_seconds"]) == (1, 7.0)
    assert (feb_e["camera_nights"], feb_e["done"], feb_e["pending"], feb_e["empty"]) == (3, 1, 1, 1)
    assert [r["month"] for r in catalog.season("20260201..20260228")] == ["202602"]

    cli_status(argparse.Namespace(db=str(catalog.engine.url.render_as_string(hide_password=False)), datadir=".",
                                  night=None, json=False, season=True))
    out = capsys.readouterr().out
    assert "202601" in out and "202602" in out and "all" in out


def test_season_and_status_say_which_running_runs_nothing_runs_any_more(catalog, capsys, monkeypatch):
    """An outside trial killed a backfill: ``status --season`` went on counting its camera-nights as running.
    A run recorded running whose process on this host is gone, or whose lease expired (its heartbeats
    stopped, on any host), is counted ``stalled`` instead; the view itself is unchanged."""
    import json
    import os
    import socket
    import subprocess
    import sys
    import time

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    here = socket.gethostname()
    runs = {}
    for cam, host, pid, lease in (("E", here, os.getpid(), 900.0),  # alive: this test's process
                                  ("S", here, gone.pid, 900.0),  # its process is gone, its lease not yet
                                  ("W", "elsewhere", None, 0.5),  # another host; its lease expires unrenewed
                                  ("N", "elsewhere", None, 900.0)):  # another host, heartbeats on time
        cn = catalog.register_camera_night("LP", cam, "20260310", f"/d/20260310LP{cam}")
        runs[cam] = catalog.start_run(cn, fingerprint(), {}, VERSIONS, host, lease_seconds=lease, pid=pid)
    _night(catalog, "20260311", "E", "succeeded", cpu=(3.0,))
    time.sleep(1.0)
    assert {c: catalog.run_info(r).live for c, r in runs.items()} == {"E": True, "S": True, "W": False, "N": True}
    url = catalog.engine.url.render_as_string(hide_password=False)
    args = dict(db=url, datadir=".", night=None, json=True, season=True)
    assert cli_status(argparse.Namespace(**args)) == 0
    rows = {r["camera"]: r for r in json.loads(capsys.readouterr().out)}
    assert {c: (r["camera_nights"], r["done"], r["running"], r["stalled"]) for c, r in rows.items()} == {
        "LPE": (2, 1, 1, 0), "LPS": (1, 0, 0, 1), "LPW": (1, 0, 0, 1), "LPN": (1, 0, 1, 0)}, rows
    assert sum(r["running"] for r in catalog.season()) == 4  # the SQL view counts what the catalog records
    assert cli_status(argparse.Namespace(**{**args, "json": False})) == 0
    out = capsys.readouterr().out
    table = [line.replace("┃", "│").split("│") for line in out.splitlines() if "│" in line or "┃" in line]
    header = [c.strip() for c in table[0]]
    total = [c.strip() for c in table[-1]]
    assert total[header.index("running")] == "2" and total[header.index("stalled")] == "2", table
    assert cli_status(argparse.Namespace(**{**args, "season": False, "json": False, "rejected": False})) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"LPS: run {runs['S']} is recorded running, but its process {gone.pid} on this host is gone" in out, out
    assert f"LPW: run {runs['W']} is recorded running, but no heartbeat since " in out
    assert "and its lease has expired" in out
    assert "LPE: run" not in out and "LPN: run" not in out
