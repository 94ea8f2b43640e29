"""How a camera-night is going: diagnostic stars, transparency and sky per frame, batch quality.

Plain functions on arrays and files (no Prefect, no database).  Three things:

- :func:`choose_diagnostic_stars` picks, per camera-night, a few bright,
  unsaturated, isolated stars that stay on this camera's frame for most of the
  night (the night's camera model over the night's lstseq span, peaks measured
  on the frame the camera solution was found on); :func:`diagnostic_stars`
  caches the choice in ``work/diagnostic_stars.json`` so that every batch and
  every process uses the same stars.  Their light curves are kept in
  ``work/diagnostics.hdf5`` by :class:`mascara.lightcurves.StarSplitter`.
- :func:`frame_quality` gives per frame the median sky and the transparency:
  the median over bright unflagged stars of measured flux (the larger
  aperture) divided by the flux expected from V, the nominal zero point and
  the extinction at the star's airmass.  1 is a clear sky; a passing cloud
  lowers it.
- :func:`batch_quality` collects, from a batch file, what the quick-look
  figures and the catalog need: per-frame sky and transparency, accepted and
  rejected frames with reasons, astrometric residual, pointing drift against
  the night's solution and the brightest stars' positions on the binned image.
  It is written beside the batch as ``work/quality/batch_<b>.json`` (a few kB)
  so that figures are redrawn without rereading batch files.

The zero point (:data:`ZEROPOINT`) is that of the simulated cameras: V of a
star giving 1 ADU per 6.4 s exposure above the atmosphere.  For a real
station, measure it on a clear night and pass it in; transparencies are then
relative to that night.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mascara._files import atomic_path, save_npy
from mascara.lcformat import ASCC_DTYPE
from mascara.stars import find_ids, id_integers

#: V of a star giving 1 ADU per exposure above the atmosphere (simulated cameras).
ZEROPOINT = 18.0
#: Atmospheric extinction, mag per airmass.
EXTINCTION = 0.12
#: A frame or batch whose transparency is below this is marked low (clouds).
LOW_TRANSPARENCY = 0.7
#: Stars used for the transparency: bright enough for a good ratio, faint enough not to saturate.
TRANSPARENCY_VMAG = (4.5, 7.5)
#: Diagnostic stars: V range, how many, share of the night on the frame, distance from the edge (px).
DIAGNOSTIC_VMAG = (4.0, 7.0)
DIAGNOSTIC_COUNT = 10
DIAGNOSTIC_MIN_FRACTION = 0.8
DIAGNOSTIC_EDGE_PX = 25.0
#: Peak (raw ADU) above this share of the saturation level: not a diagnostic star.
DIAGNOSTIC_MAX_PEAK = 0.6

STARS_FILE = "diagnostic_stars.json"
QUALITY_DIR = "quality"
PREVIEW_DIR = "quality"


# --------------------------------------------------------------------------- diagnostic stars


def fraction_on_frame(x: np.ndarray, y: np.ndarray, nx: int, ny: int, edge: float = DIAGNOSTIC_EDGE_PX) -> np.ndarray:
    """Share of the sampled times each star is on the frame, ``edge`` px inside its border.

    ``x, y`` have shape (ntimes, nstars); NaN (behind the camera) counts as off.
    """
    on = np.isfinite(x) & np.isfinite(y) & (x >= edge) & (x <= nx - 1 - edge) & (y >= edge) & (y <= ny - 1 - edge)
    return on.mean(axis=0) if on.size else np.zeros(x.shape[1] if x.ndim == 2 else 0)


def pick_diagnostic(vmag: np.ndarray, fraction: np.ndarray, isolated: np.ndarray, peak_ok: np.ndarray,
                    n: int = DIAGNOSTIC_COUNT, vmag_range: tuple[float, float] = DIAGNOSTIC_VMAG,
                    min_fraction: float = DIAGNOSTIC_MIN_FRACTION) -> np.ndarray:
    """Indices of up to ``n`` diagnostic stars among candidates, spread over the V range.

    Candidates are in ``vmag_range``, isolated, unsaturated (``peak_ok``) and on
    the frame at least ``min_fraction`` of the night, or, on a camera no star
    stays on that long (the east and west cameras over a whole night: stars
    cross their field in a few hours), at least 80 % of the best candidate's
    share; if fewer than ``n`` are, the best-covered of the rest fill the list.
    """
    base = (vmag > vmag_range[0]) & (vmag <= vmag_range[1]) & isolated & peak_ok & (fraction > 0)
    need = min(min_fraction, 0.8 * float(fraction[base].max())) if base.any() else min_fraction
    good = np.flatnonzero(base & (fraction >= need))
    if good.size < n:
        rest = np.flatnonzero(base & (fraction < need))
        rest = rest[np.argsort(-fraction[rest], kind="stable")][: n - good.size]
        good = np.concatenate([good, rest])
    good = good[np.argsort(vmag[good], kind="stable")]
    if good.size > n:  # evenly spread from the brightest to the faintest
        good = good[np.unique(np.round(np.linspace(0, good.size - 1, n)).astype(int))]
    return good


def choose_diagnostic_stars(plan: Any, ctx: Any, n: int = DIAGNOSTIC_COUNT, samples: int = 16) -> list[dict]:
    """Diagnostic stars of a camera-night: ``[{"ascc", "vmag", "fraction_on", "peak"}]``, brightest first.

    Positions come from the night's camera model at ``samples`` times spread
    over the night's lstseq span (for a live night, its whole dark time; stars that come near the Moon are left out);
    peaks are measured on the frame the camera
    solution was found on (a star not on that frame is not chosen, its
    saturation being unknown).
    """
    from mascara.photometry import measure_apertures
    from mascara.rawio import calibrate, read_frame
    from mascara.reduce import isolated_stars, load_stars, moon_mask
    from mascara.sky import ApparentPlaces
    from mascara.timeindex import get_site, jd_start_of

    s = plan.settings
    stars = load_stars(s)
    model = ctx.camera_model()
    site = get_site(ctx.site)
    seqs = [f.lstseq for f in plan.frames]
    if getattr(plan, "live", False):  # a night still being observed: its whole dark time, not the frames so far
        from mascara.timeindex import night_lstseqs

        seqs = [int(x) for x in night_lstseqs(plan.night.night, site)] or seqs
    if not seqs:
        return []
    lo, hi = min(seqs), max(seqs)
    times = np.asarray(jd_start_of(np.unique(np.linspace(lo, hi, samples).round().astype(np.int64))), float)
    bright = np.flatnonzero(stars.vmag <= DIAGNOSTIC_VMAG[1])
    places = ApparentPlaces(stars.ra[bright], stars.dec[bright], site, float(times[len(times) // 2]))
    xs, ys = [], []
    moon = np.zeros(bright.size, bool)  # near the Moon at some time of the night: flagged, not diagnostic
    for jd in times:
        alt, az = places.altaz(float(jd))
        moon |= moon_mask(alt, az, site, float(jd), s.moon_radius)
        x, y = model.to_pixels(alt, az)
        xs.append(np.where(alt > 5.0, x, np.nan))
        ys.append(y)
    fraction = fraction_on_frame(np.array(xs), np.array(ys), model.nx, model.ny)

    # peaks on the solution frame
    peak = np.full(bright.size, np.nan)
    info = ctx.solution_info or {}
    path = plan.night.raw / str(info.get("file", ""))
    if info.get("file") and path.is_file():
        frame = read_frame(path, ctx.raw_shape)
        image, raw = calibrate(frame, ctx.master())
        jd = float(frame.header["JD"])
        alt, az = places.altaz(jd)
        x, y = model.to_pixels(alt, az)
        on = np.flatnonzero(np.isfinite(x) & (x >= DIAGNOSTIC_EDGE_PX) & (x <= model.nx - 1 - DIAGNOSTIC_EDGE_PX)
                            & (y >= DIAGNOSTIC_EDGE_PX) & (y <= model.ny - 1 - DIAGNOSTIC_EDGE_PX) & (alt > 5))
        if on.size:
            ph = measure_apertures(image, x[on], y[on], s.apertures, s.sky_radii, s.gain, raw=raw,
                                   saturation=s.saturation)
            peak[on] = np.where(ph["flag"] == 0, ph["peak"], np.nan)
    peak_ok = np.isfinite(peak) & (peak < DIAGNOSTIC_MAX_PEAK * s.saturation) & ~moon
    iso = isolated_stars(s, model.scale)[bright]
    idx = pick_diagnostic(stars.vmag[bright], fraction, iso, peak_ok, n=n)
    return [{"ascc": str(stars.ascc[bright[i]]), "vmag": round(float(stars.vmag[bright[i]]), 3),
             "fraction_on": round(float(fraction[i]), 3), "peak": round(float(peak[i]), 1)} for i in idx]


def diagnostic_stars(plan: Any, ctx: Any) -> list[str]:
    """Ids of the night's diagnostic stars, chosen once and kept in ``work/diagnostic_stars.json``.

    The file is tied to the settings and the camera solution: a new reduction
    (its outputs moved aside) chooses again.
    """
    path = plan.workdir / STARS_FILE
    key = {"settings_hash": plan.settings.fingerprint(), "model": ctx.model}
    if path.is_file():
        try:
            d = json.loads(path.read_text())
            if d.get("key") == json.loads(json.dumps(key)):
                return [s["ascc"] for s in d["stars"]]
        except (OSError, ValueError, KeyError):
            pass
    chosen = choose_diagnostic_stars(plan, ctx)
    _write_json(path, {"key": key, "stars": chosen})
    return [s["ascc"] for s in chosen]


# --------------------------------------------------------------------------- transparency and sky


def expected_flux(vmag: np.ndarray, alt: np.ndarray, zeropoint: float = ZEROPOINT,
                  extinction: float = EXTINCTION) -> np.ndarray:
    """Flux (ADU per exposure) of stars of magnitude ``vmag`` at altitude ``alt`` (deg) under a clear sky."""
    airmass = 1.0 / np.sin(np.radians(np.clip(alt, 3.0, 90.0)))
    return 10.0 ** (-0.4 * (np.asarray(vmag, float) - zeropoint + extinction * airmass))


def frame_quality(fast: np.ndarray, vmag: np.ndarray, zeropoint: float = ZEROPOINT,
                  extinction: float = EXTINCTION,
                  vmag_range: tuple[float, float] = TRANSPARENCY_VMAG) -> dict[str, np.ndarray]:
    """Per frame: lstseq, jd, median sky (ADU), transparency and the number of stars it is the median of.

    Parameters
    ----------
    fast : rows of a batch file's ``fast`` table (``flag``, ``flux1``, ``sky``, ``alt``, ``jdmid``, ``lstseq``).
    vmag : V of the star of each row (same length).

    Frames without a usable star get NaN transparency and ``nstars`` 0.
    """
    seqs, inv = _frames_of(np.asarray(fast["lstseq"]))
    out = {"lstseq": seqs.astype(np.int64), "jd": np.full(seqs.size, np.nan), "sky": np.full(seqs.size, np.nan),
           "transparency": np.full(seqs.size, np.nan), "nstars": np.zeros(seqs.size, np.int64)}
    if not seqs.size:
        return out
    use = (fast["flag"] == 0) & (vmag > vmag_range[0]) & (vmag <= vmag_range[1]) & (fast["flux1"] > 0)
    ratio = fast["flux1"] / expected_flux(vmag, fast["alt"], zeropoint, extinction)
    out["jd"] = group_medians(inv, np.asarray(fast["jdmid"], float), seqs.size)
    out["sky"] = group_medians(inv, np.asarray(fast["sky"], float), seqs.size, fast["flag"] == 0)
    out["transparency"] = group_medians(inv, ratio, seqs.size, use)
    out["nstars"] = np.bincount(inv[use], minlength=seqs.size).astype(np.int64)
    return out


def _frames_of(lstseq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(lstseq, return_inverse=True)``, without its sort when the rows come frame by frame."""
    if lstseq.size and np.all(lstseq[1:] >= lstseq[:-1]):
        first = np.empty(lstseq.size, dtype=bool)
        first[0] = True
        np.not_equal(lstseq[1:], lstseq[:-1], out=first[1:])
        return lstseq[first], np.cumsum(first) - 1
    return np.unique(lstseq, return_inverse=True)


