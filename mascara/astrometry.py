"""Astrometry: star centroids, camera-model fits, the initial solution and the
per-batch correction (SPEC §5; issue 6 items 2-3).

All positions are pixels in the science-region image (0-based, pixel (i, j) =
image[j, i] has its centre at x=i, y=j); all directions are apparent (alt, az)
in degrees. Nothing here reads files or knows about batches on disk.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numba import njit
from scipy.ndimage import uniform_filter
from scipy.optimize import least_squares
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from mascara.camera import (
    CameraModel,
    angles_from_rotation,
    coefficient_grid,
    evaluate_grid,
    monomials,
    term_powers,
    unit_vectors,
)


class AstrometryFailed(RuntimeError):
    """Too few stars or no convergence: no camera solution from this image."""


STAR_DTYPE = np.dtype([("x", "f8"), ("y", "f8"), ("flux", "f8")])

#: Search box (px) of the windowed centroids of the initial solution's final fit.
CENTROID_BOX = 7


# ---------------------------------------------------------------- centroids
def _cutouts(image: np.ndarray, ix: np.ndarray, iy: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2 half + 1, 2 half + 1) cut-outs centred on integer pixels; ``inside`` mask."""
    ny, nx = image.shape
    inside = (ix - half >= 0) & (ix + half < nx) & (iy - half >= 0) & (iy + half < ny)
    off = np.arange(-half, half + 1)
    jx = np.clip(ix[:, None, None] + off[None, None, :], 0, nx - 1)
    jy = np.clip(iy[:, None, None] + off[None, :, None], 0, ny - 1)
    return image[jy, jx].astype(float), inside


