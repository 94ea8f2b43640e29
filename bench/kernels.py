"""One thread, in process: the per-frame stages of a full batch and ``measure_apertures`` alone (issue 12).

Runs on the night ``make bench`` simulates (``/tmp/bench-data/bench/data/<night>``;
reduce it once with ``make bench`` first, or point ``--night-dir`` at any
reduced full-size night). Two figures, each repeated and given as min/median
of CPU milliseconds per frame:

- ``reduce_batch`` of the first full batch (its stage timings), after one
  warm-up batch;
- ``measure_apertures`` on the first ``--frames`` frames of that batch, at the
  positions its batch file holds (per-frame settings; ``--binned`` uses the
  binned apertures and no raw image, as the binned photometry does).

To compare two versions of the code, run the script under each with
``PYTHONPATH`` on an export of the other one, interleaved::

    git archive 63a0278 | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python bench/kernels.py; python bench/kernels.py

``--save FILE`` stores the photometry tables and ``--compare FILE`` reports
which fields differ from them and by how much (relative). numba's cache
differs from a fresh compile when fast-math lets LLVM fuse differently
(``mascara.photometry._REASSOC``): compare runs with the same cache state,
e.g. both with ``NUMBA_CACHE_DIR`` set to a new empty directory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--night-dir", default="/tmp/bench-data/bench/data/20260705LPE")
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--binned", action="store_true", help="binned apertures, no raw image")
    ap.add_argument("--no-batch", action="store_true", help="skip the reduce_batch figure")
    ap.add_argument("--save")
    ap.add_argument("--compare")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(HERE))
    import run  # the benchmark's JIT warm-up

    import mascara
    from mascara.lightcurves import read_batch_file
    from mascara.photometry import measure_apertures
    from mascara.rawio import read_calibrated
    from mascara.reduce import plan_camera_night, prepare_camera_night, reduce_batch

    run._warm_jit()
    plan = plan_camera_night(args.night_dir)
    ctx = prepare_camera_night(plan)
    s = plan.settings
    full = max(sorted(plan.batches), key=lambda b: len(plan.batches[b]))  # the first of the fullest batches
    report: dict = {"mascara": str(Path(mascara.__file__).parent), "batch": full}

    if not args.no_batch:
        reduce_batch(plan, ctx, full)  # warm: buffers, caches
        rows = []
        for _ in range(args.repeat):
            c = time.process_time()
            o = reduce_batch(plan, ctx, full)
            rows.append({"total": (time.process_time() - c) / o.nframes * 1e3,
                         **{k: v / o.nframes * 1e3 for k, v in o.timings.items()}})
        report["reduce_batch_ms_per_frame"] = {
            k: [round(min(r[k] for r in rows), 2), round(statistics.median(r[k] for r in rows), 2)] for k in rows[0]}

    batch_file = plan.batch_path(full)
    if not Path(batch_file).exists():  # the positions come from the batch's own file
        reduce_batch(plan, ctx, full)
    fast = read_batch_file(batch_file).fast
    seqs = np.unique(fast["lstseq"])[: args.frames]
    files = {f.lstseq: f.path for f in plan.frames}
    frames = []
    for q in seqs:
        frame, image, raw = read_calibrated(files[q], ctx.master(), ctx.raw_shape)
        sel = fast["lstseq"] == q
        # the raw science region stays a view of the whole raw frame, as in the reduction
        frames.append((image.copy(), frame.data.copy()[frame.science_slice], fast["x"][sel].astype(float),
                       fast["y"][sel].astype(float)))

    def measure() -> list[np.ndarray]:
        if args.binned:
            return [measure_apertures(im, x, y, s.binned_apertures, s.sky_radii, s.gain * s.batch_size)
                    for im, _raw, x, y in frames]
        return [measure_apertures(im, x, y, s.apertures, s.sky_radii, s.gain, raw=raw, saturation=s.saturation)
                for im, raw, x, y in frames]

    tables = measure()
    times = []
    for _ in range(args.repeat):
        c = time.process_time()
        measure()
        times.append((time.process_time() - c) / len(frames) * 1e3)
    report["measure_apertures_ms_per_frame"] = [round(min(times), 2), round(statistics.median(times), 2)]
    report["stars_per_frame"] = round(float(np.mean([len(f[2]) for f in frames])), 1)

    table = np.concatenate(tables)
    if args.save:
        np.save(args.save, table)
    if args.compare:
        old = np.load(args.compare)
        diff = {}
        for k in table.dtype.names:
            a, b = old[k].astype(float), table[k].astype(float)
            same = (a == b) | (np.isnan(a) & np.isnan(b))
            if not same.all():
                with np.errstate(invalid="ignore", divide="ignore"):
                    rel = np.abs(a - b) / np.abs(a)
                diff[k] = {"differ": int((~same).sum()), "max_rel": float(np.nanmax(rel[~same]))}
        report["compared"] = {"rows": int(table.size), "fields_differing": diff}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
