"""Cost of the stacker per frame, with the shifts of a real batch geometry (issue 11).

Full-size frames, the tile shifts of a 50-frame batch from the simulator's
true camera (stars move about 80 px per batch, and the motion varies over the
field), CPU time of :meth:`mascara.binning.Stacker.add` per frame for every
resampling order and the given tile sizes. Prints one JSON report.

    python bench/stacker.py
    python bench/stacker.py --tiles 16 32 64 --frames 50
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from mascara.binning import ORDERS, Stacker, tile_grid
from mascara.reduce import _tile_places
from mascara.simulate import NightSimulator, SimConfig
from mascara.timeindex import EXPTIME, SITES, jd_start_of


def batch_shifts(tile: int, nframes: int = 50) -> tuple[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]]:
    """Per-frame tile shifts ``(dx, dy)`` of one batch registered to its middle frame."""
    sim = NightSimulator(SimConfig(size="full", nframes=5, pointing_offset=0.5), "20260301")
    ref = int(sim.lstseqs[0]) // 50 * 50 + 25
    model = sim.model_at(ref)
    shape = (model.ny, model.nx)
    jd = float(jd_start_of(ref))
    xc, yc = tile_grid(shape, tile)
    places = _tile_places(model, xc.ravel(), yc.ravel(), SITES["LP"], jd)
    out = []
    for n in range(nframes):
        a, z = places.altaz(jd + (n - nframes // 2) * EXPTIME / 86400.0)
        px, py = model.to_pixels(a, z)
        out.append(((px - xc.ravel()).reshape(xc.shape), (py - yc.ravel()).reshape(yc.shape)))
    return shape, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, nargs="+", default=[32])
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=3, help="passes over the batch; the median pass is reported")
    args = ap.parse_args()
    report = {"frames": args.frames, "ms_per_frame": {}}
    rng = np.random.default_rng(0)
    for tile in args.tiles:
        shape, shifts = batch_shifts(tile, args.frames)
        frame = rng.normal(700.0, 30.0, shape).astype(np.float32)
        for order in ORDERS:
            Stacker(shape, tile, order).add(frame, *shifts[0])  # compile / load the kernel
            passes = []
            for _ in range(args.repeat):
                st = Stacker(shape, tile, order)
                t0 = time.process_time()
                for dx, dy in shifts:
                    st.add(frame, dx, dy)
                passes.append((time.process_time() - t0) / len(shifts))
            report["ms_per_frame"][f"order{order}_tile{tile}"] = round(1000 * float(np.median(passes)), 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
