"""Quick-look figures of a camera-night and of a night across cameras (matplotlib, Agg, small PNGs).

Plain functions on files and arrays, no Prefect and no database: the inputs
are what a reduction leaves in ``work/`` as it goes (``diagnostics.hdf5``,
``quality/batch_*.json``, ``quality/binned_*.npy``, see
:mod:`mascara.diagnostics`), so the figures can be redrawn after every batch
and once more at the end of the night.  Per camera-night, in
``<night>/quicklook/``:

=====================  ===========================================================
``lightcurves.png``    normalised light curves of the diagnostic stars (frames, binned)
``sky.png``            sky level and transparency against time, low-transparency batches shaded
``astrometry.png``     astrometric residual and pointing drift per batch
``frames.png``         frames accepted and rejected per batch, by reason
``thumbnail.png``      the binned image of one batch (the middle one once it is reduced) with catalogue positions
=====================  ===========================================================

and per night and site, across cameras, ``<datadir>/quicklook/<night><site>.png`` (every reduced
camera-night of that night and site in the data directory, whichever a command just reduced).
Figures are 640 x 320 px or so, quantised to a 64-colour palette (10-40 kB);
every file is written under a temporary name and renamed.  Figures are drawn
with matplotlib's object interface on the Agg canvas, never through
``pyplot``'s global state, so threads (Prefect's task runner) may draw at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import matplotlib.ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mascara import diagnostics as dg
from mascara._files import atomic_path

#: File names of the per-camera-night figures, in the order they are shown.
FIGURES = ("lightcurves", "sky", "astrometry", "frames", "thumbnail")
DPI = 80
SIZE = (8.0, 3.4)  # inches: 640 x 272 px at DPI
QUICKLOOK_DIR = "quicklook"


# --------------------------------------------------------------------------- helpers


def ut_hours(jd: np.ndarray | Sequence[float]) -> np.ndarray:
    """Hours UT from 0h of the evening's date (an evening at 20h is 20, 2h next morning is 26)."""
    h = ((np.asarray(jd, float) + 0.5) % 1.0) * 24.0
    return np.where(h < 12.0, h + 24.0, h)


def _time_axis(ax) -> None:  # type: ignore[no-untyped-def]
    ax.set_xlabel("UT")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_hhmm))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(6))


def _hhmm(v: float, _pos: object = None) -> str:
    minutes = int(round((v % 24.0) * 60.0)) % (24 * 60)
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _figure(nrows: int = 1, ncols: int = 1, **kw):  # type: ignore[no-untyped-def]
    """A figure on its own Agg canvas and its axes (``Figure.subplots``), without pyplot."""
    fig = Figure(figsize=kw.pop("figsize", SIZE), layout=kw.pop("layout", "constrained"))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kw)


def _save(fig, out: Path, colours: int = 64,  # type: ignore[no-untyped-def]
          text: Mapping[str, str] | None = None) -> Path:
    """Write a figure as a palette PNG (``colours`` colours: a third of the RGBA size), atomically.

    ``text``: PNG text chunks to carry (e.g. the cameras a night summary shows), none by default.
    """
    import io

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png", metadata={"Software": None})
    img = Image.open(buf).convert("RGB").quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    with atomic_path(out, durable=False) as tmp:
        img.save(tmp, format="PNG", optimize=True, pnginfo=info)
    return out


def _empty(ax, text: str) -> None:  # type: ignore[no-untyped-def]
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _batch_times(qualities: Sequence[Mapping]) -> np.ndarray:
    """Mid time (UT h) of each batch from its frames (NaN for a batch without frames)."""
    out = []
    for q in qualities:
        jd = [f["jd"] for f in q["frames"] if f.get("jd") is not None]
        out.append(float(np.median(ut_hours(jd))) if jd else np.nan)
    return np.array(out)


def short_reason(reason: str) -> str:
    """A rejection reason without its details: ``truncated file (...)`` -> ``truncated file``."""
    r = re.sub(r"\s*\(.*$", "", str(reason)).strip()
    r = re.sub(r"\d+", "N", r)
    return r[:40] or "other"


# --------------------------------------------------------------------------- figures of a camera-night


