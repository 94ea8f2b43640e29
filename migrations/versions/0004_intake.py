"""Frame intake: gap accounting of batches, the night_intake table, calibration state in the views.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

- ``batch.nframes`` becomes ``frames_present`` (slots with a frame file); new
  ``slots_expected``, ``frames_accepted``, ``frames_rejected``, ``frames_missing``.
- New table ``night_intake``: per camera-night, frames present, missing lstseq
  ranges, why a night is empty, the master calibration used and why.
- ``night_status`` gains ``warning`` (e.g. "reduced without dark"), the state
  ``empty``, missing frames and calibration columns; ``frames_ok`` and
  ``frames_rejected`` count science frames only (calibration files have frame
  rows too now). ``failed_batches`` shows ``frames_present``/``frames_missing``
  instead of ``nframes``.

The three views are dropped and recreated (SQLite and PostgreSQL; SQLite's
table copies break views that name the table); the downgrade restores the
0003 definitions, which are copied here so that this revision stands on its own.
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel  # noqa: F401
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

NIGHT_STATUS = """
CREATE VIEW night_status AS
SELECT cn.id AS camera_night_id,
       c.site AS site,
       cn.camera_id AS camera,
       cn.night AS night,
       CASE WHEN r.id IS NULL AND ni.frames_present = 0 THEN 'empty'
            ELSE COALESCE(r.status, 'pending') END AS state,
       r.phase AS phase,
       r.decision AS decision,
       CASE WHEN ni.calibration = 'none' THEN 'reduced without calibration'
            WHEN ni.calibration = 'bias' THEN 'reduced without dark'
            WHEN (SELECT COUNT(*) FROM frame f
                   WHERE f.camera_night_id = cn.id AND f.lstseq IS NULL AND f.status = 'rejected') > 0
                 THEN 'calibration file(s) rejected'
       END AS warning,
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
         WHERE f.camera_night_id = cn.id AND f.lstseq IS NOT NULL AND f.status = 'ok') AS frames_ok,
       (SELECT COUNT(*) FROM frame f
         WHERE f.camera_night_id = cn.id AND f.lstseq IS NOT NULL AND f.status = 'rejected') AS frames_rejected,
       ni.frames_missing AS frames_missing,
       ni.missing_ranges AS missing_ranges,
       ni.calibration AS calibration,
       ni.calibration_note AS calibration_note,
       (SELECT COUNT(*) FROM frame f
         WHERE f.camera_night_id = cn.id AND f.lstseq IS NULL AND f.status = 'rejected') AS calibration_rejected,
       (SELECT COUNT(*) FROM product p WHERE p.run_id = r.id AND p.erased_at IS NULL) AS products,
       (SELECT MAX(p.path) FROM product p
         WHERE p.camera_night_id = cn.id AND p.kind = 'fLC' AND p.erased_at IS NULL
           AND substr(p.path, 1, length(cn.night_dir) + 13) = cn.night_dir || '/lightcurves/') AS flc_path,
       r.id AS last_run_id,
       r.host AS host,
       r.started_at AS started_at,
       r.finished_at AS finished_at,
       r.heartbeat_at AS heartbeat_at,
       r.code_version AS code_version,
       r.settings_hash AS settings_hash,
       COALESCE(r.error, ni.empty_reason) AS error,
       cn.night_dir AS night_dir,
       cn.datadir AS datadir
FROM camera_night cn
JOIN camera c ON c.id = cn.camera_id
LEFT JOIN night_intake ni ON ni.camera_night_id = cn.id
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
       b.frames_present AS frames_present,
       b.frames_missing AS frames_missing,
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

# ---- the 0003 definitions, restored by the downgrade; failed_runs is unchanged but must be recreated
FAILED_RUNS = """
CREATE VIEW failed_runs AS
SELECT c.site AS site,
       cn.camera_id AS camera,
       cn.night AS night,
       r.id AS run_id,
       r.phase AS phase,
       r.decision AS decision,
       r.error AS error,
       (SELECT COUNT(*) FROM batch b WHERE b.run_id = r.id AND b.status = 'failed') AS batches_failed,
       r.started_at AS started_at,
       r.finished_at AS failed_at,
       {age} AS age_days,
       CASE WHEN r.id = (SELECT r2.id FROM reduction_run r2 WHERE r2.camera_night_id = cn.id
                          ORDER BY r2.started_at DESC, r2.id DESC LIMIT 1)
            THEN 1 ELSE 0 END AS is_latest,
       r.host AS host,
       r.code_version AS code_version,
       r.settings_hash AS settings_hash,
       cn.night_dir AS night_dir,
       cn.id AS camera_night_id
FROM reduction_run r
JOIN camera_night cn ON cn.id = r.camera_night_id
JOIN camera c ON c.id = cn.camera_id
WHERE r.status = 'failed'
"""

AGE_RUNS = {
    "sqlite": "(julianday('now') - julianday(r.finished_at))",
    "postgresql": "CAST(EXTRACT(EPOCH FROM (CURRENT_TIMESTAMP - r.finished_at)) / 86400.0 AS DOUBLE PRECISION)",
}

