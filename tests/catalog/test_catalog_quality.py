"""Sky quality in the catalog (revision 0005): per-frame sky and transparency, per-batch mark; both dialects."""

from __future__ import annotations

from sqlalchemy import select
from sqlmodel import Session

from catalog_rows import VERSIONS, fingerprint
from mascara.catalog.models import Batch, Frame


def test_record_quality_updates_frames_and_the_batch(catalog):
    cn = catalog.register_camera_night("LP", "E", "20260301", "/data/20260301LPE")
    run = catalog.start_run(cn, fingerprint(), {"batch_size": 50}, VERSIONS, "h1")
    catalog.register_batches(run, [(100, 5000, 5049, 3), (101, 5050, 5099, 1)])
    catalog.record_frames(cn, [(5000, "00005000LPE.fits", 10, "ok", None), (5001, "00005001LPE.fits", 10, "ok", None),
                               (5002, "00005002LPE.fits", 10, "rejected", "truncated file"),
                               (5050, "00005050LPE.fits", 10, "ok", None)])
    catalog.batch_started(run, 100)
    catalog.batch_succeeded(run, 100, "/tmp/b100.h5", "f" * 64)
    n = catalog.record_quality(run, 100, [(5000, 812.5, 0.41), (5001, 790.0, float("nan")), (5002, 1.0, 1.0)],
                               0.41, True)
    assert n == 2  # the rejected frame keeps no quality
    with Session(catalog.engine) as s:
        frames = {f.lstseq: (f.sky, f.transparency) for f in s.execute(select(Frame)).scalars()}
        batches = {b.batch_index: (b.transparency, b.low_transparency) for b in s.execute(select(Batch)).scalars()}
    assert frames == {5000: (812.5, 0.41), 5001: (790.0, None), 5002: (None, None), 5050: (None, None)}
    assert batches == {100: (0.41, True), 101: (None, None)}