def plot_lightcurves(diagnostics_file: str | os.PathLike[str], out: str | os.PathLike[str], title: str = "") -> Path:
    """Normalised flux (larger aperture / its median) of each diagnostic star against time, offset by star."""
    import h5py

    fig, ax = _figure(figsize=(SIZE[0], 4.2), layout="constrained")
    n = 0
    path = Path(diagnostics_file)
    if path.is_file():
        with h5py.File(path, "r") as f:
            ids = sorted(f["fast"], key=lambda s: float(f["header"][s]["vmag"][0]) if s in f["header"] else 0.0)
            for i, sid in enumerate(ids):
                fast = f["fast"][sid][()]
                slow = f["slow"][sid][()] if sid in f["slow"] else np.zeros(0, fast.dtype)
                good = (fast["flag"] == 0) & (fast["flux1"] > 0)
                if not good.any():
                    continue
                norm = np.median(fast["flux1"][good])
                vmag = float(f["header"][sid]["vmag"][0]) if sid in f["header"] else np.nan
                off = -0.5 * n
                line = ax.plot(ut_hours(fast["jdmid"][good]), fast["flux1"][good] / norm + off, ".", ms=1.5,
                               label=f"{sid} V={vmag:.1f}")[0]
                sgood = (slow["flag"] == 0) & (slow["flux1"] > 0) if len(slow) else np.zeros(0, bool)
                if sgood.any():
                    # the binned image's flux is per frame too (the stack is a mean): same normalisation
                    ax.plot(ut_hours(slow["jdmid"][sgood]), slow["flux1"][sgood] / norm + off, "o", ms=4,
                            mfc="none", color=line.get_color())
                n += 1
    if n:
        ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, markerscale=4)
        ax.set_ylabel("flux / median (offset 0.5 per star)")
    else:
        _empty(ax, "no diagnostic light curve yet")
    ax.set_title(f"{title} diagnostic stars: frames (dots), binned (circles)".strip(), fontsize=9)
    _time_axis(ax)
    return _save(fig, Path(out))


def plot_sky(qualities: Sequence[Mapping], out: str | os.PathLike[str], title: str = "") -> Path:
    """Median sky (ADU) and transparency of every frame against time; low-transparency batches shaded."""
    fig, (a1, a2) = _figure(2, 1, figsize=(SIZE[0], 4.0), sharex=True, layout="constrained")
    frames = [f for q in qualities for f in q["frames"] if f.get("jd") is not None]
    if frames:
        t = ut_hours([f["jd"] for f in frames])
        sky = np.array([np.nan if f["sky"] is None else f["sky"] for f in frames])
        tr = np.array([np.nan if f["transparency"] is None else f["transparency"] for f in frames])
        a1.plot(t, sky, ".", ms=2, color="C0")
        a2.plot(t, tr, ".", ms=2, color="C1")
        for q in qualities:
            if q.get("low_transparency"):
                tq = ut_hours([f["jd"] for f in q["frames"] if f.get("jd") is not None])
                if tq.size:
                    a2.axvspan(tq.min(), tq.max(), color="C3", alpha=0.15, lw=0)
    else:
        _empty(a2, "no frame reduced yet")
    a2.axhline(dg.LOW_TRANSPARENCY, color="C3", lw=0.8, ls="--")
    a1.set_ylabel("sky (ADU)")
    a2.set_ylabel("transparency")
    a2.set_ylim(0, 1.3)
    a1.set_title(f"{title} sky and transparency (red: below {dg.LOW_TRANSPARENCY})".strip(), fontsize=9)
    _time_axis(a2)
    return _save(fig, Path(out))


def plot_astrometry(qualities: Sequence[Mapping], out: str | os.PathLike[str], title: str = "") -> Path:
    """Astrometric residual (frame and binned image) and pointing drift of every batch."""
    fig, (a1, a2) = _figure(1, 2, figsize=SIZE, layout="constrained")
    t = _batch_times(qualities)
    rms = np.array([np.nan if q.get("astro_rms") is None else q["astro_rms"] for q in qualities])
    brms = np.array([np.nan if q.get("binned_astro_rms") is None else q["binned_astro_rms"] for q in qualities])
    flagged = np.array([not q.get("astro_ok", True) for q in qualities], bool)
    a1.plot(t, rms, "o-", ms=3, label="reference frame")
    a1.plot(t, brms, "s-", ms=3, label="binned image")
    if flagged.any():
        a1.plot(t[flagged], np.zeros(flagged.sum()), "x", color="C3", label="kept night solution")
    a1.set_ylabel("residual rms (px)")
    a1.legend(fontsize=7, frameon=False)
    drift = np.array([q["drift_px"] if q.get("drift_px") else [np.nan, np.nan] for q in qualities], float)
    if drift.size:
        a2.plot(t, drift[:, 0], "o-", ms=3, label="x")
        a2.plot(t, drift[:, 1], "o-", ms=3, label="y")
        a2.legend(fontsize=7, frameon=False)
    else:
        _empty(a2, "no batch yet")
    a2.set_ylabel("image centre drift (px)")
    for a in (a1, a2):
        _time_axis(a)
    fig.suptitle(f"{title} astrometry per batch".strip(), fontsize=9)
    return _save(fig, Path(out))


