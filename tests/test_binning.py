"""The stacker: registration by per-tile shifts, counts, noise of the average."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from mascara.binning import Stacker, cubic_weights, stack_frames, thread_stacker, tile_grid, tile_shape
from mascara.photometry import SkyNoiseModel, measure_apertures

from starfield import gaussian_stars, moffat_stars


def test_tile_grid_centres():
    xc, yc = tile_grid((70, 100), 32)
    assert xc.shape == yc.shape == tile_shape((70, 100), 32) == (3, 4)
    # Tiles x: 0-31, 32-63, 64-95, 96-99; y: 0-31, 32-63, 64-69.
    np.testing.assert_allclose(xc[0], [15.5, 47.5, 79.5, 97.5])
    np.testing.assert_allclose(yc[:, 0], [15.5, 47.5, 66.5])
    assert np.all(xc == xc[0]) and np.all(yc.T == yc[:, 0])


def brute_force_stack(frames, sx, sy, tile):
    """Independent reference: explicit loops over tiles with integer shifts."""
    ny, nx = frames[0].shape
    total = np.zeros((ny, nx))
    count = np.zeros((ny, nx), dtype=int)
    for n, frame in enumerate(frames):
        for ty in range(sx.shape[1]):
            for tx in range(sx.shape[2]):
                for y in range(ty * tile, min((ty + 1) * tile, ny)):
                    for x in range(tx * tile, min((tx + 1) * tile, nx)):
                        xs, ys = x + sx[n, ty, tx], y + sy[n, ty, tx]
                        if 0 <= xs < nx and 0 <= ys < ny:
                            total[y, x] += frame[ys, xs]
                            count[y, x] += 1
    with np.errstate(invalid="ignore"):
        return total / count, count


def test_integer_shifts_equal_brute_force_including_borders():
    rng = np.random.default_rng(4)
    ny, nx, tile, n = 45, 70, 16, 6
    frames = [rng.normal(100.0, 10.0, (ny, nx)).astype(np.float32) for _ in range(n)]
    nt = tile_shape((ny, nx), tile)
    sx = rng.integers(-20, 21, (n, *nt))
    sy = rng.integers(-12, 13, (n, *nt))
    sx[0, 0, 0] = 200  # a tile whose source lies entirely off the frame
    ref, ref_count = brute_force_stack(frames, sx, sy, tile)
    # Shifts within 0.5 px of the integers round to them.
    jitter = rng.uniform(-0.45, 0.45, sx.shape)
    binned, count = stack_frames(frames, sx + jitter, sy - jitter, tile=tile)
    np.testing.assert_array_equal(count, ref_count)
    assert count.min() < n and count.max() == n
    np.testing.assert_allclose(binned, ref, rtol=1e-6, equal_nan=True)
    assert np.isnan(binned[count == 0]).all()


def test_nonfinite_shift_skips_tile():
    frames = [np.ones((40, 40)), 3 * np.ones((40, 40))]
    dx = np.zeros((2, 2, 2))
    dy = np.zeros((2, 2, 2))
    dx[1, 1, 1] = np.nan
    binned, count = stack_frames(frames, dx, dy, tile=20)
    assert count[30, 30] == 1 and binned[30, 30] == 1.0
    assert count[5, 5] == 2 and binned[5, 5] == 2.0


def centroid(img, x0, y0, half=6):
    i0, j0 = int(round(x0)), int(round(y0))
    cut = img[j0 - half:j0 + half + 1, i0 - half:i0 + half + 1]
    yy, xx = np.mgrid[j0 - half:j0 + half + 1, i0 - half:i0 + half + 1]
    w = cut - np.median(img)
    return (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()


def moving_star_batch(rng, integer, nframes=30, tile=32, shape=(128, 192)):
    """Stars near tile centres; each tile moves with its own (smooth) shift per frame."""
    xc, yc = tile_grid(shape, tile)
    xs = (xc + rng.uniform(-3, 3, xc.shape)).ravel()
    ys = (yc + rng.uniform(-3, 3, yc.shape)).ravel()
    t = np.arange(nframes) - nframes // 2
    # Sidereal-like drift of 1.6 px/frame in x with a field-dependent part.
    dx = 1.6 * t[:, None, None] + 0.004 * (yc - 64.0) * t[:, None, None]
    dy = -0.3 * t[:, None, None] + 0.004 * (xc - 96.0) * t[:, None, None]
    if integer:
        dx, dy = np.round(dx), np.round(dy)
    frames = []
    for n in range(nframes):
        star_dx = dx[n].ravel()
        star_dy = dy[n].ravel()
        img = gaussian_stars(shape, xs + star_dx, ys + star_dy, np.full(xs.size, 5e4), sigma=1.3)
        frames.append(img + rng.normal(200.0, 2.0, shape))
    return frames, dx, dy, xs, ys


@pytest.mark.parametrize("integer", [True, False])
def test_stars_land_on_reference_positions(integer):
    rng = np.random.default_rng(7)
    frames, dx, dy, xs, ys = moving_star_batch(rng, integer)
    binned, count = stack_frames(frames, dx, dy, tile=32)
    tol = 0.1 if integer else 0.3
    # The stars of tiles whose sources stayed on every frame.
    for x0, y0 in zip(xs, ys):
        if count[int(round(y0)), int(round(x0))] < len(frames) // 2:
            continue
        cx, cy = centroid(binned, x0, y0)
        assert abs(cx - x0) < tol and abs(cy - y0) < tol, (x0, y0, cx, cy)
    # Without registration the stars would be smeared far from there.
    naive = np.mean(frames, axis=0)
    peak_ratio = binned[int(round(ys[5])), int(round(xs[5]))] / naive[int(round(ys[5])), int(round(xs[5]))]
    assert peak_ratio > 3


def test_linear_order_keeps_centroids_of_fractional_shifts():
    rng = np.random.default_rng(8)
    frames, dx, dy, xs, ys = moving_star_batch(rng, integer=False)
    binned, count = stack_frames(frames, dx, dy, tile=32, order=1)
    errs = []
    for x0, y0 in zip(xs, ys):
        if count[int(round(y0)), int(round(x0))] == len(frames):
            cx, cy = centroid(binned, x0, y0)
            errs.append(max(abs(cx - x0), abs(cy - y0)))
    assert len(errs) >= 4 and max(errs) < 0.1


@pytest.mark.parametrize("order", [0, 1, 3])
def test_noise_of_average_drops_as_sqrt_n(order):
    rng = np.random.default_rng(9)
    shape, sigma, nframes = (96, 128), 10.0, 40
    frames = [rng.normal(500.0, sigma, shape) for _ in range(nframes)]
    nt = tile_shape(shape, 32)
    dx = rng.uniform(-6, 6, (nframes, *nt))
    dy = rng.uniform(-6, 6, (nframes, *nt))
    binned, count = stack_frames(frames, dx, dy, tile=32, order=order)
    full = count == nframes
    assert full.sum() > 0.5 * count.size
    np.testing.assert_allclose(np.mean(binned[full]), 500.0, atol=0.2)
    ratio = np.std(binned[full]) / (sigma / np.sqrt(nframes))
    if order == 0:
        assert 0.93 < ratio < 1.07  # copies: exactly the sqrt(N) law
    else:
        assert 0.5 < ratio < 1.0  # interpolation smooths each pixel (correlating neighbours)


def test_stacker_incremental_equals_stack_frames_and_checks_shapes():
    rng = np.random.default_rng(10)
    frames = [rng.normal(0, 1, (50, 60)) for _ in range(3)]
    dx = rng.normal(0, 3, (3, 2, 2))
    dy = rng.normal(0, 3, (3, 2, 2))
    st = Stacker((50, 60), tile=32)
    for n in range(3):
        st.add(frames[n], dx[n], dy[n])
    b1, c1 = st.result()
    b2, c2 = stack_frames(frames, dx, dy, tile=32)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(b1, b2)
    with pytest.raises(ValueError):
        st.add(frames[0], dx[0][:1], dy[0])
    with pytest.raises(ValueError):
        st.add(np.zeros((5, 5)), dx[0], dy[0])


def _random_batch(rng, shape, tile, n, spread=6.0):
    """Frames and per-tile shifts large enough to leave partly covered tiles at every border."""
    frames = [rng.normal(100.0, 10.0, shape).astype(np.float32) for _ in range(n)]
    nt = tile_shape(shape, tile)
    dx = rng.uniform(-spread, spread, (n, *nt))
    dy = rng.uniform(-spread, spread, (n, *nt))
    dx[0, 0, 0] = np.nan  # a skipped tile
    return frames, dx, dy


@pytest.mark.parametrize("order", [0, 1, 3])
def test_finish_in_place_equals_result(order):
    """The in-place mean is the fresh-array mean bit for bit; min_count NaNs the thinly covered pixels."""
    rng = np.random.default_rng(order + 20)
    shape, tile = (70, 90), 16
    frames, dx, dy = _random_batch(rng, shape, tile, 5)
    st = Stacker(shape, tile, order)
    for n in range(5):
        st.add(frames[n], dx[n], dy[n])
    ref_binned, ref_count = st.result()
    assert (ref_count == 0).any() and (ref_count < 5).any()
    binned, count = st.finish(min_count=4)
    np.testing.assert_array_equal(count, ref_count)
    want = np.where(ref_count >= 4, ref_binned, np.nan)
    np.testing.assert_array_equal(binned, want)
    assert binned is st.sum  # no new arrays
    with pytest.raises(RuntimeError):
        st.add(frames[0], dx[0], dy[0])
    # uncovered pixels only, as result()
    st2 = Stacker(shape, tile, order)
    for n in range(5):
        st2.add(frames[n], dx[n], dy[n])
    b2, _ = st2.finish()
    np.testing.assert_array_equal(b2, ref_binned)


def test_filled_is_the_finished_stack_with_zero_for_nan_in_one_reused_buffer():
    rng = np.random.default_rng(23)
    shape, tile = (70, 90), 16
    frames, dx, dy = _random_batch(rng, shape, tile, 5)
    st = Stacker(shape, tile, 3)
    for n in range(5):
        st.add(frames[n], dx[n], dy[n])
    with pytest.raises(RuntimeError):
        st.filled()  # not before finish()
    binned, _ = st.finish(min_count=4)
    assert np.isnan(binned).any()
    filled = st.filled()
    assert filled.dtype == np.float32 and filled is not binned
    np.testing.assert_array_equal(filled, np.where(np.isfinite(binned), binned, 0.0).astype(np.float32))
    st.reset()
    for n in range(2):
        st.add(frames[n], dx[n], dy[n])
    binned, _ = st.finish()
    assert st.filled() is filled  # the same buffer, overwritten
    np.testing.assert_array_equal(filled, np.where(np.isfinite(binned), binned, 0.0).astype(np.float32))


def test_thread_stacker_reused_and_reset_per_thread():
    """A thread's second batch gets the same (emptied) buffers and the same result as a fresh stacker."""
    rng = np.random.default_rng(31)
    shape, tile = (64, 80), 16
    first = _random_batch(rng, shape, tile, 4)
    second = _random_batch(rng, shape, tile, 3)
    st = thread_stacker(shape, tile, 3)
    for n in range(4):
        st.add(first[0][n], first[1][n], first[2][n])
    st.finish(min_count=3)
    again = thread_stacker(shape, tile, 3)
    assert again is st and again.nframes == 0
    for n in range(3):
        again.add(second[0][n], second[1][n], second[2][n])
    got = [np.array(a) for a in again.finish()]
    fresh = Stacker(shape, tile, 3)
    for n in range(3):
        fresh.add(second[0][n], second[1][n], second[2][n])
    want = fresh.result()
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    other = []
    t = threading.Thread(target=lambda: other.append(thread_stacker(shape, tile, 3)))
    t.start()
    t.join()
    assert other[0] is not st  # each thread has its own
    assert thread_stacker(shape, tile, 0) is not st  # another geometry: a new stacker


