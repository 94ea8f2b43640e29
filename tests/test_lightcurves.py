"""Tests of mascara.lightcurves: batch files, the split by star, fLC/sLC night files."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from mascara import lightcurves as lc
from mascara.lcformat import FAST_DTYPE, GLOBAL_ATTRS, HEADER_DTYPE, HEADER_TABLE_FIELDS, SLOW_DTYPE, with_ascc

NIGHT = "20150202LPE"
# The exact field lists of SPEC §8 and the tutorial, written out independently of lcformat.
SPEC_FAST_FIELDS = (
    "flag flux0 eflux0 flux1 eflux1 sky esky peak x y alt az ccdtemp exptime jdmid lst lstidx lstseq".split()
)
SPEC_HEADER_FIELDS = "jdstart ra dec vmag bmag spectype blend blendvalue nobs".split()
SPEC_GLOBAL = (
    "STATION CAMERA ALT0 AZ0 TH0 X0 Y0 AVERSION RVERSION CVERSION EXPTIME CCDTEMP NAPER APER0 APER1 NSTAPER "
    "SKYRAD0 SKYRAD1"
).split()


def global_attrs() -> dict:
    return {
        "STATION": "LP", "CAMERA": "E", "ALT0": 49.0, "AZ0": 90.0, "TH0": 270.0, "X0": 2004.0, "Y0": 1336.0,
        "AVERSION": "acq-1", "RVERSION": "0.1.0", "CVERSION": "none", "EXPTIME": 6.4, "CCDTEMP": -10.0,
        "NAPER": 2, "APER0": 2.5, "APER1": 4.5, "NSTAPER": 4, "SKYRAD0": 6.0, "SKYRAD1": 21.0,
    }


def flux_of(star: np.ndarray, lstseq: np.ndarray) -> np.ndarray:
    """A value that identifies (star, lstseq) uniquely, to check rows land where they belong."""
    return star.astype(np.float64) * 1e6 + lstseq


def make_night(nframes: int = 300, nstars: int = 2000, lstseq0: int = 48510530, seed: int = 0, drop: int = 3):
    """Batches of a synthetic night: stars drift through, each visible for a window of frames.

    Returns a list of (fast, slow, stars, attrs) per batch and the truth {ascc: sorted lstseq}.
    """
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(100000, 900000), nstars, replace=False)
    start = rng.integers(-nframes // 3, nframes, nstars)
    dur = rng.integers(nframes // 10, nframes // 2, nstars)
    lstseqs = lstseq0 + np.arange(nframes)
    lstseqs = np.delete(lstseqs, rng.choice(nframes, drop, replace=False))  # missing frames
    cat = np.zeros(nstars, lc.STAR_DTYPE)
    cat["ascc"] = ids.astype(str).astype("S12")
    cat["ra"] = rng.uniform(0, 360, nstars)
    cat["dec"] = rng.uniform(-30, 90, nstars)
    cat["vmag"] = rng.uniform(2, 8.4, nstars)
    cat["bmag"] = cat["vmag"] + 0.5
    cat["spectype"] = np.array([b"AM", b"G2V", b"K0III"])[ids % 3]
    cat["blend"] = ids % 2
    cat["blendvalue"] = ids % 7
    batches = []
    truth: dict[bytes, list[int]] = {}
    for b in np.unique(lstseqs // 50):
        seqs = lstseqs[lstseqs // 50 == b]
        rows = []
        for s in seqs:
            frame = s - lstseq0
            vis = np.flatnonzero((start <= frame) & (frame < start + dur))
            r = np.zeros(vis.size, with_ascc(FAST_DTYPE))
            r["ascc"] = cat["ascc"][vis]
            r["lstseq"] = s
            r["lstidx"] = s % 13500
            r["jdmid"] = 2457000.0 + s * 6.4 / 86400
            r["flux0"] = flux_of(ids[vis], s)
            r["x"] = rng.uniform(0, 4008, vis.size)
            rows.append(r)
            for a in r["ascc"]:
                truth.setdefault(a, []).append(int(s))
        fast = np.concatenate(rows)
        present = np.unique(fast["ascc"])
        slow = np.zeros(present.size, with_ascc(SLOW_DTYPE))
        slow["ascc"] = present
        slow["lstseq"] = seqs[len(seqs) // 2]
        slow["flux3"] = np.arange(present.size)
        stars = cat[np.isin(cat["ascc"], present)]
        attrs = {"batch": int(b), "lstseq_min": int(seqs.min()), "lstseq_max": int(seqs.max()),
                 "solution": {"rms": 0.1, "coeffs": [1.0, 2.0]}}
        batches.append((fast, slow, stars, attrs))
    return batches, truth


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    d = tmp_path_factory.mktemp("batches")
    batches, truth = make_night()
    paths = []
    for fast, slow, stars, attrs in batches:
        p = d / f"batch_{attrs['batch']}.h5"
        lc.write_batch_file(p, fast, slow, stars, attrs)
        paths.append(p)
    return paths, batches, truth


@pytest.fixture(scope="module")
def reference(tmp_path_factory, night):
    """The direct combine of the whole night, checked in full once by test_combine_layout_tutorial_session;
    other tests compare their files' sha256 against it."""
    return lc.combine_night(night[0], tmp_path_factory.mktemp("reference"), NIGHT, global_attrs())


