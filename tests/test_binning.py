"""The stacker: registration by per-tile shifts, counts, noise of the average."""

from __future__ import annotations

import numpy as np
import pytest

from mascara.binning import Stacker, stack_frames, tile_grid, tile_shape

from starfield import gaussian_stars


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


@pytest.mark.parametrize("order", [0, 1])
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
        assert 0.5 < ratio < 1.0  # interpolation smooths further


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