def group_medians(group: np.ndarray, values: np.ndarray, ngroups: int, mask: np.ndarray | None = None) -> np.ndarray:
    """``np.median(values[mask & (group == g)])`` for every ``g < ngroups``, in one sort; NaN for empty groups.

    As ``np.median``: the mean of the two middle values of an even count,
    and NaN for a group holding a NaN. (A loop of masks over a batch's
    320,000 rows took 1.3 s per batch.)
    """
    group = np.asarray(group)
    values = np.asarray(values, float)
    if mask is not None:
        group, values = group[mask], values[mask]
    out = np.full(ngroups, np.nan)
    if not values.size:
        return out
    if np.all(group[1:] >= group[:-1]):
        # A batch's rows come frame by frame: each group is one run, whose median one partition gives
        # (a batch quality's three medians took 63 ms through the sort below, 50 frames x 6,400 stars)
        counts = np.bincount(group, minlength=ngroups)
        ends = np.cumsum(counts)
        for g in np.flatnonzero(counts):
            out[g] = np.median(values[ends[g] - counts[g]:ends[g]])
        return out
    order = np.lexsort((values, group))  # by group, then value; NaN last within its group
    g, v = group[order], values[order]
    counts = np.bincount(g, minlength=ngroups)
    start = np.cumsum(counts) - counts
    has = counts > 0
    lo = start[has] + (counts[has] - 1) // 2
    hi = start[has] + counts[has] // 2
    med = 0.5 * (v[lo] + v[hi])
    last = v[start[has] + counts[has] - 1]
    out[has] = np.where(np.isnan(last), np.nan, med)
    return out