# --------------------------------------------------------------------------- batch files


def test_batch_roundtrip_and_determinism(tmp_path, night):
    _, batches, _ = night
    fast, slow, stars, attrs = batches[1]
    sha1 = lc.write_batch_file(tmp_path / "a.h5", fast, slow, stars, attrs)
    sha2 = lc.write_batch_file(tmp_path / "b.h5", fast, slow, stars, attrs)
    assert sha1 == sha2 == lc.file_sha256(tmp_path / "b.h5")
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()
    pieces = lc.read_batch_file(tmp_path / "a.h5")
    np.testing.assert_array_equal(pieces.fast, fast)
    np.testing.assert_array_equal(pieces.slow, slow)
    np.testing.assert_array_equal(pieces.stars, stars)
    assert pieces.attrs == attrs
    assert pieces.batch == attrs["batch"] == fast["lstseq"][0] // 50
    assert sorted(os.listdir(tmp_path)) == ["a.h5", "b.h5"]  # no temporary left behind


def test_batch_rejects_unknown_stars(tmp_path, night):
    fast, slow, stars, attrs = night[1][0]
    with pytest.raises(ValueError, match="missing from stars"):
        lc.write_batch_file(tmp_path / "x.h5", fast, slow, stars[1:], attrs)
    assert not (tmp_path / "x.h5").exists()


def test_batch_rejects_rows_of_another_batch(tmp_path, night):
    fast, slow, stars, attrs = night[1][0]
    with pytest.raises(ValueError, match="outside batch"):
        lc.write_batch_file(tmp_path / "x.h5", fast, slow, stars, attrs | {"batch": attrs["batch"] + 1})


def test_batch_write_crash_leaves_no_file(tmp_path, night, monkeypatch):
    fast, slow, stars, attrs = night[1][0]
    lc.write_batch_file(tmp_path / "x.h5", fast, slow, stars, attrs)
    before = lc.file_sha256(tmp_path / "x.h5")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(h5py.Group, "create_dataset", boom)
    with pytest.raises(OSError, match="disk full"):
        lc.write_batch_file(tmp_path / "x.h5", fast[:10], slow, stars, attrs)
    assert lc.file_sha256(tmp_path / "x.h5") == before  # the old complete file is untouched
    assert os.listdir(tmp_path) == ["x.h5"]


# --------------------------------------------------------------------------- night files


