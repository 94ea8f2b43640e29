from __future__ import annotations

import numpy as np
import pytest

from mascara.rawio import (
    BadFrame,
    calibrate,
    find_night_dirs,
    group_batches,
    list_frames,
    master_calibration,
    parse_night_dir,
    read_frame,
)


def test_night_discovery_and_batches(small_night):
    nights = find_night_dirs(small_night["datadir"])
    assert [n.night_id for n in nights] == ["20260301LPE"]
    assert find_night_dirs(small_night["datadir"], cameras=["S"]) == []
    frames = list_frames(nights[0])
    seqs = [f.lstseq for f in frames]
    assert seqs == sorted(seqs) and len(seqs) == 12
    batches = group_batches(frames)
    assert sum(len(v) for v in batches.values()) == 12
    for b, fs in batches.items():
        assert all(f.lstseq // 50 == b for f in fs)


def test_bad_frames_are_rejected_with_a_reason(small_night):
    night = parse_night_dir(small_night["night_dir"])
    frames = {f.lstseq: f for f in list_frames(night)}
    good_shape = None
    reasons = {}
    for seq, f in frames.items():
        try:
            fr = read_frame(f.path, good_shape)
            good_shape = good_shape or fr.data.shape
        except BadFrame as exc:
            assert f.path.name in str(exc)
            reasons[seq] = exc.reason
    kinds = small_night["bad_frames"]
    assert set(reasons) == set(kinds)
    for seq, kind in kinds.items():
        expected = {"truncated": "truncated", "missing-lstseq": "LSTSEQ", "wrong-shape": "shape"}[kind]
        assert expected in reasons[seq], (kind, reasons[seq])


def test_calibration_removes_bias_and_dark(small_night):
    night = parse_night_dir(small_night["night_dir"])
    master = master_calibration(night)
    assert master.kind == "dark" and len(master.files) == 5
    frame = read_frame(next(f.path for f in list_frames(night) if f.lstseq not in small_night["bad_frames"]))
    image, raw = calibrate(frame, master)
    assert image.shape == (frame.header["YSIZE"], frame.header["XSIZE"]) == raw.shape
    # what is left is the sky (700 ADU at the top, rising to the horizon side) and the stars
    med = np.median(image)
    assert 650 < med < 1200
    assert np.median(raw) - med == pytest.approx(320 + 6, abs=15)  # bias + dark current removed


def test_raw_files_are_not_touched_by_reading(small_night):
    night = parse_night_dir(small_night["night_dir"])
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in night.raw.iterdir()}
    for f in list_frames(night):
        try:
            read_frame(f.path)
        except BadFrame:
            pass
    master_calibration(night)
    after = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in night.raw.iterdir()}
    assert before == after


def test_read_calibrated_equals_read_frame_then_calibrate(small_night, tmp_path):
    """The one-pass reader gives the same pixels bit for bit, the same header and the same refusals."""
    from astropy.io import fits

    from mascara.rawio import FrameBuffers, MasterCalibration, read_calibrated

    night = parse_night_dir(small_night["night_dir"])
    master = master_calibration(night)
    frames = list_frames(night)
    shape = next(read_frame(f.path).data.shape for f in frames if f.lstseq not in small_night["bad_frames"])
    # a frame written without BZERO scaling takes the two-step path and must agree too
    good = next(f.path for f in frames if f.lstseq not in small_night["bad_frames"])
    with fits.open(good) as h:
        plain = tmp_path / good.name
        fits.PrimaryHDU(h[0].data.astype(np.int32), h[0].header).writeto(plain)
    paths = [f.path for f in frames] + [plain]
    for m in (master, MasterCalibration(level=None, kind="none", files=[], rejected=[])):
        buffers = FrameBuffers()
        for p in paths:
            try:
                fr = read_frame(p, shape)
                image, raw = calibrate(fr, m)
            except BadFrame as exc:
                with pytest.raises(BadFrame) as got:
                    read_calibrated(p, m, shape, buffers)
                assert got.value.reason == exc.reason
                continue
            fr2, image2, raw2 = read_calibrated(p, m, shape, buffers)
            assert fr2.header == fr.header
            for a, b in ((fr.data, fr2.data), (image, image2), (raw, raw2)):
                assert a.dtype == b.dtype and a.shape == b.shape
                assert a.tobytes() == b.tobytes()
            if p != plain:  # the one-pass reader also gives each science row's largest raw value
                np.testing.assert_array_equal(fr2.row_max, raw.max(axis=1))
            else:
                assert fr2.row_max is None
        assert buffers.image is not None  # the one-pass path was taken


