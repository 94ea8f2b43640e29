"""Rows a reduction writes, for the catalog tests (shared by several test files)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import update

from mascara.catalog import Catalog
from mascara.catalog.models import Batch


def fingerprint(settings_hash: str = "s1", code_version: str = "0.1.0") -> dict[str, str]:
    return {"code_version": code_version, "settings_hash": settings_hash.ljust(64, "0"),
            "catalogue_hash": "c".ljust(64, "0"), "raw_inventory_hash": "r".ljust(64, "0")}


VERSIONS = {"mascara": "0.1.0", "numpy": "2.4.0", "astropy": "8.0.0", "photutils": "3.0.0"}


def lstseq0(night: str) -> int:
    """A plausible first lstseq of a night (13500 slots per sidereal day, SPEC §2)."""
    day = (datetime.strptime(night, "%Y%m%d") - datetime(2012, 12, 31)).days
    return 13500 * day + 9000


def reduce_fake(cat: Catalog, site: str, cam: str, night: str, *, nbatches: int, fail: dict[int, int] | None = None,
                finish: str | None = "succeeded", settings_hash: str = "s1", rejected: int = 0,
                products: bool = True, host: str = "reducer1") -> tuple[str, str]:
    """Write the rows a reduction of ``nbatches`` full batches would write.

    ``fail`` maps a batch index (0-based within the night) to its number of
    failed tries; failed batches with 3 tries stay failed, others succeed on
    the last try. Returns ``(camera_night_id, run_id)``.
    """
    fail = fail or {}
    cn = cat.register_camera_night(site, cam, night, f"/data/{night}{site}{cam}")
    first = lstseq0(night)
    b0 = first // 50
    frames = [(first + i, f"{first + i:08d}{site}{cam}.fits", 21_800_000, "ok", None) for i in range(50 * nbatches)]
    for k in range(rejected):
        lst, name, size, _, _ = frames[7 + 13 * k]
        frames[7 + 13 * k] = (lst, name, size, "rejected", "missing keyword LST")
    cat.record_frames(cn, frames)
    settings = {"batch_size": 50, "apertures": [2.5, 4.5], "sky_radii": [6.0, 21.0], "tag": settings_hash}
    run = cat.start_run(cn, fingerprint(settings_hash), settings, VERSIONS, host)
    cat.decide(run, "new", None, [])
    cat.begin_reducing(run, [(b0 + k, (b0 + k) * 50, (b0 + k) * 50 + 49, 50) for k in range(nbatches)], fresh=False)
    for k in range(nbatches):
        idx = b0 + k
        tries = fail.get(k, 0)
        for _ in range(tries):
            cat.batch_started(run, idx)
            cat.batch_failed(run, idx, f"RuntimeError: astrometry diverged in batch {idx}")
        if tries >= 3:
            continue
        cat.batch_started(run, idx)
        cat.batch_succeeded(run, idx, f"/data/{night}{site}{cam}/tmp/batch_{idx}.h5", f"{idx:064x}",
                            {"read": 4.1, "astrometry": 1.3, "photometry": 9.8}, 0.21 + 0.01 * (k % 3),
                            180 + k, k == 1)
        cat.heartbeat(run)
    if products and finish == "succeeded":
        base = f"/data/{night}{site}{cam}/lightcurves"
        cat.record_product(run, "fLC", f"{base}/fLC_{night}{site}{cam}.hdf5", "a" * 64, 912_000_000, 6400)
        cat.record_product(run, "sLC", f"{base}/sLC_{night}{site}{cam}.hdf5", "b" * 64, 31_000_000, 15000)
    if finish is not None:
        cat.finish_run(run, finish, None if finish == "succeeded" else "batches failed")
    return cn, run


def fill_realistic(cat: Catalog) -> dict[str, Any]:
    """A small observatory's catalog: four camera-nights in different states.

    - LPE 20260301: reduced once with settings s0, moved aside, reduced again
      with s1: succeeded, 12/12 batches, 3 rejected frames, fLC + sLC.
    - LPS 20260301: failed: 10 batches, 2 failed after 3 tries, 1 retried ok.
    - LPW 20260301: registered, never reduced.
    - LSC 20260215: failed 2 batches, the failures dated 20 days ago.
    """
    e_cn, e_old = reduce_fake(cat, "LP", "E", "20260301", nbatches=12, settings_hash="s0")
    cat.record_move(e_cn, None, "/data/20260301LPE/lightcurves", "/data/20260301LPE/lightcurves_old",
                    "renamed", "settings changed")
    e_cn, e_run = reduce_fake(cat, "LP", "E", "20260301", nbatches=12, rejected=3)
    s_cn, s_run = reduce_fake(cat, "LP", "S", "20260301", nbatches=10, fail={2: 3, 5: 3, 7: 1}, finish="failed")
    w_cn = cat.register_camera_night("LP", "W", "20260301", "/data/20260301LPW")
    c_cn, c_run = reduce_fake(cat, "LS", "C", "20260215", nbatches=4, fail={0: 3, 1: 3}, finish="failed",
                              host="reducer2")
    old = datetime.now(UTC) - timedelta(days=20)
    with cat.engine.begin() as conn:
        conn.execute(update(Batch).where(Batch.run_id == c_run, Batch.status == "failed").values(finished_at=old))
    return {"e_cn": e_cn, "e_run": e_run, "e_old": e_old, "s_cn": s_cn, "s_run": s_run, "w_cn": w_cn,
            "c_cn": c_cn, "c_run": c_run}
