"""Apparent places of stars: ICRS (ra, dec) to observed (alt, az) per frame (SPEC §5).

Two ways to the same numbers:

* :func:`altaz_astropy` is the reference: a full astropy ``ICRS -> AltAz``
  transform (precession, nutation, light deflection, annual and diurnal
  aberration, polar motion and refraction).
* :class:`ApparentPlaces` does the expensive part once per batch: the
  ICRS -> CIRS apparent place of every star at ``jd_ref`` (``erfa.apco13`` +
  ``erfa.atciqz``, the same ERFA routines astropy uses). Within a batch only
  the Earth's rotation changes, so :meth:`ApparentPlaces.altaz` rotates the
  CIRS vectors by the Earth rotation angle accumulated since ``jd_ref`` and
  then applies polar motion, diurnal aberration and refraction in numpy,
  following the published algorithm of ERFA ``atioq`` (refraction
  ``dZ = A tan Z + B tan^3 Z`` with constants from ``erfa.refco`` for the
  site's pressure, temperature, humidity and a 0.55 micron wavelength).

Angles are degrees; azimuth is astropy's (N = 0, E = 90); JDs are UTC.
Stars below the horizon keep their geometric (negative) altitude: refraction
is applied only above it.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .timeindex import Site, get_site, offline_iers

#: Effective wavelength (micron) used for refraction.
OBSWL_UM = 0.55
#: Earth rotation angle per UT1 day, in turns (IAU 2000 ERA rate).
_ERA_RATE = 1.00273781191135448
_TWOPI = 2.0 * np.pi


def _earth_location(site: Site):
    import astropy.units as u
    from astropy.coordinates import EarthLocation

    return EarthLocation.from_geodetic(site.lon * u.deg, site.lat * u.deg, site.height * u.m)


def altaz_astropy(ra: npt.ArrayLike, dec: npt.ArrayLike, site: Site | str,
                  jd: float | npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Observed altitude and azimuth with astropy's full transform (the reference).

    Parameters
    ----------
    ra, dec : array_like
        ICRS coordinates in degrees, shape (n,).
    site : Site or str
        Observing site (location, pressure, temperature, humidity).
    jd : float or array_like
        UTC Julian date; an array must broadcast against ``ra``.

    Returns
    -------
    alt, az : ndarray
        Degrees, refraction included (wavelength 0.55 micron).
    """
    import astropy.units as u
    from astropy.coordinates import AltAz, SkyCoord
    from astropy.time import Time

    s = get_site(site)
    with offline_iers():
        t = Time(jd, format="jd", scale="utc")
        frame = AltAz(obstime=t, location=_earth_location(s), pressure=s.pressure * u.hPa,
                      temperature=s.temperature * u.deg_C,
                      relative_humidity=s.relative_humidity, obswl=OBSWL_UM * u.um)
        c = SkyCoord(np.asarray(ra, float) * u.deg, np.asarray(dec, float) * u.deg, frame="icrs")
        aa = c.transform_to(frame)
        return np.asarray(aa.alt.deg), np.asarray(aa.az.deg)


def _altaz_frame(site: Site, jd: float):
    import astropy.units as u
    from astropy.coordinates import AltAz
    from astropy.time import Time

    return AltAz(obstime=Time(jd, format="jd", scale="utc"), location=_earth_location(site),
                 pressure=site.pressure * u.hPa, temperature=site.temperature * u.deg_C,
                 relative_humidity=site.relative_humidity, obswl=OBSWL_UM * u.um)


def radec_of_altaz(alt: npt.ArrayLike, az: npt.ArrayLike, site: Site | str,
                   jd: float) -> tuple[np.ndarray, np.ndarray]:
    """ICRS (ra, dec) in degrees of observed directions (alt, az) at one UTC JD (astropy, refraction undone).

    The inverse of :func:`altaz_astropy`; used to follow fixed sky directions
    (for example the tile centres of the stacker) through a batch.
    """
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    s = get_site(site)
    with offline_iers():
        c = SkyCoord(alt=np.asarray(alt, float) * u.deg, az=np.asarray(az, float) * u.deg,
                     frame=_altaz_frame(s, jd)).icrs
        return np.asarray(c.ra.deg), np.asarray(c.dec.deg)


def load_ahead() -> None:
    """Load now what the first camera-night loads on first use: astropy's coordinates and its IERS table.

    For a caller with time to spare (``mascprocess`` while its temporary
    Prefect server boots): only when the loading happens changes.
    """
    from astropy.coordinates import get_body  # noqa: F401 - moon_altaz's import
    from astropy.utils import iers

    with offline_iers():
        iers.earth_orientation_table.get()


def moon_altaz(site: Site | str, jd: float) -> tuple[float, float]:
    """Observed (alt, az) of the Moon in degrees at one UTC JD (astropy ephemeris)."""
    from astropy.coordinates import get_body

    s = get_site(site)
    with offline_iers():
        frame = _altaz_frame(s, jd)
        m = get_body("moon", frame.obstime, location=frame.location).transform_to(frame)
        return float(m.alt.deg), float(m.az.deg)


