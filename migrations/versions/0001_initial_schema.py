"""Initial schema: sites, cameras, camera-nights, runs, provenance, leases, batches, frames, products, moves.

Revision ID: 0001
Revises: 
Create Date: 2026-11-25 19:39:49.179506
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa
import sqlmodel  # noqa: F401  (autogenerate renders sqlmodel.sql.sqltypes.AutoString)


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('site',
    sa.Column('code', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
    sa.PrimaryKeyConstraint('code')
    )
    op.create_table('camera',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('site', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
    sa.Column('letter', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
    sa.ForeignKeyConstraint(['site'], ['site.code'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('camera', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_camera_site'), ['site'], unique=False)

    op.create_table('camera_night',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
    sa.Column('camera_id', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('night', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
    sa.Column('night_dir', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('registered_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['camera_id'], ['camera.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('camera_id', 'night', name='uq_camera_night')
    )
    with op.batch_alter_table('camera_night', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_camera_night_camera_id'), ['camera_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_camera_night_night'), ['night'], unique=False)

    op.create_table('frame',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
    sa.Column('camera_night_id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
    sa.Column('lstseq', sa.Integer(), nullable=True),
    sa.Column('filename', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('size', sa.Integer(), nullable=True),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.CheckConstraint("status IN ('ok', 'rejected')", name='ck_frame_status'),
    sa.ForeignKeyConstraint(['camera_night_id'], ['camera_night.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('camera_night_id', 'filename', name='uq_frame')
    )
    with op.batch_alter_table('frame', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_frame_camera_night_id'), ['camera_night_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_frame_lstseq'), ['lstseq'], unique=False)

    op.create_table('reduction_run',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
    sa.Column('camera_night_id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('host', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=True),
    sa.Column('flow_run_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('started_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('heartbeat_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('finished_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('error', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('code_version', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('settings_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('catalogue_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('raw_inventory_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('fingerprint_key', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('settings', sa.JSON(), nullable=False),
    sa.CheckConstraint("status IN ('pending', 'running', 'succeeded', 'failed', 'skipped')", name='ck_run_status'),
    sa.ForeignKeyConstraint(['camera_night_id'], ['camera_night.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('reduction_run', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_reduction_run_camera_night_id'), ['camera_night_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_reduction_run_fingerprint_key'), ['fingerprint_key'], unique=False)
        batch_op.create_index(batch_op.f('ix_reduction_run_flow_run_id'), ['flow_run_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_reduction_run_started_at'), ['started_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_reduction_run_status'), ['status'], unique=False)

    op.create_table('batch',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
    sa.Column('camera_night_id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
    sa.Column('fingerprint_key', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('run_id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
    sa.Column('batch_index', sa.Integer(), nullable=False),
    sa.Column('lstseq_min', sa.Integer(), nullable=False),
    sa.Column('lstseq_max', sa.Integer(), nullable=False),
    sa.Column('nframes', sa.Integer(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('tries', sa.Integer(), nullable=False),
    sa.Column('error', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('started_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('finished_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('timings', sa.JSON(), nullable=True),
    sa.Column('astro_rms', sa.Float(), nullable=True),
    sa.Column('astro_nstars', sa.Integer(), nullable=True),
    sa.Column('flagged', sa.Boolean(), nullable=True),
    sa.Column('path', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.CheckConstraint("status IN ('pending', 'running', 'succeeded', 'failed', 'skipped')", name='ck_batch_status'),
    sa.ForeignKeyConstraint(['camera_night_id'], ['camera_night.id'], ),
    sa.ForeignKeyConstraint(['run_id'], ['reduction_run.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('camera_night_id', 'fingerprint_key', 'batch_index', name='uq_batch')
    )
    with op.batch_alter_table('batch', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_batch_camera_night_id'), ['camera_night_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_batch_run_id'), ['run_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_batch_status'), ['status'], unique=False)

    op.create_table('directory_move',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
    sa.Column('camera_night_id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
    sa.Column('run_id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=True),
    sa.Column('src', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('dst', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('action', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('moved_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.CheckConstraint("action IN ('renamed', 'erased')", name='ck_move_action'),
    sa.ForeignKeyConstraint(['camera_night_id'], ['camera_night.id'], ),
    sa.ForeignKeyConstraint(['run_id'], ['reduction_run.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('directory_move', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_directory_move_camera_night_id'), ['camera_night_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_directory_move_run_id'), ['run_id'], unique=False)

    op.create_table('lease',
    sa.Column('camera_night_id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
    sa.Column('run_id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
    sa.Column('host', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('acquired_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('heartbeat_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('expires_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['camera_night_id'], ['camera_night.id'], ),
    sa.ForeignKeyConstraint(['run_id'], ['reduction_run.id'], ),
    sa.PrimaryKeyConstraint('camera_night_id')
    )
    with op.batch_alter_table('lease', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_lease_run_id'), ['run_id'], unique=False)

    op.create_table('package_version',
    sa.Column('run_id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
    sa.Column('package', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('version', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['reduction_run.id'], ),
    sa.PrimaryKeyConstraint('run_id', 'package')
    )
    op.create_table('product',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
    sa.Column('run_id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
    sa.Column('camera_night_id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('path', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('nstars', sa.Integer(), nullable=True),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('erased_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.CheckConstraint("kind IN ('fLC', 'sLC', 'binned', 'diagnostics', 'solution')", name='ck_product_kind'),
    sa.ForeignKeyConstraint(['camera_night_id'], ['camera_night.id'], ),
    sa.ForeignKeyConstraint(['run_id'], ['reduction_run.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('product', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_product_camera_night_id'), ['camera_night_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_product_path'), ['path'], unique=False)
        batch_op.create_index(batch_op.f('ix_product_run_id'), ['run_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('product', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_product_run_id'))
        batch_op.drop_index(batch_op.f('ix_product_path'))
        batch_op.drop_index(batch_op.f('ix_product_camera_night_id'))

    op.drop_table('product')
    op.drop_table('package_version')
    with op.batch_alter_table('lease', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_lease_run_id'))

    op.drop_table('lease')
    with op.batch_alter_table('directory_move', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_directory_move_run_id'))
        batch_op.drop_index(batch_op.f('ix_directory_move_camera_night_id'))

    op.drop_table('directory_move')
    with op.batch_alter_table('batch', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_batch_status'))
        batch_op.drop_index(batch_op.f('ix_batch_run_id'))
        batch_op.drop_index(batch_op.f('ix_batch_camera_night_id'))

    op.drop_table('batch')
    with op.batch_alter_table('reduction_run', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_reduction_run_status'))
        batch_op.drop_index(batch_op.f('ix_reduction_run_started_at'))
        batch_op.drop_index(batch_op.f('ix_reduction_run_flow_run_id'))
        batch_op.drop_index(batch_op.f('ix_reduction_run_fingerprint_key'))
        batch_op.drop_index(batch_op.f('ix_reduction_run_camera_night_id'))

    op.drop_table('reduction_run')
    with op.batch_alter_table('frame', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_frame_lstseq'))
        batch_op.drop_index(batch_op.f('ix_frame_camera_night_id'))

    op.drop_table('frame')
    with op.batch_alter_table('camera_night', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_camera_night_night'))
        batch_op.drop_index(batch_op.f('ix_camera_night_camera_id'))

    op.drop_table('camera_night')
    with op.batch_alter_table('camera', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_camera_site'))

    op.drop_table('camera')
    op.drop_table('site')
