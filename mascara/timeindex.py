"""Time indexing of frames: lstseq, lstidx, lstday and batches (SPEC §2).

A sidereal day of the *reference site* (longitude ``REF_LON``, La Palma) holds
``SLOTS_PER_DAY`` = 13,500 slots of 6.4 sidereal seconds. A frame is keyed by
the slot in which its exposure *starts*::

    lstidx = floor(LST_ref_hours * 3600 / 6.4)
    lstday = round((JD_start - LSTDAY0_JD) * 1.0027379093 - LST_ref_hours / 24)
    lstseq = 13500 * lstday + lstidx

``LST_ref`` is the apparent sidereal time at ``REF_LON`` (astropy, IAU 2006/2000A
with UT1 from the IERS tables shipped with astropy). All JDs are UTC Julian
dates. Frames of the same lstidx on different nights put every star on the
same pixel, which is why lstidx is the pipeline's key.

IERS data: astropy normally downloads a fresh IERS-A table and refuses stale
predictions. Pipeline machines may be offline, so every astropy time call of
this package runs inside :func:`offline_iers`, which uses the tables bundled
with ``astropy-iers-data`` and degrades (with a warning) instead of failing
for dates past their end. The resulting UT1 error (milliseconds) is far below
what a 6.4 s slot or a 77 arcsec pixel can see.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

#: Sidereal days per solar (UT) day used in the lstday formula (SPEC §2).
SIDEREAL_RATIO = 1.0027379093
#: Longitude (deg, east positive) whose sidereal time defines lstidx.
REF_LON = -17.8780
#: SI seconds of one 6.4-sidereal-second slot (about 6.3825 s).
EXPTIME = 6.4 / SIDEREAL_RATIO
#: UTC JD of the start of lstday 0 (2012-12-31, about 18:29 UT).
LSTDAY0_JD = 2456293.2703
#: Slots per reference sidereal day.
SLOTS_PER_DAY = 13500
#: Sidereal seconds per slot.
SLOT_SIDEREAL_SECONDS = 6.4


@dataclass(frozen=True)
class Site:
    """An observing station.

    Attributes
    ----------
    code : str
        Station code, ``"LP"`` or ``"LS"``.
    lat, lon : float
        Geodetic latitude and longitude in degrees (longitude east positive).
    height : float
        Height above the WGS84 ellipsoid in metres.
    pressure : float
        Typical air pressure in hPa (used for refraction).
    temperature : float
        Typical air temperature in deg C (used for refraction).
    relative_humidity : float
        Relative humidity, 0..1 (used for refraction).
    """

    code: str
    lat: float
    lon: float
    height: float
    pressure: float
    temperature: float
    relative_humidity: float


# La Silla's longitude is given to 1e-5 deg: the SPEC §2 check value (local LST
# of a real La Silla frame) fixes it to -70.73776 within 0.05 arcsec, where the
# rounded -70.7377 would be off by 4e-6 h.
SITES: dict[str, Site] = {
    "LP": Site("LP", lat=28.7603, lon=-17.8796, height=2396.0, pressure=770.0,
               temperature=10.0, relative_humidity=0.3),
    "LS": Site("LS", lat=-29.2567, lon=-70.73776, height=2400.0, pressure=775.0,
               temperature=12.0, relative_humidity=0.3),
}


def get_site(site: Site | str) -> Site:
    """Return the :class:`Site` for a site object or a code such as ``"LP"``."""
    if isinstance(site, Site):
        return site
    try:
        return SITES[site]
    except KeyError:
        raise ValueError(f"unknown site {site!r}; known: {sorted(SITES)}") from None


@contextlib.contextmanager
def offline_iers() -> Iterator[None]:
    """Context in which astropy uses its bundled IERS tables and never downloads.

    Past the end of the bundled predictions astropy warns and extrapolates
    instead of raising.
    """
    from astropy.utils import iers

    with (
        iers.conf.set_temp("auto_download", False),
        iers.conf.set_temp("auto_max_age", None),
        iers.conf.set_temp("iers_degraded_accuracy", "warn"),
    ):
        yield


def lst_hours(jd: npt.ArrayLike, lon: float) -> np.ndarray:
    """Apparent local sidereal time.

    Parameters
    ----------
    jd : array_like
        UTC Julian dates, any shape.
    lon : float
        Longitude in degrees, east positive.

    Returns
    -------
    ndarray
        Local apparent sidereal time in hours, in [0, 24), same shape as ``jd``.
    """
    import astropy.units as u
    from astropy.time import Time

    jd = np.asarray(jd, dtype=np.float64)
    with offline_iers():
        t = Time(jd, format="jd", scale="utc")
        return np.asarray(t.sidereal_time("apparent", longitude=lon * u.deg).hour)


def _lstseq_from_lst(jd: np.ndarray, lst_ref: np.ndarray) -> np.ndarray:
    lstidx = np.floor(lst_ref * 3600.0 / SLOT_SIDEREAL_SECONDS).astype(np.int64)
    lstidx = np.clip(lstidx, 0, SLOTS_PER_DAY - 1)
    lstday = np.round((jd - LSTDAY0_JD) * SIDEREAL_RATIO - lst_ref / 24.0).astype(np.int64)
    return SLOTS_PER_DAY * lstday + lstidx


def lstseq_from_jd(jd_start: npt.ArrayLike) -> np.ndarray:
    """lstseq of frames from the UTC JD at the *start* of their exposure.

    Parameters
    ----------
    jd_start : array_like
        UTC Julian date(s) of the exposure start, any shape. (Header ``JD`` is
        mid-exposure: subtract ``EXPTIME / 2 / 86400`` first.)

    Returns
    -------
    ndarray of int64
        lstseq, same shape as ``jd_start``.
    """
    jd = np.asarray(jd_start, dtype=np.float64)
    return _lstseq_from_lst(jd, lst_hours(jd, REF_LON))


def lstidx_of(lstseq: npt.ArrayLike) -> np.ndarray:
    """Slot within the reference sidereal day, 0..13499."""
    return np.asarray(lstseq, dtype=np.int64) % SLOTS_PER_DAY


def lstday_of(lstseq: npt.ArrayLike) -> np.ndarray:
    """Reference sidereal days since ``LSTDAY0_JD``."""
    return np.asarray(lstseq, dtype=np.int64) // SLOTS_PER_DAY


def batch_of(lstseq: npt.ArrayLike, batch_size: int = 50) -> np.ndarray:
    """Batch number ``lstseq // batch_size``.

    With the default 50 (which divides 13,500) the batch within a day is
    ``lstidx // 50``: 270 batches per sidereal day.
    """
    return np.asarray(lstseq, dtype=np.int64) // batch_size


def slot_start_jd(lstseq: int) -> float:
    """:func:`jd_start_of` of one slot, for a check per frame: a linear formula and a correction per lstday.

    The linear relation of the lstday formula is off the apparent sidereal
    time by 1-3.5 s over 2019-2029 (nutation, UT1 - UTC), which varies by
    milliseconds within a day: the correction is that of the lstday's first
    slot, found once per lstday and process. Within 0.01 s of
    :func:`jd_start_of`.
    """
    seq = int(lstseq)
    return _linear_slot_jd(seq) + _slot_correction(seq // SLOTS_PER_DAY)


def _linear_slot_jd(seq: int) -> float:
    return LSTDAY0_JD + (seq // SLOTS_PER_DAY + (seq % SLOTS_PER_DAY) * SLOT_SIDEREAL_SECONDS / 86400.0) / SIDEREAL_RATIO


@functools.lru_cache(maxsize=64)
def _slot_correction(lstday: int) -> float:
    first = lstday * SLOTS_PER_DAY
    return float(jd_start_of(first)) - _linear_slot_jd(first)


def jd_start_of(lstseq: npt.ArrayLike) -> np.ndarray:
    """UTC JD at which slot ``lstseq`` starts (inverse of :func:`lstseq_from_jd`).

    Parameters
    ----------
    lstseq : array_like of int
        Slot numbers, any shape.

    Returns
    -------
    ndarray of float64
        A JD within 0.1 ms after the slot boundary (a few float64 steps of
        40 microseconds) for which ``lstseq_from_jd(jd) == lstseq``.

    Notes
    -----
    Newton iteration on the apparent sidereal time at ``REF_LON``, starting
    from the linear relation of the lstday formula; one step reaches the
    float64 resolution; one-ulp nudges then put the returned JD inside the slot despite
    float64 rounding. Costs three or four astropy sidereal-time evaluations
    (about 70 us per element): call it on whole arrays, not per frame.
    """
    seq = np.asarray(lstseq, dtype=np.int64)
    target = (seq % SLOTS_PER_DAY) * SLOT_SIDEREAL_SECONDS / 3600.0  # hours
    day = seq // SLOTS_PER_DAY
    jd = LSTDAY0_JD + (day + target / 24.0) / SIDEREAL_RATIO
    for _ in range(10):
        lst = lst_hours(jd, REF_LON)
        dh = (target - lst + 12.0) % 24.0 - 12.0
        # 3e-8 h = 0.1 ms: three steps of a float64 JD (40 us) near 2.46e6
        converged = np.abs(dh) < 3e-8
        inside = _lstseq_from_lst(jd, lst) == seq
        if np.all(converged & inside):
            break
        step = np.where(converged, 0.0, dh / 24.0 / SIDEREAL_RATIO)
        jd = np.where(converged & ~inside, np.nextafter(jd, np.inf), jd + step)
    return jd


def _sun_alt(jd: np.ndarray, site: Site) -> np.ndarray:
    """Geometric altitude (deg, no refraction) of the Sun's centre."""
    import astropy.units as u
    from astropy.coordinates import AltAz, EarthLocation, get_sun
    from astropy.time import Time

    loc = EarthLocation.from_geodetic(site.lon * u.deg, site.lat * u.deg, site.height * u.m)
    with offline_iers():
        t = Time(jd, format="jd", scale="utc")
        return get_sun(t).transform_to(AltAz(obstime=t, location=loc)).alt.deg


