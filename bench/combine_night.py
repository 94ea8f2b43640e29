"""Benchmark of the light-curve path: batch files -> StarSplitter -> fLC/sLC files.

Generates a synthetic camera-night (stars drift through the field: each star is
visible for a window of frames so that about ``--per-frame`` stars are on each
frame), writes its batch files, then times, each in a fresh process so that the
peak memory is its own:

- split: ``StarSplitter.add`` of every batch file (what runs beside the reduction);
- combine: ``combine_night`` from the splitter's workdir;
- combine again (idempotent: nothing rewritten);
- reading one star back (``read_star`` and plain h5py).

Usage::

    python bench/combine_night.py                      # full size: 5000 frames, 25000 stars
    python bench/combine_night.py --frames 300 --stars 2000 --per-frame 600
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np

from mascara import lightcurves as lc
from mascara.lcformat import FAST_DTYPE, SLOW_DTYPE, with_ascc

GLOBAL = {
    "STATION": "LP", "CAMERA": "E", "ALT0": 49.0, "AZ0": 90.0, "TH0": 270.0, "X0": 2004.0, "Y0": 1336.0,
    "AVERSION": "bench", "RVERSION": "0.1.0", "CVERSION": "none", "EXPTIME": 6.4, "CCDTEMP": -10.0,
    "NAPER": 2, "APER0": 2.5, "APER1": 4.5, "NSTAPER": 4, "SKYRAD0": 6.0, "SKYRAD1": 21.0,
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(batchdir: Path, nframes: int, nstars: int, per_frame: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(100000, 2_000_000), nstars, replace=False)
    dur = np.maximum(1, rng.normal(nframes * per_frame / nstars, nframes * 0.05, nstars)).astype(int)
    start = rng.integers(-dur, nframes)
    cat = np.zeros(nstars, lc.STAR_DTYPE)
    cat["ascc"] = ids.astype(str).astype("S12")
    cat["ra"], cat["dec"] = rng.uniform(0, 360, nstars), rng.uniform(-30, 90, nstars)
    cat["vmag"] = rng.uniform(2, 8.4, nstars)
    cat["bmag"] = cat["vmag"] + 0.5
    cat["spectype"] = b"G2V"
    lstseq0 = 48510530  # mid-batch: the night starts and ends with partial batches
    lstseqs = lstseq0 + np.arange(nframes)
    paths = []
    for b in np.unique(lstseqs // 50):
        seqs = lstseqs[lstseqs // 50 == b]
        frames = seqs - lstseq0
        vis = (start[None, :] <= frames[:, None]) & (frames[:, None] < (start + dur)[None, :])
        fi, si = np.nonzero(vis)  # frame-major
        fast = np.zeros(fi.size, with_ascc(FAST_DTYPE))
        fast["ascc"] = cat["ascc"][si]
        fast["lstseq"] = seqs[fi]
        fast["lstidx"] = seqs[fi] % 13500
        fast["jdmid"] = 2457000.0 + seqs[fi] * 6.4 / 86400
        for n in ("flux0", "eflux0", "flux1", "eflux1", "sky", "esky", "x", "y", "alt", "az"):
            fast[n] = rng.random(fi.size)
        present = np.unique(si)
        slow = np.zeros(present.size, with_ascc(SLOW_DTYPE))
        slow["ascc"] = cat["ascc"][present]
        slow["lstseq"] = seqs[len(seqs) // 2]
        slow["flux0"] = rng.random(present.size)
        p = batchdir / f"{b:08d}LPE.h5"
        lc.write_batch_file(p, fast, slow, cat[present], {"batch": int(b)})
        paths.append(p)
    return paths


def run_split(paths: list[str], workdir: str, diag: list[str], out: mp.Queue) -> None:
    sp = lc.StarSplitter(workdir, diag)
    per = []
    for p in paths:
        t = time.perf_counter()
        sp.add(p)
        per.append(time.perf_counter() - t)
    out.put({"split_total": sum(per), "split_max": max(per), "split_mean": float(np.mean(per)), "rss": peak_rss_mb()})


def run_combine(paths: list[str], outdir: str, workdir: str | None, out: mp.Queue) -> None:
    t = time.perf_counter()
    res = lc.combine_night(paths, outdir, "20260301LPE", GLOBAL, workdir=workdir)
    out.put({"combine": time.perf_counter() - t, "rss": peak_rss_mb(), "res": res})


def in_child(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    r = q.get()
    p.join()
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=5000)
    ap.add_argument("--stars", type=int, default=25000)
    ap.add_argument("--per-frame", type=int, default=6500)
    ap.add_argument("--dir", default="/tmp/mascara-bench-lc")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--direct", action="store_true", help="also time a combine without the splitter")
    args = ap.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    (root / "batches").mkdir(parents=True)
    try:
        t = time.perf_counter()
        paths = [str(p) for p in generate(root / "batches", args.frames, args.stars, args.per_frame)]
        size = sum(os.path.getsize(p) for p in paths) / 1e9
        print(f"generated {len(paths)} batch files, {size:.2f} GB, in {time.perf_counter() - t:.1f} s")

        from mascara.lightcurves import read_batch_file

        some = read_batch_file(paths[len(paths) // 2]).stars["ascc"][:3]
        diag = [s.decode() for s in some]
        r = in_child(run_split, paths, str(root / "work"), diag)
        print(f"split: total {r['split_total']:.1f} s, per batch mean {r['split_mean']:.2f} s "
              f"max {r['split_max']:.2f} s, peak RSS {r['rss']:.0f} MB")

        r = in_child(run_combine, paths, str(root / "lightcurves"), str(root / "work"))
        res = r["res"]
        print(f"combine (from splitter): {r['combine']:.1f} s, peak RSS {r['rss']:.0f} MB, "
              f"{res['nstars_fast']} fLC stars, {res['nstars_slow']} sLC stars, "
              f"fLC {os.path.getsize(res['fLC']) / 1e9:.2f} GB")
        r2 = in_child(run_combine, paths, str(root / "lightcurves"), str(root / "work"))
        print(f"combine again (idempotent, rewritten={r2['res']['rewritten']}): {r2['combine']:.1f} s")
        if args.direct:
            r3 = in_child(run_combine, paths, str(root / "direct"), None)
            print(f"combine (direct, temporary split): {r3['combine']:.1f} s, peak RSS {r3['rss']:.0f} MB, "
                  f"same sha256: {r3['res']['sha256_fLC'] == res['sha256_fLC']}")

        import h5py

        star = diag[0]
        t = time.perf_counter()
        data, hdr = lc.read_star(res["fLC"], star)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        with h5py.File(res["fLC"], "r") as f:
            keys = list(f["data"].keys())
        t2 = time.perf_counter() - t
        print(f"read one star ({data.size} points): {t1 * 1e3:.1f} ms; open + list {len(keys)} keys: {t2 * 1e3:.0f} ms")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
