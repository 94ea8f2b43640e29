"""Runs a person can read: flow-run names from parameters, nights without data end Completed, artifacts in words."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import httpx
import pytest
from flowkit import NIGHT

from flows import report
from flows.reduce_night import describe_request


@pytest.mark.parametrize("nights, cameras, site, name", [
    (NIGHT, "E+S", "LP", f"{NIGHT}-LP-E+S"),
    (int(NIGHT), ["E"], None, f"{NIGHT}-all-E"),
    ("20260301+20260302", None, "LP", "20260301+20260302-LP-all"),
    ("20260301+20260302+20260303+20260304", "W", "LS", "20260301..20260304(4)-LS-W"),
    ("all", None, None, "all-nights-all-all"),
])
def test_flow_run_names_say_what_a_run_reduces(nights, cameras, site, name):
    assert describe_request(nights, cameras, site) == name


def test_yesterday_is_named_by_its_date():
    yesterday = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)).strftime("%Y%m%d")
    assert describe_request("yesterday", None, None) == f"{yesterday}-all-all"
    assert describe_request(None, "E", "LP") == f"{yesterday}-LP-E"


def test_outputs_are_paths_as_text_with_sizes_and_what_star_counts_mean():
    files = [{"kind": "fLC", "path": "/d/20260301LPE/lightcurves/fLC_20260301LPE.hdf5", "size": 8_512_000,
              "nstars": 428, "sha256": "a" * 64},
             {"kind": "solution", "path": "/d/20260301LPE/astrometry/camera_solution.json", "size": 2_300,
              "nstars": None, "sha256": "b" * 64}]
    md = report.outputs_markdown("20260301LPE", "/d/20260301LPE", files, [("/d/x/work", "/d/x/work_old")])
    assert "file://" not in md and "None" not in md
    assert "`/d/20260301LPE/lightcurves/fLC_20260301LPE.hdf5`" in md
    assert "| 8.5 MB | 428 |" in md and "| 2 kB | - |" in md
    assert "stars with per-frame photometry (V <= 8.4)" in md
    row = report.camera_night_row("20260301LPE", "succeeded", {"frames": 260, "stars_fLC": 428, "stars_sLC": 914},
                                  files)
    assert row["fLC stars (per frame, V<=8.4)"] == 428
    assert row["sLC stars (binned, V<=10.0)"] == 914 and row["fLC size"] == "8.5 MB"
    assert row["frames ok / rejected"] == "260 / -" and row["note"] == ""


# --------------------------------------------------------------------------- with a server

_PROBE = """
import json, sys
from flows.reduce_night import reduce_night
state = reduce_night(datadir=sys.argv[1], nights=sys.argv[2], return_state=True)
print(json.dumps({"type": state.type.value, "message": state.message, "flow_run_id": str(state.state_details.flow_run_id)}))
"""


def _probe(env, datadir, nights):  # type: ignore[no-untyped-def]
    res = subprocess.run([sys.executable, "-c", _PROBE, str(datadir), nights], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.prefect
@pytest.mark.slow
def test_a_nightly_run_without_data_ends_completed_and_says_so(prefect_server, tmp_path):
    """The nightly default (``yesterday``) when the dome stayed closed: Completed, an artifact, ``empty`` rows."""
    from mascara.catalog import connect

    api, env = prefect_server
    datadir = tmp_path / "data"
    (datadir / f"{NIGHT}LPE" / "raw").mkdir(parents=True)  # an older night: cameras LPE and LPS are known
    (datadir / f"{NIGHT}LPS" / "raw").mkdir(parents=True)
    yesterday = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)).strftime("%Y%m%d")
    out = _probe(env, datadir, "yesterday")
    assert out["type"] == "COMPLETED", out
    run = httpx.get(f"{api}/flow_runs/{out['flow_run_id']}", timeout=30).json()
    assert run["name"] == f"{yesterday}-all-all"
    arts = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [out["flow_run_id"]]}}},
                      timeout=30).json()
    (nodata,) = [a for a in arts if (a["key"] or "").startswith("nodata")]
    assert f"{yesterday}LPE" in nodata["data"] and f"{yesterday}LPS" in nodata["data"]
    with connect(datadir=datadir) as cat:
        rows = {r["camera"]: r for r in cat.night_status(yesterday)}
    assert set(rows) == {"LPE", "LPS"} and {r["state"] for r in rows.values()} == {"empty"}
    assert "no night directory" in rows["LPE"]["error"]

    # an empty raw/ of a night that has a directory: Completed as well, recorded empty
    out = _probe(env, datadir, NIGHT)
    assert out["type"] == "COMPLETED", out
    with connect(datadir=datadir) as cat:
        assert {r["state"] for r in cat.night_status(NIGHT)} == {"empty"}


@pytest.mark.prefect
@pytest.mark.slow
def test_a_real_failure_still_fails(prefect_server, pristine_night, tmp_path):
    """A camera-night whose frames cannot be read at all (no camera solution) fails the flow run."""
    from flowkit import BIN, NIGHT_ID, fresh_copy

    _, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    broken = sorted((datadir / NIGHT_ID / "raw").glob(f"*{NIGHT_ID[-3:]}.fits*"))
    assert len(broken) == 120
    for p in broken:
        p.write_bytes(b"SIMPLE  =                    T" + b" " * 50)  # named like frames, unreadable
    out = _probe(env, datadir, NIGHT)
    assert out["type"] == "FAILED", out
    assert NIGHT_ID in out["message"]
    # the frames refused while the camera solution was looked for are recorded, each with its reason, though
    # no batch ran to record them (the failure said "120 refused" and the catalog listed none); both drivers
    from mascara.catalog import connect

    library = fresh_copy(pristine_night, tmp_path / "library")
    for p in sorted((library / NIGHT_ID / "raw").glob(f"*{NIGHT_ID[-3:]}.fits*")):
        p.write_bytes(b"SIMPLE  =                    T" + b" " * 50)
    res = subprocess.run([str(BIN / "mascprocess"), str(library), "--night", NIGHT, "--camera", "E", "--site", "LP",
                          "--no-prefect", "-q"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "no camera solution found" in res.stderr, res.stderr[-2000:]
    for where in (datadir, library):
        with connect(datadir=where) as cat:
            rows = cat.rejected_frames(night_dir=where / NIGHT_ID)
            (status,) = cat.night_status(NIGHT)
        assert sorted(r["filename"] for r in rows) == sorted(p.name for p in broken), (where, len(rows))
        assert all(r["reason"].startswith("unreadable FITS file") for r in rows), rows[:3]
        assert status["frames_rejected"] == 120, status


def test_an_empty_datadir_parameter_means_the_workers_mascara_datadir(monkeypatch, tmp_path):
    from flows.reduce_night import worker_datadir
    from mascara.selection import SelectionError

    monkeypatch.setenv("MASCARA_DATADIR", str(tmp_path))
    assert worker_datadir("/data/mascara") == "/data/mascara"
    assert worker_datadir("") == worker_datadir("{{ $MASCARA_DATADIR }}") == str(tmp_path)
    monkeypatch.delenv("MASCARA_DATADIR")
    with pytest.raises(SelectionError, match="MASCARA_DATADIR is not set where this flow runs"):
        worker_datadir("")


def test_the_no_data_artifact_stays_short_for_a_long_range():
    entries = [(f"202601{d:02d}LP{c}", "no night directory") for d in range(1, 32) for c in "ES"]
    md = report.no_data_markdown(entries)
    assert md.count("- **") == 30 and "... and 32 more" in md and "20260101LPE" in md


@pytest.mark.prefect
@pytest.mark.slow
def test_a_night_that_failed_shows_what_it_reduced_and_why_in_the_ui(prefect_server, pristine_night, tmp_path):
    """A batch that exhausts its retries fails the camera-night; its artifacts still tell the operator what
    was reduced: the progress artifact's last word (batches and frames reduced, the failure), the night
    table's counts (equal to the catalog's) with the reason next to the state, and the quick-look figures
    of the batches reduced (drawn and published). The terminal's bar counts only frames reduced."""
    from flowkit import NIGHT_ID, artifacts, fresh_copy, mascprocess, runs

    from mascara.catalog import connect
    from mascara.reduce import plan_camera_night

    api, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    plan = plan_camera_night(datadir / NIGHT_ID)
    victim = sorted(plan.batches)[-1]
    res = mascprocess(datadir, {**env, "MASCARA_FLOW_FAULT": f"{NIGHT_ID}:{victim}:9"}, check=False)
    assert res.returncode == 1, res.stderr[-3000:]
    reduced = sum(len(f) for b, f in plan.batches.items() if b != victim)
    assert f"{reduced}/{len(plan.frames)} frames" in res.stdout, res.stdout[-2000:]  # not all of them

    (run,) = runs(datadir)
    assert run["status"] == "failed"
    with connect(datadir=datadir) as cat:
        (status,) = cat.night_status(NIGHT)
    arts = artifacts(api, run["flow_run_id"])
    progress = arts[f"{NIGHT_ID.lower()}-progress"]
    nb = len(plan.batches)
    assert progress["description"] == (f"{NIGHT_ID}: failed: {nb - 1}/{nb} batches reduced (1 failed), "
                                       f"{reduced}/{len(plan.frames)} frames"), progress
    assert progress["data"] == pytest.approx(100.0)
    (row,) = arts[f"{NIGHT}-lp-cameras"]["data"] if isinstance(arts[f"{NIGHT}-lp-cameras"]["data"], list) else \
        json.loads(arts[f"{NIGHT}-lp-cameras"]["data"])
    assert list(row)[:3] == ["camera-night", "state", "note"], row
    assert row["state"] == "failed" and "1 batch(es) failed" in row["note"], row
    assert row["frames ok / rejected"] == f"{status['frames_ok']} / {status['frames_rejected']}", (row, status)
    assert row["batches (low transparency)"].startswith(f"{nb - 1}/{nb} "), row
    quick = arts[f"{NIGHT_ID.lower()}-quicklook"]
    assert quick["data"].count("data:image/png;base64,") >= 4, quick["data"][:500]
    assert (datadir / NIGHT_ID / "quicklook" / "frames.png").is_file()


