"""The stacker: register a batch of frames tile by tile and average them (SPEC §7).

Stars move about 80 px across a 50-frame batch, and the motion varies over the
field, so each frame is shifted tile by tile onto the reference (middle) frame.
The caller computes the shifts from its astrometry at the tile centres given
by :func:`tile_grid`.

Shift convention: for frame ``n`` and the tile ``(ty, tx)`` of the reference
image, reference pixel ``(x, y)`` takes the value of frame pixel
``(x + dx[n, ty, tx], y + dy[n, ty, tx])``; i.e. a star at reference position
``p`` was at ``p + d`` in that frame. Pixels whose source falls outside the
frame are not counted.

Three resamplings (the reduction uses ``Settings.bin_order``, 3 by default):

- ``order=0``: shifts rounded to the nearest pixel. Values are copied, so
  the noise of the average is exactly ``sigma / sqrt(count)``; the rounding
  moves a star by up to 0.5 px in one frame, which averages to a blur of
  about 0.3 px rms over a batch and no systematic offset (1.3 % of the light
  of a 2.5 px aperture on a FWHM 2 px star).
- ``order=1``: bilinear interpolation at the fractional shift. Centroids are
  preserved exactly, but each frame is smoothed by the interpolation kernel
  (about 0.4 px rms for uniformly spread fractions: 2.6 % of the 2.5 px
  light) and pixel noise becomes correlated.
- ``order=3``: Keys cubic convolution (:func:`cubic_weights`), 4 x 4 taps.
  Flux and centroid are kept and stars are not widened to second order.
  Pixel noise is correlated as with bilinear weights. Cost about that of
  bilinear. (Any stack holds a star at the reference frame's sub-pixel
  phase, so small-aperture sums keep that phase's pixelisation error, about
  0.1-0.2 % rms at 2.5 px, which per-frame fluxes average away.)

Resampled pixels are less noisy one by one than aperture sums of them are:
errors of the binned photometry come from the frames' noise
(:class:`mascara.photometry.SkyNoiseModel`), not from the stack's scatter.
See ``docs/binning.md`` for the comparison and figures.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from numba import njit

__all__ = ["ORDERS", "Stacker", "cubic_weights", "reuse_stacker", "stack_frames", "thread_stacker", "tile_grid",
           "tile_shape"]


def tile_shape(shape: tuple[int, int], tile: int = 32) -> tuple[int, int]:
    """Number of tiles ``(nty, ntx)`` covering an image of ``shape = (ny, nx)``."""
    ny, nx = shape
    return -(-ny // tile), -(-nx // tile)


def tile_grid(shape: tuple[int, int], tile: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates of the tile centres of the reference image.

    Parameters
    ----------
    shape : (ny, nx)
        Image shape.
    tile : int
        Tile size in pixels; the last row/column of tiles may be partial.

    Returns
    -------
    xc, yc : (nty, ntx) float arrays
        Centre of each tile (of its pixels actually on the image), 0-based
        pixel-centre convention: tile ``(ty, tx)`` spans pixels
        ``x = tx*tile ... min((tx+1)*tile, nx) - 1``, so its centre is the
        mean of the first and last pixel index.
    """
    if tile < 1:
        raise ValueError("tile must be >= 1")
    ny, nx = shape
    nty, ntx = tile_shape(shape, tile)
    x0 = np.arange(ntx) * tile
    y0 = np.arange(nty) * tile
    xc = 0.5 * (x0 + np.minimum(x0 + tile, nx) - 1)
    yc = 0.5 * (y0 + np.minimum(y0 + tile, ny) - 1)
    xx, yy = np.meshgrid(xc, yc)
    return xx, yy


