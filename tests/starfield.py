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
