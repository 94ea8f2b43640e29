"""The camera model: horizon coordinates (alt, az) to CCD pixels and back (SPEC §5).

Conventions
-----------
Horizon frame
    Right-handed (E, N, Up); the unit vector of (alt, az) is
    ``(cos alt sin az, cos alt cos az, sin alt)``, azimuth N=0, E=90 (astropy).
Optical axis
    ``b`` = unit vector of (ALT0, AZ0). At ``b`` two tangent directions are
    ``e_az = (cos AZ0, -sin AZ0, 0)`` (towards increasing azimuth) and
    ``e_alt = (-sin ALT0 sin AZ0, -sin ALT0 cos AZ0, cos ALT0)`` (towards
    increasing altitude). Both are defined for any ALT0, also at and beyond the
    zenith, so the model is continuous there (a zenith camera has AZ0 = 0 and
    ``e_alt`` pointing South).
Roll TH0
    The image axes on the sky at the optical axis are
    ``ex = -sin(TH0) e_az + cos(TH0) e_alt`` and
    ``ey = -cos(TH0) e_az - sin(TH0) e_alt``.
    With the nominal TH0 = 270 deg, +x runs along increasing azimuth and +y
    along increasing altitude: shown with ``origin='lower'`` the image is the
    sky as seen from the camera (not mirrored, horizon at the bottom). Increasing
    TH0 turns the image axes about the optical axis from ``e_alt`` towards
    ``-e_az`` (a roll).
Projection
    Gnomonic: ``u = (p . ex) / (p . b)``, ``v = (p . ey) / (p . b)`` (radians of
    the tangent plane), ideal pixels ``x = X0 + scale u``, ``y = Y0 + scale v``.
    Directions more than :data:`MAX_OFF_AXIS_DEG` from the axis give NaN.
Distortion
    ``x = x_ideal + sum_k dist_x[k] m_k(u, v)`` and the same for y, where the
    monomials of total order <= ``order`` (5: 21 terms) are, in this order,
    ``m = [1, u, v, u^2, u v, v^2, u^3, u^2 v, u v^2, v^3, u^4, ...]``, i.e. for
    ``n = 0..order`` and ``j = 0..n``: ``u^(n-j) v^j``. Coefficients are in
    pixels; u, v are in radians of the tangent plane (the normalisation is the
    focal length ``scale``), so the same coefficients describe a full-size
    camera and its central crop (``size="small"``).
Pixels
    0-based, pixel (i, j) = image[j, i] has its centre at x=i, y=j.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

#: Focal length over pixel size: 24 mm / 9 um (SPEC §1), in px per radian.
NOMINAL_SCALE = 24e-3 / 9e-6

#: Directions further than this from the optical axis project to NaN.
MAX_OFF_AXIS_DEG = 80.0

#: Nominal (ALT0, AZ0) of each camera letter (SPEC §1). La Silla uses the same
#: values: the station hardware is identical and the real pointing is found from
#: the data by :func:`mascara.astrometry.initial_solution`.
NOMINAL_POINTING: dict[str, tuple[float, float]] = {
    "N": (49.0, 0.0),
    "E": (49.0, 90.0),
    "S": (49.0, 180.0),
    "W": (49.0, 270.0),
    "C": (90.0, 0.0),
}
NOMINAL_TH0 = 270.0
SITES = ("LP", "LS")


def n_terms(order: int) -> int:
    """Number of monomials of total order <= ``order`` in two variables."""
    return (order + 1) * (order + 2) // 2


def term_powers(order: int) -> list[tuple[int, int]]:
    """Powers ``(i, j)`` of ``u^i v^j`` for each distortion coefficient, in order."""
    return [(n - j, j) for n in range(order + 1) for j in range(n + 1)]


def monomials(u: np.ndarray, v: np.ndarray, order: int) -> np.ndarray:
    """Monomials ``u^i v^j`` in the order of :func:`term_powers`, shape (n_terms, N)."""
    up = [np.ones_like(u)]
    vp = [np.ones_like(v)]
    for _ in range(order):
        up.append(up[-1] * u)
        vp.append(vp[-1] * v)
    return np.stack([up[i] * vp[j] for i, j in term_powers(order)])


def coefficient_grid(dist_x: np.ndarray, dist_y: np.ndarray, order: int) -> np.ndarray:
    """Coefficients as a grid ``C[axis, i, j]`` of ``u^i v^j``, shape (2, order+1, order+1)."""
    grid = np.zeros((2, order + 1, order + 1))
    for k, (i, j) in enumerate(term_powers(order)):
        grid[0, i, j] = dist_x[k]
        grid[1, i, j] = dist_y[k]
    return grid


def derivative_grids(grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coefficient grids of d/du and d/dv of the polynomials of ``grid``."""
    n = grid.shape[1]
    gu = np.zeros_like(grid)
    gv = np.zeros_like(grid)
    gu[:, :-1, :] = grid[:, 1:, :] * np.arange(1, n)[None, :, None]
    gv[:, :, :-1] = grid[:, :, 1:] * np.arange(1, n)[None, None, :]
    return gu, gv