def test_cubic_weights_keep_flux_and_width():
    f = np.linspace(0.0, 0.999, 37)
    w = cubic_weights(f)
    taps = np.arange(-1, 3)[None, :]
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)  # flux
    np.testing.assert_allclose((w * taps).sum(axis=1), f, atol=1e-12)  # centroid
    np.testing.assert_allclose((w * (taps - f[:, None]) ** 2).sum(axis=1), 0.0, atol=1e-12)  # no widening


def test_cubic_order_equals_brute_force_including_borders():
    rng = np.random.default_rng(3)
    ny, nx, tile, n = 50, 75, 16, 4
    frames = [rng.normal(100.0, 10.0, (ny, nx)).astype(np.float32) for _ in range(n)]
    nt = tile_shape((ny, nx), tile)
    dx = rng.uniform(-6, 6, (n, *nt))
    dy = rng.uniform(-6, 6, (n, *nt))
    dx[1] = dx[1, 0, 0] + rng.uniform(0, 0.3, nt)  # neighbouring tiles sharing the integer shift
    dy[1] = 0.2
    binned, count = stack_frames(frames, dx, dy, tile=tile, order=3)
    total = np.zeros((ny, nx))
    ref_count = np.zeros((ny, nx), dtype=int)
    for k, frame in enumerate(frames):
        for ty in range(nt[0]):
            for tx in range(nt[1]):
                ix, iy = int(np.floor(dx[k, ty, tx])), int(np.floor(dy[k, ty, tx]))
                wx, wy = cubic_weights(dx[k, ty, tx] - ix), cubic_weights(dy[k, ty, tx] - iy)
                for y in range(ty * tile, min((ty + 1) * tile, ny)):
                    for x in range(tx * tile, min((tx + 1) * tile, nx)):
                        # the whole 4 x 4 support must lie on the frame
                        if x + ix - 1 >= 0 and x + ix + 2 < nx and y + iy - 1 >= 0 and y + iy + 2 < ny:
                            total[y, x] += wy @ frame[y + iy - 1:y + iy + 3, x + ix - 1:x + ix + 3] @ wx
                            ref_count[y, x] += 1
    np.testing.assert_array_equal(count, ref_count)
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(binned, total / ref_count, atol=1e-3, equal_nan=True)