@njit(cache=True, nogil=True)
def _add_nearest(frame, dx, dy, tile, acc, full, partial):
    """Add ``frame`` shifted by the rounded per-tile shifts.

    Neighbouring tiles nearly always share the same rounded shift, so each
    row of tiles is cut into runs of equal shift and every run is one long
    contiguous loop. Counting: a tile whose every pixel has a source in the
    frame increments ``full[ty, tx]``; only the pixels of partly covered tiles
    (near the borders) increment ``partial[y, x]``, which saves a per-pixel
    count read-modify-write over the whole image for every frame.
    """
    ny, nx = frame.shape
    nty, ntx = dx.shape
    rx0 = np.empty(ntx, dtype=np.int64)
    rx1 = np.empty(ntx, dtype=np.int64)
    rsx = np.empty(ntx, dtype=np.int64)
    rsy = np.empty(ntx, dtype=np.int64)
    ry0 = np.empty(ntx, dtype=np.int64)
    ry1 = np.empty(ntx, dtype=np.int64)
    rfull = np.empty(ntx, dtype=np.bool_)
    for ty in range(nty):
        y0 = ty * tile
        y1 = min(y0 + tile, ny)
        nrun = 0
        for tx in range(ntx):
            x0 = tx * tile
            x1 = min(x0 + tile, nx)
            sx = int(math.floor(dx[ty, tx] + 0.5))
            sy = int(math.floor(dy[ty, tx] + 0.5))
            xa = max(x0, -sx)
            xb = min(x1, nx - sx)
            ya = max(y0, -sy)
            yb = min(y1, ny - sy)
            if xa >= xb or ya >= yb:
                continue
            isfull = xa == x0 and xb == x1 and ya == y0 and yb == y1
            if isfull:
                full[ty, tx] += 1
            r = nrun - 1
            if (
                isfull and r >= 0 and rfull[r] and rsx[r] == sx and rsy[r] == sy
                and rx1[r] == xa
            ):
                rx1[r] = xb
            else:
                rx0[nrun] = xa
                rx1[nrun] = xb
                rsx[nrun] = sx
                rsy[nrun] = sy
                ry0[nrun] = ya
                ry1[nrun] = yb
                rfull[nrun] = isfull
                nrun += 1
        for y in range(y0, y1):
            a = acc[y]
            for r in range(nrun):
                if y < ry0[r] or y >= ry1[r]:
                    continue
                xa = rx0[r]
                n = rx1[r] - xa
                out = a[xa:xa + n]
                src = frame[y + rsy[r], xa + rsx[r]:xa + rsx[r] + n]
                for k in range(n):
                    out[k] += src[k]
                if not rfull[r]:
                    p = partial[y, xa:xa + n]
                    for k in range(n):
                        p[k] += 1


