"""Pixel-phase correction of binned fluxes (mascara.pixelphase)."""

from __future__ import annotations

import numpy as np

from mascara.photometry import aperture_sums
from mascara.pixelphase import PixelPhaseModel, add_phase_terms, phase_terms
from tests.starfield import moffat_stars


def test_phase_terms_are_one_on_pixel_centres_and_minus_one_between():
    t = phase_terms(np.array([3.0, 3.5, 3.5]), np.array([7.0, 7.0, 7.5]))
    np.testing.assert_allclose(t, [[1, 1, 1, 1, 1], [-1, 1, -1, 1, 1], [-1, -1, 1, 1, 1]], atol=1e-12)
    np.testing.assert_allclose(phase_terms(np.array([0.25]), np.array([0.0]))[0], [0, 1, 0, -1, 1], atol=1e-12)


def test_fit_recovers_coefficients_that_vary_over_the_field():
    """Ratios built from known coefficients that grow linearly across the CCD, with per-star scale
    factors and noise: the fit finds them within a few of its standard errors, and too few
    measurements give no correction at all."""
    rng = np.random.default_rng(1)
    shape = (400, 600)
    centre = np.array([0.004, 0.003, 0.001, 0.0005, 0.0])
    slope = np.array([0.003, -0.002, 0.0, 0.0005, 0.001])  # per unit of u = (x - 299.5) / 300
    star, x, y, ratio = [], [], [], []
    for s in range(1600):  # 64,000 points: enough for the quadratic field dependence
        x0, y0 = rng.uniform(20, 580), rng.uniform(20, 380)
        xs = x0 + 1.6 * np.arange(40) / 10 + rng.uniform(0, 1)
        ys = y0 - 0.4 * np.arange(40) / 10 + rng.uniform(0, 1)
        c = centre + slope * (xs.mean() - 299.5) / 300
        star.append(np.full(40, s))
        x.append(xs)
        y.append(ys)
        ratio.append(rng.uniform(0.6, 0.8) * (1 + phase_terms(xs, ys) @ c) * (1 + rng.normal(0, 0.003, 40)))
    star, x, y, ratio = (np.concatenate(a) for a in (star, x, y, ratio))
    model = PixelPhaseModel.fit(star, x, y, ratio, 0.003 * ratio, shape)
    assert model.npoints == star.size and model.coef.shape == (6, 5)
    for row, want in ((0, centre), (1, slope), (2, np.zeros(5))):
        got, err = model.coef[row], model.error[row]
        assert np.all(err > 0) and np.all(err < 0.001), err
        assert np.all(np.abs(got - want) < 4 * err + 1e-5), (row, got, want, err)
    np.testing.assert_allclose(model.coef_at(np.array([299.5, 599.5]), np.array([199.5, 199.5])),
                               [centre, centre + slope], atol=5e-4)
    # fewer points: a plane, then a constant, then nothing
    assert PixelPhaseModel.fit(star[:30000], x[:30000], y[:30000], ratio[:30000], 0.003 * ratio[:30000],
                               shape).coef.shape == (3, 5)
    assert PixelPhaseModel.fit(star[:5000], x[:5000], y[:5000], ratio[:5000], 0.003 * ratio[:5000],
                               shape).coef.shape == (1, 5)
    sparse = PixelPhaseModel.fit(star[:100], x[:100], y[:100], ratio[:100], 0.003 * ratio[:100], shape)
    assert sparse.npoints == 0 and np.all(sparse.coef == 0)
    assert np.all(sparse.correction(x[:3], y[:3], phase_terms(x[:3], y[:3])) == 1)


