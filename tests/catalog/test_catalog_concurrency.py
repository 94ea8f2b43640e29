"""Several processes write one catalog at once: nothing is lost, nothing fails.

A station has five cameras, each finishing a batch every 319 s. Here 4
processes (spawned, as Prefect/Dask workers would be) each reduce a different
camera-night and write 60 batches' updates as fast as they can: hours of
real-time load compressed into seconds, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import multiprocessing as mp
import time

from sqlalchemy import func, select
from sqlmodel import Session

from mascara.catalog import connect
from mascara.catalog.models import Batch, Frame, ReductionRun

NPROC = 4
NBATCH = 60


def _worker(url: str, cam: str, barrier, results) -> None:  # type: ignore[no-untyped-def]
    try:
        barrier.wait(timeout=120)
        cat = connect(url)  # all at once on an empty database: one creates the schema, others wait
        barrier.wait(timeout=120)
        t0 = time.perf_counter()
        cn = cat.register_camera_night("LP", cam, "20260301", f"/data/20260301LP{cam}")
        fp = {"code_version": "0.1.0", "settings_hash": "s", "catalogue_hash": "c", "raw_inventory_hash": cam}
        run = cat.start_run(cn, fp, {"batch_size": 50}, {"mascara": "0.1.0"}, f"worker-{cam}")
        b0 = 35_000_000 // 50
        cat.register_batches(run, [(b0 + k, 50 * (b0 + k), 50 * (b0 + k) + 49, 50) for k in range(NBATCH)])
        ntx = 3
        for k in range(NBATCH):
            idx = b0 + k
            cat.batch_started(run, idx)
            cat.record_frames(cn, [(50 * idx + i, f"{50 * idx + i:08d}LP{cam}.fits", 21_800_000, "ok", None)
                                   for i in range(50)])
            cat.batch_succeeded(run, idx, f"/tmp/{cam}/{idx}.h5", f"{idx:064x}", {"total": 1.0}, 0.2, 200, False)
            cat.heartbeat(run)
            ntx += 4
        cat.finish_run(run, "succeeded")
        results.put((cam, "ok", ntx + 1, time.perf_counter() - t0))
        cat.close()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put((cam, f"{exc.__class__.__name__}: {exc}", 0, 0.0))


def test_concurrent_writers_lose_nothing(db_url):
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(NPROC), ctx.Queue()
    cams = "NESW"[:NPROC]
    procs = [ctx.Process(target=_worker, args=(db_url, cam, barrier, results)) for cam in cams]
    for p in procs:
        p.start()
    out = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [o[1] for o in out] == ["ok"] * NPROC, out
    ntx = sum(o[2] for o in out)
    wall = max(o[3] for o in out)
    print(f"\n{db_url.split(':')[0]}: {NPROC} processes, {ntx} transactions in {wall:.2f} s "
          f"({ntx / wall:.0f} tx/s)")

    with connect(db_url) as cat, Session(cat.engine) as s:
        assert s.execute(select(func.count()).select_from(Batch)).scalar_one() == NPROC * NBATCH
        per = dict(s.execute(select(Batch.run_id, func.count()).where(Batch.status == "succeeded",
                                                                      Batch.tries == 1)
                             .group_by(Batch.run_id)).all())
        assert sorted(per.values()) == [NBATCH] * NPROC
        assert s.execute(select(func.count()).select_from(Frame)).scalar_one() == NPROC * NBATCH * 50
        assert s.execute(select(func.count()).select_from(ReductionRun)
                         .where(ReductionRun.status == "succeeded")).scalar_one() == NPROC
        rows = cat.night_status("20260301")
        assert [(r["camera"], r["batches_done"], r["frames_ok"]) for r in rows] == \
            [(f"LP{c}", NBATCH, NBATCH * 50) for c in sorted(cams)]