@njit(cache=True, nogil=True)
def _add_linear(frame, dx, dy, tile, acc, full, partial):
    """Bilinear variant of :func:`_add_nearest` (same counting scheme)."""
    ny, nx = frame.shape
    nty, ntx = dx.shape
    ix_ = np.empty(ntx, dtype=np.int64)
    iy_ = np.empty(ntx, dtype=np.int64)
    dxn_ = np.empty(ntx, dtype=np.int64)
    dyn_ = np.empty(ntx, dtype=np.int64)
    xa_ = np.empty(ntx, dtype=np.int64)
    xb_ = np.empty(ntx, dtype=np.int64)
    ya_ = np.empty(ntx, dtype=np.int64)
    yb_ = np.empty(ntx, dtype=np.int64)
    w_ = np.empty((ntx, 4), dtype=np.float32)
    full_ = np.empty(ntx, dtype=np.bool_)
    for ty in range(nty):
        y0 = ty * tile
        y1 = min(y0 + tile, ny)
        for tx in range(ntx):
            x0 = tx * tile
            x1 = min(x0 + tile, nx)
            fdy = dy[ty, tx]
            iy = int(math.floor(fdy))
            wy = fdy - iy
            fdx = dx[ty, tx]
            ix = int(math.floor(fdx))
            wx = fdx - ix
            # Both source pixels must exist unless the second has zero weight.
            dxn = 1 if wx > 0.0 else 0
            dyn = 1 if wy > 0.0 else 0
            xa = max(x0, -ix)
            xb = min(x1, nx - ix - dxn)
            ya = max(y0, -iy)
            yb = min(y1, ny - iy - dyn)
            if xa >= xb or ya >= yb:
                ya = y1  # nothing to add from this tile
                yb = y1
            isfull = xa == x0 and xb == x1 and ya == y0 and yb == y1
            if isfull:
                full[ty, tx] += 1
            ix_[tx] = ix
            iy_[tx] = iy
            dxn_[tx] = dxn
            dyn_[tx] = dyn
            xa_[tx] = xa
            xb_[tx] = xb
            ya_[tx] = ya
            yb_[tx] = yb
            full_[tx] = isfull
            w_[tx, 0] = (1.0 - wx) * (1.0 - wy)
            w_[tx, 1] = wx * (1.0 - wy)
            w_[tx, 2] = (1.0 - wx) * wy
            w_[tx, 3] = wx * wy
        for y in range(y0, y1):
            a = acc[y]
            for tx in range(ntx):
                if y < ya_[tx] or y >= yb_[tx]:
                    continue
                xa = xa_[tx]
                n = xb_[tx] - xa
                xs = xa + ix_[tx]
                ys = y + iy_[tx]
                f0 = frame[ys, xs:xs + n + 1]
                f1 = frame[ys + dyn_[tx], xs:xs + n + 1]
                dxn = dxn_[tx]
                w00 = w_[tx, 0]
                w01 = w_[tx, 1]
                w10 = w_[tx, 2]
                w11 = w_[tx, 3]
                out = a[xa:xa + n]
                for k in range(n):
                    out[k] += w00 * f0[k] + w01 * f0[k + dxn] + w10 * f1[k] + w11 * f1[k + dxn]
                if not full_[tx]:
                    p = partial[y, xa:xa + n]
                    for k in range(n):
                        p[k] += 1


def cubic_weights(frac: np.ndarray) -> np.ndarray:
    """Keys cubic-convolution weights (a = -1/2) of the taps at offsets -1, 0, 1, 2 for fractions in [0, 1).

    The weights sum to 1 (flux is kept) and reproduce every quadratic exactly,
    so unlike bilinear weights they add no second moment: a star is moved by
    the fraction without being widened, to that order.
    """
    f = np.asarray(frac, dtype=np.float64)[..., None]
    f2 = f * f
    f3 = f2 * f
    return np.concatenate([
        0.5 * (-f3 + 2.0 * f2 - f),
        0.5 * (3.0 * f3 - 5.0 * f2 + 2.0),
        0.5 * (-3.0 * f3 + 4.0 * f2 + f),
        0.5 * (f3 - f2),
    ], axis=-1)


