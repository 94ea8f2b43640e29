"""A season at a glance: CPU time per batch and the ``season`` view of monthly totals.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

- ``batch.cpu_s``: CPU seconds of the batch (the sum of its stage timings),
  filled in for the batches already recorded.
- View ``season``: one row per site, camera and month (``YYYYMM``) with the
  camera-nights in each state of their latest run (``done`` = succeeded,
  ``failed``, ``running``, ``pending``, ``empty``), the science frames
  accepted and rejected, and the CPU seconds of the batches of the latest
  reductions. Built on ``night_status``, so it follows its definition: a
  later migration that recreates ``night_status`` must drop ``season`` first
  and recreate it after (PostgreSQL refuses to drop a view others use).
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

SEASON = """
CREATE VIEW season AS
SELECT ns.site AS site,
       ns.camera AS camera,
       substr(ns.night, 1, 6) AS month,
       COUNT(*) AS camera_nights,
       SUM(CASE WHEN ns.state = 'succeeded' THEN 1 ELSE 0 END) AS done,
       SUM(CASE WHEN ns.state = 'failed' THEN 1 ELSE 0 END) AS failed,
       SUM(CASE WHEN ns.state = 'running' THEN 1 ELSE 0 END) AS running,
       SUM(CASE WHEN ns.state = 'pending' THEN 1 ELSE 0 END) AS pending,
       SUM(CASE WHEN ns.state = 'empty' THEN 1 ELSE 0 END) AS empty,
       SUM(ns.frames_ok) AS frames,
       SUM(ns.frames_rejected) AS frames_rejected,
       SUM(COALESCE((SELECT SUM(b.cpu_s) FROM batch b JOIN reduction_run r ON r.id = ns.last_run_id
                     WHERE b.camera_night_id = ns.camera_night_id
                       AND b.fingerprint_key = r.fingerprint_key), 0)) AS cpu_seconds
FROM night_status ns
GROUP BY ns.site, ns.camera, substr(ns.night, 1, 6)
"""


def upgrade() -> None:
    op.add_column("batch", sa.Column("cpu_s", sa.Float(), nullable=True))
    bind = op.get_bind()
    batch = sa.table("batch", sa.column("id", sa.String()), sa.column("timings", sa.JSON()),
                     sa.column("cpu_s", sa.Float()))
    for bid, timings in bind.execute(sa.select(batch.c.id, batch.c.timings)
                                     .where(batch.c.timings.is_not(None))).all():
        t = json.loads(timings) if isinstance(timings, str) else timings
        if t:
            bind.execute(sa.update(batch).where(batch.c.id == bid)
                         .values(cpu_s=float(sum(float(v) for v in t.values()))))
    op.execute(SEASON)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS season")
    op.drop_column("batch", "cpu_s")