def check_night_file(path: Path, truth: dict, kind: str) -> None:
    """Layout of SPEC §8 and, for fLC, every star's rows against the truth of make_night."""
    with h5py.File(path, "r") as f:
        assert list(f.keys()) == ["data", "global", "header", "header_table"]
        ht = {n: f["header_table"][n][()] for n in f["header_table"]}
        assert set(ht) == set(HEADER_TABLE_FIELDS)
        ids = ht["ascc"]
        assert list(ids.astype(int)) == sorted(ids.astype(int))  # numeric order
        assert sorted(f["data"].keys()) == sorted(i.decode() for i in ids)
        data = {sid: f["data"][sid.decode()][()] for sid in ids}
        nobs_hdr = np.array([f["header"][sid.decode()][0]["nobs"] for sid in ids])
    np.testing.assert_array_equal(ht["nobs"], [len(data[sid]) for sid in ids])
    np.testing.assert_array_equal(nobs_hdr, ht["nobs"])
    np.testing.assert_array_equal(ht["jdstart"], [data[sid]["jdmid"][0] for sid in ids])
    for d in data.values():
        assert np.all(np.diff(d["lstseq"].astype(np.int64)) > 0)  # sorted, no duplicate lstseq
    if kind == "fast":
        assert set(truth) == set(ids.tolist())
        for sid, seqs in truth.items():
            d = data[sid]
            np.testing.assert_array_equal(d["lstseq"], sorted(seqs))
            np.testing.assert_array_equal(d["flux0"], flux_of(np.int64(sid), d["lstseq"].astype(np.int64)))


