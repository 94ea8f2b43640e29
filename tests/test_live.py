"""Live mode's building blocks: when a raw file has fully arrived, when a batch is ready, when the night ends."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
from astropy.io import fits

from mascara.live import RawWatch, dawn_jd, fits_declared_size, ready_batches
from mascara.timeindex import EXPTIME, jd_start_of, night_lstseqs


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _frame_bytes(shape=(40, 60)) -> bytes:
    hdu = fits.PrimaryHDU(np.arange(shape[0] * shape[1], dtype=np.uint16).reshape(shape))
    hdu.header["LSTSEQ"] = 1
    path_free = fits.HDUList([hdu])
    import io

    buf = io.BytesIO()
    path_free.writeto(buf)
    return buf.getvalue()


def _watched(tmp_path):  # type: ignore[no-untyped-def]
    """A clock, an empty raw/ and a watch of it (settle 1 s), and a whole frame's bytes."""
    clock = Clock()
    raw = tmp_path / "raw"
    raw.mkdir()
    return clock, raw, RawWatch(raw, settle=1.0, clock=clock), _frame_bytes()


def test_fits_declared_size_tells_a_whole_file_from_a_half_written_one(tmp_path):
    blob = _frame_bytes()
    whole = tmp_path / "whole.fits"
    whole.write_bytes(blob)
    need = fits_declared_size(whole)
    assert need is not None and need <= len(blob) < need + 2880  # the data block is padded
    half = tmp_path / "half.fits"
    half.write_bytes(blob[: len(blob) // 2])
    assert fits_declared_size(half) is None or fits_declared_size(half) > half.stat().st_size
    (tmp_path / "head.fits").write_bytes(blob[:100])  # not even a header block yet
    assert fits_declared_size(tmp_path / "head.fits") is None
    (tmp_path / "text.fits").write_bytes(b"x" * 5760)
    assert fits_declared_size(tmp_path / "text.fits") is None


def test_watch_sees_renamed_in_place_and_compressed_frames_only_when_complete(tmp_path):
    clock, raw, watch, blob = _watched(tmp_path)
    # 1. a temporary name is invisible; the rename makes the frame appear (after settling)
    (raw / "00000100LPE.fits.part").write_bytes(blob)
    assert watch.poll() == set()
    (raw / "00000100LPE.fits.part").rename(raw / "00000100LPE.fits")
    assert watch.poll() == set()  # first seen now
    clock.t += 1.5
    assert watch.poll() == {"00000100LPE.fits"}
    assert watch.idle_for() == 0.0
    # 2. in place: half a file stays incomplete however long it sits
    with open(raw / "00000101LPE.fits", "wb") as fh:
        fh.write(blob[: len(blob) // 2])
    watch.poll()
    clock.t += 10
    assert "00000101LPE.fits" not in watch.poll()
    assert watch.idle_for() == 10.0
    with open(raw / "00000101LPE.fits", "ab") as fh:
        fh.write(blob[len(blob) // 2:])
    assert "00000101LPE.fits" not in watch.poll()  # changed: settle again
    clock.t += 1.5
    assert "00000101LPE.fits" in watch.poll()
    # 3. compressed: complete once its size stops changing; calibration files too; other names never
    with gzip.open(raw / "00000102LPE.fits.gz", "wb") as fh:
        fh.write(blob)
    shutil.copy(raw / "00000100LPE.fits", raw / "calib_dark00.fits")
    (raw / "notes.txt").write_text("dome closed at 03:10")
    watch.poll()
    clock.t += 1.5
    assert watch.poll() == {"00000100LPE.fits", "00000101LPE.fits", "00000102LPE.fits.gz", "calib_dark00.fits"}


def test_a_batch_is_ready_when_its_last_slot_or_a_later_frame_arrived():
    assert ready_batches([], 50) == set()
    assert ready_batches([100, 101, 148], 50) == set()  # batch 2 still open
    assert ready_batches([100, 101, 149], 50) == {2}  # its last slot
    assert ready_batches([100, 101, 152], 50) == {2}  # slot 149 missing, a later frame arrived
    assert ready_batches([100, 101, 152], 50, idle=True) == {2, 3}  # nothing new for the grace period
    assert ready_batches([100, 160], 50, night_over=True) == {2, 3}


def test_dawn_is_the_end_of_the_nights_last_slot():
    seqs = night_lstseqs("20260301", "LP")
    jd = dawn_jd("20260301", "LP")
    assert abs(jd - (jd_start_of(int(seqs[-1])) + EXPTIME / 86400.0)) < 1e-9
    assert 0.25 < ((jd + 0.5) % 1.0) < 0.35  # UTC day fraction: La Palma dawn about 06:00-08:30 UTC in March


def test_a_live_night_whose_directory_never_appears_ends_without_an_error(tmp_path):
    """The end-of-night intake of incomplete files must not fail when raw/ was never made (dome closed)."""
    from mascara.reduce import LiveNight

    night = LiveNight(tmp_path / "20260301LPE", idle_timeout=0.0, settle=0.0)
    assert night.step() == [] and night.ending and night.over
    assert night.plan.frames == [] and night.never_complete == []


def test_a_complete_file_written_again_settles_and_completes_again_with_its_new_stamp(tmp_path):
    import os

    clock, raw, watch, blob = _watched(tmp_path)
    frame = raw / "00000100LPE.fits"
    frame.write_bytes(blob)
    watch.poll()
    clock.t += 1.5
    assert watch.poll() == {"00000100LPE.fits"}
    first = watch.stamps["00000100LPE.fits"]
    frame.write_bytes(blob[:2880] + bytes(len(blob) - 2880))  # written again in place: same header and size
    os.utime(frame, ns=(first[1] + 10**9, first[1] + 10**9))
    assert watch.poll() == set() and "00000100LPE.fits" not in watch.stamps  # no longer complete
    clock.t += 1.5
    assert watch.poll() == {"00000100LPE.fits"}
    assert watch.stamps["00000100LPE.fits"] == (len(blob), first[1] + 10**9) != first