def test_read_calibrated_reuses_its_buffers(small_night):
    from mascara.rawio import FrameBuffers, read_calibrated

    night = parse_night_dir(small_night["night_dir"])
    master = master_calibration(night)
    good = [f.path for f in list_frames(night) if f.lstseq not in small_night["bad_frames"]][:2]
    buffers = FrameBuffers()
    _, im1, _ = read_calibrated(good[0], master, None, buffers)
    _, im2, _ = read_calibrated(good[1], master, None, buffers)
    assert im1 is im2 is buffers.image


def test_reading_in_two_threads_never_refuses_a_good_frame(small_night):
    """A truncated frame read in one thread while good frames are read in another: the good ones
    are never refused (the warnings capture is process-wide; a good frame was once refused as
    truncated because the other thread's warning was recorded in its list)."""
    from concurrent.futures import ThreadPoolExecutor

    night = parse_night_dir(small_night["night_dir"])
    frames = {f.lstseq: f for f in list_frames(night)}
    kinds = small_night["bad_frames"]
    [truncated] = [frames[s].path for s, k in kinds.items() if k == "truncated"]
    good = [f.path for s, f in frames.items() if s not in kinds]

    def read(i):  # even: the truncated frame, odd: a good one; the two threads interleave them
        path = truncated if i % 2 == 0 else good[i % len(good)]
        try:
            read_frame(path)
        except BadFrame as exc:
            return path, exc.reason
        return path, None

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(read, range(400)))
    assert all(reason is not None for path, reason in results if path == truncated)
    assert [(p.name, reason) for p, reason in results if p != truncated and reason is not None] == []


def _good_frame(small_night):
    night = parse_night_dir(small_night["night_dir"])
    return next(f.path for f in list_frames(night) if f.lstseq not in small_night["bad_frames"])