@njit(cache=True, nogil=True)
def _edge_median(image, ix, iy, ring, buf):
    """Median of the border pixels of the (2 ring + 1)^2 cut-out centred on (ix, iy); NaN if any is NaN."""
    m = 0
    for j in range(iy - ring, iy + ring + 1):
        if j == iy - ring or j == iy + ring:
            for i in range(ix - ring, ix + ring + 1):
                buf[m] = image[j, i]
                m += 1
        else:
            buf[m] = image[j, ix - ring]
            buf[m + 1] = image[j, ix + ring]
            m += 2
    for k in range(m):
        if np.isnan(buf[k]):
            return np.nan
    buf[:m].sort()  # in place: no array allocated per star
    if m % 2:
        return buf[m // 2]
    return (buf[m // 2 - 1] + buf[m // 2]) / 2.0


@njit(cache=True, nogil=True)
def _centroid_kernel(image, x, y, half, maxmove, wsigma, niter, xc, yc, ok):
    """One star after the other: the algorithm of :func:`measure_centroids`, which documents it."""
    ny, nx = image.shape
    ring = half + 3
    whalf = int(np.ceil(4 * wsigma))
    wring = whalf + 2
    nw = 2 * whalf + 1
    buf = np.empty(8 * max(ring, wring) + 4)
    sub = np.empty((nw, nw))
    wx = np.empty(nw)
    wy = np.empty(nw)
    dx = np.empty(nw)
    dy = np.empty(nw)
    rows = np.empty(nw)
    cols = np.empty(nw)
    two_s2 = 2.0 * wsigma * wsigma
    for s in range(len(x)):
        x0, y0 = x[s], y[s]
        if not (np.isfinite(x0) and np.isfinite(y0)):
            continue
        # centre of mass in the box, twice (the second on the re-centred box)
        cx, cy = x0, y0
        alive = True
        for _ in range(2):
            ix, iy = int(np.rint(cx)), int(np.rint(cy))
            if ix - ring < 0 or ix + ring >= nx or iy - ring < 0 or iy + ring >= ny:
                alive = False
                break
            sky = _edge_median(image, ix, iy, ring, buf)
            tot = 0.0
            mx = 0.0
            my = 0.0
            for j in range(-half, half + 1):
                for i in range(-half, half + 1):
                    v = image[iy + j, ix + i] - sky
                    if v < 0.0:
                        v = 0.0
                    elif not v >= 0.0:  # NaN: the star fails (as tot > 0 does in the array form)
                        tot = np.nan
                    tot += v
                    mx += v * i
                    my += v * j
            if not tot > 0.0:
                alive = False
                break
            cx = ix + mx / tot
            cy = iy + my / tot
        if not alive:
            continue
        # the Gaussian-windowed centroid on a fixed cut-out around the COM position
        ix, iy = int(np.rint(cx)), int(np.rint(cy))
        if ix - wring < 0 or ix + wring >= nx or iy - wring < 0 or iy + wring >= ny:
            continue
        sky = _edge_median(image, ix, iy, wring, buf)
        for j in range(nw):
            for i in range(nw):
                sub[j, i] = image[iy - whalf + j, ix - whalf + i] - sky
        converged = False
        sw = 0.0
        for _ in range(niter):
            for k in range(nw):
                dx[k] = (ix - cx) + (k - whalf)
                dy[k] = (iy - cy) + (k - whalf)
                wx[k] = np.exp(-dx[k] * dx[k] / two_s2)
                wy[k] = np.exp(-dy[k] * dy[k] / two_s2)
            for j in range(nw):
                r = 0.0
                for i in range(nw):
                    r += sub[j, i] * wx[i]
                rows[j] = r
            for i in range(nw):
                c = 0.0
                for j in range(nw):
                    c += sub[j, i] * wy[j]
                cols[i] = c
            sw = 0.0
            sx = 0.0
            sy = 0.0
            for k in range(nw):
                sw += rows[k] * wy[k]
                sx += cols[k] * wx[k] * dx[k]
                sy += rows[k] * wy[k] * dy[k]
            stepx = 2.0 * sx / sw
            stepy = 2.0 * sy / sw
            stepx = 0.0 if not np.isfinite(stepx) else min(max(stepx, -1.0), 1.0)
            stepy = 0.0 if not np.isfinite(stepy) else min(max(stepy, -1.0), 1.0)
            cx += stepx
            cy += stepy
            if np.hypot(stepx, stepy) < 1e-4:
                converged = True
                break
        if not (sw > 0.0 and converged and np.isfinite(cx) and np.isfinite(cy)):
            continue
        if not (np.hypot(cx - x0, cy - y0) < maxmove and abs(cx - ix) < 1.0 and abs(cy - iy) < 1.0):
            continue
        xc[s] = cx
        yc[s] = cy
        ok[s] = True


def measure_centroids(
    image: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    box: int = 7,
    window_sigma: float = 1.5,
    niter: int = 15,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centroids of stars near predicted positions.

    A centre-of-mass step in a ``box`` x ``box`` box (repeated on the re-centred
    box) finds the star; then the Gaussian-windowed centroid (the fixed point
    where the window-weighted first moment vanishes, as SExtractor's
    ``XWIN``) refines it. For a PSF symmetric about its centre, which a Gaussian
    trailed along a straight line is, that fixed point is the centre, free of
    the truncation bias of a plain box centroid. The local sky is the median of
    the edge of a cut-out 3 px larger than the box (COM step) or 2 px beyond
    4 window sigmas (windowed step), subtracted first (clipped at zero in the
    COM step). The windowed step is iterated until a step is below 1e-4 px,
    at most ``niter`` times. A numba kernel, star by star.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Calibrated image (ADU). NaN pixels make that star fail.
    x, y : ndarray, shape (N,)
        Predicted positions in pixels.
    box : int
        Search box size in pixels (odd; an even value is rounded up).
    window_sigma : float
        Sigma of the Gaussian window in pixels (about the PSF sigma).
    niter : int
        Maximum number of windowed-centroid iterations.

    Returns
    -------
    xc, yc : ndarray, shape (N,)
        Centroids in pixels (NaN where the measurement failed).
    ok : ndarray of bool, shape (N,)
        Finite, positive flux in the window, converged, inside the image and
        moved less than ``box / 2`` from the prediction.
    """
    x = np.ascontiguousarray(np.asarray(x, float).ravel())
    y = np.ascontiguousarray(np.asarray(y, float).ravel())
    n = len(x)
    xc = np.full(n, np.nan)
    yc = np.full(n, np.nan)
    ok = np.zeros(n, bool)
    if n:
        _centroid_kernel(np.asarray(image), x, y, int(box) // 2, box / 2, float(window_sigma), int(niter), xc, yc, ok)
    return xc, yc, ok


# ---------------------------------------------------------------- detection
def _linear_weights(g: np.ndarray, n: int) -> np.ndarray:
    """(len(g), n) weights of linear interpolation at fractional indices g
    (linear extrapolation beyond the end points, within half a block)."""
    if n == 1:
        return np.ones((len(g), 1))
    i0 = np.clip(np.floor(g).astype(int), 0, n - 2)
    f = g - i0
    w = np.zeros((len(g), n))
    rows = np.arange(len(g))
    w[rows, i0] = 1 - f
    w[rows, i0 + 1] = f
    return w


def estimate_background(image: np.ndarray, box: int = 64) -> tuple[np.ndarray, float]:
    """Smooth sky and the typical sky noise of an image, in ADU.

    The median of each ``box`` x ``box`` block (stars are too sparse to move
    it), a 3 x 3 median filter over the blocks (about a fitted plane) against
    bright stars and defects, then bilinear interpolation between block
    centres, extrapolated linearly to the image edges. The noise is 1.4826
    times the median absolute deviation of the sky-subtracted image.

    Returns
    -------
    sky : ndarray, shape of ``image``, float32
    rms : float

    Notes
    -----
    NaN pixels are not supported (a calibrated frame has none).
    """
    from scipy.ndimage import median_filter

    data = np.asarray(image, dtype=np.float32)
    ny, nx = data.shape
    by, bx = max(ny // box, 1), max(nx // box, 1)
    sy, sx = ny // by, nx // bx  # block size, close to box, blocks tile the centre
    oy, ox = (ny - by * sy) // 2, (nx - bx * sx) // 2
    blocks = data[oy: oy + by * sy, ox: ox + bx * sx].reshape(by, sy, bx, sx)
    grid = np.median(blocks.transpose(0, 2, 1, 3).reshape(by, bx, sy * sx), axis=2)
    # 3 x 3 median over blocks against bright stars, on the residual from a
    # plane so that a sky gradient is not flattened at the edges
    ky, kx = np.mgrid[0:by, 0:bx]
    basis = np.column_stack([np.ones(grid.size), ky.ravel(), kx.ravel()])
    coef = np.linalg.lstsq(basis, grid.ravel(), rcond=None)[0]
    plane = (basis @ coef).reshape(grid.shape)
    grid = plane + median_filter(grid - plane, size=3, mode="nearest")
    # bilinear interpolation as two small matrix products; block k has its
    # centre at pixel o + (k + 0.5) s
    wy = _linear_weights((np.arange(ny) - oy) / sy - 0.5, by)
    wx = _linear_weights((np.arange(nx) - ox) / sx - 0.5, bx)
    sky = (wy @ grid.astype(np.float64) @ wx.T).astype(np.float32)
    sample = (data - sky)[::3, ::3]
    med = np.median(sample)
    rms = 1.4826 * float(np.median(np.abs(sample - med)))
    return sky, rms


def detect_stars(
    image: np.ndarray,
    fwhm: float = 2.5,
    threshold_sigma: float = 10.0,
    max_stars: int = 2000,
    background_box: int = 64,
) -> np.ndarray:
    """Detect stars on an image with a sky gradient.

    The coarse sky of :func:`estimate_background` is subtracted; the image is
    smoothed with a Gaussian of the given FWHM (the matched filter of a point
    source on a flat background); local maxima of the smoothed image over 5 x 5
    px that exceed ``threshold_sigma`` times its noise are candidates; the
    ``max_stars`` highest are kept and measured with :func:`measure_centroids`.
    (photutils ``DAOStarFinder`` does much the same with sharpness and
    roundness tests, but takes 2-3x longer on a full frame.)

    Returns
    -------
    ndarray of :data:`STAR_DTYPE`, shape (<= max_stars,)
        ``x, y`` centroids in pixels and ``flux``, the sky-subtracted sum in a
        5 x 5 px box (ADU; for ranking), sorted by decreasing flux.
    """
    from scipy.ndimage import gaussian_filter, maximum_filter

    sky, _ = estimate_background(image, background_box)
    data = np.asarray(image, dtype=np.float32) - sky
    smooth = gaussian_filter(data, fwhm / 2.3548, mode="nearest")
    sample = smooth[::3, ::3]
    noise = 1.4826 * float(np.median(np.abs(sample - np.median(sample))))
    peaks = (smooth == maximum_filter(smooth, size=5, mode="nearest")) & (smooth > threshold_sigma * noise)
    jy, jx = np.nonzero(peaks)
    edge = 4
    inside = (jx >= edge) & (jx < image.shape[1] - edge) & (jy >= edge) & (jy < image.shape[0] - edge)
    jx, jy = jx[inside], jy[inside]
    order = np.argsort(-smooth[jy, jx], kind="stable")[:max_stars]
    jx, jy = jx[order], jy[order]
    xc, yc, ok = measure_centroids(data, jx.astype(float), jy.astype(float), box=5)
    box, _ = _cutouts(data, jx, jy, 2)
    out = np.zeros(int(ok.sum()), STAR_DTYPE)
    out["x"], out["y"] = xc[ok], yc[ok]
    out["flux"] = box.sum(axis=(1, 2))[ok]
    return out[np.argsort(-out["flux"], kind="stable")]


# ---------------------------------------------------------------- fitting
class _Fitter:
    """Residuals of a camera model as a function of a small, well-scaled parameter vector.

    Parameters (all in pixels at the field edge, so that they are comparable):
    three small rotations of the camera frame (times ``scale``); for
    ``order >= 1`` the linear terms without the roll-like antisymmetric part and
    without the constant terms (degenerate with the pointing); then every
    distortion term of degree 2..order, times ``h**degree`` with ``h`` the
    half-diagonal of the image in radians.
    """

    def __init__(self, model: CameraModel, alt: np.ndarray, az: np.ndarray, order: int):
        self.model = model
        self.p = unit_vectors(alt, az)
        self.r0 = model.rotation()
        self.order = order
        self.h = 0.5 * np.hypot(model.nx, model.ny) / model.scale
        powers = term_powers(model.order)
        self.higher = [k for k, (i, j) in enumerate(powers) if 2 <= i + j <= order]
        self.hscale = np.array([self.h ** sum(powers[k]) for k in self.higher])
        self.nparam = 3 + (3 + 2 * len(self.higher) if order >= 1 else 0)

    def apply(self, params: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rotation and distortion coefficients for ``params``."""
        m = self.model
        rot = Rotation.from_rotvec(params[:3] / m.scale).as_matrix() @ self.r0
        cx, cy = m.dist_x.copy(), m.dist_y.copy()
        if self.order >= 1:
            a, d, s = params[3:6] / self.h
            cx[1] += a
            cy[2] += d
            cx[2] += s
            cy[1] += s
            nh = len(self.higher)
            cx[self.higher] += params[6: 6 + nh] / self.hscale
            cy[self.higher] += params[6 + nh: 6 + 2 * nh] / self.hscale
        return rot, cx, cy

    def positions(self, params: np.ndarray, sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = self.model
        rot, cx, cy = self.apply(params)
        cam = rot @ self.p[:, sel]
        u = cam[0] / cam[2]
        v = cam[1] / cam[2]
        d = evaluate_grid(coefficient_grid(cx, cy, m.order), u, v)
        return m.x0 + m.scale * u + d[0], m.y0 + m.scale * v + d[1]

    def jacobian(self, params: np.ndarray, sel: np.ndarray) -> np.ndarray:
        """d(x, y)/d(params), shape (2 len(sel), nparam): the distortion columns
        are exact (the model is linear in them), the three rotations by central
        differences of 1e-3 px."""
        m = self.model
        n = len(sel)
        jac = np.zeros((2 * n, self.nparam))
        step = 1e-3
        for k in range(3):
            hi, lo = params.copy(), params.copy()
            hi[k] += step
            lo[k] -= step
            xh, yh = self.positions(hi, sel)
            xl, yl = self.positions(lo, sel)
            jac[:n, k] = (xh - xl) / (2 * step)
            jac[n:, k] = (yh - yl) / (2 * step)
        if self.order >= 1:
            rot, _, _ = self.apply(params)
            cam = rot @ self.p[:, sel]
            u = cam[0] / cam[2]
            v = cam[1] / cam[2]
            jac[:n, 3] = u / self.h
            jac[n:, 4] = v / self.h
            jac[:n, 5] = v / self.h
            jac[n:, 5] = u / self.h
            nh = len(self.higher)
            mono = monomials(u, v, m.order)[self.higher] / self.hscale[:, None]
            jac[:n, 6: 6 + nh] = mono.T
            jac[n:, 6 + nh: 6 + 2 * nh] = mono.T
        return jac

    def to_model(self, params: np.ndarray) -> CameraModel:
        rot, cx, cy = self.apply(params)
        alt0, az0, th0 = angles_from_rotation(rot, az_hint=self.model.az0)
        new = self.model.copy()
        new.alt0, new.az0, new.th0 = alt0, az0, th0
        new.dist_x, new.dist_y = cx, cy
        return new


def fit_camera(
    model: CameraModel,
    alt: np.ndarray,
    az: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    fit: str = "pointing",
    order: int | None = None,
    clip: float = 3.0,
    max_clip_iter: int = 10,
    min_clip_px: float = 0.3,
) -> tuple[CameraModel, float, np.ndarray]:
    """Least-squares fit of a camera model to matched stars, with sigma clipping.

    Parameters
    ----------
    model : CameraModel
        Starting model (not modified).
    alt, az : ndarray, shape (N,)
        Directions of the stars, degrees.
    x, y : ndarray, shape (N,)
        Measured pixel positions (NaN entries are ignored).
    fit : {"pointing", "distortion"}
        ``"pointing"``: ALT0, AZ0, TH0 only. ``"distortion"``: the pointing plus
        the distortion terms of degree 1..``order`` (the linear part without its
        roll-like antisymmetric combination; constant terms and X0, Y0 stay
        fixed: they are degenerate with the pointing). Terms above ``order``
        keep their values.
    order : int, optional
        Highest distortion degree fitted; default ``model.order``.
    clip : float
        Stars whose residual exceeds ``clip`` times the robust per-axis sigma
        are rejected, iteratively (rejected stars may come back), until the
        set of stars is stable.
    min_clip_px : float
        Residuals below this (px) are never clipped: centroid errors grow from
        ~0.02 px (V=5) to ~0.1 px (V=7.5), and a threshold from the median
        star alone would reject the honest faint half.

    Returns
    -------
    model : CameraModel
        The fitted model (a new object).
    rms : float
        rms of the residual distance ``sqrt(mean(dx^2 + dy^2))`` of the used stars, px.
    used : ndarray of bool, shape (N,)
        Stars kept by the clipping.

    Raises
    ------
    AstrometryFailed
        Fewer usable stars than the fit needs.
    """
    if fit not in ("pointing", "distortion"):
        raise ValueError(f"fit must be 'pointing' or 'distortion', not {fit!r}")
    alt = np.asarray(alt, float).ravel()
    az = np.asarray(az, float).ravel()
    x = np.asarray(x, float).ravel()
    y = np.asarray(y, float).ravel()
    fit_order = 0 if fit == "pointing" else min(model.order, model.order if order is None else order)
    fitter = _Fitter(model, alt, az, fit_order)
    min_stars = max(5, fitter.nparam // 2 + 5)
    valid = np.isfinite(alt) & np.isfinite(az) & np.isfinite(x) & np.isfinite(y)
    used = valid.copy()
    params = np.zeros(fitter.nparam)
    allstars = np.arange(len(x))
    for it in range(max_clip_iter + 1):
        if used.sum() < min_stars:
            raise AstrometryFailed(f"{used.sum()} stars for a '{fit}' fit needing {min_stars}")
        sel = np.flatnonzero(used)

        def residuals(p: np.ndarray) -> np.ndarray:
            px, py = fitter.positions(p, sel)
            return np.concatenate([px - x[sel], py - y[sel]])

        def jacobian(p: np.ndarray) -> np.ndarray:
            return fitter.jacobian(p, sel)

        if it == 0:
            # A robust loss first, so that gross mismatches do not bend the
            # model and drag good stars out with them at the first clipping.
            res = least_squares(residuals, params, jac=jacobian, method="trf",
                                loss="soft_l1", f_scale=0.5)
        else:
            res = least_squares(residuals, params, jac=jacobian, method="lm")
        if not np.all(np.isfinite(res.x)):
            raise AstrometryFailed("camera fit did not converge")
        params = res.x
        fit_used = used
        px, py = fitter.positions(params, allstars)
        r2 = (px - x) ** 2 + (py - y) ** 2
        sigma = np.sqrt(np.median(r2[used]) / (2 * np.log(2)))  # per-axis, robust
        with np.errstate(invalid="ignore"):
            new_used = valid & (r2 <= max(clip * sigma, min_clip_px) ** 2)
        if it > 0 and np.array_equal(new_used, used):
            break
        used = new_used
    rms = float(np.sqrt(np.mean(r2[fit_used])))
    return fitter.to_model(params), rms, fit_used


# ---------------------------------------------------------------- matching
def _isolated(x: np.ndarray, y: np.ndarray, vmag: np.ndarray, radius: float, dmag: float) -> np.ndarray:
    """True for stars with no other star within ``radius`` px brighter than their V + dmag."""
    ok = np.isfinite(x) & np.isfinite(y)
    iso = ok.copy()
    idx = np.flatnonzero(ok)
    if len(idx) < 2:
        return iso
    tree = cKDTree(np.column_stack([x[idx], y[idx]]))
    pairs = tree.query_pairs(radius, output_type="ndarray")
    if len(pairs):
        i, j = idx[pairs[:, 0]], idx[pairs[:, 1]]
        iso[i[vmag[j] < vmag[i] + dmag]] = False
        iso[j[vmag[i] < vmag[j] + dmag]] = False
    return iso


def _match(px: np.ndarray, py: np.ndarray, dx: np.ndarray, dy: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one nearest matches of predictions (px, py) to detections (dx, dy) within radius.

    Returns index arrays (i_pred, i_det). A detection claimed by several
    predictions is dropped altogether (ambiguous).
    """
    fin = np.flatnonzero(np.isfinite(px) & np.isfinite(py))
    if len(fin) == 0 or len(dx) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    tree = cKDTree(np.column_stack([dx, dy]))
    dist, j = tree.query(np.column_stack([px[fin], py[fin]]), distance_upper_bound=radius)
    hit = np.isfinite(dist)
    i_pred, i_det = fin[hit], j[hit]
    counts = np.bincount(i_det, minlength=len(dx))
    unique = counts[i_det] == 1
    return i_pred[unique], i_det[unique]


def _vote_offset(
    det_x: np.ndarray, det_y: np.ndarray, cat_x: np.ndarray, cat_y: np.ndarray,
    reach: float, binsize: float,
) -> tuple[float, float, int]:
    """Most common detection-minus-prediction offset: (dx, dy, votes)."""
    ddx = (det_x[:, None] - cat_x[None, :]).ravel()
    ddy = (det_y[:, None] - cat_y[None, :]).ravel()
    near = (np.abs(ddx) < reach) & (np.abs(ddy) < reach)
    ddx, ddy = ddx[near], ddy[near]
    nb = int(np.ceil(2 * reach / binsize))
    edges = np.linspace(-reach, reach, nb + 1)
    hist, _, _ = np.histogram2d(ddx, ddy, bins=[edges, edges])
    # 2x2 sums so that a peak split over bin edges still counts in full
    summed = uniform_filter(hist, size=2, mode="constant") * 4
    i, j = np.unravel_index(np.argmax(summed), summed.shape)
    cxo, cyo = edges[i], edges[j]  # the 2x2 block is centred on this corner
    sel = (np.abs(ddx - cxo) <= binsize) & (np.abs(ddy - cyo) <= binsize)
    if not sel.any():
        return 0.0, 0.0, 0
    return float(np.median(ddx[sel])), float(np.median(ddy[sel])), int(sel.sum())


def _affordable_order(nstars: int, max_order: int, stars_per_param: float = 5.0) -> int:
    """Highest distortion order whose parameters ``nstars`` constrain well.

    With too few stars for the number of terms, the polynomial follows the
    noise and swings at the corners of the field where no star pins it.
    """
    for order in range(max_order, 0, -1):
        nparam = 3 + 3 + 2 * sum(n + 1 for n in range(2, order + 1))
        if nstars >= stars_per_param * nparam:
            return order
    return 0


def initial_solution(
    image: np.ndarray,
    alt: np.ndarray,
    az: np.ndarray,
    vmag: np.ndarray,
    nominal: CameraModel,
    max_offset_deg: float = 1.5,
    vmag_centroid: float = 7.5,
    min_alt: float = 15.0,
) -> tuple[CameraModel, dict[str, float]]:
    """Find the pointing and distortion of a camera from one image, starting from nominal.

    Steps: detect stars; predict the brightest catalogue stars above
    ``min_alt`` with the nominal model; for a grid of trial rolls, vote on the
    offset between every detection and every prediction (2-D histogram of pair
    differences) and keep the roll and offset with the most votes; match within
    a shrinking radius and fit the pointing, then the distortion of increasing
    order with more and fainter stars; finally re-measure centroids of the
    isolated stars with V <= ``vmag_centroid`` and fit the distortion to the
    highest order (<= 5) that the number of stars supports (5 needs ~210 stars:
    a full frame has ~1,300; the small crop ~130, which affords order 3).

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Calibrated image (ADU) of the camera.
    alt, az, vmag : ndarray, shape (N,)
        Apparent directions (degrees) and V of catalogue stars at the image's
        time; fainter stars make the isolation test reliable.
    nominal : CameraModel
        Starting model; the truth may be ``max_offset_deg`` off in pointing and
        roll.

    Returns
    -------
    model : CameraModel
    info : dict
        ``rms`` (px, final fit), ``nmatched`` (stars in the final fit),
        ``nvotes`` (pairs supporting the offset found), ``order`` (distortion
        order of the final fit; 0 if it was skipped), ``droll`` (deg, roll
        found by the vote), ``offset_px`` (offset found by the vote).

    Raises
    ------
    AstrometryFailed
        Too few stars detected or matched.
    """
    alt = np.asarray(alt, float)
    az = np.asarray(az, float)
    vmag = np.asarray(vmag, float)
    det = detect_stars(image, max_stars=2000)
    if len(det) < 10:
        raise AstrometryFailed(f"only {len(det)} stars detected")
    up = np.flatnonzero(alt > min_alt)
    px, py = nominal.to_pixels(alt[up], az[up])
    reach = np.radians(max_offset_deg) * nominal.scale + 20.0  # px
    inview = up[nominal.in_image(px, py, margin=-reach)]
    order_v = inview[np.argsort(vmag[inview], kind="stable")]

    # -- vote on roll and offset with the brightest stars
    nbright = min(len(det), 300)
    cat = order_v[: int(1.2 * nbright)]
    rmax = 0.5 * np.hypot(nominal.nx, nominal.ny)
    binsize = 8.0
    step = np.degrees(binsize / rmax)
    rolls = np.arange(-max_offset_deg, max_offset_deg + 0.5 * step, step)
    best = (-1, 0.0, 0.0, 0.0)
    for droll in rolls:
        trial = nominal.copy()
        trial.th0 += droll
        cx, cy = trial.to_pixels(alt[cat], az[cat])
        dx, dy, votes = _vote_offset(det["x"][:nbright], det["y"][:nbright], cx, cy, reach, binsize)
        if votes > best[0]:
            best = (votes, float(droll), dx, dy)
    votes, droll, offx, offy = best
    if votes < 6:
        raise AstrometryFailed(f"no consistent offset between detections and catalogue ({votes} votes)")
    model = nominal.copy()
    model.th0 += droll

    # -- match and fit: shrinking radius, growing order, more stars
    stages = [(binsize, "pointing", 0, 1.0), (5.0, "pointing", 0, 2.0),
              (4.0, "distortion", 2, 4.0), (3.0, "distortion", 3, 6.0), (2.0, "distortion", 5, 6.0)]
    shift = np.array([offx, offy])
    used_n = 0
    for radius, fit, order, ncat_factor in stages:
        ncat = min(len(order_v), int(ncat_factor * len(det)))
        cat = order_v[:ncat]
        cx, cy = model.to_pixels(alt[cat], az[cat])
        iso = _isolated(cx, cy, vmag[cat], 2.5 * radius, 2.5)
        ip, idet = _match(cx[iso] + shift[0], cy[iso] + shift[1], det["x"], det["y"], radius)
        stars = cat[iso][ip]
        if fit == "distortion":
            order = _affordable_order(len(stars), order)
            fit = "distortion" if order else "pointing"
        model, rms, used = fit_camera(model, alt[stars], az[stars], det["x"][idet], det["y"][idet],
                                      fit=fit, order=order or None)
        used_n = int(used.sum())
        shift[:] = 0.0  # the fitted model now carries the offset

    # -- final: windowed centroids of isolated astrometric stars, order-5 fit
    allx, ally = model.to_pixels(alt[up], az[up])
    iso = _isolated(allx, ally, vmag[up], 6.0, 2.5)
    cand = up[iso & (vmag[up] <= vmag_centroid) & model.in_image(allx, ally, margin=12)]
    cx, cy = model.to_pixels(alt[cand], az[cand])
    xc, yc, ok = measure_centroids(image, cx, cy, box=CENTROID_BOX)
    final_order = _affordable_order(int(ok.sum()), model.order)
    if final_order >= 2:
        # Terms above the affordable order came from the rougher detections:
        # drop them rather than let them swing the unconstrained corners.
        high = np.array([i + j > final_order for i, j in term_powers(model.order)])
        model.dist_x[high] = 0.0
        model.dist_y[high] = 0.0
        # Where the dropped terms were large (a star near a corner, beyond the detections) the truncated
        # model can put a candidate pixels to thousands of pixels from its centroid, and one such star
        # dragged the robust first fit into a false minimum (rms 4.6 px instead of 0.022 after a 1e-4 px
        # change of every centroid): the fit starts from the stars the truncated model places within half
        # the centroid box, as it would have had to find them.
        sx, sy = model.to_pixels(alt[cand], az[cand])
        with np.errstate(invalid="ignore"):
            ok &= np.hypot(sx - xc, sy - yc) < CENTROID_BOX / 2
        model, rms, used = fit_camera(model, alt[cand][ok], az[cand][ok], xc[ok], yc[ok],
                                      fit="distortion", order=final_order)
        used_n = int(used.sum())
    info = {"rms": float(rms), "nmatched": used_n, "nvotes": int(votes), "order": final_order,
            "droll": float(droll), "offset_px": float(np.hypot(offx, offy))}
    return model, info


# ---------------------------------------------------------------- per batch
@dataclasses.dataclass
class AstrometryResult:
    """Outcome of the per-batch correction.

    ``model`` is the corrected model when ``ok``, else the input model
    unchanged; ``rms`` (px) and ``nstars`` describe the fit (``nstars`` = good
    centroids when the fit was not attempted); ``message`` says why it failed.
    """

    model: CameraModel
    rms: float
    nstars: int
    ok: bool
    message: str = ""


def correct_batch(
    model: CameraModel,
    image: np.ndarray,
    alt: np.ndarray,
    az: np.ndarray,
    vmag: np.ndarray,
    isolated: np.ndarray | None = None,
    min_stars: int = 25,
    max_rms: float = 0.5,
    box: int = 7,
    search_box: int = 15,
    edge_margin: float = 12.0,
    clip: float = 3.0,
) -> AstrometryResult:
    """Per-batch astrometric correction: refit the pointing on the middle frame.

    Only ALT0, AZ0, TH0 are refitted: a camera that moves (flexure, thermal
    drift, a bump) turns as a rigid body, which is exactly these three angles,
    while the lens distortion is stable and was found by
    :func:`initial_solution` from many more stars. Three parameters stay well
    determined with 25 stars, under clouds and at the field edges.

    Parameters
    ----------
    model : CameraModel
        The last good solution.
    image : ndarray, shape (ny, nx)
        Middle frame (or binned image) of the batch, calibrated, ADU.
    alt, az, vmag : ndarray, shape (N,)
        Apparent directions (degrees) and V of the astrometric stars at that
        frame's time (the caller's cut, SPEC §4: 4 < V <= 7.5). ``vmag`` is not
        used by the fit today (all stars weigh the same; the clipping floor of
        :func:`fit_camera` keeps the fainter ones).
    isolated : ndarray of bool, optional
        Which of them are isolated; default all.
    box, search_box : int
        Centroid boxes (px) of the final pass and of a first, wide pass that
        catches drifts up to ``search_box / 2`` px.
    edge_margin : float
        Stars predicted closer than this to the image edge are not used.

    Returns
    -------
    AstrometryResult
        ``ok`` False (and the input model) with fewer than ``min_stars`` good
        centroids, a failed fit, or ``rms > max_rms`` px.
    """
    alt = np.asarray(alt, float).ravel()
    az = np.asarray(az, float).ravel()
    sel = np.ones(len(alt), bool) if isolated is None else np.asarray(isolated, bool).ravel()
    x, y = model.to_pixels(alt, az)
    sel &= model.in_image(x, y, margin=edge_margin)
    idx = np.flatnonzero(sel)
    start = model
    # A first pass with a wide search box catches drifts larger than box / 2.
    xc, yc, ok = measure_centroids(image, x[idx], y[idx], box=search_box)
    if ok.sum() >= min_stars:
        try:
            start, _, _ = fit_camera(model, alt[idx][ok], az[idx][ok], xc[ok], yc[ok],
                                     fit="pointing", clip=clip)
        except AstrometryFailed:
            start = model
    x, y = start.to_pixels(alt[idx], az[idx])
    xc, yc, ok = measure_centroids(image, x, y, box=box)
    ngood = int(ok.sum())
    if ngood < min_stars:
        return AstrometryResult(model, float("nan"), ngood, False,
                                f"{ngood} good centroids < {min_stars}")
    try:
        new, rms, used = fit_camera(start, alt[idx][ok], az[idx][ok], xc[ok], yc[ok],
                                    fit="pointing", clip=clip)
    except AstrometryFailed as exc:
        return AstrometryResult(model, float("nan"), ngood, False, str(exc))
    nused = int(used.sum())
    if nused < min_stars:
        return AstrometryResult(model, rms, nused, False, f"{nused} stars after clipping < {min_stars}")
    if rms > max_rms:
        return AstrometryResult(model, rms, nused, False, f"rms {rms:.3f} px > {max_rms}")
    return AstrometryResult(new, rms, nused, True, "")