@njit(cache=True, nogil=True, fastmath=True)
def _add_cubic(frame, ix, iy, wx, wy, tile, acc, full, partial, hbuf, wcol):
    """Separable 4 x 4-tap resampling of each tile (see :func:`cubic_weights`), same counting as the others.

    ``ix, iy`` (nty, ntx) are the integer parts of the shifts, ``wx, wy``
    (nty, ntx, 4) float32 the tap weights of their fractions. Tiles whose
    4 x 4 support leaves the frame lose those border pixels.

    Speed: neighbouring tiles nearly always share the integer shift, so each
    row of tiles is cut into runs of equal integer shift, and the per-tile
    weights are spread into per-column arrays (``wcol``, 8 x nx). A run is
    filtered along x into ``hbuf`` (its rows plus the 3 extra the y taps
    need), then along y into ``acc``: 8 multiply-adds per pixel in loops as
    long as the run, instead of 16 in loops one tile long (whose overhead
    doubled the cost at 32 px tiles). The x pass does two rows at a time and
    the y pass four, so each per-column weight is loaded once for them.
    """
    ny, nx = frame.shape
    nty, ntx = ix.shape
    rx0 = np.empty(ntx, dtype=np.int64)
    rx1 = np.empty(ntx, dtype=np.int64)
    rsx = np.empty(ntx, dtype=np.int64)
    rsy = np.empty(ntx, dtype=np.int64)
    ry0 = np.empty(ntx, dtype=np.int64)
    ry1 = np.empty(ntx, dtype=np.int64)
    rfull = np.empty(ntx, dtype=np.bool_)
    for ty in range(nty):
        y0 = ty * tile
        y1 = min(y0 + tile, ny)
        nrun = 0
        for tx in range(ntx):
            x0 = tx * tile
            x1 = min(x0 + tile, nx)
            sx = ix[ty, tx]
            sy = iy[ty, tx]
            xa = max(x0, 1 - sx)
            xb = min(x1, nx - 2 - sx)
            ya = max(y0, 1 - sy)
            yb = min(y1, ny - 2 - sy)
            if xa >= xb or ya >= yb:
                continue
            isfull = xa == x0 and xb == x1 and ya == y0 and yb == y1
            if isfull:
                full[ty, tx] += 1
            for t in range(4):
                a = wx[ty, tx, t]
                b = wy[ty, tx, t]
                for k in range(xa, xb):
                    wcol[t, k] = a
                    wcol[4 + t, k] = b
            r = nrun - 1
            if (
                isfull and r >= 0 and rfull[r] and rsx[r] == sx and rsy[r] == sy
                and rx1[r] == xa
            ):
                rx1[r] = xb
            else:
                rx0[nrun] = xa
                rx1[nrun] = xb
                rsx[nrun] = sx
                rsy[nrun] = sy
                ry0[nrun] = ya
                ry1[nrun] = yb
                rfull[nrun] = isfull
                nrun += 1
        for r in range(nrun):
            xa = rx0[r]
            xb = rx1[r]
            ya = ry0[r]
            yb = ry1[r]
            n = xb - xa
            xs = xa + rsx[r] - 1
            ys = ya + rsy[r] - 1
            a0 = wcol[0, xa:xb]
            a1 = wcol[1, xa:xb]
            a2 = wcol[2, xa:xb]
            a3 = wcol[3, xa:xb]
            b0 = wcol[4, xa:xb]
            b1 = wcol[5, xa:xb]
            b2 = wcol[6, xa:xb]
            b3 = wcol[7, xa:xb]
            # several rows per pass: each weight is loaded once for two rows along x and for four
            # along y (which also shares the intermediate rows between them): Stacker.add 17.7-18.6 ->
            # 13.4-13.6 ms per full frame with a batch's shifts, against one row per pass
            nh = yb - ya + 3
            j = 0
            while j + 1 < nh:
                src = frame[ys + j, xs:xs + n + 3]
                sr2 = frame[ys + j + 1, xs:xs + n + 3]
                h = hbuf[j]
                g = hbuf[j + 1]
                for k in range(n):
                    w0 = a0[k]
                    w1 = a1[k]
                    w2 = a2[k]
                    w3 = a3[k]
                    h[k] = w0 * src[k] + w1 * src[k + 1] + w2 * src[k + 2] + w3 * src[k + 3]
                    g[k] = w0 * sr2[k] + w1 * sr2[k + 1] + w2 * sr2[k + 2] + w3 * sr2[k + 3]
                j += 2
            if j < nh:
                src = frame[ys + j, xs:xs + n + 3]
                h = hbuf[j]
                for k in range(n):
                    h[k] = a0[k] * src[k] + a1[k] * src[k + 1] + a2[k] * src[k + 2] + a3[k] * src[k + 3]
            nv = yb - ya
            j = 0
            while j + 3 < nv:  # four output rows from seven intermediate ones
                o0 = acc[ya + j, xa:xb]
                o1 = acc[ya + j + 1, xa:xb]
                o2 = acc[ya + j + 2, xa:xb]
                o3 = acc[ya + j + 3, xa:xb]
                h0 = hbuf[j]
                h1 = hbuf[j + 1]
                h2 = hbuf[j + 2]
                h3 = hbuf[j + 3]
                h4 = hbuf[j + 4]
                h5 = hbuf[j + 5]
                h6 = hbuf[j + 6]
                for k in range(n):
                    w0 = b0[k]
                    w1 = b1[k]
                    w2 = b2[k]
                    w3 = b3[k]
                    v0 = h0[k]
                    v1 = h1[k]
                    v2 = h2[k]
                    v3 = h3[k]
                    v4 = h4[k]
                    v5 = h5[k]
                    v6 = h6[k]
                    o0[k] += w0 * v0 + w1 * v1 + w2 * v2 + w3 * v3
                    o1[k] += w0 * v1 + w1 * v2 + w2 * v3 + w3 * v4
                    o2[k] += w0 * v2 + w1 * v3 + w2 * v4 + w3 * v5
                    o3[k] += w0 * v3 + w1 * v4 + w2 * v5 + w3 * v6
                j += 4
            while j < nv:
                out = acc[ya + j, xa:xb]
                h0 = hbuf[j]
                h1 = hbuf[j + 1]
                h2 = hbuf[j + 2]
                h3 = hbuf[j + 3]
                for k in range(n):
                    out[k] += b0[k] * h0[k] + b1[k] * h1[k] + b2[k] * h2[k] + b3[k] * h3[k]
                j += 1
            if not rfull[r]:
                for j in range(nv):
                    p = partial[ya + j, xa:xb]
                    for k in range(n):
                        p[k] += 1


