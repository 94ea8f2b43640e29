"""Accuracy of a reduction against the simulator's truth.

Simulates a camera-night (clouds, pointing drift, a camera off nominal, broken
frames), reduces it with the library driver and prints the figures of the
reduction issue's acceptance: position rms of unflagged stars, the spread of
(flux - true flux) / eflux per aperture, and how much the binned photometry
beats the per-frame scatter.

The ``binned`` section (issue 11) reports, for every binned aperture and the
isolated, unflagged V 6-8.4 stars of full batches: binned flux / mean true
flux of the frames in the batch (overall, per batch and its batch-to-batch
spread), the noise gain (per-frame relative scatter / binned relative
scatter, pooled per V range) against sqrt(N), and the robust std of the binned
pulls (binned flux - mean true flux) / eflux, and the same pulls about each star's own
mean binned / true ratio (its offset from the truth set aside).

    python bench/accuracy.py --size small --frames 300
    python bench/accuracy.py --size full --frames 300 --psf moffat --out /tmp/acc-full

``--out`` keeps the simulated night; a second run with the same ``--out``
and simulation options re-reduces it without simulating again (``--reuse``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from mascara.rawio import parse_night_dir
from mascara.reduce import move_outputs_aside, reduce_camera_night
from mascara.settings import Settings
from mascara.simulate import SimConfig, join_with_truth, load_truth, simulate_night, truth_table


def binned_gain(flc: str, slc: str, truth: dict, fast: str = "flux0", slow: str = "flux0",
                radius: str = "2.5") -> tuple[float, int]:
    """Median over constant V 5-7 stars of per-frame scatter / binned scatter, both relative to the truth.

    ``fast`` and ``slow`` name the fLC and sLC fields of the same aperture radius ``radius``.
    """
    t = truth["truth"]
    ids = truth["stars"]["ascc"][t["star"]]
    true_flux = {(a, int(s)): f for a, s, f in zip(ids, t["lstseq"], t[f"flux_{radius}"])}
    ratios = []
    with h5py.File(flc, "r") as f, h5py.File(slc, "r") as s:
        for star in s["data"]:
            if star not in f["data"]:
                continue
            fd, sd = f["data"][star][...], s["data"][star][...]
            if not (5.0 < f["header"][star]["vmag"][0] < 7.0) or np.any(fd["flag"] > 0) or np.any(sd["flag"] > 0):
                continue
            batches = fd["lstseq"] // 50
            whole = [b for b in np.unique(batches) if np.sum(batches == b) >= 45]
            tf = np.array([true_flux[(star, int(q))] for q in fd["lstseq"]])
            binned = [sd[slow][sd["lstseq"] // 50 == b][0] / tf[batches == b].mean()
                      for b in whole if np.sum(sd["lstseq"] // 50 == b) == 1]
            if len(binned) >= 3:
                ratios.append(np.std(fd[fast] / tf - 1.0) / np.std(binned))
    return (float(np.median(ratios)) if ratios else float("nan")), len(ratios)


#: Per-frame field of the same radius as a binned aperture (the fLC has two apertures).
FAST_FIELD = {2.5: "flux0", 4.5: "flux1"}
V_RANGES = ((6.0, 7.0), (7.0, 7.8), (7.8, 8.4))
#: A batch counts as full when the star has per-frame points in at least this many of its frames.
FULL_BATCH = 45


def _robust_std(z: np.ndarray) -> float:
    z = z[np.isfinite(z)]
    return float(1.4826 * np.median(np.abs(z - np.median(z)))) if z.size else float("nan")


def binned_report(flc: str, slc: str, truth: dict, radii: tuple[float, ...], gain: float,
                  batch_size: int = 50, sky_radii: tuple[float, float] = (6.0, 21.0)) -> dict:
    """Figures of the binned photometry against the truth, per binned aperture (see module notes).

    A star-batch counts when the star is isolated in the truth (no rendered
    star within 8 px) in every frame, V is in 6-8.4, the binned point and all
    per-frame points are unflagged, and the star has per-frame points in at
    least ``FULL_BATCH`` frames of the batch. The per-frame relative scatter
    is measured for the per-frame apertures (2.5, 4.5 px) and predicted from
    the per-frame error formula with the measured ``esky`` for every radius
    (the per-frame error bars are right, see ``std_z_flux*``), so apertures
    without a per-frame twin get a noise gain too.
    """
    t = truth["truth"]
    ids = truth["stars"]["ascc"]
    iso = truth_table(truth)["isolated"].to_numpy()
    key = t["star"].astype(np.int64) << 32 | t["lstseq"].astype(np.int64)
    order = np.argsort(key)
    skey = key[order]
    star_of = {a: i for i, a in enumerate(ids)}
    nsky = math.pi * (sky_radii[1] ** 2 - sky_radii[0] ** 2)
    rows = []  # one per star-batch
    fast_var = {r: [] for r in radii}  # per star: (vmag, measured or predicted per-frame relative variance)
    with h5py.File(flc, "r") as f, h5py.File(slc, "r") as s:
        for star in s["data"]:
            if star not in f["data"]:
                continue
            vmag = float(f["header"][star]["vmag"][0])
            if not 6.0 <= vmag <= 8.4:
                continue
            fd, sd = f["data"][star][...], s["data"][star][...]
            k = star_of[star]
            pos = np.searchsorted(skey, np.int64(k) << 32 | fd["lstseq"].astype(np.int64))
            pos = np.minimum(pos, len(skey) - 1)
            found = skey[pos] == (np.int64(k) << 32 | fd["lstseq"].astype(np.int64))
            tr = t[order[pos]]
            fiso = iso[order[pos]] & found
            fb = fd["lstseq"] // batch_size
            star_rows = []
            for point in sd:
                b = int(point["lstseq"]) // batch_size
                m = fb == b
                if m.sum() < FULL_BATCH or point["flag"] or np.any(fd["flag"][m]) or not np.all(fiso[m]):
                    continue
                row = {"star": star, "vmag": vmag, "batch": b, "nframes": int(m.sum())}
                for a, r in enumerate(radii):
                    true = float(tr[f"flux_{r:.1f}"][m].mean())
                    row[f"ratio{a}"] = point[f"flux{a}"] / true
                    row[f"pull{a}"] = (point[f"flux{a}"] - true) / point[f"eflux{a}"]
                    row[f"erel{a}"] = point[f"eflux{a}"] / true
                    fk = FAST_FIELD.get(r)
                    if fk is not None:  # against the measured per-frame flux: the photometry's own biases cancel
                        row[f"fratio{a}"] = point[f"flux{a}"] / float(fd[fk][m].mean())
                        row[f"ftrue{a}"] = float(np.mean(fd[fk][m] / tr[f"flux_{r:.1f}"][m]))
                star_rows.append(row)
            if len(star_rows) < 3:
                continue
            rows += star_rows
            good = (fd["flag"] == 0) & fiso
            for r in radii:
                area = math.pi * r * r
                ft = tr[f"flux_{r:.1f}"][good]
                esky = fd["esky"][good]
                pred = np.sqrt(area * esky**2 + ft / gain + esky**2 * area**2 / nsky) / ft
                meas = None
                fk = FAST_FIELD.get(r)
                if fk is not None:
                    meas = float(np.var(fd[fk][good] / ft - 1.0, ddof=1))
                fast_var[r].append((vmag, float(np.mean(pred**2)), meas))
    out = {"star_batches": len(rows), "stars": len({r["star"] for r in rows}),
           "batches": sorted({r["batch"] for r in rows})}
    if not rows:
        return out
    vm = np.array([r["vmag"] for r in rows])
    bt = np.array([r["batch"] for r in rows])
    st = np.array([r["star"] for r in rows])
    out["mean_frames"] = round(float(np.mean([r["nframes"] for r in rows])), 1)
    sqrt_n = math.sqrt(out["mean_frames"])
    for a, r in enumerate(radii):
        ratio = np.array([row[f"ratio{a}"] for row in rows])
        pull = np.array([row[f"pull{a}"] for row in rows])
        # pulls about each star's own mean (its offset from the truth, e.g. a sky biased by its
        # neighbours, set aside as for the per-frame pulls), scaled for the mean's degree of freedom
        erel = np.array([row[f"erel{a}"] for row in rows])
        pull_own = np.full(len(rows), np.nan)
        for s_ in np.unique(st):
            m_ = st == s_
            k_ = int(m_.sum())
            pull_own[m_] = (ratio[m_] - ratio[m_].mean()) / erel[m_] * math.sqrt(k_ / (k_ - 1))
        per_batch = [float(np.median(ratio[bt == b])) for b in out["batches"]]
        rep = {
            "ratio_median": round(float(np.median(ratio)), 5),
            "ratio_per_batch": [round(v, 5) for v in per_batch],
            "ratio_batch_std_pct": round(100 * float(np.std(per_batch, ddof=1)), 3) if len(per_batch) > 1 else None,
            "ratio_median_by_v": {},
            "pull_robust_std": round(_robust_std(pull), 3),
            "pull_median": round(float(np.median(pull)), 3),
            "pull_robust_std_by_v": {},
            "pull_own_mean_robust_std": round(_robust_std(pull_own), 3),
            "pull_own_mean_robust_std_by_v": {},
            "gain_by_v": {}, "gain_over_sqrt_n_by_v": {},
        }
        if f"fratio{a}" in rows[0]:
            fr = np.array([row[f"fratio{a}"] for row in rows])
            per_batch = [float(np.median(fr[bt == b])) for b in out["batches"]]
            rep["ratio_to_fast_median"] = round(float(np.median(fr)), 5)
            rep["ratio_to_fast_per_batch"] = [round(v, 5) for v in per_batch]
            rep["ratio_to_fast_batch_std_pct"] = (round(100 * float(np.std(per_batch, ddof=1)), 3)
                                                  if len(per_batch) > 1 else None)
        for lo, hi in V_RANGES:
            name = f"{lo}-{hi}"
            m = (vm >= lo) & (vm < hi) if hi < 8.4 else (vm >= lo) & (vm <= hi)
            if not m.any():
                continue
            rep["ratio_median_by_v"][name] = round(float(np.median(ratio[m])), 5)
            rep["pull_robust_std_by_v"][name] = round(_robust_std(pull[m]), 3)
            rep["pull_own_mean_robust_std_by_v"][name] = round(_robust_std(pull_own[m]), 3)
            # binned relative variance about each star's own mean (blends and crowding set aside), pooled
            bvar = [np.var(ratio[m & (st == s_)], ddof=1) for s_ in np.unique(st[m])]
            fv = [(p, q) for v_, p, q in fast_var[r] if (lo <= v_ < hi or (hi == 8.4 and v_ == hi))]
            fvar_pred = np.mean([p for p, _ in fv])
            g = math.sqrt(fvar_pred / np.mean(bvar))
            rep["gain_by_v"][name] = round(g, 2)
            rep["gain_over_sqrt_n_by_v"][name] = round(g / sqrt_n, 3)
            if f"ftrue{a}" in rows[0]:
                # each star's constant offset from the truth, binned and per frame (mean over its batches)
                stars_v = np.unique(st[m])
                ft = np.array([row[f"ftrue{a}"] for row in rows])
                ob = np.array([ratio[m & (st == s_)].mean() for s_ in stars_v])
                of = np.array([ft[m & (st == s_)].mean() for s_ in stars_v])
                if len(stars_v) > 2:
                    rep.setdefault("star_offset_std_pct_by_v", {})[name] = {
                        "binned": round(100 * float(np.std(ob)), 4), "per_frame": round(100 * float(np.std(of)), 4),
                        "corr": round(float(np.corrcoef(ob, of)[0, 1]), 3), "stars": int(len(stars_v))}
            meas = [q for _, q in fv if q is not None]
            if meas:
                rep.setdefault("gain_measured_fast_by_v", {})[name] = round(math.sqrt(np.mean(meas) / np.mean(bvar)), 2)
                rep.setdefault("fast_measured_over_predicted_by_v", {})[name] = round(math.sqrt(np.mean(meas) / fvar_pred), 3)
        out[f"r{r}"] = rep
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", choices=["small", "full"])
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--clouds", action="store_true")
    ap.add_argument("--bin-order", type=int, default=None, help="stacker shifts: 0 nearest pixel, 1 bilinear")
    ap.add_argument("--bin-tile", type=int, default=None, help="stacker tile size, px")
    ap.add_argument("--psf", default="gaussian", choices=["gaussian", "moffat"], help="simulated PSF model")
    ap.add_argument("--out", default=None, help="directory to keep the night in (default: a temporary one)")
    ap.add_argument("--reuse", action="store_true",
                    help="re-reduce the night already simulated in --out with the same options")
    ap.add_argument("--no-split", action="store_true", help="split by star in the reducing process")
    args = ap.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="mascara-accuracy-"))
    cfg = SimConfig(site="LP", camera="E", size=args.size, nframes=args.frames, seed=args.seed,
                    clouds=args.clouds, pointing_offset=0.5, bad_frames=3, drift_px=5.0, psf=args.psf)
    t0 = time.perf_counter()
    night_id = f"20260301{cfg.site}{cfg.camera}"
    truth_path = out / f"{night_id}.truth.hdf5"
    if args.reuse and truth_path.exists():
        if load_truth(truth_path)["config"] != dataclasses.asdict(cfg):
            raise SystemExit(f"{truth_path} was simulated with other options")
        sim = {"night_dir": str(out / night_id), "truth": str(truth_path)}
        move_outputs_aside(parse_night_dir(sim["night_dir"]), erase=True)
    else:
        sim = simulate_night(out, "20260301", cfg)
    t1 = time.perf_counter()
    overrides = {"bin_order": args.bin_order, "bin_tile": args.bin_tile}
    settings = Settings.from_dict({k: v for k, v in overrides.items() if v is not None})
    res = reduce_camera_night(sim["night_dir"], settings, split_in_background=not args.no_split)
    t2 = time.perf_counter()
    truth = load_truth(sim["truth"])
    rows = join_with_truth(res.products["fLC"], truth)
    good = rows[rows["flag"] == 0]
    pos_rms = float(np.sqrt(np.mean((good["x"] - good["x_true"]) ** 2 + (good["y"] - good["y_true"]) ** 2)))
    report = {
        "size": args.size, "frames": args.frames, "clouds": args.clouds, "psf": args.psf,
        "bin_order": settings.bin_order, "bin_tile": settings.bin_tile,
        "simulate_s_per_frame": round((t1 - t0) / args.frames, 3),
        "reduce_wall_s_per_frame": round((t2 - t1) / args.frames, 3),
        # CPU time of the stacker stage (shift computation, resampling, mean image) per accepted frame
        "binning_cpu_ms_per_frame": round(1000 * sum(b.timings.get("binning", 0.0) for b in res.batches)
                                          / max(sum(b.nframes for b in res.batches), 1), 1),
        "rejected_frames": len(res.rejected),
        "flagged_batches": sum(b.flagged for b in res.batches), "batches": len(res.batches),
        "astrometry_rms_px": [round(b.astro_rms, 4) for b in res.batches if b.astro_rms is not None],
        "unflagged_star_frames": len(good),
        "position_rms_px": round(pos_rms, 4),
    }
    iso = good[good["isolated_true"]]
    for k, r in ((0, "2.5"), (1, "4.5")):
        z = (iso[f"flux{k}"] - iso[f"flux_{r}_true"]) / iso[f"eflux{k}"]
        report[f"std_z_flux{k}"] = round(float(np.std(z)), 3)
        report[f"median_z_flux{k}"] = round(float(np.median(z)), 3)
    for fast, slow, radius in (("flux0", "flux0", "2.5"), ("flux1", "flux2", "4.5")):
        gain, n = binned_gain(res.products["fLC"], res.products["sLC"], truth, fast, slow, radius)
        report[f"binned_scatter_gain_r{radius}"] = round(gain, 2)
        report["binned_gain_stars"] = n
    report["binned"] = binned_report(res.products["fLC"], res.products["sLC"], truth, settings.binned_apertures,
                                     settings.gain, settings.batch_size, settings.sky_radii)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