def evaluate_grid(grid: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Both polynomials of ``grid`` at (u, v) by nested Horner, shape (2, N)."""
    order = grid.shape[1] - 1
    out = np.zeros((2,) + u.shape)
    for i in range(order, -1, -1):
        q = np.zeros((2,) + v.shape)
        for j in range(order - i, -1, -1):
            q *= v
            q += grid[:, i, j].reshape((2,) + (1,) * v.ndim)
        out *= u
        out += q
    return out


def unit_vectors(alt: np.ndarray, az: np.ndarray) -> np.ndarray:
    """(E, N, Up) unit vectors of alt/az in degrees, shape (3, N)."""
    alt = np.radians(np.asarray(alt, dtype=float))
    az = np.radians(np.asarray(az, dtype=float))
    ca = np.cos(alt)
    return np.stack([ca * np.sin(az), ca * np.cos(az), np.sin(alt)])


def rotation_matrix(alt0: float, az0: float, th0: float) -> np.ndarray:
    """Rows ``ex, ey, b`` (see module notes): horizon (E, N, Up) to camera frame."""
    a, z, t = np.radians([alt0, az0, th0])
    b = np.array([np.cos(a) * np.sin(z), np.cos(a) * np.cos(z), np.sin(a)])
    e_az = np.array([np.cos(z), -np.sin(z), 0.0])
    e_alt = np.array([-np.sin(a) * np.sin(z), -np.sin(a) * np.cos(z), np.cos(a)])
    ex = -np.sin(t) * e_az + np.cos(t) * e_alt
    ey = -np.cos(t) * e_az - np.sin(t) * e_alt
    return np.stack([ex, ey, b])


def angles_from_rotation(
    rot: np.ndarray, az_hint: float = 0.0
) -> tuple[float, float, float]:
    """(ALT0, AZ0, TH0) in degrees of a rotation built like :func:`rotation_matrix`.

    Of the two equivalent descriptions (alt, az) and (180 - alt, az + 180) the
    one whose AZ0 is closest to ``az_hint`` is returned, so that a zenith camera
    stays at AZ0 ~ 0 with ALT0 slightly above or below 90.
    """
    ex, _, b = rot
    alt = np.degrees(np.arcsin(np.clip(b[2], -1.0, 1.0)))
    az = np.degrees(np.arctan2(b[0], b[1])) if np.hypot(b[0], b[1]) > 1e-12 else az_hint
    candidates = [(alt, az), (180.0 - alt, az + 180.0)]

    def dist(c: tuple[float, float]) -> float:
        return abs((c[1] - az_hint + 180.0) % 360.0 - 180.0)

    alt, az = min(candidates, key=dist)
    az = az_hint + (az - az_hint + 180.0) % 360.0 - 180.0
    a, z = np.radians([alt, az])
    e_az = np.array([np.cos(z), -np.sin(z), 0.0])
    e_alt = np.array([-np.sin(a) * np.sin(z), -np.sin(a) * np.cos(z), np.cos(a)])
    th = np.degrees(np.arctan2(-ex @ e_az, ex @ e_alt)) % 360.0
    return float(alt), float(az % 360.0), float(th)


@dataclasses.dataclass
class CameraModel:
    """Pointing, projection and distortion of one camera (SPEC §5).

    Parameters
    ----------
    alt0, az0, th0 : float
        Altitude and azimuth of the optical axis and roll about it, degrees
        (conventions in the module docstring).
    x0, y0 : float
        Pixel position of the optical axis in the science-region image.
    scale : float
        Focal length in pixels (px per radian of the tangent plane).
    nx, ny : int
        Science image size in pixels (``image.shape == (ny, nx)``).
    dist_x, dist_y : ndarray, shape (n_terms(order),)
        Distortion coefficients in pixels, term order of :func:`term_powers`.
    order : int
        Total order of the distortion polynomial.
    """

    alt0: float
    az0: float
    th0: float
    x0: float
    y0: float
    scale: float = NOMINAL_SCALE
    nx: int = 4008
    ny: int = 2672
    dist_x: np.ndarray = None  # type: ignore[assignment]  # None: zeros
    dist_y: np.ndarray = None  # type: ignore[assignment]
    order: int = 5

    def __post_init__(self) -> None:
        nt = n_terms(self.order)
        self.dist_x = np.zeros(nt) if self.dist_x is None else np.asarray(self.dist_x, float)
        self.dist_y = np.zeros(nt) if self.dist_y is None else np.asarray(self.dist_y, float)
        if self.dist_x.shape != (nt,) or self.dist_y.shape != (nt,):
            raise ValueError(f"order {self.order} needs {nt} distortion coefficients per axis")

    # -- geometry ---------------------------------------------------------
    def rotation(self) -> np.ndarray:
        """Horizon (E, N, Up) to camera frame rotation, shape (3, 3)."""
        return rotation_matrix(self.alt0, self.az0, self.th0)

    def distortion(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distortion in pixels at tangent-plane coordinates u, v (radians)."""
        d = evaluate_grid(coefficient_grid(self.dist_x, self.dist_y, self.order), u, v)
        return d[0], d[1]

    def to_pixels(self, alt: Any, az: Any) -> tuple[np.ndarray, np.ndarray]:
        """Pixel positions of directions (alt, az) in degrees.

        Returns float arrays of the broadcast shape of the inputs; NaN for
        directions more than :data:`MAX_OFF_AXIS_DEG` off axis (or behind).
        Positions outside the image are returned as they are (not NaN).
        """
        alt, az = np.broadcast_arrays(np.asarray(alt, float), np.asarray(az, float))
        shape = alt.shape
        cam = self.rotation() @ unit_vectors(alt.ravel(), az.ravel())
        with np.errstate(divide="ignore", invalid="ignore"):
            bad = cam[2] < np.cos(np.radians(MAX_OFF_AXIS_DEG))
            u = np.where(bad, np.nan, cam[0] / cam[2])
            v = np.where(bad, np.nan, cam[1] / cam[2])
        dx, dy = self.distortion(u, v)
        x = self.x0 + self.scale * u + dx
        y = self.y0 + self.scale * v + dy
        return x.reshape(shape), y.reshape(shape)

    def undistort(
        self, x: np.ndarray, y: np.ndarray, tol: float = 1e-9, maxiter: int = 30
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tangent-plane (u, v) in radians of pixel positions (inverse distortion).

        Newton iteration on ``x0 + scale u + Dx(u, v) = x`` (and y), started at
        the undistorted solution; converges to ``tol`` px in a few steps for a
        lens whose distortion varies slowly across the field.
        """
        u = (x - self.x0) / self.scale
        v = (y - self.y0) / self.scale
        if not (np.any(self.dist_x) or np.any(self.dist_y)):
            return u, v
        grid = coefficient_grid(self.dist_x, self.dist_y, self.order)
        gu, gv = derivative_grids(grid)
        for _ in range(maxiter):
            f = evaluate_grid(grid, u, v)
            fx = self.x0 + self.scale * u + f[0] - x
            fy = self.y0 + self.scale * v + f[1] - y
            ju = evaluate_grid(gu, u, v)
            jv = evaluate_grid(gv, u, v)
            a = self.scale + ju[0]
            b = jv[0]
            c = ju[1]
            d = self.scale + jv[1]
            det = a * d - b * c
            u = u - (d * fx - b * fy) / det
            v = v - (a * fy - c * fx) / det
            err = np.nanmax(np.abs(fx) + np.abs(fy)) if fx.size else 0.0
            if not err > tol:  # also stops when everything is NaN
                break
        return u, v

    def to_altaz(self, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """Directions (alt, az) in degrees of pixel positions (inverse of :meth:`to_pixels`).

        Azimuth in [0, 360). Round trip with :meth:`to_pixels` is better than
        1e-6 px over the field for distortions of a few pixels.
        """
        x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
        shape = x.shape
        u, v = self.undistort(x.ravel(), y.ravel())
        cam = np.stack([u, v, np.ones_like(u)])
        cam /= np.sqrt((cam * cam).sum(axis=0))
        p = self.rotation().T @ cam
        alt = np.degrees(np.arcsin(np.clip(p[2], -1.0, 1.0)))
        az = np.degrees(np.arctan2(p[0], p[1])) % 360.0
        return alt.reshape(shape), az.reshape(shape)

    def in_image(self, x: np.ndarray, y: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """True where (x, y) lies at least ``margin`` px inside the image (NaN: False)."""
        with np.errstate(invalid="ignore"):
            return (
                (x >= margin - 0.5)
                & (x <= self.nx - 0.5 - margin)
                & (y >= margin - 0.5)
                & (y <= self.ny - 0.5 - margin)
            )

    # -- serialisation ----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (lists for the coefficients)."""
        d = dataclasses.asdict(self)
        d["dist_x"] = [float(c) for c in self.dist_x]
        d["dist_y"] = [float(c) for c in self.dist_y]
        for k in ("alt0", "az0", "th0", "x0", "y0", "scale"):
            d[k] = float(d[k])
        for k in ("nx", "ny", "order"):
            d[k] = int(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CameraModel:
        """Inverse of :meth:`to_dict`."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def copy(self) -> CameraModel:
        """Deep copy (the coefficient arrays are copied)."""
        return dataclasses.replace(self, dist_x=self.dist_x.copy(), dist_y=self.dist_y.copy())


def radial_distortion(
    k3: float, k5: float = 0.0, order: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients of a radial lens distortion, handy for simulations.

    The displacement is ``(dx, dy) = (u, v) (k3 r^2 + k5 r^4)`` pixels with
    ``r^2 = u^2 + v^2`` in radians of the tangent plane. For the full camera the
    field corner is at r ~ 0.9 rad, so ``k3 = 4`` moves the corners by ~3 px.
    """
    powers = term_powers(order)
    cx = np.zeros(len(powers))
    cy = np.zeros(len(powers))
    terms = {  # u r^2 = u^3 + u v^2;  u r^4 = u^5 + 2 u^3 v^2 + u v^4
        (3, 0): k3, (1, 2): k3, (5, 0): k5, (3, 2): 2 * k5, (1, 4): k5,
    }
    for (i, j), c in terms.items():
        if i + j <= order:
            cx[powers.index((i, j))] += c
            cy[powers.index((j, i))] += c
    return cx, cy


def nominal_camera(site: str, camera: str, size: str = "full") -> CameraModel:
    """The nominal model of a camera (SPEC §1): no distortion, nominal pointing.

    Parameters
    ----------
    site : {"LP", "LS"}
        Station. La Silla uses the La Palma altitudes and azimuths.
    camera : str
        Camera letter ``N E S W C`` or a camera id such as ``"LPE"``.
    size : {"full", "small"}
        ``"full"``: 4008 x 2672 px, optical centre (2004, 1336). ``"small"``: the
        central 1002 x 668 px of the same CCD and lens (centre (501, 334)), with
        the same pixel scale, star density per pixel, PSF sampling and star
        motion, for tests and demos.
    """
    site = site.upper()
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; expected one of {SITES}")
    letter = camera.upper()
    if len(letter) == 3 and letter[:2] in SITES:
        letter = letter[2]
    if letter not in NOMINAL_POINTING:
        raise ValueError(f"unknown camera {camera!r}; expected one of {list(NOMINAL_POINTING)}")
    alt0, az0 = NOMINAL_POINTING[letter]
    if size == "full":
        nx, ny, x0, y0 = 4008, 2672, 2004.0, 1336.0
    elif size == "small":
        nx, ny, x0, y0 = 1002, 668, 501.0, 334.0
    else:
        raise ValueError(f"size must be 'full' or 'small', not {size!r}")
    return CameraModel(alt0=alt0, az0=az0, th0=NOMINAL_TH0, x0=x0, y0=y0,
                       scale=NOMINAL_SCALE, nx=nx, ny=ny)