@njit(cache=True, nogil=True)
def _mean_in_place(acc, full, partial, tile, min_count):
    """``acc /= count`` and ``partial = count`` in place, count = the tile's full count + the pixel's partial one.

    float32 division as numpy's ``sum / count.astype(float32)``; NaN where ``count < min_count``.
    """
    ny, nx = acc.shape
    nan = np.float32(np.nan)
    for y in range(ny):
        frow = full[y // tile]
        a = acc[y]
        p = partial[y]
        for x in range(nx):
            c = frow[x // tile] + p[x]
            p[x] = c
            a[x] = a[x] / np.float32(c) if c >= min_count else nan


@njit(cache=True, nogil=True)
def _finite_or_zero(src, out):
    """``out = src`` where finite, else 0 (same shape, float32)."""
    ny, nx = src.shape
    zero = np.float32(0.0)
    for y in range(ny):
        a = src[y]
        b = out[y]
        for x in range(nx):
            v = a[x]
            b[x] = v if math.isfinite(v) else zero


#: Resampling orders of the stacker: 0 nearest pixel, 1 bilinear, 3 Keys cubic.
ORDERS = (0, 1, 3)


class Stacker:
    """Running tile-registered sum of frames; add frames one at a time.

    Keeps one float32 sum image (relative rounding about 1e-7 per addition,
    far below the noise) and counts, so a batch never needs to be held in
    memory.

    Parameters
    ----------
    shape : (ny, nx)
        Shape of every frame and of the binned image.
    tile : int
        Tile size in pixels.
    order : {0, 1, 3}
        0: nearest-pixel shifts; 1: bilinear interpolation; 3: Keys cubic
        convolution (see module notes).

    Notes
    -----
    Interpolation averages neighbouring pixels, so the pixels of a resampled
    frame are less noisy one by one but correlated: an aperture sum keeps
    about the variance of the input pixels (the weights sum to 1), while the
    pixel-to-pixel scatter of the sky falls by ``sum(w^2)`` (to 0.44 of it
    for bilinear, 0.65 for cubic weights, averaged over fractions). Errors of
    binned photometry must therefore not come from the stack's scatter
    (:class:`mascara.photometry.SkyNoiseModel`).
    """

    def __init__(self, shape: tuple[int, int], tile: int = 32, order: int = 0) -> None:
        if order not in ORDERS:
            raise ValueError("order must be 0 (nearest pixel), 1 (bilinear) or 3 (cubic)")
        if tile < 1:
            raise ValueError("tile must be >= 1")
        self.shape = (int(shape[0]), int(shape[1]))
        self.tile = int(tile)
        self.order = order
        self.tiles = tile_shape(self.shape, self.tile)
        self.sum = np.zeros(self.shape, dtype=np.float32)
        self._full = np.zeros(self.tiles, dtype=np.int32)
        self._partial = np.zeros(self.shape, dtype=np.int32)
        if order == 3:  # work space of the cubic kernel: one row of tiles
            self._hbuf = np.empty((self.tile + 3, self.shape[1]), dtype=np.float32)
            self._wcol = np.empty((8, self.shape[1]), dtype=np.float32)
        self.nframes = 0
        self._finished = False
        self._filled: np.ndarray | None = None

    def reset(self) -> None:
        """Start a new stack in the same buffers (no new memory: a reused stacker costs no page faults)."""
        self.sum.fill(0.0)
        self._full.fill(0)
        self._partial.fill(0)
        self.nframes = 0
        self._finished = False

    def add(self, frame: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> None:
        """Add one frame with per-tile shifts ``dx, dy`` of shape ``self.tiles`` (pixels).

        Non-finite shifts skip that tile of this frame.
        """
        if self._finished:
            raise RuntimeError("the stacker's sum became the mean (finish()); reset() it first")
        frame = np.asarray(frame)
        if frame.shape != self.shape:
            raise ValueError(f"frame shape {frame.shape} != {self.shape}")
        dx = np.ascontiguousarray(dx, dtype=np.float64)
        dy = np.ascontiguousarray(dy, dtype=np.float64)
        if dx.shape != self.tiles or dy.shape != self.tiles:
            raise ValueError(f"dx, dy must have shape {self.tiles} (tiles), got {dx.shape}, {dy.shape}")
        good = np.isfinite(dx) & np.isfinite(dy)
        if not good.all():
            # A shift far beyond the image makes every source pixel invalid.
            big = 4.0 * max(self.shape)
            dx = np.where(good, dx, big)
            dy = np.where(good, dy, big)
        if frame.dtype.kind == "f" and frame.dtype.itemsize < 4:
            frame = frame.astype(np.float32)
        frame = np.ascontiguousarray(frame)
        ix = np.floor(dx)
        iy = np.floor(dy)
        fx, fy = dx - ix, dy - iy
        if self.order == 3:
            _add_cubic(frame, ix.astype(np.int64), iy.astype(np.int64), cubic_weights(fx).astype(np.float32),
                       cubic_weights(fy).astype(np.float32), self.tile, self.sum, self._full, self._partial,
                       self._hbuf, self._wcol)
        else:
            kernel = _add_nearest if self.order == 0 else _add_linear
            kernel(frame, dx, dy, self.tile, self.sum, self._full, self._partial)
        self.nframes += 1

    @property
    def count(self) -> np.ndarray:
        """(ny, nx) int32: number of frames that contributed to each pixel."""
        ny, nx = self.shape
        t = self.tile
        full = np.repeat(np.repeat(self._full, t, axis=0), t, axis=1)[:ny, :nx]
        return full + self._partial

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(binned, count)``: the mean image (float32, NaN where count == 0) and counts."""
        count = self.count
        with np.errstate(invalid="ignore", divide="ignore"):
            binned = self.sum / count.astype(np.float32)
        binned[count == 0] = np.nan
        return binned, count

    def finish(self, min_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """``(binned, count)`` as :meth:`result`, computed in place in the stacker's own buffers.

        The sum becomes the mean (float32 ``sum / float32(count)``, bit for
        bit :meth:`result`'s) and the per-pixel counts are written over the
        partial counts, in one pass and without new arrays. The returned
        arrays are those buffers: they stay valid until :meth:`reset`, and
        no frame can be added before it.

        Parameters
        ----------
        min_count : int
            Pixels covered by fewer frames than this are NaN in ``binned``
            (``count`` is unchanged). The default NaNs only uncovered pixels.
        """
        if not self._finished:
            _mean_in_place(self.sum, self._full, self._partial, self.tile, max(int(min_count), 1))
            self._finished = True
        elif min_count > 1:
            self.sum[self._partial < min_count] = np.nan
        return self.sum, self._partial

    def filled(self) -> np.ndarray:
        """The binned image of :meth:`finish` with 0 for NaN, float32, in a buffer of the stacker's.

        For code that cannot take NaN pixels (the astrometry's centroids).
        The buffer is allocated once and overwritten by the next call: it
        costs no new memory per batch (no page faults).
        """
        if not self._finished:
            raise RuntimeError("filled() needs the finished stack: call finish() first")
        if self._filled is None:
            self._filled = np.empty(self.shape, dtype=np.float32)
        _finite_or_zero(self.sum, self._filled)
        return self._filled


_PER_THREAD = threading.local()


def thread_stacker(shape: tuple[int, int], tile: int = 32, order: int = 0) -> Stacker:
    """An empty :class:`Stacker` of this thread, reused from the thread's previous batch when it has the same geometry.

    A full-frame stacker holds about 90 MB (sum and counts) and its result as
    much again; allocating them for every batch costs page faults and system
    time, while a batch-reducing thread only ever needs one at a time. The
    stacker (and the arrays :meth:`Stacker.finish` returned) belong to the
    calling thread and are reset by its next call.
    """
    return reuse_stacker(_PER_THREAD, shape, tile, order)


def reuse_stacker(holder: Any, shape: tuple[int, int], tile: int = 32, order: int = 0) -> Stacker:
    """``holder.stacker`` emptied when it has this geometry, else a new one put there (the old one dropped first)."""
    key = (int(shape[0]), int(shape[1]), int(tile), int(order))
    st = getattr(holder, "stacker", None)
    if st is None or (st.shape[0], st.shape[1], st.tile, st.order) != key:
        holder.stacker = None  # drop the old buffers before the new ones are allocated
        st = Stacker(key[:2], tile=key[2], order=key[3])
        holder.stacker = st
    else:
        st.reset()
    return st


def stack_frames(
    frames: Sequence[np.ndarray] | np.ndarray,
    dx: np.ndarray,
    dy: np.ndarray,
    tile: int = 32,
    order: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Average frames after shifting each tile onto the reference image.

    Parameters
    ----------
    frames : sequence of N (ny, nx) arrays
        Calibrated frames of one batch, all the same shape.
    dx, dy : (N, nty, ntx) arrays
        Per frame and reference tile, the shift in pixels: reference pixel
        ``(x, y)`` takes frame pixel ``(x + dx, y + dy)``. ``nty, ntx`` from
        :func:`tile_shape`; compute them at the centres from :func:`tile_grid`.
    tile : int
        Tile size in pixels.
    order : {0, 1, 3}
        0: shifts rounded to the nearest pixel (default); 1: bilinear; 3: Keys cubic.

    Returns
    -------
    binned : (ny, nx) float32
        Mean of the contributing frame pixels; NaN where none contributes.
    count : (ny, nx) int32
        Number of frames contributing to each pixel.
    """
    dx = np.asarray(dx, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    nframes = len(frames)
    if nframes == 0:
        raise ValueError("no frames")
    if dx.shape[0] != nframes or dy.shape[0] != nframes:
        raise ValueError("dx, dy need one (nty, ntx) plane per frame")
    stacker = Stacker(np.shape(frames[0]), tile=tile, order=order)
    for n in range(nframes):
        stacker.add(frames[n], dx[n], dy[n])
    return stacker.result()
