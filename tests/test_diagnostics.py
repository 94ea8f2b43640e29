"""Diagnostic stars, transparency and batch quality (mascara.diagnostics) on a simulated cloudy two-camera night."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from sqlalchemy import select
from sqlmodel import Session

from mascara import diagnostics as dg
from mascara.catalog import connect
from mascara.catalog.models import Batch, CameraNight, Frame
from mascara.lightcurves import StarSplitter
from mascara.simulate import SimConfig, simulate_night

NIGHT = "20260301"


@pytest.fixture(scope="module")
def cloudy_night(tmp_path_factory) -> Path:
    """150 frames of LPE and LPS with clouds passing mid-run, reduced by the library driver (SQLite catalog)."""
    from flows._runs import drive_camera_night

    datadir = tmp_path_factory.mktemp("cloudy")
    db = f"sqlite:///{datadir / 'catalog.sqlite'}"
    for cam in ("E", "S"):
        simulate_night(datadir, NIGHT, SimConfig(site="LP", camera=cam, size="small", nframes=150, seed=1,
                                                 clouds=True))
        drive_camera_night(db, datadir / f"{NIGHT}LP{cam}", split_in_background=True)
    return datadir


def _diagnostics(workdir: Path) -> dict[str, np.ndarray]:
    with h5py.File(workdir / "diagnostics.hdf5", "r") as f:
        return {sid: f["fast"][sid][()] for sid in f["fast"]}


def test_diagnostic_light_curves_exist_for_every_camera_and_differ(cloudy_night):
    lcs = {cam: _diagnostics(cloudy_night / f"{NIGHT}LP{cam}" / "work") for cam in ("E", "S")}
    for cam, stars in lcs.items():
        assert len(stars) == dg.DIAGNOSTIC_COUNT, cam
        # on the frame most of the night: most of the 150 frames for every star
        assert all(len(rows) >= 0.8 * 150 for rows in stars.values()), {s: len(r) for s, r in stars.items()}
        for rows in stars.values():
            good = rows["flag"] == 0
            assert good.mean() > 0.75 and np.all(rows["peak"][good] < 0.7 * 63000)  # unsaturated
    assert not set(lcs["E"]) & set(lcs["S"])  # another camera looks elsewhere
    for cam in ("E", "S"):  # the library driver draws the quick-look figures at the end
        assert sorted(p.name for p in (cloudy_night / f"{NIGHT}LP{cam}" / "quicklook").iterdir()) == [
            "astrometry.png", "frames.png", "lightcurves.png", "sky.png", "thumbnail.png"]
    chosen = json.loads((cloudy_night / f"{NIGHT}LPE" / "work" / dg.STARS_FILE).read_text())["stars"]
    assert [s["ascc"] for s in chosen] and all(s["fraction_on"] >= 0.5 for s in chosen)
    assert [s["vmag"] for s in chosen] == sorted(s["vmag"] for s in chosen)


def test_diagnostic_light_curves_grow_batch_by_batch(cloudy_night, tmp_path):
    night = cloudy_night / f"{NIGHT}LPS"
    ids = [s["ascc"] for s in json.loads((night / "work" / dg.STARS_FILE).read_text())["stars"]]
    splitter = StarSplitter(tmp_path / "store", ids)
    lengths = []
    for p in sorted((night / "work" / "batches").glob("batch_*.h5")):
        splitter.add(p)
        lengths.append(sum(len(r) for r in _diagnostics(tmp_path / "store").values()))
    assert len(lengths) == 4 and all(b > a for a, b in zip(lengths, lengths[1:])) and lengths[0] > 0


def test_a_cloudy_batch_is_recorded_as_low_transparency(cloudy_night):
    with connect(f"sqlite:///{cloudy_night / 'catalog.sqlite'}") as cat, Session(cat.engine) as s:
        for cam in ("E", "S"):
            (cn,) = s.execute(select(CameraNight.id).where(CameraNight.camera_id == f"LP{cam}")).scalars()
            batches = {b.batch_index: b for b in s.execute(select(Batch).where(Batch.camera_night_id == cn)).scalars()}
            tr = {i: b.transparency for i, b in batches.items()}
            low = {i for i, b in batches.items() if b.low_transparency}
            first, last = min(tr), max(tr)
            # clouds pass in the middle: the edges of the run are clear, a middle batch is marked
            assert tr[first] > 0.9 and tr[last] > 0.9, tr
            assert low and low <= set(tr) - {first, last}, tr
            assert min(tr.values()) < dg.LOW_TRANSPARENCY
            frames = s.execute(select(Frame.lstseq, Frame.sky, Frame.transparency).where(
                Frame.camera_night_id == cn, Frame.status == "ok", Frame.lstseq.is_not(None))).all()
            assert len(frames) == 150 and all(t is not None and sky > 0 for _, sky, t in frames)
            assert min(t for _, _, t in frames) < 0.4 < 0.95 < max(t for _, _, t in frames)
    q = dg.read_qualities(cloudy_night / f"{NIGHT}LPS")  # the last camera of the loop
    assert [x["batch"] for x in q] == sorted(tr) and all(x["astro_ok"] and x["drift_px"] is not None for x in q)
    previews = sorted(p.name for p in (cloudy_night / f"{NIGHT}LPS" / "work" / dg.QUALITY_DIR).glob("binned_*"))
    assert previews == [f"binned_{b:07d}.npy" for b in sorted(dg.preview_batches(sorted(tr)))]
    assert dg.summarise(q)["batches_low_transparency"] == sorted(low)


def test_frame_quality_is_the_median_ratio_of_bright_unflagged_stars():
    from mascara import lcformat as lcf

    rows = lcf.fast_table(6)
    rows["lstseq"] = [10, 10, 10, 11, 11, 11]
    rows["alt"] = 90.0
    rows["jdmid"] = [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    rows["sky"] = [100, 110, 120, 50, 50, 50]
    vmag = np.array([5.0, 6.0, 7.0, 5.0, 6.0, 9.0])  # the V 9 star is too faint to count
    clear = dg.expected_flux(vmag, rows["alt"])
    rows["flux1"] = clear * np.array([1.0, 1.0, 0.2, 0.5, 0.5, 0.01])
    rows["flag"] = [0, 0, 0, 0, 8, 0]  # a saturated peak does not count
    q = dg.frame_quality(rows, vmag)
    assert list(q["lstseq"]) == [10, 11] and list(q["nstars"]) == [3, 1]
    assert q["transparency"] == pytest.approx([1.0, 0.5]) and list(q["sky"]) == [110.0, 50.0]
    # rows frame by frame (as a batch file holds them) or in any order: the same figures
    perm = np.array([4, 0, 5, 2, 3, 1])
    shuffled = dg.frame_quality(rows[perm], vmag[perm])
    for k in q:
        np.testing.assert_array_equal(shuffled[k], q[k])


def test_pick_diagnostic_prefers_stars_on_the_frame_all_night():
    vmag = np.array([3.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.2])
    fraction = np.array([1.0, 1.0, 0.3, 0.9, 1.0, 0.6, 1.0])
    iso = np.array([True, True, True, True, False, True, True])
    peak_ok = np.array([True, False, True, True, True, True, True])
    assert list(dg.pick_diagnostic(vmag, fraction, iso, peak_ok, n=2)) == [3, 5]
    assert list(dg.pick_diagnostic(vmag, fraction, iso, peak_ok, n=1)) == [3]


def test_pick_diagnostic_on_a_camera_no_star_stays_on_all_night():
    """Over a whole night (or a live night's dark time) stars cross an east or west camera in a few hours:
    the best-covered are chosen, not none (an outside trial found every live run without diagnostics)."""
    vmag = np.array([4.5, 5.0, 5.5, 6.0, 6.5, 7.5])
    fraction = np.array([0.30, 0.42, 0.12, 0.40, 0.36, 0.45])
    ok = np.ones(vmag.size, bool)
    assert list(dg.pick_diagnostic(vmag, fraction, ok, ok, n=2)) == [1, 4]  # >= 0.8 * 0.42, spread over V
    assert list(dg.pick_diagnostic(vmag, fraction, ok, ok, n=4)) == [0, 1, 3, 4]  # then the best-covered
    assert list(dg.pick_diagnostic(vmag, np.zeros(vmag.size), ok, ok, n=2)) == []  # never on the frame


# --------------------------------------------------------------------------- quick-look figures (mascara.quicklook)


def _png(path: Path) -> tuple[int, int]:
    import struct

    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_quicklook_figures_exist_are_small_and_change_when_a_batch_is_added(cloudy_night, tmp_path):
    from mascara import quicklook as ql

    src = cloudy_night / f"{NIGHT}LPE"
    night = tmp_path / f"{NIGHT}LPE"
    (night / "work" / dg.QUALITY_DIR).mkdir(parents=True)
    ids = [s["ascc"] for s in json.loads((src / "work" / dg.STARS_FILE).read_text())["stars"]]
    splitter = StarSplitter(night / "work", ids)
    batches = sorted((src / "work" / "batches").glob("batch_*.h5"))
    before: dict[str, bytes] = {}
    for k, p in enumerate(batches[:3]):
        b = int(p.stem.split("_")[1])
        splitter.add(p)
        for name in (dg.quality_path(src, b), dg.preview_path(src, b)):
            if name.exists():  # previews are kept for the first and the middle batch only
                shutil.copy(name, night / "work" / dg.QUALITY_DIR / name.name)
        figs = ql.update_camera_night(night)
        assert set(figs) == set(ql.FIGURES)
        after = {n: Path(f).read_bytes() for n, f in figs.items()}
        if before:  # every time-series figure shows the new batch
            for n in ("lightcurves", "sky", "astrometry", "frames"):
                assert after[n] != before[n], n
        before = after
    for name, path in figs.items():
        assert path.parent == night / "quicklook" and 2_000 < path.stat().st_size < 60_000, (name, path.stat())
        w, h = _png(path)
        assert 300 < w <= 800 and 200 < h <= 600, (name, w, h)
    out = ql.plot_night_summary({"LPE": src, "LPS": cloudy_night / f"{NIGHT}LPS"},
                                ql.night_summary_path(tmp_path, NIGHT, "LP"), f"{NIGHT} LP")
    assert out == tmp_path / "quicklook" / f"{NIGHT}LP.png" and out.stat().st_size < 60_000


def test_quicklook_draws_an_empty_night_without_failing(tmp_path):
    from mascara import quicklook as ql

    night = tmp_path / f"{NIGHT}LPW"
    (night / "work").mkdir(parents=True)
    figs = ql.update_camera_night(night)
    assert set(figs) == {"lightcurves", "sky", "astrometry", "frames"} and all(p.is_file() for p in figs.values())


def test_mascara_quicklook_redraws_missing_figures_from_work_and_names_what_it_cannot(cloudy_night, tmp_path,
                                                                                      capsys, monkeypatch):
    """``mascara quicklook``: figures deleted after a reduction (or never drawn) come back from ``work/`` alone,
    the reduction's outputs and ``raw/`` untouched; a camera-night with nothing reduced is named, exit 1. It
    never opens the catalog, so a catalog URL in the environment that names none does not stop it."""
    from mascara.cli import main

    monkeypatch.setenv("MASCARA_DB_URL", "sqlite:////nonexistent-mount/catalog.sqlite")

    def tree_digest(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    datadir = tmp_path / "data"
    for cam in ("E", "S"):
        shutil.copytree(cloudy_night / f"{NIGHT}LP{cam}", datadir / f"{NIGHT}LP{cam}", symlinks=True)
    for cam in ("E", "S"):
        shutil.rmtree(datadir / f"{NIGHT}LP{cam}" / "quicklook")
    kept = {name: tree_digest(datadir / f"{NIGHT}LPE" / name) for name in ("raw", "work", "lightcurves")}
    assert main(["quicklook", str(datadir), "--night", NIGHT, "--camera", "E+S"]) == 0
    out = capsys.readouterr().out
    for cam in ("E", "S"):
        night = datadir / f"{NIGHT}LP{cam}"
        assert sorted(p.name for p in (night / "quicklook").iterdir()) == [
            "astrometry.png", "frames.png", "lightcurves.png", "sky.png", "thumbnail.png"], cam
        assert f"{NIGHT}LP{cam}: astrometry, frames, lightcurves, sky, thumbnail in {night / 'quicklook'}" in out
        # the redrawn figures are those the reduction drew (same inputs, same pixels)
        for png in (night / "quicklook").iterdir():
            assert png.read_bytes() == (cloudy_night / f"{NIGHT}LP{cam}" / "quicklook" / png.name).read_bytes(), png
    assert (datadir / "quicklook" / f"{NIGHT}LP.png").is_file() and f"night summary: {datadir}" in out
    assert {name: tree_digest(datadir / f"{NIGHT}LPE" / name) for name in kept} == kept
    # one camera redrawn: the night's summary still shows both (outside trial: it showed LPE alone)
    assert main(["quicklook", str(datadir), "--night", NIGHT, "--camera", "E"]) == 0
    assert f"night summary: {datadir / 'quicklook' / f'{NIGHT}LP.png'}" in capsys.readouterr().out
    assert _summary_cameras(datadir / "quicklook" / f"{NIGHT}LP.png") == ["LPE", "LPS"]

    # a camera-night that was never reduced: named, exit 1, the others still drawn
    (datadir / f"{NIGHT}LPW" / "raw").mkdir(parents=True)
    shutil.rmtree(datadir / f"{NIGHT}LPE" / "quicklook")
    assert main(["quicklook", str(datadir), "--night", NIGHT]) == 1
    cap = capsys.readouterr()
    assert f"{NIGHT}LPW: nothing to draw (no reduced batch in {datadir / f'{NIGHT}LPW' / 'work'})" in cap.err
    assert (datadir / f"{NIGHT}LPE" / "quicklook" / "sky.png").is_file()
    assert not (datadir / f"{NIGHT}LPW" / "quicklook").exists()
    # a mistake in the request: one line, exit 2
    assert main(["quicklook", str(datadir), "--night", "2026-03-01"]) == 2
    assert "mascara quicklook:" in capsys.readouterr().err


def _reduced_camera_night(night: Path, batches: int = 2) -> Path:
    """A camera-night with what the summary figure reads: per-batch quality records in ``work/quality/``."""
    for b in range(batches):
        frames = [{"lstseq": 100 * b + i, "jd": 2461101.40 + (100 * b + i) / 1440, "sky": 1000.0 + i,
                   "transparency": 0.9, "nstars": 50} for i in range(10)]
        path = dg.quality_path(night, b)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"batch": b, "frames": frames, "astro_rms": 0.3}))
    return night


def _summary_cameras(png: Path) -> list[str]:
    """The cameras a night summary figure drew, from the ``Cameras`` text chunk it carries."""
    from PIL import Image

    with Image.open(png) as img:
        return img.text.get("Cameras", "").split()


def test_night_summary_shows_every_reduced_camera_of_the_night_not_only_those_passed(tmp_path, monkeypatch):
    """Outside trial: after ``mascprocess D --night N --camera E`` (or ``mascara quicklook ... --camera E``) the
    figure ``<N>LP.png``, "N LP all cameras", showed LPE alone though LPS of that night is reduced in D too.
    It shows every reduced camera-night of the night and site in the data directory, whichever were passed;
    one with nothing reduced, or whose ``work/`` cannot be read, is left out without breaking the figure."""
    from mascara import quicklook as ql

    datadir = tmp_path / "data"
    for name in (f"{NIGHT}LPE", f"{NIGHT}LPS", "20260302LPW", f"{NIGHT}AUE"):
        _reduced_camera_night(datadir / name)
    (datadir / f"{NIGHT}LPW" / "raw").mkdir(parents=True)  # not reduced: no work/
    (datadir / f"{NIGHT}LPC").mkdir()
    (datadir / f"{NIGHT}LPC" / "work").write_text("not a directory")  # work/ unreadable
    garbled = dg.quality_path(datadir / f"{NIGHT}LPN", 0)  # JSON, but no batch record
    garbled.parent.mkdir(parents=True)
    garbled.write_text("[1, 2, 3]")
    (datadir / "quicklook").mkdir()  # not a night directory
    drawn: list[list[str]] = []
    plot = ql.plot_night_summary
    monkeypatch.setattr(ql, "plot_night_summary", lambda nights, out, title="": (
        drawn.append(sorted(nights)), plot(nights, out, title))[1])

    out = ql.update_night_summaries(datadir, [datadir / f"{NIGHT}LPE"])
    assert out == [ql.night_summary_path(datadir, NIGHT, "LP")]
    assert drawn == [["LPE", "LPS"]]
    assert _summary_cameras(out[0]) == ["LPE", "LPS"]
    # the same figure whichever camera-night of it is passed, and all of them together
    for passed in ([f"{NIGHT}LPS"], [f"{NIGHT}LPE", f"{NIGHT}LPS", f"{NIGHT}LPW", f"{NIGHT}LPC", f"{NIGHT}LPN"]):
        drawn.clear()
        assert ql.update_night_summaries(str(datadir), [str(datadir / p) for p in passed]) == out
        assert drawn == [["LPE", "LPS"]] and _summary_cameras(out[0]) == ["LPE", "LPS"], passed


def test_short_reason_drops_details():
    from mascara.quicklook import short_reason

    assert short_reason("truncated file (2880 of 5760 bytes)") == "truncated file"
    assert short_reason("mostly saturated (75% of the science pixels >= 63000 ADU)") == "mostly saturated"
    assert short_reason("missing header keyword(s) JD") == "missing header keyword"


@pytest.mark.filterwarnings("error")  # no warning, and none silenced through process-wide warning filters
def test_binned_preview_is_the_mean_of_finite_pixels_per_block(tmp_path):
    rng = np.random.default_rng(3)
    binned = rng.normal(1000.0, 30.0, (41, 58)).astype(np.float32)
    binned[:8, :8] = np.nan  # a whole block without data (outside the horizon)
    binned[10:12, 20:23] = np.nan  # some pixels of a block
    path = dg.save_binned_preview(tmp_path, 7, binned, factor=4)
    small = np.load(path)
    assert small.shape == (10, 14) and small.dtype == np.float16
    blocks = binned[:40, :56].reshape(10, 4, 14, 4).astype(np.float64)
    with np.errstate(invalid="ignore"):
        want = np.nansum(blocks, axis=(1, 3)) / np.isfinite(blocks).sum(axis=(1, 3))
    assert np.isnan(small[:2, :2]).all() and np.isfinite(small[2:, :]).all()
    np.testing.assert_allclose(small[2:], want[2:], rtol=1e-3)


@pytest.mark.parametrize("runs", [False, True], ids=["shuffled", "in-runs"])
def test_group_medians_equal_numpy_median_per_group(runs):
    rng = np.random.default_rng(5)
    group = rng.integers(0, 7, 500)  # group 6 may be empty after masking, group 7 never occurs
    if runs:  # a batch file's rows: frame after frame (the path without the sort)
        group = np.sort(group)
    values = rng.normal(size=500)
    values[rng.integers(0, 500, 3)] = np.nan
    mask = rng.random(500) < 0.8
    mask[group == 6] = False
    got = dg.group_medians(group, values, 8, mask)
    for g in range(8):
        sel = values[mask & (group == g)]
        want = np.median(sel) if sel.size else np.nan
        assert np.array_equal(got[g], want, equal_nan=True), (g, got[g], want)


def test_the_flow_s_night_summary_shows_every_reduced_camera_too(tmp_path, monkeypatch):
    """A review found the Prefect flow's own summary (``_publish_nights``) still drew the cameras its run
    reduced, not every reduced one of the night: after ``mascprocess D --night N --camera E`` through Prefect,
    ``<N>LP.png`` showed LPE alone. The flow draws the same members as ``mascara quicklook`` now."""
    import logging

    from flows import report
    from flows.reduce_night import _Night, _publish_nights
    from mascara import quicklook as ql

    published = []  # the artifacts need a flow run; what is asserted here is the figure
    monkeypatch.setattr(report, "publish_table", lambda *a, **k: published.append(a[0]))
    monkeypatch.setattr(report, "publish_markdown", lambda *a, **k: published.append(a[0]))

    datadir = tmp_path / "data"
    for name in (f"{NIGHT}LPE", f"{NIGHT}LPS"):
        _reduced_camera_night(datadir / name)
    ran = _Night(night_id=f"{NIGHT}LPE", night_path=str(datadir / f"{NIGHT}LPE"), nframes=50, batches={0: 50},
                 state="succeeded")
    _publish_nights(str(datadir), {ran.night_id: ran}, [], "{}", logging.getLogger("test"))
    assert _summary_cameras(ql.night_summary_path(datadir, NIGHT, "LP")) == ["LPE", "LPS"]
    assert len(published) == 2  # the night's table and its summary
