from __future__ import annotations

import numpy as np
import pytest
import astropy.units as u
from astropy.coordinates import AltAz, EarthLocation, SkyCoord, angular_separation
from astropy.time import Time

from mascara import sky
from mascara.stars import PIXEL_ARCSEC, default_catalogue
from mascara.timeindex import SITES, lst_hours

JD0 = 2457055.90  # 2015-02-03 09:36 UT: night at La Silla, dawn-ish at La Palma (sky is sky)


def sep_px(alt1, az1, alt2, az2):
    s = angular_separation(*np.radians([az1, alt1, az2, alt2]))
    return np.degrees(s) * 3600 / PIXEL_ARCSEC


@pytest.fixture(scope="module")
def bright():
    return default_catalogue().brighter_than(6.5)


@pytest.mark.parametrize("site", ["LP", "LS"])
def test_apparent_places_match_astropy_over_batch(bright, site):
    # stars above 20 deg at the batch middle, about 2000 of them
    mid = JD0 + 150 / 86400
    alt_mid, _ = sky.altaz_astropy(bright.ra, bright.dec, site, mid)
    sel = np.flatnonzero(alt_mid > 20)[:2000]
    assert len(sel) > 1000
    ra, dec = bright.ra[sel], bright.dec[sel]
    ap = sky.ApparentPlaces(ra, dec, site, mid)
    for dt in (0.0, 150.0, 300.0):  # batch start, middle, end
        jd = JD0 + dt / 86400
        alt, az = ap.altaz(jd)
        ref_alt, ref_az = sky.altaz_astropy(ra, dec, site, jd)
        m = ref_alt > 20
        assert np.max(sep_px(alt[m], az[m], ref_alt[m], ref_az[m])) < 0.05


def test_altaz_astropy_refraction_and_conventions():
    s = SITES["LP"]
    jd = JD0
    loc = EarthLocation.from_geodetic(s.lon * u.deg, s.lat * u.deg, s.height * u.m)
    t = Time(jd, format="jd", scale="utc")
    # a point at the zenith and one 20 deg above the eastern horizon (no refraction)
    pts = SkyCoord(alt=[89.9, 20.0] * u.deg, az=[0.0, 90.0] * u.deg,
                   frame=AltAz(obstime=t, location=loc)).icrs
    alt, az = sky.altaz_astropy(pts.ra.deg, pts.dec.deg, s, jd)
    # refraction lifts: ~ 0.06 deg at 20 deg altitude for 770 hPa, ~0 at the zenith
    assert alt[0] - 89.9 == pytest.approx(0.0, abs=1e-3)
    assert 0.03 < alt[1] - 20.0 < 0.06
    assert az[1] == pytest.approx(90.0, abs=0.01)  # east = 90


def test_meridian_transit_hour_angle():
    # a star at RA = local apparent sidereal time is on the meridian (az 0 or 180)
    s = SITES["LS"]
    lst = float(lst_hours(JD0, s.lon))
    ra = np.array([lst * 15.0, lst * 15.0])
    dec = np.array([-60.0, 10.0])
    ap = sky.ApparentPlaces(ra, dec, s, JD0)
    alt, az = ap.altaz(JD0)
    # ICRS vs apparent RA differ by precession since J2000 (~0.2 deg); allow it
    # at latitude -29: dec -60 transits south of the zenith, dec +10 north of it
    assert az[0] == pytest.approx(180.0, abs=1.0)
    assert min(az[1], 360.0 - az[1]) < 1.0
    assert alt[0] == pytest.approx(90 - abs(-60 - s.lat), abs=0.3)


def test_below_horizon_geometric():
    s = SITES["LP"]
    loc = EarthLocation.from_geodetic(s.lon * u.deg, s.lat * u.deg, s.height * u.m)
    t = Time(JD0, format="jd", scale="utc")
    c = SkyCoord(alt=[-30.0, 45.0] * u.deg, az=[200.0, 100.0] * u.deg,
                 frame=AltAz(obstime=t, location=loc)).icrs
    ap = sky.ApparentPlaces(c.ra.deg, c.dec.deg, s, JD0)
    alt, az = ap.altaz(JD0)
    assert alt[0] == pytest.approx(-30.0, abs=0.01)  # no refraction below the horizon
    assert alt[1] > 45.0 and az[0] == pytest.approx(200.0, abs=0.01)


def test_rotation_is_sidereal():
    # one sidereal day later the same stars are at the same place (to precession)
    cat = default_catalogue().brighter_than(3.0)
    ap = sky.ApparentPlaces(cat.ra, cat.dec, "LS", JD0)
    a1, z1 = ap.altaz(JD0)
    a2, z2 = ap.altaz(JD0 + 1 / 1.00273781191135448)
    assert np.max(sep_px(a1, z1, a2, z2)) < 1e-4  # float64 JD resolution: 40 us
