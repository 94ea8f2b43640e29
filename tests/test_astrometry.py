"""Tests of mascara.astrometry on synthetic images with a known true camera."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy.special import erf

from mascara.astrometry import (
    AstrometryFailed,
    _cutouts,
    correct_batch,
    detect_stars,
    estimate_background,
    fit_camera,
    initial_solution,
    measure_centroids,
)
from mascara.camera import CameraModel, nominal_camera, radial_distortion

SIGMA_PSF = 1.0  # px
TRAIL = 1.4  # px during the exposure
SKY = 1000.0  # ADU
GAIN = 0.62  # e-/ADU
READ_NOISE = 10.0  # ADU


# ---------------------------------------------------------------- synthetic data
def star_field(model: CameraModel, vmax: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stars uniform on the sphere around the camera axis, V counts growing as 10^(0.5 V).

    About 1.4 stars per square degree to V = 8.4 (the real sky's average).
    """
    rng = np.random.default_rng(seed)
    cap = np.arctan(0.5 * np.hypot(model.nx, model.ny) / model.scale) + np.radians(3.0)
    area_deg2 = 2 * np.pi * (1 - np.cos(cap)) * np.degrees(1) ** 2
    vmin = 2.0
    n = rng.poisson(1.4 * area_deg2 * (10 ** (0.5 * (vmax - 8.4)) - 10 ** (0.5 * (vmin - 8.4))))
    cz = rng.uniform(np.cos(cap), 1.0, n)
    phi = rng.uniform(0, 2 * np.pi, n)
    sz = np.sqrt(1 - cz**2)
    cam = np.stack([sz * np.cos(phi), sz * np.sin(phi), cz])
    p = model.rotation().T @ cam
    alt = np.degrees(np.arcsin(p[2]))
    az = np.degrees(np.arctan2(p[0], p[1])) % 360
    a, b = 10 ** (0.5 * vmin), 10 ** (0.5 * vmax)
    vmag = 2 * np.log10(a + rng.uniform(0, 1, n) * (b - a))
    return alt, az, vmag


def flux_of(vmag: np.ndarray) -> np.ndarray:
    return 3000.0 * 10 ** (-0.4 * (vmag - 8.0))