# --------------------------------------------------------------------------- a batch at a glance


def pointing_drift(night_model: Any, batch_model: Any) -> tuple[float, float]:
    """Shift (px) of the image centre between the night's camera solution and a batch's."""
    cx, cy = (night_model.nx - 1) / 2.0, (night_model.ny - 1) / 2.0
    alt, az = night_model.to_altaz(np.array([cx]), np.array([cy]))
    x, y = batch_model.to_pixels(alt, az)
    return float(x[0] - cx), float(y[0] - cy)


def _vmag_of(stars: np.ndarray, ascc: np.ndarray) -> np.ndarray:
    """V of each id in ``ascc`` from the batch file's star table; NaN for an id it lacks."""
    at = find_ids(np.asarray(stars["ascc"]).astype(ASCC_DTYPE), np.asarray(ascc).astype(ASCC_DTYPE))
    out = np.full(len(ascc), np.nan)
    hit = at >= 0
    out[hit] = np.asarray(stars["vmag"], float)[at[hit]]
    return out


def _count_ids(ids: np.ndarray) -> int:
    """Number of distinct ids (as integers when they fit, :func:`mascara.stars.id_integers`)."""
    as_int = id_integers(ids)
    return int(np.unique(ids if as_int is None else as_int).size)


def batch_quality(batch_path: str | os.PathLike[str], night_model: dict | None = None,
                  zeropoint: float = ZEROPOINT, extinction: float = EXTINCTION, nstars_overlay: int = 400) -> dict:
    """What a batch file says about the sky and the camera (JSON-able), for the figures and the catalog.

    Keys: ``batch``, ``lstseq_min/max``, ``frames`` (per accepted frame: lstseq,
    jd, sky, transparency, nstars), ``rejected`` (``[lstseq, file, reason]``),
    ``transparency`` (median of the frames), ``low_transparency``, ``sky``,
    ``astro_ok``, ``astro_rms``, ``binned_astro_rms``, ``drift_px`` (x, y;
    None without a night model), ``stars_xy`` (x, y, V of the brightest stars
    on the binned image), ``nstars_fast``, ``nstars_slow``.
    """
    from mascara.camera import CameraModel
    from mascara.lightcurves import read_batch_file

    pieces = read_batch_file(batch_path)
    a = pieces.attrs
    fast = pieces.fast
    vmag = _vmag_of(pieces.stars, fast["ascc"])
    fq = frame_quality(fast, vmag, zeropoint, extinction)
    finite = fq["transparency"][np.isfinite(fq["transparency"])]
    transparency = float(np.median(finite)) if finite.size else None
    drift = None
    if night_model is not None and a.get("camera_model"):
        drift = pointing_drift(CameraModel.from_dict(night_model), CameraModel.from_dict(a["camera_model"]))
    slow = pieces.slow
    overlay: list[list[float]] = []
    if len(slow):
        sv = _vmag_of(pieces.stars, slow["ascc"])
        order = np.argsort(sv, kind="stable")[:nstars_overlay]
        overlay = [[round(float(slow["x"][i]), 1), round(float(slow["y"][i]), 1), round(float(sv[i]), 2)]
                   for i in order]
    rejected = a.get("rejected", [])
    if isinstance(rejected, str):
        rejected = json.loads(rejected)

    def num(v: Any) -> float | None:
        return None if v is None or not np.isfinite(v) else round(float(v), 5)

    return {
        "batch": int(a["batch"]), "lstseq_min": int(a["lstseq_min"]), "lstseq_max": int(a["lstseq_max"]),
        "frames": [{"lstseq": int(fq["lstseq"][i]), "jd": num(fq["jd"][i]), "sky": num(fq["sky"][i]),
                    "transparency": num(fq["transparency"][i]), "nstars": int(fq["nstars"][i])}
                   for i in range(fq["lstseq"].size)],
        "nframes": int(a["nframes"]), "frames_present": int(a.get("frames_present", 0)),
        "rejected": [list(r) for r in rejected],
        "transparency": num(transparency),
        "low_transparency": transparency is not None and transparency < LOW_TRANSPARENCY,
        "sky": num(np.nanmedian(fq["sky"])) if np.isfinite(fq["sky"]).any() else None,
        "astro_ok": bool(a["astro_ok"]), "astro_rms": num(a.get("astro_rms")),
        "binned_astro_rms": num(a.get("binned_astro_rms")),
        "drift_px": None if drift is None else [round(drift[0], 3), round(drift[1], 3)],
        "stars_xy": overlay,
        "nstars_fast": _count_ids(fast["ascc"]), "nstars_slow": int(len(slow)),
        "image_nx": int(a["camera_model"]["nx"]) if a.get("camera_model") else None,
    }


