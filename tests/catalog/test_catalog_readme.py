"""The SQL queries of README.md's Catalog section run on SQLite and PostgreSQL.

Run with ``-s`` to print each query's output on the test rows.
"""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import text

from catalog_rows import VERSIONS, fill_realistic

README = Path(__file__).resolve().parents[2] / "README.md"


def catalog_section() -> str:
    body = README.read_text()
    start = body.index("\n## Catalog\n")
    end = body.find("\n## ", start + 1)
    return body[start:end if end > 0 else None]


def readme_queries() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", catalog_section(), flags=re.S)


def test_readme_has_the_promised_queries():
    queries = readme_queries()
    assert len(queries) == 7
    assert "night_status" in queries[0] and "failed_batches" in queries[1] and "failed_runs" in queries[2]
    assert "package_version" in queries[3] and "erased_at IS NULL" in queries[3]


def test_readme_queries_run(catalog):
    ids = fill_realistic(catalog)
    out = []
    with catalog.engine.connect() as conn:
        for sql in readme_queries():
            result = conn.execute(text(sql))
            out.append((list(result.keys()), [tuple(r) for r in result]))
    print()
    for (cols, rows), sql in zip(out, readme_queries()):
        print(sql.strip().splitlines()[0], "...")
        print("  ", " | ".join(cols))
        for r in rows:
            print("  ", " | ".join(str(v) for v in r))

    status, failures, failed_runs, software, moves, astrometry, season = (rows for _, rows in out)
    assert [r[:4] for r in status] == [("LPE", "succeeded", 12, 12), ("LPS", "failed", 8, 10),
                                       ("LPW", "pending", 0, 0)]
    assert [r[:3] for r in status][0] and status[0][4:6] == (597, 3)
    assert status[0][6] == "/data/20260301LPE/lightcurves/fLC_20260301LPE.hdf5"
    # LPS batches 2 and 5 failed 3 times; LSC's failures are 20 days old
    b0 = status and next(r for r in catalog.failed_batches() if r["camera"] == "LPS")["batch_index"]
    assert [r[:4] for r in failures] == [("20260301", "LPS", b0, 3), ("20260301", "LPS", b0 + 3, 3)]
    assert all("astrometry diverged" in r[4] for r in failures)
    # failed runs say why, with the phase they stopped in (LSC failed 20 days ago but its run just now)
    assert [r[:5] for r in failed_runs] == [("20260215", "LSC", "reducing", 2, 1), ("20260301", "LPS", "reducing", 2, 1)]
    assert all(r[5] == "batches failed" for r in failed_runs)
    assert {r[0] for r in software} == {ids["e_run"]}
    assert [(r[4], r[5]) for r in software] == sorted(VERSIONS.items())
    assert moves == [("20260301", "LPE", "renamed", "/data/20260301LPE/lightcurves",
                      "/data/20260301LPE/lightcurves_old", "settings changed")]
    # LPE: two runs of 12 batches; LPS: 8 succeeded; LSC: 2 succeeded; batch 1 of each run is flagged
    assert [(r[0], r[1], r[2], r[4]) for r in astrometry] == [
        ("20260215", "LSC", 2, 0), ("20260301", "LPE", 24, 2), ("20260301", "LPS", 8, 1)]
    rms_lpe = [0.21 + 0.01 * (k % 3) for k in range(12)]
    assert abs(float(astrometry[1][3]) - sum(rms_lpe) / 12) < 5e-4
    # the season: one row per month, site and camera, by the state of the latest run
    assert [r[:9] for r in season] == [("202602", "LS", "LSC", 1, 0, 1, 0, 0, 0), ("202603", "LP", "LPE", 1, 1, 0, 0, 0, 0),
                                       ("202603", "LP", "LPS", 1, 0, 1, 0, 0, 0), ("202603", "LP", "LPW", 1, 0, 0, 0, 1, 0)]
