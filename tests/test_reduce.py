"""Acceptance of the reduction core on simulated nights (issue 6).

A small camera-night with passing clouds, pointing drift, a camera 0.5 deg off
nominal and broken frames is reduced once per session; the tests compare the
night files with the simulator's truth.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from mascara.lcformat import CALIBRATION_ATTRS, GLOBAL_ATTRS
from mascara.lightcurves import read_batch_file
from mascara.reduce import move_outputs_aside, plan_camera_night, reduce_camera_night
from mascara.rawio import parse_night_dir
from mascara.simulate import SimConfig, join_with_truth, load_truth, simulate_night

FAST_FIELDS = ("flag", "flux0", "eflux0", "flux1", "eflux1", "sky", "esky", "peak",
               "x", "y", "alt", "az", "ccdtemp", "exptime", "jdmid", "lst", "lstidx", "lstseq")
HEADER_FIELDS = ("jdstart", "ra", "dec", "vmag", "bmag", "spectype", "blend", "blendvalue", "nobs")


def _raw_digest(raw: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(raw.iterdir())}


@pytest.fixture(scope="module", params=["small", pytest.param("full", marks=pytest.mark.slow)])
def reduced(request, tmp_path_factory):
    """A cloudy, drifting night of a camera 0.5 deg off nominal, with broken frames, reduced once."""
    size = request.param
    datadir = tmp_path_factory.mktemp(f"reduce-{size}")
    cfg = SimConfig(site="LP", camera="E", size=size, nframes=110 if size == "small" else 60, seed=11,
                    clouds=True, pointing_offset=0.5, bad_frames=3, drift_px=5.0)
    sim = simulate_night(datadir, "20260301", cfg)
    night_dir = Path(sim["night_dir"])
    before = _raw_digest(night_dir / "raw")
    result = reduce_camera_night(night_dir)
    return {"sim": sim, "night_dir": night_dir, "result": result, "raw_before": before,
            "truth": load_truth(sim["truth"])}


def _joined(reduced, kind="fLC") -> pd.DataFrame:
    return join_with_truth(reduced["result"].products[kind], reduced["truth"])


def test_night_files_exist_and_raw_is_untouched(reduced):
    res = reduced["result"]
    nid = "20260301LPE"
    assert Path(res.products["fLC"]).name == f"fLC_{nid}.hdf5"
    assert Path(res.products["sLC"]).name == f"sLC_{nid}.hdf5"
    assert _raw_digest(reduced["night_dir"] / "raw") == reduced["raw_before"]


def test_batch_star_tables_hold_each_measured_star_once_in_id_order(reduced):
    """A batch file's star table: every star of its fast and slow rows, once, sorted by id, with the
    catalogue's values (the reduction builds it from catalogue indices, not from the id strings)."""
    from mascara.reduce import load_stars
    from mascara.settings import Settings

    stars = load_stars(Settings())
    checked = 0
    for b in reduced["result"].batches:
        pieces = read_batch_file(b.path)
        ids = pieces.stars["ascc"]
        np.testing.assert_array_equal(ids, np.unique(np.concatenate([pieces.fast["ascc"], pieces.slow["ascc"]])))
        at = stars.index_of(ids)
        assert np.all(at >= 0)
        np.testing.assert_array_equal(pieces.stars["ra"], stars.ra[at])
        np.testing.assert_array_equal(pieces.stars["vmag"], stars.vmag[at])
        checked += len(ids) > 0
    assert checked >= 2


def test_bad_frames_rejected_with_reasons(reduced):
    rejected = {seq: reason for seq, _, reason in reduced["result"].rejected}
    bad = reduced["truth"]["bad_frames"]
    assert set(rejected) == set(bad)
    with h5py.File(reduced["result"].products["fLC"], "r") as f:
        seqs = np.unique(np.concatenate([f["data"][k]["lstseq"] for k in f["data"]]))
    assert not set(bad) & set(int(s) for s in seqs)
    assert len(seqs) == len(reduced["truth"]["lstseqs"]) - len(bad)