def quality_path(night_path: str | os.PathLike[str], batch: int) -> Path:
    return Path(night_path) / "work" / QUALITY_DIR / f"batch_{int(batch):07d}.json"


def night_batch_quality(night_path: str | os.PathLike[str], batch_path: str | os.PathLike[str],
                        night_model: dict | None = None) -> dict:
    """:func:`batch_quality` of a batch file of a night, its drift against the night's camera solution."""
    if night_model is None:  # the night's camera solution (mascara.reduce.SOLUTION_FILE)
        sol = Path(night_path) / "astrometry" / "camera_solution.json"
        try:
            night_model = json.loads(sol.read_text())["model"]
        except (OSError, ValueError, KeyError):
            night_model = None
    return batch_quality(batch_path, night_model)


def save_batch_quality(night_path: str | os.PathLike[str], q: dict) -> Path:
    """Write a batch's quality summary to ``work/quality/batch_<b>.json`` (atomic); its path."""
    path = quality_path(night_path, q["batch"])
    _write_json(path, q)
    return path


def write_batch_quality(night_path: str | os.PathLike[str], batch_path: str | os.PathLike[str],
                        night_model: dict | None = None) -> dict:
    """:func:`night_batch_quality` of a batch file, written to ``work/quality/batch_<b>.json``; returned."""
    q = night_batch_quality(night_path, batch_path, night_model)
    save_batch_quality(night_path, q)
    return q


