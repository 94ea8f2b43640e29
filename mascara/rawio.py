"""Raw night directories: finding nights and frames, reading and validating frames, calibration.

Layout (SPEC §3)::

    <datadir>/<YYYYMMDD><SITE><CAM>/raw/<lstseq:08d><SITE><CAM>.fits[.gz]
    <datadir>/<YYYYMMDD><SITE><CAM>/raw/calib_bias*.fits, calib_dark*.fits, calib_flat*.fits

Nothing here ever writes into ``raw/``.  A frame that cannot be used raises
:class:`BadFrame`, whose message names the file and the problem; callers record
it and go on with the night.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning

NIGHT_DIR_RE = re.compile(r"^(?P<night>\d{8})(?P<site>[A-Z]{2})(?P<camera>[NESWC])$")
FRAME_RE = re.compile(r"^(?P<lstseq>\d{8})(?P<site>[A-Z]{2})(?P<camera>[NESWC])\.fits(\.gz)?$")

#: Header keywords every science frame must carry (SPEC §3).
REQUIRED_KEYWORDS = (
    "LSTSEQ", "LSTIDX", "JD", "LST", "EXPTIME", "CCDTEMP", "SITE-OBS", "CAMERA",
    "DATE-OBS", "IMAGETYP", "X0", "XSIZE", "Y0", "YSIZE",
)


class BadFrame(Exception):
    """A raw frame that cannot be reduced.  ``str(exc)`` names the file and the reason."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path.name}: {reason}")


@dataclasses.dataclass(frozen=True)
class NightDir:
    """One camera-night directory."""

    path: Path
    night: str  # YYYYMMDD, UTC date of the evening
    site: str
    camera: str  # letter N E S W C

    @property
    def night_id(self) -> str:
        return f"{self.night}{self.site}{self.camera}"

    @property
    def raw(self) -> Path:
        return self.path / "raw"


@dataclasses.dataclass(frozen=True)
class FrameFile:
    """A science frame found on disk (not yet opened)."""

    path: Path
    lstseq: int
    size: int


@dataclasses.dataclass
class Frame:
    """A science frame read from disk: the raw pixels (with overscan) and its header values."""

    path: Path
    data: np.ndarray  # uint16, full raw frame including the overscan border
    header: dict

    @property
    def lstseq(self) -> int:
        return int(self.header["LSTSEQ"])

    @property
    def science_slice(self) -> tuple[slice, slice]:
        h = self.header
        x0, y0 = int(h["X0"]), int(h["Y0"])
        return slice(y0, y0 + int(h["YSIZE"])), slice(x0, x0 + int(h["XSIZE"]))


def parse_night_dir(path: Path | str) -> NightDir | None:
    """The :class:`NightDir` of ``path`` if its name is ``<YYYYMMDD><SITE><CAM>``, else None."""
    path = Path(path)
    m = NIGHT_DIR_RE.match(path.name)
    if not m:
        return None
    return NightDir(path=path, night=m["night"], site=m["site"], camera=m["camera"])


def find_night_dirs(
    datadir: Path | str,
    nights: Iterable[str] | None = None,
    cameras: Iterable[str] | None = None,
    sites: Iterable[str] | None = None,
) -> list[NightDir]:
    """Camera-night directories under ``datadir`` that have a ``raw/`` subdirectory, sorted by name."""
    datadir = Path(datadir)
    if not datadir.is_dir():
        raise FileNotFoundError(f"data directory {datadir} does not exist")
    nights = set(nights) if nights else None
    cameras = set(cameras) if cameras else None
    sites = set(sites) if sites else None
    found = []
    for p in sorted(datadir.iterdir()):
        nd = parse_night_dir(p)
        if nd is None or not nd.raw.is_dir():
            continue
        if nights and nd.night not in nights:
            continue
        if cameras and nd.camera not in cameras:
            continue
        if sites and nd.site not in sites:
            continue
        found.append(nd)
    return found


def list_frames(night: NightDir) -> list[FrameFile]:
    """Science frames of a night, sorted by lstseq (calibration and foreign files ignored).

    A duplicate lstseq (``.fits`` beside ``.fits.gz``) keeps the uncompressed file.
    """
    frames: dict[int, FrameFile] = {}
    for p in night.raw.iterdir():
        m = FRAME_RE.match(p.name)
        if not m or m["site"] != night.site or m["camera"] != night.camera:
            continue
        seq = int(m["lstseq"])
        if seq in frames and frames[seq].path.suffix == ".fits":
            continue
        frames[seq] = FrameFile(path=p, lstseq=seq, size=p.stat().st_size)
    return [frames[k] for k in sorted(frames)]