NIGHT_STATUS_0003 = """
CREATE VIEW night_status AS
SELECT cn.id AS camera_night_id,
       c.site AS site,
       cn.camera_id AS camera,
       cn.night AS night,
       COALESCE(r.status, 'pending') AS state,
       r.phase AS phase,
       r.decision AS decision,
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
       (SELECT COUNT(*) FROM product p WHERE p.run_id = r.id AND p.erased_at IS NULL) AS products,
       (SELECT MAX(p.path) FROM product p
         WHERE p.camera_night_id = cn.id AND p.kind = 'fLC' AND p.erased_at IS NULL
           AND substr(p.path, 1, length(cn.night_dir) + 13) = cn.night_dir || '/lightcurves/') AS flc_path,
       r.id AS last_run_id,
       r.host AS host,
       r.started_at AS started_at,
       r.finished_at AS finished_at,
       r.heartbeat_at AS heartbeat_at,
       r.code_version AS code_version,
       r.settings_hash AS settings_hash,
       r.error AS error,
       cn.night_dir AS night_dir,
       cn.datadir AS datadir
FROM camera_night cn
JOIN camera c ON c.id = cn.camera_id
LEFT JOIN reduction_run r ON r.id = (
    SELECT r2.id FROM reduction_run r2
     WHERE r2.camera_night_id = cn.id
     ORDER BY r2.started_at DESC, r2.id DESC
     LIMIT 1)
"""

FAILED_BATCHES_0003 = """
CREATE VIEW failed_batches AS
SELECT c.site AS site, cn.camera_id AS camera, cn.night AS night, b.batch_index AS batch_index,
       b.lstseq_min AS lstseq_min, b.lstseq_max AS lstseq_max, b.nframes AS nframes, b.tries AS tries,
       b.error AS error, b.finished_at AS failed_at, {age} AS age_days, b.run_id AS run_id, r.host AS host,
       r.code_version AS code_version, r.settings_hash AS settings_hash, b.camera_night_id AS camera_night_id
FROM batch b
JOIN camera_night cn ON cn.id = b.camera_night_id
JOIN camera c ON c.id = cn.camera_id
JOIN reduction_run r ON r.id = b.run_id
WHERE b.status = 'failed'
"""


NEW_BATCH_COLUMNS = ("slots_expected", "frames_accepted", "frames_rejected", "frames_missing")


def _views(night_status: str, failed_batches: str) -> None:
    dialect = op.get_bind().dialect.name
    if dialect not in AGE_DAYS:
        raise NotImplementedError(f"catalog views support SQLite and PostgreSQL, not {dialect}")
    op.execute(night_status)
    op.execute(failed_batches.format(age=AGE_DAYS[dialect]))
    op.execute(FAILED_RUNS.format(age=AGE_RUNS[dialect]))


def _drop_views() -> None:
    op.execute("DROP VIEW IF EXISTS failed_runs")
    op.execute("DROP VIEW IF EXISTS failed_batches")
    op.execute("DROP VIEW IF EXISTS night_status")


def upgrade() -> None:
    _drop_views()
    with op.batch_alter_table("batch", schema=None) as batch_op:
        batch_op.alter_column("nframes", new_column_name="frames_present", existing_type=sa.Integer(),
                              existing_nullable=False)
        for name in NEW_BATCH_COLUMNS:
            batch_op.add_column(sa.Column(name, sa.Integer(), nullable=True))
    op.create_table(
        "night_intake",
        sa.Column("camera_night_id", sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
        sa.Column("run_id", sqlmodel.sql.sqltypes.AutoString(length=36), nullable=True),
        sa.Column("recorded_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("frames_present", sa.Integer(), nullable=False),
        sa.Column("lstseq_first", sa.Integer(), nullable=True),
        sa.Column("lstseq_last", sa.Integer(), nullable=True),
        sa.Column("slots_expected", sa.Integer(), nullable=False),
        sa.Column("frames_missing", sa.Integer(), nullable=False),
        sa.Column("missing_ranges", sa.JSON(), nullable=False),
        sa.Column("empty_reason", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("calibration", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=True),
        sa.Column("calibration_files", sa.JSON(), nullable=True),
        sa.Column("calibration_note", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.CheckConstraint("calibration IN ('dark', 'bias', 'none')", name="ck_intake_calibration"),
        sa.ForeignKeyConstraint(["camera_night_id"], ["camera_night.id"]),
        sa.ForeignKeyConstraint(["run_id"], ["reduction_run.id"]),
        sa.PrimaryKeyConstraint("camera_night_id"),
    )
    with op.batch_alter_table("night_intake", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_night_intake_run_id"), ["run_id"], unique=False)
    _views(NIGHT_STATUS, FAILED_BATCHES)


def downgrade() -> None:
    _drop_views()
    with op.batch_alter_table("night_intake", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_night_intake_run_id"))
    op.drop_table("night_intake")
    with op.batch_alter_table("batch", schema=None) as batch_op:
        for name in NEW_BATCH_COLUMNS:
            batch_op.drop_column(name)
        batch_op.alter_column("frames_present", new_column_name="nframes", existing_type=sa.Integer(),
                              existing_nullable=False)
    _views(NIGHT_STATUS_0003, FAILED_BATCHES_0003)
