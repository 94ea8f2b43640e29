"""Views night_status and failed_batches.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

Plain SQL common to SQLite and PostgreSQL; only the age of a failure in days
needs each dialect's date arithmetic.
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# The latest run of each camera-night decides its state; batch counts are those
# of that run's fingerprint (resumed runs share batch rows).
NIGHT_STATUS = """
CREATE VIEW night_status AS
SELECT cn.id AS camera_night_id,
       c.site AS site,
       cn.camera_id AS camera,
       cn.night AS night,
       COALESCE(r.status, 'pending') AS state,
       (SELECT COUNT(*) FROM batch b
         WHERE b.camera_night_id = cn.id AND b.fingerprint_key = r.fingerprint_key) AS batches_total,
       (SELECT COUNT(*) FROM batch b
         WHERE b.camera_night_id = cn.id AND b.fingerprint_key = r.fingerprint_key
           AND b.status = 'succeeded') AS batches_done,
       (SELECT COUNT(*) FROM batch b
         WHERE b.camera_night_id = cn.id AND b.fingerprint_key = r.fingerprint_key
           AND b.status = 'failed') AS batches_failed,
       (SELECT COUNT(*) FROM batch b
         WHERE b.camera_night_id = cn.id AND b.fingerprint_key = r.fingerprint_key
           AND b.status = 'skipped') AS batches_skipped,
       (SELECT COUNT(*) FROM frame f
         WHERE f.camera_night_id = cn.id AND f.status = 'ok') AS frames_ok,
       (SELECT COUNT(*) FROM frame f
         WHERE f.camera_night_id = cn.id AND f.status = 'rejected') AS frames_rejected,
       (SELECT COUNT(*) FROM product p WHERE p.run_id = r.id) AS products,
       (SELECT MAX(p.path) FROM product p WHERE p.run_id = r.id AND p.kind = 'fLC') AS flc_path,
       r.id AS last_run_id,
       r.host AS host,
       r.started_at AS started_at,
       r.finished_at AS finished_at,
       r.heartbeat_at AS heartbeat_at,
       r.code_version AS code_version,
       r.settings_hash AS settings_hash,
       r.error AS error,
       cn.night_dir AS night_dir
FROM camera_night cn
JOIN camera c ON c.id = cn.camera_id
LEFT JOIN reduction_run r ON r.id = (
    SELECT r2.id FROM reduction_run r2
     WHERE r2.camera_night_id = cn.id
     ORDER BY r2.started_at DESC, r2.id DESC
     LIMIT 1)
"""

FAILED_BATCHES = """
CREATE VIEW failed_batches AS
SELECT c.site AS site,
       cn.camera_id AS camera,
       cn.night AS night,
       b.batch_index AS batch_index,
       b.lstseq_min AS lstseq_min,
       b.lstseq_max AS lstseq_max,
       b.nframes AS nframes,
       b.tries AS tries,
       b.error AS error,
       b.finished_at AS failed_at,
       {age} AS age_days,
       b.run_id AS run_id,
       r.host AS host,
       r.code_version AS code_version,
       r.settings_hash AS settings_hash,
       b.camera_night_id AS camera_night_id
FROM batch b
JOIN camera_night cn ON cn.id = b.camera_night_id
JOIN camera c ON c.id = cn.camera_id
JOIN reduction_run r ON r.id = b.run_id
WHERE b.status = 'failed'
"""

AGE_DAYS = {
    "sqlite": "(julianday('now') - julianday(b.finished_at))",
    "postgresql": "CAST(EXTRACT(EPOCH FROM (CURRENT_TIMESTAMP - b.finished_at)) / 86400.0 AS DOUBLE PRECISION)",
}


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect not in AGE_DAYS:
        raise NotImplementedError(f"catalog views support SQLite and PostgreSQL, not {dialect}")
    op.execute(NIGHT_STATUS)
    op.execute(FAILED_BATCHES.format(age=AGE_DAYS[dialect]))


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS failed_batches")
    op.execute("DROP VIEW IF EXISTS night_status")