def _crossings(jd0: float, step: float, alt: np.ndarray, sun_alt: float) -> list[float]:
    below = alt < sun_alt
    edges = np.flatnonzero(below[1:] != below[:-1])
    return [jd0 + step * k for k in edges]


@functools.lru_cache(maxsize=256)
def night_slot_window(night: str, site: Site | str) -> tuple[int, int]:
    """First and last lstseq a frame of ``night`` can have: the slots from local mean noon of the date to the next.

    Wider than any night (whatever the Sun's altitude that bounds it), so the
    intake can tell a frame of another night, or a file with an absurd
    lstseq in its name, from a frame of this one. ``ValueError`` if ``night``
    is not a ``YYYYMMDD`` date.
    """
    return _noon_to_noon(_local_mean_noon(night, get_site(site)))


def slot_window_around(lstseq: int, site: Site | str) -> tuple[int, int]:
    """First and last lstseq from the local mean noon before slot ``lstseq`` starts to the next local mean noon.

    The night a frame belongs to, whatever the date its directory was given
    (:func:`night_slot_window` is the same window found from that date).
    """
    return _noon_to_noon(_noon_before(lstseq, get_site(site)))


def night_of_slot(lstseq: int, site: Site | str) -> str:
    """``YYYYMMDD``, the UTC date of the local mean noon that starts the night of slot ``lstseq``: the date
    :func:`night_slot_window` takes to give the window :func:`slot_window_around` gives for it."""
    noon = _noon_before(lstseq, get_site(site))
    # the UTC date of that noon: JD 2440587.5 is 1970-01-01 00:00 UTC
    return (_dt.datetime(1970, 1, 1) + _dt.timedelta(days=noon - 2440587.5)).strftime("%Y%m%d")