def test_truncation_found_from_the_sizes_alone(small_night, tmp_path):
    """A plain FITS file shorter than its header promises (header blocks + data padded to whole blocks) is
    refused from the sizes alone, astropy's criterion: cut in the data, in the padding, in the header."""
    import gzip

    from mascara.rawio import FITS_BLOCK, primary_header_layout

    good = _good_frame(small_night)
    blob = good.read_bytes()
    head, data = primary_header_layout(good)
    need = head + -(-data // FITS_BLOCK) * FITS_BLOCK
    assert len(blob) == need and data % FITS_BLOCK != 0  # the padding case below is a real one
    for cut in (need // 2, head + data, need - 1):
        p = tmp_path / f"cut{cut}.fits"
        p.write_bytes(blob[:cut])
        with pytest.raises(BadFrame) as got:
            read_frame(p)
        assert got.value.reason == f"truncated file ({cut} of {need} bytes)"
    p = tmp_path / "header_only.fits"
    p.write_bytes(blob[:FITS_BLOCK])  # no END yet: astropy decides (locked path), still refused
    with pytest.raises(BadFrame):
        read_frame(p)
    gz = tmp_path / "cut.fits.gz"  # compressed: the sizes say nothing, astropy decides (locked path)
    gz.write_bytes(gzip.compress(blob[:need // 2]))
    with pytest.raises(BadFrame):
        read_frame(gz)
    whole = gzip.compress(blob)
    for frac in (0.05, 0.5, 0.999):  # a transfer that stopped: the gzip stream itself is cut
        gz.write_bytes(whole[:int(len(whole) * frac)])
        with pytest.raises(BadFrame) as got:
            read_frame(gz)
        assert got.value.reason.startswith("truncated compressed file (the gzip stream stops early: "
                                           f"{int(len(whole) * frac)} bytes on disk"), got.value.reason
    gz.write_bytes(whole[:10] + bytes(len(whole) - 10))  # a good gzip header over zeroed data
    with pytest.raises(BadFrame) as got:
        read_frame(gz)
    assert got.value.reason.startswith("corrupt compressed data"), got.value.reason
    longer = tmp_path / "longer.fits"  # bytes after the data are no truncation
    longer.write_bytes(blob + b"\0" * 100)
    assert read_frame(longer).data.tobytes() == read_frame(good).data.tobytes()


def test_a_complete_frame_is_read_without_the_warnings_lock(small_night):
    """Good plain frames do not wait for the process-wide warnings capture (held here by another reader)."""
    import threading

    from mascara.rawio import _WARNINGS_LOCK

    good = _good_frame(small_night)
    done = threading.Event()

    def read():
        read_frame(good)
        done.set()

    with _WARNINGS_LOCK:
        t = threading.Thread(target=read)
        t.start()
        assert done.wait(30.0)
    t.join()


def test_damaged_bytes_anywhere_in_a_header_give_a_refusal_never_a_crash(small_night, tmp_path):
    """Property (hypothesis): a frame whose header bytes are damaged (any bytes, anywhere in the header
    blocks), plain or gzip-compressed, is either read or refused with BadFrame, by both readers and with
    the same reason; no other exception escapes (one such escape, a garbled card's VerifyError or a
    corrupted primary HDU, failed the whole camera-night before)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from mascara.rawio import FITS_BLOCK, FrameBuffers, primary_header_layout, read_calibrated

    night = parse_night_dir(small_night["night_dir"])
    master = master_calibration(night)
    good = _good_frame(small_night)
    blob = good.read_bytes()
    head, _ = primary_header_layout(good)
    shape = read_frame(good).data.shape
    buffers = FrameBuffers()
    seen: dict[str, int] = {}

    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(edits=st.lists(st.tuples(st.integers(0, head - 1), st.integers(0, 255)), min_size=1, max_size=8),
           compressed=st.booleans())
    def check(edits, compressed):
        import gzip

        b = bytearray(blob)
        for pos, val in edits:
            b[pos] = val
        p = tmp_path / (good.name + (".gz" if compressed else ""))
        p.write_bytes(gzip.compress(bytes(b), compresslevel=1) if compressed else bytes(b))
        try:
            read_frame(p, shape)
            first = None
        except BadFrame as exc:
            first = exc.reason
        try:
            read_calibrated(p, master, shape, buffers)
            second = None
        except BadFrame as exc:
            second = exc.reason
        assert first == second
        key = "read" if first is None else first.split(" (")[0].split(" ")[0:3]
        seen[str(key)] = seen.get(str(key), 0) + 1
        p.unlink()

    assert head % FITS_BLOCK == 0
    check()
    assert len(seen) >= 3, seen  # the damage reached several different checks

    # the same for a calibration frame (read_calibration: a failure there failed the night's master)
    from mascara.rawio import calibration_files, read_calibration

    dark = calibration_files(night)["dark"][0]
    dblob = dark.read_bytes()
    dhead, _ = primary_header_layout(dark)
    read_calibration(dark, "dark", shape)

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(edits=st.lists(st.tuples(st.integers(0, dhead - 1), st.integers(0, 255)), min_size=1, max_size=8))
    def check_dark(edits):
        b = bytearray(dblob)
        for pos, val in edits:
            b[pos] = val
        p = tmp_path / dark.name
        p.write_bytes(bytes(b))
        try:
            read_calibration(p, "dark", shape)
        except BadFrame:
            pass
        p.unlink()

    check_dark()
    at = dblob.index(b"IMAGETYP") + 12  # inside the card's quoted value
    p = tmp_path / dark.name
    p.write_bytes(dblob[:at] + b"\0" + dblob[at + 1:])
    with pytest.raises(BadFrame) as got:
        read_calibration(p, "dark", shape)
    assert got.value.reason.startswith("unparsable header card(s) IMAGETYP"), got.value.reason


def test_a_frame_of_another_night_is_rejected_by_its_lstseq(tmp_path):
    """A stranger's trial: a valid frame of the next night copied into this night's raw/ was reduced with
    it (280 of 420 stars got a point from the next night), and a file named 99999999LPE.fits, refused by
    its header, still stretched the night to 35 million missing slots. The intake now names both."""
    from mascara.rawio import parse_night_dir, scan_raw
    from mascara.timeindex import night_lstseqs, night_slot_window

    night = tmp_path / "20260301LPE"
    (night / "raw").mkdir(parents=True)
    first, last = night_slot_window("20260301", "LP")
    slots = night_lstseqs("20260301", "LP", sun_alt=0.0)  # from sunset to sunrise
    assert first < slots[0] and slots[-1] < last
    before, after = night_lstseqs("20260228", "LP", sun_alt=0.0)[-1], night_lstseqs("20260302", "LP", sun_alt=0.0)[0]
    assert before < first and last < after
    for seq in (before, slots[0], slots[-1], after, 99999999):
        (night / "raw" / f"{seq:08d}LPE.fits").write_bytes(b"not read by the scan")
    scan = scan_raw(parse_night_dir(night))
    assert [f.lstseq for f in scan.frames] == [slots[0], slots[-1]]
    assert sorted(r.lstseq for r in scan.rejected) == [before, after, 99999999]
    assert all(f"is not a slot of the night 20260301 at LP (its slots run from {first} to {last}" in r.reason
               for r in scan.rejected)


def test_a_night_dated_by_another_convention_is_not_refused_whole(tmp_path):
    """If a station dates its directories by the UTC date at the start of acquisition (at La Silla in
    summer, dusk falls after 00:00 UTC), most frames lie outside the directory date's noon-to-noon
    window: the window is then the night of the median frame, so the night is reduced and a frame of
    another night is still refused."""
    from mascara.rawio import parse_night_dir, scan_raw
    from mascara.timeindex import night_lstseqs, night_slot_window

    slots = night_lstseqs("20260115", "LS", sun_alt=0.0)  # the local evening of 15 January
    night = tmp_path / "20260116LSE"  # dated a day later
    (night / "raw").mkdir(parents=True)
    other = night_lstseqs("20260117", "LS", sun_alt=0.0)[10]
    for seq in (*slots[::500], other):
        (night / "raw" / f"{seq:08d}LSE.fits").write_bytes(b"not read by the scan")
    assert not any(night_slot_window("20260116", "LS")[0] <= q <= night_slot_window("20260116", "LS")[1]
                   for q in slots)
    scan = scan_raw(parse_night_dir(night))
    assert [f.lstseq for f in scan.frames] == list(slots[::500])
    assert [r.lstseq for r in scan.rejected] == [other]



@pytest.mark.parametrize("days", [6, -3])
def test_a_misnamed_night_directory_is_refused_not_reduced_as_another_night(tmp_path, days):
    """An outside trial copied a night's raw/ into a directory dated six days later: the fallback for a
    directory dated a day off took the frames' own night, and the night was reduced, recorded and counted
    in the season under the wrong date. Beyond a day every frame is refused, each saying which night it is of."""
    import datetime as dt

    from mascara.rawio import parse_night_dir, scan_raw
    from mascara.timeindex import night_lstseqs, night_of_slot

    slots = night_lstseqs("20260305", "LP", sun_alt=0.0)
    assert {night_of_slot(int(q), "LP") for q in slots[::200]} == {"20260305"}
    name = (dt.date(2026, 3, 5) + dt.timedelta(days=days)).strftime("%Y%m%d")
    night = tmp_path / f"{name}LPE"
    (night / "raw").mkdir(parents=True)
    for seq in slots[::500]:
        (night / "raw" / f"{seq:08d}LPE.fits").write_bytes(b"not read by the scan")
    scan = scan_raw(parse_night_dir(night))
    assert scan.frames == []
    assert len(scan.rejected) == len(slots[::500])
    side = "before" if days > 0 else "after"  # the frames' night, seen from the name
    assert all(r.reason.endswith(f"most frames in {name}LPE/raw are of the night 20260305, {abs(days)} days {side} "
                                 "the directory's name: a misnamed directory?") for r in scan.rejected), scan.rejected[0]
    from mascara.reduce import plan_camera_night

    # the night is empty, and says why (mascprocess prints it; a flow records it)
    assert plan_camera_night(parse_night_dir(night)).empty_reason().endswith(
        f": most frames in {name}LPE/raw are of the night 20260305, {abs(days)} days {side} the directory's name: "
        "a misnamed directory?")

def test_a_header_whose_time_disagrees_with_its_slot_is_refused(small_night, tmp_path):
    """An outside trial moved one frame's JD by a minute: it was reduced as good, every star 11 px from its
    place and flux0 near 0 with flag 0. Positions come from JD, batches from LSTSEQ: the two must agree, and
    LST with JD; EXPTIME must fill the slot (fluxes are per frame; 1e-6 s was accepted) and CCDTEMP be a
    temperature. The SPEC's real frame passes."""
    import re
    import shutil

    from astropy.io import fits

    from mascara.rawio import _check_times
    from mascara.timeindex import EXPTIME

    _check_times(tmp_path / "48510542LSE.fits", 48510542, 2459876.832331556, 5.440494253816728, EXPTIME, "LS")
    good = _good_frame(small_night)
    h = fits.getheader(good)
    jd, lst, seq = float(h["JD"]), float(h["LST"]), int(h["LSTSEQ"])
    assert read_frame(good).lstseq == seq
    cases = [({"JD": jd + 60 / 86400}, rf"JD \S+ disagrees with LSTSEQ {seq}: the exposure starts \+6\d\.\d s"),
             ({"JD": jd - 1 / 24}, rf"JD \S+ disagrees with LSTSEQ {seq}: the exposure starts -3[56]\d\d\.\d s"),
             ({"LST": (lst + 3) % 24}, r"LST \S+ h disagrees with JD \S+: \+10800\.\d s from the local sidereal"),
             ({"EXPTIME": 99.0}, r"EXPTIME 99\.0 out of range"),
             ({"EXPTIME": 13.0}, r"EXPTIME 13\.0 out of range"),
             ({"EXPTIME": 1e-6}, r"EXPTIME 1e-06 out of range \(5\.7443 to 6\.5 s"),
             ({"EXPTIME": 3.2}, r"EXPTIME 3\.2 out of range"),
             ({"CCDTEMP": 1e30}, r"CCDTEMP 1e\+30 out of range")]
    for i, (change, reason) in enumerate(cases):
        p = tmp_path / f"case{i}" / good.name
        p.parent.mkdir()
        shutil.copy(good, p)
        with fits.open(p, mode="update") as hdul:
            hdul[0].header.update(change)
        with pytest.raises(BadFrame) as got:
            read_frame(p)
        assert re.match(reason, got.value.reason) and good.name in str(got.value), (str(got.value), reason)
    # a few seconds of clock error (under a pixel of motion) is not refused
    p = tmp_path / "late" / good.name
    p.parent.mkdir()
    shutil.copy(good, p)
    with fits.open(p, mode="update") as hdul:
        hdul[0].header.update({"JD": jd + 2 / 86400, "LST": (lst + 2 * 1.0027379 / 3600) % 24})
    assert read_frame(p).lstseq == int(h["LSTSEQ"])


def test_a_file_named_nearly_like_a_frame_of_this_camera_is_refused_by_name_not_ignored(tmp_path):
    """An outside trial renamed frames 65087720LPE.FITS, .fit, .fits.bz2, 65087724lpe.fits and
    5087725LPE.fits: nothing was recorded or said, and the slots counted as missing (the camera took no
    frame). Such names are refused by name, with their lstseq; other files and the temporary names of a
    file being written (``.fits.part``) are left alone."""
    import re

    from mascara.rawio import parse_night_dir, scan_raw
    from mascara.timeindex import night_lstseqs

    night = tmp_path / "20260301LPE"
    (night / "raw").mkdir(parents=True)
    seq = int(night_lstseqs("20260301", "LP")[10])
    near = [f"{seq}LPE.FITS", f"{seq + 1}LPE.fit", f"{seq + 2}LPE.fits.bz2", f"{seq + 3}lpe.fits",
            f"{seq + 4}LPE.FITS.GZ", f"{seq % 10**7}LPE.fits"]
    left = ["notes.txt", f"{seq + 5}LPE.fits.part", f"{seq + 6}LPW.FITS", "calib_dark00.fits"]
    for n in near + left + [f"{seq + 7}LPE.fits"]:
        (night / "raw" / n).write_bytes(b"x" * 10)
    scan = scan_raw(parse_night_dir(night))
    assert [f.lstseq for f in scan.frames] == [seq + 7]
    assert sorted((r.filename, r.lstseq) for r in scan.rejected) == sorted(
        (n, int(re.match(r"\d+", n).group())) for n in near)
    assert {r.reason for r in scan.rejected} == {"file name is not <lstseq:08d>LPE.fits[.gz]"}
    assert sorted(scan.other) == sorted(["notes.txt", f"{seq + 5}LPE.fits.part", f"{seq + 6}LPW.FITS"])


def test_darks_of_another_camera_or_exposure_are_refused_and_the_bias_is_used(small_night, tmp_path):
    """An outside trial set CAMERA='S' and EXPTIME=60 on every dark of an E night: they were combined into the
    master dark without a word. A calibration file whose header names another site or camera, or a dark of
    another exposure time, is refused with the reason; the master then falls back to the biases."""
    import shutil

    from astropy.io import fits

    from mascara.rawio import calibration_files

    night_dir = tmp_path / small_night["night_dir"].name
    shutil.copytree(small_night["night_dir"] / "raw", night_dir / "raw")
    darks = calibration_files(parse_night_dir(night_dir))["dark"]
    for i, p in enumerate(darks):
        with fits.open(p, mode="update") as hdul:
            hdul[0].header.update({"CAMERA": "S"} if i % 2 else {"EXPTIME": 60.0})
    master = master_calibration(parse_night_dir(night_dir))
    assert master.kind == "bias", master.note
    reasons = dict((p.name, why) for p, why in master.rejected)
    assert {reasons[p.name] for i, p in enumerate(darks) if i % 2} == {"header CAMERA 'S' is not the night's 'E'"}
    assert {reasons[p.name] for i, p in enumerate(darks) if not i % 2} == {
        "dark of EXPTIME 60.0 s, not the science exposure (6.38 s)"}
    assert master_calibration(parse_night_dir(small_night["night_dir"])).kind == "dark"  # the untouched ones pass


def test_messages_say_where_the_image_is_and_what_is_wrong_with_a_gzip_stream(tmp_path):
    """An outside trial: a tile-compressed image, or one in extension 1, was refused as "no image data"; a
    gzip CRC error as "not a gzip file"; a cut gzip said "0 bytes decompressed" when 65 kB had been."""
    import gzip

    from astropy.io import fits

    from mascara.rawio import _gzip_problem

    data = np.random.default_rng(1).integers(0, 30000, (200, 300)).astype(np.int16)
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data.astype(np.int32))]).writeto(tmp_path / "rice.fits")
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data)]).writeto(tmp_path / "ext.fits")
    for name, holds in (("rice.fits", "a tile-compressed image (CompImageHDU)"), ("ext.fits", "an image (ImageHDU)")):
        with pytest.raises(BadFrame) as got:
            read_frame(tmp_path / name)
        assert got.value.reason == (f"no image in the primary HDU: extension 1 holds {holds}; raw frames are "
                                    "uncompressed images in the primary HDU"), got.value.reason
    blob = gzip.compress((tmp_path / "ext.fits").read_bytes())
    (tmp_path / "cut.fits.gz").write_bytes(blob[:len(blob) // 2])
    decompressed = int(_gzip_problem(tmp_path / "cut.fits.gz").split(", ")[1].split(" bytes")[0])
    assert decompressed > 0
    bad = bytearray(blob)
    bad[-6] ^= 0xFF  # the CRC of a whole stream
    (tmp_path / "crc.fits.gz").write_bytes(bytes(bad))
    assert _gzip_problem(tmp_path / "crc.fits.gz").startswith("corrupt compressed data (gzip: CRC check failed")


def test_when_both_files_of_a_slot_are_refused_the_second_does_not_say_the_first_is_used(tmp_path):
    """An outside trial: a truncated .fits and a cut .fits.gz of one lstseq; the .gz's reason said the .fits
    "is used", but the .fits was refused as well."""
    from mascara.rawio import parse_night_dir, scan_raw
    from mascara.timeindex import night_lstseqs

    night = tmp_path / "20260301LPE"
    (night / "raw").mkdir(parents=True)
    seq = int(night_lstseqs("20260301", "LP")[10])
    (night / "raw" / f"{seq}LPE.fits").write_bytes(b"SIMPLE  = junk")
    (night / "raw" / f"{seq}LPE.fits.gz").write_bytes(b"\x1f\x8b junk")
    scan = scan_raw(parse_night_dir(night))
    [gz] = scan.rejected
    assert gz.filename == f"{seq}LPE.fits.gz" and gz.reason.endswith(
        f"(duplicate of lstseq {seq}; {seq}LPE.fits, tried first, is refused too)"), gz.reason
    assert [f.path.name for f in scan.frames] == [f"{seq}LPE.fits"]  # tried, and refused, by its batch
