"""Synthetic images shared by the array-level tests."""

from __future__ import annotations

import numpy as np


def gaussian_stars(shape, xs, ys, fluxes, sigma=1.2):
    """Noise-free image of circular Gaussian stars (total flux ``fluxes``) sampled at pixel centres."""
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    img = np.zeros(shape)
    for x0, y0, f in zip(xs, ys, fluxes):
        img += f / (2 * np.pi * sigma**2) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma**2))
    return img


def moffat_stars(shape, xs, ys, fluxes, fwhm=2.0, beta=3.0, sub=5):
    """Noise-free image of circular Moffat stars (total flux ``fluxes``) integrated over pixels.

    Each pixel is sampled on a ``sub`` x ``sub`` grid; only a 25 x 25 px box
    around each star is drawn (beta 3 leaves under 0.2 % of the light outside).
    """
    ny, nx = shape
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    off = (np.arange(sub) + 0.5) / sub - 0.5
    img = np.zeros(shape)
    half = 12
    for x0, y0, f in zip(xs, ys, fluxes):
        i0, j0 = int(round(x0)), int(round(y0))
        ii = np.arange(max(i0 - half, 0), min(i0 + half + 1, nx))
        jj = np.arange(max(j0 - half, 0), min(j0 + half + 1, ny))
        if ii.size == 0 or jj.size == 0:
            continue
        px = ii[None, :, None, None] + off[None, None, None, :] - x0
        py = jj[:, None, None, None] + off[None, None, :, None] - y0
        prof = (1.0 + (px**2 + py**2) / alpha**2) ** (-beta)
        img[jj[0]:jj[-1] + 1, ii[0]:ii[-1] + 1] += f * (beta - 1) / (np.pi * alpha**2) * prof.mean(axis=(2, 3))
    return img
