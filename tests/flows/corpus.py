"""The corrupt-input corpus (issue 10): one small function per way raw input goes bad.

Each function breaks a copy of the pristine simulated night (120 frames of
LPE, three batches) in one way and returns what the user must then see
(:class:`Expect`).  Copies share the pristine files through hard links, so a
breaker never writes into an existing file: it removes the name and writes a
new file (:func:`_replace`).  The README's "Bad input" table lists the same
cases.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from astropy.io import fits

SITE_CAM = "LPE"


@dataclasses.dataclass
class Expect:
    """What a broken night must give."""

    exit_code: int = 0
    state: str = "succeeded"
    rejected: dict[str, str] = dataclasses.field(default_factory=dict)  # science file -> words of the reason
    not_reduced: set[int] = dataclasses.field(default_factory=set)  # lstseqs absent from the fLC
    ok_files: set[str] = dataclasses.field(default_factory=set)  # files that must be recorded ok
    ok_reasons: dict[str, str] = dataclasses.field(default_factory=dict)  # files recorded ok -> words of the note
    calibration: str | None = "dark"
    warning: str | None = None
    calib_rejected: dict[str, str] = dataclasses.field(default_factory=dict)
    missing_ranges: list[list[int]] = dataclasses.field(default_factory=list)
    error: str | None = None  # words of the night_status error (empty or failed nights)
    args: tuple[str, ...] = ()


def name(seq: int, suffix: str = ".fits") -> str:
    return f"{seq:08d}{SITE_CAM}{suffix}"


def seqs_of(raw: Path) -> list[int]:
    return sorted(int(p.name[:8]) for p in raw.glob(f"*{SITE_CAM}.fits"))


def linked_copy(pristine: Path, dest: Path) -> Path:
    """A copy of a data directory whose files are hard links (instant; never write into them)."""
    shutil.copytree(pristine, dest, copy_function=os.link)
    return dest


def raw_digest(raw: Path) -> dict[str, str]:
    """sha256 of every entry of ``raw/``: files by content, links by target, directories by kind."""
    out = {}
    for p in sorted(raw.rglob("*")):
        key = str(p.relative_to(raw))
        if p.is_symlink():
            out[key] = "link->" + os.readlink(p)
        elif p.is_dir():
            out[key] = "dir"
        else:
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _replace(path: Path, content: bytes) -> None:
    path.unlink()  # break the hard link: the pristine night keeps its file
    path.write_bytes(content)


def _fits_bytes(data: np.ndarray, header: fits.Header) -> bytes:
    hdu = fits.PrimaryHDU(data)
    for k, v in header.items():
        if k not in ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "BZERO", "BSCALE"):
            hdu.header[k] = v
    import io

    buf = io.BytesIO()
    hdu.writeto(buf)
    return buf.getvalue()


def _rewrite(path: Path, change: Callable[[np.ndarray, fits.Header], tuple[np.ndarray, fits.Header]]) -> None:
    data, header = fits.getdata(path, header=True)
    data, header = change(np.asarray(data), header.copy())
    _replace(path, _fits_bytes(data, header))


def _middle(raw: Path) -> int:
    """A frame in the middle of the night's second batch (not a batch's reference frame)."""
    seqs = seqs_of(raw)
    return seqs[len(seqs) // 2 + 3]


# --------------------------------------------------------------------------- the cases: frames


def first_frame_wrong_shape(raw: Path) -> Expect:
    """The frame the night's camera solution is looked for first has another shape."""
    seqs = seqs_of(raw)
    b0 = seqs[0] // 50
    first = min((s for s in seqs if s // 50 == b0), key=lambda s: (abs(s - (b0 * 50 + 24.5)), s))
    _rewrite(raw / name(first), lambda d, h: (d[:-8], h))
    return Expect(rejected={name(first): "shape"}, not_reduced={first})


def dangling_symlink(raw: Path) -> Expect:
    seq = _middle(raw)
    (raw / name(seq)).unlink()
    (raw / name(seq)).symlink_to("/nonexistent/frame.fits")
    return Expect(rejected={name(seq): "dangling symbolic link"}, not_reduced={seq})


def all_nan_float_frame(raw: Path) -> Expect:
    seq = _middle(raw)
    _rewrite(raw / name(seq), lambda d, h: (np.full(d.shape, np.nan, np.float32), h))
    return Expect(rejected={name(seq): "floating-point image"}, not_reduced={seq})


def all_zero_frame(raw: Path) -> Expect:
    seq = _middle(raw)
    _rewrite(raw / name(seq), lambda d, h: (np.zeros_like(d), h))
    return Expect(rejected={name(seq): "constant image"}, not_reduced={seq})


def mostly_saturated_frame(raw: Path) -> Expect:
    seq = _middle(raw)

    def saturate(d, h):
        d = d.copy()
        d[: d.shape[0] * 3 // 4] = 65535
        return d, h

    _rewrite(raw / name(seq), saturate)
    return Expect(rejected={name(seq): "mostly saturated"}, not_reduced={seq})


def truncated_frame(raw: Path) -> Expect:
    seq = _middle(raw)
    p = raw / name(seq)
    _replace(p, p.read_bytes()[: p.stat().st_size // 2])
    return Expect(rejected={name(seq): "truncated"}, not_reduced={seq})


def missing_keyword(raw: Path) -> Expect:
    seq = _middle(raw)

    def drop(d, h):
        del h["JD"]
        return d, h

    _rewrite(raw / name(seq), drop)
    return Expect(rejected={name(seq): "missing header keyword(s) JD"}, not_reduced={seq})


def lstseq_disagrees_with_name(raw: Path) -> Expect:
    seq = _middle(raw)

    def relabel(d, h):
        h["LSTSEQ"] = seq + 1
        h["LSTIDX"] = (seq + 1) % 13500
        return d, h

    _rewrite(raw / name(seq), relabel)
    return Expect(rejected={name(seq): "disagrees with the file name"}, not_reduced={seq})


def junk_bytes(raw: Path) -> Expect:
    seq = _middle(raw)
    _replace(raw / name(seq), np.random.default_rng(1).bytes(100_000))
    return Expect(rejected={name(seq): "unreadable FITS file"}, not_reduced={seq})


def cut_gz_frame(raw: Path) -> Expect:
    """A frame that arrived as ``.fits.gz`` and whose transfer stopped: the gzip stream ends early."""
    seq = _middle(raw)
    whole = gzip.compress((raw / name(seq)).read_bytes())
    (raw / name(seq)).unlink()
    (raw / name(seq, ".fits.gz")).write_bytes(whole[: int(len(whole) * 0.6)])
    return Expect(rejected={name(seq, ".fits.gz"): "truncated compressed file (the gzip stream stops early"},
                  not_reduced={seq})


def corrupt_gz_frame(raw: Path) -> Expect:
    """A ``.fits.gz`` whose compressed data are damaged (a valid gzip header over garbage)."""
    seq = _middle(raw)
    whole = gzip.compress((raw / name(seq)).read_bytes())
    (raw / name(seq)).unlink()
    (raw / name(seq, ".fits.gz")).write_bytes(whole[:10] + bytes(len(whole) - 10))
    return Expect(rejected={name(seq, ".fits.gz"): "corrupt compressed data"}, not_reduced={seq})


def zero_byte_file(raw: Path) -> Expect:
    seq = _middle(raw)
    _replace(raw / name(seq), b"")
    return Expect(rejected={name(seq): "empty file"}, not_reduced={seq})


def directory_named_like_a_frame(raw: Path) -> Expect:
    seq = _middle(raw)
    (raw / name(seq)).unlink()
    (raw / name(seq)).mkdir()
    (raw / name(seq) / "x.fits").write_bytes(b"")
    return Expect(rejected={name(seq): "a directory"}, not_reduced={seq})


def gz_beside_fits_with_other_pixels(raw: Path) -> Expect:
    """``.fits.gz`` beside the ``.fits`` of one lstseq, different pixels: the ``.fits`` is used."""
    seq = _middle(raw)
    data, header = fits.getdata(raw / name(seq), header=True)
    (raw / name(seq, ".fits.gz")).write_bytes(gzip.compress(_fits_bytes(np.asarray(data)[::-1].copy(), header)))
    return Expect(rejected={name(seq, ".fits.gz"): f"duplicate of lstseq {seq}: {name(seq)} is used"},
                  ok_files={name(seq)})


def truncated_fits_beside_good_gz(raw: Path) -> Expect:
    """The other way round: the ``.fits`` is truncated, a good ``.fits.gz`` of it is used instead."""
    seq = _middle(raw)
    p = raw / name(seq)
    whole = p.read_bytes()
    (raw / name(seq, ".fits.gz")).write_bytes(gzip.compress(whole))
    _replace(p, whole[: len(whole) // 2])
    return Expect(rejected={name(seq): "truncated"}, ok_files={name(seq, ".fits.gz")})


def missing_frames(raw: Path) -> Expect:
    """Three frames never written: a gap in lstseq."""
    seq = _middle(raw)
    for s in (seq, seq + 1, seq + 2):
        (raw / name(s)).unlink()
    return Expect(not_reduced={seq, seq + 1, seq + 2}, missing_ranges=[[seq, seq + 2]])


# --------------------------------------------------------------------------- the cases: calibration, empty


def no_calibration_files(raw: Path) -> Expect:
    for p in raw.glob("calib_*"):
        p.unlink()
    return Expect(calibration="none", warning="reduced without calibration")


def no_darks(raw: Path) -> Expect:
    for p in raw.glob("calib_dark*"):
        p.unlink()
    return Expect(calibration="bias", warning="reduced without dark")


def truncated_dark(raw: Path) -> Expect:
    p = raw / "calib_dark00.fits"
    _replace(p, p.read_bytes()[: p.stat().st_size // 2])
    return Expect(calib_rejected={"calib_dark00.fits": "truncated"}, warning="calibration file(s) rejected")


def flat_fields_beside_the_darks(raw: Path) -> Expect:
    """Flats are part of a station's calibration set but the reduction applies none (SPEC section 3): they
    were collected and then neither used nor recorded; now each is recorded as not used, and why."""
    bias = sorted(raw.glob("calib_bias*"))[0]
    for i in range(2):
        (raw / f"calib_flat{i:02d}.fits").write_bytes(bias.read_bytes())
    note = "not used: no flat field is applied"
    return Expect(ok_reasons={f"calib_flat{i:02d}.fits": note for i in range(2)})


def calibration_required_but_missing(raw: Path) -> Expect:
    for p in raw.glob("calib_*"):
        p.unlink()
    return Expect(exit_code=1, state="failed", calibration="none", warning="reduced without calibration",
                  error="a master dark is required", args=("--require-calibration",))


def empty_raw(raw: Path) -> Expect:
    for p in raw.iterdir():
        p.unlink()
    return Expect(exit_code=1, state="empty", calibration=None, error="no science frames")


FRAME_CASES = [first_frame_wrong_shape, dangling_symlink, all_nan_float_frame, all_zero_frame,
               mostly_saturated_frame, truncated_frame, missing_keyword, lstseq_disagrees_with_name, junk_bytes,
               zero_byte_file, directory_named_like_a_frame, cut_gz_frame, corrupt_gz_frame]
NIGHT_CASES = [gz_beside_fits_with_other_pixels, truncated_fits_beside_good_gz, missing_frames,
               no_calibration_files, no_darks, truncated_dark, flat_fields_beside_the_darks,
               calibration_required_but_missing, empty_raw]