def plot_frames(qualities: Sequence[Mapping], out: str | os.PathLike[str], title: str = "") -> Path:
    """Frames accepted and rejected (by reason) per batch, stacked bars against time."""
    fig, ax = _figure(figsize=SIZE, layout="constrained")
    t = _batch_times(qualities)
    if np.isfinite(t).any():
        fill = np.nanmedian(t)
        t = np.where(np.isfinite(t), t, fill)
    width = 50 * 6.4 / 3600.0 * 0.8  # a batch is 50 frames of 6.4 s
    if np.isfinite(t).sum() > 1:  # partial batches are closer together than that
        width = min(width, 0.8 * float(np.min(np.diff(np.sort(t[np.isfinite(t)])))))
    accepted = np.array([q["nframes"] for q in qualities], float)
    reasons: dict[str, np.ndarray] = {}
    for i, q in enumerate(qualities):
        for r in q["rejected"]:
            key = short_reason(r[2] if len(r) > 2 else r[-1])
            reasons.setdefault(key, np.zeros(len(qualities)))[i] += 1
    if len(qualities):
        ax.bar(t, accepted, width=width, color="C2", label=f"accepted ({int(accepted.sum())})")
        bottom = accepted.copy()
        for k, (reason, counts) in enumerate(sorted(reasons.items(), key=lambda kv: -kv[1].sum())):
            ax.bar(t, counts, width=width, bottom=bottom, color=f"C{(k + 3) % 10}",
                   label=f"{reason} ({int(counts.sum())})")
            bottom += counts
        ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    else:
        _empty(ax, "no batch yet")
    ax.set_ylabel("frames per batch")
    ax.set_title(f"{title} frames accepted / rejected".strip(), fontsize=9)
    _time_axis(ax)
    return _save(fig, Path(out))