def angular_distance(alt1: npt.ArrayLike, az1: npt.ArrayLike, alt2: float, az2: float) -> np.ndarray:
    """Great-circle distance in degrees between directions (alt1, az1) and (alt2, az2)."""
    a1, z1, a2, z2 = (np.radians(np.asarray(v, float)) for v in (alt1, az1, alt2, az2))
    c = np.sin(a1) * np.sin(a2) + np.cos(a1) * np.cos(a2) * np.cos(z1 - z2)
    return np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))


class ApparentPlaces:
    """Apparent places of many stars, computed once, rotated to any nearby frame.

    Parameters
    ----------
    ra, dec : array_like
        ICRS coordinates in degrees, shape (n,).
    site : Site or str
        Observing site.
    jd_ref : float
        UTC Julian date of the apparent place (e.g. the batch's middle frame).

    Notes
    -----
    Annual aberration, precession-nutation and light deflection are frozen at
    ``jd_ref``; the error this makes grows slowly (about 0.01 arcsec after
    5 minutes, 0.1 arcsec after an hour), so use one instance per batch.
    """

    def __init__(self, ra: npt.ArrayLike, dec: npt.ArrayLike, site: Site | str, jd_ref: float):
        import erfa
        from astropy.time import Time
        from astropy.utils import iers

        self.site = get_site(site)
        self.jd_ref = float(jd_ref)
        ra = np.radians(np.asarray(ra, dtype=np.float64))
        dec = np.radians(np.asarray(dec, dtype=np.float64))
        with offline_iers():
            t = Time(self.jd_ref, format="jd", scale="utc")
            dut1 = float(t.delta_ut1_utc)
            xp, yp = iers.earth_orientation_table.get().pm_xy(t)
        s = self.site
        self.astrom, _eo = erfa.apco13(
            t.jd1, t.jd2, dut1, np.radians(s.lon), np.radians(s.lat), s.height,
            np.radians(xp.to_value("deg")), np.radians(yp.to_value("deg")),
            s.pressure, s.temperature, s.relative_humidity, OBSWL_UM,
        )
        ri, di = erfa.atciqz(ra, dec, self.astrom)
        cd = np.cos(di)
        # CIRS unit vectors at jd_ref: the only per-star state kept.
        self._x = cd * np.cos(ri)
        self._y = cd * np.sin(ri)
        self._z = np.sin(di)

    def __len__(self) -> int:
        return len(self._x)

    def altaz(self, jd: float) -> tuple[np.ndarray, np.ndarray]:
        """Observed altitude and azimuth of all stars at UTC Julian date ``jd``.

        Returns
        -------
        alt, az : ndarray of float64, shape (n,)
            Degrees; azimuth N = 0, E = 90, in [0, 360).
        """
        a = self.astrom
        # Local Earth rotation angle; UT1 - UTC is constant within a batch.
        eral = float(a["eral"]) + _TWOPI * _ERA_RATE * (float(jd) - self.jd_ref)
        ce, se = np.cos(eral), np.sin(eral)
        x, y, z = self._x, self._y, self._z
        # CIRS -> local (-HA, Dec): x to the meridian, y to the east
        xhd = ce * x + se * y
        yhd = ce * y - se * x
        zhd = z
        # polar motion
        xpl, ypl = float(a["xpl"]), float(a["ypl"])
        xhdt = xhd + xpl * zhd
        yhdt = yhd - ypl * zhd
        zhdt = -xpl * xhd + ypl * yhd + zhd
        # diurnal aberration
        diurab = float(a["diurab"])
        f = 1.0 - diurab * yhdt
        xhdt = f * xhdt
        yhdt = f * (yhdt + diurab)
        zhdt = f * zhdt
        # (-HA, Dec) -> horizon (S = 0, E = 90 in the x-y plane)
        sphi, cphi = float(a["sphi"]), float(a["cphi"])
        xa = sphi * xhdt - cphi * zhdt
        ya = yhdt
        za = cphi * xhdt + sphi * zhdt
        az = np.degrees(np.arctan2(ya, -xa)) % 360.0
        r = np.hypot(xa, ya)
        alt = np.degrees(np.arctan2(za, r))
        up = za > 0.0
        if np.any(up):
            alt[up] = self._refract(xa[up], ya[up], za[up], r[up])
        return alt, az

    def _refract(self, xa: np.ndarray, ya: np.ndarray, za: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Refracted altitude (deg) of horizon vectors above the horizon."""
        refa, refb = float(self.astrom["refa"]), float(self.astrom["refb"])
        # Below ~3 deg the tan Z model diverges: clamp as ERFA does.
        rc = np.maximum(r, 1e-6)
        zc = np.maximum(za, 0.05)
        tz = rc / zc
        w = refb * tz * tz
        d = (refa + w) * tz / (1.0 + (refa + 3.0 * w) / (zc * zc))
        cosd = 1.0 - 0.5 * d * d
        f = cosd - d * zc / rc
        zo = cosd * za + d * rc
        return np.degrees(np.arctan2(zo, np.abs(f) * r))
