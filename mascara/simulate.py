"""Realistic simulated raw nights, with the truth the tests compare against.

A simulated camera-night is written exactly as a real one (SPEC §3): 16-bit
FITS frames with an overscan border, the full header, ``calib_bias`` and
``calib_dark`` frames.  The sky is the shipped star catalogue seen through a
"true" camera model that differs from the nominal one (a pointing offset, a
lens distortion, a slow drift over the night), so the reduction has to find its
own solution.  Beside each night directory a truth file
``<datadir>/<night_id>.truth.hdf5`` records, for every star and frame, the true
centroid and the true flux inside each aperture radius.

Physics per frame: apparent places at three-point sub-exposure times (star
trailing over the 6.4 s exposure), a PSF whose width grows towards the field
edges (``psf="gaussian"``, the default; or ``psf="moffat"``: a Moffat profile,
beta about 3, elongated along the radius towards the corners, as wide-field
lenses do), atmospheric extinction, optional passing clouds (transmission map
moving over the field), sky background with a gradient, dark current, bias
with column structure, Poisson and read noise, ADC clipping at 65535.

Sizes: ``full`` is the real 4008 x 2672 science area; ``small`` is the central
1002 x 668 px of the same CCD and optics (same pixel scale, PSF and star
density), so the science behaves identically at both sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import h5py
import numpy as np
from astropy.io import fits
from astropy.time import Time
from numba import njit
from scipy.special import erf

from mascara import __version__
from mascara.camera import CameraModel, nominal_camera, term_powers
from mascara.sky import ApparentPlaces
from mascara.stars import StarCatalogue, default_catalogue
from mascara.timeindex import EXPTIME, SITES, jd_start_of, lst_hours, night_lstseqs

#: Radii (px) at which the truth file records the true aperture flux.
TRUTH_RADII = (2.5, 3.5, 4.5, 5.5)
#: Overscan border of the raw frame around the science region (SPEC §3: 4072 x 2720 raw, X0=36, Y0=25).
BORDER = {"x0": 36, "y0": 25, "x1": 28, "y1": 23}
STAMP = 15  # px, side of the rendered star stamp
NSUB = 5  # sub-exposure samples along the trail
QSTEP = 20  # sub-pixel quantisation of truth-aperture weights (1/QSTEP px)

_BAD_KINDS = ("truncated", "missing-lstseq", "wrong-shape")


@dataclasses.dataclass
class SimConfig:
    """Physical parameters of a simulated camera-night (ADU unless stated)."""

    site: str = "LP"
    camera: str = "E"
    size: str = "small"
    nframes: int | None = None  # None: the whole dark night
    seed: int = 0
    clouds: bool = False
    pointing_offset: float = 0.0  # deg, true pointing off nominal (split over alt and az)
    roll_offset: float = 0.0  # deg
    drift_px: float = 3.0  # pointing drift over a whole night, px
    bad_frames: int = 0
    vmax: float = 10.0
    zeropoint: float = 18.0  # V of a star giving 1 ADU per exposure above the atmosphere
    extinction: float = 0.12  # mag per airmass
    sky_level: float = 700.0
    sky_gradient: float = 0.6  # fractional increase towards the horizon
    bias_level: float = 320.0
    dark_current: float = 6.0  # ADU per exposure
    read_noise: float = 7.0  # ADU
    gain: float = 0.62  # e-/ADU
    psf_sigma0: float = 0.85  # px at the optical centre
    psf_sigma_edge: float = 0.55  # extra sigma at the field corner, px
    psf: str = "gaussian"  # "gaussian" (psf_sigma*) or "moffat" (moffat_*)
    moffat_beta: float = 3.0
    moffat_fwhm0: float = 2.0  # px, FWHM (geometric mean of the axes) at the optical centre
    moffat_fwhm_corner: float = 3.0  # px, at the corner of the full CCD (grows as r^2)
    moffat_axis_ratio_corner: float = 0.75  # minor/major axis at the corner (major axis radial)
    distortion_px: float = 4.0  # radial lens distortion at the corner of the full CCD, px
    ccdtemp: float = -15.0
    nbias: int = 3
    ndark: int = 5


def true_camera(cfg: SimConfig) -> CameraModel:
    """The camera as it really is: nominal pointing + offset + lens distortion."""
    model = nominal_camera(cfg.site, cfg.camera, cfg.size)
    d = cfg.pointing_offset / math.sqrt(2.0)
    model.alt0 += d
    model.az0 += d / max(math.cos(math.radians(model.alt0)), 0.2)
    model.th0 += cfg.roll_offset
    set_radial_distortion(model, cfg.distortion_px)
    return model


def set_radial_distortion(model: CameraModel, corner_px: float) -> None:
    """Add a barrel distortion dr = k1 r^3 + k2 r^5 reaching ``corner_px`` at the full CCD corner.

    The distortion belongs to the lens, so the small camera (the central part of
    the same CCD) sees the same function of angle off axis.
    """
    rc = math.hypot(2004.0, 1336.0) / model.scale  # corner of the full CCD, tangent-plane radians
    k1 = -0.8 * corner_px / model.scale / rc**3  # in tangent-plane units, scaled back below
    k2 = -0.2 * corner_px / model.scale / rc**5
    coeffs_x = np.zeros_like(model.dist_x)
    coeffs_y = np.zeros_like(model.dist_y)
    # dx = (k1 (u^2+v^2) + k2 (u^2+v^2)^2) u, in pixels: multiply by scale
    index = {pq: k for k, pq in enumerate(term_powers(model.order))}
    for (p, q), c in _radial_terms(k1, k2).items():
        coeffs_x[index[(p + 1, q)]] += c * model.scale
        coeffs_y[index[(p, q + 1)]] += c * model.scale
    model.dist_x = coeffs_x
    model.dist_y = coeffs_y


def _radial_terms(k1: float, k2: float) -> dict[tuple[int, int], float]:
    """Monomials u^p v^q of k1 (u^2+v^2) + k2 (u^2+v^2)^2."""
    return {(2, 0): k1, (0, 2): k1, (4, 0): k2, (2, 2): 2 * k2, (0, 4): k2}


def _truth_weights(radius: float) -> np.ndarray:
    """Exact aperture weights on the stamp for every quantised sub-pixel centre.

    Shape (QSTEP+1, QSTEP+1, STAMP, STAMP); index [qy, qx] is a centre at
    (STAMP//2 - 0.5 + qx/QSTEP, STAMP//2 - 0.5 + qy/QSTEP) in stamp pixels.
    Computed with photutils' exact geometry, independent of mascara.photometry.
    """
    from photutils.geometry import circular_overlap_grid

    out = np.empty((QSTEP + 1, QSTEP + 1, STAMP, STAMP))
    for qy in range(QSTEP + 1):
        for qx in range(QSTEP + 1):
            cx = STAMP // 2 - 0.5 + qx / QSTEP
            cy = STAMP // 2 - 0.5 + qy / QSTEP
            # grid extent relative to the centre, pixel edges at -0.5 .. STAMP-0.5
            out[qy, qx] = circular_overlap_grid(
                -0.5 - cx, STAMP - 0.5 - cx, -0.5 - cy, STAMP - 0.5 - cy, STAMP, STAMP, radius, 1, 1
            )
    return out


class NightSimulator:
    """Renders the frames of one simulated camera-night."""

    def __init__(self, cfg: SimConfig, night: str, catalogue: StarCatalogue | None = None):
        self.cfg = cfg
        self.night = night
        self.site = SITES[cfg.site]
        self.model0 = true_camera(cfg)
        self.nx, self.ny = self.model0.nx, self.model0.ny
        cat = catalogue if catalogue is not None else default_catalogue()
        self.stars = cat.brighter_than(cfg.vmax)
        all_seqs = night_lstseqs(night, cfg.site)
        if cfg.nframes is None or cfg.nframes >= len(all_seqs):
            self.lstseqs = all_seqs
        else:
            # start two hours into the dark night when there is room, past the twilight sky
            start = min(int(2 * 3600 / EXPTIME), len(all_seqs) - cfg.nframes)
            self.lstseqs = all_seqs[start : start + cfg.nframes]
        self.night_seqs = all_seqs
        rng = np.random.default_rng(cfg.seed)
        self.drift_dir = rng.uniform(0, 2 * np.pi)
        self.bias_columns = rng.normal(0.0, 3.0, self.nx + BORDER["x0"] + BORDER["x1"]).astype(np.float32)
        self.truth_w = {r: _truth_weights(r) for r in TRUTH_RADII}
        self.cloud_field = _cloud_field(rng, self.nx, self.ny, len(self.night_seqs)) if cfg.clouds else None
        self._places: tuple[int, ApparentPlaces, np.ndarray] | None = None
        # sky background (ADU), brighter towards the horizon: +y is increasing altitude (TH0 = 270)
        yy = np.linspace(1.0, 0.0, self.ny, dtype=np.float32)[:, None]
        xx = np.linspace(-1.0, 1.0, self.nx, dtype=np.float32)[None, :]
        self.sky = cfg.sky_level * (1.0 + cfg.sky_gradient * yy + 0.1 * xx)

    # -- geometry -----------------------------------------------------------
    def model_at(self, lstseq: int) -> CameraModel:
        """True camera model of a frame: the pointing drifts linearly over the night."""
        frac = (lstseq - self.night_seqs[0]) / max(len(self.night_seqs), 1)
        m = self.model0.copy()
        drift = self.cfg.drift_px * frac / m.scale  # radians
        m.alt0 += math.degrees(drift * math.cos(self.drift_dir))
        m.az0 += math.degrees(drift * math.sin(self.drift_dir)) / max(math.cos(math.radians(m.alt0)), 0.2)
        return m

    def _apparent(self, lstseq: int) -> tuple[ApparentPlaces, np.ndarray]:
        """Apparent places of the candidate stars, recomputed once per 50-frame batch."""
        batch = lstseq // 50
        if self._places is None or self._places[0] != batch:
            jd_ref = float(jd_start_of(batch * 50 + 25))
            full = ApparentPlaces(self.stars.ra, self.stars.dec, self.site, jd_ref)
            alt, az = full.altaz(jd_ref)
            x, y = self.model_at(batch * 50 + 25).to_pixels(alt, az)
            margin = 150.0  # px; stars move ~80 px per batch
            near = np.isfinite(x) & (x > -margin) & (x < self.nx + margin) & (y > -margin) & (y < self.ny + margin)
            idx = np.flatnonzero(near & (alt > 0))
            places = ApparentPlaces(self.stars.ra[idx], self.stars.dec[idx], self.site, jd_ref)
            self._places = (batch, places, idx)
        return self._places[1], self._places[2]

    # -- rendering ----------------------------------------------------------
    def render(self, lstseq: int, rng: np.random.Generator) -> tuple[np.ndarray, dict, dict]:
        """Raw uint16 frame (with overscan), its header, and the truth rows of this frame."""
        cfg = self.cfg
        jd0 = float(jd_start_of(lstseq))
        jd_mid = jd0 + EXPTIME / 2 / 86400.0
        places, idx = self._apparent(lstseq)
        model = self.model_at(lstseq)
        xs, ys = [], []
        for k in range(NSUB):
            alt_k, az_k = places.altaz(jd0 + (k + 0.5) / NSUB * EXPTIME / 86400.0)
            x_k, y_k = model.to_pixels(alt_k, az_k)
            xs.append(x_k)
            ys.append(y_k)
        xs, ys = np.array(xs), np.array(ys)  # (NSUB, n)
        alt_mid, az_mid = places.altaz(jd_mid)
        xc, yc = xs.mean(axis=0), ys.mean(axis=0)
        half = STAMP // 2
        inside = np.isfinite(xc) & (xc > -half) & (xc < self.nx + half) & (yc > -half) & (yc < self.ny + half)
        sel = np.flatnonzero(inside)
        xs, ys, xc, yc = xs[:, sel], ys[:, sel], xc[sel], yc[sel]
        alt_mid, az_mid = alt_mid[sel], az_mid[sel]
        star = idx[sel]
        vmag = self.stars.vmag[star].astype(np.float64)

        airmass = 1.0 / np.sin(np.radians(np.clip(alt_mid, 3.0, 90.0)))
        flux = 10 ** (-0.4 * (vmag - cfg.zeropoint + cfg.extinction * airmass))
        if self.cloud_field is not None:
            flux *= self.transmission(lstseq, xc, yc)
        rc = np.hypot(xc - model.x0, yc - model.y0) / math.hypot(2004.0, 1336.0)
        ax = np.rint(xc).astype(np.int64) - half
        ay = np.rint(yc).astype(np.int64) - half
        if cfg.psf == "moffat":
            stamps, sigma = self._moffat_stamps(xs, ys, ax, ay, rc, model)
            stamps *= flux[:, None, None]
        elif cfg.psf == "gaussian":
            sigma = cfg.psf_sigma0 + cfg.psf_sigma_edge * rc**2
            # stamps: pixel-integrated Gaussians averaged over the trail samples
            grid = np.arange(STAMP)[None, None, :]
            s2 = (np.sqrt(2.0) * sigma)[None, :, None]
            ex = 0.5 * (erf((ax[None, :, None] + grid + 0.5 - xs[:, :, None]) / s2) - erf((ax[None, :, None] + grid - 0.5 - xs[:, :, None]) / s2))
            ey = 0.5 * (erf((ay[None, :, None] + grid + 0.5 - ys[:, :, None]) / s2) - erf((ay[None, :, None] + grid - 0.5 - ys[:, :, None]) / s2))
            stamps = np.einsum("kns,knt->nst", ey, ex) * (flux / NSUB)[:, None, None]  # (n, y, x)
        else:
            raise ValueError(f"unknown psf {cfg.psf!r}")

        # truth aperture fluxes with exact weights at the quantised centroid
        qx = np.clip(np.rint((xc - ax - (half - 0.5)) * QSTEP), 0, QSTEP).astype(np.int64)
        qy = np.clip(np.rint((yc - ay - (half - 0.5)) * QSTEP), 0, QSTEP).astype(np.int64)
        truth_flux = {r: np.einsum("nij,nij->n", stamps, w[qy, qx]) for r, w in self.truth_w.items()}

        # the image in ADU
        if self.cloud_field is not None:
            image = self.sky * self._sky_transmission(lstseq)
            image += cfg.dark_current
        else:
            image = self.sky + np.float32(cfg.dark_current)
        iy = ay[:, None, None] + np.arange(STAMP)[None, :, None]
        ix = ax[:, None, None] + np.arange(STAMP)[None, None, :]
        ok = (iy >= 0) & (iy < self.ny) & (ix >= 0) & (ix < self.nx)
        flat = (iy * self.nx + ix)[ok]
        image += np.bincount(flat, weights=stamps[ok], minlength=self.nx * self.ny).reshape(self.ny, self.nx).astype(np.float32)
        # photon and read noise in one draw: var = signal/gain + read_noise^2 (ADU^2)
        sigma_px = np.sqrt(np.maximum(image, 0) * np.float32(1.0 / cfg.gain) + np.float32(cfg.read_noise**2))
        noisy = image + sigma_px * rng.standard_normal(image.shape, dtype=np.float32)
        raw = self._with_overscan(noisy, rng)
        header = self.header(lstseq, jd0, jd_mid)
        truth = {
            "lstseq": np.full(len(sel), lstseq, np.uint32),
            "star": star.astype(np.int32),
            "x": xc.astype(np.float64),
            "y": yc.astype(np.float64),
            "flux": flux,
            "sigma": sigma.astype(np.float32),
            **{f"flux_{r:.1f}": truth_flux[r] for r in TRUTH_RADII},
        }
        return raw, header, truth

    def _moffat_stamps(self, xs, ys, ax, ay, rc, model) -> tuple[np.ndarray, np.ndarray]:
        """Unit-flux elliptical Moffat stamps (n, STAMP, STAMP) averaged over the trail, and an equivalent sigma.

        The FWHM (geometric mean of the two axes) grows as ``rc^2`` from the
        centre to the corner, and so does the elongation; the major axis
        points away from the optical centre.
        """
        cfg = self.cfg
        beta = cfg.moffat_beta
        fwhm = cfg.moffat_fwhm0 + (cfg.moffat_fwhm_corner - cfg.moffat_fwhm0) * rc**2
        q = 1.0 - (1.0 - cfg.moffat_axis_ratio_corner) * rc**2  # minor / major
        alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
        a_major = alpha / np.sqrt(q)
        a_minor = alpha * np.sqrt(q)
        xm, ym = xs.mean(axis=0), ys.mean(axis=0)
        ang = np.arctan2(ym - model.y0, xm - model.x0)
        stamps = np.empty((len(xm), STAMP, STAMP))
        _render_moffat(np.ascontiguousarray(xs.T), np.ascontiguousarray(ys.T), ax, ay, np.cos(ang), np.sin(ang),
                       a_major, a_minor, beta, stamps)
        return stamps, fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))

    def transmission(self, lstseq: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Cloud transmission (0..1) at pixel positions for a frame."""
        from scipy.ndimage import map_coordinates

        field, step = self.cloud_field
        t = lstseq - self.night_seqs[0]
        # the cloud pattern drifts across the field by one coarse cell every ~20 frames
        cx = x / step + t / 20.0
        cy = y / step
        depth = map_coordinates(field, [cy, cx], order=1, mode="wrap")
        envelope = _cloud_envelope(t, len(self.lstseqs), self.lstseqs[0] - self.night_seqs[0])
        return np.clip(1.0 - envelope * depth, 0.02, 1.0)

    def _sky_transmission(self, lstseq: int) -> np.ndarray:
        yy, xx = np.mgrid[0 : self.ny : 16, 0 : self.nx : 16]
        coarse = self.transmission(lstseq, xx.ravel().astype(float), yy.ravel().astype(float)).reshape(xx.shape)
        full = np.repeat(np.repeat(coarse, 16, axis=0), 16, axis=1)[: self.ny, : self.nx]
        return (0.4 + 0.6 * full).astype(np.float32)

    def _with_overscan(self, science: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Embed a noisy science image (read noise included) in the raw frame with bias and overscan."""
        cfg = self.cfg
        ny = self.ny + BORDER["y0"] + BORDER["y1"]
        nx = self.nx + BORDER["x0"] + BORDER["x1"]
        y0, x0 = BORDER["y0"], BORDER["x0"]
        raw = np.empty((ny, nx), np.float32)
        raw[:] = cfg.bias_level + self.bias_columns[None, :]
        raw[y0 : y0 + self.ny, x0 : x0 + self.nx] += science
        for sl in (np.s_[:y0, :], np.s_[y0 + self.ny :, :], np.s_[y0 : y0 + self.ny, :x0], np.s_[y0 : y0 + self.ny, x0 + self.nx :]):
            raw[sl] += cfg.read_noise * rng.standard_normal(raw[sl].shape, dtype=np.float32)
        np.clip(raw, 0, 65535, out=raw)
        return (raw + 0.5).astype(np.uint16)  # round half up; values are non-negative

    def calibration_frame(self, kind: str, rng: np.random.Generator) -> np.ndarray:
        """A bias (no exposure) or dark (6.4 s, shutter closed) frame."""
        level = self.cfg.dark_current if kind == "dark" else 0.0
        sigma = math.sqrt(level / self.cfg.gain + self.cfg.read_noise**2)
        science = level + sigma * rng.standard_normal((self.ny, self.nx), dtype=np.float32)
        return self._with_overscan(science, rng)

    def header(self, lstseq: int, jd0: float, jd_mid: float, imagetyp: str = "science") -> dict:
        lst = float(lst_hours(jd_mid, self.site.lon))
        return {
            "IMAGETYP": imagetyp,
            "LSTSEQ": int(lstseq),
            "LSTIDX": int(lstseq % 13500),
            "JD": jd_mid,
            "LST": lst,
            "EXPTIME": EXPTIME,
            "CCDTEMP": self.cfg.ccdtemp,
            "SITE-OBS": self.cfg.site,
            "CAMERA": self.cfg.camera,
            "DATE-OBS": Time(jd0, format="jd", scale="utc").isot,
            "X0": BORDER["x0"],
            "XSIZE": self.nx,
            "Y0": BORDER["y0"],
            "YSIZE": self.ny,
            "AVERSION": f"mascara-sim {__version__}",
        }


#: Sub-pixel samples per axis when integrating a Moffat over a pixel (midpoint rule).
MOFFAT_SUB = 3


@njit(cache=True)
def _render_moffat(xs, ys, ax, ay, cosa, sina, a_major, a_minor, beta, out):
    """Fill ``out[n]`` with the unit-flux elliptical Moffat of star ``n`` integrated over pixels.

    ``xs, ys`` are (n, ntrail) positions along the trail; the stamp's pixel
    (0, 0) is image pixel ``(ax[n], ay[n])``. Each pixel is sampled on a
    MOFFAT_SUB x MOFFAT_SUB midpoint grid for every trail position.
    """
    n, nt = xs.shape
    ns = MOFFAT_SUB
    w = 1.0 / (nt * ns * ns)
    cube = beta == 3.0
    for s in range(n):
        norm = (beta - 1.0) / (math.pi * a_major[s] * a_minor[s])
        ia2 = 1.0 / (a_major[s] * a_major[s])
        ib2 = 1.0 / (a_minor[s] * a_minor[s])
        c = cosa[s]
        sn = sina[s]
        for j in range(STAMP):
            for i in range(STAMP):
                acc = 0.0
                for k in range(nt):
                    for vj in range(ns):
                        dy = ay[s] + j - 0.5 + (vj + 0.5) / ns - ys[s, k]
                        for vi in range(ns):
                            dx = ax[s] + i - 0.5 + (vi + 0.5) / ns - xs[s, k]
                            u = dx * c + dy * sn
                            v = -dx * sn + dy * c
                            t = 1.0 + u * u * ia2 + v * v * ib2
                            if cube:
                                acc += 1.0 / (t * t * t)  # beta = 3 without a pow call
                            else:
                                acc += t ** (-beta)
                out[s, j, i] = acc * norm * w


def _cloud_field(rng: np.random.Generator, nx: int, ny: int, nseq: int) -> tuple[np.ndarray, float]:
    """A smooth random cloud-depth pattern on a coarse grid (0 = clear, 1 = opaque)."""
    from scipy.ndimage import gaussian_filter

    step = 64.0
    gy = int(ny / step) + 4
    gx = int(nx / step) + nseq // 20 + 8
    field = gaussian_filter(rng.standard_normal((gy, gx)), sigma=2.0, mode="wrap")
    field = (field - field.mean()) / (field.std() + 1e-12)
    return np.clip(0.5 + 0.6 * field, 0.0, 1.0), step


def _cloud_envelope(t: int, nsim: int, start: int) -> float:
    """Clouds pass during the middle third of the simulated frames."""
    centre = start + 0.55 * nsim
    width = max(0.12 * nsim, 10.0)
    return float(np.exp(-0.5 * ((t - centre) / width) ** 2))


def _write_fits(path: Path, data: np.ndarray, header: dict) -> None:
    hdu = fits.PrimaryHDU(data)  # uint16 is written as int16 with BZERO 32768
    for k, v in header.items():
        hdu.header[k] = v
    tmp = path.with_name(path.name + ".part")
    hdu.writeto(tmp, overwrite=True)
    os.replace(tmp, path)


def _write_fits_in_place(path: Path, data: np.ndarray, header: dict, pause: float) -> None:
    """Write a frame under its final name in two halves ``pause`` seconds apart, as an acquisition
    writing in place does: a reader that looks in between sees a half-written file."""
    import io

    hdu = fits.PrimaryHDU(data)
    for k, v in header.items():
        hdu.header[k] = v
    buf = io.BytesIO()
    hdu.writeto(buf)
    blob = buf.getvalue()
    with open(path, "wb") as fh:
        fh.write(blob[: len(blob) // 2])
        fh.flush()
        time.sleep(pause)
        fh.write(blob[len(blob) // 2:])


def _break_frame(path: Path, kind: str, data: np.ndarray, header: dict) -> None:
    """Deliberately damage a frame the way real ones get damaged."""
    if kind == "truncated":
        _write_fits(path, data, header)
        size = path.stat().st_size
        with open(path, "r+b") as fh:
            fh.truncate(size // 2)
    elif kind == "missing-lstseq":
        h = dict(header)
        del h["LSTSEQ"]
        _write_fits(path, data, h)
    elif kind == "wrong-shape":
        _write_fits(path, data[:-8, :], header)
    else:
        raise ValueError(kind)


def simulate_night(datadir: Path | str, night: str, cfg: SimConfig, progress=None, live_speed: float | None = None,
                   write_mode: str = "rename") -> dict:
    """Write one simulated camera-night and its truth file.

    ``live_speed`` writes the frames as they would arrive during the night,
    that many times faster than real time (one frame per 6.4 s / speed,
    calibration frames first); ``write_mode`` is how each frame is written:
    ``rename`` (a temporary name, then a rename) or ``in-place`` (under its
    final name, in two halves a fifth of a frame interval apart). Returns a
    summary dict (night_dir, truth path, frames written, bad frames, seconds
    per frame).
    """
    if write_mode not in ("rename", "in-place"):
        raise ValueError(f"write_mode must be 'rename' or 'in-place', not {write_mode!r}")
    datadir = Path(datadir)
    sim = NightSimulator(cfg, night)
    night_id = f"{night}{cfg.site}{cfg.camera}"
    raw_dir = datadir / night_id / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([cfg.seed, 7])
    for i in range(cfg.nbias):
        frame = sim.calibration_frame("bias", rng)
        _write_fits(raw_dir / f"calib_bias{i:02d}.fits", frame, {"IMAGETYP": "bias", "EXPTIME": 0.0, "SITE-OBS": cfg.site, "CAMERA": cfg.camera})
    for i in range(cfg.ndark):
        frame = sim.calibration_frame("dark", rng)
        _write_fits(raw_dir / f"calib_dark{i:02d}.fits", frame, {"IMAGETYP": "dark", "EXPTIME": EXPTIME, "SITE-OBS": cfg.site, "CAMERA": cfg.camera})

    n = len(sim.lstseqs)
    bad_idx = set()
    if cfg.bad_frames:
        bad_rng = np.random.default_rng([cfg.seed, 11])
        bad_idx = set(int(i) for i in bad_rng.choice(np.arange(1, n - 1), size=min(cfg.bad_frames, n - 2), replace=False))
    bad = {}
    truth_path = datadir / f"{night_id}.truth.hdf5"
    tmp_truth = truth_path.with_name(truth_path.name + ".part")
    rows: list[dict] = []
    t0 = time.perf_counter()
    interval = EXPTIME / live_speed if live_speed else 0.0
    for i, seq in enumerate(sim.lstseqs):
        frng = np.random.default_rng([cfg.seed, int(seq)])
        raw, header, truth = sim.render(int(seq), frng)
        path = raw_dir / f"{int(seq):08d}{cfg.site}{cfg.camera}.fits"
        if live_speed:  # the frame's exposure ends at its slot's end
            time.sleep(max(0.0, t0 + (i + 1) * interval - time.perf_counter()))
        if i in bad_idx:
            kind = _BAD_KINDS[len(bad) % len(_BAD_KINDS)]
            _break_frame(path, kind, raw, header)
            bad[int(seq)] = kind
        elif write_mode == "in-place":
            _write_fits_in_place(path, raw, header, pause=0.2 * interval)
        else:
            _write_fits(path, raw, header)
        rows.append(truth)
        if progress is not None:
            progress(i + 1, n)
    elapsed = time.perf_counter() - t0
    _write_truth(tmp_truth, sim, rows, bad)
    os.replace(tmp_truth, truth_path)
    return {
        "night_dir": str(datadir / night_id),
        "truth": str(truth_path),
        "frames": n,
        "bad_frames": bad,
        "seconds_per_frame": elapsed / max(n, 1),
    }


def _write_truth(path: Path, sim: NightSimulator, rows: list[dict], bad: dict[int, str]) -> None:
    cfg = sim.cfg
    keys = list(rows[0])
    table = {k: np.concatenate([r[k] for r in rows]) for k in keys}
    dtype = [(k, table[k].dtype) for k in keys]
    rec = np.empty(len(table["lstseq"]), dtype=dtype)
    for k in keys:
        rec[k] = table[k]
    with h5py.File(path, "w") as f:
        f.create_dataset("truth", data=rec, compression="gzip", compression_opts=1)
        st = sim.stars
        f.create_dataset("stars/ascc", data=st.ascc.astype("S12"))
        for k in ("ra", "dec", "vmag", "bmag"):
            f.create_dataset(f"stars/{k}", data=getattr(st, k))
        f.create_dataset("frames/lstseq", data=np.asarray(sim.lstseqs, np.int64))
        f.attrs["config"] = json.dumps(dataclasses.asdict(cfg))
        f.attrs["camera_model"] = json.dumps(sim.model0.to_dict())
        f.attrs["bad_frames"] = json.dumps({str(k): v for k, v in bad.items()})
        f.attrs["drift_dir"] = sim.drift_dir
        f.attrs["radii"] = np.array(TRUTH_RADII)


def load_truth(path: Path | str) -> dict:
    """Read a truth file: the frame-major ``truth`` table, the star table and the attributes."""
    with h5py.File(path, "r") as f:
        out = {
            "truth": f["truth"][...],
            "stars": {k: f["stars"][k][...] for k in f["stars"]},
            "lstseqs": f["frames/lstseq"][...],
            "config": json.loads(f.attrs["config"]),
            "camera_model": json.loads(f.attrs["camera_model"]),
            "bad_frames": {int(k): v for k, v in json.loads(f.attrs["bad_frames"]).items()},
        }
    out["stars"]["ascc"] = out["stars"]["ascc"].astype(str)
    return out


def truth_table(truth: dict, isolation_px: float = 8.0):
    """The truth rows as a pandas DataFrame with the star id and an ``isolated`` column.

    A star is isolated in a frame when no other rendered star lies within
    ``isolation_px`` of it.
    """
    import pandas as pd
    from scipy.spatial import cKDTree

    t = truth["truth"]
    df = pd.DataFrame({k: t[k] for k in t.dtype.names})
    df["ascc"] = truth["stars"]["ascc"][t["star"]]
    iso = np.ones(len(t), bool)
    for seq in np.unique(t["lstseq"]):
        m = np.flatnonzero(t["lstseq"] == seq)
        pairs = cKDTree(np.c_[t["x"][m], t["y"][m]]).query_pairs(isolation_px, output_type="ndarray")
        iso[m[pairs.ravel()]] = False
    df["isolated"] = iso
    return df


def join_with_truth(night_file: Path | str, truth: dict):
    """Rows of an fLC/sLC file joined with the truth of the same star and frame (truth columns end in ``_true``)."""
    import pandas as pd

    parts = []
    with h5py.File(night_file, "r") as f:
        for star in f["data"]:
            d = pd.DataFrame(f["data"][star][...])
            d["ascc"] = star
            parts.append(d)
    rows = pd.concat(parts, ignore_index=True)
    return rows.merge(truth_table(truth).add_suffix("_true"), left_on=["ascc", "lstseq"],
                      right_on=["ascc_true", "lstseq_true"])


def cli_simulate(args) -> int:
    """``mascara simulate``: write simulated nights for every requested night and camera."""
    from rich.progress import Progress

    nights = args.night.split("+")
    cameras = args.camera.split("+")
    if args.live and len(cameras) > 1:  # the cameras of a station observe at the same time
        import threading

        threads = []
        for night in nights:
            for cam in cameras:
                one = argparse.Namespace(**{**vars(args), "night": night, "camera": cam})
                threads.append(threading.Thread(target=cli_simulate, args=(one,)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return 0
    with Progress(transient=False) as progress:
        for night in nights:
            for cam in cameras:
                cfg = SimConfig(
                    site=args.site, camera=cam, size=args.size, nframes=args.frames, seed=args.seed,
                    clouds=args.clouds, pointing_offset=args.pointing_offset, bad_frames=args.bad_frames,
                    psf=args.psf,
                )
                task = progress.add_task(f"simulating {night}{args.site}{cam}", total=None)
                res = simulate_night(args.datadir, night, cfg, progress=lambda i, n: progress.update(task, completed=i, total=n),
                                     live_speed=args.speed if args.live else None, write_mode=args.write_mode)
                progress.console.print(
                    f"{Path(res['night_dir']).name}: {res['frames']} frames, "
                    f"{res['seconds_per_frame'] * 1000:.0f} ms/frame, truth in {res['truth']}"
                )
    return 0