def _moffat_batch(order, nframes=30, seed=5):
    """Moffat stars (FWHM 2 px, beta 3) moving 1.6 px per frame, stacked; per-frame and binned 2.5/4.5 px fluxes."""
    rng = np.random.default_rng(seed)
    shape, tile = (224, 288), 32
    xc, yc = tile_grid(shape, tile)
    keep = (xc > 60) & (xc < 230) & (yc > 40) & (yc < 190)
    xs = (xc + rng.uniform(-12, 12, xc.shape))[keep]
    ys = (yc + rng.uniform(-12, 12, yc.shape))[keep]
    ti = (ys // tile).astype(int), (xs // tile).astype(int)
    t = np.arange(nframes) - nframes // 2
    dx = 1.63 * t[:, None, None] + 0.003 * (yc - 112) * t[:, None, None]
    dy = -0.37 * t[:, None, None] + 0.003 * (xc - 144) * t[:, None, None]
    stacker = Stacker(shape, tile, order)
    fast = []
    for n in range(nframes):
        sx, sy = xs + dx[n][ti], ys + dy[n][ti]
        img = moffat_stars(shape, sx, sy, np.full(xs.size, 2e4)) + 700.0
        img += rng.normal(0.0, 1.0, shape) * np.sqrt(img / 0.62 + 49.0)
        fast.append(measure_apertures(img, sx, sy, (2.5, 4.5)))
        stacker.add(img.astype(np.float32), dx[n], dy[n])
    binned, _ = stacker.result()
    return fast, measure_apertures(binned, xs, ys, (2.5, 4.5), gain=0.62 * nframes)


@pytest.mark.parametrize("order, lo, hi", [(3, 0.99, 1.01), (1, 0.96, 0.985)])
def test_binned_small_aperture_flux_of_moffat_stars(order, lo, hi):
    """Cubic shifts keep the 2.5 px light within 1 %; bilinear shifts widen stars and lose about 2.5 %."""
    fast, slow = _moffat_batch(order)
    ratio = slow["flux0"] / np.mean([f["flux0"] for f in fast], axis=0)
    assert ratio.size >= 20 and np.isfinite(ratio).all()
    assert lo <= np.median(ratio) <= hi, np.median(ratio)
    ratio1 = slow["flux1"] / np.mean([f["flux1"] for f in fast], axis=0)
    assert 0.99 <= np.median(ratio1) <= 1.01


def test_sky_noise_model_gives_honest_errors_on_a_resampled_stack():
    """Aperture sums on a cubic stack of noise frames (sky with a gradient): scatter / eflux near 1 with
    the noise model fitted to one frame's photometry (the stack's own scatter is smoothed by the
    resampling and inflated by the gradient, which no longer hides in the noise)."""
    rng = np.random.default_rng(6)
    shape, tile, nframes = (384, 512), 32, 30
    nt = tile_shape(shape, tile)
    sky = 300.0 + 0.3 * np.arange(shape[0])[:, None] + np.zeros(shape)
    frames = [(sky + rng.normal(0.0, 1.0, shape) * np.sqrt(sky / 0.62 + 49.0)).astype(np.float32)
              for _ in range(nframes)]
    dx = rng.uniform(-5, 5, (nframes, *nt))
    dy = rng.uniform(-5, 5, (nframes, *nt))
    binned, _ = stack_frames(frames, dx, dy, tile=tile, order=3)
    per_frame = measure_apertures(frames[0], rng.uniform(30, 480, 400), rng.uniform(30, 350, 400))
    model = SkyNoiseModel(per_frame["sky"], per_frame["esky"], nframes)
    np.testing.assert_allclose(model(np.array([300.0, 400.0])),
                               np.sqrt((np.array([300.0, 400.0]) / 0.62 + 49.0) / nframes), rtol=0.05)
    xs, ys = rng.uniform(30, 480, 2000), rng.uniform(30, 350, 2000)
    honest = measure_apertures(binned, xs, ys, (2.5, 4.5), gain=1e9, sky_noise=model)
    for k in (0, 1):
        assert 0.9 <= np.std(honest[f"flux{k}"]) / np.median(honest[f"eflux{k}"]) <= 1.1
