from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from photutils.background import Background2D
from photutils.centroids import centroid_2dg, centroid_sources

from mascara.rawio import REQUIRED_KEYWORDS, calibrate, master_calibration, parse_night_dir, read_frame
from mascara.simulate import load_truth


def _good_frames(night):
    bad = set(night["bad_frames"])
    return sorted(p for p in (night["night_dir"] / "raw").glob("*LPE.fits") if int(p.name[:8]) not in bad)


def test_frames_have_every_spec_keyword_and_layout(small_night):
    frames = _good_frames(small_night)
    assert len(frames) == 12 - 3
    with fits.open(frames[0]) as hdul:
        h = hdul[0].header
        for key in REQUIRED_KEYWORDS + ("AVERSION",):
            assert key in h, key
        assert h["BITPIX"] == 16 and h["BZERO"] == 32768
        assert h["IMAGETYP"] == "science"
        assert hdul[0].data.shape == (h["YSIZE"] + 48, h["XSIZE"] + 64)
        assert int(frames[0].name[:8]) == h["LSTSEQ"] and h["LSTIDX"] == h["LSTSEQ"] % 13500
        assert h["JD"] > 2460000 and 0 <= h["LST"] < 24
    raw = small_night["night_dir"] / "raw"
    assert len(list(raw.glob("calib_bias*.fits"))) == 3
    assert len(list(raw.glob("calib_dark*.fits"))) == 5


def test_consecutive_frames_are_consecutive_slots(small_night):
    truth = load_truth(small_night["truth"])
    seqs = truth["lstseqs"]
    assert np.all(np.diff(seqs) == 1)


def test_stars_are_where_the_truth_file_says(small_night):
    night = parse_night_dir(small_night["night_dir"])
    truth = load_truth(small_night["truth"])
    master = master_calibration(night)
    path = _good_frames(small_night)[len(_good_frames(small_night)) // 2]
    frame = read_frame(path)
    image, raw = calibrate(frame, master)
    rows = truth["truth"][truth["truth"]["lstseq"] == frame.lstseq]
    vmag = truth["stars"]["vmag"][rows["star"]]
    # bright, unsaturated, isolated (no other rendered star within 12 px), away from the edges
    d = np.hypot(rows["x"][:, None] - rows["x"][None, :], rows["y"][:, None] - rows["y"][None, :])
    np.fill_diagonal(d, np.inf)
    ny, nx = image.shape
    sel = (
        (vmag < 7.5) & (vmag > 4.5) & (d.min(axis=1) > 12)
        & (rows["x"] > 15) & (rows["x"] < nx - 15) & (rows["y"] > 15) & (rows["y"] < ny - 15)
    )
    assert sel.sum() >= 10
    bkg = Background2D(image, 32, filter_size=3).background  # the sky has a gradient
    xc, yc = centroid_sources(image - bkg, rows["x"][sel], rows["y"][sel], box_size=7, centroid_func=centroid_2dg)
    err = np.hypot(xc - rows["x"][sel], yc - rows["y"][sel])
    assert np.median(err) < 0.1
    assert np.all(err < 0.2), err.max()


def test_truth_flux_grows_with_aperture_and_matches_total(small_night):
    t = load_truth(small_night["truth"])["truth"]
    assert np.all(t["flux_2.5"] < t["flux_4.5"])
    assert np.all(t["flux_4.5"] <= t["flux_5.5"])
    # the 5.5 px aperture holds almost all the light of a ~1 px PSF
    inner = (t["x"] > 10) & (t["y"] > 10)
    assert np.median(t["flux_5.5"][inner] / t["flux"][inner]) == pytest.approx(1.0, abs=0.01)
