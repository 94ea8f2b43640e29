"""End to end: prefect.yaml deployed to a real server, a process worker, ``prefect deployment run``.

Also the UI smoke test: headless Chromium renders the flow-run page and shows
the batch task runs.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import tempfile

import h5py
import httpx
import numpy as np
import pytest
from flowkit import (
    BIN,
    NIGHT,
    NIGHT_ID,
    REPO,
    artifacts,
    assert_same_night_files,
    batch_rows,
    flow_run_state,
    fresh_copy,
    night_status,
    runs,
    stop_process_group,
    task_runs,
)

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

from mascara.lcformat import CALIBRATION_ATTRS  # noqa: E402  (not SPEC: the calibration applied)

# SPEC §8, written out independently of mascara.lcformat

GLOBAL_ATTRS = {"STATION", "CAMERA", "ALT0", "AZ0", "TH0", "X0", "Y0", "AVERSION", "RVERSION", "CVERSION",
                "EXPTIME", "CCDTEMP", "NAPER", "APER0", "APER1", "NSTAPER", "SKYRAD0", "SKYRAD1"}
def data_fields(naper: int) -> tuple[str, ...]:
    """fLC fields; the sLC has the same with its four binned apertures."""
    fluxes = tuple(f for i in range(naper) for f in (f"flux{i}", f"eflux{i}"))
    return ("flag", *fluxes, "sky", "esky", "peak", "x", "y", "alt", "az", "ccdtemp", "exptime", "jdmid", "lst",
            "lstidx", "lstseq")
HEADER_FIELDS = ("jdstart", "ra", "dec", "vmag", "bmag", "spectype", "blend", "blendvalue", "nobs")
HEADER_TABLE = {"ascc", "ra", "dec", "vmag", "bmag", "spectype", "blend", "blendvalue", "jdstart", "nobs"}


def _run(cmd: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{' '.join(cmd)}: {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def deployed_run(prefect_server, pristine_night, tmp_path_factory):
    """``reduce-night/nightly`` deployed from prefect.yaml and run by a process worker via the CLI."""
    api, env = prefect_server
    root = tmp_path_factory.mktemp("deployed")
    datadir = fresh_copy(pristine_night, root / "data")
    env = {**env, "MASCARA_DATADIR": str(datadir)}
    prefect = str(BIN / "prefect")
    _run([prefect, "work-pool", "create", "mascara", "--type", "process"], env)
    _run([prefect, "--no-prompt", "deploy", "--all"], env, cwd=REPO)
    worker_log = open(root / "worker.log", "w")
    worker = subprocess.Popen([prefect, "worker", "start", "--pool", "mascara"], env=env, cwd=root,
                              stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # --param values are JSON: a bare night number is an int, which the flow accepts
        res = subprocess.run([prefect, "deployment", "run", "reduce-night/nightly", "--param", f"nights={NIGHT}",
                              "--param", "cameras=E", "--param", "site=LP", "--param", f"datadir={datadir}",
                              "--watch", "--watch-timeout", "600"],
                             env=env, capture_output=True, text=True, timeout=700)
    finally:
        stop_process_group(worker)
        worker_log.close()
    return {"api": api, "datadir": datadir, "cli": res, "worker_log": (root / "worker.log").read_text()}


def test_deployment_run_via_the_cli_reduces_the_night(deployed_run, reference):
    res = deployed_run["cli"]
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}\n{deployed_run['worker_log'][-5000:]}"
    datadir = deployed_run["datadir"]
    row = night_status(datadir)
    assert row["state"] == "succeeded"
    assert row["batches_done"] == row["batches_total"] == 3 and row["batches_failed"] == 0
    assert row["frames_ok"] == 120 and row["frames_rejected"] == 0
    assert all(r["tries"] == 1 for r in batch_rows(datadir).values())
    assert_same_night_files(datadir / NIGHT_ID, reference)


def test_deployment_has_the_nightly_schedule(deployed_run):
    r = httpx.get(f"{deployed_run['api']}/deployments/name/reduce-night/nightly", timeout=30)
    r.raise_for_status()
    dep = r.json()
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 12 * * *"]
    assert dep["parameters"]["nights"] == "yesterday"
    assert dep["work_pool_name"] == "mascara"
    # on-demand runs (one per camera-night) are capped over all workers; each worker caps itself (--limit 1)
    r = httpx.get(f"{deployed_run['api']}/deployments/name/reduce-night/on-demand", timeout=30)
    r.raise_for_status()
    assert r.json()["global_concurrency_limit"]["limit"] == 5
    # the live deployment: before dusk, tonight, one at a time; its schedule is switched on at a station
    r = httpx.get(f"{deployed_run['api']}/deployments/name/reduce-night/live", timeout=30)
    r.raise_for_status()
    live = r.json()
    assert [s["schedule"]["cron"] for s in live["schedules"]] == ["0 16 * * *"]
    assert live["parameters"]["nights"] == "tonight" and live["entrypoint"] == "flows/live.py:reduce_night_live"
    # `prefect deployment run reduce-night/live --param nights=20260301` (the README's): the CLI sends a number
    assert "integer" in str(live["parameter_openapi_schema"]["properties"]["nights"]), live["parameter_openapi_schema"]
    # the season: the submitter, and one camera-night per run from the lowest-priority queue, skipping done ones
    queues = {}
    for name in ("nightly", "live", "backfill", "backfill-night"):
        r = httpx.get(f"{deployed_run['api']}/deployments/name/reduce-night/{name}", timeout=30)
        r.raise_for_status()
        queues[name] = r.json()
    assert {k: v["work_queue_name"] for k, v in queues.items()} == {
        "nightly": "nightly", "live": "live", "backfill": "default", "backfill-night": "backfill"}
    assert queues["backfill-night"]["parameters"]["skip_done"] is True
    assert queues["backfill"]["entrypoint"] == "flows/backfill.py:reduce_night_backfill"


@pytest.mark.parametrize("kind", ["fLC", "sLC"])
def test_night_files_have_the_spec_layout(deployed_run, kind):
    path = deployed_run["datadir"] / NIGHT_ID / "lightcurves" / f"{kind}_{NIGHT_ID}.hdf5"
    with h5py.File(path, "r") as f:
        attrs = set(f["global"].attrs)
        naper = int(f["global"].attrs["NAPER"])
        # the SPEC attributes, plus the calibration applied (extra attributes, issue 10)
        assert attrs == GLOBAL_ATTRS | {f"APER{i}" for i in range(naper)} | set(CALIBRATION_ATTRS)
        assert f["global"].attrs["CALIBRATION"] == "dark"
        assert naper == (2 if kind == "fLC" else 4)
        ht = f["header_table"]
        assert set(ht) == HEADER_TABLE
        ids = [a.decode() if isinstance(a, bytes) else str(a) for a in ht["ascc"][()]]
        assert len(ids) > 100 and set(ids) == set(f["data"]) == set(f["header"])
        for i, ascc in enumerate(ids[:: max(1, len(ids) // 50)]):
            data = f["data"][ascc][()]
            assert data.dtype.names == data_fields(naper)
            assert np.all(np.diff(data["lstseq"]) > 0)
            assert f["header"][ascc][()].dtype.names == HEADER_FIELDS
            assert ht["nobs"][ids.index(ascc)] == len(data)


def test_artifacts_summarise_the_camera_night(deployed_run):
    (run,) = runs(deployed_run["datadir"])
    arts = artifacts(deployed_run["api"], run["flow_run_id"])
    key = NIGHT_ID.lower()
    night_key = f"{NIGHT}-lp"
    assert {f"{key}-summary", f"{key}-progress", f"{key}-outputs", f"{key}-quicklook",
            f"{night_key}-cameras", f"{night_key}-night"} <= set(arts)
    assert arts[f"{key}-progress"]["data"] == pytest.approx(100.0)
    (summary,) = json.loads(arts[f"{key}-summary"]["data"])
    assert summary["state"] == "succeeded" and summary["frames ok / rejected"] == "120 / 0"
    assert summary["batches (low transparency)"] == "3 (0)" and 0.9 < summary["transparency"] < 1.1
    assert summary["fLC stars (per frame, V<=8.4)"] > 100 and 0 < summary["astrometry rms (px)"] < 0.5
    assert summary["sLC stars (binned, V<=10.0)"] > summary["fLC stars (per frame, V<=8.4)"]
    outputs = arts[f"{key}-outputs"]["data"]
    assert f"`{deployed_run['datadir'] / NIGHT_ID / 'lightcurves' / f'fLC_{NIGHT_ID}.hdf5'}`" in outputs
    assert "file://" not in outputs and "None" not in outputs and " 0.0 MB" not in outputs
    # one table per night across cameras (here one camera), and the figures embedded
    assert [r["camera-night"] for r in json.loads(arts[f"{night_key}-cameras"]["data"])] == [NIGHT_ID]
    quicklook = arts[f"{key}-quicklook"]["data"]
    assert quicklook.count("](data:image/png;base64,") == 5 and len(quicklook) < 200_000
    assert arts[f"{night_key}-night"]["data"].count("](data:image/png;base64,") == 1


def test_flow_run_is_named_after_its_parameters(deployed_run):
    (run,) = runs(deployed_run["datadir"])
    r = httpx.get(f"{deployed_run['api']}/flow_runs/{run['flow_run_id']}", timeout=30)
    assert r.json()["name"] == f"{NIGHT}-LP-E"


def test_quicklook_pngs_are_beside_the_night_files(deployed_run):
    ql = deployed_run["datadir"] / NIGHT_ID / "quicklook"
    assert sorted(p.name for p in ql.iterdir()) == sorted(f"{n}.png" for n in
                                                          ("lightcurves", "sky", "astrometry", "frames", "thumbnail"))
    assert all(2_000 < p.stat().st_size < 60_000 for p in ql.iterdir())
    assert (deployed_run["datadir"] / "quicklook" / f"{NIGHT}LP.png").is_file()
    with h5py.File(deployed_run["datadir"] / NIGHT_ID / "work" / "diagnostics.hdf5", "r") as f:
        assert len(f["fast"]) == 10 and all(len(f["fast"][s]) > 80 for s in f["fast"])


def _png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.mark.browser
def test_ui_flow_run_page_shows_the_batch_task_runs(deployed_run, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    api = deployed_run["api"]
    (run,) = runs(deployed_run["datadir"])
    url = f"{api.removesuffix('/api')}/v2/runs/flow-run/{run['flow_run_id']}?tab=TaskRuns"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--window-size=1400,900", "--virtual-time-budget=20000"]
    png = tmp_path / "flow-run.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([*flags, f"--user-data-dir={profile}", f"--screenshot={png}", url],
                       capture_output=True, timeout=120, check=True)
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([*flags, f"--user-data-dir={profile}", "--dump-dom", url],
                             capture_output=True, text=True, timeout=120, check=True).stdout
    assert _png_size(png) == (1400, 900) and png.stat().st_size > 30_000
    names = set(task_runs(api, run["flow_run_id"]))
    batch_names = {n for n in names if n.startswith(f"batch-{NIGHT_ID}-")}
    assert len(batch_names) == 3
    for name in batch_names | {f"combine-{NIGHT_ID}"}:
        assert name in dom, f"{name} not on the flow-run page"


def _screenshot(url: str, png, height: int = 1800) -> str:  # type: ignore[no-untyped-def]
    """Headless Chromium: a screenshot of ``url`` into ``png``; returns the page's DOM after its scripts ran."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--window-size=1400,{height}", "--virtual-time-budget=20000"]
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([*flags, f"--user-data-dir={profile}", f"--screenshot={png}", url],
                       capture_output=True, timeout=120, check=True)
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([*flags, f"--user-data-dir={profile}", "--dump-dom", url],
                              capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.browser
def test_ui_artifact_page_shows_the_quicklook_figures(deployed_run, tmp_path):
    """The quick-look artifact, opened in the UI as a person would, renders its embedded PNGs."""
    from PIL import Image

    api = deployed_run["api"]
    (run,) = runs(deployed_run["datadir"])
    art = artifacts(api, run["flow_run_id"])[f"{NIGHT_ID.lower()}-quicklook"]
    png = tmp_path / "quicklook-artifact.png"
    dom = _screenshot(f"{api.removesuffix('/api')}/artifacts/artifact/{art['id']}", png)
    # the sanitiser kept the images: five <img> with data URIs in the rendered page
    assert dom.count('src="data:image/png;base64,') == 5, dom[:2000]
    assert f"{NIGHT_ID} at a glance" in dom and f"{NIGHT}-LP-E" in dom  # the heading and the run's name
    # and they are drawn: the figures' white backgrounds and the orange transparency points cover the dark page
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert img.shape == (1800, 1400, 3)
    white = (img.min(axis=2) > 245).mean()
    orange = ((abs(img[..., 0] - 255) < 30) & (abs(img[..., 1] - 127) < 40) & (img[..., 2] < 60)).sum()
    assert white > 0.15 and orange > 50, (white, orange)


def test_a_cancelled_rerun_does_not_wedge_the_night(deployed_run, prefect_server, pristine_night, reference,
                                                    tmp_path):
    """Issue 9, 1 (cancel): a re-run cancelled with ``prefect flow-run cancel`` mid-batch; the next run succeeds."""
    import re
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "catalog"))
    from lifecycle_checks import check_invariants

    from mascara.catalog import connect

    api, env = prefect_server
    datadir = fresh_copy(pristine_night, tmp_path / "data")
    prefect = str(BIN / "prefect")
    params = ["--param", f"nights={NIGHT}", "--param", "cameras=E", "--param", "site=LP",
              "--param", f"datadir={datadir}"]
    log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen([prefect, "worker", "start", "--pool", "mascara"], env=env, cwd=tmp_path,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        watch = ["--watch", "--watch-timeout", "600"]
        _run([prefect, "deployment", "run", "reduce-night/nightly", *params, *watch], env, timeout=700)
        # the re-run hangs after its first batch file (moves aside done), as a long batch would
        res = _run([prefect, "deployment", "run", "reduce-night/nightly", *params, "--job-variable",
                    'env={"MASCARA_FAULT": "after_batch_file:hang"}'], env, timeout=120)
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", res.stdout).group(1)
        t0 = time.perf_counter()
        night = datadir / NIGHT_ID
        while not ((night / "lightcurves_old").is_dir() and list((night / "work" / "batches").glob("batch_*.h5"))):
            assert time.perf_counter() - t0 < 300, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.5)
        _run([prefect, "flow-run", "cancel", flow_run_id], env, timeout=120)
        while True:
            state = flow_run_state(api, flow_run_id)
            if state in ("CANCELLED", "CRASHED", "FAILED"):
                break
            assert time.perf_counter() - t0 < 400, f"flow run still {state}"
            time.sleep(1)
        assert (datadir / NIGHT_ID / "lightcurves_old" / f"fLC_{NIGHT_ID}.hdf5").is_file()
        _run([prefect, "deployment", "run", "reduce-night/nightly", *params, *watch], env, timeout=700)
    finally:
        stop_process_group(worker)
        log.close()
    row = night_status(datadir)
    assert row["state"] == "succeeded" and row["batches_done"] == row["batches_total"] == 3
    assert_same_night_files(datadir / NIGHT_ID, reference)
    finished = {r["id"] for r in runs(datadir) if r["status"] == "succeeded"}
    assert len(finished) == 2
    with connect(datadir=datadir) as cat:
        check_invariants(cat, finished)