def read_qualities(night_path: str | os.PathLike[str]) -> list[dict]:
    """Every ``work/quality/batch_*.json`` of a night, in batch order (unreadable ones skipped)."""
    out = []
    for p in sorted((Path(night_path) / "work" / QUALITY_DIR).glob("batch_*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return out


def preview_path(night_path: str | os.PathLike[str], batch: int) -> Path:
    return Path(night_path) / "work" / PREVIEW_DIR / f"binned_{int(batch):07d}.npy"


def preview_batches(batches: Sequence[int]) -> set[int]:
    """Batches whose binned image is kept small for the thumbnail: the first and the middle one of the night."""
    b = sorted(batches)
    return {b[0], b[len(b) // 2]} if b else set()


def keep_binned_preview(plan: Any, batch: int, binned: np.ndarray) -> Path | None:
    """:func:`save_binned_preview` for the batches of :func:`preview_batches` (a few 100 kB per night), else None."""
    if batch not in preview_batches(list(plan.batches)):
        return None
    factor = max(4, int(np.ceil(binned.shape[1] / 600)))
    return save_binned_preview(plan.night.path, batch, binned, factor)


def save_binned_preview(night_path: str | os.PathLike[str], batch: int, binned: np.ndarray,
                        factor: int = 4) -> Path:
    """A ``factor``-times smaller float16 copy of a batch's binned image (mean of blocks, NaN kept)."""
    ny, nx = (binned.shape[0] // factor) * factor, (binned.shape[1] // factor) * factor
    blocks = np.asarray(binned[:ny, :nx], np.float32).reshape(ny // factor, factor, nx // factor, factor)
    # the mean of each block's finite pixels; an all-NaN block stays NaN. Not np.nanmean under
    # warnings.catch_warnings: that state is process-wide and batches run in threads (see rawio).
    finite = np.isfinite(blocks)
    count = finite.sum(axis=(1, 3))
    total = np.where(finite, blocks, np.float32(0)).sum(axis=(1, 3), dtype=np.float64)
    small = np.divide(total, count, out=np.full(count.shape, np.nan), where=count > 0).astype(np.float16)
    path = preview_path(night_path, batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, durable=False) as tmp, open(tmp, "wb") as f:
        save_npy(f, small, allow_pickle=False)
    return path


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, durable=False) as tmp, open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1))


def summarise(qualities: Sequence[dict]) -> dict:
    """Night-level numbers from batch qualities: median transparency, batches with low transparency."""
    t = [q["transparency"] for q in qualities if q.get("transparency") is not None]
    return {"transparency_median": round(float(np.median(t)), 3) if t else None,
            "batches_low_transparency": [q["batch"] for q in qualities if q.get("low_transparency")]}
