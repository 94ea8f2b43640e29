"""Raw night directories: finding nights and frames, the frame intake, calibration.

Layout (SPEC §3)::

    <datadir>/<YYYYMMDD><SITE><CAM>/raw/<lstseq:08d><SITE><CAM>.fits[.gz]
    <datadir>/<YYYYMMDD><SITE><CAM>/raw/calib_bias*.fits, calib_dark*.fits, calib_flat*.fits

Nothing here ever writes into ``raw/``.

The frame intake
----------------
Every science frame passes the same checks before any use (the frame the
night's camera solution is found on included); :data:`INTAKE_CHECKS` lists
them in order.  :func:`scan_raw` applies the first two (names, one file per
lstseq) to the whole directory; :func:`read_frame` applies the rest to one
file as it is read.  A frame that fails raises :class:`BadFrame`, whose
``reason`` is recorded by the caller, and the night goes on.  A frame that
passes is a 2-D integer image of the night's shape with finite, sane header
values, so the reduction of its batch cannot fail on it.

Calibration frames (``calib_*``) pass the file, FITS, image and shape checks
too (:func:`master_calibration`); a floating-point master is accepted when all
its pixels are finite.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import threading
import warnings
import zlib
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning
from numba import njit

from mascara.selection import NIGHT_DIR_RE, night_dir_path
from mascara.timeindex import EXPTIME as STATION_EXPTIME

FRAME_RE = re.compile(r"^(?P<lstseq>\d{8})(?P<site>[A-Z]{2})(?P<camera>[NESWC])\.fits(\.gz)?$")
#: Names that are nearly a frame's (case, digits, extension, compression): refused by name, not ignored
#: (temporary names of a file being written, ``.fits.part``, ``.fits.tmp``, are not among them).
NEAR_FRAME_RE = re.compile(r"^(?P<lstseq>\d{5,10})(?P<site>[a-z]{2})(?P<camera>[a-z])\.(?:fits?|fts)(?:\.(?:gz|bz2|xz|z|zst|zip|fz))?$",
                           re.IGNORECASE)

#: Header keywords every science frame must carry (SPEC §3).
REQUIRED_KEYWORDS = (
    "LSTSEQ", "LSTIDX", "JD", "LST", "EXPTIME", "CCDTEMP", "SITE-OBS", "CAMERA",
    "DATE-OBS", "IMAGETYP", "X0", "XSIZE", "Y0", "YSIZE",
)
#: Required keywords that must hold finite numbers.
NUMERIC_KEYWORDS = ("LSTSEQ", "LSTIDX", "JD", "LST", "EXPTIME", "CCDTEMP", "X0", "XSIZE", "Y0", "YSIZE")
#: Raw ADU at and above which a pixel is saturated (SPEC §1).
SATURATION_ADU = 63000
#: A frame with more than this fraction of saturated science pixels is refused.
MAX_SATURATED_FRACTION = 0.5

#: The intake checks of a science frame, in the order they are applied (README, "Bad input").
INTAKE_CHECKS: tuple[tuple[str, str], ...] = (
    ("name", "named <lstseq:08d><SITE><CAM>.fits[.gz] with this night's site and camera (a name nearly so is "
             "refused, NEAR_FRAME_RE)"),
    ("one file per lstseq", "of several files with one lstseq (.fits beside .fits.gz) the first that "
                            "passes intake, .fits before .fits.gz, is kept; the others are rejected"),
    ("regular file", "not a directory, not a dangling symbolic link, not empty"),
    ("readable FITS", "opens as FITS, not truncated, has an image"),
    ("keywords", f"{', '.join(REQUIRED_KEYWORDS)} present; the numeric ones finite numbers"),
    ("header values", "LSTSEQ equals the file name's, LSTIDX = LSTSEQ % 13500, JD, LST, EXPTIME (within 10 % "
                      "under the station's exposure up to 6.5 s) and CCDTEMP in range, IMAGETYP science, SITE-OBS and CAMERA those of the file name, the exposure's start "
                      "(JD - EXPTIME/2) within 3.2 s of the slot LSTSEQ names, LST the local sidereal time of JD "
                      "within 3 s"),
    ("integer image", "2-D integer pixels (a floating-point image, which can hold NaN, is refused)"),
    ("night's shape", "the shape of the night's frames; the science region X0 Y0 XSIZE YSIZE inside it"),
    ("not constant", "not one value everywhere (all zero, a blank readout)"),
    ("not mostly saturated", f"at most {MAX_SATURATED_FRACTION:.0%} of the science pixels >= {SATURATION_ADU} ADU"),
)


#: Longest accepted ``EXPTIME`` (s): the slot of 6.4 sidereal seconds, rounded up.
MAX_EXPTIME = 6.5
#: Shortest accepted ``EXPTIME`` (s): 10 % under the station's exposure, as for darks. Fluxes are per frame,
#: not per second (SPEC section 6): a shorter exposure would put a fainter point in every light curve.
MIN_EXPTIME = 0.9 * STATION_EXPTIME
#: ``CCDTEMP`` (deg C) beyond this either way is not a temperature a camera ran at.
CCDTEMP_LIMIT = 100.0
#: How far (s) an exposure's start (header ``JD`` minus half ``EXPTIME``) may lie outside its slot
#: (``LSTSEQ``): half a slot. A real frame starts 0.1 s into it (SPEC check value); at 6 s the stars
#: are a pixel from where the header's time puts them, and the frame is refused.
SLOT_MARGIN_SECONDS = 3.2
#: How far (s of sidereal time) header ``LST`` may be from the local apparent sidereal time of its
#: ``JD`` (0.01 s for the SPEC check value; a mean rather than apparent sidereal time is 1.2 s off at most).
LST_MARGIN_SECONDS = 3.0


def _check_times(path: Path, lstseq: int, jd: float, lst: float, exptime: float, site: str) -> None:
    """``JD`` within the slot ``LSTSEQ`` names, and ``LST`` that of ``JD`` at the site; BadFrame if not.

    Positions come from ``JD``; batches and light curves are keyed by
    ``LSTSEQ``: a frame whose two disagree would put every star where it
    is not (a minute off is 11 px) while its photometry looks ordinary.
    """
    from mascara.timeindex import REF_LON, SIDEREAL_RATIO, SLOT_SIDEREAL_SECONDS, get_site, slot_start_jd

    start = slot_start_jd(lstseq)
    after = (jd - exptime / 2.0 / 86400.0 - start) * 86400.0  # exposure start, s after the slot's start
    slot = SLOT_SIDEREAL_SECONDS / SIDEREAL_RATIO
    if not (-SLOT_MARGIN_SECONDS <= after <= slot + SLOT_MARGIN_SECONDS):
        raise BadFrame(path, f"JD {jd!r} disagrees with LSTSEQ {lstseq}: the exposure starts {after:+.1f} s from "
                             f"the start of that {slot:.2f} s slot")
    try:
        lon = get_site(site).lon
    except (KeyError, ValueError):  # an unknown site: nothing to compare LST with
        return
    expected = ((lstseq % 13500) * SLOT_SIDEREAL_SECONDS / 3600.0 + (jd - start) * 24.0 * SIDEREAL_RATIO
                + (lon - REF_LON) / 15.0) % 24.0
    off = ((lst - expected + 12.0) % 24.0 - 12.0) * 3600.0
    if abs(off) > LST_MARGIN_SECONDS:
        raise BadFrame(path, f"LST {lst!r} h disagrees with JD {jd!r}: {off:+.1f} s from the local sidereal time "
                             f"at {site}")


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
    """A science frame found on disk (not yet opened); ``size`` is None unless it is a regular file."""

    path: Path
    lstseq: int
    size: int | None


@dataclasses.dataclass(frozen=True)
class Rejection:
    """A raw file refused without being reduced; ``lstseq`` is None for calibration files."""

    lstseq: int | None
    filename: str
    size: int | None
    reason: str


@dataclasses.dataclass
class RawScan:
    """What :func:`scan_raw` found in a night's ``raw/``.

    ``frames`` holds one candidate per lstseq, sorted; ``rejected`` the files
    refused by name or as duplicates; ``calib`` the ``calib_*`` files by kind;
    ``other`` the names of everything else (ignored); ``misnamed`` what the
    frames say of a directory whose name is more than a day from their night
    (empty otherwise).
    """

    frames: list[FrameFile]
    rejected: list[Rejection]
    calib: dict[str, list[Path]]
    other: list[str]
    misnamed: str = ""


@dataclasses.dataclass
class Frame:
    """A science frame read from disk: the raw pixels (with overscan) and its header values."""

    path: Path
    data: np.ndarray  # uint16, full raw frame including the overscan border
    header: dict
    #: the largest raw value of each row of the science region, when the reader found it on its way
    row_max: np.ndarray | None = None

    @property
    def lstseq(self) -> int:
        return int(self.header["LSTSEQ"])

    @property
    def science_slice(self) -> tuple[slice, slice]:
        h = self.header
        x0, y0 = int(h["X0"]), int(h["Y0"])
        return slice(y0, y0 + int(h["YSIZE"])), slice(x0, x0 + int(h["XSIZE"]))


def parse_night_dir(path: Path | str) -> NightDir | None:
    """The :class:`NightDir` of ``path`` if its name is ``<YYYYMMDD><SITE><CAM>``, else None.

    ``path`` is :func:`night_dir_path` of the path given, so that every path a reduction records
    (products, batches, moves) has one spelling: an outside trial reduced a data directory through a
    link, and the move aside, recorded under the link's name, left the product rows under the real name
    pointing at the new reduction's files.
    """
    path = Path(path)
    m = NIGHT_DIR_RE.match(path.name)
    if not m:
        return None
    return NightDir(path=night_dir_path(path), night=m["night"], site=m["site"], camera=m["camera"])


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


def _mtime_ns(p: Path) -> int | None:
    """Modification time (ns) of a file (following symbolic links), None if it cannot be read."""
    try:
        return p.stat().st_mtime_ns
    except OSError:
        return None


def regular_size(p: Path) -> int | None:
    """Size of a regular file (following symbolic links), None for anything else or a dangling link."""
    try:
        st = p.stat()
    except OSError:
        return None
    return st.st_size if os.path.isfile(p) else None


def _file_problem(p: Path) -> str | None:
    """Why ``p`` is not a readable non-empty regular file, or None."""
    if p.is_symlink() and not p.exists():
        return f"dangling symbolic link to {os.readlink(p)}"
    if p.is_dir():
        return "a directory, not a file"
    if not p.exists():
        return "no longer exists"
    if not p.is_file():
        return "not a regular file"
    if p.stat().st_size == 0:
        return "empty file (0 bytes)"
    if not os.access(p, os.R_OK):
        return "not readable (permissions)"
    return None


def scan_raw(night: NightDir, only: Collection[str] | None = None) -> RawScan:
    """Apply the name and one-file-per-lstseq checks of the intake to a night's ``raw/``.

    Never raises on what it finds: a file it cannot use is a :class:`Rejection`.
    ``only`` restricts the scan to these file names (a live reduction passes
    the files that have fully arrived, :class:`mascara.live.RawWatch`).
    """
    by_seq: dict[int, list[Path]] = {}
    rejected: list[Rejection] = []
    calib: dict[str, list[Path]] = {"bias": [], "dark": [], "flat": []}
    other: list[str] = []
    for p in sorted(night.raw.iterdir()):
        name = p.name
        if only is not None and name not in only:
            continue
        if name.startswith("calib_"):
            kind = next((k for k in calib if name.startswith(f"calib_{k}")), None)
            if kind is not None and ".fits" in name:
                calib[kind].append(p)
            else:
                other.append(name)
            continue
        m = FRAME_RE.match(name)
        if not m:
            near = NEAR_FRAME_RE.match(name)
            if near and (near["site"].upper(), near["camera"].upper()) == (night.site, night.camera):
                # a frame of this camera by every sign but its exact name: refused and recorded, not ignored
                rejected.append(Rejection(int(near["lstseq"]), name, regular_size(p),
                                          f"file name is not <lstseq:08d>{night.site}{night.camera}.fits[.gz]"))
            else:
                other.append(name)
            continue
        seq = int(m["lstseq"])
        if m["site"] != night.site or m["camera"] != night.camera:
            rejected.append(Rejection(seq, name, regular_size(p),
                                      f"file name is of camera {m['site']}{m['camera']}, not {night.site}{night.camera}"))
            continue
        by_seq.setdefault(seq, []).append(p)
    found = _night_window(night, sorted(by_seq))
    misnamed = ""
    if found is not None:
        window, misnamed = found
        for seq in [q for q in by_seq if not window[0] <= q <= window[1]]:
            for q in by_seq.pop(seq):
                rejected.append(Rejection(seq, q.name, regular_size(q),
                                          f"lstseq {seq} is not a slot of the night {night.night} at {night.site} "
                                          f"(its slots run from {window[0]} to {window[1]}, local noon to noon)"
                                          + (f"; {misnamed}" if misnamed else "")))
    frames = []
    for seq in sorted(by_seq):
        paths = sorted(by_seq[seq], key=lambda q: (q.name.endswith(".gz"), q.name))  # .fits first
        keep = paths[0]
        if len(paths) > 1:
            reasons = {}
            for q in paths:
                try:
                    read_frame(q)
                except BadFrame as exc:
                    reasons[q] = exc.reason
            keep = next((q for q in paths if q not in reasons), paths[0])
            for q in paths:
                if q != keep:
                    why = reasons.get(q, f"duplicate of lstseq {seq}: {keep.name} is used")
                    if q in reasons:
                        why += (f" (duplicate of lstseq {seq}: {keep.name} is used)" if keep not in reasons else
                                f" (duplicate of lstseq {seq}; {keep.name}, tried first, is refused too)")
                    rejected.append(Rejection(seq, q.name, regular_size(q), why))
        frames.append(FrameFile(path=keep, lstseq=seq, size=regular_size(keep)))
    return RawScan(frames=frames, rejected=rejected, calib=calib, other=other, misnamed=misnamed)


def _night_window(night: NightDir, seqs: Sequence[int]) -> tuple[tuple[int, int], str] | None:
    """The lstseq range of the night's frames (local mean noon to noon of the directory's date), and what the
    frames say of a misnamed directory (empty when its name is right within a day).

    If most frames fall outside it and the median frame's night is a day
    before or after the directory's date, the directory was dated by another
    convention (the UTC date at the start of acquisition is a day later at La
    Silla in summer): then the window is the median frame's night, so that a
    whole night is never refused for its name while frames of other nights
    still are. Further away, the directory is misnamed (an outside trial
    copied a night's frames into a directory six days later and it was
    reduced, recorded and counted as that night): the directory's window
    stands, every frame is refused, and each refusal says which night its
    frames are of. None when there is nothing to check against (not a date,
    an unknown site).
    """
    import datetime as dt

    from mascara.timeindex import night_of_slot, night_slot_window, slot_window_around

    try:
        window = night_slot_window(night.night, night.site)
    except (ValueError, KeyError):
        return None
    inside = sum(window[0] <= q <= window[1] for q in seqs)
    if not seqs or 2 * inside >= len(seqs):
        return window, ""
    median = int(seqs[len(seqs) // 2])
    theirs = night_of_slot(median, night.site)
    days = (dt.datetime.strptime(theirs, "%Y%m%d") - dt.datetime.strptime(night.night, "%Y%m%d")).days
    if abs(days) <= 1:
        return slot_window_around(median, night.site), ""
    return window, (f"most frames in {night.night_id}/raw are of the night {theirs}, {abs(days)} days "
                    f"{'after' if days > 0 else 'before'} the directory's name: a misnamed directory?")


def list_frames(night: NightDir) -> list[FrameFile]:
    """Candidate science frames of a night, one per lstseq, sorted (see :func:`scan_raw`)."""
    return scan_raw(night).frames


def group_batches(frames: Sequence[FrameFile], batch_size: int = 50) -> dict[int, list[FrameFile]]:
    """Frames grouped by batch index ``lstseq // batch_size``; partial and gappy batches allowed."""
    batches: dict[int, list[FrameFile]] = {}
    for f in frames:
        batches.setdefault(f.lstseq // batch_size, []).append(f)
    return dict(sorted(batches.items()))


def raw_inventory_hash(frames: Sequence[FrameFile], calib: Sequence[Path] = (),
                       rejected: Sequence[Rejection] = ()) -> str:
    """sha256 over the names, sizes and modification times of the raw files.

    It changes when raw data are added, removed or replaced, and when a file
    is edited in place (a header fixed with ``fits.open(mode="update")``, a
    frame transferred again): a reduction of the edited night is a different
    reduction, so a resumed run does not reuse batches reduced from the old
    content. A file rewritten with the same size and modification time is
    not seen (that would need its content hashed). Rejected files count by
    name and size.
    """
    h = hashlib.sha256()
    for f in frames:
        h.update(f"{f.path.name}:{f.size}:{_mtime_ns(f.path)}\n".encode())
    for p in sorted(calib):
        h.update(f"{p.name}:{regular_size(p)}:{_mtime_ns(p)}\n".encode())
    for r in sorted(rejected, key=lambda r: r.filename):
        h.update(f"{r.filename}:{r.size}:rejected\n".encode())
    return h.hexdigest()


def frame_shape(path: Path | str) -> tuple[int, int] | None:
    """(ny, nx) of a FITS file's primary image from its header alone, or None if unreadable."""
    try:
        with _WARNINGS_LOCK, warnings.catch_warnings():  # process-wide state: one thread at a time
            warnings.simplefilter("ignore")
            h = fits.getheader(path)
        if int(h.get("NAXIS", 0)) != 2:
            return None
        return int(h["NAXIS2"]), int(h["NAXIS1"])
    except Exception:  # noqa: BLE001 - any unreadable header just does not vote
        return None


def night_frame_shape(frames: Sequence[FrameFile], sample: int = 9) -> tuple[int, int] | None:
    """The night's frame shape: the most common shape among up to ``sample`` frames spread over the night.

    Read from headers only.  A single odd frame (the first one, say) cannot
    decide the shape every other frame is checked against.
    """
    if not frames:
        return None
    idx = np.unique(np.linspace(0, len(frames) - 1, min(sample, len(frames))).round().astype(int))
    votes = Counter(s for s in (frame_shape(frames[i].path) for i in idx) if s is not None)
    if not votes:
        # every sampled header unreadable: try the rest in order
        for f in frames:
            s = frame_shape(f.path)
            if s is not None:
                return s
        return None
    return votes.most_common(1)[0][0]


_WARNINGS_LOCK = threading.Lock()

#: FITS files are written in blocks of this many bytes; a header is 80-byte cards up to ``END``.
FITS_BLOCK = 2880
FITS_CARD = 80


def primary_header_layout(path: Path | str) -> tuple[int, int] | None:
    """``(header bytes, data bytes)`` of a plain FITS file's primary HDU, from its header alone.

    The header bytes are whole blocks up to the one holding ``END``; the data
    bytes are ``|BITPIX|/8 * NAXIS1 * ... * NAXISn`` (0 without axes), not
    rounded up to a block. None when what is on disk holds no complete header
    (not written yet, not FITS, compressed) or a layout this does not know
    (random groups, ``PCOUNT``/``GCOUNT`` other than 0 and 1).
    """
    try:
        with open(path, "rb") as fh:
            head = b""
            while True:
                block = fh.read(FITS_BLOCK)
                if len(block) < FITS_BLOCK:
                    return None
                if not head and not block.startswith(b"SIMPLE  ="):
                    return None
                head += block
                cards = [head[i:i + FITS_CARD] for i in range(len(head) - FITS_BLOCK, len(head), FITS_CARD)]
                if any(c[:8] == b"END     " for c in cards):
                    break
                if len(head) > 200 * FITS_BLOCK:
                    return None
    except OSError:
        return None
    values: dict[str, str] = {}
    for i in range(0, len(head), FITS_CARD):
        card = head[i:i + FITS_CARD].decode("ascii", "replace")
        if card[:8] == "END     ":
            break
        if card[8:10] == "= ":
            values[card[:8].strip()] = card[10:].split("/")[0].strip()
    try:
        if "GROUPS" in values or int(values.get("PCOUNT", "0")) != 0 or int(values.get("GCOUNT", "1")) != 1:
            return None
        naxis = int(values.get("NAXIS", "0"))
        nbytes = abs(int(values["BITPIX"])) // 8
        for k in range(1, naxis + 1):
            nbytes *= int(values[f"NAXIS{k}"])
    except (KeyError, ValueError):
        return None
    return len(head), (nbytes if naxis else 0)


def _complete_by_size(path: Path) -> bool:
    """True when ``path`` is a plain FITS file at least as long as its header says; BadFrame when shorter.

    Astropy's own test, without its warning: the header blocks plus the data
    padded to whole blocks must be on disk. False when the header cannot
    tell (compressed files, no complete or an unusual header): the caller
    then lets astropy decide.
    """
    if path.name.endswith(".gz"):
        return False
    layout = primary_header_layout(path)
    if layout is None:
        return False
    head, data = layout
    need = head + -(-data // FITS_BLOCK) * FITS_BLOCK
    size = path.stat().st_size
    if size < need:
        raise BadFrame(path, f"truncated file ({size} of {need} bytes)")
    return True


def _open_image(path: Path, allow_float: bool, memmap: bool,
                decode=None) -> tuple[fits.Header, np.ndarray]:
    """Header and pixels of a FITS file's primary image, after the file and FITS checks.

    Integer images come back as uint16; floating-point ones (calibration
    masters only, ``allow_float``) as float32 when every pixel is finite.
    ``decode(hdu)``, when given, replaces the conversion of the pixels (it
    runs while the file is open).
    """
    problem = _file_problem(path)
    if problem:
        raise BadFrame(path, problem)

    try:
        if _complete_by_size(path):
            # Every byte the header promises is on disk, so astropy cannot find the file truncated:
            # no need for the warnings capture, which is process-wide and so one file at a time.
            with fits.open(path, do_not_scale_image_data=True, memmap=memmap) as hdul:
                hdu = _primary(path, hdul)
                header = hdu.header  # parsed already, it outlives the file: no copy needed
                data = _pixels(hdu, path, allow_float) if decode is None else decode(hdu)
            return header, data
        # Compressed or unusual files: astropy tells truncation by a warning. The warnings machinery
        # is process-wide: with batches read in two threads, one thread's catch_warnings recorded the
        # other's "truncated" warning and refused a good frame. One file at a time goes through it.
        with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AstropyUserWarning)  # every file's truncation is seen
            hdul = fits.open(path, do_not_scale_image_data=True, memmap=memmap)
            with hdul:
                hdu = _primary(path, hdul)
                header = hdu.header  # parsed already, it outlives the file: no copy needed
                truncated = [w for w in caught if "truncated" in str(w.message)]
                if truncated:
                    raise BadFrame(path, f"truncated file ({truncated[0].message})")
                data = _pixels(hdu, path, allow_float) if decode is None else decode(hdu)
            truncated = [w for w in caught if "truncated" in str(w.message)]
            if truncated:  # some truncations only show when the data are read
                raise BadFrame(path, f"truncated file ({truncated[0].message})")
    except BadFrame:
        raise
    except (OSError, ValueError, TypeError, IndexError, EOFError, KeyError, zlib.error, fits.VerifyError) as exc:
        gz = _gzip_problem(path) if path.name.endswith(".gz") else None
        raise BadFrame(path, gz or f"unreadable FITS file ({type(exc).__name__}: {exc})") from exc
    return header, data


def _primary(path: Path, hdul: fits.HDUList) -> fits.PrimaryHDU:
    """The primary HDU; BadFrame when astropy could only read it as a corrupted HDU (no data)."""
    hdu = hdul[0]
    if not hasattr(hdu, "data"):  # astropy's _CorruptedHDU: a structural card (BITPIX, NAXIS...) is unreadable
        raise BadFrame(path, "corrupted primary header (a structural keyword such as BITPIX or NAXIS "
                             "cannot be parsed)")
    if int(hdu.header.get("NAXIS", 0) or 0) == 0 and len(hdul) > 1:  # say where the image is, if anywhere
        kinds = [type(h).__name__ for h in hdul[1:]]
        image = next((i for i, h in enumerate(hdul[1:], 1) if isinstance(h, (fits.ImageHDU, fits.CompImageHDU))),
                     None)
        if image is None:
            where = f"the extensions are {', '.join(kinds)}"
        else:
            packed = "a tile-compressed image" if isinstance(hdul[image], fits.CompImageHDU) else "an image"
            where = f"extension {image} holds {packed} ({kinds[image - 1]})"
        raise BadFrame(path, f"no image in the primary HDU: {where}; raw frames are uncompressed images in the "
                             "primary HDU")
    return hdu


def _gzip_problem(path: Path) -> str | None:
    """What is wrong with a ``.gz`` file's compressed stream, or None if it decompresses to its end.

    Asked only after astropy refused the file, whose own message for a cut
    stream ("Empty or corrupt FITS file") does not tell a transfer that
    stopped early from a bad FITS file inside a good stream.
    """
    import gzip

    size = path.stat().st_size
    out = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read1(1 << 16):  # read1: what one read of the stream gives, counted before a cut
                out += len(chunk)
    except EOFError:
        return (f"truncated compressed file (the gzip stream stops early: {size} bytes on disk, "
                f"{out} bytes decompressed)")
    except gzip.BadGzipFile as exc:
        if "CRC" in str(exc) or "length" in str(exc):  # a whole stream whose check failed: damaged, not foreign
            return f"corrupt compressed data (gzip: {exc})"
        return f"not a gzip file ({exc})"
    except (zlib.error, OSError) as exc:
        return f"corrupt compressed data ({type(exc).__name__}: {exc})"
    return None


def _pixels(hdu: fits.PrimaryHDU | fits.ImageHDU, path: Path, allow_float: bool) -> np.ndarray:
    """Pixel values: integer images as native uint16 (BZERO-scaled int16 without the slow float path)."""
    hdr = hdu.header
    raw = hdu.data
    if raw is None:
        raise BadFrame(path, "no image data")
    if raw.ndim != 2:
        raise BadFrame(path, f"image has {raw.ndim} dimensions, expected 2")
    bitpix = int(hdr.get("BITPIX", 0))
    if bitpix < 0:
        if not allow_float:
            nonfinite = int(np.count_nonzero(~np.isfinite(raw)))
            raise BadFrame(path, f"floating-point image (BITPIX {bitpix}, {nonfinite / raw.size:.0%} NaN or "
                                 "infinite): raw frames are integers")
        data = np.asarray(raw, dtype=np.float32) * hdr.get("BSCALE", 1) + hdr.get("BZERO", 0)
        if not np.all(np.isfinite(data)):
            raise BadFrame(path, "image has NaN or infinite pixels")
        return data.astype(np.float32)
    if bitpix == 16 and hdr.get("BZERO", 0) == 32768 and hdr.get("BSCALE", 1) == 1:
        # int16 + 32768 == the same bits with the sign bit flipped: one byte-swapping copy, one in-place xor
        out = raw.view(">u2").astype("<u2")
        out ^= np.uint16(0x8000)
        return out
    data = np.asarray(raw, dtype=np.float64) * hdr.get("BSCALE", 1) + hdr.get("BZERO", 0)
    return np.clip(np.rint(data), 0, 65535).astype(np.uint16)


def read_frame(path: Path | str, expected_shape: tuple[int, int] | None = None) -> Frame:
    """Read one science frame through the intake checks (:data:`INTAKE_CHECKS`, from "regular file").

    Parameters
    ----------
    path : the frame file (``.fits`` or ``.fits.gz``).
    expected_shape : (ny, nx) of the night's frames, including the overscan; None skips that check.

    Raises
    ------
    BadFrame
        the first check the frame fails, with its reason.
    """
    path = Path(path)
    header, data = _open_image(path, allow_float=False, memmap=True)
    return validate_frame(Frame(path=path, data=data, header=_header_values(path, header)), expected_shape)


def _header_values(path: Path, header: fits.Header) -> dict:
    """The required keywords of a science frame (and AVERSION) as a dict; BadFrame if any is missing."""
    missing = [k for k in REQUIRED_KEYWORDS if k not in header]
    if missing:
        raise BadFrame(path, f"missing header keyword(s) {', '.join(missing)}")
    hdict: dict = {}
    garbled = []
    for k in REQUIRED_KEYWORDS:
        try:
            hdict[k] = header[k]
        except (fits.VerifyError, ValueError) as exc:  # a card astropy cannot parse (damaged bytes)
            garbled.append(f"{k} ({exc})" if len(garbled) == 0 else k)
    if garbled:
        raise BadFrame(path, f"unparsable header card(s) {', '.join(garbled)}")
    try:
        hdict["AVERSION"] = header.get("AVERSION", "unknown")
    except (fits.VerifyError, ValueError):
        hdict["AVERSION"] = "unparsable"
    return hdict


def validate_frame(frame: Frame, expected_shape: tuple[int, int] | None = None,
                   pixel_stats: tuple[int, int, float] | None = None) -> Frame:
    """The header-value and pixel checks of the intake; raise :class:`BadFrame` with the reason.

    ``pixel_stats``: ``(min, max, saturated fraction)`` of the pixels when
    already computed (:func:`read_calibrated`), else computed here.
    """
    path, h, data = frame.path, frame.header, frame.data
    if data.ndim != 2:
        raise BadFrame(path, f"image has {data.ndim} dimensions, expected 2")
    bad = []
    for k in NUMERIC_KEYWORDS:
        try:
            ok = math.isfinite(float(h[k]))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            bad.append(f"{k}={h[k]!r}")
    if bad:
        raise BadFrame(path, f"non-numeric header value(s) {', '.join(bad)}")
    x0, y0, nx, ny = (int(h[k]) for k in ("X0", "Y0", "XSIZE", "YSIZE"))
    lstseq, lstidx = int(h["LSTSEQ"]), int(h["LSTIDX"])
    jd, lst, exptime = float(h["JD"]), float(h["LST"]), float(h["EXPTIME"])
    m = FRAME_RE.match(path.name)
    if m and int(m["lstseq"]) != lstseq:
        raise BadFrame(path, f"LSTSEQ {lstseq} disagrees with the file name ({int(m['lstseq'])})")
    if lstidx != lstseq % 13500:
        raise BadFrame(path, f"LSTIDX {lstidx} is not LSTSEQ % 13500")
    if not (2.4e6 < jd < 2.6e6):
        raise BadFrame(path, f"JD {jd} out of range")
    if not (0.0 <= lst < 24.0):
        raise BadFrame(path, f"LST {lst} out of range")
    if not (MIN_EXPTIME <= exptime <= MAX_EXPTIME):
        raise BadFrame(path, f"EXPTIME {exptime} out of range ({MIN_EXPTIME:.4f} to {MAX_EXPTIME} s: an exposure "
                             "fills its slot, and fluxes are per frame)")
    if not (-CCDTEMP_LIMIT < float(h["CCDTEMP"]) < CCDTEMP_LIMIT):
        raise BadFrame(path, f"CCDTEMP {float(h['CCDTEMP'])} out of range (+-{CCDTEMP_LIMIT:.0f} C)")
    if str(h["IMAGETYP"]).strip().lower() != "science":
        raise BadFrame(path, f"IMAGETYP is {h['IMAGETYP']!r}, not science")
    if m and (str(h["SITE-OBS"]).strip() != m["site"] or str(h["CAMERA"]).strip() != m["camera"]):
        raise BadFrame(path, f"header SITE-OBS/CAMERA {h['SITE-OBS']}/{h['CAMERA']} disagree with the file name")
    _check_times(path, lstseq, jd, lst, exptime, str(h["SITE-OBS"]).strip())
    if data.dtype.kind not in "ui":
        raise BadFrame(path, f"pixels of type {data.dtype}, expected integers")
    if expected_shape is not None and data.shape != tuple(expected_shape):
        raise BadFrame(path, f"shape {data.shape} differs from the night's {tuple(expected_shape)}")
    if x0 < 0 or y0 < 0 or nx <= 0 or ny <= 0 or y0 + ny > data.shape[0] or x0 + nx > data.shape[1]:
        raise BadFrame(path, f"science region X0={x0} Y0={y0} {nx}x{ny} does not fit the "
                             f"{data.shape[1]}x{data.shape[0]} image")
    if pixel_stats is None:
        lo, hi = int(data.min()), int(data.max())
        sci = data[y0:y0 + ny:2, x0:x0 + nx:2]  # every 4th pixel is plenty for a fraction
        saturated = float(np.count_nonzero(sci >= SATURATION_ADU)) / sci.size
    else:
        lo, hi, saturated = pixel_stats
    if lo == hi:
        raise BadFrame(path, f"constant image (every pixel is {lo})")
    if saturated > MAX_SATURATED_FRACTION:
        raise BadFrame(path, f"mostly saturated ({saturated:.0%} of the science pixels >= {SATURATION_ADU} ADU)")
    return frame


def calibration_files(night: NightDir) -> dict[str, list[Path]]:
    """``calib_*`` files of a night by kind (bias, dark, flat)."""
    return scan_raw(night).calib


@dataclasses.dataclass
class MasterCalibration:
    """Master frame subtracted from every science frame (full raw frame size, float32).

    ``kind`` is ``dark``, ``bias`` or ``none``; ``files`` are the frames combined,
    ``rejected`` the calibration files refused with their reasons, ``unused``
    files of a kind not needed (biases when there are darks; flats, never
    applied, unread), ``note``
    says in one line what was used and why.
    """

    level: np.ndarray | None
    kind: str
    files: list[Path]
    rejected: list[tuple[Path, str]]
    unused: list[Path] = dataclasses.field(default_factory=list)
    note: str = ""


#: How far a dark's ``EXPTIME`` may be from the science exposure (:data:`mascara.timeindex.EXPTIME`), relative:
#: a dark carries the dark current of its own exposure time.
DARK_EXPTIME_TOLERANCE = 0.1


def read_calibration(path: Path | str, kind: str, shape: tuple[int, int] | None = None,
                     site: str | None = None, camera: str | None = None) -> np.ndarray:
    """Pixels of one calibration frame (float32) after the intake's file, FITS, image and shape checks.

    With ``site`` and ``camera`` (the night's), a header ``SITE-OBS`` or
    ``CAMERA`` that names another is refused, and so is a dark whose
    ``EXPTIME`` is not the science exposure's (within 10 %). Keywords a file
    lacks are not required.

    Raises
    ------
    BadFrame
        with the reason the file cannot be used.
    """
    path = Path(path)
    header, data = _open_image(path, allow_float=True, memmap=False)
    try:
        imagetyp = header.get("IMAGETYP", kind)
        said = {k: header.get(k) for k in ("SITE-OBS", "CAMERA", "EXPTIME")}
    except (fits.VerifyError, ValueError) as exc:  # a damaged card
        raise BadFrame(path, f"unparsable header card(s) IMAGETYP/SITE-OBS/CAMERA/EXPTIME ({exc})") from exc
    if str(imagetyp).strip().lower() != kind:
        raise BadFrame(path, f"IMAGETYP is {imagetyp!r}, not {kind}")
    for key, want in (("SITE-OBS", site), ("CAMERA", camera)):
        if want is not None and said[key] is not None and str(said[key]).strip() != want:
            raise BadFrame(path, f"header {key} {str(said[key]).strip()!r} is not the night's {want!r}")
    if kind == "dark" and said["EXPTIME"] is not None:
        from mascara.timeindex import EXPTIME

        try:
            exptime = float(said["EXPTIME"])
        except (TypeError, ValueError):
            raise BadFrame(path, f"non-numeric header value EXPTIME={said['EXPTIME']!r}") from None
        if not abs(exptime - EXPTIME) <= DARK_EXPTIME_TOLERANCE * EXPTIME:
            raise BadFrame(path, f"dark of EXPTIME {exptime} s, not the science exposure ({EXPTIME:.2f} s)")
    if shape is not None and data.shape != tuple(shape):
        raise BadFrame(path, f"shape {data.shape} differs from the night's frames {tuple(shape)}")
    if float(data.min()) == float(data.max()):
        raise BadFrame(path, f"constant image (every pixel is {data.flat[0]})")
    return data.astype(np.float32)


def master_calibration(night: NightDir, shape: tuple[int, int] | None = None,
                       files: dict[str, list[Path]] | None = None) -> MasterCalibration:
    """Median-combine the night's darks (or biases when no dark is usable).

    Darks are taken with the science exposure time, so they carry bias and dark
    current together and are subtracted as they are.  Every calibration file
    passes :func:`read_calibration`; ``shape`` is the night's frame shape
    (default: the most common shape among the calibration files of a kind).
    """
    files = files if files is not None else calibration_files(night)
    rejected: list[tuple[Path, str]] = []
    found: dict[str, list[tuple[Path, np.ndarray]]] = {}
    for kind in ("dark", "bias"):
        good = []
        for p in files.get(kind, []):
            try:
                good.append((p, read_calibration(p, kind, shape, night.site, night.camera)))
            except BadFrame as exc:
                rejected.append((p, exc.reason))
        if shape is None and good:
            common = Counter(a.shape for _, a in good).most_common(1)[0][0]
            for p, a in good:
                if a.shape != common:
                    rejected.append((p, f"shape {a.shape} differs from the other {kind} frames {common}"))
            good = [(p, a) for p, a in good if a.shape == common]
        found[kind] = good
    nrej = {k: sum(1 for p, _ in rejected if p in files.get(k, [])) for k in ("dark", "bias")}
    flats = list(files.get("flat", []))  # listed as unused: no flat field is applied (the SPEC's calibration)

    def why_not(kind: str) -> str:
        n = len(files.get(kind, []))
        return f"no calib_{kind} files" if n == 0 else f"all {n} calib_{kind} files rejected"

    for kind in ("dark", "bias"):
        good = found[kind]
        if not good:
            continue
        stack = [a for _, a in good]
        level = stack[0] if len(stack) == 1 else np.median(np.stack(stack), axis=0).astype(np.float32)
        note = f"master {kind} of {len(good)} frame(s)"
        if nrej[kind]:
            note += f" ({nrej[kind]} rejected)"
        if kind == "bias":
            note = f"{why_not('dark')}; {note}"
        unused = ([p for p, _ in found["bias"]] if kind == "dark" else []) + flats
        return MasterCalibration(level=level, kind=kind, files=[p for p, _ in good], rejected=rejected,
                                 unused=unused, note=note)
    return MasterCalibration(level=None, kind="none", files=[], rejected=rejected, unused=flats,
                             note=f"{why_not('dark')} and {why_not('bias')}: frames are not calibrated")


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


# --------------------------------------------------------------------------- read + calibrate in one pass


class FrameBuffers:
    """Arrays reused by :func:`read_calibrated` from one frame to the next (one set per frame kept alive).

    ``raw`` holds the whole raw frame (uint16), ``image`` the calibrated
    science region (float32); both are overwritten by the next read.
    """

    def __init__(self) -> None:
        self.raw: np.ndarray | None = None
        self.image: np.ndarray | None = None
        self.row_max: np.ndarray | None = None

    def get(self, shape: tuple[int, int], sci_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.raw is None or self.raw.shape != shape:
            self.raw = np.empty(shape, dtype=np.uint16)
        if self.image is None or self.image.shape != sci_shape:
            self.image = np.empty(sci_shape, dtype=np.float32)
        if self.row_max is None or self.row_max.shape != sci_shape[:1]:
            self.row_max = np.empty(sci_shape[0], dtype=np.uint16)
        return self.raw, self.image, self.row_max


@njit(cache=True, nogil=True)
def _decode_calibrate(src, master, use_master, y0, y1, x0, x1, saturation, raw_out, image_out, row_max_out):
    """One pass over a BZERO = 32768 int16 frame: raw uint16 pixels, the calibrated science region, statistics.

    ``src`` is the file's big-endian int16 pixels viewed as native uint16:
    swapping the bytes and flipping the sign bit gives the unsigned value.
    Each row is decoded into ``raw_out`` and, while it is in cache,
    ``float32(raw) - master`` (float32 arithmetic, as numpy's) is written into
    ``image_out``. Returns the minimum and maximum raw value and the number
    of saturated pixels among every second row and column of the science
    region (the sample of :func:`validate_frame`). ``row_max_out`` receives the
    largest raw value of each row of the science region (the photometry's
    saturation map, without a pass of its own over the raw frame).
    """
    ny, nx = src.shape
    lo = np.uint16(65535)
    hi = np.uint16(0)
    nsat = 0
    width = x1 - x0
    for j in range(ny):
        s = src[j]
        r = raw_out[j]
        rlo = np.uint16(65535)
        rhi = np.uint16(0)
        for i in range(nx):
            w = np.uint32(s[i])
            r[i] = np.uint16(((w >> np.uint32(8)) | (w << np.uint32(8))) ^ np.uint32(0x8000))
        for i in range(nx):
            u = r[i]
            rlo = min(rlo, u)
            rhi = max(rhi, u)
        lo = min(lo, rlo)
        hi = max(hi, rhi)
        if y0 <= j < y1:
            # Loops over slices from 0: an index such as ``i - x0`` that numba cannot prove
            # non-negative gets a wrap-around test, and the loop then does not vectorise (this
            # kernel took 2.6 times as long, 17.7 against 6.9 ms per full frame).
            im = image_out[j - y0]
            rs = r[x0:x1]
            smax = np.uint16(0)
            for i in range(width):
                smax = max(smax, rs[i])
            row_max_out[j - y0] = smax
            if use_master:
                m = master[j, x0:x1]
                for i in range(width):
                    im[i] = np.float32(rs[i]) - m[i]
            else:
                for i in range(width):
                    im[i] = np.float32(rs[i])
            if (j - y0) % 2 == 0:
                c = 0
                for i in range(0, width, 2):
                    c += rs[i] >= saturation
                nsat += c
    return lo, hi, nsat


def _science_region(header: fits.Header, shape: tuple[int, ...]) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) of the science region when the header gives a sane one inside ``shape``, else None."""
    try:
        x0, y0, nx, ny = (int(header[k]) for k in ("X0", "Y0", "XSIZE", "YSIZE"))
    except (KeyError, TypeError, ValueError, fits.VerifyError):  # the two-step path then says why
        return None
    if len(shape) != 2 or x0 < 0 or y0 < 0 or nx <= 0 or ny <= 0 or y0 + ny > shape[0] or x0 + nx > shape[1]:
        return None
    return y0, y0 + ny, x0, x0 + nx


def read_calibrated(path: Path | str, master: MasterCalibration, expected_shape: tuple[int, int] | None = None,
                    buffers: FrameBuffers | None = None) -> tuple[Frame, np.ndarray, np.ndarray]:
    """:func:`read_frame` then :func:`calibrate`, in one pass over the pixels into reused buffers.

    The same intake checks with the same reasons, and the same arrays,
    bit for bit. Frames the one-pass decoder does not handle (other than
    BZERO-scaled 16-bit integers, a shape other than ``expected_shape`` or
    the master's, an odd science region) take the two-step path.

    Returns
    -------
    frame : the :class:`Frame`; ``frame.data`` is ``buffers.raw`` when the one-pass path was taken
    image : float32 (YSIZE, XSIZE), calibrated ADU (``buffers.image``)
    raw : uint16 (YSIZE, XSIZE) view of the raw science region

    Raises
    ------
    BadFrame
        the first intake check the frame fails, as :func:`read_frame` and :func:`calibrate`.
    """
    path = Path(path)
    buffers = buffers if buffers is not None else FrameBuffers()
    level = master.level
    done: dict = {}

    def decode(hdu):
        h = hdu.header
        data = hdu.data
        region = _science_region(h, np.shape(data)) if data is not None else None
        if (data is None or region is None or data.dtype != np.dtype(">i2") or not data.flags.c_contiguous
                or int(h.get("BITPIX", 0)) != 16 or h.get("BZERO", 0) != 32768 or h.get("BSCALE", 1) != 1
                or (expected_shape is not None and data.shape != tuple(expected_shape))
                or (level is not None and level.shape != data.shape) or np.little_endian is False):
            return _pixels(hdu, path, False)
        y0, y1, x0, x1 = region
        raw, image, row_max = buffers.get(data.shape, (y1 - y0, x1 - x0))
        use = level is not None
        lvl = level if use else np.zeros((1, 1), np.float32)
        lo, hi, nsat = _decode_calibrate(data.view(np.uint16), lvl, use, y0, y1, x0, x1, SATURATION_ADU,
                                         raw, image, row_max)
        nsample = ((y1 - y0 + 1) // 2) * ((x1 - x0 + 1) // 2)
        done.update(stats=(int(lo), int(hi), float(nsat) / nsample), image=image, row_max=row_max)
        return raw

    header, data = _open_image(path, allow_float=False, memmap=True, decode=decode)
    frame = Frame(path=path, data=data, header=_header_values(path, header))
    if "image" not in done:
        validate_frame(frame, expected_shape)
        image, raw = calibrate(frame, master)
        return frame, image, raw
    validate_frame(frame, expected_shape, pixel_stats=done["stats"])
    frame.row_max = done["row_max"]
    return frame, done["image"], frame.data[frame.science_slice]