@pytest.mark.prefect
@pytest.mark.slow
def test_a_quiet_mascprocess_keeps_the_terminal_quiet_and_gives_the_ui_the_runs_log(prefect_server, pristine_night,
                                                                                     tmp_path):
    """``mascprocess -q`` prints no INFO line, yet the run's page in the UI has its INFO log (the flow's
    summary lines and Prefect's task states): an operator looking at a run started from a terminal sees
    what it did."""
    from flowkit import fresh_copy, mascprocess, runs

    api, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    res = mascprocess(datadir, env, "-q")
    assert " | INFO " not in res.stderr and "camera-night(s):" not in res.stderr, res.stderr[-2000:]
    (run,) = runs(datadir)
    logs = []
    for _ in range(20):  # Prefect sends its queued logs in the background; the command drains them at exit
        r = httpx.post(f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [run["flow_run_id"]]}}},
                       timeout=30)
        r.raise_for_status()
        logs = r.json()
        if any("camera-night(s):" in x["message"] for x in logs):
            break
        import time

        time.sleep(0.5)
    messages = [x["message"] for x in logs]
    assert any("reduce-night: 1 camera-night(s): " in m for m in messages), messages[:20]
    assert any(x["level"] == 20 for x in logs), messages[:20]  # INFO


def test_a_night_recorded_as_reduced_is_not_failed_by_its_reporting(caplog, monkeypatch):
    """An outside trial killed the Prefect server during a night: the catalog recorded the run succeeded, then
    publishing its artifacts raised ConnectError, the combine task failed, mascprocess said 'failed' (exit 1)
    and a re-run moved the good reduction aside. Publishing after the recorded end logs, never raises."""
    import logging

    import httpx

    from flows import report
    from flows._runs import RunHandle
    from flows.reduce_night import _publish_summary_never_failing

    def down(*args, **kwargs):  # what the Prefect client raises with its server gone
        raise httpx.ConnectError("[Errno 111] Connection refused")

    handle = RunHandle(db_url="sqlite://", night_path="/data/20260301LPE", night_id="20260301LPE",
                       camera_night_id="cn", run_id="run", fingerprint_key="fp", decision="new", moves=[], done={})
    logger = logging.getLogger("test-report")
    monkeypatch.setattr(report, "publish_table", down)
    with caplog.at_level(logging.WARNING, logger="test-report"):
        _publish_summary_never_failing(handle, {"frames": 1}, [], {}, {}, {}, logger)
    assert "20260301LPE: reduced and recorded, but its artifacts were not published: ConnectError" in caplog.text