def test_correction_turns_a_single_phase_into_the_mean_over_phases_for_moffat_stars():
    """Noise-free pixel-integrated Moffat stars (FWHM 2.4 px, beta 3), each measured at 40 phases:
    the 2.5 px sum at one phase differs from the mean over the 40 by up to a few tenths of a percent;
    the model fitted on the 2.5/4.5 px ratios brings it within a small fraction of that."""
    rng = np.random.default_rng(3)
    shape, nstar, nframe = (200, 200), 36, 40
    gx, gy = np.meshgrid(np.arange(6), np.arange(6))
    x0, y0 = 25.0 + 30 * gx.ravel(), 25.0 + 30 * gy.ravel()
    star, xs, ys, ratios, small = [], [], [], [], []
    for n in range(nframe):
        x, y = x0 + rng.uniform(0, 1, nstar), y0 + rng.uniform(0, 1, nstar)
        img = moffat_stars(shape, x, y, np.full(nstar, 1e4), fwhm=2.4)
        sums = aperture_sums(img, x, y, (2.5, 4.5))
        star.append(np.arange(nstar))
        xs.append(x)
        ys.append(y)
        ratios.append(sums[:, 0] / sums[:, 1])
        small.append(sums[:, 0])
    star, xs, ys, ratios = (np.concatenate(a) for a in (star, xs, ys, ratios))
    small = np.array(small)  # (frame, star)
    model = PixelPhaseModel.fit(star, xs, ys, ratios, np.full(ratios.size, 1e-4), shape, min_points=100)
    assert model.coef[0, 0] > 0 and model.coef[0, 1] > 0  # more light on a pixel centre
    mean_terms = np.stack([phase_terms(xs[star == s], ys[star == s]).mean(axis=0) for s in range(nstar)])
    xs_f, ys_f = xs.reshape(nframe, nstar), ys.reshape(nframe, nstar)
    before, after = [], []
    for ref in range(nframe):  # every frame in turn as the one the "binned image" holds
        single = small[ref]
        target = small.mean(axis=0)
        before.append(single / target - 1)
        after.append(single * model.correction(xs_f[ref], ys_f[ref], mean_terms) / target - 1)
    before, after = np.abs(np.array(before)), np.abs(np.array(after))
    assert before.max() > 1.5e-3, before.max()
    assert np.sqrt(np.mean(after**2)) < 0.25 * np.sqrt(np.mean(before**2)), (after.std(), before.std())
    assert after.max() < 0.5 * before.max()


def _dense_fit(star, x, y, ratio, eratio, shape, nfield, floor=2e-3):
    """The fit written out with the whole design matrix (the reference for the per-star sums)."""
    from mascara.pixelphase import NTERMS, field_basis

    _, inv = np.unique(star, return_inverse=True)
    nstar = inv.max() + 1
    w = 1.0 / ((eratio / ratio) ** 2 + floor**2)
    wsum = np.bincount(inv, w, nstar)
    mean_ratio = np.bincount(inv, w * ratio, nstar) / wsum
    t = phase_terms(x, y)
    tmean = np.stack([np.bincount(inv, w * t[:, k], nstar) / wsum for k in range(NTERMS)], axis=-1)
    count = np.bincount(inv, minlength=nstar)
    field = field_basis(np.bincount(inv, x, nstar) / count, np.bincount(inv, y, nstar) / count, shape)[inv, :nfield]
    design = (field[:, :, None] * (t - tmean[inv])[:, None, :]).reshape(len(x), -1)
    a = design * np.sqrt(w)[:, None]
    b = (ratio / mean_ratio[inv] - 1.0) * np.sqrt(w)
    cov = np.linalg.inv(a.T @ a)
    c = cov @ (a.T @ b)
    chi2 = np.sum((b - a @ c) ** 2) / (len(x) - c.size)
    return c.reshape(nfield, NTERMS), np.sqrt(np.diag(cov) * max(chi2, 1.0)).reshape(nfield, NTERMS)


def test_fit_from_per_star_sums_equals_the_design_matrix_fit():
    """The normal equations summed per star give the least-squares solution of the whole design matrix."""
    rng = np.random.default_rng(17)
    shape = (600, 900)
    for nstar, nframes, nfield in ((1500, 45, 6), (500, 45, 3), (60, 40, 1)):
        ids = np.array([f"{i:08d}".encode() for i in rng.permutation(10**6)[:nstar]], dtype="S12")
        star = np.tile(ids, nframes)
        x = (rng.uniform(5, 850, nstar)[None, :] + 1.3 * np.arange(nframes)[:, None]).ravel()
        y = (rng.uniform(5, 590, nstar)[None, :] - 0.4 * np.arange(nframes)[:, None]).ravel()
        ratio = 0.8 * (1 + 0.004 * np.cos(2 * np.pi * x) * np.cos(2 * np.pi * y)) + rng.normal(0, 0.003, x.size)
        eratio = rng.uniform(0.002, 0.006, x.size)
        model = PixelPhaseModel.fit(star, x, y, ratio, eratio, shape)
        assert model.npoints == x.size and model.coef.shape == (nfield, 5)
        coef, err = _dense_fit(star, x, y, ratio, eratio, shape, nfield)
        np.testing.assert_allclose(model.coef, coef, rtol=0, atol=1e-12 * np.abs(coef).max())
        np.testing.assert_allclose(model.error, err, rtol=1e-10)