def test_tutorial_h5py_session_works_verbatim(reduced):
    myfile = h5py.File(reduced["result"].products["fLC"], "r")
    assert sorted(myfile.keys()) == ["data", "global", "header", "header_table"]
    # the SPEC attributes and the calibration applied (extra attributes are harmless to the tutorial's reader)
    assert set(myfile["global"].attrs.keys()) == set(GLOBAL_ATTRS) | set(CALIBRATION_ATTRS)
    assert myfile["global"].attrs["CALIBRATION"] == "dark" and "master dark" in myfile["global"].attrs["CALNOTE"]
    assert myfile["global"].attrs.get("CAMERA") == "E"
    assert myfile["global"].attrs.get("APER0") == 2.5
    mystar = sorted(myfile["data"].keys())[0]
    mydata = np.copy(myfile["data"][mystar])
    assert mydata.dtype.names == FAST_FIELDS
    assert np.isfinite(mydata["flux0"].mean()) or np.all(mydata["flag"] > 0)
    hdr = myfile["header"][mystar]
    assert hdr.dtype.names == HEADER_FIELDS
    assert np.all(np.diff(mydata["lstseq"].astype(int)) > 0)
    ht = myfile["header_table"]
    for i, a in enumerate(ht["ascc"][...]):
        a = a.decode() if isinstance(a, bytes) else str(a)
        assert ht["nobs"][i] == len(myfile["data"][a])
    myfile.close()


def test_positions_within_a_tenth_of_a_pixel(reduced):
    rows = _joined(reduced)
    good = rows[rows["flag"] == 0]
    assert len(good) > 1000
    rms = np.sqrt(np.mean((good["x"] - good["x_true"]) ** 2 + (good["y"] - good["y_true"]) ** 2))
    assert rms < 0.1, rms


@pytest.mark.parametrize("aperture, radius", [(0, "2.5"), (1, "4.5")])
def test_flux_errors_are_honest(reduced, aperture, radius):
    rows = _joined(reduced)
    ok = rows[(rows["flag"] == 0) & rows["isolated_true"] & (rows[f"eflux{aperture}"] > 0)]
    z = (ok[f"flux{aperture}"] - ok[f"flux_{radius}_true"]) / ok[f"eflux{aperture}"]
    assert len(z) > 500
    std = float(np.std(z))
    assert 0.9 <= std <= 1.1, (std, float(np.median(z)))


@pytest.fixture(scope="module")
def clear_night(tmp_path_factory):
    """A clear small night of six batches, for the binned-photometry precision."""
    datadir = tmp_path_factory.mktemp("clear")
    sim = simulate_night(datadir, "20260302", SimConfig(site="LP", camera="E", size="small", nframes=300, seed=12))
    result = reduce_camera_night(Path(sim["night_dir"]))
    return {"result": result, "truth": load_truth(sim["truth"])}


