from __future__ import annotations

import numpy as np
import pytest
import astropy.units as u
from astropy.coordinates import AltAz, EarthLocation, get_sun
from astropy.time import Time

from mascara import timeindex as ti

# SPEC §2 check value: a real La Silla frame.
JD_MID = 2459876.832331556
LST_MID_LOCAL = 5.440494253816728
LSTSEQ = 48510542


def test_constants():
    assert ti.EXPTIME == pytest.approx(6.3825, abs=1e-4)
    assert ti.SITES["LP"].lat == pytest.approx(28.7603)
    assert ti.SITES["LS"].lat == pytest.approx(-29.2567)
    assert 13500 * 6.4 == pytest.approx(86400.0)


def test_check_value_local_lst():
    lst = ti.lst_hours(JD_MID, ti.SITES["LS"].lon)
    assert abs(float(lst) - LST_MID_LOCAL) < 1e-6


def test_check_value_lstseq():
    jd_start = JD_MID - ti.EXPTIME / 2 / 86400
    assert int(ti.lstseq_from_jd(jd_start)) == LSTSEQ
    nxt = ti.lstseq_from_jd(jd_start + ti.EXPTIME / 86400)
    assert int(nxt) == LSTSEQ + 1


def test_vectorised_shapes():
    jd = JD_MID + np.arange(12).reshape(3, 4) / 1440
    assert ti.lst_hours(jd, 0.0).shape == (3, 4)
    seq = ti.lstseq_from_jd(jd)
    assert seq.shape == (3, 4) and seq.dtype == np.int64


def test_lst_agrees_with_astropy_greenwich_plus_longitude():
    jd = JD_MID + np.linspace(0, 1, 7)
    gast = Time(jd, format="jd", scale="utc").sidereal_time("apparent", "greenwich").hour
    want = (gast + ti.REF_LON / 15) % 24
    got = ti.lst_hours(jd, ti.REF_LON)
    d = (got - want + 12) % 24 - 12
    assert np.max(np.abs(d)) < 1e-5  # polar motion / TIO locator only


@pytest.mark.parametrize("site,night", [("LP", "20150202"), ("LS", "20221028")])
def test_round_trip_whole_night(site, night):
    seqs = ti.night_lstseqs(night, site)
    assert len(seqs) > 3000
    jd = ti.jd_start_of(seqs)
    tiny = 1e-8  # day, 0.9 ms
    np.testing.assert_array_equal(ti.lstseq_from_jd(jd), seqs)
    np.testing.assert_array_equal(ti.lstseq_from_jd(jd + tiny), seqs)
    np.testing.assert_array_equal(ti.lstseq_from_jd(jd - tiny), seqs - 1)
    # consecutive slots start one EXPTIME apart (apparent vs mean sidereal rate: < 1 ms)
    np.testing.assert_allclose(np.diff(jd) * 86400, ti.EXPTIME, atol=1e-3)


def test_lstidx_advances_one_per_exptime():
    s0 = ti.lstseq_from_jd(JD_MID)
    j0 = ti.jd_start_of(s0)
    k = np.arange(6000)
    jd = j0 + (k + 0.5) * ti.EXPTIME / 86400
    seq = ti.lstseq_from_jd(jd)
    np.testing.assert_array_equal(seq, s0 + k)
    idx = ti.lstidx_of(seq)
    step = np.diff(idx)
    # one per frame, wrapping at the end of the sidereal day
    assert np.all((step == 1) | ((step == 1 - ti.SLOTS_PER_DAY) & (idx[1:] == 0)))


def test_lstseq_split_and_batches():
    seq = np.arange(LSTSEQ - 20000, LSTSEQ + 20000)
    idx, day = ti.lstidx_of(seq), ti.lstday_of(seq)
    np.testing.assert_array_equal(ti.SLOTS_PER_DAY * day + idx, seq)
    assert idx.min() == 0 and idx.max() == 13499
    b = ti.batch_of(seq)
    np.testing.assert_array_equal(b % 270, idx // 50)
    np.testing.assert_array_equal(b, seq // 50)
    starts = seq[np.r_[True, np.diff(b) != 0]]
    assert np.all(ti.lstidx_of(starts[1:]) % 50 == 0)
    assert np.all(np.bincount(b - b.min())[1:-1] == 50)


def test_lstday_zero_near_epoch():
    # lstday counts from 2012-12-31 18:29 UT, where the reference LST is about 0 h
    seq = ti.lstseq_from_jd(ti.LSTDAY0_JD + 0.01)
    assert ti.lstday_of(seq) == 0


@pytest.mark.parametrize("site,night", [("LP", "20150202"), ("LS", "20221028"), ("LP", "20150621")])
def test_night_bounds_against_astropy_sun(site, night):
    s = ti.SITES[site]
    seqs = ti.night_lstseqs(night, s, sun_alt=-12.0)
    assert np.all(np.diff(seqs) == 1)
    loc = EarthLocation.from_geodetic(s.lon * u.deg, s.lat * u.deg, s.height * u.m)
    jd = ti.jd_start_of(np.array([seqs[0] - 1, seqs[0], seqs[-1], seqs[-1] + 1]))
    jd[-1] -= 2 / 86400  # slot start just after dawn, minus the 1 s search grid
    t = Time(jd, format="jd", scale="utc")
    alt = get_sun(t).transform_to(AltAz(obstime=t, location=loc)).alt.deg
    # first slot starts after dusk, the one before it before dusk; likewise at dawn
    assert alt[1] < -12.0 + 0.01 and alt[2] < -12.0 + 0.01
    assert alt[0] > -12.0 - 0.05 and alt[3] > -12.0 - 0.05
    # the evening is on the given UTC date (local noon to noon)
    iso = Time(jd[1], format="jd").datetime
    day = int(night[6:])
    assert iso.day == day or (iso.day == day + 1 and iso.hour < 12)
    hours = len(seqs) * ti.EXPTIME / 3600
    assert 5 < hours < 13


def test_night_winter_longer_than_summer_at_la_palma():
    winter = ti.night_lstseqs("20151221", "LP")
    summer = ti.night_lstseqs("20150621", "LP")
    assert len(winter) > len(summer) + 1000


def test_unknown_site():
    with pytest.raises(ValueError, match="unknown site"):
        ti.night_lstseqs("20150202", "XX")
