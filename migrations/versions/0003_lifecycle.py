"""The life of a reduction: camera-nights keyed by their directory, run phases, a journal of moves.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

- ``camera_night``: identity is the night directory (``uq_camera_night_dir``),
  no longer (camera, night); new column ``datadir`` (the directory's parent).
- ``reduction_run``: ``phase``, ``decision``, ``resumed_run_id``. Runs of an
  older catalog get decision ``new`` (they did act on their outputs) and
  phase ``finished`` when they succeeded, else ``reducing``.
- ``directory_move``: a journal: ``seq``, ``state`` (intended/done),
  ``intended_at``; ``moved_at`` is now the confirmation time (nullable).
- ``product.erased_by``: the move (or run) that erased the file.
- Views: ``night_status`` counts live products only, takes ``flc_path`` from
  the current ``lightcurves/`` and shows phase, decision and data directory;
  new view ``failed_runs`` (every failed run, with its error and phase).
"""

from __future__ import annotations

from pathlib import PurePath

import sqlalchemy as sa
import sqlmodel  # noqa: F401
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

NIGHT_STATUS = """
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

# unchanged from 0002; dropped and created again because SQLite's table copies break views
FAILED_BATCHES = """
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

AGE_DAYS = {
    "sqlite": "(julianday('now') - julianday({col}))",
    "postgresql": "CAST(EXTRACT(EPOCH FROM (CURRENT_TIMESTAMP - {col})) / 86400.0 AS DOUBLE PRECISION)",
}

# 0002's night_status, for the downgrade.
OLD_NIGHT_STATUS = """
CREATE VIEW night_status AS
SELECT cn.id AS camera_night_id, c.site AS site, cn.camera_id AS camera, cn.night AS night,
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
       (SELECT COUNT(*) FROM frame f WHERE f.camera_night_id = cn.id AND f.status = 'ok') AS frames_ok,
       (SELECT COUNT(*) FROM frame f WHERE f.camera_night_id = cn.id AND f.status = 'rejected') AS frames_rejected,
       (SELECT COUNT(*) FROM product p WHERE p.run_id = r.id) AS products,
       (SELECT MAX(p.path) FROM product p WHERE p.run_id = r.id AND p.kind = 'fLC') AS flc_path,
       r.id AS last_run_id, r.host AS host, r.started_at AS started_at, r.finished_at AS finished_at,
       r.heartbeat_at AS heartbeat_at, r.code_version AS code_version, r.settings_hash AS settings_hash,
       r.error AS error, cn.night_dir AS night_dir
FROM camera_night cn
JOIN camera c ON c.id = cn.camera_id
LEFT JOIN reduction_run r ON r.id = (
    SELECT r2.id FROM reduction_run r2 WHERE r2.camera_night_id = cn.id
     ORDER BY r2.started_at DESC, r2.id DESC LIMIT 1)
"""


