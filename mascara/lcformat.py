"""The record layouts of light curves: batch files, fLC and sLC files (SPEC §8).

These dtypes are the contract between the reduction, the batch files and the
night files; they never change from night to night.
"""

from __future__ import annotations

import numpy as np

#: Per-frame photometry of one star (one row of ``data/<ascc>`` in fLC files).
FAST_DTYPE = np.dtype(
    [
        ("flag", "u2"),
        ("flux0", "f8"),
        ("eflux0", "f8"),
        ("flux1", "f8"),
        ("eflux1", "f8"),
        ("sky", "f8"),
        ("esky", "f8"),
        ("peak", "f4"),
        ("x", "f4"),
        ("y", "f4"),
        ("alt", "f4"),
        ("az", "f4"),
        ("ccdtemp", "f4"),
        ("exptime", "f4"),
        ("jdmid", "f8"),
        ("lst", "f8"),
        ("lstidx", "u4"),
        ("lstseq", "u4"),
    ]
)

#: Per-batch photometry of one star on the binned image (sLC), four apertures.
SLOW_DTYPE = np.dtype(
    [
        ("flag", "u2"),
        ("flux0", "f8"),
        ("eflux0", "f8"),
        ("flux1", "f8"),
        ("eflux1", "f8"),
        ("flux2", "f8"),
        ("eflux2", "f8"),
        ("flux3", "f8"),
        ("eflux3", "f8"),
        ("sky", "f8"),
        ("esky", "f8"),
        ("peak", "f4"),
        ("x", "f4"),
        ("y", "f4"),
        ("alt", "f4"),
        ("az", "f4"),
        ("ccdtemp", "f4"),
        ("exptime", "f4"),
        ("jdmid", "f8"),
        ("lst", "f8"),
        ("lstidx", "u4"),
        ("lstseq", "u4"),
    ]
)

#: Star id as stored in batch files (decimal string, as bytes).
ASCC_DTYPE = np.dtype("S12")

#: Catalogue fields of a star, as they appear in headers and batch files.
STAR_FIELDS = [
    ("ra", "f8"),
    ("dec", "f8"),
    ("vmag", "f4"),
    ("bmag", "f4"),
    ("spectype", "S9"),
    ("blend", "u1"),
    ("blendvalue", "f4"),
]

#: ``header/<ascc>`` record (one row per star).
HEADER_DTYPE = np.dtype([("jdstart", "f8")] + STAR_FIELDS + [("nobs", "u4")])

#: Catalogue data of the stars of a batch (``stars`` table of batch files).
STAR_DTYPE = np.dtype([("ascc", ASCC_DTYPE)] + STAR_FIELDS)

#: Order of the 1-D datasets in the ``header_table`` group.
HEADER_TABLE_FIELDS = ("ascc", "ra", "dec", "vmag", "bmag", "spectype", "blend", "blendvalue", "jdstart", "nobs")


#: Attributes of the ``global`` group, in order (SPEC §8).
GLOBAL_ATTRS = (
    "STATION", "CAMERA", "ALT0", "AZ0", "TH0", "X0", "Y0", "AVERSION", "RVERSION",
    "CVERSION", "EXPTIME", "CCDTEMP", "NAPER", "APER0", "APER1", "NSTAPER", "SKYRAD0", "SKYRAD1",
)

#: Optional extra ``global`` attributes: the calibration applied (master kind ``dark``/``bias``/``none``,
#: the files combined, a one-line note, the rejected calibration files as JSON [[name, reason], ...]).
CALIBRATION_ATTRS = ("CALIBRATION", "CALFILES", "CALNOTE", "CALREJECTED")

#: Flag bits (SPEC §6).
FLAG_EDGE = 1  # box leaves the image (no photometry), or an aperture reaches pixels without data (NaN flux)
FLAG_SKY_SATURATED = 2  # a sky pixel is saturated
FLAG_SKY_BAD = 4  # sky < 0 or the estimate failed
FLAG_PEAK_SATURATED = 8
FLAG_NEGATIVE_FLUX = 16
FLAG_MOON = 32


def fast_table(n: int) -> np.ndarray:
    """Empty per-frame batch table: FAST_DTYPE plus the star id in front."""
    return np.zeros(n, dtype=with_ascc(FAST_DTYPE))


def with_ascc(dtype: np.dtype) -> np.dtype:
    """``dtype`` with a leading ``ascc`` field, the layout of batch-file tables."""
    return np.dtype([("ascc", ASCC_DTYPE)] + [(n, dtype.fields[n][0]) for n in dtype.names])