def _noon_before(lstseq: int, s: Site) -> float:
    """JD of the local mean noon at ``s`` before slot ``lstseq`` starts."""
    jd = float(jd_start_of(np.array([lstseq]))[0])
    return math.floor(jd + s.lon / 360.0) - s.lon / 360.0  # JD integers fall at 12h UTC


def _local_mean_noon(night: str, s: Site) -> float:
    """JD of local mean noon at ``s`` on the UTC date ``night`` (``YYYYMMDD``); ValueError if not a date."""
    date = _dt.datetime.strptime(night, "%Y%m%d").replace(tzinfo=_dt.timezone.utc)
    return 2440587.5 + date.timestamp() / 86400.0 + 0.5 - s.lon / 360.0


def _noon_to_noon(noon: float) -> tuple[int, int]:
    """First and last lstseq of the slots from ``noon`` (a JD) to a day later."""
    first, last = lstseq_from_jd(np.array([noon, noon + 1.0]))
    return int(first), int(last)


def night_lstseqs(night: str, site: Site | str, sun_alt: float = -12.0) -> np.ndarray:
    """All slots of one night during which the Sun is below ``sun_alt``.

    Parameters
    ----------
    night : str
        ``'YYYYMMDD'``, the UTC date of the evening the night starts.
    site : Site or str
        The station.
    sun_alt : float
        Altitude of the Sun's centre (deg, geometric) that bounds the night.

    Returns
    -------
    ndarray of int64
        Consecutive lstseq of the slots whose start lies in [dusk, dawn);
        empty if the Sun never gets below ``sun_alt``.

    Notes
    -----
    The search window runs from local mean noon of the date to the next local
    mean noon. The Sun's altitude is evaluated every 10 minutes, then every
    second around each crossing.
    """
    s = get_site(site)
    jd0 = _local_mean_noon(night, s)
    coarse = 600.0 / 86400.0
    grid = jd0 + coarse * np.arange(145)
    alt = _sun_alt(grid, s)
    below = alt < sun_alt
    if not np.any(below):
        return np.zeros(0, dtype=np.int64)
    if np.all(below):
        dusk, dawn = grid[0], grid[-1]
    else:
        # Refine every crossing on a 1 s grid, all in one astropy call.
        starts = _crossings(grid[0], coarse, alt, sun_alt)
        fine = 1.0 / 86400.0
        fine_grids = [st + fine * np.arange(601) for st in starts]
        fine_alt = _sun_alt(np.concatenate(fine_grids), s).reshape(len(starts), 601)
        times = []
        for st, a in zip(starts, fine_alt):
            k = np.flatnonzero((a[1:] < sun_alt) != (a[:-1] < sun_alt))
            times.append(st + fine * (k[0] + 1) if len(k) else st)
        # Longest stretch below sun_alt inside the window, edges included.
        bounds = ([grid[0]] if below[0] else []) + times + ([grid[-1]] if below[-1] else [])
        pairs = list(zip(bounds[0::2], bounds[1::2]))
        dusk, dawn = max(pairs, key=lambda p: p[1] - p[0])
    first, last = lstseq_from_jd(np.array([dusk, dawn]))
    if jd_start_of(first) < dusk:
        first += 1
    return np.arange(first, last + 1, dtype=np.int64)