def upgrade() -> None:
    bind = op.get_bind()
    dialect = bind.dialect.name
    if dialect not in AGE_DAYS:
        raise NotImplementedError(f"catalog views support SQLite and PostgreSQL, not {dialect}")
    op.execute("DROP VIEW IF EXISTS night_status")
    op.execute("DROP VIEW IF EXISTS failed_batches")

    with op.batch_alter_table("camera_night", schema=None) as b:
        b.add_column(sa.Column("datadir", sqlmodel.sql.sqltypes.AutoString(), nullable=True))
    rows = bind.execute(sa.text("SELECT id, night_dir FROM camera_night")).all()
    for cid, night_dir in rows:
        bind.execute(sa.text("UPDATE camera_night SET datadir = :d WHERE id = :i"),
                     {"d": str(PurePath(night_dir).parent), "i": cid})
    with op.batch_alter_table("camera_night", schema=None) as b:
        b.alter_column("datadir", existing_type=sqlmodel.sql.sqltypes.AutoString(), nullable=False)
        b.drop_constraint("uq_camera_night", type_="unique")
        b.create_unique_constraint("uq_camera_night_dir", ["night_dir"])
        b.create_index(b.f("ix_camera_night_datadir"), ["datadir"], unique=False)

    with op.batch_alter_table("reduction_run", schema=None) as b:
        b.add_column(sa.Column("phase", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False,
                               server_default="registered"))
        b.add_column(sa.Column("decision", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True))
        b.add_column(sa.Column("resumed_run_id", sqlmodel.sql.sqltypes.AutoString(length=36), nullable=True))
    op.execute("UPDATE reduction_run SET decision = 'new', "
               "phase = CASE WHEN status = 'succeeded' THEN 'finished' ELSE 'reducing' END")
    with op.batch_alter_table("reduction_run", schema=None) as b:
        b.alter_column("phase", existing_type=sqlmodel.sql.sqltypes.AutoString(length=16), server_default=None)
        b.create_check_constraint(
            "ck_run_phase", "phase IN ('registered', 'moving', 'reducing', 'combining', 'finished')")
        b.create_check_constraint("ck_run_decision", "decision IN ('new', 'resume', 'move', 'erase')")

    with op.batch_alter_table("directory_move", schema=None) as b:
        b.add_column(sa.Column("seq", sa.Integer(), nullable=False, server_default="0"))
        b.add_column(sa.Column("state", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False,
                               server_default="done"))
        b.add_column(sa.Column("intended_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
    op.execute("UPDATE directory_move SET intended_at = moved_at")
    with op.batch_alter_table("directory_move", schema=None) as b:
        b.alter_column("seq", existing_type=sa.Integer(), server_default=None)
        b.alter_column("state", existing_type=sqlmodel.sql.sqltypes.AutoString(length=16), server_default=None)
        b.alter_column("intended_at", existing_type=sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False)
        b.alter_column("moved_at", existing_type=sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True)
        b.create_index(b.f("ix_directory_move_state"), ["state"], unique=False)
        b.create_check_constraint("ck_move_state", "state IN ('intended', 'done')")

    with op.batch_alter_table("product", schema=None) as b:
        b.add_column(sa.Column("erased_by", sqlmodel.sql.sqltypes.AutoString(length=36), nullable=True))

    op.execute(NIGHT_STATUS)
    op.execute(FAILED_BATCHES.format(age=AGE_DAYS[dialect].format(col="b.finished_at")))
    op.execute(FAILED_RUNS.format(age=AGE_DAYS[dialect].format(col="r.finished_at")))


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.execute("DROP VIEW IF EXISTS failed_runs")
    op.execute("DROP VIEW IF EXISTS night_status")
    op.execute("DROP VIEW IF EXISTS failed_batches")
    with op.batch_alter_table("product", schema=None) as b:
        b.drop_column("erased_by")
    op.execute("DELETE FROM directory_move WHERE state <> 'done'")
    with op.batch_alter_table("directory_move", schema=None) as b:
        b.drop_constraint("ck_move_state", type_="check")
        b.drop_index(b.f("ix_directory_move_state"))
    op.execute("UPDATE directory_move SET moved_at = intended_at WHERE moved_at IS NULL")
    with op.batch_alter_table("directory_move", schema=None) as b:
        b.alter_column("moved_at", existing_type=sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False)
        b.drop_column("intended_at")
        b.drop_column("state")
        b.drop_column("seq")
    with op.batch_alter_table("reduction_run", schema=None) as b:
        b.drop_constraint("ck_run_decision", type_="check")
        b.drop_constraint("ck_run_phase", type_="check")
        b.drop_column("resumed_run_id")
        b.drop_column("decision")
        b.drop_column("phase")
    with op.batch_alter_table("camera_night", schema=None) as b:
        b.drop_index(b.f("ix_camera_night_datadir"))
        b.drop_constraint("uq_camera_night_dir", type_="unique")
        # two data directories with the same night cannot go back to a (camera, night) key
        b.create_unique_constraint("uq_camera_night", ["camera_id", "night"])
        b.drop_column("datadir")
    op.execute(OLD_NIGHT_STATUS)
    op.execute(FAILED_BATCHES.format(age=AGE_DAYS[dialect].format(col="b.finished_at")))