def test_combine_layout_tutorial_session(night, reference):
    paths, batches, truth = night
    res = reference
    out = Path(res["fLC"]).parent
    assert res["fLC"] == str(out / f"fLC_{NIGHT}.hdf5")
    assert res["sLC"] == str(out / f"sLC_{NIGHT}.hdf5")
    assert res["nstars_fast"] == len(truth)
    assert res["sha256_fLC"] == lc.file_sha256(res["fLC"])

    # The tutorial's session.
    myfile = h5py.File(res["fLC"], "r")
    assert list(myfile.keys()) == ["data", "global", "header", "header_table"]
    assert set(myfile["global"].attrs.keys()) == set(SPEC_GLOBAL)
    assert tuple(SPEC_GLOBAL) == GLOBAL_ATTRS
    assert myfile["global"].attrs.get("CAMERA") == "E"
    assert myfile["global"].attrs.get("APER0") == 2.5
    assert list(myfile.attrs) == [lc.INPUT_DIGEST_ATTR]
    mystar = sorted(truth)[0].decode()
    mydata = np.copy(myfile["data"][mystar])
    assert list(mydata.dtype.names) == SPEC_FAST_FIELDS
    assert mydata.dtype == FAST_DTYPE
    assert mydata["flux0"].mean() == pytest.approx(np.mean(flux_of(np.int64(mystar), mydata["lstseq"].astype(np.int64))))
    hdr = myfile["header"][mystar]
    assert list(hdr.dtype.names) == SPEC_HEADER_FIELDS
    cat = np.concatenate([b[2] for b in batches])
    row = cat[cat["ascc"] == mystar.encode()][0]
    assert hdr["ra"].shape == (1,) and hdr["ra"][0] == row["ra"]
    assert hdr["spectype"].dtype == np.dtype("S9") and hdr["spectype"][0] == row["spectype"]
    assert hdr.dtype == HEADER_DTYPE
    myfile.close()

    check_night_file(Path(res["fLC"]), truth, "fast")
    check_night_file(Path(res["sLC"]), truth, "slow")
    with h5py.File(res["sLC"], "r") as s:
        g = s["global"].attrs
        assert set(g) == set(SPEC_GLOBAL) | {"APER2", "APER3"}
        assert g["NAPER"] == 4 and [g[f"APER{i}"] for i in range(4)] == [2.5, 3.5, 4.5, 5.5]
        sid = sorted(truth)[0].decode()
        d = s["data"][sid][()]
        assert d.dtype == SLOW_DTYPE
        # one binned point per batch the star was seen in
        seen = {q // 50 for q in truth[sid.encode()]}
        assert sorted(d["lstseq"] // 50) == sorted(seen)

    data, header = lc.read_star(res["fLC"], mystar)
    np.testing.assert_array_equal(data, mydata)
    assert header["nobs"][0] == len(truth[mystar.encode()])


def test_combine_order_independent_and_duplicates(tmp_path, night, reference):
    paths, _, truth = night
    a = reference
    shuffled = list(reversed(paths)) + [paths[2], paths[0]]  # out of order, batches given twice
    copy = tmp_path / "copy_of_batch.h5"
    copy.write_bytes(Path(paths[1]).read_bytes())  # same batch under another name
    b = lc.combine_night(shuffled + [copy], tmp_path / "b", NIGHT, global_attrs())
    assert a["sha256_fLC"] == b["sha256_fLC"] and a["sha256_sLC"] == b["sha256_sLC"]
    assert Path(a["fLC"]).read_bytes() == Path(b["fLC"]).read_bytes()


def test_combine_conflicting_batch_raises(tmp_path, night):
    paths, batches, _ = night
    fast, slow, stars, attrs = batches[0]
    other = tmp_path / "other.h5"
    lc.write_batch_file(other, fast[:-1], slow, stars, attrs)
    with pytest.raises(lc.BatchConflictError):
        lc.combine_night(list(paths) + [other], tmp_path / "out", NIGHT, global_attrs())


def test_combine_rejects_wrong_global_attrs(tmp_path, night):
    g = global_attrs()
    g["EXTRA"] = 1
    with pytest.raises(ValueError, match="unexpected"):
        lc.combine_night(night[0], tmp_path, NIGHT, g)


def test_combine_idempotent(tmp_path, night):
    paths, _, _ = night
    out = tmp_path / "lightcurves"
    first = lc.combine_night(paths, out, NIGHT, global_attrs())
    st = {k: os.stat(first[k]) for k in ("fLC", "sLC")}
    second = lc.combine_night(list(reversed(paths)), out, NIGHT, global_attrs())
    assert second["rewritten"] is False and first["rewritten"] is True
    for k in ("fLC", "sLC"):
        now = os.stat(second[k])
        assert (now.st_ino, now.st_mtime_ns) == (st[k].st_ino, st[k].st_mtime_ns)
        assert second[f"sha256_{k}"] == first[f"sha256_{k}"] == lc.file_sha256(second[k])
    # different inputs -> rewritten
    third = lc.combine_night(paths[:-1], out, NIGHT, global_attrs())
    assert third["rewritten"] is True and third["sha256_fLC"] != first["sha256_fLC"]
    assert sorted(p for p in os.listdir(out) if not p.endswith(".json")) == [f"fLC_{NIGHT}.hdf5", f"sLC_{NIGHT}.hdf5"]


def test_combine_crash_mid_write_then_recovers(tmp_path, night, reference, monkeypatch):
    paths, _, truth = night
    out = tmp_path / "lightcurves"
    real_create = h5py.h5d.create
    calls = {"n": 0}

    def failing_create(*a, **k):
        calls["n"] += 1
        if calls["n"] == 500:  # in the middle of the data group
            raise OSError("simulated crash")
        return real_create(*a, **k)

    monkeypatch.setattr(h5py.h5d, "create", failing_create)
    with pytest.raises(OSError, match="simulated crash"):
        lc.combine_night(paths, out, NIGHT, global_attrs())
    assert not (out / f"fLC_{NIGHT}.hdf5").exists() and not (out / f"sLC_{NIGHT}.hdf5").exists()
    monkeypatch.setattr(h5py.h5d, "create", real_create)
    # a real kill leaves the temporary behind: the next combine must not mind
    (out / f".fLC_{NIGHT}.hdf5.12345.tmp").write_bytes(b"partial")
    res = lc.combine_night(paths, out, NIGHT, global_attrs())
    assert res["rewritten"]
    assert res["sha256_fLC"] == reference["sha256_fLC"] == lc.file_sha256(res["fLC"])
    assert sorted(os.listdir(out)) == sorted(
        [f"fLC_{NIGHT}.hdf5", f"sLC_{NIGHT}.hdf5", f"fLC_{NIGHT}.hdf5.json", f"sLC_{NIGHT}.hdf5.json"]
    )


# --------------------------------------------------------------------------- the splitter


def test_splitter_resume_no_duplicates_and_same_content(tmp_path, night, reference):
    paths, _, truth = night
    work = tmp_path / "work"
    diag = [sorted(truth)[3].decode(), sorted(truth)[7].decode()]
    sp = lc.StarSplitter(work, diag)
    half = len(paths) // 2
    for p in paths[:half]:
        assert sp.add(p) is True
    assert sp.add(paths[0]) is False  # same batch again: nothing added
    # a "crash": a fresh splitter on the same workdir carries on, re-adding one batch
    sp2 = lc.StarSplitter(work, diag)
    assert set(sp2.batches) == {int(lc.read_batch_file(p).batch) for p in paths[:half]}
    for p in paths[half - 1 :]:
        sp2.add(p)
    rows = sp2.star_rows(diag[0])
    np.testing.assert_array_equal(rows["lstseq"], sorted(truth[diag[0].encode()]))

    with h5py.File(work / "diagnostics.hdf5", "r") as f:
        for sid in diag:
            np.testing.assert_array_equal(f["fast"][sid]["lstseq"], sorted(truth[sid.encode()]))
            assert f["header"][sid]["nobs"][0] == len(truth[sid.encode()])
        assert f.attrs["nbatches"] == len(paths)

    via_split = lc.combine_night(paths, tmp_path / "a", NIGHT, global_attrs(), workdir=work)
    assert via_split["sha256_fLC"] == reference["sha256_fLC"] == lc.file_sha256(via_split["fLC"])
    assert via_split["sha256_sLC"] == reference["sha256_sLC"]


def _diagnostics_from_the_store(sp, ids):
    """What ``diagnostics.hdf5`` must hold, read the slow way: whole buckets over every batch."""
    stars = sp.stars()
    out = {}
    for sid in ids:
        fast, slow = sp.star_rows(sid, "fast"), sp.star_rows(sid, "slow")
        sel = stars[stars["ascc"] == sid.encode()]
        out[sid] = (fast, slow, {n: sel[n][0] for n in sel.dtype.names[1:]} if sel.size else {}, fast.size)
    return out


def test_splitter_diagnostics_follow_out_of_order_and_replaced_batches(tmp_path, night):
    """Diagnostics refreshed from the new batch only give what reading the whole store gives."""
    paths, _, truth = night
    in_batch2 = np.unique(lc.read_batch_file(paths[2]).fast["ascc"])
    ids = sorted({sorted(truth)[i].decode() for i in (0, 7)} | {a.decode() for a in in_batch2[:2]})
    sp = lc.StarSplitter(tmp_path / "work", ids)
    order = [paths[i] for i in np.random.default_rng(3).permutation(len(paths))]
    # batch 2 again with other content (a re-reduced batch): its pieces and diagnostics are replaced
    changed = tmp_path / "changed.h5"
    shutil.copy(paths[2], changed)
    with h5py.File(changed, "r+") as f:
        fast = f["fast"][()]
        fast["flux0"] *= 1.5
        f["fast"][...] = fast
    for p in order + [changed]:
        assert sp.add(p)
        want = _diagnostics_from_the_store(sp, ids)
        with h5py.File(tmp_path / "work" / "diagnostics.hdf5", "r") as f:
            assert f.attrs["nbatches"] == len(sp.batches)
            for sid, (fast, slow, star, nobs) in want.items():
                np.testing.assert_array_equal(f["fast"][sid][()], fast)
                np.testing.assert_array_equal(f["slow"][sid][()], slow)
                hdr = f["header"][sid][()]
                assert hdr["nobs"][0] == nobs and all(hdr[n][0] == v for n, v in star.items()), sid
    # a fresh splitter (another process) on the same store writes the same file
    before = h5py.File(tmp_path / "work" / "diagnostics.hdf5", "r")
    snapshot = {k: before[k][sid][()].tobytes() for k in ("fast", "slow", "header") for sid in ids}
    before.close()
    lc.StarSplitter(tmp_path / "work", ids).write_diagnostics()
    with h5py.File(tmp_path / "work" / "diagnostics.hdf5", "r") as f:
        assert {k: f[k][sid][()].tobytes() for k in ("fast", "slow", "header") for sid in ids} == snapshot


def test_star_key_is_the_blake2b_of_each_id_whatever_its_length():
    import hashlib

    rng = np.random.default_rng(5)
    ids = [b"1468368", b"143497", b"12345678", b"123456789", b"HD 12345678X", b"7", b"A1B2C3D4"]
    for pool in (ids[:3] + ids[5:], ids):  # ids of <= 8 bytes only (the integer path), then mixed lengths
        ascc = np.array([pool[i] for i in rng.integers(0, len(pool), 5000)], dtype="S12")
        want = [int.from_bytes(hashlib.blake2b(a, digest_size=8).digest(), "little") for a in ascc.tolist()]
        np.testing.assert_array_equal(lc._star_key(ascc), np.array(want, np.uint64))
        assert lc._star_key(ascc[::-1][::2]).tolist() == want[::-1][::2]  # a strided field view as given by tables


def test_piece_order_is_lexsort_order_and_piece_rows_are_batch_rows_behind_the_key():
    rng = np.random.default_rng(9)
    for kind, d in lc._ROW_DTYPES.items():
        p = lc._PIECE_DTYPES[kind]
        assert p.itemsize == 8 + d.itemsize and all(p.fields[n][1] == 8 + d.fields[n][1] for n in d.names)
    for sorted_lstseq in (True, False):
        for nb in (128, 100, 1):
            key = rng.integers(0, 2**64, 40, dtype=np.uint64)[rng.integers(0, 40, 3000)]
            lstseq = rng.integers(0, 50, 3000)
            if sorted_lstseq:
                lstseq.sort()
            bucket = key % np.uint64(nb)
            np.testing.assert_array_equal(lc._piece_order(lstseq, key, bucket, nb),
                                          np.lexsort((lstseq, key, bucket)))


def test_splitter_crash_before_commit(tmp_path, night, reference, monkeypatch):
    """A crash after the pieces were written but before the registry: the re-add redoes it once."""
    paths, _, truth = night
    work = tmp_path / "work"
    sp = lc.StarSplitter(work)
    sp.add(paths[0])

    def boom(self):
        raise OSError("killed")

    monkeypatch.setattr(lc.StarSplitter, "_commit", boom)
    with pytest.raises(OSError):
        sp.add(paths[1])
    monkeypatch.undo()
    sp = lc.StarSplitter(work)
    assert set(sp.batches) == {lc.read_batch_file(paths[0]).batch}
    for p in paths:
        sp.add(p)
    res = lc.combine_night(paths, tmp_path / "out", NIGHT, global_attrs(), workdir=work)
    assert res["sha256_fLC"] == reference["sha256_fLC"]
    # only the registered pieces remain
    assert len(os.listdir(work / "split")) == 3 * len(paths)


def test_combine_adds_batches_the_splitter_missed(tmp_path, night, reference):
    paths, _, truth = night
    work = tmp_path / "work"
    sp = lc.StarSplitter(work)
    for p in paths[::2]:
        sp.add(p)
    res = lc.combine_night(paths, tmp_path / "out", NIGHT, global_attrs(), workdir=work)
    assert res["sha256_fLC"] == reference["sha256_fLC"] and res["sha256_sLC"] == reference["sha256_sLC"]


def test_run_splitter_process(tmp_path, night):
    paths, _, truth = night
    ctx = mp.get_context("spawn")
    q, results = ctx.Queue(), ctx.Queue()
    sid = sorted(truth)[0].decode()
    proc = ctx.Process(target=lc.run_splitter_process, args=(q, str(tmp_path / "work"), [sid], results))
    proc.start()
    for p in paths + [paths[0], tmp_path / "missing.h5"]:
        q.put(str(p))
    q.put(None)
    proc.join(60)
    assert proc.exitcode == 0
    statuses = [results.get(timeout=5)[1] for _ in range(len(paths) + 2)]
    assert statuses[: len(paths)] == ["added"] * len(paths)
    assert statuses[len(paths)] == "skipped" and statuses[-1].startswith("error")
    with h5py.File(tmp_path / "work" / "diagnostics.hdf5", "r") as f:
        np.testing.assert_array_equal(f["fast"][sid]["lstseq"], sorted(truth[sid.encode()]))


def test_a_splitter_process_reports_each_item_of_a_call_in_order_and_none_of_an_earlier_call(tmp_path, night):
    from mascara.reduce import SplitterProcess

    paths, _, _ = night
    sp = SplitterProcess(tmp_path / "work", report=True)
    try:
        sp.results.put((str(paths[0]), "error: an outcome of a call that stopped waiting", 0))
        sp.results.put((str(paths[1]), "error: an outcome of a splitter fed by put()"))
        out = sp.split([(str(p), None) for p in reversed(paths)] + [(str(tmp_path / "missing.h5"), None)])
        assert [p for p, _ in out] == [str(p) for p in reversed(paths)] + [str(tmp_path / "missing.h5")]
        assert [st for _, st in out[:-1]] == ["added"] * len(paths)
        assert out[-1][1].startswith("error: ") and "missing.h5" in out[-1][1]
        assert sp.split([(str(paths[1]), None)]) == [(str(paths[1]), "skipped")]
    finally:
        sp.stop(clean=True, timeout=30)
    assert not sp.alive() and sp.proc.exitcode == 0


def test_a_splitter_process_that_does_not_answer_is_stopped_and_its_items_reported_not_split(tmp_path, night,
                                                                                             monkeypatch):
    """A splitter frozen mid-night (SIGSTOP here; a hung file system) costs the waiting task a timeout, not
    the night: it is killed, and the combine splits what the store lacks."""
    from mascara.reduce import SplitterProcess

    paths, _, _ = night
    monkeypatch.setenv("MASCARA_FAULT", "splitting:stop")  # the spawned process reads it
    sp = SplitterProcess(tmp_path / "work", report=True)
    t0 = time.monotonic()
    out = sp.split([(str(p), None) for p in paths[:2]], timeout=3.0)
    assert 3.0 <= time.monotonic() - t0 < 30
    assert out == [(str(p), "error: the splitter process did not answer in time; stopped") for p in paths[:2]]
    assert not sp.alive()
    sp.stop(clean=True)  # on a dead process: nothing to wait for
    assert lc.StarSplitter(tmp_path / "work").batches == {}  # frozen before its first batch


def test_a_splitter_process_that_cannot_open_its_store_says_why_to_the_caller(tmp_path, night):
    from mascara.reduce import SplitterProcess

    paths, _, _ = night
    (tmp_path / "work").write_text("a file where the night's work/ should be")
    sp = SplitterProcess(tmp_path / "work", report=True)
    out = sp.split([(str(paths[0]), None)], timeout=60)
    (status,) = [st for _, st in out]
    assert status.startswith("error: the splitter process ended: could not open the split store"), status
    assert str(tmp_path / "work") in status
    sp.proc.join(30)
    assert not sp.alive()


def test_star_key_collisions_fall_back_to_id_sort(tmp_path, night, reference, monkeypatch):
    """Every star given the same 64-bit key: the combine must still separate them by id."""
    monkeypatch.setattr(lc, "_star_key", lambda ascc: np.zeros(len(ascc), np.uint64))
    res = lc.combine_night(night[0], tmp_path / "out", NIGHT, global_attrs())
    with h5py.File(res["fLC"], "r") as f, h5py.File(reference["fLC"], "r") as g:
        assert list(f["data"]) == list(g["data"])
        for sid in list(g["data"])[::50]:
            np.testing.assert_array_equal(f["data"][sid][()], g["data"][sid][()])
        np.testing.assert_array_equal(f["header_table"]["nobs"][()], g["header_table"]["nobs"][()])


def test_combine_from_splitter_uses_only_given_batches(tmp_path, night):
    paths, _, _ = night
    work = tmp_path / "work"
    sp = lc.StarSplitter(work)
    for p in paths:
        sp.add(p)
    subset = paths[1:-1]
    via_split = lc.combine_night(subset, tmp_path / "a", NIGHT, global_attrs(), workdir=work)
    direct = lc.combine_night(subset, tmp_path / "b", NIGHT, global_attrs())
    assert via_split["sha256_fLC"] == direct["sha256_fLC"] and via_split["sha256_sLC"] == direct["sha256_sLC"]
    batches = {lc.read_batch_file(p).batch for p in subset}
    with h5py.File(via_split["fLC"], "r") as f:
        for sid in list(f["data"])[::100]:
            assert set(f["data"][sid]["lstseq"] // 50) <= batches


def test_a_splitter_process_ends_when_the_process_that_started_it_is_killed(tmp_path):
    """``kill -9`` of ``mascprocess --no-prefect`` (a stranger's trial): its splitter waited on its queue
    for ever, holding the command's output pipes open; now it notices the parent is gone and ends."""
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import multiprocessing as mp, sys, time\n"
        "from mascara.lightcurves import run_splitter_process\n"
        "if __name__ == '__main__':\n"
        "    ctx = mp.get_context('spawn')\n"
        "    q = ctx.Queue()\n"
        "    p = ctx.Process(target=run_splitter_process, args=(q, sys.argv[1]), daemon=True)\n"
        "    p.start()\n"
        "    print(p.pid, flush=True)\n"
        "    time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "work")], stdout=subprocess.PIPE,
                              text=True)
    child = int(parent.stdout.readline())

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
        except (FileNotFoundError, IndexError):
            return False

    time.sleep(2)
    assert alive(child)  # idle, waiting for batch files
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 30
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(child), "the splitter outlived the process that started it"
    assert parent.stdout.read() == ""  # and the pipe closed: nothing holds it open any more


def test_diagnostics_a_full_disk_left_behind_are_caught_up_by_the_resume_and_the_combine(tmp_path, night,
                                                                                          monkeypatch):
    """An outside trial filled the disk while the last batch was split: the batch was registered, its
    diagnostics not written; the resumed night reused every batch, succeeded, and kept a diagnostics.hdf5
    without that batch. Re-adding a registered batch, and the combine's catch-up, now rewrite it."""
    paths, _, truth = night
    ids = sorted(a.decode() for a in sorted(truth)[:3])
    work = tmp_path / "work"
    sp = lc.StarSplitter(work, ids)
    for p in paths[:-1]:
        assert sp.add(p)
    real = lc.StarSplitter.write_diagnostics

    def full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lc.StarSplitter, "write_diagnostics", full)
    with pytest.raises(OSError):
        sp.add(paths[-1])
    monkeypatch.setattr(lc.StarSplitter, "write_diagnostics", real)
    assert len(sp.batches) == len(paths)  # registered: it counts as split

    def nbatches() -> int:
        with h5py.File(work / "diagnostics.hdf5", "r") as f:
            return int(f.attrs["nbatches"])

    assert nbatches() == len(paths) - 1
    # the resume: the splitter skips every batch as split, and brings the diagnostics up to date
    again = lc.StarSplitter(work, ids)
    assert not again.add(paths[-1])
    assert nbatches() == len(paths)
    want = _diagnostics_from_the_store(again, ids)
    with h5py.File(work / "diagnostics.hdf5", "r") as f:
        for sid, (fast, slow, _, _) in want.items():
            np.testing.assert_array_equal(f["fast"][sid][()], fast)
    assert not again.ensure_diagnostics()  # current: not rewritten
    # a combine whose splitter was killed before its diagnostics: ensure_diagnostics (called by the
    # night's combine) rewrites a stale file, and so does a changed set of diagnostic stars
    (work / "diagnostics.hdf5").unlink()
    assert lc.StarSplitter(work, ids).ensure_diagnostics() and nbatches() == len(paths)
    assert lc.StarSplitter(work, ids[:2]).ensure_diagnostics()