def test_binned_photometry_beats_per_frame_scatter(clear_night):
    """Relative scatter about the truth: per frame vs per binned batch, constant bright stars."""
    truth = clear_night["truth"]
    t = truth["truth"]
    ids = truth["stars"]["ascc"][t["star"]]
    true_flux = {(a, int(s)): f for a, s, f in zip(ids, t["lstseq"], t["flux_2.5"])}
    ratios = []
    with h5py.File(clear_night["result"].products["fLC"], "r") as f, \
            h5py.File(clear_night["result"].products["sLC"], "r") as s:
        for star in s["data"]:
            sd = s["data"][star][...]
            if star not in f["data"]:
                continue
            fd = f["data"][star][...]
            vmag = f["header"][star]["vmag"][0]
            if not (5.0 < vmag < 7.0) or np.any(fd["flag"] > 0) or np.any(sd["flag"] > 0):
                continue
            batches = fd["lstseq"] // 50
            whole = [b for b in np.unique(batches) if np.sum(batches == b) >= 45]
            if len(whole) < 4:
                continue
            tf = np.array([true_flux[(star, int(q))] for q in fd["lstseq"]])
            per_frame = np.std(fd["flux0"] / tf - 1.0)
            binned = []
            for b in whole:
                row = sd[sd["lstseq"] // 50 == b]
                if len(row) == 1:
                    binned.append(row["flux0"][0] / tf[batches == b].mean())
            if len(binned) >= 4:
                ratios.append(per_frame / np.std(binned))
    assert len(ratios) >= 5, len(ratios)
    assert np.median(ratios) >= 5, np.median(ratios)


def test_move_outputs_aside_keeps_raw(tmp_path, small_night):
    night = parse_night_dir(small_night["night_dir"])
    fake = tmp_path / night.path.name
    (fake / "raw").mkdir(parents=True)
    (fake / "raw" / "x.fits").write_bytes(b"abc")
    (fake / "lightcurves").mkdir()
    (fake / "lightcurves" / "fLC.hdf5").write_bytes(b"1")
    moved = move_outputs_aside(parse_night_dir(fake))
    assert moved == [(str(fake / "lightcurves"), str(fake / "lightcurves_old"))]
    assert (fake / "lightcurves_old" / "fLC.hdf5").exists() and (fake / "raw" / "x.fits").read_bytes() == b"abc"
    moved = move_outputs_aside(parse_night_dir(fake), erase=True)
    assert not (fake / "lightcurves_old").exists() and (fake / "raw" / "x.fits").exists()


@pytest.fixture()
def night_copy(small_night, tmp_path):
    """A private copy of the small night's raw data (tests here write outputs beside it)."""
    import shutil

    dst = tmp_path / small_night["night_dir"].name
    shutil.copytree(small_night["night_dir"] / "raw", dst / "raw")
    return dst


def test_failed_astrometry_falls_back_on_the_night_solution_and_flags_the_batch(night_copy):
    from mascara.settings import Settings

    # no batch can find 10^6 astrometric stars: every batch keeps the night solution, flagged
    res = reduce_camera_night(night_copy, Settings(astro_min_stars=10**6), split_in_background=False)
    assert res.batches and all(b.flagged for b in res.batches)
    night_model = json.loads((night_copy / "astrometry" / "camera_solution.json").read_text())["model"]
    assert all(b.model == night_model for b in res.batches)
    assert Path(res.products["fLC"]).exists()


def test_camera_solution_is_reused_by_later_nights(night_copy):
    from mascara.reduce import prepare_camera_night

    first = prepare_camera_night(plan_camera_night(night_copy))
    assert first.solution_start == "nominal"
    from mascara.simulate import SimConfig, simulate_night

    # the next night, simulated (a copy of this night's frames under the next date is refused by the intake:
    # their lstseqs are not slots of that night)
    later = Path(simulate_night(night_copy.parent, "20260302",
                                SimConfig(site="LP", camera="E", size="small", nframes=12, seed=5))["night_dir"])
    assert later.name == "20260302LPE"
    second = prepare_camera_night(plan_camera_night(later))
    assert second.solution_start == f"solution of {night_copy.name}"
    a, b = first.camera_model(), second.camera_model()
    assert abs(a.alt0 - b.alt0) < 0.01 and abs(a.az0 - b.az0) < 0.01


def test_moon_mask_matches_astropy_separation():
    from astropy.coordinates import get_body
    from astropy.time import Time

    from mascara.reduce import moon_mask
    from mascara.sky import moon_altaz
    from mascara.timeindex import SITES, offline_iers

    jd = 2461101.35  # 2026-03-01 20:24 UTC: the Moon is 36 deg up at La Palma
    malt, maz = moon_altaz("LP", jd)
    assert malt > 30
    alt = malt + np.array([0.0, 5.0, 9.0, 11.0, 30.0])
    az = np.full(5, maz)
    assert moon_mask(alt, az, SITES["LP"], jd, 10.0).tolist() == [True, True, True, False, False]
    # the Moon below the horizon flags nothing
    assert not moon_mask(alt, az, SITES["LP"], 2461101.0, 90.0).any()
    with offline_iers():
        t = Time(jd, format="jd")
        from mascara.sky import _altaz_frame

        frame = _altaz_frame(SITES["LP"], jd)
        moon = get_body("moon", t, location=frame.location).transform_to(frame)
    assert abs(moon.alt.deg - malt) < 1e-6 and abs(moon.az.deg - maz) < 1e-6


def test_a_batch_without_a_readable_frame_is_finished_empty(tmp_path):
    sim = simulate_night(tmp_path, "20260301", SimConfig(site="LP", camera="E", size="small", nframes=60, seed=7))
    night_copy = Path(sim["night_dir"])
    plan = plan_camera_night(night_copy)
    assert len(plan.batches) >= 2
    dead = min(plan.batches, key=lambda b: len(plan.batches[b]))
    for f in plan.batches[dead]:  # a night of this test's own: break every frame of one batch
        f.path.write_bytes(b"not a FITS file")
    res = reduce_camera_night(night_copy, split_in_background=False)
    outcome = next(b for b in res.batches if b.batch == dead)
    assert outcome.nframes == 0 and outcome.flagged
    assert {r[0] for r in outcome.rejected} == {f.lstseq for f in plan.batches[dead]}
    assert all("unreadable" in r[2] for r in outcome.rejected)
    assert Path(outcome.path).exists()
    with h5py.File(res.products["fLC"], "r") as f:
        seqs = {int(s) for k in f["data"] for s in f["data"][k]["lstseq"]}
    assert seqs and not seqs & {f.lstseq for f in plan.batches[dead]}


@pytest.fixture(scope="module")
def moffat_night(tmp_path_factory):
    """A small night with the field-dependent Moffat PSF (issue 11), two full batches and a partial one."""
    datadir = tmp_path_factory.mktemp("moffat")
    sim = simulate_night(datadir, "20260303", SimConfig(site="LP", camera="E", size="small", nframes=120, seed=13,
                                                        psf="moffat", pointing_offset=0.5))
    result = reduce_camera_night(Path(sim["night_dir"]))
    return {"result": result, "truth": load_truth(sim["truth"])}


def test_binned_small_aperture_keeps_the_light(moffat_night):
    """The 2.5 px binned flux of a full batch equals the mean per-frame flux within 1 % (bilinear shifts lost 2.5 %)."""
    res = moffat_night["result"]
    ratios = []
    with h5py.File(res.products["fLC"], "r") as f, h5py.File(res.products["sLC"], "r") as s:
        for star in s["data"]:
            if star not in f["data"] or not 6.0 <= f["header"][star]["vmag"][0] <= 8.4:
                continue
            fd, sd = f["data"][star][...], s["data"][star][...]
            for point in sd[sd["flag"] == 0]:
                m = fd["lstseq"] // 50 == point["lstseq"] // 50
                if m.sum() >= 45 and not np.any(fd["flag"][m]):
                    ratios.append(point["flux0"] / fd["flux0"][m].mean())
    assert len(ratios) >= 50, len(ratios)
    assert 0.99 <= np.median(ratios) <= 1.01, np.median(ratios)


def test_binned_time_is_the_mean_of_the_frames_it_contains(moffat_night):
    """jdmid/lst of an sLC point: mean over the accepted frames of its batch; lstseq: a frame of the batch."""
    res = moffat_night["result"]
    frames: dict[int, dict[int, tuple[float, float]]] = {}
    points = {}
    with h5py.File(res.products["fLC"], "r") as f, h5py.File(res.products["sLC"], "r") as s:
        for star in f["data"]:
            for row in f["data"][star][...]:
                frames.setdefault(int(row["lstseq"]) // 50, {})[int(row["lstseq"])] = (row["jdmid"], row["lst"])
        for star in list(s["data"])[:50]:
            for row in s["data"][star][...]:
                points[int(row["lstseq"]) // 50] = row
    accepted = {b.batch: {a[0] for a in b.accepted} for b in res.batches}
    partial = 0
    for batch, row in points.items():
        assert set(frames[batch]) == accepted[batch]
        jd = np.mean([v[0] for v in frames[batch].values()])
        lst = np.mean([v[1] for v in frames[batch].values()])
        assert abs(row["jdmid"] - jd) < 1e-7  # 0.01 s
        assert abs(row["lst"] - lst) < 1e-5
        partial += len(accepted[batch]) < 45
    assert partial >= 1 and len(points) >= 3


def test_binned_pixel_phase_model_is_fitted_and_recorded(moffat_night):
    """Every full batch of the Moffat night records a pixel-phase model of the 2.5 px aperture fitted
    on its per-frame photometry: more light on a pixel centre (c1, c2 > 0 at the image centre), the
    same within errors from batch to batch (the PSF does not change through the night)."""
    res = moffat_night["result"]
    centre = []
    for b in res.batches:
        if b.nframes < 45:
            continue
        model = read_batch_file(b.path).attrs["pixel_phase"]["flux0"]
        assert model["npoints"] >= 5000, model["npoints"]
        coef, err = np.array(model["coef"]), np.array(model["error"])
        assert np.all(coef[0, :2] > 2 * err[0, :2]), (coef[0], err[0])
        centre.append((coef[0, :2], err[0, :2]))
    assert len(centre) >= 2
    c = np.array([v for v, _ in centre])
    e = np.array([v for _, v in centre])
    assert np.all(np.abs(c - c.mean(axis=0)) < 4 * e + 2e-4), (c, e)
    assert np.all(c.mean(axis=0) > 4 * np.sqrt(np.mean(e**2, axis=0) / len(c))), (c, e)


def test_batches_in_threads_equal_a_serial_reduction(tmp_path):
    """Two batches at once in threads (the kernels release the GIL) give the serial run's files, bit for bit."""
    import shutil

    res = simulate_night(tmp_path / "sim", "20260301", SimConfig(size="small", nframes=110, seed=3))
    src = Path(res["night_dir"])

    def reduce_with(workers: int) -> tuple[Path, list]:
        night = tmp_path / f"w{workers}" / src.name
        shutil.copytree(src / "raw", night / "raw")
        seen = []
        out = reduce_camera_night(night, workers=workers, split_in_background=False,
                                  on_batch=lambda o: seen.append(o.batch))
        assert len(out.batches) >= 3
        return night, seen

    serial, order1 = reduce_with(1)
    threaded, order2 = reduce_with(2)
    assert order1 == order2 == sorted(order1)  # outcomes handed over in batch order
    for kind in ("fLC", "sLC"):
        with h5py.File(serial / "lightcurves" / f"{kind}_{serial.name}.hdf5") as a, \
                h5py.File(threaded / "lightcurves" / f"{kind}_{threaded.name}.hdf5") as b:
            names = []
            a.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
            assert names
            for n in names:
                assert a[n][()].tobytes() == b[n][()].tobytes(), (kind, n)


def test_batch_workspaces_are_as_many_as_batches_ever_ran_at_once():
    """Workspaces (frame buffers, stacker) go back to a pool: threads that never overlap share one."""
    import threading

    from mascara import reduce as R

    R._FREE_WORKSPACES.clear()
    seen = []

    def one():
        with R._batch_workspace() as ws:
            seen.append(ws)

    for _ in range(3):  # three threads one after the other, as a thread pool larger than the batches runs them
        t = threading.Thread(target=one)
        t.start()
        t.join()
    assert len({id(w) for w in seen}) == 1 and len(R._FREE_WORKSPACES) == 1
    inside, release = threading.Event(), threading.Event()

    def held():
        with R._batch_workspace() as ws:
            seen.append(ws)
            inside.set()
            release.wait(10)

    t = threading.Thread(target=held)
    t.start()
    inside.wait(10)
    with R._batch_workspace() as mine:  # while another batch holds one: a second workspace
        assert mine is not seen[-1]
    release.set()
    t.join()
    assert len(R._FREE_WORKSPACES) == 2
    try:
        with R._batch_workspace():
            raise RuntimeError("a batch that fails")
    except RuntimeError:
        pass
    assert len(R._FREE_WORKSPACES) == 2  # given back all the same


def test_the_star_cache_follows_the_settings_and_the_file(tmp_path):
    """One process reducing nights under different settings (a Prefect worker, a backfill, the test
    suite) gets each night's own stars: the cut and the catalogue file are part of the cache key."""
    import os

    from mascara.reduce import load_stars
    from mascara.settings import Settings
    from mascara.stars import default_catalogue

    full = load_stars(Settings())
    cut = load_stars(Settings(vmag_slow=7.0, vmag_fast=6.0))
    assert len(cut) < len(full) and cut.vmag.max() <= 7.0
    assert len(load_stars(Settings())) == len(full)  # before the fix: the cut catalogue again

    path = tmp_path / "stars.npz"
    default_catalogue().brighter_than(9.0).save(path)
    assert load_stars(Settings(catalogue=str(path))).vmag.max() <= 9.0
    default_catalogue().brighter_than(8.0).save(path)  # the file replaced on disk
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert load_stars(Settings(catalogue=str(path))).vmag.max() <= 8.0


def test_the_master_level_is_read_once_per_file_and_again_when_the_file_is_replaced(tmp_path):
    """Every batch asks for its night's master; it was read from ``work/`` (44 MB) at every call."""
    import os

    from mascara.reduce import _master_level

    path = tmp_path / "master_dark.npy"
    np.save(path, np.full((4, 5), 3.0, np.float32))
    first = _master_level(path)
    assert _master_level(path) is first  # the same array, not a new read
    assert not first.flags.writeable  # shared by the batches: nobody may change it
    with pytest.raises(ValueError):
        first[0, 0] = 1.0
    tmp = tmp_path / "master_dark.new.npy"  # a new master is written under another name and renamed
    np.save(tmp, np.full((4, 5), 7.0, np.float32))
    os.replace(tmp, path)
    again = _master_level(path)
    assert again is not first and float(again[0, 0]) == 7.0


@pytest.mark.parametrize("shift", [0.0, 1e-4])
def test_the_initial_solution_does_not_hang_on_a_tenth_of_a_millipixel(tmp_path, monkeypatch, shift):
    """Every centroid moved 1e-4 px towards its prediction (what a centroid that stops iterating a step
    earlier does) once sent the final fit of the night's first solution from rms 0.022 px to 4.6 px: the
    model with its high distortion terms dropped put one corner star 3,572 px from its centroid."""
    import mascara.astrometry as astrometry
    from mascara.reduce import prepare_camera_night

    measured = astrometry.measure_centroids

    def nudged(image, x, y, *args, **kwargs):
        xc, yc, ok = measured(image, x, y, *args, **kwargs)
        dx, dy = np.asarray(x, float) - xc, np.asarray(y, float) - yc
        d = np.hypot(dx, dy)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(d > 0, xc + shift * dx / d, xc), np.where(d > 0, yc + shift * dy / d, yc), ok

    monkeypatch.setattr(astrometry, "measure_centroids", nudged)
    sim = simulate_night(tmp_path, "20260302", SimConfig(site="LP", camera="E", size="small", nframes=60, seed=12))
    info = prepare_camera_night(plan_camera_night(Path(sim["night_dir"]))).solution_info
    assert info["rms"] < 0.05 and info["nmatched"] >= 80, info