def plot_thumbnail(preview: np.ndarray, stars_xy: Sequence[Sequence[float]], out: str | os.PathLike[str],
                   factor: int = 4, title: str = "") -> Path:
    """A binned image (``factor``-times reduced) with catalogue positions (circles, brighter larger)."""
    img = np.asarray(preview, np.float32)
    fig, ax = _figure(figsize=(6.0, 6.0 * img.shape[0] / max(img.shape[1], 1) + 0.4), layout="constrained")
    finite = img[np.isfinite(img)]
    lo, hi = (np.percentile(finite, [5, 99.5]) if finite.size else (0.0, 1.0))
    ax.imshow(np.nan_to_num(img, nan=lo), cmap="gray", origin="lower", vmin=lo, vmax=hi, interpolation="nearest")
    if len(stars_xy):
        s = np.asarray(stars_xy, float)
        size = np.clip(2.0 * (9.0 - s[:, 2]), 2, 20) ** 2 / 4
        ax.scatter(s[:, 0] / factor, s[:, 1] / factor, s=size, facecolors="none", edgecolors="C1", lw=0.6)
    ax.set_xlim(-0.5, img.shape[1] - 0.5)
    ax.set_ylim(-0.5, img.shape[0] - 0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{title} binned image, {len(stars_xy)} brightest catalogue stars".strip(), fontsize=9)
    return _save(fig, Path(out))


def update_camera_night(night_path: str | os.PathLike[str]) -> dict[str, Path]:
    """Redraw the quick-look figures of a camera-night from what its ``work/`` holds now.

    Returns ``{name: png path}`` of the figures written (the thumbnail needs a
    binned preview, the other four are always drawn, empty while nothing is
    reduced).
    """
    night = Path(night_path)
    out = night / QUICKLOOK_DIR
    title = night.name
    q = dg.read_qualities(night)
    figs = {
        "lightcurves": plot_lightcurves(night / "work" / "diagnostics.hdf5", out / "lightcurves.png", title),
        "sky": plot_sky(q, out / "sky.png", title),
        "astrometry": plot_astrometry(q, out / "astrometry.png", title),
        "frames": plot_frames(q, out / "frames.png", title),
    }
    with_preview = [x for x in q if dg.preview_path(night, x["batch"]).is_file()]
    if with_preview:
        mid = with_preview[len(with_preview) // 2]  # the middle batch: the night's typical sky
        img = np.load(dg.preview_path(night, mid["batch"]))
        factor = (mid.get("image_nx") or 4 * img.shape[1]) // max(img.shape[1], 1)  # the preview's reduction
        figs["thumbnail"] = plot_thumbnail(img, mid["stars_xy"], out / "thumbnail.png", factor=factor,
                                           title=f"{title} batch {mid['batch']}")
    return figs


# --------------------------------------------------------------------------- a night across cameras


#: PNG text chunk of a night summary figure naming the cameras it shows, space-separated (``LPE LPS``).
SUMMARY_CAMERAS_KEY = "Cameras"


def _summary_qualities(night_path: str | os.PathLike[str]) -> list[dict]:
    """The batch quality records of a camera-night the summary figure can use: [] when nothing is reduced,
    ``work/`` cannot be read, or no record has a list of frames."""
    try:
        q = dg.read_qualities(night_path)
    except OSError:
        return []
    return [x for x in q if isinstance(x, dict) and isinstance(x.get("frames"), list)]


def _summary_series(q: Sequence[Mapping]) -> tuple[np.ndarray, list, list, np.ndarray, list]:
    """Frame times, transparency and sky, batch times and astrometric rms of a camera-night's records."""
    frames = [f for x in q for f in x["frames"] if isinstance(f, Mapping) and f.get("jd") is not None]
    t = ut_hours([f["jd"] for f in frames])
    tr = [np.nan if f.get("transparency") is None else float(f["transparency"]) for f in frames]
    sky = [np.nan if f.get("sky") is None else float(f["sky"]) for f in frames]
    bt = _batch_times([{"frames": [f for f in x["frames"] if isinstance(f, Mapping)]} for x in q])
    rms = [np.nan if x.get("astro_rms") is None else float(x["astro_rms"]) for x in q]
    return t, tr, sky, bt, rms


def plot_night_summary(nights: Mapping[str, str | os.PathLike[str]], out: str | os.PathLike[str],
                       title: str = "") -> Path:
    """Transparency, sky and astrometric residual against time for every camera of a night (one colour each).

    ``nights`` maps a label (e.g. the camera id ``LPE``) to its night directory.  A camera-night with nothing
    to show (nothing reduced, ``work/`` unreadable, records that cannot be plotted) is left out, logged; the
    labels drawn are written in the PNG's ``Cameras`` text chunk (:data:`SUMMARY_CAMERAS_KEY`).
    """
    series = {}
    for label, path in sorted(nights.items()):
        q = _summary_qualities(path)
        if not q:
            continue
        try:
            series[label] = _summary_series(q)
        except (KeyError, TypeError, ValueError) as exc:
            logging.getLogger(__name__).warning("%s left out of the summary figure %s: %s: %s",
                                                label, out, type(exc).__name__, exc)
    fig, axes = _figure(1, 3, figsize=(SIZE[0] * 1.25, 3.0), layout="constrained")
    for k, (label, (t, tr, sky, bt, rms)) in enumerate(series.items()):
        colour = f"C{k % 10}"
        if len(t):
            axes[0].plot(t, tr, ".", ms=1.5, color=colour, label=label)
            axes[1].plot(t, sky, ".", ms=1.5, color=colour)
        axes[2].plot(bt, rms, "o-", ms=3, color=colour)
    axes[0].axhline(dg.LOW_TRANSPARENCY, color="C3", lw=0.8, ls="--")
    axes[0].set_ylim(0, 1.3)
    axes[0].set_ylabel("transparency")
    axes[1].set_ylabel("sky (ADU)")
    axes[2].set_ylabel("astrometric rms (px)")
    if series:
        axes[0].legend(fontsize=7, frameon=False, markerscale=5)
    for a in axes:
        _time_axis(a)
    fig.suptitle(f"{title} all cameras".strip(), fontsize=9)
    return _save(fig, Path(out), text={SUMMARY_CAMERAS_KEY: " ".join(series)})


def night_summary_path(datadir: str | os.PathLike[str], night: str, site: str) -> Path:
    """Where the summary figure of a night and site goes: ``<datadir>/quicklook/<night><site>.png``."""
    return Path(datadir) / QUICKLOOK_DIR / f"{night}{site}.png"


def night_summary_members(datadir: str | os.PathLike[str], night: str, site: str,
                          night_paths: Sequence[str | os.PathLike[str]] = ()) -> dict[str, Path]:
    """``{camera id: night directory}`` the summary figure of ``night`` and ``site`` shows: every reduced
    camera-night ``<night><site><cam>`` in ``datadir`` and among ``night_paths``, whichever were just reduced.

    Reduced means ``work/quality/`` holds a batch record the figure can read; any other is left out.
    """
    from mascara.selection import NIGHT_DIR_RE

    found: dict[str, Path] = {}
    try:
        entries = sorted(Path(datadir).iterdir())
    except OSError as exc:
        logging.getLogger(__name__).warning("camera-nights of %s %s not listed in %s: %s", night, site, datadir, exc)
        entries = []
    for p in entries:
        m = NIGHT_DIR_RE.match(p.name)
        if m and m["night"] == night and m["site"] == site and p.is_dir():
            found[p.name[8:]] = p
    for p in map(Path, night_paths):  # those passed, wherever they are (a name as the callers make it)
        if p.name[:8] == night and p.name[8:10] == site:
            found[p.name[8:]] = p
    return {label: p for label, p in sorted(found.items()) if _summary_qualities(p)}


def update_night_summaries(datadir: str | os.PathLike[str], night_paths: Sequence[str | os.PathLike[str]],
                           logger: Any = None) -> list[Path]:
    """The summary figure across cameras of every night and site among ``night_paths``.

    Each figure shows every reduced camera-night of its night and site in ``datadir``
    (:func:`night_summary_members`), not only those in ``night_paths``: a command that reduced or redrew one
    camera leaves the figure of all of them.  A night and site with no reduced camera-night gets none.
    A figure that cannot be drawn is logged (on ``logger``: a Prefect run logger in the flows) and
    skipped: a figure never fails a reduction.
    """
    paths = [Path(p) for p in night_paths]
    groups: dict[tuple[str, str], dict[str, Path]] = {}
    for night, site in sorted({(p.name[:8], p.name[8:10]) for p in paths}):
        members = night_summary_members(datadir, night, site, paths)
        if members:
            groups[(night, site)] = members
    out = []
    for (night, site), members in sorted(groups.items()):
        try:
            out.append(plot_night_summary(members, night_summary_path(datadir, night, site), f"{night} {site}"))
        except Exception as exc:  # noqa: BLE001
            (logger or logging.getLogger(__name__)).warning("summary figure of %s %s not drawn: %s", night, site,
                                                              exc)
    return out


def cli_quicklook(args: argparse.Namespace) -> int:
    """``mascara quicklook``: redraw the quick-look figures of reduced camera-nights from their ``work/``.

    For a night whose figures are missing or stale: a reduction stopped
    while it drew them (its run is then failed and resumes), a drawing that failed
    (logged, never a failed reduction), or figures deleted by hand. Reads only
    ``work/``; writes only ``<night>/quicklook/`` and ``<datadir>/quicklook/``.
    Exit 0 when every selected camera-night was drawn, 1 when one has nothing
    reduced to draw or failed, 2 for a mistake in the request.
    """
    from mascara.selection import SelectionError, select_nights

    try:
        sel = select_nights(args.datadir, args.night or "all", args.camera, args.site,
                            check_catalog=False)  # reads work/ only, never the catalog
    except SelectionError as exc:
        print(f"mascara quicklook: {exc}", file=sys.stderr)
        return 2
    for missing in sel.not_found:
        print(f"mascara quicklook: no night directory {missing} in {sel.datadir}", file=sys.stderr)
    bad = 0
    drawn = []
    for night in sel.night_dirs:
        if not dg.read_qualities(night):
            print(f"{night.name}: nothing to draw (no reduced batch in {night / 'work'})", file=sys.stderr)
            bad += 1
            continue
        try:
            figs = update_camera_night(night)
        except Exception as exc:  # noqa: BLE001 - named, and the other nights are still drawn
            print(f"{night.name}: figures not drawn: {type(exc).__name__}: {exc}", file=sys.stderr)
            bad += 1
            continue
        drawn.append(night)
        print(f"{night.name}: {', '.join(sorted(figs))} in {night / QUICKLOOK_DIR}")
    for path in update_night_summaries(sel.datadir, drawn):
        print(f"night summary: {path}")
    return 1 if bad or sel.not_found else 0