def test_star_numbering_by_counting_equals_numpy_unique():
    """Catalogue indices are numbered by counting (bincount), other ids by np.unique: the same
    ranks and counts either way, and a fit on integer ids equals the fit on the same stars named
    by id strings."""
    from mascara.pixelphase import _number

    rng = np.random.default_rng(5)
    cases = [rng.integers(0, 50_000, 30_000), rng.integers(0, 10, 50).astype(np.uint32), np.array([7]),
             rng.integers(0, 300, 500).astype(np.uint64), rng.integers(0, 100, 200).astype(np.int16),
             rng.integers(-5, 5, 100), np.array([3, 10**12, 3]), np.array(["b", "a", "b"])]
    for ids in cases:
        inv, counts = _number(ids)
        _, want_inv, want_counts = np.unique(ids, return_inverse=True, return_counts=True)
        np.testing.assert_array_equal(inv, want_inv)
        np.testing.assert_array_equal(counts, want_counts)

    shape = (300, 400)
    ids = np.repeat(rng.permutation(900)[:300] * 37, 20)  # 300 stars of 20 points, sparse indices
    x, y = rng.uniform(10, 390, ids.size), rng.uniform(10, 290, ids.size)
    ratio = 0.7 * (1 + phase_terms(x, y) @ np.array([0.004, 0.003, 0.001, 0.0, 0.0])) * (1 + rng.normal(0, 1e-3, ids.size))
    by_int = PixelPhaseModel.fit(ids, x, y, ratio, 1e-3 * ratio, shape)
    # as id strings the stars sort in another order ('1110' before '37'): the same fit to rounding
    by_str = PixelPhaseModel.fit(ids.astype(str).astype("S12"), x, y, ratio, 1e-3 * ratio, shape)
    assert by_int.npoints == by_str.npoints == ids.size
    np.testing.assert_allclose(by_int.coef, by_str.coef, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(by_int.error, by_str.error, rtol=1e-10)


def test_normal_sums_equal_the_bincounts_bit_for_bit():
    from mascara.pixelphase import NTERMS, _normal_sums

    rng = np.random.default_rng(11)
    n, nstar = 20000, 700
    inv = rng.integers(0, nstar, n)
    w = rng.uniform(0.1, 5.0, n)
    dt = rng.normal(size=(n, NTERMS))
    resid = rng.normal(scale=1e-3, size=n)
    m, v = _normal_sums(inv, w, dt, resid, nstar)
    for k in range(NTERMS):
        wd = w * dt[:, k]
        np.testing.assert_array_equal(v[:, k], np.bincount(inv, wd * resid, nstar))
        for j in range(NTERMS):
            want = np.bincount(inv, wd * dt[:, j], nstar) if j >= k else np.bincount(inv, w * dt[:, j] * dt[:, k], nstar)
            np.testing.assert_array_equal(m[:, k, j], want)


def test_adding_phase_terms_in_place_equals_the_masked_sum():
    """The batch's running sum of phase terms: stars off the frame (non-finite positions) add nothing."""
    rng = np.random.default_rng(5)
    total, count = rng.normal(size=(300, 5)), rng.integers(0, 50, 300).astype(float)
    want_total, want_count = total.copy(), count.copy()
    for _ in range(4):
        x, y = rng.uniform(-5, 4000, 300), rng.uniform(-5, 2600, 300)
        x[rng.random(300) < 0.1] = np.nan
        y[rng.random(300) < 0.05] = np.inf
        with np.errstate(invalid="ignore"):  # cos(inf)
            t = phase_terms(x, y)
            add_phase_terms(x, y, total, count)
        seen = np.isfinite(t).all(axis=1)
        want_total[seen] += t[seen]
        want_count += seen
        np.testing.assert_array_equal(total, want_total)
        np.testing.assert_array_equal(count, want_count)
    assert 0 < seen.sum() < 300
