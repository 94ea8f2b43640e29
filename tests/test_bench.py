"""Smoke test of the benchmark script (issue 5): ``bench/run.py --quick`` end to end.

No speed is asserted (timings are measured and reported, not tested); the test
checks that the run completes, reports every stage, and that the product's
photometry agrees with the independent photutils implementation it runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("read", "positions", "astrometry", "photometry", "binning",
          "binned_astrometry", "binned_photometry", "write", "split (beside)", "combine (night end)")


@pytest.mark.slow
def test_quick_bench_reports_every_stage(tmp_path):
    report = tmp_path / "perf.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(tmp_path / "out"),
         "--report", str(report)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = report.read_text()
    for heading in ("## Machine and command", "## Targets", "## 1. Reduction", "## 2. photutils",
                    "## 3. Night scale"):
        assert heading in text
    for stage in STAGES:
        assert f"| {stage} |" in text, stage
    assert "prepare_camera_night" in text and "Read one star back" in text

    res = json.loads((tmp_path / "out" / "results.json").read_text())
    red = res["results"]["reduce"]
    assert red["batches"] and all(b["nframes"] > 0 for b in red["batches"])
    assert red["rss_peak"] > 0
    # every stage the reduction times is in the per-frame table, with a positive CPU time
    per = res["summary"]["per_frame"]
    assert set(STAGES) <= set(per) and per["photometry"] > 0
    # the fullest batch was reduced 3 times; each stage of the table is the median of the passes
    full = max(red["batches"], key=lambda b: b["nframes"])
    assert len(full["passes"]) == 3 and full["passes"][0]["timings"] == full["timings"]
    for stage in ("read", "photometry", "binning"):
        assert per[stage] == pytest.approx(sorted(p["timings"][stage] for p in full["passes"])[1] / full["nframes"])
    # the independent photutils pipeline sees the same stars and nearly the same fluxes:
    # identical for most stars, at most a fraction of the flux error otherwise
    pu = res["results"]["photutils"]
    assert pu["rel"]["flux0"]["n"] > 50
    assert pu["rel"]["flux0"]["median"] < 1e-9
    assert pu["sigma"]["flux0"] < 0.5 and pu["sigma"]["flux1"] < 0.5
    assert pu["pipeline_sigma_max"] < 0.1  # float32 positions: up to 0.04 eflux seen on the brightest stars
    night = res["results"]["night"]
    assert night["combine"]["nstars_fast"] > 0 and night["read"]["n"] > 0
    # whole-process runs: each run's wall time split into phases by its catalog's timestamps
    assert "Where the wall time of the" in text
    for run in res["results"]["process"]["runs"]:
        ph = run["phases"]
        assert list(ph) == ["start", "prepare", "batches", "combine", "exit"], run["driver"]
        # each phase a part of the run (catalog times read in the wrong time zone would be hours off)
        assert all(-0.05 < v < run["wall"] for v in ph.values()), (run["driver"], ph, run["wall"])
        assert min(ph["start"], ph["prepare"], ph["batches"], ph["exit"]) > 0, (run["driver"], ph)
        # what came from the disk: never negative, never more than the process could have read in its time
        assert 0 <= run["disk_read_mb"] < 4000 and run["major_faults"] >= 0, run
        # each timed run had its frames read just before it (so that no run pays for another's evictions)
        assert run["read_ahead_seconds"] >= 0, run
    assert "Read from the disk rather than the page cache, per run" in text
    # each timed run knows its round (the flows' runs are paired with the library's of the same round:
    # test_paired_ratios_pair_each_flow_run_with_the_library_run_of_its_round; --quick runs the library alone)
    pr = res["results"]["process"]
    assert sorted({run["round"] for run in pr["runs"]}) == list(range(pr["repeat"]))
    assert "each run's frames again just before it" in text


@pytest.mark.slow
def test_kernel_bench_runs_on_the_quick_night_and_compares_tables(tmp_path):
    """``bench/kernels.py`` on a small night: both figures, and a table compared with itself is equal."""
    from mascara.simulate import SimConfig, simulate_night

    res = simulate_night(tmp_path / "data", "20260301", SimConfig(size="small", nframes=60, seed=2))
    saved = tmp_path / "tables.npy"
    out = []
    for extra in (["--save", str(saved)], ["--compare", str(saved), "--no-batch"]):
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "kernels.py"), "--night-dir", res["night_dir"],
                               "--frames", "3", "--repeat", "1", *extra],
                              capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out.append(json.loads(proc.stdout))
    stages = out[0]["reduce_batch_ms_per_frame"]
    assert stages["total"][0] > 0 and {"read", "photometry", "binning"} <= set(stages)
    assert out[1]["measure_apertures_ms_per_frame"][0] > 0 and out[1]["stars_per_frame"] > 10
    assert out[1]["compared"]["rows"] > 30 and out[1]["compared"]["fields_differing"] == {}


def test_paired_ratios_pair_each_flow_run_with_the_library_run_of_its_round():
    """A machine that slows down between rounds moves both runs of a round alike: the pairs see the
    flow's 2 % while the ratio of the minima sees the slow round's library run against a fast one."""
    sys.path.insert(0, str(ROOT / "bench"))
    from process import paired_ratios
    from run import prefect_within

    runs = []
    for r, speed in enumerate((1.0, 1.3, 1.0)):  # the second round on a machine 30 % slower
        runs.append({"driver": "library", "frames": 564, "round": r, "wall": 50.0 * speed, "cpu": 80.0 * speed})
        runs.append({"driver": "prefect", "frames": 564, "round": r, "wall": 51.0 * speed, "cpu": 82.0 * speed})
        runs.append({"driver": "library", "frames": 114, "round": r, "wall": 20.0, "cpu": 30.0})
    runs.append({"driver": "prefect", "frames": 564, "wall": 99.0, "cpu": 99.0})  # no round: not paired
    po = paired_ratios(runs, "prefect", 564)
    assert po["wall_paired"] == pytest.approx([0.02, 0.02, 0.02])
    assert po["wall_paired_median"] == pytest.approx(0.02)
    assert po["cpu_paired_median"] == pytest.approx(0.025)
    # the verdict takes the pairs and the medians; without pairs (older results) medians and minima
    assert prefect_within({**po, "wall_median": 0.02, "wall_min": 0.09})
    assert not prefect_within({**po, "wall_median": 0.06, "wall_min": 0.0})
    assert not prefect_within({"wall_median": 0.02, "wall_min": 0.09})
    assert not prefect_within({**paired_ratios(
        [{**x, "wall": x["wall"] * (1.08 if x["driver"] == "prefect" else 1.0)} for x in runs], "prefect", 564),
        "wall_median": 0.0, "wall_min": 0.0})