def render(model: CameraModel, alt, az, vmag, seed: int, trail_angle: float = 0.5,
           sky_gradient: float = 300.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image of trailed, pixel-integrated Gaussian stars on a sloped sky with noise.

    Returns (image, x, y): true mid-exposure positions of all stars.
    """
    rng = np.random.default_rng(seed)
    x, y = model.to_pixels(alt, az)
    f = flux_of(vmag)
    half = 7
    keep = model.in_image(x, y, margin=-half) & np.isfinite(x)
    xs, ys, fs = x[keep], y[keep], f[keep]
    ix, iy = np.rint(xs).astype(int), np.rint(ys).astype(int)
    off = np.arange(-half, half + 1)
    stamps = np.zeros((len(xs), 2 * half + 1, 2 * half + 1))
    s2 = np.sqrt(2) * SIGMA_PSF
    nsub = 9
    for t in np.linspace(-0.5, 0.5, nsub):
        cx = xs + t * TRAIL * np.cos(trail_angle)
        cy = ys + t * TRAIL * np.sin(trail_angle)
        px = ix[:, None] + off[None, :] - cx[:, None]
        py = iy[:, None] + off[None, :] - cy[:, None]
        ex = 0.5 * (erf((px + 0.5) / s2) - erf((px - 0.5) / s2))
        ey = 0.5 * (erf((py + 0.5) / s2) - erf((py - 0.5) / s2))
        stamps += ey[:, :, None] * ex[:, None, :] * (fs / nsub)[:, None, None]
    gx = ix[:, None, None] + off[None, None, :]
    gy = iy[:, None, None] + off[None, :, None]
    gx, gy = np.broadcast_arrays(gx, gy)
    inside = (gx >= 0) & (gx < model.nx) & (gy >= 0) & (gy < model.ny)
    flat = gy[inside] * model.nx + gx[inside]
    stars = np.bincount(flat, weights=stamps[inside], minlength=model.nx * model.ny)
    yy, xx = np.mgrid[0: model.ny, 0: model.nx]
    sky = SKY + sky_gradient * (xx / model.nx + 0.5 * yy / model.ny)
    expected = sky + stars.reshape(model.ny, model.nx)
    image = rng.poisson(expected * GAIN) / GAIN + rng.normal(0, READ_NOISE, expected.shape)
    return np.clip(image, 0, 65535), x, y


def true_camera(size: str, seed: int = 0, dalt=0.7, daz=-0.9, dth=0.8) -> CameraModel:
    """The nominal E camera moved by (dalt, daz, dth) deg, with a lens distortion
    of a few px at the corners (exaggerated for the small crop so that it matters)."""
    m = nominal_camera("LP", "E", size=size)
    m.alt0 += dalt
    m.az0 += daz
    m.th0 += dth
    k3 = 4.0 if size == "full" else 300.0
    m.dist_x, m.dist_y = radial_distortion(k3, k3 / 4)
    rng = np.random.default_rng(seed)
    r = 0.5 * np.hypot(m.nx, m.ny) / m.scale
    for k, deg in [(3, 2), (4, 2), (5, 2), (7, 3), (8, 3), (12, 4)]:
        m.dist_x[k] += rng.normal(0, 0.7) / r**deg
        m.dist_y[k] += rng.normal(0, 0.7) / r**deg
    return m


def field_error(a: CameraModel, b: CameraModel, n: int = 41) -> tuple[float, float]:
    """rms and max distance (px) between the pixel positions two models give over the image."""
    x, y = np.meshgrid(np.linspace(0, a.nx - 1, n), np.linspace(0, a.ny - 1, n))
    alt, az = a.to_altaz(x.ravel(), y.ravel())
    xb, yb = b.to_pixels(alt, az)
    d = np.hypot(xb - x.ravel(), yb - y.ravel())
    return float(np.sqrt(np.mean(d**2))), float(d.max())


def isolated_truth(x, y, vmag, radius=10.0, dmag=3.0) -> np.ndarray:
    """Reference isolation by brute force: no star brighter than V + dmag within radius."""
    d2 = (x[:, None] - x[None, :]) ** 2 + (y[:, None] - y[None, :]) ** 2
    brighter = vmag[None, :] < vmag[:, None] + dmag
    np.fill_diagonal(d2, np.inf)
    return ~np.any((d2 < radius**2) & brighter, axis=1)


@pytest.fixture(scope="module")
def small_scene():
    truth = true_camera("small")
    alt, az, vmag = star_field(truth, vmax=9.5, seed=1)
    image, x, y = render(truth, alt, az, vmag, seed=2)
    return truth, alt, az, vmag, image, x, y


# ---------------------------------------------------------------- centroids
def test_centroids_of_isolated_bright_stars(small_scene):
    truth, alt, az, vmag, image, x, y = small_scene
    inside = truth.in_image(x, y, margin=12)
    bright = inside & (vmag > 4) & (vmag <= 7.0)
    iso = np.zeros_like(bright)
    iso[inside] = isolated_truth(x[inside], y[inside], vmag[inside])
    sel = bright & iso
    assert sel.sum() > 40
    rng = np.random.default_rng(5)
    # predictions up to 2 px off
    px = x[sel] + rng.uniform(-1.5, 1.5, sel.sum())
    py = y[sel] + rng.uniform(-1.5, 1.5, sel.sum())
    xc, yc, ok = measure_centroids(image, px, py, box=7)
    assert ok.mean() > 0.97
    err = np.hypot(xc[ok] - x[sel][ok], yc[ok] - y[sel][ok])
    assert np.sqrt(np.mean(err**2)) < 0.05
    assert np.median(xc[ok] - x[sel][ok]) == pytest.approx(0, abs=0.01)  # no bias along the trail


@pytest.mark.parametrize("box", [5, 6, 7])
def test_the_centroid_kernel_agrees_with_the_array_form_it_replaced(small_scene, box):
    truth, alt, az, vmag, image, x, y = small_scene
    image = image.astype(np.float32)
    rng = np.random.default_rng(11)
    near = truth.in_image(x, y, margin=-20)  # stars near and beyond the edges too
    px = x[near] + rng.uniform(-1.5, 1.5, near.sum())
    py = y[near] + rng.uniform(-1.5, 1.5, near.sum())
    # NaN pixels next to some stars: in a box, on a cut-out's edge, in the window only
    for k, (dx, dy) in enumerate([(0, 0), (box // 2 + 3, 0), (0, -(box // 2 + 3)), (6, 6), (8, 0)]):
        j = int(np.rint(py[10 + k])) + dy
        i = int(np.rint(px[10 + k])) + dx
        if 0 <= j < image.shape[0] and 0 <= i < image.shape[1]:
            image[j, i] = np.nan
    px = np.r_[px, -5.0, np.nan, 2.0, 1e9]
    py = np.r_[py, 10.0, 10.0, np.nan, 3.0]
    xc, yc, ok = measure_centroids(image, px, py, box=box)
    xr, yr, okr = centroids_reference(image, px, py, box=box)
    assert ok.sum() > 100 and (~ok).sum() > 20
    # the array form iterates every star until all have converged, the kernel each until it has
    assert (ok != okr).sum() <= 0.002 * len(ok)
    both = ok & okr
    assert np.max(np.abs(xc[both] - xr[both])) < 1e-4
    assert np.max(np.abs(yc[both] - yr[both])) < 1e-4
    assert np.isnan(xc[~ok]).all() and np.isnan(yc[~ok]).all()


def test_centroids_fail_cleanly(small_scene):
    truth, alt, az, vmag, image, x, y = small_scene
    # off the image, NaN input, and an empty patch of sky far from any star
    d2 = np.min((x[:, None] - 500.0) ** 2 + (y[:, None] - np.arange(0, 668, 2.0)[None, :]) ** 2, axis=0)
    empty_y = np.arange(0, 668, 2.0)[np.argmax(d2)]
    xc, yc, ok = measure_centroids(image, np.array([-5.0, np.nan, 2.0, 500.0]),
                                   np.array([10.0, 10.0, 300.0, empty_y]))
    assert not ok[0] and not ok[1] and not ok[2]
    assert np.isnan(xc[0]) and np.isnan(xc[1])


# ---------------------------------------------------------------- fitting
def test_fit_camera_recovers_pointing_and_distortion_from_exact_positions():
    truth = true_camera("full", dalt=0.02, daz=-0.03, dth=0.05)
    start = nominal_camera("LP", "E")
    alt, az, vmag = star_field(truth, vmax=7.5, seed=3)
    x, y = truth.to_pixels(alt, az)
    inside = truth.in_image(x, y)
    rng = np.random.default_rng(0)
    xn = x[inside] + rng.normal(0, 0.03, inside.sum())
    yn = y[inside] + rng.normal(0, 0.03, inside.sum())
    # a few gross outliers, as bad matches would be
    xn[:5] += 20
    pointing, rms_p, _ = fit_camera(start, alt[inside], az[inside], xn, yn, fit="pointing", clip=1e3)
    assert rms_p > 0.3 and field_error(truth, pointing)[0] > 1.0  # no distortion in the model
    model, rms, used = fit_camera(pointing, alt[inside], az[inside], xn, yn, fit="distortion")
    assert not used[:5].any() and used.mean() > 0.95
    assert rms == pytest.approx(0.03 * np.sqrt(2), rel=0.15)
    frms, fmax = field_error(truth, model)
    assert frms < 0.02 and fmax < 0.1
    assert (model.x0, model.y0) == (truth.x0, truth.y0)
    with pytest.raises(AstrometryFailed):
        fit_camera(start, alt[:3], az[:3], x[:3], y[:3])


def test_fit_camera_zenith_camera():
    truth = nominal_camera("LS", "C")
    truth.alt0, truth.az0, truth.th0 = 89.6, 0.0, 271.0
    start = nominal_camera("LS", "C")
    alt, az, vmag = star_field(truth, vmax=6.5, seed=4)
    x, y = truth.to_pixels(alt, az)
    inside = truth.in_image(x, y)
    model, rms, _ = fit_camera(start, alt[inside], az[inside], x[inside], y[inside])
    assert rms < 1e-4
    assert field_error(truth, model)[1] < 1e-3


# ---------------------------------------------------------------- detection and initial solution
def test_background_follows_the_sky_gradient(small_scene):
    truth, alt, az, vmag, image, x, y = small_scene
    sky, rms = estimate_background(image)
    yy, xx = np.mgrid[0: truth.ny, 0: truth.nx]
    true_sky = SKY + 300.0 * (xx / truth.nx + 0.5 * yy / truth.ny)
    err = sky - true_sky
    assert np.median(np.abs(err)) < 3.0 and np.abs(err).max() < 15.0  # noise per px is ~41 ADU
    assert rms == pytest.approx(np.sqrt(SKY / GAIN + READ_NOISE**2), rel=0.15)


def test_detect_stars_finds_bright_stars(small_scene):
    truth, alt, az, vmag, image, x, y = small_scene
    det = detect_stars(image)
    bright = truth.in_image(x, y, margin=5) & (vmag < 7.0)
    d = np.hypot(det["x"][:, None] - x[None, bright], det["y"][:, None] - y[None, bright])
    found = (d.min(axis=0) < 0.5).mean()
    assert found > 0.95
    assert np.all(np.diff(det["flux"]) <= 0)


def test_initial_solution_small_camera_one_degree_off(small_scene):
    truth, alt, az, vmag, image, x, y = small_scene
    nominal = nominal_camera("LP", "E", size="small")
    assert field_error(truth, nominal)[0] > 40  # really ~1 deg off
    model, info = initial_solution(image, alt, az, vmag, nominal)
    frms, fmax = field_error(truth, model)
    assert frms < 0.1 and fmax < 0.3, (frms, fmax, info)
    assert info["rms"] < 0.1 and info["nmatched"] >= 60


def test_initial_solution_fails_on_an_empty_sky():
    nominal = nominal_camera("LP", "E", size="small")
    alt, az, vmag = star_field(nominal, vmax=9.0, seed=21)
    image, _, _ = render(nominal, alt, az, np.full_like(vmag, 30.0), seed=22)
    with pytest.raises(AstrometryFailed):
        initial_solution(image, alt, az, vmag, nominal)


def test_initial_solution_full_frame():
    truth = true_camera("full", seed=7, dalt=-0.8, daz=0.9, dth=-1.0)
    alt, az, vmag = star_field(truth, vmax=9.0, seed=8)
    image, x, y = render(truth, alt, az, vmag, seed=9)
    nominal = nominal_camera("LP", "E")
    t0 = time.perf_counter()
    model, info = initial_solution(image, alt, az, vmag, nominal)
    elapsed = time.perf_counter() - t0
    frms, fmax = field_error(truth, model)
    print(f"initial_solution full frame: {elapsed:.1f} s, field rms {frms:.3f} px, max {fmax:.3f} px, {info}")
    assert frms < 0.1 and fmax < 0.3


# ---------------------------------------------------------------- per-batch correction
def astrometric_stars(model: CameraModel, alt, az, vmag, x, y):
    inside = model.in_image(x, y, margin=12)
    iso = np.zeros_like(inside)
    iso[inside] = isolated_truth(x[inside], y[inside], vmag[inside])
    sel = (vmag > 4) & (vmag <= 7.5) & inside
    return sel, iso


def test_correct_batch_recovers_small_drift(small_scene):
    truth, alt, az, vmag, image, x, y = small_scene
    last = truth.copy()  # yesterday's solution; the camera has since drifted by a few px
    last.alt0 -= 0.08
    last.az0 += 0.06
    last.th0 += 0.15
    assert field_error(truth, last)[0] > 3.5  # more than box / 2: needs the wide first pass
    sel, iso = astrometric_stars(truth, alt, az, vmag, x, y)
    res = correct_batch(last, image, alt[sel], az[sel], vmag[sel], isolated=iso[sel])
    assert res.ok, res.message
    frms, fmax = field_error(truth, res.model)
    assert frms < 0.05 and fmax < 0.1
    assert res.rms < 0.1 and res.nstars >= 25
    assert np.array_equal(res.model.dist_x, last.dist_x)


def test_correct_batch_under_clouds_keeps_the_model():
    truth = true_camera("small", seed=3)
    alt, az, vmag = star_field(truth, vmax=9.5, seed=11)
    rng = np.random.default_rng(12)
    clear = rng.uniform(0, 1, len(vmag)) < 0.05  # 95 % of the stars lost to clouds
    vis = np.where(clear, vmag, 30.0)
    image, x, y = render(truth, alt, az, vis, seed=13)
    last = truth.copy()
    last.alt0 -= 0.03
    sel, iso = astrometric_stars(truth, alt, az, vmag, x, y)
    res = correct_batch(last, image, alt[sel], az[sel], vmag[sel], isolated=iso[sel])
    assert not res.ok
    assert res.model is last and res.model.alt0 == truth.alt0 - 0.03
    assert res.nstars < 25 and res.message


def test_correct_batch_rejects_bad_fit(small_scene):
    """Wrong stars (a shuffled catalogue) give either too few centroids or a large rms."""
    truth, alt, az, vmag, image, x, y = small_scene
    sel, iso = astrometric_stars(truth, alt, az, vmag, x, y)
    rng = np.random.default_rng(0)
    perm = rng.permutation(sel.sum())
    res = correct_batch(truth, image, alt[sel], az[sel][perm] + 0.3, vmag[sel], isolated=iso[sel])
    assert not res.ok and res.model is truth


# ------------------------------------------------------- reference (the array form before the kernel)
def centroids_reference(
    image: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    box: int = 7,
    window_sigma: float = 1.5,
    niter: int = 15,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The array form :func:`mascara.astrometry.measure_centroids` had before its numba kernel (stop 36):
    all stars at once, every iteration until all converge. Kept as the kernel's reference."""
    x = np.asarray(x, float).ravel()
    y = np.asarray(y, float).ravel()
    n = len(x)
    half = box // 2
    ring = half + 3
    xc = np.full(n, np.nan)
    yc = np.full(n, np.nan)
    ok = np.zeros(n, bool)
    good = np.isfinite(x) & np.isfinite(y)
    if not good.any():
        return xc, yc, ok
    idx = np.flatnonzero(good)
    cx, cy = x[idx].copy(), y[idx].copy()
    off = np.arange(-ring, ring + 1, dtype=float)
    edge = np.ones((2 * ring + 1, 2 * ring + 1), bool)
    edge[1:-1, 1:-1] = False
    alive = np.ones(len(idx), bool)

    # Centre of mass in the box, twice (the second on the re-centred box).
    for _ in range(2):
        ix, iy = np.rint(cx).astype(int), np.rint(cy).astype(int)
        cut, inside = _cutouts(image, ix, iy, ring)
        alive &= inside
        sky = np.median(cut[:, edge], axis=1)
        sub = cut[:, ring - half: ring + half + 1, ring - half: ring + half + 1] - sky[:, None, None]
        sub = np.clip(sub, 0.0, None)
        tot = sub.sum(axis=(1, 2))
        bo = off[ring - half: ring + half + 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            cx = ix + (sub.sum(axis=1) * bo).sum(axis=1) / tot
            cy = iy + (sub.sum(axis=2) * bo).sum(axis=1) / tot
        alive &= tot > 0
        cx = np.where(alive, cx, x[idx])
        cy = np.where(alive, cy, y[idx])

    # Windowed centroid on a fixed cut-out around the COM position; the
    # Gaussian window is separable, so the sums are two small contractions.
    whalf = int(np.ceil(4 * window_sigma))
    wring = whalf + 2
    ix, iy = np.rint(cx).astype(int), np.rint(cy).astype(int)
    cut, inside = _cutouts(image, ix, iy, wring)
    alive &= inside
    wedge = np.ones((2 * wring + 1, 2 * wring + 1), bool)
    wedge[1:-1, 1:-1] = False
    sky = np.median(cut[:, wedge], axis=1)
    sub = cut[:, 2:-2, 2:-2] - sky[:, None, None]
    woff = np.arange(-whalf, whalf + 1, dtype=float)
    converged = np.zeros(len(idx), bool)
    for _ in range(niter):
        dx = (ix - cx)[:, None] + woff[None, :]
        dy = (iy - cy)[:, None] + woff[None, :]
        wx = np.exp(-dx * dx / (2 * window_sigma**2))
        wy = np.exp(-dy * dy / (2 * window_sigma**2))
        rows = np.einsum("nji,ni->nj", sub, wx)  # sum over x with the x window
        cols = np.einsum("nji,nj->ni", sub, wy)
        sw = np.einsum("nj,nj->n", rows, wy)
        with np.errstate(invalid="ignore", divide="ignore"):
            stepx = 2.0 * np.einsum("ni,ni->n", cols, wx * dx) / sw
            stepy = 2.0 * np.einsum("nj,nj->n", rows, wy * dy) / sw
        stepx = np.clip(np.nan_to_num(stepx), -1.0, 1.0)
        stepy = np.clip(np.nan_to_num(stepy), -1.0, 1.0)
        cx = cx + stepx
        cy = cy + stepy
        converged = np.hypot(stepx, stepy) < 1e-4
        if converged[alive].all():
            break
    alive &= sw > 0
    moved = np.hypot(cx - x[idx], cy - y[idx])
    alive &= converged & np.isfinite(cx) & np.isfinite(cy) & (moved < box / 2)
    # the window must stay inside the cut-out
    alive &= (np.abs(cx - ix) < 1.0) & (np.abs(cy - iy) < 1.0)
    xc[idx] = np.where(alive, cx, np.nan)
    yc[idx] = np.where(alive, cy, np.nan)
    ok[idx] = alive
    return xc, yc, ok
