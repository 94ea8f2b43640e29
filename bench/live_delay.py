"""Delay of live mode: from a batch's last frame on disk to the batch's row in the catalog (issue 14).

Runs the live simulator (``mascara simulate --live``) and ``mascprocess
--live`` side by side on a fresh data directory, then, per batch, subtracts
the modification time of the batch's last frame file from the time the
catalog recorded the batch as finished. The delay holds the wait for the
frame to settle (``--settle``, 1 s), the poll interval (``--poll``), and the
reduction of the batch (which grows with the frame size). Prints one JSON
report.

    python bench/live_delay.py --size small --frames 200 --speed 20
    python bench/live_delay.py --size full --frames 150 --speed 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timezone
from pathlib import Path

BIN = Path(sys.executable).parent
NIGHT, SITE, CAM = "20260301", "LP", "E"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", choices=["small", "full"])
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--speed", type=float, default=20.0, help="times faster than real time")
    ap.add_argument("--poll", type=float, default=2.0)
    ap.add_argument("--write-mode", default="rename", choices=["rename", "in-place"])
    args = ap.parse_args()

    from mascara.catalog import connect
    from mascara.catalog.models import Batch

    with tempfile.TemporaryDirectory() as tmp:
        datadir = Path(tmp)
        t0 = time.time()
        sim = subprocess.Popen([str(BIN / "mascara"), "simulate", str(datadir), "--night", NIGHT, "--site", SITE,
                                "--camera", CAM, "--size", args.size, "--frames", str(args.frames), "--seed", "5",
                                "--live", "--speed", str(args.speed), "--write-mode", args.write_mode],
                               stdout=subprocess.DEVNULL)
        raw = datadir / f"{NIGHT}{SITE}{CAM}" / "raw"
        while not (raw.is_dir() and any(p.name.startswith("calib_dark") for p in raw.iterdir())):
            time.sleep(0.2)
        live = subprocess.run([str(BIN / "mascprocess"), str(datadir), "--night", NIGHT, "--site", SITE,
                               "--camera", CAM, "--live", "--idle-timeout", str(max(30.0, 20 * 6.4 / args.speed)),
                               "--poll", str(args.poll), "-q"], capture_output=True, text=True)
        sim.wait()
        if live.returncode != 0:
            raise SystemExit(f"mascprocess --live failed:\n{live.stderr[-3000:]}")
        from sqlmodel import Session, select

        delays = []
        with connect(datadir=datadir) as cat, Session(cat.engine) as s:
            for b in s.exec(select(Batch).where(Batch.status == "succeeded")).all():
                last = raw / f"{b.lstseq_max:08d}{SITE}{CAM}.fits"
                done = b.finished_at.replace(tzinfo=timezone.utc).timestamp()
                delays.append({"batch": b.batch_index, "frames": b.frames_present,
                               "delay_s": round(done - os.stat(last).st_mtime, 2)})
        full = [d["delay_s"] for d in delays if d["frames"] >= 45]
        report = {
            "size": args.size, "frames": args.frames, "speed": args.speed, "poll_s": args.poll,
            "write_mode": args.write_mode, "frame_interval_s": round(6.4 / 1.0027379 / args.speed, 3),
            "batches": delays,
            "full_batch_delay_s": {"median": round(statistics.median(full), 2), "max": max(full)} if full else None,
            "wall_s": round(time.time() - t0, 1),
        }
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
