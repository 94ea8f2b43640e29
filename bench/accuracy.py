"""Accuracy of a reduction against the simulator's truth.

Simulates a camera-night (clouds, pointing drift, a camera off nominal, broken
frames), reduces it with the library driver and prints the figures of the
reduction issue's acceptance: position rms of unflagged stars, the spread of
(flux - true flux) / eflux per aperture, and how much the binned photometry
beats the per-frame scatter.

    python bench/accuracy.py --size small --frames 300
    python bench/accuracy.py --size full --frames 60
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from mascara.reduce import reduce_camera_night
from mascara.settings import Settings
from mascara.simulate import SimConfig, join_with_truth, load_truth, simulate_night


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", choices=["small", "full"])
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--clouds", action="store_true")
    ap.add_argument("--bin-order", type=int, default=None, help="stacker shifts: 0 nearest pixel, 1 bilinear")
    ap.add_argument("--bin-tile", type=int, default=None, help="stacker tile size, px")
    ap.add_argument("--out", default=None, help="directory to keep the night in (default: a temporary one)")
    args = ap.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="mascara-accuracy-"))
    cfg = SimConfig(site="LP", camera="E", size=args.size, nframes=args.frames, seed=args.seed,
                    clouds=args.clouds, pointing_offset=0.5, bad_frames=3, drift_px=5.0)
    t0 = time.perf_counter()
    sim = simulate_night(out, "20260301", cfg)
    t1 = time.perf_counter()
    overrides = {"bin_order": args.bin_order, "bin_tile": args.bin_tile}
    settings = Settings.from_dict({k: v for k, v in overrides.items() if v is not None})
    res = reduce_camera_night(sim["night_dir"], settings)
    t2 = time.perf_counter()
    truth = load_truth(sim["truth"])
    rows = join_with_truth(res.products["fLC"], truth)
    good = rows[rows["flag"] == 0]
    pos_rms = float(np.sqrt(np.mean((good["x"] - good["x_true"]) ** 2 + (good["y"] - good["y_true"]) ** 2)))
    report = {
        "size": args.size, "frames": args.frames, "clouds": args.clouds,
        "bin_order": settings.bin_order, "bin_tile": settings.bin_tile,
        "simulate_s_per_frame": round((t1 - t0) / args.frames, 3),
        "reduce_wall_s_per_frame": round((t2 - t1) / args.frames, 3),
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
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
