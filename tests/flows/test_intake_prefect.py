"""The intake through the Prefect flow: the same records as the library driver, an empty camera recorded."""

from __future__ import annotations

import pytest
from corpus import dangling_symlink, linked_copy, raw_digest, truncated_dark
from flowkit import NIGHT, NIGHT_ID, mascprocess
from intakekit import frame_rows

pytestmark = [pytest.mark.prefect, pytest.mark.slow]


def test_flow_records_refused_frames_calibration_and_an_empty_camera(prefect_server, pristine_night, tmp_path):
    _, env = prefect_server
    datadir = linked_copy(pristine_night, tmp_path / "data")
    raw = datadir / NIGHT_ID / "raw"
    frame = dangling_symlink(raw)
    calib = truncated_dark(raw)
    (datadir / f"{NIGHT}LPS" / "raw").mkdir(parents=True)  # camera S took nothing
    before = raw_digest(raw)

    res = mascprocess(datadir, env, "--camera", "E+S", "-q", check=False)
    assert res.returncode == 1, res.stderr  # one camera-night was not reduced
    assert raw_digest(raw) == before

    from mascara.catalog import connect

    with connect(datadir=datadir) as cat:
        rows = {r["camera"]: r for r in cat.night_status(NIGHT)}
        batches = cat._view("SELECT frames_present, frames_accepted, frames_rejected, frames_missing, "
                            "slots_expected FROM batch ORDER BY batch_index", {})
    e, s = rows["LPE"], rows["LPS"]
    assert (e["state"], e["warning"], e["calibration"], e["frames_ok"], e["frames_rejected"]) == (
        "succeeded", "calibration file(s) rejected", "dark", 119, 1)
    assert (s["state"], s["last_run_id"]) == ("empty", None) and "no science frames" in s["error"]
    recorded = frame_rows(datadir)
    for fname, words in {**frame.rejected, **calib.calib_rejected}.items():
        assert recorded[fname][1] == "rejected" and words in recorded[fname][2]
    # the batch holding the dangling link: 50 slots, 50 present, 49 accepted, 1 rejected, none missing
    assert {"frames_present": 50, "frames_accepted": 49, "frames_rejected": 1, "frames_missing": 0,
            "slots_expected": 50} in batches
    assert sum(b["frames_accepted"] for b in batches) == 119


def test_a_deployment_style_run_with_a_bad_night_fails_at_once_with_one_line(prefect_server, pristine_night, tmp_path):
    """The flow called as a deployment calls it (a real flow run on the server), nights=20261399."""
    import subprocess
    import sys

    _, env = prefect_server
    probe = ("import sys\nfrom flows.reduce_night import reduce_night\n"
             "state = reduce_night(datadir=sys.argv[1], nights='20261399', return_state=True)\n"
             "print(state.type.value)\nprint(state.message)\n")
    res = subprocess.run([sys.executable, "-c", probe, str(pristine_night)], env=env, capture_output=True, text=True,
                         timeout=300)
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "FAILED", res.stdout + res.stderr
    assert "night '20261399' is not a real date" in lines[-1]
    assert not (pristine_night / "catalog.sqlite").exists()