def group_batches(frames: Sequence[FrameFile], batch_size: int = 50) -> dict[int, list[FrameFile]]:
    """Frames grouped by batch index ``lstseq // batch_size``; partial and gappy batches allowed."""
    batches: dict[int, list[FrameFile]] = {}
    for f in frames:
        batches.setdefault(f.lstseq // batch_size, []).append(f)
    return dict(sorted(batches.items()))


def raw_inventory_hash(frames: Sequence[FrameFile], calib: Sequence[Path] = ()) -> str:
    """sha256 over names and sizes of the raw files: changes when raw data are added or replaced."""
    h = hashlib.sha256()
    for f in frames:
        h.update(f"{f.path.name}:{f.size}\n".encode())
    for p in sorted(calib):
        h.update(f"{p.name}:{p.stat().st_size}\n".encode())
    return h.hexdigest()


def _as_uint16(hdu: fits.PrimaryHDU | fits.ImageHDU, path: Path) -> np.ndarray:
    """Pixel values as native uint16, reading BZERO-scaled int16 without the slow float path."""
    hdr = hdu.header
    raw = hdu.data
    if raw is None:
        raise BadFrame(path, "no image data")
    if hdr.get("BITPIX") == 16 and hdr.get("BZERO", 0) == 32768 and hdr.get("BSCALE", 1) == 1:
        # int16 + 32768 == the same bits with the sign bit flipped: one byte-swapping copy, one in-place xor
        out = raw.view(">u2").astype("<u2")
        out ^= np.uint16(0x8000)
        return out
    data = np.asarray(hdu.data, dtype=np.float64) * hdr.get("BSCALE", 1) + hdr.get("BZERO", 0)
    return np.clip(np.rint(data), 0, 65535).astype(np.uint16)


def read_frame(path: Path | str, expected_shape: tuple[int, int] | None = None) -> Frame:
    """Read and validate one science frame.

    Raises
    ------
    BadFrame
        unreadable or truncated file, a missing required keyword, a shape that
        disagrees with ``expected_shape`` or with the science-region keywords,
        an ``LSTSEQ`` that disagrees with the file name, or insane values.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AstropyUserWarning)  # every file's truncation is seen
            hdul = fits.open(path, do_not_scale_image_data=True, memmap=True)
        with hdul:
            hdu = hdul[0]
            header = hdu.header
            missing = [k for k in REQUIRED_KEYWORDS if k not in header]
            if missing:
                raise BadFrame(path, f"missing header keyword(s) {', '.join(missing)}")
            truncated = [w for w in caught if "truncated" in str(w.message)]
            if truncated:
                raise BadFrame(path, f"truncated file ({truncated[0].message})")
            data = _as_uint16(hdu, path)
            hdict = {k: header[k] for k in REQUIRED_KEYWORDS}
            hdict["AVERSION"] = header.get("AVERSION", "unknown")
    except BadFrame:
        raise
    except (OSError, ValueError, TypeError, IndexError, EOFError) as exc:
        raise BadFrame(path, f"unreadable FITS file ({type(exc).__name__}: {exc})") from exc
    return validate_frame(Frame(path=path, data=data, header=hdict), expected_shape)


def validate_frame(frame: Frame, expected_shape: tuple[int, int] | None = None) -> Frame:
    """Check a frame's shape and header values; raise :class:`BadFrame` with the reason."""
    path, h, data = frame.path, frame.header, frame.data
    if data.ndim != 2:
        raise BadFrame(path, f"image has {data.ndim} dimensions, expected 2")
    if expected_shape is not None and data.shape != tuple(expected_shape):
        raise BadFrame(path, f"shape {data.shape} differs from the night's {tuple(expected_shape)}")
    try:
        x0, y0, nx, ny = (int(h[k]) for k in ("X0", "Y0", "XSIZE", "YSIZE"))
        lstseq, lstidx = int(h["LSTSEQ"]), int(h["LSTIDX"])
        jd, lst, exptime = float(h["JD"]), float(h["LST"]), float(h["EXPTIME"])
    except (TypeError, ValueError) as exc:
        raise BadFrame(path, f"non-numeric header value ({exc})") from exc
    if x0 < 0 or y0 < 0 or nx <= 0 or ny <= 0 or y0 + ny > data.shape[0] or x0 + nx > data.shape[1]:
        raise BadFrame(path, f"science region X0={x0} Y0={y0} {nx}x{ny} does not fit the {data.shape[1]}x{data.shape[0]} image")
    m = FRAME_RE.match(path.name)
    if m and int(m["lstseq"]) != lstseq:
        raise BadFrame(path, f"LSTSEQ {lstseq} disagrees with the file name")
    if lstidx != lstseq % 13500:
        raise BadFrame(path, f"LSTIDX {lstidx} is not LSTSEQ % 13500")
    if not (2.4e6 < jd < 2.6e6):
        raise BadFrame(path, f"JD {jd} out of range")
    if not (0.0 <= lst < 24.0):
        raise BadFrame(path, f"LST {lst} out of range")
    if not (0.0 < exptime < 100.0):
        raise BadFrame(path, f"EXPTIME {exptime} out of range")
    if str(h["IMAGETYP"]).strip().lower() != "science":
        raise BadFrame(path, f"IMAGETYP is {h['IMAGETYP']!r}, not science")
    return frame


def calibration_files(night: NightDir) -> dict[str, list[Path]]:
    """``calib_*`` files of a night by kind (bias, dark, flat)."""
    out: dict[str, list[Path]] = {"bias": [], "dark": [], "flat": []}
    for p in sorted(night.raw.glob("calib_*.fits*")):
        for kind in out:
            if p.name.startswith(f"calib_{kind}"):
                out[kind].append(p)
    return out


@dataclasses.dataclass
class MasterCalibration:
    """Master frame subtracted from every science frame (full raw frame size, float32)."""

    level: np.ndarray | None
    kind: str  # "dark", "bias" or "none"
    files: list[Path]
    rejected: list[tuple[Path, str]]


def master_calibration(night: NightDir) -> MasterCalibration:
    """Median-combine the night's darks (or biases when there is no dark).

    Darks are taken with the science exposure time, so they carry bias and dark
    current together and are subtracted as they are.  Unreadable calibration
    frames are skipped and reported in ``rejected``.
    """
    files = calibration_files(night)
    rejected: list[tuple[Path, str]] = []
    for kind in ("dark", "bias"):
        stack = []
        used = []
        for p in files[kind]:
            try:
                with fits.open(p, do_not_scale_image_data=True, memmap=False) as hdul:
                    stack.append(_as_uint16(hdul[0], p).astype(np.float32))
                    used.append(p)
            except (OSError, ValueError, TypeError, BadFrame) as exc:
                rejected.append((p, f"unreadable calibration frame ({exc})"))
        shapes = {s.shape for s in stack}
        if len(shapes) > 1:
            common = max(shapes, key=lambda s: sum(x.shape == s for x in stack))
            for p, s in zip(list(used), list(stack)):
                if s.shape != common:
                    rejected.append((p, f"shape {s.shape} differs from {common}"))
            pairs = [(p, s) for p, s in zip(used, stack) if s.shape == common]
            used, stack = [p for p, _ in pairs], [s for _, s in pairs]
        if stack:
            level = stack[0] if len(stack) == 1 else np.median(np.stack(stack), axis=0).astype(np.float32)
            return MasterCalibration(level=level, kind=kind, files=used, rejected=rejected)
    return MasterCalibration(level=None, kind="none", files=[], rejected=rejected)


def calibrate(frame: Frame, master: MasterCalibration) -> tuple[np.ndarray, np.ndarray]:
    """Subtract the master and crop to the science region.

    Returns
    -------
    image : float32 array (YSIZE, XSIZE), calibrated ADU
    raw : uint16 array (YSIZE, XSIZE), the raw pixel values of the same region
        (for ``peak`` and saturation, which refer to raw values)
    """
    sl = frame.science_slice
    raw = frame.data[sl]
    if master.level is None:
        return raw.astype(np.float32), raw
    if master.level.shape != frame.data.shape:
        raise BadFrame(frame.path, f"shape {frame.data.shape} differs from the master {master.kind} {master.level.shape}")
    image = raw.astype(np.float32)
    image -= master.level[sl]
    return image, raw
