"""Tests of mascara.camera: projection geometry, distortion, round trips, serialisation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.coordinates import AltAz, SkyCoord
import astropy.units as u

from mascara.camera import (
    NOMINAL_SCALE,
    CameraModel,
    monomials,
    nominal_camera,
    radial_distortion,
    term_powers,
)


def distorted(model: CameraModel, seed: int = 0) -> CameraModel:
    """A copy with a realistic lens distortion: radial barrel plus a few px of random terms."""
    m = model.copy()
    m.dist_x, m.dist_y = radial_distortion(4.0, 1.5)
    rng = np.random.default_rng(seed)
    # Random higher-order terms scaled to ~0.5 px at r ~ 0.9 rad.
    degree = np.array([i + j for i, j in term_powers(5)])
    amp = 0.5 / 0.9 ** np.maximum(degree, 1)
    m.dist_x[3:] += rng.normal(0, 1, 18) * amp[3:]
    m.dist_y[3:] += rng.normal(0, 1, 18) * amp[3:]
    return m


def field_grid(model: CameraModel, n: int = 61) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.meshgrid(np.linspace(-0.5, model.nx - 0.5, n), np.linspace(-0.5, model.ny - 0.5, n))
    return x.ravel(), y.ravel()


def test_scale_is_24mm_over_9um():
    assert NOMINAL_SCALE == pytest.approx(2666.667, abs=1e-3)
    # 1 px at the axis is 77.35 arcsec (SPEC §1).
    assert np.degrees(1 / NOMINAL_SCALE) * 3600 == pytest.approx(77.35, abs=0.01)


@pytest.mark.parametrize("letter,alt0,az0", [("N", 49, 0), ("E", 49, 90), ("S", 49, 180),
                                             ("W", 49, 270), ("C", 90, 0)])
@pytest.mark.parametrize("site", ["LP", "LS"])
def test_nominal_pointing_lands_on_optical_centre(site, letter, alt0, az0):
    m = nominal_camera(site, letter)
    assert (m.alt0, m.az0, m.th0, m.x0, m.y0, m.nx, m.ny) == (alt0, az0, 270, 2004, 1336, 4008, 2672)
    x, y = m.to_pixels(alt0, az0)
    assert x == pytest.approx(2004, abs=1e-9) and y == pytest.approx(1336, abs=1e-9)
    s = nominal_camera(site, site + letter, size="small")
    assert (s.nx, s.ny, s.x0, s.y0, s.scale) == (1002, 668, 501, 334, m.scale)


def test_gnomonic_distance_matches_astropy_separation():
    """Ideal pixel radius from the axis = scale * tan(angular separation)."""
    m = nominal_camera("LP", "S")
    rng = np.random.default_rng(3)
    alt = rng.uniform(20, 80, 200)
    az = rng.uniform(150, 210, 200)
    x, y = m.to_pixels(alt, az)
    frame = AltAz()
    sep = SkyCoord(az=az * u.deg, alt=alt * u.deg, frame=frame).separation(
        SkyCoord(az=m.az0 * u.deg, alt=m.alt0 * u.deg, frame=frame)).rad
    np.testing.assert_allclose(np.hypot(x - m.x0, y - m.y0), m.scale * np.tan(sep), atol=1e-6)


def test_orientation_and_roll():
    """TH0=270: +x towards increasing azimuth, +y up; TH0 is a rotation about the axis."""
    m = nominal_camera("LP", "E")
    x, y = m.to_pixels([49.0, 50.0], [91.0, 90.0])
    assert x[0] > m.x0 + 30 and abs(y[0] - m.y0) < 1
    assert y[1] > m.y0 + 40 and abs(x[1] - m.x0) < 1e-6
    rng = np.random.default_rng(4)
    alt, az = rng.uniform(30, 70, 50), rng.uniform(70, 110, 50)
    x0, y0 = m.to_pixels(alt, az)
    r = m.copy()
    r.th0 += 10.0
    x1, y1 = r.to_pixels(alt, az)
    # Same distances from the axis, positions turned by 10 deg about (x0, y0).
    np.testing.assert_allclose(np.hypot(x1 - m.x0, y1 - m.y0), np.hypot(x0 - m.x0, y0 - m.y0), atol=1e-8)
    turn = np.degrees(np.arctan2(y1 - m.y0, x1 - m.x0) - np.arctan2(y0 - m.y0, x0 - m.x0))
    np.testing.assert_allclose(np.abs((turn + 180) % 360 - 180), 10.0, atol=1e-8)


def test_behind_camera_is_nan():
    m = nominal_camera("LP", "N")
    x, y = m.to_pixels([49.0, 49.0, -30.0], [180.0, 0.0, 0.0])
    assert np.isnan(x[0]) and np.isnan(y[0])
    assert np.isfinite(x[1]) and np.isfinite(x[2])  # -30 alt is 79 deg off axis: still projected


def test_distortion_term_order():
    m = nominal_camera("LP", "E")
    assert term_powers(5)[:10] == [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2),
                                   (3, 0), (2, 1), (1, 2), (0, 3)]
    assert len(term_powers(5)) == 21
    uu, vv = np.array([0.3, -0.2]), np.array([0.1, 0.25])
    for k, (i, j) in enumerate(term_powers(5)):
        m.dist_x[:] = 0
        m.dist_x[k] = 2.0
        dx, dy = m.distortion(uu, vv)
        np.testing.assert_allclose(dx, 2.0 * uu**i * vv**j, rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(dy, 0.0)
    np.testing.assert_allclose(monomials(uu, vv, 5)[7], uu**2 * vv)


def test_radial_distortion_is_radial():
    m = nominal_camera("LP", "E")
    m.dist_x, m.dist_y = radial_distortion(4.0, 1.0)
    uu, vv = np.array([0.5, -0.4, 0.1]), np.array([0.2, 0.3, -0.35])
    r2 = uu**2 + vv**2
    dx, dy = m.distortion(uu, vv)
    np.testing.assert_allclose(dx, uu * (4 * r2 + r2**2), rtol=1e-12)
    np.testing.assert_allclose(dy, vv * (4 * r2 + r2**2), rtol=1e-12)


@pytest.mark.parametrize("size", ["full", "small"])
@pytest.mark.parametrize("letter", ["E", "C"])
def test_round_trip_over_field(size, letter):
    m = distorted(nominal_camera("LP", letter, size=size))
    corner = np.hypot(*m.distortion(np.array([2004 / m.scale]), np.array([1336 / m.scale])))
    if size == "full":
        assert 2 < corner[0] < 10  # a real lens: a few px at the corners
    x, y = field_grid(m)
    alt, az = m.to_altaz(x, y)
    x2, y2 = m.to_pixels(alt, az)
    assert np.max(np.hypot(x2 - x, y2 - y)) < 1e-3
    # and the other way: alt/az -> pixels -> alt/az
    alt3, az3 = m.to_altaz(x2, y2)
    np.testing.assert_allclose(alt3, alt, atol=1e-8)
    np.testing.assert_allclose(((az3 - az + 180) % 360) - 180, 0, atol=1e-7)


def test_zenith_camera_axis_above_zenith_is_continuous():
    """ALT0 slightly beyond 90 is a valid, continuous description (zenith camera fits)."""
    a = nominal_camera("LP", "C")
    b = a.copy()
    b.alt0 = 90.01
    c = a.copy()
    c.alt0 = 89.99
    alt, az = np.array([80.0, 70.0]), np.array([10.0, 200.0])
    xa, ya = a.to_pixels(alt, az)
    xb, yb = b.to_pixels(alt, az)
    xc, yc = c.to_pixels(alt, az)
    np.testing.assert_allclose((xb + xc) / 2, xa, atol=1e-3)
    np.testing.assert_allclose((yb + yc) / 2, ya, atol=1e-3)
    assert 0.3 < np.hypot(xb - xa, yb - ya).min() < 0.6  # 0.01 deg = 0.47 px


def test_serialisation_round_trip():
    m = distorted(nominal_camera("LS", "W"), seed=2)
    d = json.loads(json.dumps(m.to_dict()))
    m2 = CameraModel.from_dict(d)
    x, y = field_grid(m, 11)
    alt, az = m.to_altaz(x, y)
    np.testing.assert_array_equal(np.array(m2.to_pixels(alt, az)), np.array(m.to_pixels(alt, az)))
    c = m.copy()
    c.dist_x[5] = 99.0
    assert m.dist_x[5] != 99.0


def test_bad_arguments():
    with pytest.raises(ValueError):
        nominal_camera("XX", "E")
    with pytest.raises(ValueError):
        nominal_camera("LP", "Q")
    with pytest.raises(ValueError):
        CameraModel(49, 90, 270, 2004, 1336, dist_x=np.zeros(10), dist_y=np.zeros(21))
