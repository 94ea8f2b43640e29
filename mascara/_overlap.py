"""Exact overlap area of a circle and a pixel (numba kernels for photometry).

The area of a circle of radius ``r`` centred on the origin and the rectangle
``[x0, x1] x [y0, y1]`` follows from the signed corner area ``Q(X, Y)`` =
area of the circle inside ``[0, X] x [0, Y]`` (negative when X or Y is
negative): by the circle's two mirror symmetries the rectangle area is
``Q(x1, y1) - Q(x0, y1) - Q(x1, y0) + Q(x0, y0)``. ``Q`` itself is analytic,
from the antiderivative of ``sqrt(r^2 - t^2)``.

Neighbouring pixels share their corners, and outside the circle ``Q`` is a
sum of a term of ``x`` alone and terms of ``y`` alone (the two arcsines), so
the photometry tabulates ``Q`` once per star on the grid of pixel corners
(:func:`corner_table`, one arcsine per grid column and row) and differences
the table (:func:`table_weight`) instead of calling :func:`pixel_weight`
(four corner areas, up to eight arcsines, per pixel on the circle).
"""

from __future__ import annotations

import math

from numba import njit


@njit(cache=True, nogil=True, inline="always")
def _segment_integral(t: float, r: float) -> float:
    """Integral of sqrt(r^2 - u^2) du from 0 to t, for 0 <= t <= r."""
    s = (r - t) * (r + t)  # not r*r - t*t: no cancellation, and exactly 0 at t == r even where LLVM fuses a*b - c*d
    if s < 0.0:
        s = 0.0
    q = t / r
    if q > 1.0:
        q = 1.0
    return 0.5 * (t * math.sqrt(s) + r * r * math.asin(q))


@njit(cache=True, nogil=True, inline="always")
def _corner_area(x: float, y: float, r: float) -> float:
    """Signed area of the circle (centre 0, radius r) inside [0, x] x [0, y]."""
    sign = 1.0
    if x < 0.0:
        x = -x
        sign = -sign
    if y < 0.0:
        y = -y
        sign = -sign
    if x > r:
        x = r
    if y > r:
        y = r
    if x * x + y * y <= r * r:
        return sign * x * y
    # The arc enters the box through its top edge at xc < x.
    xc = math.sqrt((r - y) * (r + y))
    return sign * (y * xc + _segment_integral(x, r) - _segment_integral(xc, r))


@njit(cache=True, nogil=True)
def rect_circle_overlap(x0: float, x1: float, y0: float, y1: float, r: float) -> float:
    """Area of the circle (centre 0, radius r) inside [x0, x1] x [y0, y1]."""
    return (
        _corner_area(x1, y1, r)
        - _corner_area(x0, y1, r)
        - _corner_area(x1, y0, r)
        + _corner_area(x0, y0, r)
    )


@njit(cache=True, nogil=True, inline="always")
def pixel_weight(dx: float, dy: float, near2: float, far2: float, r: float) -> float:
    """Fraction of the unit pixel centred at (dx, dy) from the circle centre inside radius r.

    ``near2`` and ``far2`` are the squared distances from the centre to the
    nearest and farthest points of the pixel; they give the cheap 0 and 1 cases.
    """
    r2 = r * r
    if far2 <= r2:
        return 1.0
    if near2 >= r2:
        return 0.0
    return rect_circle_overlap(dx - 0.5, dx + 0.5, dy - 0.5, dy + 0.5, r)


@njit(cache=True, nogil=True)
def corner_table(i0: int, j0: int, xs: float, ys: float, r: float, q, colx, segx) -> None:
    """Corner areas of the pixels from ``(i0, j0)`` on, for a circle of radius r centred at ``(xs, ys)``.

    ``q[b, a] = Q(X, Y)`` at the lower left corner of pixel ``(i0 + a, j0 + b)``,
    ``X = (i0 + a - xs) - 0.5``, ``Y = (j0 + b - ys) - 0.5``, for ``q`` of
    shape (rows, columns): the same arithmetic as :func:`_corner_area` at
    each grid point (the same values for the same coordinates), with the
    arcsine of each column (``segx``) and of each row computed once.
    ``colx`` and ``segx`` are work arrays of at least ``q.shape[1]`` values.
    """
    nrow, ncol = q.shape
    r2 = r * r
    for a in range(ncol):
        xv = (i0 + a - xs) - 0.5
        colx[a] = -1.0 if xv < 0.0 else 1.0  # the sign for now
        x = abs(xv)
        if x > r:
            x = r
        segx[a] = _segment_integral(x, r)
        colx[a] *= x  # the signed, clamped coordinate
    for b in range(nrow):
        yv = (j0 + b - ys) - 0.5
        y = abs(yv)
        if y > r:
            y = r
        sy = -1.0 if yv < 0.0 else 1.0
        # where the arc crosses this row's height, and its arcsine term, for the corners outside the circle
        xc = math.sqrt((r - y) * (r + y))  # see _segment_integral
        segc = _segment_integral(xc, r)
        row = q[b]
        for a in range(ncol):
            x = colx[a]
            sign = sy
            if x < 0.0:
                x = -x
                sign = -sy
            if x * x + y * y <= r2:
                row[a] = sign * x * y
            else:
                row[a] = sign * (y * xc + segx[a] - segc)


@njit(cache=True, nogil=True, inline="always")
def table_weight(q, a: int, b: int, near2: float, far2: float, r: float) -> float:
    """Fraction of the pixel between grid corners ``(a, b)`` and ``(a + 1, b + 1)`` of :func:`corner_table` inside radius r.

    ``near2`` and ``far2`` as in :func:`pixel_weight`: pixels wholly inside or
    outside the circle are not looked up.
    """
    r2 = r * r
    if far2 <= r2:
        return 1.0
    if near2 >= r2:
        return 0.0
    return q[b + 1, a + 1] - q[b + 1, a] - q[b, a + 1] + q[b, a]
